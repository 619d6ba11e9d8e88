"""Character-level LSTM language model on tiny Shakespeare, same data and token budget as gpt_char.

    python experiments/train.py --config=experiments/configs/lstm_char.py \
      --config.data.path=../shared/data/tinyshakespeare.txt --workdir=/tmp/lstm_attn/lstm_char

2000 steps x batch 12 x context 64 = 1.5M training characters, as gpt_char. Two LSTM layers of 256
(an embedding of 128, tied softmax through a projection). `data.path` is required, as for gpt_char (the
comparison is on the same text; no default corpus stands in for it).
"""

from lstm_attn.train import base_config


def get_config():
  c = base_config('lstm_lm')
  c.model.embed_dim = 128
  c.model.hidden_size = 256
  c.model.num_layers = 2
  c.model.tie_embeddings = True
  c.data.path = ''
  c.data.required = True
  c.data.tokenizer = 'char'
  c.data.seq_len = 64
  c.batch_size = 12
  c.num_train_steps = 2000
  c.optim.learning_rate = 2e-3
  c.optim.min_learning_rate = 2e-4
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.1
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500
  c.eval_batch_size = 64
  c.eval_batches = 0
  c.sample_tokens = 300
  return c
