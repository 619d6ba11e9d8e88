"""Chunked (flash-style) attention in plain jnp: the CPU path, with memory linear in sequence length.

The same algorithm as the Pallas kernels, written with `lax` loops instead of a grid:

  for each query block i (lax.scan):                       # [batch, kv_heads, group, block_q, head_dim]
    for each key/value block j that block i can see (fori_loop):
      s = q_i k_j^T * scale, masked by `reference.visible`  # [batch, kv_heads, group, block_q, block_kv]
      online softmax: running max m, running sum l (row_sum), fp32 accumulator acc
    out_i = acc / l, lse_i = m + log(l)

Only the output and the log-sum-exp are saved for the backward pass (`jax.custom_vjp`); the backward pass
recomputes the probabilities block by block (FlashAttention-2), accumulating dq per query block and dk/dv
in fp32 buffers of the key/value length. Nothing of size q_len x kv_len is ever materialised, so peak
memory is O(batch * heads * (q_len + kv_len) * head_dim + batch * heads * block_q * block_kv).

Masks are evaluated per block with the one predicate `reference.visible`. Blocks that the causal mask,
the local window or the sequence lengths hide entirely are skipped: the key/value loop of each query block
runs only over the range of blocks it can see. GQA/MQA is handled by grouping the query heads that share
a key/value head ([batch, kv_heads, group, ...]) rather than repeating key/value; dk/dv are summed over
each group. Any sequence length works: inputs are padded to block multiples (with balanced blocks, so the
padding is at most one row per block) and padded keys are masked.

Semantics are exactly `reference.mha_reference`: a fully masked query row gives 0 output and 0 gradient.
Matmuls take the input dtype with fp32 accumulation (`preferred_element_type`), as the kernels do;
float64 inputs compute in float64 (for references).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from lstm_attn.kernels import reference

Array = jax.Array

# Measured on a 2-core CPU (experiments/bench_attention.py and BUILD_NOTES.md): blocks of a few hundred rows
# amortise the per-iteration cost of XLA:CPU loops while the [block_q, block_kv] tiles stay in cache; smaller
# query blocks also let the causal mask skip more. Peak memory grows with batch * heads * block_q * block_kv.
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_KV = 512


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) description of one call: shapes after padding and the static part of the mask."""

  scale: float
  batch: int
  is_causal: bool
  local_window: tuple[int, int] | None
  q_len: int  # true lengths, before padding
  kv_len: int
  block_q: int
  block_kv: int
  num_q_blocks: int
  num_kv_blocks: int
  acc_dtype: str  # 'float32', or 'float64' for float64 inputs

  @property
  def kv_padded(self) -> bool:
    return self.block_kv * self.num_kv_blocks != self.kv_len


