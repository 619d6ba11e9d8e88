"""The one module that owns Orbax and the run directory: save, resume, keep latest + best, verify, fall
back past broken checkpoints, one trainer per workdir.

Nothing else reads a checkpoint's files: `peek_meta(directory)` gives the newest meta without opening a
manager (the trainer compares configs before it writes anything), `load_params` the params of any step.

A checkpoint is one step directory under `<workdir>/checkpoints/` with two items:
  state: the train-state pytree (step, params, other model state such as RNG keys and counts, optimizer
    state), written with `StandardSave` (tensorstore/OCDBT; sharded arrays are written per shard).
  meta: JSON (`JsonSave`): the config, the data position (batcher state), the tokenizer (a path relative
    to the workdir, so a moved workdir finds its own: `relative_to_workdir`, `resolve_in_workdir`) and
    whatever else the trainer needs to resume; never a pickle. Its `checksums` entry holds the crc32 of
    every array's bytes and of the rest of the meta, taken at save (in the same atomic commit) and
    compared at every restore: a mismatch is a corrupt checkpoint, handled like one that fails to read.
    Checkpoints written before checksums existed have none and are restored unverified. (Arrays that
    span several processes are not checksummed: no process holds their bytes.)

Saves are asynchronous (the host copies the arrays and returns; a background thread writes them) and
atomic: Orbax writes into a temporary directory and renames it when complete, so a process killed during
a write leaves the previous checkpoints untouched (the temporary directory is removed at the next start).
Kept: the latest `keep_latest` steps and the `keep_best` steps with the lowest eval loss
(`BestN(reverse=True)`: Orbax sorts descending and keeps the tail, i.e. the lowest values).

Readers (sample.py, evaluation) open the directory `read_only`: they create, clean up, delete and move
nothing, and a step that a live trainer's retention deletes between their pick and their read is
picked again. `WorkdirLock` keeps a second trainer out of a workdir (an flock, released by the kernel
when its holder dies, however it dies).

Typed PRNG keys (nnx's RngKey) are stored as their raw key data (uint32) and re-wrapped on restore.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

_METRIC = 'eval_loss'
_CHECKSUMS = 'checksums'  # the meta entry written by `save`, removed from the meta `restore` returns
_READ_ATTEMPTS = 10  # picks of a reader whose chosen step a live trainer deleted meanwhile
_DELETION_S = 2.0  # how long a reader waits for a step directory whose files vanish to be gone as well


def _is_key(x) -> bool:
  return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl(x):
  """The PRNG implementation of a typed key array or of a ShapeDtypeStruct of key dtype."""
  if not isinstance(x, jax.ShapeDtypeStruct):
    return jax.random.key_impl(x)
  found = []
  jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)), x)  # static under tracing
  return found[0]


def keys_to_data(tree):
  """Typed key arrays -> their uint32 key data; other leaves unchanged (works on abstract trees too)."""

  def one(x):
    if not _is_key(x):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):  # keep the target sharding: restores onto another mesh
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    return jax.random.key_data(x)

  return jax.tree.map(one, tree)


def data_to_keys(tree, like):
  """Inverse of `keys_to_data`: leaves that are typed keys in `like` are wrapped back from key data."""
  flat_like, treedef = jax.tree.flatten(like)
  flat = treedef.flatten_up_to(tree)
  out = [
    jax.random.wrap_key_data(x, impl=_key_impl(ref)) if _is_key(ref) else x for x, ref in zip(flat, flat_like)
  ]
  return jax.tree.unflatten(treedef, out)


def _abstract(tree):
  """ShapeDtypeStructs (with the leaves' shardings when they are concrete arrays) for a restore target."""

  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None))

  return jax.tree.map(one, tree)


class CheckpointError(RuntimeError):
  """No checkpoint in the directory could be restored (or the one asked for is not there)."""


class CorruptCheckpoint(ValueError):
  """A checkpoint's bytes differ from those recorded at save (its checksums)."""


