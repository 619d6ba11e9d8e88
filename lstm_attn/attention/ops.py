"""`dot_product_attention`: validate once, then call one backend from a flat table with one mask spec.

The op takes what `jax.nn.dot_product_attention` takes ([batch, seq, heads, head_dim], GQA/MQA when
key/value have fewer heads, `is_causal`, sequence lengths, `local_window_size`, `bias`, `mask`), plus
`segment_ids` for packed sequences. `reference.check_inputs` validates them and folds every mask argument
into one `reference.MaskSpec`; the dense bias/mask are checked here. Then `_TABLE[implementation]` is
called with (query, key, value, bias, mask, scale, spec), and no backend validates again:

  'reference'  plain jnp in float32 (`lstm_attn.kernels.reference.mha_reference`): the ground truth.
  'xla'        `jax.nn.dot_product_attention(implementation='xla')`; segment ids become its dense mask.
  'chunked'    flash-style jnp scan over key/value blocks, memory linear in sequence length (CPU path).
  'pallas'     the fused Pallas kernel (GPU/TPU; interpret mode on CPU), the platform's kernel chosen
               when the call is lowered (`kernels/flash_attention.py`).
  'mosaic_gpu' the Pallas Mosaic GPU kernel for Hopper (bf16/fp16; GPU interpret mode on CPU): opt-in,
               never chosen by None until a GPU run has verified and timed it.
  None         'pallas' on GPU/TPU; on CPU 'xla' for small q_len * kv_len and 'chunked' for large.

Unlike jax.nn, a query row that sees no key at all (fully masked) returns zeros and gets zero gradient,
in every backend, never NaN and never the uniform average that a large-negative fill produces. A -inf
bias hides its key, so a row whose bias is -inf at every key it may see is fully masked too. Zero-sized
batch or lengths give the empty result (zeros where q_len > 0 but kv_len = 0) and a VJP of zeros, before
any backend is called.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lstm_attn.kernels import reference

Array = jax.Array

# On CPU, implementation=None uses 'chunked' once q_len * kv_len reaches this many elements per head and
# 'xla' below it. Measured (experiments/bench_attention.py, BUILD_NOTES.md): chunked was already faster
# than xla from 512 tokens on and 4-6x faster at 2k; below ~256 tokens the scan's per-block overhead can
# lose. 1024 x 1024 is the conservative crossover.
CHUNKED_MIN_ELEMENTS = 1024 * 1024

# On GPU/TPU, implementation=None uses 'pallas' for head dims in this range (the kernel's tested range)
# and 'xla' outside it (tiny heads waste the matrix units; the kernel rejects heads above 256).
PALLAS_HEAD_DIMS = (32, 256)

# The backends that take no dense bias/mask (they never form an N x N array).
_FUSED = ('chunked', 'pallas', 'mosaic_gpu')


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
    if jax.default_backend() == 'gpu':
      from lstm_attn.kernels.flash_attention_triton import compiles_for  # Pallas only when on a GPU

      if not compiles_for(query.shape[-1], query.dtype):
        return 'xla'  # float32 at head_dim > 128: the Triton kernel's tiles do not fit (see its error)
    return 'pallas' if lo <= query.shape[-1] <= hi else 'xla'
  if query.shape[1] * key.shape[1] >= CHUNKED_MIN_ELEMENTS:
    return 'chunked'
  return 'xla'


# ----------------------------------------------------------------------------------------------------
# The backends: each takes (query, key, value, bias, mask, scale, spec) as validated by the op, with
# query [B, T, N, D], key/value [B, S, K, D], bias/mask None or 4-D broadcastable to [B, N, T, S].


def _reference(query, key, value, bias, mask, scale, spec: reference.MaskSpec):
  # mha_reference has only the keyword API (its check_inputs sees arguments that already passed it).
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


def _xla(query, key, value, bias, mask, scale, spec: reference.MaskSpec):
  """jax.nn.dot_product_attention(implementation='xla') with segment ids and zeroed empty rows.

  float16 on CPU computes in float32: XLA:CPU has no float16 dot with float32 accumulation, which
  jax.nn asks for ("The precision 'F16_F16_F32' is not supported by dot_general on CPU" under jit).
  Decided when lowering (lax.platform_dependent), so a GPU/TPU program keeps its float16 dots.
  """
  if query.dtype == jnp.float16:

    def via_float32(query, key, value, bias):
      up = lambda x: None if x is None else x.astype(jnp.float32)
      out = _xla_impl(up(query), up(key), up(value), up(bias), mask, scale, spec)
      return out.astype(jnp.float16)

    direct = lambda *a: _xla_impl(*a, mask, scale, spec)
    return jax.lax.platform_dependent(query, key, value, bias, cpu=via_float32, default=direct)
  return _xla_impl(query, key, value, bias, mask, scale, spec)


def _xla_impl(query, key, value, bias, mask, scale, spec: reference.MaskSpec):
  batch, q_len, _, _ = query.shape
  kv_len = key.shape[1]
  if spec.q_segment_ids is not None or mask is not None or bias is not None:
    # A dense mask is needed anyway: build the whole predicate once, [batch|1, heads|1, q_len, kv_len].
    keep = reference.dense_mask(spec, batch, q_len, kv_len)
    if mask is not None:
      keep = keep & mask
    if bias is not None:  # a -inf bias hides its key: a row of only -inf sees none (0, not NaN)
      keep = keep & ~jnp.isneginf(bias)
    out = jax.nn.dot_product_attention(query, key, value, bias, keep, scale=scale, implementation='xla')
    rows = jnp.any(keep, axis=-1)  # [batch|1, heads|1, q_len]
    rows = jnp.transpose(rows, (0, 2, 1))[..., None]  # [batch|1, q_len, heads|1, 1]
  else:
    out = jax.nn.dot_product_attention(
      query,
      key,
      value,
      None,
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


def _chunked(query, key, value, bias, mask, scale, spec: reference.MaskSpec):
  del bias, mask  # None: the op refuses them for the fused backends
  from lstm_attn.kernels.chunked_attention import chunked_attention_from_spec

  return chunked_attention_from_spec(query, key, value, scale, spec)


def _fused_kernel(backend: str | None):
  """The backend that calls the fused Pallas kernel `flash_attention_from_spec(..., backend=backend)`
  (None: the platform's kernel, chosen when the call is lowered)."""

  def run(query, key, value, bias, mask, scale, spec: reference.MaskSpec):
    del bias, mask  # None: the op refuses them for the fused backends
    from lstm_attn.attention.sharded import per_shard_attention
    from lstm_attn.kernels.flash_attention import flash_attention_from_spec

    # A Pallas call is opaque to the SPMD partitioner: under a multi-device mesh (the trainer traces its
    # steps under jax.set_mesh) it runs per shard of the batch instead of gathering the batch. shard_map
    # splits the spec's per-example arrays, so they travel as arguments and the spec is rebuilt per shard.
    def per_shard(query, key, value, *, query_seq_lengths=None, key_value_seq_lengths=None, segment_ids=None):
      q_seg, kv_seg = (None, None) if segment_ids is None else segment_ids
      shard_spec = dataclasses.replace(
        spec,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
      )
      kwargs = {} if backend is None else {'backend': backend}
      return flash_attention_from_spec(query, key, value, scale, shard_spec, **kwargs)

    return per_shard_attention(per_shard)(
      query,
      key,
      value,
      query_seq_lengths=spec.query_seq_lengths,
      key_value_seq_lengths=spec.key_value_seq_lengths,
      segment_ids=_segment_pair(spec),
    )

  return run


def _segment_pair(spec: reference.MaskSpec):
  if spec.q_segment_ids is None:
    return None
  return (spec.q_segment_ids, spec.kv_segment_ids)


_TABLE = {
  'reference': _reference,
  'xla': _xla,
  'chunked': _chunked,
  'pallas': _fused_kernel(None),
  'mosaic_gpu': _fused_kernel('mosaic_gpu'),
}
IMPLEMENTATIONS = tuple(_TABLE)  # ('reference', 'xla', 'chunked', 'pallas', 'mosaic_gpu')


# ----------------------------------------------------------------------------------------------------
# The op.


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
  scale, spec = _check_inputs(
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
  if has_dense and implementation in _FUSED:
    raise ValueError(
      f'implementation={implementation!r} takes no dense bias or mask (they are N x N arrays); express '
      "the mask with is_causal/seq lengths/local_window_size/segment_ids, or use implementation='xla' "
      "or 'reference'."
    )
  if query.size == 0 or key.shape[1] == 0:
    # Nothing to attend: the empty result, or zeros where the queries have no key at all; its VJP is
    # zeros. No backend sees a zero-sized array (a Pallas grid cannot be empty).
    return jnp.zeros(query.shape, query.dtype)
  return _TABLE[implementation](query, key, value, bias, mask, scale, spec)


def _check_inputs(query, key, value, *, segment_ids, **kwargs):
  """`reference.check_inputs` -> (scale, MaskSpec), zero lengths allowed.

  check_inputs rejects them (the kernels' grids cannot be empty); here nothing is computed for them, so
  the other arguments are checked on stand-ins one step longer and the segment ids at their own length.
  """
  arrays = (query, key, value)
  if not all(jnp.ndim(x) == 4 for x in arrays) or all(x.shape[1] for x in arrays):
    return reference.check_inputs(query, key, value, segment_ids=segment_ids, **kwargs)
  longer = lambda x: jax.ShapeDtypeStruct((x.shape[0], x.shape[1] + 1, *x.shape[2:]), x.dtype)
  scale, spec = reference.check_inputs(*map(longer, arrays), **kwargs)
  reference._normalize_segment_ids(segment_ids, query.shape[0], query.shape[1], key.shape[1])
  return scale, spec


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
