"""`MultiHeadAttention`: a thin Flax NNX holder of the Q/K/V/O projections around `dot_product_attention`.

GQA/MQA (fewer key/value heads), rotary positions (`rotary.py`), output dropout and a fixed-size KV cache
(`KVCache`) for generation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lstm_attn.attention.kv_cache import KVCache
from lstm_attn.attention.ops import IMPLEMENTATIONS, dot_product_attention
from lstm_attn.attention.rotary import apply_tables, rotary_tables
from lstm_attn.checks import check_rate
from lstm_attn.kernels import reference


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
    check_rate('dropout', dropout)
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
      tables = rotary_tables(q, positions, self.rotary_base)  # shared by q and k
      q, k = apply_tables(q, tables), apply_tables(k, tables)

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