def _balanced_block(length: int, block: int) -> tuple[int, int]:
  """(block size, number of blocks) covering `length` with blocks of at most `block`, padding minimal."""
  num = max(1, -(-length // block))
  return -(-length // num), num


def _has_mask(cfg: _Config, masks) -> bool:
  return cfg.is_causal or cfg.local_window is not None or cfg.kv_padded or any(m is not None for m in masks)


def _spec(cfg: _Config, masks) -> reference.MaskSpec:
  q_lens, kv_lens, q_seg, kv_seg = masks
  return reference.MaskSpec(
    is_causal=cfg.is_causal,
    local_window=cfg.local_window,
    query_seq_lengths=q_lens,
    key_value_seq_lengths=kv_lens,
    q_segment_ids=q_seg,
    kv_segment_ids=kv_seg,
  )


def _block_mask(cfg: _Config, masks, i, j):
  """The visibility of query block i to key/value block j: bool [batch, 1, 1, block_q, block_kv]."""
  spec = _spec(cfg, masks)
  q_pos = (i * cfg.block_q + jnp.arange(cfg.block_q))[:, None]  # [block_q, 1]
  kv_pos = (j * cfg.block_kv + jnp.arange(cfg.block_kv))[None, :]  # [1, block_kv]
  keep = jax.vmap(lambda b: reference.visible(spec, b, q_pos, kv_pos))(jnp.arange(cfg.batch))
  keep = jnp.broadcast_to(keep, (cfg.batch, cfg.block_q, cfg.block_kv))
  if cfg.kv_padded:
    keep &= kv_pos < cfg.kv_len  # padded keys are never visible
  return keep[:, None, None]


def _kv_block_range(cfg: _Config, masks, i):
  """[lo, hi) of the key/value blocks that query block i may see; everything outside is fully masked."""
  q_lens, kv_lens = masks[0], masks[1]
  q_first = i * cfg.block_q
  q_last = jnp.minimum(q_first + cfg.block_q, cfg.q_len) - 1
  lo_pos, hi_pos = 0, cfg.kv_len - 1  # inclusive key positions
  if cfg.is_causal:
    hi_pos = jnp.minimum(hi_pos, q_last)
  if cfg.local_window is not None:
    left, right = cfg.local_window
    lo_pos = jnp.maximum(lo_pos, q_first - left)
    hi_pos = jnp.minimum(hi_pos, q_last + right)
  if kv_lens is not None:
    hi_pos = jnp.minimum(hi_pos, jnp.max(kv_lens) - 1)
  if q_lens is not None:
    hi_pos = jnp.where(q_first < jnp.max(q_lens), hi_pos, -1)
  if isinstance(lo_pos, int) and isinstance(hi_pos, int):
    return 0, cfg.num_kv_blocks  # static: a plain scan over all blocks
  lo = jnp.asarray(lo_pos) // cfg.block_kv
  hi = jnp.where(hi_pos >= lo_pos, hi_pos // cfg.block_kv + 1, lo)
  return lo, jnp.clip(hi, lo, cfg.num_kv_blocks)


def _dot(spec, a, b, dtype):
  return jnp.einsum(spec, a, b, preferred_element_type=dtype)


def _forward(cfg: _Config, q, k, v, masks):
  """q [B, K, G, Tp, D], k/v [B, K, Sp, D] -> out [B, K, G, Tp, D] (q.dtype), lse [B, K, G, Tp] (fp32)."""
  batch, kv_heads, group, _, head_dim = q.shape
  bq, bk = cfg.block_q, cfg.block_kv
  acc_dtype = jnp.dtype(cfg.acc_dtype)
  masked = _has_mask(cfg, masks)

  def q_block(_, i):
    q_i = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=3)  # [B, K, G, bq, D]

    def kv_step(j, carry):
      m, row_sum, acc = carry  # [B, K, G, bq], [B, K, G, bq], [B, K, G, bq, D]
      k_j = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)  # [B, K, bk, D]
      v_j = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
      s = _dot('bkgqd,bksd->bkgqs', q_i, k_j, acc_dtype) * cfg.scale  # [B, K, G, bq, bk]
      if masked:
        s = jnp.where(_block_mask(cfg, masks, i, j), s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      # Rows that have seen no visible key keep m = -inf; subtract 0 there so exp() gives 0, not NaN.
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      row_sum = alpha * row_sum + jnp.sum(p, axis=-1)
      acc = alpha[..., None] * acc + _dot('bkgqs,bksd->bkgqd', p.astype(v.dtype), v_j, acc_dtype)
      return m_new, row_sum, acc

    init = (
      jnp.full((batch, kv_heads, group, bq), -jnp.inf, acc_dtype),
      jnp.zeros((batch, kv_heads, group, bq), acc_dtype),
      jnp.zeros((batch, kv_heads, group, bq, head_dim), acc_dtype),
    )
    lo, hi = _kv_block_range(cfg, masks, i)
    m, row_sum, acc = lax.fori_loop(lo, hi, kv_step, init)
    nonempty = row_sum > 0
    out = acc / jnp.where(nonempty, row_sum, 1.0)[..., None]
    lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, row_sum, 1.0)), -jnp.inf)
    return None, (out.astype(q.dtype), lse)

  _, (out, lse) = lax.scan(q_block, None, jnp.arange(cfg.num_q_blocks))
  # [nq, B, K, G, bq, D] -> [B, K, G, Tp, D]
  out = jnp.moveaxis(out, 0, 3).reshape(q.shape)
  lse = jnp.moveaxis(lse, 0, 3).reshape(q.shape[:-1])
  return out, lse


