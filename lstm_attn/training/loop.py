"""The training loop: `train_and_evaluate(config, workdir)`.

Where a run starts (checked in this order, as big_vision documents it):
  1. the latest restorable checkpoint in `<workdir>/checkpoints` (automatic resume; a broken latest one
     is moved aside with a message and the one before is used);
  2. else, for fine-tuning, the pretrained params of `config.init_from` restored into the matching
     subtree (`backbone`), the rest fresh (lstm_attn.training.transfer);
  3. else from scratch.
A stopped run resumes exactly: the checkpoint holds params, optimizer state, step, the dropout RNG state,
the batcher position and the metrics of the steps since the last log line, so on CPU the losses at every
later step and the final params are identical to an uninterrupted run's (tests/test_train.py,
tests/test_faults.py).

One trainer per workdir: a second one fails at once with WorkdirLocked, naming the holder, before it
touches anything (checkpointing.WorkdirLock; the kernel drops the lock of a killed trainer). SIGTERM
(a cluster's preemption) and SIGINT (Ctrl-C) stop the run after the current step: its checkpoint is
written, one line says so on stderr, and TrainingInterrupted (a SystemExit) ends the process with
status 128 + the signal number; a second signal stops at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading

import jax
import ml_collections
import numpy as np

from lstm_attn.models import build_model, model_config
from lstm_attn.training import checkpointing, inputs, sharding, transfer
from lstm_attn.training import metrics as lu
from lstm_attn.training.config import check_config, complete_config
from lstm_attn.training.sampling import sample_text
from lstm_attn.training.steps import build_steps, evaluate


class TrainingDiverged(FloatingPointError):
  """The training loss became NaN or inf; the run stopped without saving the bad state."""


class TrainingInterrupted(SystemExit):
  """SIGTERM or SIGINT stopped the run; the checkpoint of the step it stopped at is written.

  A SystemExit (as KeyboardInterrupt, not an Exception that generic handlers would swallow): the
  process was asked to end, and ends with status 128 + the signal number, what shells and schedulers
  read as "ended by that signal", after the one-line message (already printed on stderr, no traceback).
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.message = message
    self.signum = signum
    self.code = 128 + signum

  def __str__(self):
    return self.message


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint), evaluates, samples.

  Returns a summary dict (final step, final val/test metrics, sample text). Writes
  `<workdir>/metrics.jsonl`, TensorBoard events in `<workdir>/tensorboard`, checkpoints in
  `<workdir>/checkpoints`, the tokenizer, and `<workdir>/summary.json`.
  """
  config, workdir = _checked(config, workdir)
  place = _Placement(config)
  with _one_trainer(workdir, place), _StopSignals() as stop:
    data = inputs.make_inputs(config, workdir)
    steps = build_steps(
      config, lambda rngs: build_model(config, vocab_size=data.vocab_size, rngs=rngs), mesh=place.mesh
    )
    ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'),
      keep_latest=config.keep_latest,
      keep_best=config.keep_best,
      async_save=config.async_checkpoints,
    )
    writer = lu.MetricWriter(workdir, tensorboard=config.tensorboard) if place.main else lu.NullWriter()
    try:
      step, state, pending = _start(config, workdir, steps, ckpt, data, writer)
      step, state, last_eval = _train(config, place, data, steps, ckpt, writer, step, state, pending, stop)
      summary = _write_summary(config, place, data, steps, writer, workdir, step, state, last_eval)
    finally:
      writer.close()
      ckpt.close()
  if config.compare_from_scratch:
    summary['from_scratch'] = _compare_from_scratch(config, workdir, summary)
  return summary


def _checked(config, workdir: str):
  """The config with every field (checked) and the workdir's absolute path; nothing is written yet."""
  if not workdir:
    raise ValueError("workdir='' : give --workdir=<folder for checkpoints, metrics and samples>.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'workdir={workdir!r} exists and is not a folder.')
  check_config(config)
  config = complete_config(config.to_dict())
  if not config.num_classes:  # (the classification task brings its own data)
    inputs.data_path(config)
  workdir = os.path.abspath(workdir)
  # Refuse a workdir that holds another experiment's checkpoints before writing anything into it.
  saved = checkpointing.peek_meta(os.path.join(workdir, 'checkpoints'))
  now = _to_json(_fingerprint(config))
  if saved is not None:
    # Fields added since those checkpoints were saved take the defaults that reproduce their behaviour.
    then = _to_json(_fingerprint(complete_config(saved['config']))) if saved.get('config') else None
    then = then or saved.get('fingerprint') or {}
  if saved is not None and then != now:
    raise ValueError(
      f'workdir={workdir!r} holds checkpoints of a different experiment '
      f'({"; ".join(_diff(then, now))}). '
      'Use a fresh --workdir, or the same config to resume; nothing in the workdir was changed.'
    )
  os.makedirs(workdir, exist_ok=True)
  return config, workdir


def _start(config, workdir, steps, ckpt, data, writer):
  """(step, state, metrics of the steps since the last log line) where the run starts (see the module
  docstring for the order)."""
  try:
    restored = ckpt.restore_latest_good(steps.abstract_state)
  except checkpointing.CheckpointError as e:
    # Often not damage but a config change that reshapes the optimizer state (e.g. clipping turned on
    # after a divergence): say which fields changed.
    saved = checkpointing.peek_meta(ckpt.directory) or {}
    changed = _diff(saved.get('config') or {}, _to_json(config.to_dict()))
    if not changed:
      raise
    raise checkpointing.CheckpointError(
      f'{e}\nThe config differs from the one these checkpoints were saved with: {"; ".join(changed)}. '
      'Resume with that config, or start this config in a fresh --workdir.'
    ) from e
  if restored is not None:
    step, state, meta = restored
    data.train.restore(meta['data_state'])
    writer.start_at(step)
    lu.log(f'Resumed from {ckpt.directory}/{step} (step {step}).')
    return step, state, _pending_from_json(meta.get('pending_metrics', []))
  writer.start_at(0)  # a fresh start: no records of an earlier, checkpoint-less attempt
  state = steps.init()
  if config.init_from:
    state = transfer.init_from_pretrained(state, config, steps, workdir)
  return 0, state, []


def _train(config, place, data, steps, ckpt, writer, step, state, pending, stop):
  """Steps from `step` to config.num_train_steps with logs, evals and checkpoints; `pending`: the
  (step, metrics) since the last log line; `stop`: the _StopSignals that end the run early.

  Returns (final step, final state, the metrics of the last eval: {} if the run had no step left).
  """
  num_steps = config.num_train_steps
  lu.log(
    f'{config.model.name} ({steps.objective}), {_num_params(state):,} params, vocab {data.vocab_size}, batch '
    f'{config.batch_size} x {data.seq_len}, {num_steps} steps, workdir {os.path.dirname(ckpt.directory)}'
  )
  progress = lu.Progress(num_steps, step, data.tokens_per_step)
  workdir = os.path.dirname(ckpt.directory)
  saved = step  # the step of the newest checkpoint (0: none; a fresh start needs none)
  last_eval = {}
  while step < num_steps:
    signum = stop.requested(at_sync_point=step % config.log_every == 0)
    if signum is not None:
      if step != saved:
        pending = _flush_train_metrics(pending, step, progress, writer, ckpt, do_log=False)
        writer.flush()
        ckpt.save(step, state, _meta(config, data, step, pending, workdir))
      ckpt.wait()
      message = _stopped_message(signum, step, ckpt)
      if place.main:
        print(message, file=sys.stderr, flush=True)
      raise TrainingInterrupted(message, signum)
    state, metrics = steps.train_step(state, place.train_batch(data.train.next()))
    step += 1
    pending.append((step, metrics))
    is_last = step == num_steps
    do_log = step % config.log_every == 0 or is_last
    do_eval = step % config.eval_every == 0 or is_last
    # Also at every eval when the best-N policy ranks checkpoints by eval loss.
    do_ckpt = step % config.checkpoint_every == 0 or is_last or (do_eval and config.keep_best > 0)
    if do_log or do_ckpt:
      pending = _flush_train_metrics(pending, step, progress, writer, ckpt, do_log)
    if do_eval:
      last_eval = _run_eval(config, data, place, steps, state, step, writer, is_last)
    if do_ckpt:
      writer.flush()  # TensorBoard holds every record up to the checkpoint a kill would resume from
      meta = _meta(config, data, step, pending, workdir)
      ckpt.save(step, state, meta, eval_loss=last_eval['val']['loss'] if do_eval else None)
      saved = step
  ckpt.wait()
  return step, state, last_eval


def _meta(config, data, step, pending, workdir) -> dict:
  """What a checkpoint holds besides the arrays (JSON; see checkpointing)."""
  return {
    'step': step,
    'data_state': _to_json(data.train.state()),
    'fingerprint': _to_json(_fingerprint(config)),
    'config': _to_json(config.to_dict()),
    'tokenizer': checkpointing.relative_to_workdir(data.tokenizer_path, workdir),
    # The steps since the last log line (fetched at every checkpoint): a resumed run logs their mean.
    'pending_metrics': _pending_to_json(pending),
  }


def _pending_to_json(pending) -> list:
  return [[s, {k: [float(v), str(np.asarray(v).dtype)] for k, v in m.items()}] for s, m in pending]


def _pending_from_json(saved) -> list:
  return [(s, {k: np.asarray(v, dtype=dtype) for k, (v, dtype) in m.items()}) for s, m in saved]


def _stopped_message(signum: int, step: int, ckpt) -> str:
  name = signal.Signals(signum).name
  if step == 0:
    return f'stopped by {name} before the first step; nothing to save.'
  return (
    f'stopped by {name} at step {step}: its checkpoint is {ckpt.directory}/{step}; the same command '
    'resumes from it.'
  )


def _write_summary(config, place, data, steps, writer, workdir, step, state, last_eval) -> dict:
  """summary.json of the finished run (evaluating a restored final state that has no eval on record)."""
  if not last_eval:
    finished = _finished_summary(workdir, step)
    if finished is not None:  # resumed a finished run: its final evaluation is on record already
      lu.log(f'{workdir} had already finished step {step}; its summary: {workdir}/summary.json.')
      return finished
    last_eval = _run_eval(config, data, place, steps, state, step, writer, True)
  summary = {
    'step': step,
    'params': _num_params(state),
    **{f'{k}_{m}': v for k, d in last_eval.items() if isinstance(d, dict) for m, v in d.items()},
  }
  if 'sample' in last_eval:
    summary['sample'] = last_eval['sample']
  if place.main:
    with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=1)
  return summary