# ---------------------------------------------------------------------------------------------------
# Checksums: crc32 of every array's bytes and of the meta, recorded in the meta at save.
# ---------------------------------------------------------------------------------------------------
def _leaf_name(path) -> str:
  """'params/backbone/kernel/value': the same for a train state and for its raw (nested dict) restore."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _crc32(a: np.ndarray) -> int:
  return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _local_leaves(tree) -> list[tuple[str, Any]]:
  """(name, leaf) of the leaves whose bytes this process holds (all of them on one process)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(_leaf_name(p), x) for p, x in leaves if getattr(x, 'is_fully_addressable', True)]


def _meta_crc32(meta: dict) -> int:
  return zlib.crc32(json.dumps(meta, sort_keys=True, separators=(',', ':')).encode())


def _checksums(data_tree, meta: dict) -> dict:
  """{'crc32': {leaf name: [crc32, dtype, shape]}, 'meta_crc32': crc32 of the meta as JSON reads it back}.
  The arrays are copied to the host once for this (Orbax's async save makes its own copy)."""
  local = _local_leaves(data_tree)
  arrays = {}
  for (name, _), a in zip(local, jax.device_get([x for _, x in local])):
    a = np.asarray(a)
    arrays[name] = [_crc32(a), str(a.dtype), list(a.shape)]
  return {'crc32': arrays, 'meta_crc32': _meta_crc32(json.loads(json.dumps(meta)))}


def _verify(data_tree, meta: dict, recorded: dict | None, step: int) -> None:
  """Raises CorruptCheckpoint if an array or the meta differs from what `save` recorded at `step`."""
  if not recorded:
    return  # written before checksums existed
  arrays = recorded.get('crc32', {})
  local = [(n, x) for n, x in _local_leaves(data_tree) if n in arrays]
  host = jax.device_get([x for _, x in local])
  bad = []
  for (name, _), a in zip(local, host):
    a = np.asarray(a)
    crc, dtype, shape = arrays[name]
    if (str(a.dtype), list(a.shape)) == (dtype, shape) and _crc32(a) != crc:  # (a cast restore: unverifiable)
      bad.append(name)
  if recorded.get('meta_crc32') not in (None, _meta_crc32(meta)):
    bad.append('meta')
  if bad:
    raise CorruptCheckpoint(
      f'checksum mismatch at step {step} in {len(bad)} of {len(arrays) + 1} items ({", ".join(bad[:3])}'
      f'{", ..." if len(bad) > 3 else ""}): the files changed after they were written'
    )