def _backward(cfg: _Config, q, k, v, masks, out, lse, d_out):
  """FlashAttention-2 backward, recomputing the probabilities block by block. Returns dq, dk, dv."""
  bq, bk = cfg.block_q, cfg.block_kv
  acc_dtype = jnp.dtype(cfg.acc_dtype)
  masked = _has_mask(cfg, masks)
  # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij, the row term of the softmax backward.
  delta = jnp.sum(d_out.astype(acc_dtype) * out.astype(acc_dtype), axis=-1)  # [B, K, G, Tp]
  # Empty rows have lse = -inf and no visible key: any finite value gives p = 0 there.
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

  def q_block(carry, i):
    dk, dv = carry  # [B, K, Sp, D] in acc_dtype
    q_i = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=3)  # [B, K, G, bq, D]
    do_i = lax.dynamic_slice_in_dim(d_out, i * bq, bq, axis=3)
    lse_i = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)  # [B, K, G, bq]
    delta_i = lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)

    def kv_step(j, carry):
      dq_i, dk, dv = carry
      k_j = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)  # [B, K, bk, D]
      v_j = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
      s = _dot('bkgqd,bksd->bkgqs', q_i, k_j, acc_dtype) * cfg.scale  # [B, K, G, bq, bk]
      if masked:
        s = jnp.where(_block_mask(cfg, masks, i, j), s, -jnp.inf)
      p = jnp.exp(s - lse_i[..., None])
      dp = _dot('bkgqd,bksd->bkgqs', do_i, v_j, acc_dtype)
      ds = (p * (dp - delta_i[..., None])).astype(q.dtype)
      dq_i = dq_i + _dot('bkgqs,bksd->bkgqd', ds, k_j, acc_dtype)
      # GQA: the einsums sum dk/dv over the group of query heads sharing each key/value head.
      dv_j = _dot('bkgqs,bkgqd->bksd', p.astype(d_out.dtype), do_i, acc_dtype)
      dk_j = _dot('bkgqs,bkgqd->bksd', ds, q_i, acc_dtype)
      dv = lax.dynamic_update_slice_in_dim(
        dv, lax.dynamic_slice_in_dim(dv, j * bk, bk, axis=2) + dv_j, j * bk, axis=2
      )
      dk = lax.dynamic_update_slice_in_dim(
        dk, lax.dynamic_slice_in_dim(dk, j * bk, bk, axis=2) + dk_j, j * bk, axis=2
      )
      return dq_i, dk, dv

    lo, hi = _kv_block_range(cfg, masks, i)
    dq_i = jnp.zeros(q_i.shape, acc_dtype)
    dq_i, dk, dv = lax.fori_loop(lo, hi, kv_step, (dq_i, dk, dv))
    return (dk, dv), dq_i * cfg.scale

  zeros_kv = jnp.zeros(k.shape, acc_dtype)
  (dk, dv), dq = lax.scan(q_block, (zeros_kv, zeros_kv), jnp.arange(cfg.num_q_blocks))
  dq = jnp.moveaxis(dq, 0, 3).reshape(q.shape)
  return dq.astype(q.dtype), (dk * cfg.scale).astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, masks):
  return _forward(cfg, q, k, v, masks)[0]


def _attention_fwd(cfg, q, k, v, masks):
  out, lse = _forward(cfg, q, k, v, masks)
  return out, (q, k, v, masks, out, lse)


