r"""Train and evaluate one experiment; resumes by itself from --workdir. Intentionally kept short.

    python experiments/train.py --workdir=/tmp/lstm_attn/default          # the default experiment
    python experiments/train.py --config=experiments/configs/gpt_char.py \
      --config.data.path=../shared/data/tinyshakespeare.txt --workdir=/tmp/lstm_attn/gpt_char

Any config field can be overridden: `--config.num_train_steps=100 --config.optim.learning_rate=3e-4`;
`--config.data.max_bytes=None` sets a field to None (here: the whole corpus).
Exit status (lstm_attn/cli.py): 0 done; 2 a usage error (an unknown flag or config field, a value that
does not parse, a --config file that does not load); 1 any other bad config value, path or workdir, a
workdir of another experiment, a diverged run (NaN), or no restorable checkpoint. The one line
`error: ...` on stderr says which; nothing in the workdir is overwritten. `--verbosity=1` or
LSTM_ATTN_TRACEBACK=1 adds the traceback.
"""

import os

from absl import app, flags

from lstm_attn import cli
from lstm_attn.training import check_config, train_and_evaluate

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'default.py')
_CONFIG = cli.define_config_file('config', default=_DEFAULT_CONFIG)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Folder for checkpoints, metrics, TensorBoard events, samples.'
)
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}: config fields go as --config.field=value.')
  check_config(_CONFIG.value)  # every field, before the workdir is looked at
  cli.check_output_dir(_WORKDIR.value, '--workdir')
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run_main(main)
