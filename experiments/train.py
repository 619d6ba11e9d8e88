r"""Train and evaluate one experiment; resumes by itself from --workdir. Intentionally kept short.

    python experiments/train.py --workdir=/tmp/lstm_attn/default          # the default experiment
    python experiments/train.py --config=experiments/configs/gpt_char.py \
      --config.data.path=../shared/data/tinyshakespeare.txt --workdir=/tmp/lstm_attn/gpt_char

Any config field can be overridden: `--config.num_train_steps=100 --config.optim.learning_rate=3e-4`.
Exit status: 0 done; 1 bad flags, config or paths, a workdir of another experiment, a diverged run (NaN),
or no restorable checkpoint (the message says which; nothing in the workdir is overwritten).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lstm_attn.training import CheckpointError, TrainingDiverged, train_and_evaluate

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'default.py')
_CONFIG = config_flags.DEFINE_config_file(
  'config', default=_DEFAULT_CONFIG, help_string='Experiment config file.'
)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Folder for checkpoints, metrics, TensorBoard events, samples.'
)
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]} (config fields go as --config.field=value).')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; --verbosity=0 shows them
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, TrainingDiverged, CheckpointError) as e:
    print(f'ERROR: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
