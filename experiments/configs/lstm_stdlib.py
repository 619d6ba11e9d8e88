"""A byte-level LSTM LM or LSTM+attention hybrid pre-trained on the embedded stdlib corpus (no download).

    python experiments/train.py --config=experiments/configs/lstm_stdlib.py:lstm_lm \
      --workdir=/tmp/lstm_attn/lstm_lm_stdlib
    python experiments/train.py --config=experiments/configs/lstm_stdlib.py:lstm_attn \
      --workdir=/tmp/lstm_attn/lstm_attn_stdlib

The LSTM families' pre-training for transfer (`finetune_cls.py:<family>` restores their trunks), on the
same text as the default GPT (experiments/configs/default.py): 1500 steps x 32 x 128 bytes for the LSTM
LM, 3000 for the hybrid (its fine-tuned gain over the from-scratch twin: +0.13 after 1500, +0.19 after
3000; BUILD_NOTES "Pre-training then fine-tuning"). The state is carried across batches (truncated
BPTT). Model sizes are the families' defaults (lstm_lm: embedding 128, two LSTM layers of 256; lstm_attn:
two residual blocks of 256, one attention head in the last), which `finetune_cls.py` builds too.
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
  if family == 'lstm_attn':
    # From scratch the hybrid learns the downstream task well (attention finds identifiers), so its
    # pre-training must go further to pay: 3000 steps took it from +0.13 to +0.19 over that twin.
    c.num_train_steps = 3000
  return c
