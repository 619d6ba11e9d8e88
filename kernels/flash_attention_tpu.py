"""Flash attention on TPU: a Pallas Mosaic TPU kernel, forward and backward (FlashAttention-2).

Anatomy of JAX's own `pallas/ops/tpu/flash_attention.py`, top to bottom: block sizes, the mask and the
block ranges (shared by all three kernels), the forward kernel, the two backward kernels, the
`jax.custom_vjp` that ties them together, and the public `flash_attention_tpu`. The reference it must agree
with is `reference.mha_reference`; the mask is `reference.visible`, evaluated here on one
[block_q, block_kv] tile of positions, never on an N x N array.

- Forward: grid (batch, heads, q blocks, kv blocks); online softmax over kv blocks with the running max,
  the running sum and the output accumulator in fp32 VMEM scratch; writes O and the log-sum-exp.
- Backward, deterministic and atomic-free: a dK/dV kernel, grid (batch, kv heads, kv blocks, group, q blocks),
  that sums over the q blocks *and* over the group of query heads sharing each kv head (GQA/MQA) in a
  fixed order in VMEM; and a dQ kernel, grid (batch, heads, q blocks, kv blocks). D = rowsum(dO * O) is
  computed once in the wrapper.
- Sequence lengths live in SMEM (scalar prefetch). They, the causal flag and the local window give each
  query block a range [first, last] of kv blocks that can hold a visible key (and each kv block a range of
  q blocks); outside it the kernels skip the work and the index_maps clamp the block index into the range,
  so a skipped step re-uses the block already in VMEM and issues no copy.
- The wrapper pads sequences to block multiples (padded positions are hidden by the lengths) and head_dim
  to a multiple of 128 lanes (zero columns change nothing), so no block is ever partial. fp16 inputs are
  computed in fp32 (Mosaic has no fp16 matmul on most TPU generations); bf16 stays bf16 in the matmuls
  with fp32 accumulation; fp32 matmuls use Precision.HIGHEST.
- A query row that sees no key returns 0 and gets 0 gradient: the running max stays -inf, the sum 0,
  and every exp() sits behind a `jnp.where`, so nothing is NaN.

On CPU, `interpret=True` runs the same kernels in Pallas TPU interpret mode
(`pl.pallas_call(..., interpret=pltpu.InterpretParams())`), which simulates VMEM/SMEM and the DMAs and
fills uninitialised buffers with NaN, so an output element that a kernel forgets to write shows up as NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lstm_attn.kernels import reference

NUM_LANES = 128
NUM_SUBLANES = 8
_NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the three kernels. Query blocks are multiples of 8 (sublanes), kv blocks of 128 (lanes).

  They change speed and VMEM use, not results. `get_default` shrinks the query blocks for short queries.
  """

  block_q: int = 128
  block_kv: int = 128
  block_q_dkv: int = 128
  block_kv_dkv: int = 128
  block_q_dq: int = 128
  block_kv_dq: int = 128

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      multiple = NUM_LANES if field.name.startswith('block_kv') else NUM_SUBLANES
      what = (
        'kv blocks are the lane dimension of the logits'
        if multiple == NUM_LANES
        else ('query blocks are the sublane dimension')
      )
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % multiple:
        raise ValueError(
          f'BlockSizes.{field.name} must be a positive multiple of {multiple} on TPU ({what}), got {value!r}.'
        )

  @classmethod
  def get_default(cls, q_len: int) -> BlockSizes:
    """128 x 128 tiles (as JAX's TPU flash attention), query blocks shrunk to fit short queries (kv
    blocks cannot go below one 128-lane tile)."""
    block_q = min(128, _round_up(max(q_len, 1), NUM_SUBLANES))
    return cls(block_q=block_q, block_q_dkv=block_q, block_q_dq=block_q)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call; hashable, so it is a jit static argument."""

  scale: float
  is_causal: bool
  window: tuple[int, int] | None
  groups: int  # query heads per kv head
  has_segments: bool
  precision: lax.Precision | None
  block_sizes: BlockSizes
  interpret: object  # False or a pltpu.InterpretParams


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _tile(x, width):
  """[rows, 128] lane-broadcast column -> [rows, width] (width a multiple of 128)."""
  return jnp.tile(x, (1, width // NUM_LANES))


def _div(x, n: int):
  """x // n for non-negative int32 scalars (lax.div truncates, which equals floor division here)."""
  return lax.div(x, jnp.int32(n))


