"""A byte-level LSTM LM or LSTM+attention hybrid pre-trained on the embedded stdlib corpus (no download).

    python experiments/train.py --config=experiments/configs/lstm_stdlib.py:lstm_lm \
      --workdir=/tmp/lstm_attn/lstm_lm_stdlib
    python experiments/train.py --config=experiments/configs/lstm_stdlib.py:lstm_attn \
      --workdir=/tmp/lstm_attn/lstm_attn_stdlib

The LSTM families' pre-training for transfer (`finetune_cls.py:<family>` restores their trunks), on the
same text and token budget as the default GPT (experiments/configs/default.py): 1500 steps x 32 x 128
bytes. The state is carried across batches (truncated BPTT). Model sizes are the families' defaults
(lstm_lm: embedding 128, two LSTM layers of 256; lstm_attn: two residual blocks of 256, one attention
head in the last), which `finetune_cls.py` builds too.
"""

from lstm_attn.training import base_config

FAMILIES = ('lstm_lm', 'lstm_attn')


def get_config(family: str = 'lstm_lm'):
  if family not in FAMILIES:
    raise ValueError(f'lstm_stdlib.py:{family}: expected one of {FAMILIES} after the colon.')
  c = base_config(family)
  if family == 'lstm_lm':
    c.model.embed_init = 1.0  # bytes, like characters, need a larger input scale than AWD's 0.1 (lstm_char)
  c.data.max_bytes = 8_000_000
  c.batch_size = 32
  c.num_train_steps = 1500
  c.optim.learning_rate = 2e-3
  c.optim.min_learning_rate = 2e-4
  c.eval_every = 500
  c.checkpoint_every = 500
  c.eval_batch_size = 64
  c.sample_tokens = 300
  c.sampling.prompt = 'def '
  return c
