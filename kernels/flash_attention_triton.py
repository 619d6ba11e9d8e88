"""Fused (flash) attention for GPUs with the Pallas Triton backend: forward, dK/dV and dQ kernels.

FlashAttention-2 (Dao, 2023, arXiv:2307.08691): each program owns a block of query rows and walks the
key/value blocks with an online softmax in float32; the forward pass saves the log-sum-exp (LSE) per row,
and the backward pass recomputes the probabilities from it in two deterministic kernels (no atomics):

  * dK/dV: one program per key/value block walks the query blocks of every query head of its GQA group
    (so the sum over the group is a plain loop, in a fixed order);
  * dQ: one program per query block walks the key/value blocks;
  * D = rowsum(dO * O) is precomputed (by XLA; it is one fused elementwise-and-reduce pass).

Masks never exist as N x N arrays: each block evaluates `reference.visible` (the one mask predicate of
this project) on its positions. Blocks that no row can see are skipped by loop bounds (causal, local
window, per-batch key/value length, per-batch query length), blocks that every row sees fully are run
without the mask, and only the boundary blocks pay for it. Rows that see nothing output 0 and get zero
gradient: their LSE is stored as the largest finite float32, so exp2(s - lse) is exactly 0 in the backward
pass.

Layout [batch, seq, heads, head_dim]. Sequence lengths that are not block multiples are padded here (the
Triton lowering does not bound-check loads) and the padding is masked as keys past the length; head_dim
is padded inside the kernel to a power of two >= 16 by masked loads (Triton's tensors are powers of two).

Anatomy as in jax/experimental/pallas/ops/gpu/attention.py: block sizes, kernels, the custom_vjp'd
function, its forward and backward rules. The plain reference is `kernels/reference.py`. Unlike that
kernel, this one handles GQA/MQA, any length, ragged lengths, local windows and fully masked rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lstm_attn.kernels import reference

with warnings.catch_warnings():
  # JAX 0.11 deprecates the Triton backend in favour of Mosaic GPU; the API we use is unchanged there.
  warnings.simplefilter('ignore', DeprecationWarning)
  from jax.experimental.pallas import triton as plgpu

# Renamed from TritonCompilerParams in JAX 0.7; keep the old name as a fallback.
_CompilerParams = getattr(plgpu, 'CompilerParams', None) or plgpu.TritonCompilerParams

Array = jax.Array

_LOG2_E = math.log2(math.e)
_MIN_BLOCK = 16  # tl.dot needs every dimension >= 16.
MAX_HEAD_DIM = 256
# Compiled float32 (TF32x3) tiles at head_dim 256 exceed Hopper's shared memory even at 1 stage (the report).
_MAX_FLOAT32_HEAD_DIM = 128
_EMPTY_ROW_LSE = float(jnp.finfo(jnp.float32).max)  # the LSE of a row that saw no key


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and Triton launch parameters. All block sizes are powers of two >= 16.

  Forward: a program owns `block_q` query rows and steps over keys `block_k` at a time. dK/dV: a program
  owns `block_k_dkv` keys and steps over queries `block_q_dkv` at a time. dQ: a program owns `block_q_dq`
  query rows and steps over keys `block_k_dq` at a time. Blocks larger than the (padded) sequence shrink
  to it. `get_default` picks sizes for H100/H200 from the deviceless compile report (see the notes there).
  """

  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 32
  block_k_dkv: int = 128
  block_q_dq: int = 128
  block_k_dq: int = 32
  num_warps: int = 8
  num_stages: int = 5  # the class defaults are get_default(128, bfloat16)
  num_warps_bwd: int = 8
  num_stages_bwd: int = 3

  @classmethod
  def get_default(cls, head_dim: int = 128, dtype=jnp.bfloat16) -> BlockSizes:
    """Defaults for Hopper (H100/H200: 227 KB shared memory per block, 64K registers per SM), chosen from
    the deviceless sm_90a compile (`experiments/kernel_report.py`; table and reasons in BUILD_NOTES.md,
    "Block sizes"). Every bf16/fp16 default compiles with 0 spill bytes, no serialised wgmma and no
    mma.sync over the whole compile sweep (tests/test_compile_gpu.py asserts it at head dims 64, 128 and
    256). float32 (TF32x3) compiles clean at head dim 64 and spills up to 4.5 KB at 128.

    bf16/fp16, head_dim <= 64: 128 x 64 forward tiles on 4 warps (one warpgroup: the 128 x 64 fp32
    accumulator is 64 registers a thread), 5 K/V pipeline stages: 96 KB, so two CTAs still share an SM
    (2 x 96 KB <= 228 KB); 6 or more would leave one 4-warp CTA per SM. Backward on 8 warps: with 4, the
    dK/dV kernel's two 128 x 64 fp32 accumulators sat at the 255-register cap and spilled in the
    causal+GQA+ragged case; with 8 it needs 186/204/220 registers at 3/4/5 stages: 4 stages (66 KB)
    leaves ~50 registers of margin for the mask-heavy cases.
    bf16/fp16, head_dim 128: the same tiles on 8 warps, 5 forward stages (192 KB of the 227 KB; 6 fit,
    226 KB with segment ids, but put the segment-id forward at 254 of 255 registers) and 3 backward
    stages (4 put dK/dV at 252 of 255 registers).
    head_dim 256 or float32: 64 x 32 tiles on 8 warps (with 4 the forward spilled 104-128 B at head_dim
    256), 3 forward and 2 backward stages (1 backward stage spilled 400-900 B at head_dim 256: Triton's
    single-stage schedule keeps more live values). float32 multiplies as TF32x3 (see `_dot`).
    Not yet timed on a GPU: `experiments/gpu_check.py` is the one command that would.
    """
    wide = jnp.dtype(dtype).itemsize >= 4
    if head_dim <= 64 and not wide:
      return cls(num_warps=4, num_stages=5, num_warps_bwd=8, num_stages_bwd=4)
    if head_dim <= 128 and not wide:
      return cls(num_warps=8, num_stages=5, num_warps_bwd=8, num_stages_bwd=3)
    return cls(
      block_q=64,
      block_k=32,
      block_q_dkv=16,
      block_k_dkv=64,
      block_q_dq=64,
      block_k_dq=16,
      num_warps=8,  # 4 warps: the 64 x 256 fp32 accumulator alone is 128 regs/thread; spilled 104-128 B
      num_stages=3,
      num_warps_bwd=8,  # two 64 x 256 fp32 accumulators: 128 regs/thread over 256 threads
      num_stages_bwd=2,
    )

  def validate(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'block_sizes.{field.name} must be a positive int, got {value!r}.')
      if field.name.startswith('block_') and (value < _MIN_BLOCK or value & (value - 1)):
        raise ValueError(
          f'block_sizes.{field.name} must be a power of two >= {_MIN_BLOCK} (Triton tiles), got {value}.'
        )
    if self.num_warps & (self.num_warps - 1) or self.num_warps_bwd & (self.num_warps_bwd - 1):
      raise ValueError(
        f'block_sizes.num_warps/num_warps_bwd must be powers of two, got {self.num_warps}, '
        f'{self.num_warps_bwd}.'
      )


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call (hashable: it is a jit static argument)."""

  scale: float
  is_causal: bool
  window: tuple[int, int] | None
  has_segments: bool
  mask_kv_len: bool  # key/value lengths given, or keys padded to a block multiple
  head_dim: int
  blocks: BlockSizes
  interpret: bool
  debug: bool = False

  @property
  def needs_mask(self) -> bool:
    return self.is_causal or self.window is not None or self.has_segments or self.mask_kv_len

  @property
  def head_dim_padded(self) -> int:
    return max(_MIN_BLOCK, _next_pow2(self.head_dim))


class _Same:
  """Indexes to the same value: lets `reference.visible` read per-block values inside a kernel.

  `visible` looks lengths up as `lengths[batch_index]` and segment ids as `ids[batch_index][pos]`; in a
  kernel the lengths are already this batch row's scalar and the ids already this block's vector, shaped
  to broadcast like the positions they stand for.
  """

  def __init__(self, value):
    self.value = value

  def __getitem__(self, _):
    return self.value


def _block_spec(cfg: _Config, q_len_b, kv_len_b, q_seg=None, kv_seg=None) -> reference.MaskSpec:
  """The MaskSpec of one (batch row, block) pair; q_seg and kv_seg are block ids shaped like q_pos, kv_pos."""
  return reference.MaskSpec(
    is_causal=cfg.is_causal,
    local_window=cfg.window,
    query_seq_lengths=_Same(q_len_b),
    key_value_seq_lengths=_Same(kv_len_b),
    q_segment_ids=None if q_seg is None else _Same(_Same(q_seg)),
    kv_segment_ids=None if kv_seg is None else _Same(_Same(kv_seg)),
  )


def _dot(a, b, cfg, *, trans_a=False, trans_b=False):
  """a @ b with optional transposes, accumulated in float32 (tl.dot).

  float32 operands: Pallas-Triton lowers the default precision to TF32 (a 10-bit mantissa), which would
  make float32 inputs no more accurate than bf16 on a GPU and fail the 1e-5 float32 tolerance the compiled
  tests hold the kernel to. Compiled, they use TF32x3 (three TF32 products per element on the tensor
  cores, ~float32 accuracy); plain IEEE float32 would run on the FMA units instead. Interpreted (CPU),
  exact float32. bf16/fp16 use the tensor cores as they are.
  """
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  precision = None
  if a.dtype == jnp.float32:
    precision = lax.Precision.HIGHEST if cfg.interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _iota(n: int):
  return jnp.arange(n, dtype=jnp.int32)


def _cdiv(x, n: int):
  """ceil(x / n) for a non-negative traced int32 x."""
  return lax.div(jnp.asarray(x, jnp.int32) + jnp.int32(n - 1), jnp.int32(n))


def _floordiv(x, n: int):
  """floor(x / n) for a non-negative traced int32 x."""
  return lax.div(jnp.asarray(x, jnp.int32), jnp.int32(n))


def _kv_block_range(cfg: _Config, q0, block_q: int, block_k: int, num_kv_blocks: int, q_len_b, kv_len_b):
  """Key/value blocks for query rows [q0, q0 + block_q): (lo, mid_lo, mid_hi, hi).

  Blocks outside [lo, hi) are invisible to every row; blocks in [mid_lo, mid_hi) are visible to every row
  (as far as causal, window and key length go) and run without the mask. Segment ids need the mask
  everywhere. Rows at or past q_len_b are zeroed at the end, so they need no mask.
  """
  q1 = q0 + block_q - 1  # last row of the block
  lo = jnp.int32(0)
  hi = _cdiv(jnp.maximum(kv_len_b, 0), block_k)  # no block starts at or past the key length
  mid_lo = jnp.int32(0)
  mid_hi = _floordiv(jnp.maximum(kv_len_b, 0), block_k)  # blocks ending before the key length
  if cfg.is_causal:
    hi = jnp.minimum(hi, _floordiv(q1, block_k) + 1)  # keys <= q1
    mid_hi = jnp.minimum(mid_hi, _floordiv(q0 + 1, block_k))  # block end <= q0
  if cfg.window is not None:
    left, right = cfg.window
    lo = jnp.maximum(lo, _floordiv(jnp.maximum(q0 - left, 0), block_k))  # keys >= q0 - left
    hi = jnp.minimum(hi, _floordiv(q1 + right, block_k) + 1)  # keys <= q1 + right
    mid_lo = jnp.maximum(mid_lo, _cdiv(jnp.maximum(q1 - left, 0), block_k))  # block start >= q1 - left
    mid_hi = jnp.minimum(mid_hi, _floordiv(q0 + right + 1, block_k))  # block end <= q0 + right
  hi = jnp.minimum(hi, num_kv_blocks)
  hi = jnp.where(q0 < q_len_b, hi, lo)  # the whole block is past the query length: nothing to do
  hi = jnp.maximum(hi, lo)
  if cfg.has_segments:
    mid_lo = mid_hi = hi
  mid_lo = jnp.clip(mid_lo, lo, hi)
  mid_hi = jnp.clip(mid_hi, mid_lo, hi)
  return lo, mid_lo, mid_hi, hi


def _q_block_range(cfg: _Config, k0, block_k: int, block_q: int, num_q_blocks: int, q_len_b, kv_len_b):
  """Query blocks that see keys [k0, k0 + block_k): (lo, mid_lo, mid_hi, hi), as in _kv_block_range."""
  k1 = k0 + block_k - 1
  lo = jnp.int32(0)
  hi = jnp.minimum(_cdiv(jnp.maximum(q_len_b, 0), block_q), num_q_blocks)
  mid_lo = jnp.int32(0)
  mid_hi = hi
  if cfg.is_causal:
    lo = jnp.maximum(lo, _floordiv(k0, block_q))  # rows >= k0
    mid_lo = jnp.maximum(mid_lo, _cdiv(k1, block_q))  # block start >= k1
  if cfg.window is not None:
    left, right = cfg.window
    lo = jnp.maximum(lo, _floordiv(jnp.maximum(k0 - right, 0), block_q))  # rows >= k0 - right
    hi = jnp.minimum(hi, _floordiv(k1 + left, block_q) + 1)  # rows <= k1 + left
    mid_lo = jnp.maximum(mid_lo, _cdiv(jnp.maximum(k1 - right, 0), block_q))  # block start >= k1 - right
    mid_hi = jnp.minimum(mid_hi, _floordiv(k0 + left + 1, block_q))  # block end <= k0 + left
  hi = jnp.where(k0 < kv_len_b, hi, lo)  # keys all past the length: no gradient
  hi = jnp.maximum(hi, lo)
  if cfg.has_segments:
    mid_lo = mid_hi = hi  # segment ids need the mask everywhere
  elif cfg.mask_kv_len:
    partial = k1 >= kv_len_b  # the block holding the last valid key needs the key-length mask
    mid_lo = jnp.where(partial, hi, mid_lo)
    mid_hi = jnp.where(partial, hi, mid_hi)
  mid_lo = jnp.clip(mid_lo, lo, hi)
  mid_hi = jnp.clip(mid_hi, mid_lo, hi)
  return lo, mid_lo, mid_hi, hi


def _three_loops(bounds, body, carry):
  """Runs body(i, carry, masked) over [lo, mid_lo) masked, [mid_lo, mid_hi) unmasked, [mid_hi, hi)."""
  lo, mid_lo, mid_hi, hi = bounds
  carry = lax.fori_loop(lo, mid_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(mid_lo, mid_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(mid_hi, hi, functools.partial(body, masked=True), carry)


def _load(ref, head_mask):
  return plgpu.load(ref, mask=head_mask, other=0.0)


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg: _Config, block_q: int, block_k: int):
  q_ref, k_ref, v_ref, q_len_ref, kv_len_ref, q_seg_ref, kv_seg_ref, o_ref, *lse_refs = refs
  # q_ref [bq, Dp]; k_ref, v_ref [Tk, Dp] (this query head's key/value head); o_ref [bq, Dp].
  kv_seq_len, head_dim_padded = k_ref.shape
  q0 = pl.program_id(0) * block_q
  q_len_b, kv_len_b = q_len_ref[()], kv_len_ref[()]
  head_mask = (_iota(head_dim_padded) < cfg.head_dim)[None, :]
  q = _load(q_ref, head_mask)
  q_pos = (q0 + _iota(block_q))[:, None]
  q_seg = q_seg_ref[...][:, None] if cfg.has_segments else None
  qk_scale = cfg.scale * _LOG2_E  # softmax in base 2: exp(x) = exp2(x * log2(e))

  def body(j, carry, masked):
    acc, m_prev, l_prev = carry  # [bq, Dp], [bq], [bq]
    k0 = j * block_k
    k = _load(k_ref.at[pl.ds(k0, block_k), :], head_mask)
    s = _dot(q, k, cfg, trans_b=True) * qk_scale  # [bq, bk]
    if masked:
      kv_pos = (k0 + _iota(block_k))[None, :]
      kv_seg = kv_seg_ref[pl.ds(k0, block_k)][None, :] if cfg.has_segments else None
      ok = reference.visible(_block_spec(cfg, q_len_b, kv_len_b, q_seg, kv_seg), 0, q_pos, kv_pos)
      s = jnp.where(ok, s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # a row with nothing visible yet: exp2 -> 0
    correction = jnp.exp2(m_prev - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    v = _load(v_ref.at[pl.ds(k0, block_k), :], head_mask)
    acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v, cfg)
    return acc, m_next, l_next

  acc = jnp.zeros((block_q, head_dim_padded), jnp.float32)
  m_i = jnp.full((block_q,), -jnp.inf, jnp.float32)  # running row max (base 2)
  l_i = jnp.zeros((block_q,), jnp.float32)  # running row sum of exp2(s - m_i)
  num_kv_blocks = kv_seq_len // block_k
  if cfg.needs_mask:
    bounds = _kv_block_range(cfg, q0, block_q, block_k, num_kv_blocks, q_len_b, kv_len_b)
    acc, m_i, l_i = _three_loops(bounds, body, (acc, m_i, l_i))
  else:
    # Both bounds int32 explicitly: a `where` of two weak Python ints lowers to an i1 select in
    # Pallas-Triton, and scf.for rejects mixed bound types (the compile check caught it).
    hi = jnp.where(q0 < q_len_b, jnp.int32(num_kv_blocks), jnp.int32(0))
    acc, m_i, l_i = lax.fori_loop(jnp.int32(0), hi, functools.partial(body, masked=False), (acc, m_i, l_i))

  # Rows that saw no key (l == 0 exactly: any visible finite logit contributes exp2(0) = 1) and rows past
  # the query length output 0. `!= 0`, not `> 0`: a NaN sum (NaN in q or in a visible key) must stay NaN.
  row_ok = (l_i != 0.0) & (q_pos[:, 0] < q_len_b)
  o = jnp.where(row_ok[:, None], acc / jnp.where(row_ok, l_i, 1.0)[:, None], 0.0)
  plgpu.store(o_ref.at[:, :head_dim_padded], o.astype(o_ref.dtype), mask=head_mask)
  if lse_refs:
    # Base-2 LSE for the backward pass. Empty rows get the largest finite float32, so exp2(s - lse) is
    # exactly 0 for every s there; not +inf, which as a residual leaving the jitted forward tripped
    # jax.debug_infs (and its op-by-op re-run of the interpreter recursed without end).
    lse_refs[0][...] = jnp.where(row_ok, m_i + jnp.log2(jnp.where(row_ok, l_i, 1.0)), _EMPTY_ROW_LSE)


def _lengths_specs():
  # One int32 per batch row, read as a scalar (the Triton analogue of TPU scalar prefetch).
  return [pl.BlockSpec((None,), lambda i, b, h: (b,))] * 2


def _fwd_call(q, k, v, q_lens, kv_lens, q_seg, kv_seg, cfg: _Config, return_lse: bool):
  batch, q_seq_len, num_heads, _ = q.shape
  kv_seq_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  dp = cfg.head_dim_padded
  block_q, block_k = _fit(cfg.blocks.block_q, q_seq_len), _fit(cfg.blocks.block_k, kv_seq_len)
  grid = (q_seq_len // block_q, batch, num_heads)
  kv_spec = pl.BlockSpec((None, kv_seq_len, None, dp), lambda i, b, h: (b, 0, h // group, 0))
  in_specs = [
    pl.BlockSpec((None, block_q, None, dp), lambda i, b, h: (b, i, h, 0)),
    kv_spec,
    kv_spec,
    *_lengths_specs(),
    None if q_seg is None else pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
    None if kv_seg is None else pl.BlockSpec((None, kv_seq_len), lambda i, b, h: (b, 0)),
  ]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [pl.BlockSpec((None, block_q, None, dp), lambda i, b, h: (b, i, h, 0))]
  if return_lse:
    out_shape.append(jax.ShapeDtypeStruct((batch, num_heads, q_seq_len), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)))
  kernel = functools.partial(_fwd_kernel, cfg=cfg, block_q=block_q, block_k=block_k)
  out = pl.pallas_call(
    kernel,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=_CompilerParams(num_warps=cfg.blocks.num_warps, num_stages=cfg.blocks.num_stages),
    interpret=cfg.interpret,
    debug=cfg.debug,
    name='flash_attention_fwd',
  )(q, k, v, q_lens, kv_lens, q_seg, kv_seg)
  return out if return_lse else (out[0], None)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------


def _dkdv_kernel(*refs, cfg: _Config, block_q: int, block_k: int, group: int):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_len_ref, kv_len_ref, q_seg_ref, kv_seg_ref = refs[:10]
  dk_ref, dv_ref = refs[10:]
  # q_ref, do_ref [Tq, group, Dp] (every query head of this key/value head); lse_ref, delta_ref
  # [group, Tq]; k_ref, v_ref, dk_ref, dv_ref [bk, Dp].
  q_seq_len, _, head_dim_padded = q_ref.shape
  k0 = pl.program_id(0) * block_k
  q_len_b, kv_len_b = q_len_ref[()], kv_len_ref[()]
  head_mask = (_iota(head_dim_padded) < cfg.head_dim)[None, :]
  k = _load(k_ref, head_mask)
  v = _load(v_ref, head_mask)
  # Everything here is computed transposed, keys along rows: S^T = K Q^T is [bk, bq], so P^T and dS^T
  # are the left operands of dV += P^T dO and dK += dS^T Q as they come out of the MMA. In the
  # [bq, bk] orientation both products need a transposed register operand, which Triton lowers to
  # mma.sync plus shuffles; on sm_90a that pushed this kernel to the 255-register cap with spills and
  # serialised wgmma (ptxas C7511). Transposed, every product is a plain wgmma (the report shows it).
  kv_pos = (k0 + _iota(block_k))[:, None]  # [bk, 1]
  kv_seg = kv_seg_ref[...][:, None] if cfg.has_segments else None
  qk_scale = cfg.scale * _LOG2_E

  def body(i, carry, masked, g):
    dk, dv = carry  # [bk, Dp] each, float32
    q0 = i * block_q
    rows = pl.ds(q0, block_q)
    q = _load(q_ref.at[rows, g, :], head_mask)  # [bq, Dp]
    do = _load(do_ref.at[rows, g, :], head_mask)  # [bq, Dp]
    lse = lse_ref[g, rows]  # [bq], _EMPTY_ROW_LSE on empty rows
    delta = delta_ref[g, rows]  # [bq]
    s_t = _dot(k, q, cfg, trans_b=True) * qk_scale  # S^T, [bk, bq]
    if masked:
      q_pos = (q0 + _iota(block_q))[None, :]  # [1, bq]
      q_seg = q_seg_ref[rows][None, :] if cfg.has_segments else None
      ok = reference.visible(_block_spec(cfg, q_len_b, kv_len_b, q_seg, kv_seg), 0, q_pos, kv_pos)
      s_t = jnp.where(ok, s_t, -jnp.inf)
    p_t = jnp.exp2(s_t - lse[None, :])  # the forward probabilities P^T, [bk, bq]
    dv = dv + _dot(p_t.astype(do.dtype), do, cfg)  # P^T dO, [bk, Dp]
    dp_t = _dot(v, do, cfg, trans_b=True)  # (dO V^T)^T = V dO^T, [bk, bq]
    ds_t = p_t * (dp_t - delta[None, :])
    dk = dk + _dot(ds_t.astype(q.dtype), q, cfg)  # dS^T Q, [bk, Dp]
    return dk, dv

  num_q_blocks = q_seq_len // block_q
  if cfg.needs_mask:
    bounds = _q_block_range(cfg, k0, block_k, block_q, num_q_blocks, q_len_b, kv_len_b)
  else:
    hi = jnp.minimum(_cdiv(jnp.maximum(q_len_b, 0), block_q), jnp.int32(num_q_blocks))
    bounds = (jnp.int32(0), jnp.int32(0), hi, hi)

  def group_body(g, carry):  # the GQA sum, in a fixed order: deterministic
    return _three_loops(bounds, functools.partial(body, g=g), carry)

  zeros = jnp.zeros((block_k, head_dim_padded), jnp.float32)
  dk, dv = lax.fori_loop(jnp.int32(0), jnp.int32(group), group_body, (zeros, zeros))
  plgpu.store(dk_ref.at[:, :head_dim_padded], (dk * cfg.scale).astype(dk_ref.dtype), mask=head_mask)
  plgpu.store(dv_ref.at[:, :head_dim_padded], dv.astype(dv_ref.dtype), mask=head_mask)


def _dq_kernel(*refs, cfg: _Config, block_q: int, block_k: int):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_len_ref, kv_len_ref, q_seg_ref, kv_seg_ref, dq_ref = refs
  # q_ref, do_ref, dq_ref [bq, Dp]; lse_ref, delta_ref [bq]; k_ref, v_ref [Tk, Dp].
  kv_seq_len, head_dim_padded = k_ref.shape
  q0 = pl.program_id(0) * block_q
  q_len_b, kv_len_b = q_len_ref[()], kv_len_ref[()]
  head_mask = (_iota(head_dim_padded) < cfg.head_dim)[None, :]
  q = _load(q_ref, head_mask)
  do = _load(do_ref, head_mask)
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_pos = (q0 + _iota(block_q))[:, None]
  q_seg = q_seg_ref[...][:, None] if cfg.has_segments else None
  qk_scale = cfg.scale * _LOG2_E

  def body(j, dq, masked):
    k0 = j * block_k
    cols = pl.ds(k0, block_k)
    k = _load(k_ref.at[cols, :], head_mask)
    v = _load(v_ref.at[cols, :], head_mask)
    s = _dot(q, k, cfg, trans_b=True) * qk_scale
    if masked:
      kv_pos = (k0 + _iota(block_k))[None, :]
      kv_seg = kv_seg_ref[cols][None, :] if cfg.has_segments else None
      ok = reference.visible(_block_spec(cfg, q_len_b, kv_len_b, q_seg, kv_seg), 0, q_pos, kv_pos)
      s = jnp.where(ok, s, -jnp.inf)
    p = jnp.exp2(s - lse[:, None])
    ds = p * (_dot(do, v, cfg, trans_b=True) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, cfg)

  dq = jnp.zeros((block_q, head_dim_padded), jnp.float32)
  num_kv_blocks = kv_seq_len // block_k
  if cfg.needs_mask:
    dq = _three_loops(_kv_block_range(cfg, q0, block_q, block_k, num_kv_blocks, q_len_b, kv_len_b), body, dq)
  else:
    hi = jnp.where(q0 < q_len_b, jnp.int32(num_kv_blocks), jnp.int32(0))  # int32 bounds, as in forward
    dq = lax.fori_loop(jnp.int32(0), hi, functools.partial(body, masked=False), dq)
  plgpu.store(dq_ref.at[:, :head_dim_padded], (dq * cfg.scale).astype(dq_ref.dtype), mask=head_mask)


def _bwd_call(q, k, v, o, lse, do, q_lens, kv_lens, q_seg, kv_seg, cfg: _Config):
  batch, q_seq_len, num_heads, _ = q.shape
  kv_seq_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  dp = cfg.head_dim_padded
  blocks = cfg.blocks
  params = _CompilerParams(num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages_bwd)
  # D = rowsum(dO * O), [batch, heads, q_len], float32.
  delta = jnp.einsum('btnd,btnd->bnt', o.astype(jnp.float32), do.astype(jnp.float32))

  # dK/dV: grid over key/value blocks of every key/value head.
  bq, bk = _fit(blocks.block_q_dkv, q_seq_len), _fit(blocks.block_k_dkv, kv_seq_len)
  group_rows = pl.BlockSpec((None, q_seq_len, group, dp), lambda j, b, h: (b, 0, h, 0))
  group_vec = pl.BlockSpec((None, group, q_seq_len), lambda j, b, h: (b, h, 0))
  kv_block = pl.BlockSpec((None, bk, None, dp), lambda j, b, h: (b, j, h, 0))
  dk, dv = pl.pallas_call(
    functools.partial(_dkdv_kernel, cfg=cfg, block_q=bq, block_k=bk, group=group),
    grid=(kv_seq_len // bk, batch, num_kv_heads),
    in_specs=[
      group_rows,
      kv_block,
      kv_block,
      group_rows,
      group_vec,
      group_vec,
      *_lengths_specs(),
      None if q_seg is None else pl.BlockSpec((None, q_seq_len), lambda j, b, h: (b, 0)),
      None if kv_seg is None else pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
    ],
    out_specs=[kv_block, kv_block],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=params,
    interpret=cfg.interpret,
    debug=cfg.debug,
    name='flash_attention_dkdv',
  )(q, k, v, do, lse, delta, q_lens, kv_lens, q_seg, kv_seg)

  # dQ: grid over query blocks of every query head.
  bq, bk = _fit(blocks.block_q_dq, q_seq_len), _fit(blocks.block_k_dq, kv_seq_len)
  q_block = pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))
  vec_block = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  kv_full = pl.BlockSpec((None, kv_seq_len, None, dp), lambda i, b, h: (b, 0, h // group, 0))
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, cfg=cfg, block_q=bq, block_k=bk),
    grid=(q_seq_len // bq, batch, num_heads),
    in_specs=[
      q_block,
      kv_full,
      kv_full,
      q_block,
      vec_block,
      vec_block,
      *_lengths_specs(),
      None if q_seg is None else pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
      None if kv_seg is None else pl.BlockSpec((None, kv_seq_len), lambda i, b, h: (b, 0)),
    ],
    out_specs=q_block,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=params,
    interpret=cfg.interpret,
    debug=cfg.debug,
    name='flash_attention_dq',
  )(q, k, v, do, lse, delta, q_lens, kv_lens, q_seg, kv_seg)
  return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# custom_vjp over padded inputs, and the public function
# ----------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_lens, kv_lens, q_seg, kv_seg, cfg):
  return _fwd_call(q, k, v, q_lens, kv_lens, q_seg, kv_seg, cfg, return_lse=False)[0]


def _flash_fwd(q, k, v, q_lens, kv_lens, q_seg, kv_seg, cfg):
  o, lse = _fwd_call(q, k, v, q_lens, kv_lens, q_seg, kv_seg, cfg, return_lse=True)
  return o, (q, k, v, o, lse, q_lens, kv_lens, q_seg, kv_seg)


def _flash_bwd(cfg, res, do):
  q, k, v, o, lse, q_lens, kv_lens, q_seg, kv_seg = res
  dq, dk, dv = _bwd_call(q, k, v, o, lse, do, q_lens, kv_lens, q_seg, kv_seg, cfg)
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _pad_multiples(blocks: BlockSizes, q_len: int, kv_len: int) -> tuple[int, int]:
  """Query and key lengths are padded to multiples of every (fitted) block size along them."""
  q_mult = max(_fit(x, q_len) for x in (blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq))
  kv_mult = max(_fit(x, kv_len) for x in (blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq))
  return q_mult, kv_mult


def _fit(block: int, seq_len: int) -> int:
  """The block size actually used: no larger than the sequence rounded up to a power of two (>= 16)."""
  return min(block, max(_MIN_BLOCK, _next_pow2(seq_len)))


def _pad_seq(x, multiple: int, axis: int = 1):
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnames=('cfg',))
def _flash_padded(query, key, value, q_lens, kv_lens, q_seg, kv_seg, cfg: _Config):
  q_len, kv_len = query.shape[1], key.shape[1]
  q_mult, kv_mult = _pad_multiples(cfg.blocks, q_len, kv_len)
  q, k, v = _pad_seq(query, q_mult), _pad_seq(key, kv_mult), _pad_seq(value, kv_mult)
  if q_seg is not None:
    q_seg, kv_seg = _pad_seq(q_seg, q_mult), _pad_seq(kv_seg, kv_mult)
  out = _flash(q, k, v, q_lens, kv_lens, q_seg, kv_seg, cfg)
  return out[:, :q_len]


def flash_attention_triton(
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
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
  debug: bool = False,
) -> Array:
  """Pallas Triton flash attention: query [B, T, N, D], key/value [B, S, K, D] -> [B, T, N, D].

  Arguments as `jax.nn.dot_product_attention` (see `kernels/reference.py` for the exact semantics), plus
  segment_ids (one [B, T] array, or a (query_ids [B, T], key_value_ids [B, S]) pair), block_sizes
  (default: `BlockSizes.get_default(head_dim, dtype)`), interpret (run the kernels in the Pallas
  interpreter, e.g. on CPU) and debug (print the kernels' jaxprs). Differentiable in query, key, value.
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
  return flash_attention_triton_from_spec(
    query, key, value, scale, spec, block_sizes=block_sizes, interpret=interpret, debug=debug
  )


def compiles_for(head_dim: int, dtype) -> bool:
  """Whether the compiled kernel takes this head_dim and dtype (the interpreter takes any <= 256)."""
  return not (jnp.dtype(dtype) == jnp.float32 and head_dim > _MAX_FLOAT32_HEAD_DIM)


def flash_attention_triton_from_spec(
  query,
  key,
  value,
  scale: float,
  spec: reference.MaskSpec,
  *,
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
  debug: bool = False,
) -> Array:
  """`flash_attention_triton` on validated inputs: the entry `flash_attention` dispatches to.

  scale, spec: what `reference.check_inputs` returned for query, key and value. Only the kernel's own
  limits and options (head_dim, float64, block_sizes, interpret) are checked here.
  """
  batch, q_len, _, head_dim = query.shape
  kv_len = key.shape[1]
  if head_dim > MAX_HEAD_DIM:
    raise ValueError(f'query head_dim must be at most {MAX_HEAD_DIM} for the Triton kernel, got {head_dim}.')
  if query.dtype == jnp.float64 and not interpret:
    raise ValueError('query dtype float64 runs only with interpret=True; use float32, bfloat16 or float16.')
  if not interpret and block_sizes is None and not compiles_for(head_dim, query.dtype):
    raise ValueError(
      f"float32 at head_dim {head_dim} (> {_MAX_FLOAT32_HEAD_DIM}): the compiled Triton kernel's default "
      'float32-accurate (TF32x3) tiles need 262-328 KB of shared memory, above the 227 KB of a Hopper '
      "block, and smaller tiles spill heavily. Use bfloat16/float16, the 'chunked' or 'xla' "
      'implementation, or pass block_sizes to try your own tiles.'
    )
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(head_dim, query.dtype)
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f'block_sizes must be a flash_attention_triton.BlockSizes, got {type(block_sizes)}.')
  block_sizes.validate()
  _, kv_mult = _pad_multiples(block_sizes, q_len, kv_len)
  if not isinstance(interpret, bool):
    raise ValueError(f'interpret must be a bool for the Triton kernel, got {interpret!r}.')
  cfg = _Config(
    scale=scale,
    is_causal=spec.is_causal,
    window=spec.local_window,  # clipped to the sequence span by check_inputs (int32-safe)
    has_segments=spec.q_segment_ids is not None,
    mask_kv_len=spec.key_value_seq_lengths is not None or kv_len % kv_mult != 0,
    head_dim=head_dim,
    blocks=block_sizes,
    interpret=interpret,
    debug=debug,
  )

  return _flash_padded(
    query,
    key,
    value,
    reference.lengths_or_full(spec.query_seq_lengths, q_len, batch),
    reference.lengths_or_full(spec.key_value_seq_lengths, kv_len, batch),
    spec.q_segment_ids,
    spec.kv_segment_ids,
    cfg,
  )
