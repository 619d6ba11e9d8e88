r"""Load a checkpoint of a training run and generate text.

    python experiments/sample.py --workdir=/tmp/lstm_attn/gpt_char --prompt='ROMEO:' --num_tokens=500

Uses the run's own config and tokenizer (saved in the checkpoint and the workdir), the latest checkpoint
(or `--step`, or `--best`: the lowest eval loss), and lstm_attn.generate (cached decoding; temperature,
top-k, top-p). The checkpoints are opened read-only: sampling beside a live trainer changes nothing, and
a checkpoint the trainer deletes while it is read is replaced by the then-latest one.
"""

import json
import math
import os

import jax
from absl import app, flags

from lstm_attn import cli
from lstm_attn.data.tokenizers import load_tokenizer
from lstm_attn.models import build_model, model_config
from lstm_attn.training import build_steps, checkpointing, sample_text
from lstm_attn.training.config import complete_config
from lstm_attn.training.steps import objective_of

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a training run (experiments/train.py).')
_STEP = flags.DEFINE_integer(
  'step', None, 'Checkpoint step (default: the latest; see --best).', lower_bound=0
)
_BEST = flags.DEFINE_bool('best', False, 'Use the checkpoint with the lowest eval loss.')
_PROMPT = flags.DEFINE_string('prompt', '\n', 'Text to continue.')
_NUM = flags.DEFINE_integer('num_tokens', 300, 'Tokens to generate.', lower_bound=1)
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Independent samples.', lower_bound=1)
_TEMP = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature (0: greedy).')
_TOP_K = flags.DEFINE_integer('top_k', None, 'Keep the k most likely tokens.', lower_bound=1)
_TOP_P = flags.DEFINE_float('top_p', None, 'Nucleus sampling mass.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.mark_flag_as_required('workdir')
flags.register_validator(
  'temperature', lambda t: math.isfinite(t) and t >= 0, 'must be a finite number >= 0 (0: greedy)'
)
flags.register_validator('top_p', lambda p: p is None or 0 < p <= 1, 'must be a number in (0, 1]')


def load_run(workdir: str, *, step: int | None = None, best: bool = False):
  """(step, config, tokenizer, model) of a checkpoint of the run in `workdir`, opened read-only.

  The latest checkpoint that loads (a damaged one is named and skipped), or `step`, or with `best` the
  lowest eval loss. Safe beside the trainer of that run: nothing is written, and a step its retention
  deletes while this reads it is picked again. The tokenizer is the workdir's own (the checkpoint
  stores its path relative to the workdir).
  """
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(
      f'--workdir={workdir!r} has no checkpoints/ folder: give the workdir of a training run '
      '(experiments/train.py).'
    )
  meta = checkpointing.peek_meta(ckpt_dir)
  if meta is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt_dir} yet: sample once the run has saved one.')
  config = complete_config(meta['config'])
  if objective_of(config) != 'lm':
    raise ValueError(
      f'--workdir={workdir!r} trained a {config.model.name!r} model, which cannot generate text.'
    )
  tokenizer = load_tokenizer(checkpointing.resolve_in_workdir(meta['tokenizer'], workdir))
  steps = build_steps(config, lambda r: build_model(config, vocab_size=tokenizer.vocab_size, rngs=r))
  ck = checkpointing.Checkpointer(ckpt_dir, read_only=True)
  try:
    if step is not None:
      if step not in ck.all_steps():
        raise ValueError(
          f'--step={step} is not a checkpoint in {ckpt_dir}; available steps: {ck.all_steps()}.'
        )
      restored = (step, *ck.restore(step, steps.abstract_state))
    elif best:
      restored = ck.restore_best(steps.abstract_state)
      if restored is None:
        raise ValueError(
          f'--best: no checkpoint in {ckpt_dir} has an eval loss; give --step or leave --best out.'
        )
    else:
      restored = ck.restore_latest_good(steps.abstract_state)
      if restored is None:
        raise FileNotFoundError(
          f'--workdir={workdir!r}: its checkpoints were all deleted while reading them.'
        )
  finally:
    ck.close()
  step, state, _ = restored
  return step, config, tokenizer, steps.model(state)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  step, config, tokenizer, model = load_run(_WORKDIR.value, step=_STEP.value, best=_BEST.value)
  spec, model_cfg = model_config(config.model)
  print(json.dumps({'workdir': _WORKDIR.value, 'step': step, 'model': config.model.name}))
  for i in range(_NUM_SAMPLES.value):
    text = sample_text(
      model,
      tokenizer,
      rng=jax.random.fold_in(jax.random.key(_SEED.value), i),
      num_tokens=_NUM.value,
      prompt=_PROMPT.value,
      context_window=spec.context_window(model_cfg),
      temperature=_TEMP.value,
      top_k=_TOP_K.value,
      top_p=_TOP_P.value,
    )
    print(f'--- sample {i} ---\n{text}')


if __name__ == '__main__':
  cli.run_main(main)
