"""Attention kernels run per shard of a device mesh (`jax.shard_map`), with the batch axes named explicitly.

A Pallas call is opaque to XLA's SPMD partitioner: under a multi-device mesh it would gather the whole
batch onto every device. Attention is independent across batch rows (and heads), so each device can run
the kernel on its own rows with no communication:

  shard_attention(fn, mesh, batch_axes=('data',), head_axis=None)   explicit: always per shard
  with attention_batch_axes(('data', 'fsdp')): ...                   a caller (the trainer) declares how
                                                                     its batches are split
  per_shard_attention(fn)                                            what the op wraps its kernel with:
                                                                     per shard inside such a block, when
                                                                     traced under jax.set_mesh, else as is
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

_BATCH_AXES: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
  'lstm_attn_attention_batch_axes', default=None
)


@contextlib.contextmanager
def attention_batch_axes(axes):
  """Inside this block, kernels wrapped by `per_shard_attention` split the batch over mesh `axes`."""
  token = _BATCH_AXES.set(tuple(axes))
  try:
    yield
  finally:
    _BATCH_AXES.reset(token)


def shard_attention(attention_fn, mesh: Mesh, *, batch_axes, head_axis=None):
  """Runs `attention_fn(query, key, value, **kwargs)` per shard with `jax.shard_map`.

  Each device runs the kernel on its own [batch / |batch_axes|, seq, heads / |head_axis|, head_dim]
  block. query [batch, q_len, heads, head_dim]; key/value [batch, kv_len, kv_heads, head_dim];
  per-example arguments (query_seq_lengths, key_value_seq_lengths [batch]; segment_ids, a pair of
  [batch, seq]) are split over the batch too. With `head_axis`, heads (and kv heads: GQA groups stay
  whole on one device) split over that mesh axis, which must not be in `batch_axes`.
  """
  batch_axes = tuple(batch_axes)
  if head_axis is not None and head_axis in batch_axes:
    raise ValueError(f'head_axis={head_axis!r} is also in batch_axes={batch_axes!r}; use distinct axes.')
  missing = [a for a in (*batch_axes, *([head_axis] if head_axis else [])) if a not in mesh.axis_names]
  if missing:
    raise ValueError(f'shard_attention: axes {missing} are not axes of the mesh {mesh.axis_names}.')
  batch = batch_axes or None
  qkv_spec = PartitionSpec(batch, None, head_axis, None)
  row_spec = PartitionSpec(batch)
  rows2_spec = PartitionSpec(batch, None)

  def wrapped(
    query,
    key,
    value,
    *,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    segment_ids=None,
    **static_kwargs,
  ):
    per_example = {
      'query_seq_lengths': query_seq_lengths,
      'key_value_seq_lengths': key_value_seq_lengths,
      'segment_ids': segment_ids,
    }
    present = {k: v for k, v in per_example.items() if v is not None}
    _check_divisible('query/key/value batch', query.shape[0], batch, mesh)
    if head_axis is not None:
      _check_divisible('query heads', query.shape[2], (head_axis,), mesh)
      _check_divisible('key/value heads', key.shape[2], (head_axis,), mesh)

    def spec_of(x):
      return jax.tree.map(lambda a: row_spec if a.ndim == 1 else rows2_spec, x)

    def body(q, k, v, extra):
      return attention_fn(q, k, v, **extra, **static_kwargs)

    return jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(qkv_spec, qkv_spec, qkv_spec, {k: spec_of(v) for k, v in present.items()}),
      out_specs=qkv_spec,
      check_vma=False,
    )(query, key, value, present)

  return wrapped


def per_shard_attention(attention_fn):
  """`attention_fn` run per shard when traced under `jax.set_mesh(mesh)` inside `attention_batch_axes`.

  Per shard when the caller declared its batch axes, the mesh has them, they hold more than one device
  and their size divides the batch; otherwise (no declaration, no mesh, one device, or e.g. a batch of 1
  while sampling) `attention_fn` is called as is. The trainer declares ('data', 'fsdp') around its steps
  (`lstm_attn.training.sharding.with_mesh`).
  """

  def wrapped(query, key, value, **kwargs):
    batch_axes = _BATCH_AXES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if batch_axes is None or mesh.empty or not set(batch_axes) <= set(mesh.axis_names):
      return attention_fn(query, key, value, **kwargs)
    size = int(np.prod([mesh.shape[a] for a in batch_axes], dtype=np.int64))
    if size == 1 or query.shape[0] % size:
      return attention_fn(query, key, value, **kwargs)
    return shard_attention(attention_fn, mesh, batch_axes=batch_axes)(query, key, value, **kwargs)

  return wrapped


def _check_divisible(what: str, size: int, axes, mesh: Mesh) -> None:
  n = int(np.prod([mesh.shape[a] for a in axes or ()], dtype=np.int64))
  if size % n:
    raise ValueError(
      f'shard_attention: {what}={size} must be divisible by the mesh axes {tuple(axes)} (size {n}).'
    )
