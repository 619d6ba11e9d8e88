"""What a researcher watches: one-line progress logs, metrics as JSONL, TensorBoard event files.

`MetricWriter` writes every record to `<workdir>/metrics.jsonl` (one JSON object per line, with `step`,
`split` ('train', 'val', 'test', ...) and the scalars) and to TensorBoard (`<workdir>/tensorboard`,
tag `<split>/<name>`) through one `tensorboardX.SummaryWriter` that the trainer flushes at every eval
and every checkpoint, and closes at the end. On resume, `start_at(step)` drops JSONL records logged after
the restored checkpoint, so the file reads as one uninterrupted run, and has TensorBoard drop its events
of those steps too (a killed run's events up to its last checkpoint were flushed, the later ones are
superseded). `Progress` formats the one-line train log with tokens/s and
the time left.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

METRICS_FILE = 'metrics.jsonl'
SUPERSEDED_FILE = 'metrics.superseded.jsonl'  # records a resume or a fresh start replaced


def read_metrics(workdir: str) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl` (FileNotFoundError naming the path if absent).

  A damaged line (not UTF-8, not a JSON object, no integer `step`, cut short by a kill) is skipped, with
  one warning on stderr naming the file and the lines.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'no {METRICS_FILE} in workdir {workdir!r}: is it the workdir of a training run?')
  records, damaged = read_records(path)
  if damaged:
    warn(f'{path}: skipped {describe_damage(damaged)}.')
  return records


def read_records(path: str) -> tuple[list[dict], list[tuple[int, bytes, str]]]:
  """(records, damaged lines) of a JSONL metrics file; each damaged line as (line number, raw bytes,
  what is wrong), so a rewrite of the file can keep it elsewhere."""
  records, damaged = [], []
  with open(path, 'rb') as f:
    for number, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        record = json.loads(raw.decode('utf-8'))
      except UnicodeDecodeError:
        damaged.append((number, raw, 'not UTF-8'))
        continue
      except ValueError:
        damaged.append((number, raw, 'not JSON'))
        continue
      step = record.get('step') if isinstance(record, dict) else None
      if not isinstance(record, dict):
        damaged.append((number, raw, 'not a JSON object'))
      elif not isinstance(step, int) or isinstance(step, bool):
        damaged.append((number, raw, 'no integer "step"'))
      else:
        records.append(record)
  return records, damaged


def describe_damage(damaged) -> str:
  """'3 damaged lines (line 2: not UTF-8; line 4: ...)', the first few named."""
  shown = '; '.join(f'line {n}: {why}' for n, _, why in damaged[:5])
  more = f'; and {len(damaged) - 5} more' if len(damaged) > 5 else ''
  return f'{len(damaged)} damaged line{"s" if len(damaged) > 1 else ""} ({shown}{more})'


def warn(message: str) -> None:
  print(f'WARNING: {message}', file=sys.stderr, flush=True)


class MetricWriter:
  """JSONL + TensorBoard writer; only the main process should create one."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb_dir = os.path.join(workdir, 'tensorboard') if tensorboard else None
    self._tb = None

  def start_at(self, step: int) -> None:
    """Where the run (re)starts: `truncate_after(step)`, and TensorBoard told the same. Its new event
    file opens with a SessionLog.START at step + 1 (tensorboardX's `purge_step`), so TensorBoard drops
    what older event files hold for later steps, as metrics.jsonl dropped those records."""
    self.truncate_after(step)
    if self._tb_dir is not None and self._tb is None:
      earlier = os.path.isdir(self._tb_dir) and bool(os.listdir(self._tb_dir))
      self._open_tensorboard(purge_step=step + 1 if earlier else None)

  def _open_tensorboard(self, purge_step=None):
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(logdir=self._tb_dir, flush_secs=30, purge_step=purge_step)
    return self._tb

  def truncate_after(self, step: int) -> None:
    """Keeps only records with step <= `step` (called after restoring the checkpoint at `step`, or with 0
    on a fresh start). The records it drops are appended to `metrics.superseded.jsonl`, never lost."""
    if not os.path.exists(self.path):
      return
    records, damaged = read_records(self.path)
    kept = [r for r in records if r['step'] <= step]
    superseded = os.path.join(os.path.dirname(self.path), SUPERSEDED_FILE)
    if len(kept) < len(records) or damaged:
      with open(superseded, 'ab') as f:
        for r in records:
          if r['step'] > step:
            f.write((json.dumps(r) + '\n').encode('utf-8'))
        for _, raw, _ in damaged:  # kept byte for byte: nothing is lost
          f.write(raw if raw.endswith(b'\n') else raw + b'\n')
    if damaged:
      warn(f'{self.path}: {describe_damage(damaged)} moved to {superseded}.')
    tmp = self.path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      for r in kept:
        f.write(json.dumps(r) + '\n')
    os.replace(tmp, self.path)

  def write(self, step: int, split: str, scalars: dict) -> None:
    record = {'step': int(step), 'split': split, 'time': round(time.time(), 3)}
    for k, v in scalars.items():
      record[k] = float(v) if isinstance(v, (int, float)) or hasattr(v, 'dtype') else v
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb_dir is not None:
      tb = self._tb or self._open_tensorboard()
      for k, v in record.items():
        if k not in ('step', 'split', 'time') and isinstance(v, float) and math.isfinite(v):
          tb.add_scalar(f'{split}/{k}', v, int(step))

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self._tb_dir is not None:
      (self._tb or self._open_tensorboard()).add_text(tag, text, int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
      self._tb_dir = None  # (nothing is written after close)


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


class Progress:
  """Step timing for the one-line log: tokens/s over the last interval and time left at that rate."""

  def __init__(self, total_steps: int, start_step: int, tokens_per_step: int):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def line(self, step: int, scalars: dict) -> tuple[str, dict]:
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    dt = max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    step_time = dt / steps
    rates = {'step_time_s': step_time, 'tokens_per_s': self.tokens_per_step / step_time}
    eta = (self.total_steps - step) * step_time
    parts = [f'step {step}/{self.total_steps}']
    parts += [f'{k} {v:.4f}' for k, v in scalars.items()]
    parts += [
      f'{rates["tokens_per_s"]:,.0f} tok/s',
      f'{1e3 * step_time:.1f} ms/step',
      f'ETA {format_duration(eta)}',
    ]
    return ' | '.join(parts), rates


def log(msg: str) -> None:
  """Prints on the main process only (process 0 of a multi-process run)."""
  import jax

  if jax.process_index() == 0:
    print(msg, file=sys.stdout, flush=True)


class NullWriter:
  """MetricWriter's interface, writing nothing (processes other than 0)."""

  path = os.devnull

  def truncate_after(self, step):
    pass

  def start_at(self, step):
    pass

  def write(self, step, split, scalars):
    pass

  def write_text(self, step, tag, text):
    pass

  def flush(self):
    pass

  def close(self):
    pass