# ----------------------------------------------------------------------------------------------------------
# Which positions and which blocks are visible.


def _block_mask(cfg, b, q_lens_ref, kv_lens_ref, q_start, kv_start, bq, bk, q_seg_ref, kv_seg_ref):
  """reference.visible on the [bq, bk] tile at (q_start, kv_start), plus the segment ids of the tile."""
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  spec = reference.MaskSpec(
    is_causal=cfg.is_causal,
    local_window=cfg.window,
    query_seq_lengths=q_lens_ref,
    key_value_seq_lengths=kv_lens_ref,
  )
  ok = reference.visible(spec, b, q_pos, kv_pos)  # lengths are SMEM refs, indexed by the batch scalar
  if q_seg_ref is not None:
    q_ids = _tile(q_seg_ref[0], bk)  # [bq, bk]
    kv_ids = kv_seg_ref[0, :1, :]  # [1, bk]
    ok = ok & (q_ids == kv_ids)
  return ok


def _kv_block_range(cfg, q_start, q_len, kv_len, bq, bk):
  """[first, last] kv blocks that may hold a key visible from query rows [q_start, q_start + bq).

  Scalar int32 arithmetic, used both by the index_maps and by the kernels; last < first when none.
  """
  q_last = jnp.minimum(q_start + bq - 1, q_len - 1)  # rows at or past the length see nothing
  lo, hi = jnp.int32(0), kv_len - 1
  if cfg.is_causal:
    hi = jnp.minimum(hi, q_last)
  if cfg.window is not None:
    left, right = cfg.window
    lo = jnp.maximum(lo, q_start - left)
    hi = jnp.minimum(hi, q_last + right)
  empty = (q_last < q_start) | (hi < lo)
  return _div(lo, bk), jnp.where(empty, -1, _div(jnp.maximum(hi, 0), bk))


def _q_block_range(cfg, kv_start, q_len, kv_len, bq, bk):
  """[first, last] query blocks that may see a key of [kv_start, kv_start + bk); last < first when none."""
  kv_last = jnp.minimum(kv_start + bk - 1, kv_len - 1)
  lo, hi = jnp.int32(0), q_len - 1
  if cfg.is_causal:
    lo = jnp.maximum(lo, kv_start)
  if cfg.window is not None:
    left, right = cfg.window
    lo = jnp.maximum(lo, kv_start - right)
    hi = jnp.minimum(hi, kv_last + left)
  empty = (kv_last < kv_start) | (hi < lo)
  return _div(lo, bq), jnp.where(empty, -1, _div(jnp.maximum(hi, 0), bq))


def _clamp_block(j, first, last, num_blocks):
  """The block to have in VMEM at step j: j inside [first, last], else the nearest end (no new copy)."""
  lo = jnp.minimum(first, num_blocks - 1)
  hi = jnp.maximum(jnp.minimum(last, num_blocks - 1), lo)
  return jnp.minimum(jnp.maximum(j, lo), hi)


