"""The one module that owns Orbax: save, resume, keep latest + best, fall back past broken checkpoints.

Nothing else reads a checkpoint's files: `peek_meta(directory)` gives the newest meta without opening a
manager (the trainer compares configs before it writes anything), `load_params` the params of any step.

A checkpoint is one step directory under `<workdir>/checkpoints/` with two items:
  state: the train-state pytree (step, params, other model state such as RNG keys and counts, optimizer
    state), written with `StandardSave` (tensorstore/OCDBT; sharded arrays are written per shard).
  meta: JSON (`JsonSave`): the config, the data position (batcher state), the tokenizer description and
    whatever else the trainer needs to resume; never a pickle.

Saves are asynchronous (the host copies the arrays and returns; a background thread writes them) and
atomic: Orbax writes into a temporary directory and renames it when complete, so a process killed during
a write leaves the previous checkpoints untouched (the temporary directory is removed at the next start).
Kept: the latest `keep_latest` steps and the `keep_best` steps with the lowest eval loss
(`BestN(reverse=True)`: Orbax sorts descending and keeps the tail, i.e. the lowest values).

Typed PRNG keys (nnx's RngKey) are stored as their raw key data (uint32) and re-wrapped on restore.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

_METRIC = 'eval_loss'


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
  """No checkpoint in the directory could be restored."""


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
    return self._manager.save(
      int(step),
      args=ocp.args.Composite(state=ocp.args.StandardSave(keys_to_data(state)), meta=ocp.args.JsonSave(meta)),
      metrics=metrics,
      force=True,
    )

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # -- restore -----------------------------------------------------------------------------------------
  def restore_meta(self, step: int) -> dict[str, Any]:
    return dict(self._manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def restore(self, step: int, target):
    """Restores (state, meta) at `step` into the structure, dtypes and shardings of `target`.

    `target` is a pytree of arrays or ShapeDtypeStructs (e.g. from `jax.eval_shape` of the init).
    """
    abstract = _abstract(keys_to_data(target))
    out = self._manager.restore(
      int(step),
      args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
    )
    state = data_to_keys(out.state, target)
    _check_finite(state, step)
    return state, dict(out.meta)

  def restore_latest_good(self, target):
    """Restores the newest checkpoint that loads; broken newer ones are moved aside with a message.

    Returns (step, state, meta), or None when the directory holds no checkpoint. When the newest
    checkpoint fails to load (corrupted or truncated files, non-finite values), the next older one is
    tried; once one loads, the broken newer ones are moved to `<directory>/../checkpoints_corrupted/`
    (so a later save of the same step cannot collide with them) and the reason is printed. If none
    loads, nothing is moved and CheckpointError lists every reason.
    """
    steps = self.all_steps()
    if not steps:
      return None
    failed = []
    for step in reversed(steps):
      try:
        state, meta = self.restore(step, target)
      except Exception as e:  # noqa: BLE001  (any failure to read means: try the one before)
        text = str(e).strip().splitlines()
        reason = f'{type(e).__name__}: {text[0] if text else ""}'[:500]
        logging.error('Checkpoint at step %d in %s could not be restored: %s', step, self.directory, reason)
        failed.append((step, reason))
        continue
      for bad, reason in failed:
        if self.read_only:
          print(
            f'WARNING: the checkpoint at step {bad} in {self.directory} could not be restored '
            f'({reason}); using step {step} instead.',
            flush=True,
          )
          continue
        moved = self._move_aside(bad)
        print(
          f'WARNING: the checkpoint at step {bad} in {self.directory} could not be restored ({reason}); '
          f'moved it to {moved} and resumed from the checkpoint at step {step} instead.',
          flush=True,
        )
      return step, state, meta
    raise CheckpointError(
      f'No checkpoint in {self.directory} could be restored (nothing was changed): '
      + '; '.join(f'step {s}: {r}' for s, r in failed)
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
      return meta
  return None


def load_params(path: str) -> tuple[dict, int]:
  """Loads the raw params tree (nested dicts of arrays) of a checkpoint, for transfer learning.

  `path` is a checkpoint step directory (`.../checkpoints/<step>`), a checkpoints directory, or a workdir
  (the latest step is used). Returns (params as nested dicts, step).
  """
  path = os.path.abspath(os.path.expanduser(path))
  for candidate in (path, os.path.join(path, 'checkpoints')):
    if os.path.isdir(os.path.join(candidate, 'state')) and os.path.basename(candidate).isdigit():
      step = int(os.path.basename(candidate))
      manager_dir = os.path.dirname(candidate)
      break
    if os.path.isdir(candidate):
      digits = [int(d) for d in os.listdir(candidate) if d.isdigit()]
      if digits:
        step, manager_dir = max(digits), candidate
        break
  else:
    raise FileNotFoundError(
      f'pretrained checkpoint path {path!r} holds no checkpoint: give a workdir, its checkpoints/ folder '
      'or a checkpoints/<step> folder of a finished pretraining run.'
    )
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(os.path.join(manager_dir, str(step), 'state'))
  return state['params'], step
