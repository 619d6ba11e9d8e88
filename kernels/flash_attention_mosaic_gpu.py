"""Fused (flash) attention for Hopper (sm_90a) with Pallas Mosaic GPU: forward, dK/dV and dQ kernels.

FlashAttention-3 (Shah et al., 2024, arXiv:2407.08608) in the shape JAX's `attention_mgpu.py` gives it:
every kernel is one CTA of three warpgroups, two compute warpgroups that each own `block` rows and one
memory warpgroup that streams the other operand through a `num_stages`-deep ring of shared-memory slots
with TMA, synchronised by mbarriers (`*_full[slot]`: the TMA landed; `*_consumed[slot]`: both compute
warpgroups are done with it). Both products of every step are `wgmma`, accumulated in float32 registers.

  * forward: a CTA owns 2 x block_q query rows of one head; the memory warpgroup streams K, V (and the
    key segment ids) blocks; each compute warpgroup keeps its Q tile in shared memory, computes
    S = Q K^T (K read transposed in shared memory), the online softmax in float32 (base 2), and
    O += P V with P from registers (`wgmma` RS form). It writes O and the log-sum-exp (LSE) per row.
  * dK/dV: a CTA owns 2 x block_k_dkv keys of one key/value head; the memory warpgroup streams Q, dO,
    LSE and D = rowsum(dO * O) blocks of every query head of the GQA group, in a fixed order (heads
    outer, query blocks inner), so the group sum is a plain loop: deterministic, no atomics. Everything
    is computed transposed (S^T = K Q^T), so P^T and dS^T are register A operands of dV += P^T dO and
    dK += dS^T Q.
  * dQ: a CTA owns 2 x block_q_dq query rows; K and V blocks are streamed; dQ += dS K.

Masks never exist as N x N arrays: each block evaluates `reference.visible` (the project's one mask
predicate) on its positions, through the same `MaskSpec` adapter and the same block-range arithmetic as
the Triton kernel (`flash_attention_triton._kv_block_range` / `_q_block_range`). A block no row of the
CTA sees is never loaded; in the forward and dQ kernels a block that no row of one warpgroup sees is
waited for and released without compute (dK/dV runs it masked: fewer loops, no spills); a block that
every row sees runs without the mask; only the boundary blocks pay for it. Rows that see nothing output 0
with zero gradient (their LSE is the largest finite float32).

Interpret mode (CPU, `interpret=True`, jax 0.10's `InterpretGPUParams`) runs the same kernels, barriers,
TMA copies and `wgmma`s, with three substitutions its interpreter needs, kept in `_Ops` and nowhere
else: a transposed shared-memory operand (`transpose_ref`) and a register A operand are first written
to a per-warpgroup shared-memory scratch; accumulating into a live accumulator (`pl.run_state`) becomes
an add of a fresh one; layout casts and layout-carrying loads are plain (the interpreter has no layouts).
Each simulated thread waiting at a barrier holds one of XLA:CPU's pool threads (PJRT_NPROC, default the
number of cores): on fewer than 4 cores set PJRT_NPROC=8 before JAX starts, or interpret mode hangs.
See BUILD_NOTES.md ("Mosaic GPU kernel") for what interpret mode can and cannot check.

Layout [batch, seq, heads, head_dim], bfloat16 or float16 (the `wgmma` input types). Head dims are
padded with zeros to a multiple of 64 (one 128-byte swizzle row) and sequences to block multiples; the
padding is masked as keys past the length. Anatomy as in the other kernel files: block sizes, kernels,
the custom_vjp'd function and its rules, the public function; the reference is `kernels/reference.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lstm_attn.kernels import flash_attention_triton as _triton
from lstm_attn.kernels import reference

Array = jax.Array

_LOG2_E = math.log2(math.e)
_EMPTY_ROW_LSE = float(jnp.finfo(jnp.float32).max)  # the LSE of a row that saw no key
_WGS = 2  # compute warpgroups per CTA; warpgroup 2 is the memory (TMA) warpgroup
_HEAD_DIM_MULTIPLE = 64  # one 128-byte swizzle row of 16-bit elements
MAX_HEAD_DIM = 256
DTYPES = (jnp.bfloat16, jnp.float16)

# setmaxnreg per warpgroup (FA3's split): 128 x (2 x 240 + 24) = 64512 of the SM's 65536 registers.
_COMPUTE_REGISTERS = 240
_MEMORY_REGISTERS = 24

_WGMMA = plgpu.Layout.WGMMA
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a WGMMA tile
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column


_ROW_BLOCKS = ('block_q', 'block_k_dkv', 'block_q_dq')  # rows a compute warpgroup owns


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. Every block is a multiple of 64 (the M of one warpgroup's `wgmma`).

  Forward: each of the two compute warpgroups owns `block_q` query rows (a CTA 2 x block_q) and steps
  over keys `block_k` at a time through `num_stages` shared-memory slots. dK/dV: each owns `block_k_dkv`
  keys and steps over queries `block_q_dkv` at a time. dQ: each owns `block_q_dq` rows and steps over
  keys `block_k_dq` at a time. `schedule_barrier`: the forward's two compute warpgroups take turns on
  the tensor cores (FA3's ping-pong: one's softmax overlaps the other's `wgmma`).
  """

  block_q: int = 64
  block_k: int = 128
  num_stages: int = 2
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  num_stages_bwd: int = 2
  schedule_barrier: bool = True

  @classmethod
  def get_default(cls, head_dim: int = 128) -> BlockSizes:
    """Defaults for H100/H200 (227 KB shared memory per CTA), from the deviceless sm_90a compile report
    (experiments/kernel_report.py --kernels=mosaic_gpu; BUILD_NOTES.md). Shared memory of the forward:
    Q 2 x block_q x D, K and V num_stages x block_k x D each (16-bit): 160 KB at D = 128 with 128-key
    blocks and 2 stages; at D = 256, 64-key blocks (192 KB). Not yet timed on a GPU."""
    if head_dim > 128:
      return cls(block_k=64, block_q_dkv=64, block_k_dkv=64, block_k_dq=64, num_stages_bwd=1)
    return cls()

  def validate(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name == 'schedule_barrier':
        if not isinstance(value, bool):
          raise ValueError(f'block_sizes.schedule_barrier must be a bool, got {value!r}.')
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'block_sizes.{field.name} must be a positive int, got {value!r}.')
      if field.name in _ROW_BLOCKS and value % 64:
        raise ValueError(
          f'block_sizes.{field.name} must be a multiple of 64 (the M of a warpgroup wgmma), got {value}.'
        )
      if field.name.startswith('block_') and value % 32:
        raise ValueError(f'block_sizes.{field.name} must be a multiple of 32 (wgmma N and K), got {value}.')


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call (hashable: a jit static argument). The mask fields have the
  names `flash_attention_triton`'s block-range helpers read."""

  scale: float
  is_causal: bool
  window: tuple[int, int] | None
  has_segments: bool
  mask_kv_len: bool  # key/value lengths given, or keys padded to a block multiple
  blocks: BlockSizes
  interpret: bool

  @property
  def needs_mask(self) -> bool:
    return self.is_causal or self.window is not None or self.has_segments or self.mask_kv_len