def _flush_train_metrics(pending, step, progress, writer, ckpt, do_log) -> list:
  """Fetches the pending per-step metrics; stops the run on NaN/inf; writes the log line and JSONL.

  Returns what stays pending: [] after a log line, else the fetched (step, metrics) (for the checkpoint).
  """
  fetched = jax.device_get([m for _, m in pending])
  for (s, _), m in zip(pending, fetched):
    if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
      ckpt.wait()
      last = ckpt.latest_step()
      where = (
        f'The last good checkpoint (step {last}) in {ckpt.directory} is intact'
        if last
        else (f'No checkpoint was saved before it ({ckpt.directory} is empty)')
      )
      raise TrainingDiverged(
        f'training loss is {float(m["loss"])} (grad norm {float(m["grad_norm"])}) at step {s}: stopping '
        f'without saving. {where}: lower config.optim.learning_rate (or set config.optim.grad_clip_norm) '
        'and resume; turning clipping on from 0 changes the optimizer state, so that needs a fresh --workdir.'
      )
  if not do_log:
    return [(s, m) for (s, _), m in zip(pending, fetched)]
  keys = sorted(fetched[-1], key=lambda k: (k != 'loss', k))  # loss first in the log line
  mean = {k: float(np.mean([m[k] for m in fetched])) for k in keys}
  line, rates = progress.line(step, mean)
  lu.log(line)
  writer.write(step, 'train', {**mean, **rates})
  return []