def _attention_bwd(cfg, residuals, d_out):
  q, k, v, masks, out, lse = residuals
  dq, dk, dv = _backward(cfg, q, k, v, masks, out, lse, d_out)
  return dq, dk, dv, None  # integer masks have no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad_axis(x, axis, length):
  if x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)


def _check_block(name, block):
  if isinstance(block, bool) or not isinstance(block, int) or block < 1:
    raise ValueError(f'{name} must be a positive int, got {block!r}.')


def chunked_attention(
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
  block_q: int = DEFAULT_BLOCK_Q,
  block_kv: int = DEFAULT_BLOCK_KV,
) -> Array:
  """Memory-efficient attention; same arguments and results as `reference.mha_reference`.

  Args:
    query: [batch, q_len, num_heads, head_dim].
    key, value: [batch, kv_len, num_kv_heads, head_dim], num_heads a multiple of num_kv_heads (GQA/MQA).
    scale: logit scale, default 1 / sqrt(head_dim).
    is_causal: top-left aligned causal mask (key position <= query position), as jax.nn.
    query_seq_lengths, key_value_seq_lengths: [batch] ints or None.
    local_window_size: int or (left, right): query i sees keys in [i - left, i + right].
    segment_ids: [batch, seq] ints (q_len == kv_len) or a (query_ids, key_value_ids) pair.
    block_q, block_kv: the largest query / key-value block; the actual blocks are balanced so that the
      padding is minimal. Peak memory grows with batch * num_heads * block_q * block_kv.

  Returns:
    [batch, q_len, num_heads, head_dim] in query.dtype; fully masked query rows are 0.
  """
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
  return chunked_attention_from_spec(query, key, value, scale, spec, block_q=block_q, block_kv=block_kv)


def chunked_attention_from_spec(
  query,
  key,
  value,
  scale: float,
  spec: reference.MaskSpec,
  *,
  block_q: int = DEFAULT_BLOCK_Q,
  block_kv: int = DEFAULT_BLOCK_KV,
) -> Array:
  """`chunked_attention` on validated inputs: the entry `dot_product_attention` calls.

  scale, spec: what `reference.check_inputs` returned for query, key and value. Only block_q and block_kv
  are checked here, so a call through the op validates its arguments once.
  """
  _check_block('block_q', block_q)
  _check_block('block_kv', block_kv)
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  group = num_heads // kv_heads
  bq, nq = _balanced_block(q_len, block_q)
  bk, nk = _balanced_block(kv_len, block_kv)
  cfg = _Config(
    scale=scale,
    batch=batch,
    is_causal=spec.is_causal,
    local_window=spec.local_window,
    q_len=q_len,
    kv_len=kv_len,
    block_q=bq,
    block_kv=bk,
    num_q_blocks=nq,
    num_kv_blocks=nk,
    acc_dtype='float64' if query.dtype == jnp.float64 else 'float32',
  )
  q_seg, kv_seg = spec.q_segment_ids, spec.kv_segment_ids
  if q_seg is not None:  # padded so that `visible` never indexes out of range; padding is masked anyway
    q_seg, kv_seg = _pad_axis(q_seg, 1, bq * nq), _pad_axis(kv_seg, 1, bk * nk)
  masks = (spec.query_seq_lengths, spec.key_value_seq_lengths, q_seg, kv_seg)

  # [B, T, H, D] -> [B, K, G, Tp, D]: query head h = kv_head * group + g uses key/value head kv_head.
  q = _pad_axis(query, 1, bq * nq).reshape(batch, bq * nq, kv_heads, group, head_dim)
  q = q.transpose(0, 2, 3, 1, 4)
  k = _pad_axis(key, 1, bk * nk).transpose(0, 2, 1, 3)  # [B, K, Sp, D]
  v = _pad_axis(value, 1, bk * nk).transpose(0, 2, 1, 3)
  out = _attention(cfg, q, k, v, masks)
  out = out.transpose(0, 3, 1, 2, 4).reshape(batch, bq * nq, num_heads, head_dim)
  return out[:, :q_len]