def _swizzled(shape, dtype):
  """A 16-bit shared-memory tile in the layout `wgmma` and TMA want: (8, 64) tiles, 128-byte swizzle."""
  return plgpu.SMEM(
    shape, dtype, transforms=(plgpu.TilingTransform((8, _HEAD_DIM_MULTIPLE)), plgpu.SwizzleTransform(128))
  )


# XLA:CPU pool threads one interpreted kernel holds at once: the thread map's own, and one per simulated
# thread (two consumer warpgroups and the producer) waiting at a barrier.
_INTERPRET_POOL_THREADS = _WGS + 2


def _cpu_pool_threads() -> int:
  """The XLA:CPU client's pool size: PJRT_NPROC (or NPROC) where set, else the schedulable cores."""
  for name in ('PJRT_NPROC', 'NPROC'):
    if os.environ.get(name, '').strip().isdigit():
      return int(os.environ[name])
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def _interpret_params():
  if _cpu_pool_threads() < _INTERPRET_POOL_THREADS:
    raise RuntimeError(
      f'interpret=True: the GPU interpreter needs {_INTERPRET_POOL_THREADS} XLA:CPU pool threads, this '
      f'process has {_cpu_pool_threads()} (one per core) and would hang at the first barrier. Set '
      'PJRT_NPROC=8 in the environment before JAX starts (e.g. `PJRT_NPROC=8 python ...`).'
    )
  try:  # jax 0.10: only under _src
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  except ImportError:  # pragma: no cover - a later layout
    InterpretGPUParams = plgpu.InterpretParams  # noqa: N806
  return InterpretGPUParams()


