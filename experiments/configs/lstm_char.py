"""Character-level LSTM language model on tiny Shakespeare, same data and token budget as gpt_char.

    python experiments/train.py --config=experiments/configs/lstm_char.py \
      --config.data.path=../shared/data/tinyshakespeare.txt --workdir=/tmp/lstm_attn/lstm_char

2000 steps x 24 streams x 32 characters = 1.5M training characters, as gpt_char's 2000 x 12 x 64. Two
LSTM layers of 256 (an embedding of 128, tied softmax through a projection), the state carried across
batches (truncated BPTT); `--config.carry_state=False --config.data.mode=random` trains the same model
on independent windows. `data.path` is required, as for gpt_char (the comparison is on the same text;
no default corpus stands in for it).
"""

from lstm_attn.training import base_config, tiny_shakespeare_budget


def get_config():
  # Model defaults (models/specs.py LSTMLMConfig): embedding 128, two tied LSTM layers of 256; the LSTM
  # state is carried across batches (truncated BPTT, base_config's carry_state for lstm_lm).
  c = tiny_shakespeare_budget(base_config('lstm_lm'))
  # Characters need a larger input scale than AWD's word-level U(-0.1, 0.1): with it the first layer's
  # input pre-activations are ~0.02 and the LSTM ignores its input for hundreds of steps (val 1.82 vs 1.59).
  c.model.embed_init = 1.0
  # The same 1.5M training characters as 24 streams of 32: a carried state needs no long window (val
  # 1.566; 64 x 12 carried: 1.588); without the carry, 32-character windows reach 1.641 (64: 1.608).
  c.batch_size = 24
  c.data.seq_len = 32
  c.optim.learning_rate = 2e-3
  c.optim.min_learning_rate = 2e-4
  return c
