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

from lstm_attn.training import base_config, stdlib_budget

FAMILIES = ('lstm_lm', 'lstm_attn')


def get_config(family: str = 'lstm_lm'):
  if family not in FAMILIES:
    raise ValueError(f'lstm_stdlib.py:{family}: expected one of {FAMILIES} after the colon.')
  c = stdlib_budget(base_config(family))  # default.py's budget, at batch 32
  if family == 'lstm_lm':
    c.model.embed_init = 1.0  # bytes, like characters, need a larger input scale than AWD's 0.1 (lstm_char)
  c.batch_size = 32
  return c
