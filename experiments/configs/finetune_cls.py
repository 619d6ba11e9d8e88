"""Fine-tune the pretrained BERT encoder on the embedded stdlib task (which package is a snippet from?).

Pretrain first, then fine-tune (the second run also trains the same classifier from scratch for the same
budget and prints both accuracies side by side):

    python experiments/train.py --config=experiments/configs/bert_mlm.py --workdir=/tmp/lstm_attn/bert_mlm
    python experiments/train.py --config=experiments/configs/finetune_cls.py \
      --config.init_from=/tmp/lstm_attn/bert_mlm --workdir=/tmp/lstm_attn/finetune_cls

The backbone subtree (`model.backbone`) is restored from the pretraining checkpoint where paths and shapes
match (listed in `<workdir>/transfer.json`); the classifier head is fresh. The tokenizer is the
pretraining run's. Set --config.model.name/sizes to fine-tune another pretrained model family (e.g. a
gpt_char or lstm_char workdir trained on the stdlib), and keep them equal to the pretraining run's.
"""

from lstm_attn.training import base_config


def get_config():
  c = base_config('bert')  # the bert_mlm encoder: width 128, 4 layers, 4 heads, dropout 0.1
  c.model.max_len = 128
  c.num_classes = 10
  # c.init_from: the pretraining run's workdir, given on the command line (see the docstring)
  c.compare_from_scratch = True
  c.data.snippets_per_class = (256, 64, 64)
  c.batch_size = 32
  c.num_train_steps = 300
  c.optim.learning_rate = 3e-4
  c.optim.min_learning_rate = 3e-5
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.01
  c.eval_every = 150
  c.checkpoint_every = 150
  c.sample_tokens = 0
  return c