def reset_interpreter():
  """Clears the GPU interpreter's global state; needed after a kernel raised while interpreted."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

  interpret_pallas_call.reset_gpu_interpret_mode_state()


class _Ops:
  """The few constructs that differ between the compiled kernel and GPU interpret mode.

  Compiled: `wgmma` reads a transposed shared-memory operand through `transpose_ref`, takes a register
  A operand directly (RS form) and accumulates into a live accumulator (`pl.run_state`); arrays carry
  explicit WGMMA layouts. The jax 0.10 interpreter implements `wgmma` only on untransposed shared-memory
  refs and a fresh accumulator, and has no layouts, so there the operand is staged in `scratch` (this
  warpgroup's [rows, cols] shared-memory buffers) and the accumulation is an add. Same values, so the
  interpreted tests check everything else: barriers, TMA, pipelining, masks, softmax, block skipping.
  """

  def __init__(self, interpret: bool, a_scratch=None, b_scratch=None):
    self.interpret = interpret
    self.a_scratch = a_scratch  # [rows, k] 16-bit: a register A operand
    self.b_scratch = b_scratch  # [k, cols] 16-bit: a transposed B operand

  def cast(self, x, layout):
    return x if self.interpret else plgpu.layout_cast(x, layout)

  def iota(self, shape, dim):
    if self.interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=_WGMMA)

  def load(self, ref, layout):
    """A 1-D shared-memory vector in registers, laid out as one value per row or per column."""
    return ref[...] if self.interpret else plgpu.load(ref, (), layout=layout)

  def _operands(self, a, b, b_transposed: bool):
    if not self.interpret:
      return a, (plgpu.transpose_ref(b, (1, 0)) if b_transposed else b)
    if _is_ref(a):
      a_ref = a
    else:
      a_ref = self.a_scratch.at[:, : a.shape[1]] if a.shape[1] != self.a_scratch.shape[1] else self.a_scratch
      a_ref[...] = a
    if b_transposed:
      bt = b[...].T
      b_ref = (
        self.b_scratch.at[:, : bt.shape[1]] if bt.shape[1] != self.b_scratch.shape[1] else self.b_scratch
      )
      b_ref[...] = bt
      b = b_ref
    return a_ref, b

  def dot(self, a, b, *, b_transposed=False):
    """a @ b (or a @ b.T) into a fresh float32 accumulator. a: [M, K] registers or SMEM; b: SMEM."""
    a_op, b_op = self._operands(a, b, b_transposed)
    n = b.shape[0] if b_transposed else b.shape[1]

    def run(acc_ref):
      plgpu.wgmma(acc_ref, a_op, b_op)
      return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC((a.shape[0], n), jnp.float32))

  def dot_acc(self, acc, a, b, *, b_transposed=False):
    """acc + a @ b (or a @ b.T), accumulated in place by `wgmma` when compiled."""
    if self.interpret:
      return acc + self.dot(a, b, b_transposed=b_transposed)
    a_op, b_op = self._operands(a, b, b_transposed)
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a_op, b_op))(plgpu.ACC.init(acc))


def _is_ref(x) -> bool:
  from jax._src.state import types as state_types

  return isinstance(x, state_types.TransformedRef) or isinstance(
    getattr(x, 'aval', None), state_types.AbstractRef
  )


def _bcast_rows(x, shape):
  return lax.broadcast_in_dim(x, shape, [0])


def _bcast_cols(x, shape):
  return lax.broadcast_in_dim(x, shape, [1])


def _visible(cfg: _Config, q_len_b, kv_len_b, q_pos, kv_pos, q_seg=None, kv_seg=None, *, query_length=True):
  """`reference.visible` on a [rows, cols] tile of positions (and segment ids broadcast to it).

  The key length enters only where keys can be past it (given lengths, or padding). query_length=False
  leaves out rows past the query length: the dK/dV kernel, where their LSE (the largest float32) already
  makes their probabilities 0 and a tile fewer keeps its two accumulators out of local memory."""
  spec = _triton._block_spec(cfg, q_len_b, kv_len_b, q_seg, kv_seg)
  spec = dataclasses.replace(
    spec,
    query_seq_lengths=spec.query_seq_lengths if query_length else None,
    key_value_seq_lengths=spec.key_value_seq_lengths if cfg.mask_kv_len else None,
  )
  return reference.visible(spec, 0, q_pos, kv_pos)


def _loop(lo, hi, body, carry):
  return lax.fori_loop(lo, hi, body, carry)


def _three_ranges(outer, inner, lower: bool = True, upper: bool = True):
  """[lo, hi) split at the inner (mid_lo, mid_hi) of one warpgroup: masked, full, masked. Blocks outside the
  warpgroup's own (lo, hi) run masked (every logit hidden, no contribution): one loop fewer each side.
  lower/upper False: that masked range is empty for every input (the masks in use cannot make it), so
  no loop is emitted for it (fewer loops: fewer registers, ptxas measured)."""
  lo, hi = outer
  mid_lo = jnp.clip(inner[1], lo, hi) if lower else lo
  mid_hi = jnp.clip(inner[2], mid_lo, hi) if upper else hi
  ranges = [((lo, mid_lo), 'masked')] if lower else []
  ranges.append(((mid_lo, mid_hi), 'full'))
  return ranges + ([((mid_hi, hi), 'masked')] if upper else [])


def _five_ranges(outer, inner):
  """[lo, hi) split at the inner (lo, mid_lo, mid_hi, hi) of one warpgroup, clipped into the outer one:
  ((lo, a), 'skip'), ((a, b), 'masked'), ((b, c), 'full'), ((c, d), 'masked'), ((d, hi), 'skip')."""
  lo, hi = outer
  cuts = [jnp.clip(x, lo, hi) for x in inner]
  for i in range(1, 4):
    cuts[i] = jnp.maximum(cuts[i], cuts[i - 1])
  points = [lo, *cuts, hi]
  modes = ('skip', 'masked', 'full', 'masked', 'skip')
  return [((points[i], points[i + 1]), modes[i]) for i in range(5)]


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg: _Config, block_q: int, block_k: int, num_stages: int, group: int):
  it = iter(refs)
  q_ref, k_ref, v_ref, q_len_ref, kv_len_ref = (next(it) for _ in range(5))
  q_seg_ref, kv_seg_ref = (next(it), next(it)) if cfg.has_segments else (None, None)
  o_ref, lse_ref = next(it), next(it)
  q_smem, k_smem, v_smem, lse_smem = (next(it) for _ in range(4))
  q_seg_smem, kv_seg_smem = (next(it), next(it)) if cfg.has_segments else (None, None)
  q_full, k_full, v_full, k_consumed, v_consumed, schedule = (next(it) for _ in range(6))
  a_scratch, b_scratch = (next(it), next(it)) if cfg.interpret else (None, None)
  # q_ref, o_ref [B, Tq, N, D]; k_ref, v_ref [B, Tk, K, D]; lse_ref [B, N, Tq]; lengths [B];
  # segment ids [B, T]. q_smem [2, bq, D]; k_smem, v_smem [stages, bk, D]; lse_smem [2, bq].
  kv_seq_len, head_dim = k_ref.shape[1], k_ref.shape[3]
  b, h = lax.axis_index('b'), lax.axis_index('h')
  wg = lax.axis_index('wg')
  q_len_b, kv_len_b = q_len_ref[b], kv_len_ref[b]
  cta_q0 = lax.axis_index('q') * (_WGS * block_q)
  num_kv_blocks = kv_seq_len // block_k

  def bounds(q0, rows):
    if cfg.needs_mask:
      return _triton._kv_block_range(cfg, q0, rows, block_k, num_kv_blocks, q_len_b, kv_len_b)
    hi = jnp.where(q0 < q_len_b, jnp.int32(num_kv_blocks), jnp.int32(0))
    return jnp.int32(0), jnp.int32(0), hi, hi

  lo, _, _, hi = bounds(cta_q0, _WGS * block_q)

  def sync_schedule():  # FA3 ping-pong: the two compute warpgroups alternate on the tensor cores
    if cfg.blocks.schedule_barrier:
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)

  @pl.when(wg < _WGS)
  def _compute():
    plgpu.set_max_registers(_COMPUTE_REGISTERS, action='increase')
    ops = _Ops(cfg.interpret, *((a_scratch.at[wg], b_scratch.at[wg]) if cfg.interpret else ()))
    q0 = cta_q0 + wg * block_q
    rows = pl.ds(q0, block_q)
    qo_smem = q_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], qo_smem, q_full.at[wg])
    if cfg.has_segments:
      plgpu.copy_gmem_to_smem(q_seg_ref.at[b, rows], q_seg_smem.at[wg], q_full.at[wg])
    plgpu.barrier_wait(q_full.at[wg])
    shape = (block_q, block_k)
    # Per-row values stay vectors across the loop (2 registers a thread); tiles are built per block.
    q_seg_rows = ops.load(q_seg_smem.at[wg], _ROW) if cfg.has_segments else None
    qk_scale = cfg.scale * _LOG2_E  # softmax in base 2: exp(x) = exp2(x * log2(e))

    def visible(j, slot):
      q_pos, kv_pos = q0 + ops.iota(shape, 0), j * block_k + ops.iota(shape, 1)
      q_seg = kv_seg = None
      if cfg.has_segments:
        q_seg = _bcast_rows(q_seg_rows, shape)
        kv_seg = _bcast_cols(ops.load(kv_seg_smem.at[slot], _COL), shape)
      return _visible(cfg, q_len_b, kv_len_b, q_pos, kv_pos, q_seg, kv_seg)

    def step(j, carry, mode):
      acc, m_prev, l_prev = carry  # [bq, D], [bq], [bq] float32
      slot = lax.rem(j - lo, num_stages)
      releases = j + num_stages < hi  # the memory warpgroup waits for this slot again
      plgpu.barrier_wait(k_full.at[slot])
      if mode == 'skip':  # no row of this warpgroup sees the block: release it untouched
        sync_schedule()
        pl.when(releases)(lambda: plgpu.barrier_arrive(k_consumed.at[slot]))
        plgpu.barrier_wait(v_full.at[slot])
        sync_schedule()
        pl.when(releases)(lambda: plgpu.barrier_arrive(v_consumed.at[slot]))
        return carry
      s = ops.dot(qo_smem, k_smem.at[slot], b_transposed=True) * qk_scale  # S = Q K^T, [bq, bk]
      sync_schedule()
      if mode == 'masked':
        s = jnp.where(visible(j, slot), s, -jnp.inf)
      pl.when(releases)(lambda: plgpu.barrier_arrive(k_consumed.at[slot]))
      m_next = jnp.maximum(m_prev, s.max(axis=1))
      m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # a row with nothing visible yet: exp2 -> 0
      correction = jnp.exp2(m_prev - m_safe)
      p = jnp.exp2(s - _bcast_rows(m_safe, shape))
      l_next = correction * l_prev + p.sum(axis=1)
      acc = acc * _bcast_rows(correction, acc.shape)
      p16 = p.astype(v_smem.dtype)
      plgpu.barrier_wait(v_full.at[slot])
      sync_schedule()
      acc = ops.dot_acc(acc, p16, v_smem.at[slot])  # O += P V, P from registers
      pl.when(releases)(lambda: plgpu.barrier_arrive(v_consumed.at[slot]))
      return acc, m_next, l_next

    acc = ops.cast(jnp.zeros((block_q, head_dim), jnp.float32), _WGMMA)
    m_i = ops.cast(jnp.full((block_q,), -jnp.inf, jnp.float32), _ROW)  # running row max (base 2)
    l_i = ops.cast(jnp.zeros((block_q,), jnp.float32), _ROW)  # running row sum of exp2(s - m_i)
    carry = (acc, m_i, l_i)
    pl.when(wg == 1)(sync_schedule)  # warpgroup 0 goes first
    for (start, stop), mode in _five_ranges((lo, hi), bounds(q0, block_q)):
      carry = _loop(start, stop, functools.partial(step, mode=mode), carry)
    pl.when(wg == 0)(sync_schedule)
    acc, m_i, l_i = carry

    # Rows that saw no key (l == 0 exactly: a visible finite logit contributes exp2(0) = 1) and rows past
    # the query length output 0. `!= 0`, not `> 0`: a NaN sum (NaN in q or a visible key) stays NaN.
    row_pos = q0 + ops.iota((block_q, head_dim), 0)
    row_ok = (_bcast_rows(l_i, acc.shape) != 0.0) & (row_pos < q_len_b)
    o = jnp.where(row_ok, acc / jnp.where(row_ok, _bcast_rows(l_i, acc.shape), 1.0), 0.0)
    vec_ok = (l_i != 0.0) & (q0 + jnp.max(ops.iota((block_q, block_k), 0), axis=1) < q_len_b)
    lse_smem[wg] = jnp.where(vec_ok, m_i + jnp.log2(jnp.where(vec_ok, l_i, 1.0)), _EMPTY_ROW_LSE)
    qo_smem[...] = o.astype(qo_smem.dtype)  # Q is no longer needed: its buffer stages the output
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, rows, h])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _WGS)
  def _memory():
    plgpu.set_max_registers(_MEMORY_REGISTERS, action='decrease')
    kv_head = lax.div(h, jnp.int32(group))

    def load(j, slot):
      cols = pl.ds(j * block_k, block_k)
      plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kv_head], k_smem.at[slot], k_full.at[slot])
      if cfg.has_segments:
        plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, cols], kv_seg_smem.at[slot], k_full.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kv_head], v_smem.at[slot], v_full.at[slot])

    for s in range(num_stages):  # fill the ring
      pl.when(lo + s < hi)(functools.partial(load, lo + s, s))

    def refill(j, _):
      slot = lax.rem(j - lo, num_stages)
      plgpu.barrier_wait(k_consumed.at[slot])
      plgpu.barrier_wait(v_consumed.at[slot])
      load(j, slot)
      return _

    _loop(lo + num_stages, hi, refill, None)


def _fwd_call(q, k, v, q_lens, kv_lens, q_seg, kv_seg, cfg: _Config):
  """(o [B, Tq, N, D], lse [B, N, Tq] float32, base 2) on block-padded inputs."""
  batch, q_seq_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  blocks = cfg.blocks
  bq, bk, stages = blocks.block_q, blocks.block_k, blocks.num_stages
  scratch = [
    _swizzled((_WGS, bq, head_dim), q.dtype),
    _swizzled((stages, bk, head_dim), k.dtype),
    _swizzled((stages, bk, head_dim), v.dtype),
    plgpu.SMEM((_WGS, bq), jnp.float32),
  ]
  if cfg.has_segments:
    scratch += [plgpu.SMEM((_WGS, bq), jnp.int32), plgpu.SMEM((stages, bk), jnp.int32)]
  k_arrivals = 2 if cfg.has_segments else 1  # K and its segment ids land on one barrier
  scratch += [
    plgpu.Barrier(num_arrivals=k_arrivals, num_barriers=_WGS),  # q_full (Q and its segment ids)
    plgpu.Barrier(num_arrivals=k_arrivals, num_barriers=stages),  # k_full
    plgpu.Barrier(num_barriers=stages),  # v_full
    plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages),  # k_consumed
    plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages),  # v_consumed
    plgpu.Barrier(num_arrivals=_WGS),  # schedule (ping-pong)
  ]
  if cfg.interpret:  # _Ops' staging buffers: a register A operand, a transposed B operand
    scratch += [plgpu.SMEM((_WGS, bq, bk), q.dtype), plgpu.SMEM((_WGS, head_dim, bk), q.dtype)]
  kernel = functools.partial(
    _fwd_kernel, cfg=cfg, block_q=bq, block_k=bk, num_stages=stages, group=num_heads // num_kv_heads
  )
  args = [q, k, v, q_lens, kv_lens] + ([q_seg, kv_seg] if cfg.has_segments else [])
  return plgpu.kernel(
    kernel,
    out_type=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((batch, num_heads, q_seq_len), jnp.float32),
    ],
    scratch_types=scratch,
    grid=(q_seq_len // (_WGS * bq), num_heads, batch),
    grid_names=('q', 'h', 'b'),
    num_threads=_WGS + 1,
    thread_name='wg',
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=_interpret_params() if cfg.interpret else None,
    kernel_name='flash_attention_mgpu_fwd',
  )(*args)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------


def _dkdv_kernel(*refs, cfg: _Config, block_q: int, block_k: int, num_stages: int, group: int):
  it = iter(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_len_ref, kv_len_ref = (next(it) for _ in range(8))
  q_seg_ref, kv_seg_ref = (next(it), next(it)) if cfg.has_segments else (None, None)
  dk_ref, dv_ref = next(it), next(it)
  k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem = (next(it) for _ in range(6))
  q_seg_smem, kv_seg_smem = (next(it), next(it)) if cfg.has_segments else (None, None)
  kv_full, full, consumed = (next(it) for _ in range(3))
  a_scratch, b_scratch = (next(it), next(it)) if cfg.interpret else (None, None)
  # q_ref, do_ref [B, Tq, N, D]; k_ref, v_ref, dk_ref, dv_ref [B, Tk, K, D]; lse_ref, delta_ref
  # [B, N, Tq]. k_smem, v_smem [2, bk, D] (this CTA's keys); q_smem, do_smem [stages, bq, D];
  # lse_smem, delta_smem [stages, bq].
  q_seq_len, head_dim = q_ref.shape[1], q_ref.shape[3]
  b, h_kv = lax.axis_index('b'), lax.axis_index('h')
  wg = lax.axis_index('wg')
  q_len_b, kv_len_b = q_len_ref[b], kv_len_ref[b]
  cta_k0 = lax.axis_index('k') * (_WGS * block_k)
  num_q_blocks = q_seq_len // block_q
  # Each key's dK, dV row depends on that key alone, so keys at or past the length are zeroed once, after
  # the kernel (`_bwd_call`), not masked block by block; rows at or past the query length have the
  # largest LSE, so their probabilities are 0 already. Left in the per-block mask: causal, window,
  # segment ids. (Each mask left out here took ptxas from spilling to not, in the report's cases.)
  mask_cfg = dataclasses.replace(cfg, mask_kv_len=False)

  def bounds(k0, cols):
    if mask_cfg.needs_mask:
      return _triton._q_block_range(mask_cfg, k0, cols, block_q, num_q_blocks, q_len_b, kv_len_b)
    hi = jnp.minimum(_triton._cdiv(jnp.maximum(q_len_b, 0), block_q), jnp.int32(num_q_blocks))
    hi = jnp.where(k0 < kv_len_b, hi, jnp.int32(0))  # keys all past the length: no gradient
    return jnp.int32(0), jnp.int32(0), hi, hi

  lo, _, _, hi = bounds(cta_k0, _WGS * block_k)
  per_head = hi - lo
  num_steps = group * per_head  # every query head of the GQA group, heads outer: a fixed order

  @pl.when(wg < _WGS)
  def _compute():
    plgpu.set_max_registers(_COMPUTE_REGISTERS, action='increase')
    ops = _Ops(cfg.interpret, *((a_scratch.at[wg], b_scratch.at[wg]) if cfg.interpret else ()))
    k0 = cta_k0 + wg * block_k
    cols = pl.ds(k0, block_k)
    k_tile, v_tile = k_smem.at[wg], v_smem.at[wg]
    plgpu.copy_gmem_to_smem(k_ref.at[b, cols, h_kv], k_tile, kv_full.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[b, cols, h_kv], v_tile, kv_full.at[wg])
    if cfg.has_segments:
      plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, cols], kv_seg_smem.at[wg], kv_full.at[wg])
    plgpu.barrier_wait(kv_full.at[wg])
    # Transposed tiles, keys along rows: S^T = K Q^T is [bk, bq].
    shape = (block_k, block_q)
    kv_seg_rows = ops.load(kv_seg_smem.at[wg], _ROW) if cfg.has_segments else None
    qk_scale = cfg.scale * _LOG2_E

    def visible(i, slot):
      kv_pos, q_pos = k0 + ops.iota(shape, 0), i * block_q + ops.iota(shape, 1)
      q_seg = kv_seg = None
      if cfg.has_segments:
        kv_seg = _bcast_rows(kv_seg_rows, shape)
        q_seg = _bcast_cols(ops.load(q_seg_smem.at[slot], _COL), shape)
      return _visible(mask_cfg, q_len_b, kv_len_b, q_pos, kv_pos, q_seg, kv_seg, query_length=False)

    def step(t, i, carry, mode):
      dk, dv = carry  # [bk, D] float32 each
      slot = lax.rem(t, num_stages)
      releases = t + num_stages < num_steps
      plgpu.barrier_wait(full.at[slot])
      if mode == 'skip':
        pl.when(releases)(lambda: plgpu.barrier_arrive(consumed.at[slot]))
        return carry
      q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
      s_t = ops.dot(k_tile, q_tile, b_transposed=True) * qk_scale  # S^T = K Q^T, [bk, bq]
      if mode == 'masked':
        s_t = jnp.where(visible(i, slot), s_t, -jnp.inf)
      # The forward probabilities P^T, [bk, bq]; LSE is _EMPTY_ROW_LSE on empty rows, so they are 0.
      # Column vectors are broadcast where they are used: a broadcast tile costs a register per element.
      p_t = jnp.exp2(s_t - _bcast_cols(ops.load(lse_smem.at[slot], _COL), shape))
      dv = ops.dot_acc(dv, p_t.astype(do_tile.dtype), do_tile)  # dV += P^T dO
      dp_t = ops.dot(v_tile, do_tile, b_transposed=True)  # dP^T = V dO^T, [bk, bq]
      ds_t = p_t * (dp_t - _bcast_cols(ops.load(delta_smem.at[slot], _COL), shape))
      dk = ops.dot_acc(dk, ds_t.astype(q_tile.dtype), q_tile)  # dK += dS^T Q
      pl.when(releases)(lambda: plgpu.barrier_arrive(consumed.at[slot]))
      return dk, dv

    # Query blocks below the full ones exist with a causal mask or a window, above them with a window;
    # segment ids mask every block.
    lower = cfg.is_causal or cfg.window is not None or cfg.has_segments
    upper = cfg.window is not None or cfg.has_segments

    def head(g, carry):  # the GQA sum: one query head after another
      for (start, stop), mode in _three_ranges((lo, hi), bounds(k0, block_k), lower, upper):
        body = lambda i, c, mode=mode: step(g * per_head + i - lo, i, c, mode)
        carry = _loop(start, stop, body, carry)
      return carry

    zeros = ops.cast(jnp.zeros((block_k, head_dim), jnp.float32), _WGMMA)
    dk, dv = _loop(0, group, head, (zeros, zeros))

    k_tile[...] = (dk * cfg.scale).astype(k_tile.dtype)  # K and V are done: their tiles stage dK, dV
    v_tile[...] = dv.astype(v_tile.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[b, cols, h_kv])
    plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[b, cols, h_kv])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _WGS)
  def _memory():
    plgpu.set_max_registers(_MEMORY_REGISTERS, action='decrease')

    def load(t, slot):
      g, i = lax.div(t, per_head), lo + lax.rem(t, per_head)
      h = h_kv * group + g
      rows = pl.ds(i * block_q, block_q)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], full.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], full.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], full.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot], full.at[slot])
      if cfg.has_segments:
        plgpu.copy_gmem_to_smem(q_seg_ref.at[b, rows], q_seg_smem.at[slot], full.at[slot])

    for s in range(num_stages):
      pl.when(s < num_steps)(functools.partial(load, jnp.int32(s), s))

    def refill(t, _):
      slot = lax.rem(t, num_stages)
      plgpu.barrier_wait(consumed.at[slot])
      load(t, slot)
      return _

    _loop(num_stages, num_steps, refill, None)


def _dq_kernel(*refs, cfg: _Config, block_q: int, block_k: int, num_stages: int, group: int):
  it = iter(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_len_ref, kv_len_ref = (next(it) for _ in range(8))
  q_seg_ref, kv_seg_ref = (next(it), next(it)) if cfg.has_segments else (None, None)
  dq_ref = next(it)
  q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem = (next(it) for _ in range(6))
  q_seg_smem, kv_seg_smem = (next(it), next(it)) if cfg.has_segments else (None, None)
  q_full, full, consumed = (next(it) for _ in range(3))
  a_scratch, b_scratch = (next(it), next(it)) if cfg.interpret else (None, None)
  # q_smem, do_smem [2, bq, D]; lse_smem, delta_smem [2, bq]; k_smem, v_smem [stages, bk, D].
  kv_seq_len, head_dim = k_ref.shape[1], k_ref.shape[3]
  b, h = lax.axis_index('b'), lax.axis_index('h')
  wg = lax.axis_index('wg')
  q_len_b, kv_len_b = q_len_ref[b], kv_len_ref[b]
  cta_q0 = lax.axis_index('q') * (_WGS * block_q)
  num_kv_blocks = kv_seq_len // block_k

  def bounds(q0, rows):
    if cfg.needs_mask:
      return _triton._kv_block_range(cfg, q0, rows, block_k, num_kv_blocks, q_len_b, kv_len_b)
    hi = jnp.where(q0 < q_len_b, jnp.int32(num_kv_blocks), jnp.int32(0))
    return jnp.int32(0), jnp.int32(0), hi, hi

  lo, _, _, hi = bounds(cta_q0, _WGS * block_q)

  @pl.when(wg < _WGS)
  def _compute():
    plgpu.set_max_registers(_COMPUTE_REGISTERS, action='increase')
    ops = _Ops(cfg.interpret, *((a_scratch.at[wg], b_scratch.at[wg]) if cfg.interpret else ()))
    q0 = cta_q0 + wg * block_q
    rows = pl.ds(q0, block_q)
    q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_tile, q_full.at[wg])
    plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_tile, q_full.at[wg])
    plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[wg], q_full.at[wg])
    plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[wg], q_full.at[wg])
    if cfg.has_segments:
      plgpu.copy_gmem_to_smem(q_seg_ref.at[b, rows], q_seg_smem.at[wg], q_full.at[wg])
    plgpu.barrier_wait(q_full.at[wg])
    shape = (block_q, block_k)
    q_seg_rows = ops.load(q_seg_smem.at[wg], _ROW) if cfg.has_segments else None
    lse_rows = ops.load(lse_smem.at[wg], _ROW)
    delta_rows = ops.load(delta_smem.at[wg], _ROW)
    qk_scale = cfg.scale * _LOG2_E

    def visible(j, slot):
      q_pos, kv_pos = q0 + ops.iota(shape, 0), j * block_k + ops.iota(shape, 1)
      q_seg = kv_seg = None
      if cfg.has_segments:
        q_seg = _bcast_rows(q_seg_rows, shape)
        kv_seg = _bcast_cols(ops.load(kv_seg_smem.at[slot], _COL), shape)
      return _visible(cfg, q_len_b, kv_len_b, q_pos, kv_pos, q_seg, kv_seg)

    def step(j, dq, mode):
      slot = lax.rem(j - lo, num_stages)
      releases = j + num_stages < hi
      plgpu.barrier_wait(full.at[slot])
      if mode == 'skip':
        pl.when(releases)(lambda: plgpu.barrier_arrive(consumed.at[slot]))
        return dq
      k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
      s = ops.dot(q_tile, k_tile, b_transposed=True) * qk_scale  # S = Q K^T, [bq, bk]
      if mode == 'masked':
        s = jnp.where(visible(j, slot), s, -jnp.inf)
      p = jnp.exp2(s - _bcast_rows(lse_rows, shape))
      ds = p * (ops.dot(do_tile, v_tile, b_transposed=True) - _bcast_rows(delta_rows, shape))  # dP = dO V^T
      dq = ops.dot_acc(dq, ds.astype(k_tile.dtype), k_tile)  # dQ += dS K
      pl.when(releases)(lambda: plgpu.barrier_arrive(consumed.at[slot]))
      return dq

    dq = ops.cast(jnp.zeros((block_q, head_dim), jnp.float32), _WGMMA)
    for (start, stop), mode in _five_ranges((lo, hi), bounds(q0, block_q)):
      dq = _loop(start, stop, functools.partial(step, mode=mode), dq)
    q_tile[...] = (dq * cfg.scale).astype(q_tile.dtype)  # Q is done: its tile stages dQ
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _WGS)
  def _memory():
    plgpu.set_max_registers(_MEMORY_REGISTERS, action='decrease')
    kv_head = lax.div(h, jnp.int32(group))

    def load(j, slot):
      cols = pl.ds(j * block_k, block_k)
      plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kv_head], k_smem.at[slot], full.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kv_head], v_smem.at[slot], full.at[slot])
      if cfg.has_segments:
        plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, cols], kv_seg_smem.at[slot], full.at[slot])

    for s in range(num_stages):
      pl.when(lo + s < hi)(functools.partial(load, lo + s, s))

    def refill(j, _):
      slot = lax.rem(j - lo, num_stages)
      plgpu.barrier_wait(consumed.at[slot])
      load(j, slot)
      return _

    _loop(lo + num_stages, hi, refill, None)


def _bwd_call(q, k, v, o, lse, do, q_lens, kv_lens, q_seg, kv_seg, cfg: _Config):
  batch, q_seq_len, num_heads, head_dim = q.shape
  kv_seq_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  blocks = cfg.blocks
  stages = blocks.num_stages_bwd
  # D = rowsum(dO * O), [batch, heads, q_len], float32 (one fused XLA pass).
  delta = jnp.einsum('btnd,btnd->bnt', o.astype(jnp.float32), do.astype(jnp.float32))
  args = [q, k, v, do, lse, delta, q_lens, kv_lens] + ([q_seg, kv_seg] if cfg.has_segments else [])
  seg = cfg.has_segments
  common = dict(
    num_threads=_WGS + 1,
    thread_name='wg',
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=_interpret_params() if cfg.interpret else None,
  )

  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
  scratch = [
    _swizzled((_WGS, bk, head_dim), k.dtype),
    _swizzled((_WGS, bk, head_dim), v.dtype),
    _swizzled((stages, bq, head_dim), q.dtype),
    _swizzled((stages, bq, head_dim), do.dtype),
    plgpu.SMEM((stages, bq), jnp.float32),
    plgpu.SMEM((stages, bq), jnp.float32),
  ]
  if seg:
    scratch += [plgpu.SMEM((stages, bq), jnp.int32), plgpu.SMEM((_WGS, bk), jnp.int32)]
  scratch += [
    plgpu.Barrier(num_arrivals=3 if seg else 2, num_barriers=_WGS),  # kv_full: K, V (, ids)
    plgpu.Barrier(num_arrivals=5 if seg else 4, num_barriers=stages),  # full: Q, dO, LSE, D (, ids)
    plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages),  # consumed
  ]
  if cfg.interpret:
    scratch += [plgpu.SMEM((_WGS, bk, bq), q.dtype), plgpu.SMEM((_WGS, head_dim, bq), q.dtype)]
  dk, dv = plgpu.kernel(
    functools.partial(_dkdv_kernel, cfg=cfg, block_q=bq, block_k=bk, num_stages=stages, group=group),
    out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    scratch_types=scratch,
    grid=(kv_seq_len // (_WGS * bk), num_kv_heads, batch),
    grid_names=('k', 'h', 'b'),
    kernel_name='flash_attention_mgpu_dkdv',
    **common,
  )(*args)
  if cfg.mask_kv_len:  # keys at or past the length get no gradient (one fused pass over dK, dV)
    keep = (jnp.arange(kv_seq_len, dtype=jnp.int32)[None, :] < kv_lens[:, None])[:, :, None, None]
    dk, dv = jnp.where(keep, dk, jnp.zeros((), dk.dtype)), jnp.where(keep, dv, jnp.zeros((), dv.dtype))
  if cfg.interpret:
    # Interpreted, every simulated thread waiting at a barrier holds one of XLA:CPU's pool threads, and
    # XLA:CPU runs independent ops concurrently: two kernels in flight need twice the threads. The dQ
    # kernel's inputs pass through a barrier with dK and dV, so it starts after the dK/dV kernel ends.
    args, dk, dv = lax.optimization_barrier((args, dk, dv))

  bq, bk = blocks.block_q_dq, blocks.block_k_dq
  scratch = [
    _swizzled((_WGS, bq, head_dim), q.dtype),
    _swizzled((_WGS, bq, head_dim), do.dtype),
    plgpu.SMEM((_WGS, bq), jnp.float32),
    plgpu.SMEM((_WGS, bq), jnp.float32),
    _swizzled((stages, bk, head_dim), k.dtype),
    _swizzled((stages, bk, head_dim), v.dtype),
  ]
  if seg:
    scratch += [plgpu.SMEM((_WGS, bq), jnp.int32), plgpu.SMEM((stages, bk), jnp.int32)]
  scratch += [
    plgpu.Barrier(num_arrivals=5 if seg else 4, num_barriers=_WGS),  # q_full: Q, dO, LSE, D (, ids)
    plgpu.Barrier(num_arrivals=3 if seg else 2, num_barriers=stages),  # full: K, V (, ids)
    plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages),  # consumed
  ]
  if cfg.interpret:
    scratch += [plgpu.SMEM((_WGS, bq, bk), q.dtype), plgpu.SMEM((_WGS, head_dim, bk), q.dtype)]
  dq = plgpu.kernel(
    functools.partial(_dq_kernel, cfg=cfg, block_q=bq, block_k=bk, num_stages=stages, group=group),
    out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
    scratch_types=scratch,
    grid=(q_seq_len // (_WGS * bq), num_heads, batch),
    grid_names=('q', 'h', 'b'),
    kernel_name='flash_attention_mgpu_dq',
    **common,
  )(*args)
  return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# custom_vjp over padded inputs, and the public function
# ----------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_lens, kv_lens, q_seg, kv_seg, cfg):
  return _fwd_call(q, k, v, q_lens, kv_lens, q_seg, kv_seg, cfg)[0]


def _flash_fwd(q, k, v, q_lens, kv_lens, q_seg, kv_seg, cfg):
  o, lse = _fwd_call(q, k, v, q_lens, kv_lens, q_seg, kv_seg, cfg)
  return o, (q, k, v, o, lse, q_lens, kv_lens, q_seg, kv_seg)


def _flash_bwd(cfg, res, do):
  q, k, v, o, lse, q_lens, kv_lens, q_seg, kv_seg = res
  dq, dk, dv = _bwd_call(q, k, v, o, lse, do, q_lens, kv_lens, q_seg, kv_seg, cfg)
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_multiples(blocks: BlockSizes) -> tuple[int, int]:
  """Query and key lengths are padded to multiples of every CTA's rows along them (all multiples of 64,
  so the largest is a multiple of the others when they are powers of two; lcm in general)."""
  q_mult = math.lcm(_WGS * blocks.block_q, blocks.block_q_dkv, _WGS * blocks.block_q_dq)
  kv_mult = math.lcm(blocks.block_k, _WGS * blocks.block_k_dkv, blocks.block_k_dq)
  return q_mult, kv_mult


def _pad_axis(x, multiple: int, axis: int):
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnames=('cfg',))
def _flash_padded(query, key, value, q_lens, kv_lens, q_seg, kv_seg, cfg: _Config):
  q_len, head_dim = query.shape[1], query.shape[3]
  q_mult, kv_mult = _pad_multiples(cfg.blocks)
  # Zero head-dim padding changes no logit and no output column that is kept.
  pad_d = functools.partial(_pad_axis, multiple=_HEAD_DIM_MULTIPLE, axis=3)
  q = _pad_axis(pad_d(query), q_mult, 1)
  k, v = (_pad_axis(pad_d(x), kv_mult, 1) for x in (key, value))
  if q_seg is not None:
    q_seg, kv_seg = _pad_axis(q_seg, q_mult, 1), _pad_axis(kv_seg, kv_mult, 1)
  out = _flash(q, k, v, q_lens, kv_lens, q_seg, kv_seg, cfg)
  return out[:, :q_len, :, :head_dim]


def flash_attention_mosaic_gpu(
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
) -> Array:
  """Pallas Mosaic GPU flash attention (Hopper): query [B, T, N, D], key/value [B, S, K, D] -> [B, T, N, D].

  Arguments as `jax.nn.dot_product_attention` (exact semantics in `kernels/reference.py`), plus
  segment_ids (one [B, T] array, or a (query_ids [B, T], key_value_ids [B, S]) pair), block_sizes
  (default `BlockSizes.get_default(head_dim)`) and interpret (run in Pallas's GPU interpreter on CPU).
  bfloat16/float16 only; differentiable in query, key and value.
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
  return flash_attention_mosaic_gpu_from_spec(
    query, key, value, scale, spec, block_sizes=block_sizes, interpret=interpret
  )


def compiles_for(head_dim: int, dtype) -> bool:
  """Whether this kernel takes the head_dim and dtype (compiled and interpreted alike)."""
  return head_dim <= MAX_HEAD_DIM and jnp.dtype(dtype) in [jnp.dtype(d) for d in DTYPES]


def flash_attention_mosaic_gpu_from_spec(
  query,
  key,
  value,
  scale: float,
  spec: reference.MaskSpec,
  *,
  block_sizes: BlockSizes | None = None,
  interpret: bool = False,
) -> Array:
  """`flash_attention_mosaic_gpu` on validated inputs (scale and MaskSpec from `reference.check_inputs`):
  the entry `flash_attention(backend='mosaic_gpu')` dispatches to. Checks only this kernel's limits."""
  batch, q_len, _, head_dim = query.shape
  kv_len = key.shape[1]
  if jnp.dtype(query.dtype) not in [jnp.dtype(d) for d in DTYPES]:
    raise ValueError(
      f'query dtype {query.dtype} is not taken by the Mosaic GPU kernel (wgmma inputs): use bfloat16 or '
      "float16, or backend='triton' / implementation='chunked' for float32."
    )
  if head_dim > MAX_HEAD_DIM:
    raise ValueError(
      f'query head_dim must be at most {MAX_HEAD_DIM} for the Mosaic GPU kernel, got {head_dim}.'
    )
  if not isinstance(interpret, bool):
    raise ValueError(f'interpret must be a bool for the Mosaic GPU kernel, got {interpret!r}.')
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(head_dim)
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f'block_sizes must be a flash_attention_mosaic_gpu.BlockSizes, got {type(block_sizes)}.')
  block_sizes.validate()
  _, kv_mult = _pad_multiples(block_sizes)
  cfg = _Config(
    scale=scale,
    is_causal=spec.is_causal,
    window=spec.local_window,  # clipped to the sequence span by check_inputs (int32-safe)
    has_segments=spec.q_segment_ids is not None,
    mask_kv_len=spec.key_value_seq_lengths is not None or kv_len % kv_mult != 0,
    blocks=block_sizes,
    interpret=interpret,
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
