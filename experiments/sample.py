r"""Load a checkpoint of a training run and generate text.

    python experiments/sample.py --workdir=/tmp/lstm_attn/gpt_char --prompt='ROMEO:' --num_tokens=500

Uses the run's own config and tokenizer (saved in the checkpoint and the workdir), the latest checkpoint
(or `--step`, or `--best`: the lowest eval loss), and lstm_attn.generate (cached decoding; temperature,
top-k, top-p). The checkpoints are opened read-only: sampling beside a live trainer changes nothing.
"""

import json
import os

import jax
from absl import app, flags

from lstm_attn.data.tokenizers import load_tokenizer
from lstm_attn.models import build_model, model_config
from lstm_attn.training import build_steps, checkpointing, sample_text
from lstm_attn.training.config import complete_config
from lstm_attn.training.steps import objective_of

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a training run (experiments/train.py).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest; see --best).')
_BEST = flags.DEFINE_bool('best', False, 'Use the checkpoint with the lowest eval loss.')
_PROMPT = flags.DEFINE_string('prompt', '\n', 'Text to continue.')
_NUM = flags.DEFINE_integer('num_tokens', 300, 'Tokens to generate.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Independent samples.')
_TEMP = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature (0: greedy).')
_TOP_K = flags.DEFINE_integer('top_k', None, 'Keep the k most likely tokens.')
_TOP_P = flags.DEFINE_float('top_p', None, 'Nucleus sampling mass.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  ckpt_dir = os.path.join(_WORKDIR.value, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'--workdir={_WORKDIR.value!r} has no checkpoints/ folder: is it a training run?')
  ck = checkpointing.Checkpointer(ckpt_dir, read_only=True)
  step = _STEP.value if _STEP.value is not None else (ck.best_step() if _BEST.value else ck.latest_step())
  if step is None or step not in ck.all_steps():
    raise ValueError(f'--step={step}: not a checkpoint of {ckpt_dir}; available steps: {ck.all_steps()}')
  meta = ck.restore_meta(step)
  config = complete_config(meta['config'])
  if objective_of(config) != 'lm':
    raise ValueError(
      f'the run in {_WORKDIR.value!r} trained a {config.model.name!r} model that cannot generate.'
    )
  tokenizer = load_tokenizer(meta['tokenizer'])
  steps = build_steps(config, lambda r: build_model(config, vocab_size=tokenizer.vocab_size, rngs=r))
  state, _ = ck.restore(step, steps.abstract_state)
  ck.close()
  spec, model_cfg = model_config(config.model)
  model = steps.model(state)
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
  app.run(main)