_LOGGED = ('loss', 'perplexity', 'bits_per_char', 'bits_per_byte', 'accuracy', 'nsp_accuracy')


def _run_eval(config, data, place, steps, state, step, writer, is_last) -> dict:
  out = {}
  for split in data.eval_splits:
    if split == 'test' and not is_last:
      continue
    m = evaluate(
      steps,
      state,
      (place.eval_batch(b) for b in data.eval_batches(split)),
      chars_per_token=data.chars_per_token.get(split),
      bytes_per_token=data.bytes_per_token.get(split),
    )
    out[split] = m
    writer.write(step, split, m)
    keys = ['loss', 'accuracy'] if steps.objective == 'cls' else [k for k in _LOGGED if k in m]
    lu.log(f'  eval {split} @ {step}: ' + ', '.join(f'{k} {m[k]:.4f}' for k in keys))
  # Every process samples (the model's arrays span all of them); lu.log prints on process 0 only.
  if steps.objective == 'lm' and config.sample_tokens and (is_last or config.sample_every_eval):
    text = _sample(config, data, steps, state, step)
    out['sample'] = text
    writer.write_text(step, 'sample', text)
    lu.log(f'  sample @ {step}:\n{text}\n  ---')
  writer.flush()
  return out


def _sample(config, data, steps, state, step) -> str:
  spec, model_cfg = model_config(config.model)
  s = config.sampling
  return sample_text(
    steps.model(state),
    data.tokenizer,
    rng=jax.random.fold_in(jax.random.key(config.seed + 7), step),
    num_tokens=config.sample_tokens,
    prompt=s.prompt,
    context_window=spec.context_window(model_cfg),
    temperature=s.temperature,
    top_k=s.top_k,
    top_p=s.top_p,
  )


