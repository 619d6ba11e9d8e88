r"""Loss curves from one or several workdirs (their metrics.jsonl) to one PNG.

    python experiments/plot.py --workdirs=/tmp/lstm_attn/gpt_char,/tmp/lstm_attn/lstm_char \
      --out=/tmp/lstm_attn/curves.png

Train loss (thin) and val loss (markers) against steps (`--x=tokens`: against training tokens seen, for
runs that logged `tokens_per_s`/`step_time_s`), one colour per run, labelled by the workdir's name. A
second panel shows val bits per character (or per byte) when recorded.
"""

import os

from absl import app, flags

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Comma-separated workdirs of training runs.')
_OUT = flags.DEFINE_string('out', None, 'Output PNG path (required: nothing is written to a default path).')
_X = flags.DEFINE_enum('x', 'step', ['step', 'tokens'], 'Horizontal axis.')
flags.mark_flag_as_required('workdirs')
flags.mark_flag_as_required('out')


def main(argv):
  del argv
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  from lstm_attn.training.metrics import read_metrics

  fig, (ax_loss, ax_bits) = plt.subplots(1, 2, figsize=(12, 4.5))
  any_bits = False
  for i, wd in enumerate(_WORKDIRS.value):
    if not os.path.isdir(wd):
      raise FileNotFoundError(f'--workdirs: {wd!r} is not a folder')
    records = read_metrics(wd)
    name = os.path.basename(os.path.normpath(wd))
    color = f'C{i}'
    train = [r for r in records if r.get('split') == 'train' and 'loss' in r]
    val = [r for r in records if r.get('split') == 'val' and 'loss' in r]
    scale = 1
    if _X.value == 'tokens' and train and 'tokens_per_s' in train[0]:
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
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  fig.savefig(_OUT.value, dpi=120)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
