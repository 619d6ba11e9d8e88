"""Character-level LSTM language model on tiny Shakespeare, same data and token budget as gpt_char.

    python experiments/train.py --config=experiments/configs/lstm_char.py \
      --config.data.path=../shared/data/tinyshakespeare.txt --workdir=/tmp/lstm_attn/lstm_char

2000 steps x batch 12 x context 64 = 1.5M training characters, as gpt_char. Two LSTM layers of 256
(an embedding of 128, tied softmax through a projection). `data.path` is required, as for gpt_char (the
comparison is on the same text; no default corpus stands in for it).
"""

from lstm_attn.training import base_config, tiny_shakespeare_budget


def get_config():
  # Model defaults (models/specs.py LSTMLMConfig): embedding 128, two tied LSTM layers of 256.
  c = tiny_shakespeare_budget(base_config('lstm_lm'))
  c.optim.learning_rate = 2e-3
  c.optim.min_learning_rate = 2e-4
  return c
