"""Plain-jnp multi-head attention: the ground truth every kernel in this folder is tested against.

Semantics are those of `jax.nn.dot_product_attention` ([batch, seq, heads, head_dim] layout, GQA/MQA when
key/value have fewer heads, top-left aligned causal mask, `local_window_size=(left, right)`), plus
`segment_ids` for packed sequences, and one deliberate difference: a query row with no visible key
(fully masked) returns zeros and gets zero gradient, never NaN and never the uniform average that a
large-negative fill gives.

The mask is defined once, here, position by position (`visible`), so the Pallas kernels and the chunked
path can evaluate exactly the same predicate on a block of positions without building an N x N array.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Everything that decides which key a query may see, without the N x N array.

  Attributes:
    is_causal: key position <= query position (top-left aligned, as in jax.nn).
    local_window: (left, right) or None: query i sees keys in [i - left, i + right].
    query_seq_lengths: [batch] int32 or None: query rows at or past the length see nothing.
    key_value_seq_lengths: [batch] int32 or None: keys at or past the length are hidden.
    q_segment_ids: [batch, q_len] int32 or None; a query sees only keys of its own segment.
    kv_segment_ids: [batch, kv_len] int32 or None (given iff q_segment_ids is).
  """

  is_causal: bool = False
  local_window: tuple[int, int] | None = None
  query_seq_lengths: Array | None = None
  key_value_seq_lengths: Array | None = None
  q_segment_ids: Array | None = None
  kv_segment_ids: Array | None = None


def visible(spec: MaskSpec, batch_index, q_pos, kv_pos):
  """Whether query position q_pos may attend to key position kv_pos, for one batch row.

  q_pos and kv_pos broadcast against each other (e.g. [bq, 1] and [1, bk]); batch_index is a scalar.
  Segment ids are looked up by the caller when it has them as blocks; here they are indexed directly.
  Returns a bool array of the broadcast shape.
  """
  ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(kv_pos)), dtype=bool)
  if spec.is_causal:
    ok &= kv_pos <= q_pos
  if spec.local_window is not None:
    left, right = spec.local_window
    ok &= (kv_pos >= q_pos - left) & (kv_pos <= q_pos + right)
  if spec.query_seq_lengths is not None:
    ok &= q_pos < spec.query_seq_lengths[batch_index]
  if spec.key_value_seq_lengths is not None:
    ok &= kv_pos < spec.key_value_seq_lengths[batch_index]
  if spec.q_segment_ids is not None:
    q_seg = spec.q_segment_ids[batch_index][q_pos]
    kv_seg = spec.kv_segment_ids[batch_index][kv_pos]
    ok &= q_seg == kv_seg
  return ok


def dense_mask(spec: MaskSpec, batch: int, q_len: int, kv_len: int) -> Array:
  """The full boolean mask, [batch, 1, q_len, kv_len]. For references and tests only: it is N x N."""
  q_pos = jnp.arange(q_len)[:, None]
  kv_pos = jnp.arange(kv_len)[None, :]
  masks = jax.vmap(lambda b: visible(spec, b, q_pos, kv_pos))(jnp.arange(batch))
  return masks[:, None]


def normalize_window(local_window_size) -> tuple[int, int] | None:
  if local_window_size is None:
    return None
  if isinstance(local_window_size, (int, np.integer)):
    window = (int(local_window_size), int(local_window_size))
  else:
    try:
      left, right = local_window_size
    except (TypeError, ValueError):
      raise ValueError(
        f'local_window_size must be an int or a (left, right) pair of ints, got {local_window_size!r}.'
      ) from None
    window = (int(left), int(right))
  if window[0] < 0 or window[1] < 0:
    raise ValueError(f'local_window_size must be non-negative, got {local_window_size!r}.')
  return window


def _normalize_segment_ids(segment_ids, batch, q_len, kv_len):
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError('segment_ids must be one [batch, seq] array or a (query_ids, key_value_ids) pair.')
    q_seg, kv_seg = (jnp.asarray(s) for s in segment_ids)
  else:
    q_seg = kv_seg = jnp.asarray(segment_ids)
    if q_len != kv_len:
      raise ValueError(
        f'segment_ids as one array needs q_len == kv_len (got {q_len} and {kv_len}); '
        'pass a (query_segment_ids, key_value_segment_ids) pair instead.'
      )
  if q_seg.shape != (batch, q_len):
    raise ValueError(f'query segment_ids must have shape {(batch, q_len)}, got {q_seg.shape}.')
  if kv_seg.shape != (batch, kv_len):
    raise ValueError(f'key/value segment_ids must have shape {(batch, kv_len)}, got {kv_seg.shape}.')
  if not (jnp.issubdtype(q_seg.dtype, jnp.integer) and jnp.issubdtype(kv_seg.dtype, jnp.integer)):
    raise ValueError(f'segment_ids must be integers, got {q_seg.dtype} and {kv_seg.dtype}.')
  return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def _check_lengths(name, lengths, batch):
  if lengths is None:
    return None
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,):
    raise ValueError(f'{name} must have shape [batch] = ({batch},), got {lengths.shape}.')
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f'{name} must be integers, got {lengths.dtype}.')
  return lengths.astype(jnp.int32)


def lengths_or_full(lengths, full: int, batch: int) -> Array:
  """int32 [batch]: the given sequence lengths clipped to [0, full], or `full` for every example (the
  kernels always take lengths: they also hide the padding to block multiples)."""
  if lengths is None:
    return jnp.full((batch,), full, jnp.int32)
  return jnp.clip(lengths, 0, full).astype(jnp.int32)