def _compare_from_scratch(config, workdir, summary) -> dict:
  """Trains the same model from scratch for the same budget in `<workdir>/from_scratch`; prints both."""
  scratch_cfg = ml_collections.ConfigDict(config.to_dict())
  scratch_cfg.init_from = ''
  scratch_cfg.compare_from_scratch = False
  scratch = train_and_evaluate(scratch_cfg, os.path.join(workdir, 'from_scratch'))
  keys = ('val_accuracy', 'test_accuracy', 'val_loss', 'test_loss')
  rows = [('pretrained init', summary), ('from scratch', scratch)]
  lu.log(f'\nTransfer vs scratch ({config.num_train_steps} steps each):')
  lu.log(f'  {"init":<16} {"val acc":>8} {"test acc":>9} {"val loss":>9}')
  for name, s in rows:
    acc, test_acc, loss = (s.get(k, float('nan')) for k in ('val_accuracy', 'test_accuracy', 'val_loss'))
    lu.log(f'  {name:<16} {acc:>8.4f} {test_acc:>9.4f} {loss:>9.4f}')
  if sharding.is_main_process():  # one writer, as for summary.json
    with open(os.path.join(workdir, 'transfer_comparison.json'), 'w', encoding='utf-8') as f:
      json.dump({name: {k: s.get(k) for k in keys} for name, s in rows}, f, indent=1)
  return {k: scratch.get(k) for k in keys}


# ---------------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _one_trainer(workdir: str, place):
  """Holds the workdir lock for the run (taken by process 0; every process raises if it is held)."""
  lock = checkpointing.WorkdirLock(workdir)
  error = None
  if place.main:
    try:
      lock.acquire()
    except checkpointing.WorkdirLocked as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    if int(multihost_utils.broadcast_one_to_all(np.int32(error is not None))) and error is None:
      error = checkpointing.WorkdirLocked(
        f'workdir {workdir!r} is in use by another trainer (see process 0).'
      )
  if error is not None:
    raise error
  try:
    yield
  finally:
    lock.release()


class _StopSignals:
  """SIGTERM and SIGINT ask the loop to stop after the current step (`requested`); a second one stops at
  once, through the handler that was there before (Python's KeyboardInterrupt, or the default: exit).
  Handlers can only be set in the main thread; elsewhere the signals keep their usual effect."""

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __enter__(self):
    self.signum = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self._SIGNALS}
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def _handle(self, signum, frame):
    if self.signum is None:
      self.signum = signum
      return
    self.__exit__()
    signal.raise_signal(signum)

  def requested(self, *, at_sync_point: bool) -> int | None:
    """The signal that asks to stop, or None. With several processes, all of them must stop at the same
    step: they agree (an allgather) at sync points, the steps every process reaches alike."""
    if jax.process_count() == 1:
      return self.signum
    if not at_sync_point:
      return None
    from jax.experimental import multihost_utils

    got = int(np.max(multihost_utils.process_allgather(np.int32(self.signum or 0))))
    return got or None


class _Placement:
  """Where a run's arrays live (lstm_attn.training.sharding): the device mesh from `config.mesh`, this
  process's rows of every batch, and who writes (process 0). One device is the 1x1 mesh: the same path."""

  def __init__(self, config):
    sharding.maybe_initialize_distributed(config)  # before anything touches a device
    self.mesh = sharding.mesh_from_config(config)
    sharding.check_global_batch(config.batch_size, self.mesh)
    self.batch_size = config.batch_size
    self.main = sharding.is_main_process()

  def train_batch(self, batch: dict):
    """The global batch (every process passes the same full batch; each contributes its own rows)."""
    rows = sharding.process_batch_slice(self.batch_size)
    return sharding.make_global_batch({k: v[rows] for k, v in batch.items()}, self.mesh)

  def eval_batch(self, batch: dict):
    n = len(next(iter(batch.values())))
    return sharding.global_array_from_full(batch, sharding.eval_batch_sharding(n, self.mesh))


def _num_params(state) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state['params']))


def _fingerprint(config) -> dict:
  """The config fields that must match for a checkpoint to be resumed into this run."""
  d = config.to_dict()
  return {'model': d['model'], 'num_classes': d['num_classes'], 'data': d['data'], 'seed': d['seed']}


def _to_json(x):
  return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o)))


def _diff(saved: dict, now: dict, prefix='config.') -> list[str]:
  out = []
  for k in sorted(set(saved) | set(now)):
    a, b = saved.get(k), now.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f'{prefix}{k}.')
    elif a != b:
      out.append(f'{prefix}{k} was {a!r} there, is {b!r} now')
  return out


def _finished_summary(workdir: str, step: int) -> dict | None:
  """The summary.json of a run that already ended at `step`, or None."""
  try:
    with open(os.path.join(workdir, 'summary.json'), encoding='utf-8') as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if isinstance(summary, dict) and summary.get('step') == step else None
