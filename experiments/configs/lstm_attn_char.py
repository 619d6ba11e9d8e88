"""Character-level LSTM + attention hybrid (SHA-RNN style) on tiny Shakespeare, same budget as gpt_char.

    python experiments/train.py --config=experiments/configs/lstm_attn_char.py \
      --config.data.path=../shared/data/tinyshakespeare.txt --workdir=/tmp/lstm_attn/lstm_attn_char

Two residual LSTM blocks of width 128, single-head causal attention in the last one and a feed-forward
("boom") layer; 2000 steps x batch 12 x context 64 characters, as gpt_char.
"""

from lstm_attn.training import base_config, tiny_shakespeare_budget


def get_config():
  c = tiny_shakespeare_budget(base_config('lstm_attn'))
  c.model.d_model = 128  # two residual blocks; attention (1 head) in the last one (HybridConfig defaults)
  c.model.boom_hidden = 512
  c.optim.learning_rate = 2e-3
  c.optim.min_learning_rate = 2e-4
  return c
