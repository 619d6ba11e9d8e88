r"""Loss curves from one or several workdirs (their metrics.jsonl) to one PNG.

    python experiments/plot.py --workdirs=/tmp/lstm_attn/gpt_char,/tmp/lstm_attn/lstm_char \
      --out=/tmp/lstm_attn/curves.png

Train loss (thin) and val loss (markers) against steps (`--x=tokens`: against training tokens seen, for
runs that logged `tokens_per_s`/`step_time_s`), one colour per run, labelled by the workdir's name. A
second panel shows val bits per character (or per byte) when recorded.

A damaged line of a metrics.jsonl (not UTF-8, not a JSON object, no step) is skipped with a warning; a run
with nothing left to plot is an error (lstm_attn/cli.py: `error: ...`, exit status 1; 2 for bad flags).
"""

import os

from absl import flags

from lstm_attn import cli

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Comma-separated workdirs of training runs.')
_OUT = flags.DEFINE_string(
  'out', None, 'Output image path (.png if it has no suffix; required: nothing goes to a default path).'
)
_X = flags.DEFINE_enum('x', 'step', ['step', 'tokens'], 'Horizontal axis.')
flags.mark_flag_as_required('workdirs')
flags.mark_flag_as_required('out')
flags.register_validator('workdirs', bool, 'give one or more workdirs, comma-separated')


def _out_path(out: str, supported) -> str:
  """--out as written: '.png' added to a path without a suffix; a folder or an unknown suffix refused."""
  if os.path.isdir(out):
    raise IsADirectoryError(f'--out={out} is a folder: give a file path, e.g. --out={out}/curves.png')
  suffix = os.path.splitext(out)[1].lstrip('.').lower()
  if not suffix:
    return out + '.png'
  if suffix not in supported:
    raise ValueError(f'--out={out}: {suffix!r} is not an image format matplotlib writes; use .png')
  return out


def _load(wd: str) -> tuple[list, list]:
  """(train records, val records) with a loss, of one workdir."""
  from lstm_attn.training.metrics import METRICS_FILE, read_metrics

  if not os.path.isdir(wd):
    raise FileNotFoundError(f'--workdirs: {wd!r} is not a folder')
  records = read_metrics(wd)
  train = [r for r in records if r.get('split') == 'train' and 'loss' in r]
  val = [r for r in records if r.get('split') == 'val' and 'loss' in r]
  if not train and not val:
    raise ValueError(
      f'--workdirs: {os.path.join(wd, METRICS_FILE)} has no loss record to plot (empty, or every line '
      'damaged): give the workdir of a run that logged a step.'
    )
  if _X.value == 'tokens' and not (train and 'tokens_per_s' in train[0] and 'step_time_s' in train[0]):
    raise ValueError(f'--x=tokens: {wd!r} logged no tokens_per_s / step_time_s; use --x=step.')
  return train, val


def main(argv):
  del argv
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_bits) = plt.subplots(1, 2, figsize=(12, 4.5))
  out = _out_path(_OUT.value, fig.canvas.get_supported_filetypes())
  any_bits = False
  for i, wd in enumerate(_WORKDIRS.value):
    train, val = _load(wd)
    name = os.path.basename(os.path.normpath(wd))
    color = f'C{i}'
    scale = 1
    if _X.value == 'tokens':
      scale = train[0]['tokens_per_s'] * train[0]['step_time_s']  # tokens per step
    ax_loss.plot(
      [r['step'] * scale for r in train],
      [r['loss'] for r in train],
      color=color,
      lw=0.8,
      alpha=0.7,
      label=f'{name} train',
    )
    ax_loss.plot(
      [r['step'] * scale for r in val], [r['loss'] for r in val], 'o-', color=color, ms=4, label=f'{name} val'
    )
    for key in ('bits_per_char', 'bits_per_byte'):
      pts = [(r['step'] * scale, r[key]) for r in val if key in r]
      if pts and (key == 'bits_per_char' or not any('bits_per_char' in r for r in val)):
        ax_bits.plot(*zip(*pts), 'o-', color=color, ms=4, label=f'{name} val {key.replace("_", " ")}')
        any_bits = True
  xlabel = 'training tokens' if _X.value == 'tokens' else 'step'
  ax_loss.set(xlabel=xlabel, ylabel='loss (nats/token)', title='loss')
  ax_loss.legend(fontsize=8)
  ax_loss.grid(alpha=0.3)
  ax_bits.set(xlabel=xlabel, ylabel='bits', title='val bits per character / byte')
  ax_bits.grid(alpha=0.3)
  if any_bits:
    ax_bits.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  print(f'wrote {out}')


if __name__ == '__main__':
  cli.run_main(main)