def _dot(a, b, cfg, dims=None):
  if dims is None:
    dims = (((1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=cfg.precision, preferred_element_type=jnp.float32)


def _split_segments(cfg, refs):
  if cfg.has_segments:
    return refs[0], refs[1], refs[2:]
  return None, None, refs


# ----------------------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(q_lens_ref, kv_lens_ref, q_ref, k_ref, v_ref, *refs, cfg, with_lse):
  q_seg_ref, kv_seg_ref, refs = _split_segments(cfg, refs)
  o_ref, *lse_ref, m_scr, l_scr, acc_scr = refs  # lse_ref: [] when only the output is wanted
  bq, bk, width = q_ref.shape[2], k_ref.shape[2], q_ref.shape[3]
  b, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  first, last = _kv_block_range(cfg, qi * bq, q_lens_ref[b], kv_lens_ref[b], bq, bk)

  @pl.when((kj >= first) & (kj <= last))
  def _step():
    q, k, v = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0]  # [bq, width], [bk, width], [bk, width]
    s = _dot(q, k, cfg, _NT_DIMS) * cfg.scale  # [bq, bk] fp32
    ok = _block_mask(cfg, b, q_lens_ref, kv_lens_ref, qi * bq, kj * bk, bq, bk, q_seg_ref, kv_seg_ref)
    s = jnp.where(ok, s, -jnp.inf)
    m_prev, l_prev = m_scr[...], l_scr[...]  # [bq, 128] each, lane-broadcast
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # rows that have seen nothing yet
    p = jnp.exp(s - _tile(m_safe, bk))  # [bq, bk]; exactly 0 where masked (s = -inf, m_safe finite)
    alpha = jnp.exp(m_prev - m_safe)  # 0 while the row was empty
    l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_next
    acc_scr[...] = acc_scr[...] * _tile(alpha, width) + _dot(p.astype(v.dtype), v, cfg)

  @pl.when(kj == pl.num_programs(3) - 1)
  def _finish():
    l_sum, m = l_scr[...], m_scr[...]
    # l == 0 exactly only for a row that saw no key (a visible finite logit adds exp(0) = 1). `!= 0`,
    # not `> 0`: a NaN sum (NaN in the query or a visible key) must come out NaN, not as a masked row.
    seen = l_sum != 0.0
    l_safe = jnp.where(seen, l_sum, 1.0)
    inv = jnp.where(seen, 1.0 / l_safe, 0.0)  # a row that saw no key outputs 0
    o_ref[0, 0] = (acc_scr[...] * _tile(inv, width)).astype(o_ref.dtype)
    if with_lse:
      # Empty rows: any finite value (the backward pass zeroes them by the mask); not -inf, which as a
      # residual leaving the jitted forward trips jax.debug_infs.
      lse_ref[0][0, 0] = jnp.where(seen, m + jnp.log(l_safe), 0.0)


def _segment_specs(cfg, q_block, kv_block):
  """BlockSpecs of the lane/sublane-broadcast segment ids, given (grid..., refs) -> block index maps."""
  if not cfg.has_segments:
    return []
  bq, q_index = q_block
  bk, kv_index = kv_block
  return [
    pl.BlockSpec((1, bq, NUM_LANES), lambda *a: (a[0], q_index(*a), 0)),
    pl.BlockSpec((1, NUM_SUBLANES, bk), lambda *a: (a[0], 0, kv_index(*a))),
  ]


def _pallas(kernel, cfg, grid, in_specs, out_specs, out_shape, scratch, semantics, cost, args):
  interpret = pltpu.InterpretParams() if cfg.interpret is True else cfg.interpret
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch
    ),
    out_shape=out_shape,
    compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
    interpret=interpret,
    cost_estimate=cost,
  )(*args)


