"""Fine-tune a pre-trained model on the embedded stdlib task (which package is a snippet from?).

Pre-train, then fine-tune the same family (the second run also trains the same classifier from scratch
for the same budget and prints both accuracies side by side):

    python experiments/train.py --config=experiments/configs/bert_mlm.py --workdir=/tmp/lstm_attn/bert_mlm
    python experiments/train.py --config=experiments/configs/finetune_cls.py \
      --config.init_from=/tmp/lstm_attn/bert_mlm --workdir=/tmp/lstm_attn/finetune_cls

`finetune_cls.py:<family>` fine-tunes another family, from the workdir of its pre-training run:
    gpt        experiments/configs/default.py (the default experiment)
    bert       experiments/configs/bert_mlm.py (the default family here)
    lstm_lm    experiments/configs/lstm_stdlib.py:lstm_lm
    lstm_attn  experiments/configs/lstm_stdlib.py:lstm_attn
`experiments/transfer_study.py` runs all of them and writes the README's table.

The model sizes here are those pre-training configs' (the trunk is restored where paths and shapes match,
listed in `<workdir>/transfer.json`; the classifier head is fresh). The tokenizer is the pre-training
run's.
"""

from lstm_attn.models import MODEL_SPECS
from lstm_attn.training import base_config


def get_config(family: str = 'bert'):
  if family not in MODEL_SPECS:
    raise ValueError(f'finetune_cls.py:{family}: expected one of {tuple(MODEL_SPECS)} after the colon.')
  c = base_config(family)
  if family in ('gpt', 'bert'):
    c.model.max_len = 128  # default.py / bert_mlm.py
  if family == 'gpt':
    c.model.positions = 'rotary'  # default.py
  c.num_classes = 10
  # c.init_from: the pre-training run's workdir, given on the command line (see the docstring)
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