class Checkpointer:
  """Orbax `CheckpointManager` for train states: async saves, latest + best kept, resilient restore.

  Args:
    directory: where step directories go (created if missing).
    keep_latest: how many of the most recent checkpoints to keep.
    keep_best: how many of the lowest-eval-loss checkpoints to keep besides (0: none).
    async_save: write in a background thread (call `wait()` before reading or exiting).
    read_only: for readers (sample.py, evaluation beside a live trainer): nothing in `directory` is
      created, cleaned up (a trainer's in-progress `*.orbax-checkpoint-tmp` write stays), deleted or moved.
  """

  def __init__(
    self,
    directory: str,
    *,
    keep_latest: int = 2,
    keep_best: int = 1,
    async_save: bool = True,
    read_only: bool = False,
  ):
    if keep_latest < 1:
      raise ValueError(f'keep_latest={keep_latest} must be >= 1 (the latest checkpoint is the resume point).')
    if keep_best < 0:
      raise ValueError(f'keep_best={keep_best} must be >= 0.')
    self.directory = os.path.abspath(directory)
    policies = [ocp.checkpoint_managers.LatestN(n=keep_latest)]
    if keep_best:
      policies.append(
        ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[_METRIC],
          reverse=True,  # sorted descending, the tail kept: the lowest eval losses
          n=keep_best,
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      # best_fn makes Orbax write each step's metrics to disk (it does not without one), so the
      # best-N policy still knows the eval losses after a restart.
      best_fn=lambda m: m[_METRIC],
      best_mode='min',
      enable_async_checkpointing=async_save and not read_only,
      cleanup_tmp_directories=not read_only,
      create=not read_only,
      read_only=read_only,
    )
    self.read_only = read_only
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

  # -- queries ---------------------------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the lowest eval loss (None if no kept checkpoint has one)."""
    scored = []
    for step in self.all_steps():
      m = self._manager.metrics(step)
      if m and _METRIC in m:
        scored.append((float(m[_METRIC]), step))
    return min(scored)[1] if scored else None

  # -- save --------------------------------------------------------------------------------------------
  def save(self, step: int, state, meta: dict[str, Any], *, eval_loss: float | None = None) -> bool:
    """Starts an async save of `state` (a pytree of arrays) and `meta` (JSON-able) at `step`.

    A non-finite `state` must never reach here: the trainer checks the loss first. `eval_loss` ranks
    the checkpoint for the best-N policy; without it only the latest-N policy keeps it.
    """
    metrics = None if eval_loss is None else {_METRIC: float(eval_loss)}
    if metrics is not None and not np.isfinite(metrics[_METRIC]):
      metrics = None
    data = keys_to_data(state)
    meta = {**meta, _CHECKSUMS: _checksums(data, meta)}
    return self._manager.save(
      int(step),
      args=ocp.args.Composite(state=ocp.args.StandardSave(data), meta=ocp.args.JsonSave(meta)),
      metrics=metrics,
      force=True,
    )

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # -- restore -----------------------------------------------------------------------------------------
  def _gone(self, step: int, *, settle: bool = False) -> CheckpointError | None:
    """A CheckpointError if `step` is not (or no longer) in the directory: a live trainer's retention
    deletes old steps while readers pick theirs. `settle`: after a failed read, wait a moment for a
    deletion in progress (the files go first, the folder last) to finish."""
    deadline = time.monotonic() + (_DELETION_S if settle else 0.0)
    while os.path.isdir(os.path.join(self.directory, str(step))):
      if time.monotonic() >= deadline:
        return None
      time.sleep(0.05)
    self._manager.reload()
    return CheckpointError(
      f'step {step} is not a checkpoint in {self.directory} (never saved, or deleted by the retention of the '
      f'trainer writing there); available: {self.all_steps()}'
    )

  def restore_meta(self, step: int) -> dict[str, Any]:
    if (gone := self._gone(step)) is not None:
      raise gone
    meta = dict(self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    recorded = meta.pop(_CHECKSUMS, None)
    _verify({}, meta, recorded, step)
    return meta

  def restore(self, step: int, target):
    """Restores (state, meta) at `step` into the structure, dtypes and shardings of `target`, verified
    against the checksums recorded at save (CorruptCheckpoint if they differ).

    `target` is a pytree of arrays or ShapeDtypeStructs (e.g. from `jax.eval_shape` of the init).
    """
    if (gone := self._gone(step)) is not None:
      raise gone
    abstract = _abstract(keys_to_data(target))
    try:
      out = self._manager.restore(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
      )
    except Exception:
      if (gone := self._gone(step, settle=self.read_only)) is not None:
        raise gone from None
      raise
    meta = dict(out.meta)
    _verify(out.state, meta, meta.pop(_CHECKSUMS, None), step)
    state = data_to_keys(out.state, target)
    _check_finite(state, step)
    return state, meta

  def restore_latest_good(self, target):
    """Restores the newest checkpoint that loads; broken newer ones are moved aside with a message.

    Returns (step, state, meta), or None when the directory holds no checkpoint. When the newest
    checkpoint fails to load (corrupted or truncated files, a checksum mismatch, non-finite values), the
    next older one is tried; once one loads, the broken newer ones are moved to
    `<directory>/../checkpoints_corrupted/` (so a later save of the same step cannot collide with them)
    and the reason is printed. If none loads, nothing is moved and CheckpointError lists every reason.
    Read-only: nothing is moved, and steps deleted while reading (a live trainer's retention) are
    skipped, the directory listed again if they were all there was or if it changed meanwhile.
    """
    for _ in range(_READ_ATTEMPTS):
      steps = self.all_steps()
      if not steps:
        return None
      failed, deleted = [], False
      for step in reversed(steps):
        try:
          state, meta = self.restore(step, target)
        except Exception as e:  # noqa: BLE001  (any failure to read means: try the one before)
          if self._gone(step) is not None:
            deleted = True
            continue
          failed.append((step, _reason(e)))
          logging.info(
            'Checkpoint at step %d in %s could not be restored: %s', step, self.directory, failed[-1][1]
          )
          continue
        self._report(failed, step)
        return step, state, meta
      if self.read_only and not deleted:  # a live trainer may have replaced them meanwhile: list again
        self._manager.reload()
        deleted = self.all_steps() != steps
      if not deleted:
        raise CheckpointError(
          f'No checkpoint in {self.directory} could be restored (nothing was changed): '
          + '; '.join(f'step {s}: {r}' for s, r in failed)
        )
    raise CheckpointError(f'the checkpoints in {self.directory} were deleted faster than they could be read.')

  def restore_best(self, target):
    """(step, state, meta) of the kept step with the lowest eval loss (None if none has one); picked again
    if a live trainer's retention replaced it by a better one while reading."""
    for _ in range(_READ_ATTEMPTS):
      step = self.best_step()
      if step is None:
        return None
      try:
        return (step, *self.restore(step, target))
      except CheckpointError:
        if self._gone(step) is None:
          raise
    raise CheckpointError(f'the best checkpoint in {self.directory} kept being replaced while reading it.')

  def _report(self, failed, good_step) -> None:
    """Prints one line per broken step newer than `good_step`, moving each aside unless read-only."""
    for bad, reason in failed:
      if self.read_only:
        print(
          f'WARNING: the checkpoint at step {bad} in {self.directory} could not be restored '
          f'({reason}); using step {good_step} instead.',
          flush=True,
        )
        continue
      moved = self._move_aside(bad)
      print(
        f'WARNING: the checkpoint at step {bad} in {self.directory} could not be restored ({reason}); '
        f'moved it to {moved} and resumed from the checkpoint at step {good_step} instead.',
        flush=True,
      )

  def _move_aside(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    dst_root = os.path.join(os.path.dirname(self.directory), 'checkpoints_corrupted')
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_index() == 0 and os.path.exists(src):  # every process found it broken; one moves it
      shutil.move(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f'lstm_attn_checkpoint_move_aside_{step}')
    self._manager.reload()
    return dst


def _reason(e: Exception) -> str:
  """The first line of an exception, for a one-line message."""
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0] if text else ""}'[:500]