def _forward(q, k, v, q_lens, kv_lens, segs, cfg, with_lse):
  """q [B, H, Tp, Dp], k/v [B, K, Sp, Dp] -> (o [B, H, Tp, Dp], lse [B, H, Tp, 128] fp32 or None).

  The LSE is written only for the backward pass (with_lse): lane-broadcast to 128 lanes it is 4 * 128 /
  (2 * head_dim) times the size of a bf16 output (2x at head_dim 128), temporary HBM that a forward-only
  call (inference, evaluation) would allocate and write for nothing.
  """
  batch, heads, t_pad, width = q.shape
  s_pad = k.shape[2]
  bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_kv
  nk = s_pad // bk

  def kv_index(b, h, qi, kj, q_lens_ref, kv_lens_ref):
    first, last = _kv_block_range(cfg, qi * bq, q_lens_ref[b], kv_lens_ref[b], bq, bk)
    return _clamp_block(kj, first, last, nk)

  q_map = lambda b, h, qi, kj, *_: (b, h, qi, 0)
  kv_map = lambda b, h, qi, kj, *r: (b, h // cfg.groups, kv_index(b, h, qi, kj, *r), 0)
  in_specs = [
    pl.BlockSpec((1, 1, bq, width), q_map),
    pl.BlockSpec((1, 1, bk, width), kv_map),
    pl.BlockSpec((1, 1, bk, width), kv_map),
    *_segment_specs(cfg, (bq, lambda b, h, qi, kj, *_: qi), (bk, kv_index)),
  ]
  out_specs = [pl.BlockSpec((1, 1, bq, width), q_map)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if with_lse:
    out_specs.append(pl.BlockSpec((1, 1, bq, NUM_LANES), q_map))
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, t_pad, NUM_LANES), jnp.float32))
  scratch = [
    pltpu.VMEM((bq, NUM_LANES), jnp.float32),
    pltpu.VMEM((bq, NUM_LANES), jnp.float32),
    pltpu.VMEM((bq, width), jnp.float32),
  ]
  cost = pl.CostEstimate(
    flops=4 * batch * heads * t_pad * s_pad * width,
    transcendentals=batch * heads * t_pad * s_pad,
    bytes_accessed=2 * q.nbytes + k.nbytes + v.nbytes,
  )
  with jax.named_scope(f'flash_tpu_fwd_bq{bq}_bk{bk}'):
    out = _pallas(
      functools.partial(_fwd_kernel, cfg=cfg, with_lse=with_lse),
      cfg,
      (batch, heads, t_pad // bq, nk),
      in_specs,
      out_specs,
      out_shape,
      scratch,
      ('parallel', 'parallel', 'parallel', 'arbitrary'),
      cost,
      (q_lens, kv_lens, q, k, v, *segs),
    )
  return out[0], (out[1] if with_lse else None)


# ----------------------------------------------------------------------------------------------------------
# Backward: dK/dV (summed over q blocks and over the query heads of each group), then dQ.


def _probs_and_dlogits(cfg, b, q_lens_ref, kv_lens_ref, q_start, kv_start, q, k, v, do, lse, dd, segs):
  """Recomputes P = exp(S - lse) (0 where hidden) and dS = P * (dO V^T - D) * scale on one tile."""
  bq, bk = q.shape[0], k.shape[0]
  s = _dot(q, k, cfg, _NT_DIMS) * cfg.scale  # [bq, bk]
  ok = _block_mask(cfg, b, q_lens_ref, kv_lens_ref, q_start, kv_start, bq, bk, *segs)
  p = jnp.where(ok, jnp.exp(s - _tile(lse, bk)), 0.0)  # empty rows: ok is all False
  dp = _dot(do, v, cfg, _NT_DIMS)  # [bq, bk]
  ds = p * (dp - _tile(dd, bk)) * cfg.scale
  return p, ds


def _dkv_kernel(q_lens_ref, kv_lens_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, *refs, cfg):
  q_seg_ref, kv_seg_ref, (dk_ref, dv_ref, dk_scr, dv_scr) = _split_segments(cfg, refs)
  bq, bk = q_ref.shape[2], k_ref.shape[2]
  b, kj, g, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((g == 0) & (qi == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  first, last = _q_block_range(cfg, kj * bk, q_lens_ref[b], kv_lens_ref[b], bq, bk)

  @pl.when((qi >= first) & (qi <= last))
  def _step():
    q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
    p, ds = _probs_and_dlogits(
      cfg,
      b,
      q_lens_ref,
      kv_lens_ref,
      qi * bq,
      kj * bk,
      q,
      k,
      v,
      do,
      lse_ref[0, 0],
      d_ref[0, 0],
      (q_seg_ref, kv_seg_ref),
    )
    dv_scr[...] += _dot(p.T.astype(do.dtype), do, cfg)  # [bk, width]
    dk_scr[...] += _dot(ds.T.astype(q.dtype), q, cfg)

  @pl.when((g == pl.num_programs(3) - 1) & (qi == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[0, 0] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[0, 0] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(q_lens_ref, kv_lens_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, *refs, cfg):
  q_seg_ref, kv_seg_ref, (dq_ref, dq_scr) = _split_segments(cfg, refs)
  bq, bk = q_ref.shape[2], k_ref.shape[2]
  b, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  first, last = _kv_block_range(cfg, qi * bq, q_lens_ref[b], kv_lens_ref[b], bq, bk)

  @pl.when((kj >= first) & (kj <= last))
  def _step():
    q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
    _, ds = _probs_and_dlogits(
      cfg,
      b,
      q_lens_ref,
      kv_lens_ref,
      qi * bq,
      kj * bk,
      q,
      k,
      v,
      do,
      lse_ref[0, 0],
      d_ref[0, 0],
      (q_seg_ref, kv_seg_ref),
    )
    dq_scr[...] += _dot(ds.astype(k.dtype), k, cfg)  # [bq, width]

  @pl.when(kj == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[0, 0] = dq_scr[...].astype(dq_ref.dtype)


def _backward(q, k, v, q_lens, kv_lens, segs, o, lse, do, cfg):
  batch, heads, t_pad, width = q.shape
  kv_heads, s_pad = k.shape[1], k.shape[2]
  groups = cfg.groups
  lse = jnp.broadcast_to(lse[..., None], (*lse.shape, NUM_LANES))  # [B, H, Tp, 128]
  dd = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # D = rowsum(dO * O), [B, H, Tp]
  dd = jnp.broadcast_to(dd[..., None], (*dd.shape, NUM_LANES))
  args = (q_lens, kv_lens, q, k, v, do, lse, dd, *segs)
  cost = pl.CostEstimate(
    flops=10 * batch * heads * t_pad * s_pad * width,
    transcendentals=2 * batch * heads * t_pad * s_pad,
    bytes_accessed=3 * (q.nbytes + k.nbytes + v.nbytes + do.nbytes),
  )

  # dK/dV: grid (b, kv head, kv block, group member, q block); the last two are the reduction.
  bq, bk = cfg.block_sizes.block_q_dkv, cfg.block_sizes.block_kv_dkv
  nq = t_pad // bq

  def q_index(b, kh, kj, g, qi, q_lens_ref, kv_lens_ref):
    first, last = _q_block_range(cfg, kj * bk, q_lens_ref[b], kv_lens_ref[b], bq, bk)
    return _clamp_block(qi, first, last, nq)

  row_map = lambda b, kh, kj, g, qi, *r: (b, kh * groups + g, q_index(b, kh, kj, g, qi, *r), 0)
  kv_map = lambda b, kh, kj, g, qi, *_: (b, kh, kj, 0)
  in_specs = [
    pl.BlockSpec((1, 1, bq, width), row_map),
    pl.BlockSpec((1, 1, bk, width), kv_map),
    pl.BlockSpec((1, 1, bk, width), kv_map),
    pl.BlockSpec((1, 1, bq, width), row_map),
    pl.BlockSpec((1, 1, bq, NUM_LANES), row_map),
    pl.BlockSpec((1, 1, bq, NUM_LANES), row_map),
    *_segment_specs(cfg, (bq, q_index), (bk, lambda b, kh, kj, *_: kj)),
  ]
  with jax.named_scope(f'flash_tpu_bwd_dkv_bq{bq}_bk{bk}'):
    dk, dv = _pallas(
      functools.partial(_dkv_kernel, cfg=cfg),
      cfg,
      (batch, kv_heads, s_pad // bk, groups, nq),
      in_specs,
      [pl.BlockSpec((1, 1, bk, width), kv_map)] * 2,
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      [pltpu.VMEM((bk, width), jnp.float32), pltpu.VMEM((bk, width), jnp.float32)],
      ('parallel', 'parallel', 'parallel', 'arbitrary', 'arbitrary'),
      cost,
      args,
    )

  # dQ: grid (b, head, q block, kv block); the last is the reduction.
  bq, bk = cfg.block_sizes.block_q_dq, cfg.block_sizes.block_kv_dq
  nk = s_pad // bk

  def kv_index(b, h, qi, kj, q_lens_ref, kv_lens_ref):
    first, last = _kv_block_range(cfg, qi * bq, q_lens_ref[b], kv_lens_ref[b], bq, bk)
    return _clamp_block(kj, first, last, nk)

  row_map = lambda b, h, qi, kj, *_: (b, h, qi, 0)
  kv_map = lambda b, h, qi, kj, *r: (b, h // groups, kv_index(b, h, qi, kj, *r), 0)
  in_specs = [
    pl.BlockSpec((1, 1, bq, width), row_map),
    pl.BlockSpec((1, 1, bk, width), kv_map),
    pl.BlockSpec((1, 1, bk, width), kv_map),
    pl.BlockSpec((1, 1, bq, width), row_map),
    pl.BlockSpec((1, 1, bq, NUM_LANES), row_map),
    pl.BlockSpec((1, 1, bq, NUM_LANES), row_map),
    *_segment_specs(cfg, (bq, lambda b, h, qi, kj, *_: qi), (bk, kv_index)),
  ]
  with jax.named_scope(f'flash_tpu_bwd_dq_bq{bq}_bk{bk}'):
    dq = _pallas(
      functools.partial(_dq_kernel, cfg=cfg),
      cfg,
      (batch, heads, t_pad // bq, nk),
      in_specs,
      pl.BlockSpec((1, 1, bq, width), row_map),
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      [pltpu.VMEM((bq, width), jnp.float32)],
      ('parallel', 'parallel', 'parallel', 'arbitrary'),
      cost,
      args,
    )
  return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# custom_vjp over the padded [B, H, T, D] arrays; the wrapper's transposes and pads are differentiated by JAX.


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_lens, kv_lens, segs, cfg):
  return _forward(q, k, v, q_lens, kv_lens, segs, cfg, with_lse=False)[0]


def _flash_fwd(q, k, v, q_lens, kv_lens, segs, cfg):
  o, lse = _forward(q, k, v, q_lens, kv_lens, segs, cfg, with_lse=True)
  return o, (q, k, v, q_lens, kv_lens, segs, o, lse[..., 0])  # lse kept as [B, H, Tp], not 128 lanes


def _flash_bwd(cfg, residuals, do):
  q, k, v, q_lens, kv_lens, segs, o, lse = residuals
  dq, dk, dv = _backward(q, k, v, q_lens, kv_lens, segs, o, lse, do, cfg)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=('cfg',))
def _attention(query, key, value, q_lens, kv_lens, q_seg, kv_seg, cfg):
  """[B, T, N, D] in and out; pads and transposes to the kernels' [B, N, T_pad, D_pad]."""
  batch, q_len, _, head_dim = query.shape
  kv_len = key.shape[1]
  bs = cfg.block_sizes
  t_pad = _round_up(q_len, math.lcm(bs.block_q, bs.block_q_dkv, bs.block_q_dq))
  s_pad = _round_up(kv_len, math.lcm(bs.block_kv, bs.block_kv_dkv, bs.block_kv_dq))
  width = _round_up(head_dim, NUM_LANES)
  compute_dtype = jnp.float32 if query.dtype == jnp.float16 else query.dtype

  def to_kernel_layout(x, seq_pad):  # [B, T, N, D] -> [B, N, T_pad, D_pad]
    x = x.astype(compute_dtype).transpose(0, 2, 1, 3)
    return jnp.pad(x, ((0, 0), (0, 0), (0, seq_pad - x.shape[2]), (0, width - head_dim)))

  q = to_kernel_layout(query, t_pad)
  k, v = to_kernel_layout(key, s_pad), to_kernel_layout(value, s_pad)
  segs = ()
  if cfg.has_segments:  # padded positions get id 0; the lengths hide them anyway
    q_seg = jnp.pad(q_seg, ((0, 0), (0, t_pad - q_len)))
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, s_pad - kv_len)))
    segs = (
      jnp.broadcast_to(q_seg[:, :, None], (batch, t_pad, NUM_LANES)),  # [B, Tp, 128]
      jnp.broadcast_to(kv_seg[:, None, :], (batch, NUM_SUBLANES, s_pad)),
    )  # [B, 8, Sp]
  out = _flash(q, k, v, q_lens, kv_lens, segs, cfg)  # [B, N, Tp, Dp]
  return out[:, :, :q_len, :head_dim].transpose(0, 2, 1, 3).astype(query.dtype)


def flash_attention_tpu(
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
  block_sizes=None,
  interpret=False,
):
  """Flash attention with the Pallas Mosaic TPU kernels; differentiable (custom VJP, Pallas backward).

  Args:
    query: [batch, q_len, num_heads, head_dim], float32/bfloat16/float16 (float16 computed in float32).
    key, value: [batch, kv_len, num_kv_heads, head_dim]; num_heads % num_kv_heads == 0 (GQA/MQA).
    scale: logit scale; default 1 / sqrt(head_dim).
    is_causal: key position <= query position, top-left aligned (as jax.nn.dot_product_attention).
    query_seq_lengths, key_value_seq_lengths: [batch] ints; positions at or past them are hidden.
    local_window_size: int or (left, right): query i sees keys in [i - left, i + right].
    segment_ids: [batch, seq] ints (q_len == kv_len) or a (query_ids, key_value_ids) pair.
    block_sizes: BlockSizes, or None for BlockSizes.get_default(q_len).
    interpret: False (compile for TPU), True (Pallas TPU interpret mode, runs on CPU), or a
      pltpu.InterpretParams.

  Returns:
    [batch, q_len, num_heads, head_dim] in query.dtype; rows that see no key are 0 (and get 0 gradient).
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
  return flash_attention_tpu_from_spec(
    query, key, value, scale, spec, block_sizes=block_sizes, interpret=interpret
  )


def flash_attention_tpu_from_spec(
  query, key, value, scale: float, spec: reference.MaskSpec, *, block_sizes=None, interpret=False
):
  """`flash_attention_tpu` on validated inputs: the entry `flash_attention` dispatches to.

  scale, spec: what `reference.check_inputs` returned for query, key and value. Only the kernel's own
  limits and options (float64, block_sizes, interpret) are checked here.
  """
  if query.dtype == jnp.float64:
    raise ValueError(
      'query/key/value are float64, which the TPU kernel does not support; pass float32, '
      'bfloat16 or float16 (or use reference.mha_reference for float64).'
    )
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(q_len)
  elif not isinstance(block_sizes, BlockSizes):
    raise ValueError(f'block_sizes must be a flash_attention_tpu.BlockSizes or None, got {block_sizes!r}.')
  if not (isinstance(interpret, bool) or isinstance(interpret, pltpu.InterpretParams)):
    raise ValueError(f'interpret must be a bool or a pltpu.InterpretParams, got {interpret!r}.')
  if 0 in (batch, num_heads):  # nothing to attend to: zeros, and zero gradients
    return jnp.zeros_like(query)

  cfg = _Config(
    scale=scale,
    is_causal=spec.is_causal,
    window=spec.local_window,  # clipped to the sequence span by check_inputs (int32-safe)
    groups=num_heads // num_kv_heads,
    has_segments=spec.q_segment_ids is not None,
    precision=lax.Precision.HIGHEST if query.dtype in (jnp.float32, jnp.float16) else None,
    block_sizes=block_sizes,
    interpret=interpret,
  )
  return _attention(
    query,
    key,
    value,
    reference.lengths_or_full(spec.query_seq_lengths, q_len, batch),
    reference.lengths_or_full(spec.key_value_seq_lengths, kv_len, batch),
    spec.q_segment_ids,
    spec.kv_segment_ids,
    cfg=cfg,
  )