def check_bias(bias):
  """An additive bias must be floating point: a boolean mask added as 0/1 would silently not mask."""
  bias = jnp.asarray(bias)
  if not jnp.issubdtype(bias.dtype, jnp.floating):
    raise ValueError(
      f'bias must be a float array (added to the logits), got {bias.dtype}; pass a boolean mask as mask=.'
    )
  return bias


def check_inputs(
  query,
  key,
  value,
  *,
  scale=None,
  is_causal=False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  local_window_size=None,
  segment_ids=None,
):
  """Validates the shared arguments of every implementation; returns (scale, MaskSpec).

  query: [batch, q_len, num_heads, head_dim]; key/value: [batch, kv_len, num_kv_heads, head_dim] with
  num_heads % num_kv_heads == 0 (GQA/MQA). Errors name the argument and say what would be right.
  """
  for name, x in (('query', query), ('key', key), ('value', value)):
    if jnp.ndim(x) != 4:
      raise ValueError(f'{name} must have rank 4 [batch, seq, heads, head_dim], got shape {jnp.shape(x)}.')
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
      raise ValueError(f'{name} must be a float16/bfloat16/float32/float64 array, got {x.dtype}.')
  if not (query.dtype == key.dtype == value.dtype):
    raise ValueError(
      f'query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}.'
    )
  batch, q_len, num_heads, head_dim = query.shape
  if key.shape != value.shape:
    raise ValueError(f'key and value must have the same shape, got {key.shape} and {value.shape}.')
  kb, kv_len, num_kv_heads, kd = key.shape
  if kb != batch:
    raise ValueError(f'key batch {kb} does not match query batch {batch}.')
  if kd != head_dim:
    raise ValueError(f'key head_dim {kd} does not match query head_dim {head_dim}.')
  if num_kv_heads == 0 or num_heads % num_kv_heads:
    raise ValueError(
      f'query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads}) for GQA/MQA.'
    )
  if head_dim == 0:
    raise ValueError(f'head_dim must be positive, got query shape {query.shape}.')
  if q_len == 0 or kv_len == 0:
    raise ValueError(f'query and key/value lengths must be positive, got q_len={q_len}, kv_len={kv_len}.')
  if scale is None:
    scale = 1.0 / math.sqrt(head_dim)
  if not math.isfinite(scale):
    raise ValueError(f'scale must be finite, got {scale!r}.')
  window = normalize_window(local_window_size)
  if window is not None:  # |q_pos - kv_pos| < max(q_len, kv_len): clipping changes no result and keeps
    window = tuple(min(w, max(q_len, kv_len)) for w in window)  # the int32 position sums from overflowing
  q_seg, kv_seg = _normalize_segment_ids(segment_ids, batch, q_len, kv_len)
  spec = MaskSpec(
    is_causal=bool(is_causal),
    local_window=window,
    query_seq_lengths=_check_lengths('query_seq_lengths', query_seq_lengths, batch),
    key_value_seq_lengths=_check_lengths('key_value_seq_lengths', key_value_seq_lengths, batch),
    q_segment_ids=q_seg,
    kv_segment_ids=kv_seg,
  )
  return float(scale), spec


def mha_reference(
  query,
  key,
  value,
  bias=None,
  mask=None,
  *,
  scale=None,
  is_causal=False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  local_window_size=None,
  segment_ids=None,
):
  """Materialising attention. query [B, T, N, D], key/value [B, S, K, D] -> [B, T, N, D].

  Computes in float32 (float64 when given float64, for test references) and returns query.dtype.
  bias: broadcastable to [B, N, T, S]; mask: bool, broadcastable to [B, N, T, S], True = attend.
  """
  scale, spec = check_inputs(
    query,
    key,
    value,
    scale=scale,
    is_causal=is_causal,
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    local_window_size=local_window_size,
    segment_ids=segment_ids,
  )
  batch, q_len, num_heads, _ = query.shape
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  compute_dtype = jnp.float64 if query.dtype == jnp.float64 else jnp.float32
  q = query.astype(compute_dtype)
  # GQA: every group of num_heads // num_kv_heads query heads shares one key/value head.
  k = jnp.repeat(key.astype(compute_dtype), num_heads // num_kv_heads, axis=2)
  v = jnp.repeat(value.astype(compute_dtype), num_heads // num_kv_heads, axis=2)
  logits = jnp.einsum('btnd,bsnd->bnts', q, k, precision=jax.lax.Precision.HIGHEST) * scale
  if bias is not None:
    logits = logits + check_bias(bias).astype(compute_dtype)
  keep = dense_mask(spec, batch, q_len, kv_len)  # [B, 1, T, S]
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise ValueError(f'mask must be boolean (True = attend), got {mask.dtype}.')
    keep = keep & mask
  keep = jnp.broadcast_to(keep, logits.shape)
  # Hidden logits are the most negative finite value, not -inf: masking must create no infinity that a
  # user's jax.debug_infs would trip on (jax.nn does the same). Only `keep` decides what is seen.
  lowest = jnp.finfo(compute_dtype).min
  row_max = jnp.max(jnp.where(keep, logits, lowest), axis=-1, keepdims=True)
  # Rows that see nothing, or only -inf (a user's -inf bias), shift by 0 and come out 0 (probabilities
  # zeroed below, or exp(-inf) = 0); a NaN maximum shifts by 0 too and the NaN logits stay NaN.
  safe_max = jnp.where(jnp.any(keep, axis=-1, keepdims=True) & jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(keep, jnp.exp(jnp.where(keep, logits - safe_max, 0.0)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  probs = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum('bnts,bsnd->btnd', probs, v, precision=jax.lax.Precision.HIGHEST)
  return out.astype(query.dtype)