def _check_finite(state, step) -> None:
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    if _is_key(x) or not jnp.issubdtype(x.dtype, jnp.floating):
      continue
    if not bool(jnp.all(jnp.isfinite(x))):
      raise ValueError(f'non-finite values in {jax.tree_util.keystr(path)} at step {step}')


def peek_meta(directory: str) -> dict[str, Any] | None:
  """The meta (JSON) of the newest step in `directory` whose meta reads, or None: no Orbax manager is
  created, so nothing in the directory is created, cleaned up or locked."""
  if not os.path.isdir(directory):
    return None
  steps = sorted((int(d) for d in os.listdir(directory) if d.isdigit()), reverse=True)
  for step in steps:
    try:
      with open(os.path.join(directory, str(step), 'meta', 'metadata'), encoding='utf-8') as f:
        meta = json.load(f)
    except (OSError, ValueError):
      continue
    if isinstance(meta, dict):
      meta.pop(_CHECKSUMS, None)
      return meta
  return None


def load_params(path: str) -> tuple[dict, int]:
  """Loads the raw params tree (nested dicts of arrays) of a checkpoint, for transfer learning.

  `path` is a checkpoint step directory (`.../checkpoints/<step>`: that step only), a checkpoints
  directory, or a workdir (the newest step that loads and matches its checksums; a damaged newer one is
  named in a one-line message and left where it is: it is another run's directory). Returns (params as
  nested dicts, step); CheckpointError if nothing loads.
  """
  path = os.path.abspath(os.path.expanduser(path))
  for candidate in (path, os.path.join(path, 'checkpoints')):
    if os.path.isdir(os.path.join(candidate, 'state')) and os.path.basename(candidate).isdigit():
      steps, manager_dir = [int(os.path.basename(candidate))], os.path.dirname(candidate)
      break
    if os.path.isdir(candidate):
      steps = sorted((int(d) for d in os.listdir(candidate) if d.isdigit()), reverse=True)
      if steps:
        manager_dir = candidate
        break
  else:
    raise FileNotFoundError(
      f'pretrained checkpoint path {path!r} holds no checkpoint: give a workdir, its checkpoints/ folder '
      'or a checkpoints/<step> folder of a finished pretraining run.'
    )
  failed = []
  for step in steps:
    step_dir = os.path.join(manager_dir, str(step))
    try:
      with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(os.path.join(step_dir, 'state'))
      meta = _read_json(os.path.join(step_dir, 'meta', 'metadata'))
      _verify(state, meta, meta.pop(_CHECKSUMS, None), step)
    except Exception as e:  # noqa: BLE001  (any failure to read means: try the one before)
      failed.append((step, _reason(e)))
      continue
    for bad, reason in failed:
      print(
        f'WARNING: the checkpoint at step {bad} in {manager_dir} could not be restored ({reason}); '
        f'using step {step} instead.',
        flush=True,
      )
    return state['params'], step
  raise CheckpointError(
    f'no checkpoint in {manager_dir} could be restored: ' + '; '.join(f'step {s}: {r}' for s, r in failed)
  )


