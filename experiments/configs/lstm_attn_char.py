"""Character-level LSTM + attention hybrid (SHA-RNN style) on tiny Shakespeare, same budget as gpt_char.

    python experiments/train.py --config=experiments/configs/lstm_attn_char.py \
      --config.data.path=../shared/data/tinyshakespeare.txt --workdir=/tmp/lstm_attn/lstm_attn_char

Two residual LSTM blocks of width 128, single-head causal attention in the last one and a feed-forward
("boom") layer; 2000 steps x batch 12 x context 64 characters, as gpt_char.
"""

from lstm_attn.train import base_config


def get_config():
  c = base_config('lstm_attn')
  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.attention_layers = (-1,)
  c.model.num_heads = 1
  c.model.boom_hidden = 512
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
