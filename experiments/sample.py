r"""Load a checkpoint of a training run and generate text.

    python experiments/sample.py --workdir=/tmp/lstm_attn/gpt_char --prompt='ROMEO:' --num_tokens=500

Uses the run's own config and tokenizer (saved in the checkpoint and the workdir), the latest checkpoint
(or `--step`, e.g. the best one), and lstm_attn.generate (cached decoding; temperature, top-k, top-p).
"""

import json
import os

from absl import app, flags

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
  import ml_collections

  from lstm_attn import checkpointing, train
  from lstm_attn.data.tokenizers import load_tokenizer
  from lstm_attn.models import build_model

  ckpt_dir = os.path.join(_WORKDIR.value, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'--workdir={_WORKDIR.value!r} has no checkpoints/ folder: is it a training run?')
  ck = checkpointing.Checkpointer(ckpt_dir)
  step = _STEP.value if _STEP.value is not None else (ck.best_step() if _BEST.value else ck.latest_step())
  if step is None or step not in ck.all_steps():
    raise ValueError(f'--step={step}: not a checkpoint of {ckpt_dir}; available steps: {ck.all_steps()}')
  meta = ck.restore_meta(step)
  config = ml_collections.ConfigDict(meta['config'])
  if train.objective_of(config) != 'lm':
    raise ValueError(
      f'the run in {_WORKDIR.value!r} trained a {config.model.name!r} model that cannot generate.'
    )
  tokenizer = load_tokenizer(meta['tokenizer'])
  steps, _, _, _, abstract = train.build_steps(
    config, lambda r: build_model(config, vocab_size=tokenizer.vocab_size, rngs=r), seed=int(config.seed)
  )
  state, _ = ck.restore(step, abstract)
  ck.close()
  config.sampling.temperature = _TEMP.value
  config.sampling.top_k = _TOP_K.value
  config.sampling.top_p = _TOP_P.value
  config.seed = _SEED.value

  class _Inputs:  # what train.sample_text needs
    pass

  inputs = _Inputs()
  inputs.tokenizer = tokenizer
  print(json.dumps({'workdir': _WORKDIR.value, 'step': step, 'model': config.model.name}))
  for i in range(_NUM_SAMPLES.value):
    text = train.sample_text(
      config, inputs, steps, state, step + i, prompt=_PROMPT.value, num_tokens=_NUM.value
    )
    print(f'--- sample {i} ---\n{text}')


if __name__ == '__main__':
  app.run(main)