def _read_json(path: str) -> dict:
  """A JSON object from `path` ({} if the file is missing, as in a checkpoint saved without meta)."""
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    out = json.load(f)
  if not isinstance(out, dict):
    raise ValueError(f'{path} holds no JSON object')
  return out


# ---------------------------------------------------------------------------------------------------
# The run directory: paths stored relative to it, one trainer at a time.
# ---------------------------------------------------------------------------------------------------
def relative_to_workdir(path: str, workdir: str) -> str:
  """`path` as stored in a checkpoint: relative to `workdir` when inside it (else absolute)."""
  rel = os.path.relpath(os.path.abspath(path), os.path.abspath(workdir))
  return os.path.abspath(path) if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def resolve_in_workdir(stored: str, workdir: str) -> str:
  """The file a checkpoint's stored path names for the run in `workdir` (wherever that has been moved).

  Relative paths are joined to `workdir`. Absolute ones (checkpoints written before paths were stored
  relative) prefer the workdir's own file of that name: the old path may hold another run's file now.
  """
  if not os.path.isabs(stored):
    return os.path.join(workdir, stored)
  own = os.path.join(workdir, os.path.basename(stored))
  return own if os.path.exists(own) else stored


class WorkdirLocked(OSError):
  """Another live process trains in this workdir (an OSError, as the EWOULDBLOCK of the flock it wraps)."""


class WorkdirLock:
  """An exclusive `flock` on `<workdir>/.lock`, holding who took it (pid, host, start time).

  A second trainer on the workdir gets WorkdirLocked naming the holder. The kernel releases an flock
  when its process ends, however it ends (SIGKILL included), so the file a killed trainer leaves behind
  blocks nobody. (On network filesystems without flock support the lock may not be exclusive.)
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, '.lock')
    self._fd = None

  def acquire(self) -> WorkdirLock:
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      try:
        holder = json.loads(os.read(fd, 4096) or b'{}')  # (empty while the holder is still writing it)
      except ValueError:
        holder = {}
      finally:
        os.close(fd)
      get = (holder if isinstance(holder, dict) else {}).get
      who = f'pid {get("pid", "?")} on host {get("host", "?")}, running since {get("since", "?")}'
      raise WorkdirLocked(
        f'workdir {self.workdir!r} is in use by another trainer ({who}; lock file {self.path}): wait for it '
        'to finish or stop it, or give another --workdir.'
      ) from None
    holder = {
      'pid': os.getpid(),
      'host': socket.gethostname(),
      'since': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
    }
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
