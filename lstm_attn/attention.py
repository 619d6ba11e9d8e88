"""Attention: one public function with several backends, rotary embeddings, and a multi-head module.

`dot_product_attention` takes what `jax.nn.dot_product_attention` takes ([batch, seq, heads, head_dim],
GQA/MQA when key/value have fewer heads, `is_causal`, sequence lengths, `local_window_size`, `bias`,
`mask`), plus `segment_ids` for packed sequences, and dispatches to one of:

  'reference'  plain jnp in float32 (`lstm_attn.kernels.reference.mha_reference`): the ground truth.
  'xla'        `jax.nn.dot_product_attention(implementation='xla')`; segment ids become its dense mask.
  'chunked'    flash-style jnp scan over key/value blocks, memory linear in sequence length (CPU path).
  'pallas'     the fused Pallas kernel (GPU/TPU; interpret mode on CPU).
  None         'pallas' on GPU/TPU; on CPU 'xla' for small q_len * kv_len and 'chunked' for large.

Unlike jax.nn, a query row that sees no key at all (fully masked) returns zeros and gets zero gradient,
in every backend, never NaN and never the uniform average that a large-negative fill produces.

`MultiHeadAttention` is a thin Flax NNX holder of the Q/K/V/O projections around that function, with
GQA/MQA, rotary positions, output dropout and a fixed-size KV cache (`KVCache`) for generation.
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lstm_attn.kernels import reference

Array = jax.Array

IMPLEMENTATIONS = ('reference', 'xla', 'chunked', 'pallas')

# On CPU, implementation=None uses 'chunked' once q_len * kv_len reaches this many elements per head and
# 'xla' below it. Measured (experiments/bench_attention.py, BUILD_NOTES.md): chunked was already faster
# than xla from 512 tokens on and 4-6x faster at 2k; below ~256 tokens the scan's per-block overhead can
# lose. 1024 x 1024 is the conservative crossover.
CHUNKED_MIN_ELEMENTS = 1024 * 1024

# On GPU/TPU, implementation=None uses 'pallas' for head dims in this range (the kernel's tested range)
# and 'xla' outside it (tiny heads waste the matrix units; the kernel rejects heads above 256).
PALLAS_HEAD_DIMS = (32, 256)

_KERNEL_MODULES = {
  'chunked': 'lstm_attn.kernels.chunked_attention',
  'pallas': 'lstm_attn.kernels.flash_attention',
}


def _kernel_available(implementation: str) -> bool:
  return importlib.util.find_spec(_KERNEL_MODULES[implementation]) is not None


def _to_4d(x, name, target):
  """bias/mask may have fewer than 4 dims (e.g. [q_len, kv_len]); prepend ones like jax.nn does."""
  x = jnp.asarray(x)
  x = x.reshape((1,) * (4 - x.ndim) + x.shape) if x.ndim <= 4 else x
  if x.ndim != 4 or any(d not in (1, t) for d, t in zip(x.shape, target)):
    raise ValueError(
      f'{name} must be broadcastable to [batch, heads, q_len, kv_len] = {target}, got shape {x.shape}.'
    )
  return x


def _auto_implementation(query, key, has_dense: bool) -> str:
  """The backend implementation=None picks; see the module docstring."""
  if has_dense or query.dtype == jnp.float64:
    return 'xla'  # The fused kernels take no dense bias/mask and no float64.
  if jax.default_backend() in ('gpu', 'tpu'):
    lo, hi = PALLAS_HEAD_DIMS
    return 'pallas' if lo <= query.shape[-1] <= hi and _kernel_available('pallas') else 'xla'
  if query.shape[1] * key.shape[1] >= CHUNKED_MIN_ELEMENTS and _kernel_available('chunked'):
    return 'chunked'
  return 'xla'


def _rows_with_a_key(spec: reference.MaskSpec, batch: int, q_len: int, kv_len: int) -> Array:
  """[batch, q_len] bool: whether a query row sees at least one key under causal/window/length masks.

  Evaluated per row from the interval of visible keys, without the [q_len, kv_len] mask.
  """
  q_pos = jnp.arange(q_len)[None, :]  # [1, q_len]
  lo = jnp.zeros_like(q_pos)
  hi = jnp.full((batch, 1), kv_len - 1, jnp.int32)  # last visible key, inclusive
  if spec.key_value_seq_lengths is not None:
    hi = jnp.minimum(hi, spec.key_value_seq_lengths[:, None] - 1)
  if spec.is_causal:
    hi = jnp.minimum(hi, q_pos)
  if spec.local_window is not None:
    left, right = spec.local_window
    lo = jnp.maximum(lo, q_pos - left)
    hi = jnp.minimum(hi, q_pos + right)
  rows = lo <= hi  # [batch, q_len]
  if spec.query_seq_lengths is not None:
    rows &= q_pos < spec.query_seq_lengths[:, None]
  return rows


def _xla_attention(query, key, value, bias, mask, scale, spec: reference.MaskSpec):
  """jax.nn.dot_product_attention(implementation='xla') with segment ids and zeroed empty rows.

  float16 on CPU computes in float32: XLA:CPU has no float16 dot with float32 accumulation, which
  jax.nn asks for ("The precision 'F16_F16_F32' is not supported by dot_general on CPU" under jit).
  Decided when lowering (lax.platform_dependent), so a GPU/TPU program keeps its float16 dots.
  """
  if query.dtype == jnp.float16:

    def via_float32(query, key, value, bias):
      up = lambda x: None if x is None else x.astype(jnp.float32)
      out = _xla_attention_impl(up(query), up(key), up(value), up(bias), mask, scale, spec)
      return out.astype(jnp.float16)

    direct = lambda *a: _xla_attention_impl(*a, mask, scale, spec)
    return jax.lax.platform_dependent(query, key, value, bias, cpu=via_float32, default=direct)
  return _xla_attention_impl(query, key, value, bias, mask, scale, spec)


def _xla_attention_impl(query, key, value, bias, mask, scale, spec: reference.MaskSpec):
  batch, q_len, _, _ = query.shape
  kv_len = key.shape[1]
  if spec.q_segment_ids is not None or mask is not None:
    # A dense mask is needed anyway: build the whole predicate once, [batch|1, heads|1, q_len, kv_len].
    keep = reference.dense_mask(spec, batch, q_len, kv_len)
    if mask is not None:
      keep = keep & mask
    out = jax.nn.dot_product_attention(query, key, value, bias, keep, scale=scale, implementation='xla')
    rows = jnp.any(keep, axis=-1)  # [batch|1, heads|1, q_len]
    rows = jnp.transpose(rows, (0, 2, 1))[..., None]  # [batch|1, q_len, heads|1, 1]
  else:
    out = jax.nn.dot_product_attention(
      query,
      key,
      value,
      bias,
      None,
      scale=scale,
      is_causal=spec.is_causal,
      query_seq_lengths=spec.query_seq_lengths,
      key_value_seq_lengths=spec.key_value_seq_lengths,
      local_window_size=spec.local_window,
      implementation='xla',
    )
    rows = _rows_with_a_key(spec, batch, q_len, kv_len)[:, :, None, None]  # [batch, q_len, 1, 1]
  # jax.nn gives fully masked rows the mean of all values; `where` also zeroes their gradient.
  return jnp.where(rows, out, jnp.zeros((), out.dtype))


def dot_product_attention(
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
  implementation=None,
):
  """Scaled dot-product attention with the arguments of `jax.nn.dot_product_attention`.

  Args:
    query: [batch, q_len, num_heads, head_dim], or unbatched [q_len, num_heads, head_dim] (then key and
      value are unbatched too, lengths are scalars, segment ids are [seq]; the result is unbatched).
    key, value: [batch, kv_len, num_kv_heads, head_dim]; num_heads % num_kv_heads == 0 (GQA/MQA).
    bias: optional additive logits bias broadcastable to [batch, num_heads, q_len, kv_len].
    mask: optional bool mask (True = attend) broadcastable to [batch, num_heads, q_len, kv_len].
    scale: logits scale; default 1 / sqrt(head_dim).
    is_causal: key position <= query position (top-left aligned, as jax.nn).
    query_seq_lengths: [batch] ints; query rows at or past the length return zeros.
    key_value_seq_lengths: [batch] ints; keys at or past the length are hidden.
    local_window_size: int or (left, right): query i sees keys in [i - left, i + right].
    segment_ids: [batch, seq] ints (q_len == kv_len) or a (query_ids, key_value_ids) pair; a query sees
      only keys of its own segment (packed sequences).
    implementation: one of IMPLEMENTATIONS or None (see the module docstring).

  Returns:
    [batch, q_len, num_heads, head_dim] in query.dtype; zeros on query rows that see no key.
  """
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}.')
  if jnp.ndim(query) == 3:  # unbatched [seq, heads, head_dim], as jax.nn.dot_product_attention takes
    return _unbatched(
      query,
      key,
      value,
      bias,
      mask,
      scale=scale,
      is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size,
      segment_ids=segment_ids,
      implementation=implementation,
    )
  scale, spec = reference.check_inputs(
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
  target = (query.shape[0], query.shape[2], query.shape[1], key.shape[1])  # [B, N, T, S]
  if bias is not None:
    bias = reference.check_bias(_to_4d(bias, 'bias', target))
  if mask is not None:
    mask = _to_4d(mask, 'mask', target)
    if mask.dtype != jnp.bool_:
      raise ValueError(
        f'mask must be boolean (True = attend), got dtype {mask.dtype}; '
        'pass an additive mask as bias instead.'
      )
  has_dense = bias is not None or mask is not None
  if implementation is None:
    implementation = _auto_implementation(query, key, has_dense)

  if implementation == 'reference':
    return reference.mha_reference(
      query,
      key,
      value,
      bias,
      mask,
      scale=scale,
      is_causal=spec.is_causal,
      query_seq_lengths=spec.query_seq_lengths,
      key_value_seq_lengths=spec.key_value_seq_lengths,
      local_window_size=spec.local_window,
      segment_ids=_segment_pair(spec),
    )
  if implementation == 'xla':
    return _xla_attention(query, key, value, bias, mask, scale, spec)

  if has_dense:
    raise ValueError(
      f'implementation={implementation!r} takes no dense bias or mask (they are N x N arrays); express '
      "the mask with is_causal/seq lengths/local_window_size/segment_ids, or use implementation='xla' "
      "or 'reference'."
    )
  if implementation == 'chunked':
    from lstm_attn.kernels.chunked_attention import chunked_attention as kernel
  else:
    from lstm_attn import sharding
    from lstm_attn.kernels.flash_attention import flash_attention

    # A Pallas call is opaque to the SPMD partitioner: under a multi-device mesh (the trainer traces
    # its steps under jax.set_mesh) run it per shard of the batch instead of gathering the batch.
    kernel = sharding.per_shard_attention(flash_attention)
  return kernel(
    query,
    key,
    value,
    scale=scale,
    is_causal=spec.is_causal,
    query_seq_lengths=spec.query_seq_lengths,
    key_value_seq_lengths=spec.key_value_seq_lengths,
    local_window_size=spec.local_window,
    segment_ids=_segment_pair(spec),
  )


def _unbatched(query, key, value, bias, mask, *, query_seq_lengths, key_value_seq_lengths, segment_ids, **kw):
  """[seq, heads, head_dim] inputs: a batch of one in, the batch axis squeezed out of the result.

  Lengths are then scalars (or shape [1]) and segment ids [seq] (or a pair of them); bias and mask
  broadcast as in the batched call ([heads, q_len, kv_len] and fewer dims).
  """
  if jnp.ndim(key) != 3 or jnp.ndim(value) != 3:
    raise ValueError(
      f'query is unbatched [seq, heads, head_dim]; key and value must be too, got shapes '
      f'{jnp.shape(key)} and {jnp.shape(value)}.'
    )

  def lengths(x):
    return None if x is None else jnp.reshape(jnp.asarray(x), (1,))

  def batch_ids(ids):
    if ids is None:
      return None
    if isinstance(ids, (tuple, list)):
      return tuple(jnp.asarray(i)[None] for i in ids)
    return jnp.asarray(ids)[None]

  out = dot_product_attention(
    query[None],
    key[None],
    value[None],
    bias,
    mask,
    query_seq_lengths=lengths(query_seq_lengths),
    key_value_seq_lengths=lengths(key_value_seq_lengths),
    segment_ids=batch_ids(segment_ids),
    **kw,
  )
  return out[0]


def _segment_pair(spec: reference.MaskSpec):
  if spec.q_segment_ids is None:
    return None
  return (spec.q_segment_ids, spec.kv_segment_ids)


# ----------------------------------------------------------------------------------------------------
# Rotary position embedding.


def apply_rotary(x, positions, base: float = 10000.0):
  """Rotary position embedding (RoFormer; the half-split layout of GPT-NeoX and LLaMA).

  Channel pairs (j, j + head_dim/2) are rotated by the angle positions * base^(-2j / head_dim).

  Args:
    x: [batch, seq, heads, head_dim], head_dim even.
    positions: [seq] or [batch, seq] integer (or float) absolute positions; a NumPy array makes the
      cos/sin tables compile-time constants (faster under jit).
    base: the frequency base (10000 in the paper).

  Returns:
    [batch, seq, heads, head_dim] in x.dtype (computed in float32, float64 for float64 inputs).
  """
  return _apply_tables(x, _rotary_tables(x, positions, base))


def _rotary_tables(x, positions, base):
  """(cos, sin) [1|B, T, 1, head_dim/2] for x [B, T, H, D]; any x with the same B, T, D shares them."""
  if jnp.ndim(x) != 4:
    raise ValueError(f'x must have rank 4 [batch, seq, heads, head_dim], got shape {jnp.shape(x)}.')
  batch, seq, _, head_dim = x.shape
  if head_dim % 2:
    raise ValueError(f'rotary embeddings need an even head_dim, got {head_dim}.')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'x must be a float array (queries or keys), got {x.dtype}.')
  positions = positions if isinstance(positions, np.ndarray) else jnp.asarray(positions)
  if positions.shape not in ((seq,), (batch, seq)):
    raise ValueError(
      f'positions must have shape [seq] = ({seq},) or [batch, seq] = ({batch}, {seq}), got {positions.shape}.'
    )
  compute = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
  # NumPy positions (the default arange) give NumPy tables, constants in the compiled program: traced
  # ones let XLA recompute cos/sin inside every fusion that reads them (the transposing copies of the
  # weight-gradient matmuls, for one), which cost ~2 ms of the gpt_char step on CPU.
  xp = np if isinstance(positions, np.ndarray) else jnp
  inv_freq = base ** (-xp.arange(head_dim // 2, dtype=compute) * 2 / head_dim)  # [half]
  angles = positions.astype(compute)[..., None] * inv_freq  # [(batch,) seq, half]
  angles = angles[..., None, :] if positions.ndim == 2 else angles[None, :, None, :]  # [1|B, T, 1, half]
  return xp.cos(angles), xp.sin(angles)


def _apply_tables(x, tables):
  cos, sin = tables
  return _rotate(x.astype(cos.dtype), cos, sin).astype(x.dtype)


@jax.custom_vjp
def _rotate(x, cos, sin):
  """x [B, T, H, D] rotated pairwise by the angles whose cos/sin are [1|B, T, 1, D/2].

  A custom VJP because the gradient of a rotation is the inverse rotation, one fused elementwise op;
  autodiff of the half slices instead pads and adds two half-size cotangents (XLA:CPU profile of the
  gpt_char train step: 1.9 ms of pad fusions plus copies, ~7% of the step, vs ~0.3 ms this way).
  """
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rotate_fwd(x, cos, sin):
  return _rotate(x, cos, sin), (x, cos, sin)


def _rotate_bwd(res, g):
  x, cos, sin = res
  half = x.shape[-1] // 2
  x1, x2, g1, g2 = x[..., :half], x[..., half:], g[..., :half], g[..., half:]
  dx = jnp.concatenate([g1 * cos + g2 * sin, g2 * cos - g1 * sin], axis=-1)  # rotation by -angle
  # Cotangents of the tables, summed over the axes they were broadcast along (XLA drops them when
  # positions are integers, the usual case).
  reduce = lambda t, like: jnp.sum(
    t, axis=tuple(i for i in range(4) if like.shape[i] == 1 < t.shape[i]), keepdims=True
  )
  dcos = reduce(g1 * x1 + g2 * x2, cos)
  dsin = reduce(g2 * x1 - g1 * x2, sin)
  return dx, dcos, dsin


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


# ----------------------------------------------------------------------------------------------------
# Multi-head attention module.


class KVCache(NamedTuple):
  """Keys and values of the tokens seen so far, in fixed-size buffers (static shapes for jit).

  key, value: [batch, max_len, num_kv_heads, head_dim]; positions >= length hold garbage (zeros at init).
  length: int32 scalar array, the number of tokens already in the cache.
  """

  key: Array
  value: Array
  length: Array


def _linear(in_features, out_features, use_bias, kernel_init, dtype, param_dtype, rngs):
  kwargs = {} if kernel_init is None else {'kernel_init': kernel_init}
  return nnx.Linear(
    in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kwargs
  )


class MultiHeadAttention(nnx.Module):
  """Multi-head attention with Q/K/V/O projections, GQA/MQA, rotary positions and a KV cache.

  Dropout is applied to the output projection (the "residual dropout" of GPT-2/nanoGPT), not to the
  attention probabilities: probability dropout would need the N x N matrix, which the fused kernels
  never form. model.train() / model.eval() switch it on and off.

  Attributes (parameters): query [in, heads*head_dim], key/value [kv_features, kv_heads*head_dim],
  out [heads*head_dim, in], each an nnx.Linear.
  """

  def __init__(
    self,
    num_heads: int,
    in_features: int,
    *,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    kv_features: int | None = None,
    qkv_bias: bool = True,
    out_bias: bool = True,
    dropout: float = 0.0,
    rotary: bool = False,
    rotary_base: float = 10000.0,
    implementation: str | None = None,
    dtype=None,
    param_dtype=jnp.float32,
    kernel_init=None,
    rngs: nnx.Rngs,
  ):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
      raise ValueError(
        f'num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads}).'
      )
    if head_dim is None:
      if in_features % num_heads:
        raise ValueError(
          f'in_features ({in_features}) must be divisible by num_heads ({num_heads}), or pass head_dim.'
        )
      head_dim = in_features // num_heads
    if rotary and head_dim % 2:
      raise ValueError(f'rotary=True needs an even head_dim, got {head_dim}.')
    if implementation is not None and implementation not in IMPLEMENTATIONS:
      raise ValueError(f'implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}.')
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {dropout}.')
    kv_features = in_features if kv_features is None else kv_features
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.in_features = in_features
    self.rotary, self.rotary_base = rotary, rotary_base
    self.implementation = implementation
    self.dtype, self.param_dtype = dtype, param_dtype
    lin = lambda i, o, bias: _linear(i, o, bias, kernel_init, dtype, param_dtype, rngs)
    self.query = lin(in_features, num_heads * head_dim, qkv_bias)
    self.key = lin(kv_features, num_kv_heads * head_dim, qkv_bias)
    self.value = lin(kv_features, num_kv_heads * head_dim, qkv_bias)
    self.out = lin(num_heads * head_dim, in_features, out_bias)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `max_len` tokens; dtype defaults to the module's dtype (else param_dtype)."""
    if batch < 1 or max_len < 1:
      raise ValueError(f'batch and max_len must be positive, got batch={batch}, max_len={max_len}.')
    if dtype is None:
      dtype = self.param_dtype if self.dtype is None else self.dtype
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

  def __call__(
    self,
    x,
    *,
    context=None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    segment_ids=None,
    local_window_size=None,
    positions=None,
    cache: KVCache | None = None,
  ):
    """x: [batch, seq, in_features] -> [batch, seq, in_features] (and the new cache when given one).

    context: [batch, kv_seq, kv_features], the source of keys/values for cross-attention (None: self).
    positions: [seq] or [batch, seq] absolute positions for rotary (default: arange, or the cache's
      length + arange with a cache).
    cache: a KVCache: x is written at positions [length, length + seq) and the queries attend to cache
      positions [0, length + seq), causally by absolute position when is_causal. The caller keeps
      length + seq <= max_len (checked when length is concrete). With a cache, sequence lengths and
      segment ids are not accepted (the cache length decides which keys exist).
    """
    if jnp.ndim(x) != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f'x must have shape [batch, seq, {self.in_features}], got {jnp.shape(x)}.')
    batch, seq, _ = x.shape
    source = x if context is None else context
    if jnp.ndim(source) != 3 or source.shape[0] != batch or source.shape[-1] != self.key.in_features:
      raise ValueError(
        f'context must have shape [{batch}, kv_seq, {self.key.in_features}], got {jnp.shape(source)}.'
      )
    q = self.query(x).reshape(batch, seq, self.num_heads, self.head_dim)  # [B, T, H, D]
    k = self.key(source).reshape(batch, source.shape[1], self.num_kv_heads, self.head_dim)  # [B, S, K, D]
    v = self.value(source).reshape(k.shape)  # [B, S, K, D]

    if cache is not None and not isinstance(cache, KVCache):
      raise ValueError(f'cache must be a KVCache (see init_cache), got {type(cache).__name__}.')
    if self.rotary:
      if context is not None:
        raise ValueError('rotary=True is for self-attention; got a context for cross-attention.')
      if positions is None:  # NumPy arange: constant tables; with a cache, the absolute positions
        positions = np.arange(seq) if cache is None else cache.length + jnp.arange(seq, dtype=jnp.int32)
      tables = _rotary_tables(q, positions, self.rotary_base)  # shared by q and k
      q, k = _apply_tables(q, tables), _apply_tables(k, tables)

    if cache is None:
      out = dot_product_attention(
        q,
        k,
        v,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        implementation=self.implementation,
      )  # [B, T, H, D]
      return self._project(out)

    out, cache = self._cached_attention(
      q,
      k,
      v,
      cache,
      context,
      is_causal,
      query_seq_lengths,
      key_value_seq_lengths,
      segment_ids,
      local_window_size,
    )
    return self._project(out), cache

  def _project(self, out):
    batch, seq = out.shape[:2]
    y = self.out(out.reshape(batch, seq, self.num_heads * self.head_dim))  # [B, T, F]
    return self.dropout(y)

  def _cached_attention(
    self,
    q,
    k,
    v,
    cache,
    context,
    is_causal,
    query_seq_lengths,
    key_value_seq_lengths,
    segment_ids,
    local_window_size,
  ):
    """Writes k/v (already rotated) into the cache, attends over it. q: [B, T, H, D]; k, v: [B, T, K, D]."""
    if context is not None:
      raise ValueError('cache is for self-attention; got a context for cross-attention.')
    if query_seq_lengths is not None or key_value_seq_lengths is not None or segment_ids is not None:
      raise ValueError(
        'with a cache, query_seq_lengths, key_value_seq_lengths and segment_ids must be '
        'None: the cache length decides which keys exist.'
      )
    batch, seq = q.shape[:2]
    max_len = cache.key.shape[1]
    expected = (batch, max_len, self.num_kv_heads, self.head_dim)
    if cache.key.shape != expected or cache.value.shape != expected:
      raise ValueError(
        f'cache key/value must have shape {expected}, got {cache.key.shape} and {cache.value.shape}.'
      )
    if seq > max_len:
      raise ValueError(f'x has {seq} tokens but the cache holds at most max_len={max_len}.')
    length = jnp.asarray(cache.length, jnp.int32)
    try:
      concrete_length = int(length)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):  # under jit
      concrete_length = None
    if concrete_length is not None and concrete_length + seq > max_len:
      raise ValueError(f'cache overflow: length {concrete_length} + {seq} new tokens > max_len {max_len}.')
    q_pos = length + jnp.arange(seq, dtype=jnp.int32)  # [T] absolute query positions
    zero = jnp.zeros((), jnp.int32)
    keys = jax.lax.dynamic_update_slice(cache.key, k.astype(cache.key.dtype), (zero, length, zero, zero))
    values = jax.lax.dynamic_update_slice(
      cache.value, v.astype(cache.value.dtype), (zero, length, zero, zero)
    )
    # The mask by absolute position, [1, 1, T, max_len]: only written keys, and the shared causal/window
    # predicate evaluated at the queries' absolute positions.
    kv_pos = jnp.arange(max_len, dtype=jnp.int32)[None, :]
    spec = reference.MaskSpec(is_causal=is_causal, local_window=reference.normalize_window(local_window_size))
    keep = (kv_pos < length + seq) & reference.visible(spec, 0, q_pos[:, None], kv_pos)
    keep = jnp.broadcast_to(keep, (seq, max_len))[None, None]
    # A dense mask rules out the fused kernels; for a decode step (seq = 1) the xla path is the right
    # tool anyway (one query row against the cache).
    implementation = self.implementation if self.implementation in ('reference', 'xla') else 'xla'
    out = dot_product_attention(
      q, keys.astype(q.dtype), values.astype(q.dtype), mask=keep, implementation=implementation
    )  # [B, T, H, D]
    if concrete_length is None:  # under jit an overflow cannot raise; NaN instead of overwritten keys
      out = jnp.where(length + seq <= max_len, out, jnp.nan)
    return out, KVCache(keys, values, length + seq)
