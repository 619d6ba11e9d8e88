"""The deviceless compile sweep of the attention kernels, shared by tests/test_compile_gpu.py,
tests/test_compile_tpu.py and experiments/kernel_report.py: which cases, and the function each compiles.

A case is a shape and a mask; `build(kernel, case, head_dim, dtype, mode)` returns (fn, args): fn takes
abstract arrays, mode 'fwd' compiles the forward pass, 'vjp' the forward and its VJP with a cotangent
argument (so nothing is constant-folded, as with a real random cotangent). The mask arrays (lengths,
segment ids) are arguments too, never constants, so the kernels compile their general paths.

JAX's bundled kernels are the control: `jax_triton_mha` (jax.experimental.pallas.ops.gpu.attention) and
`jax_tpu_flash` (jax.experimental.pallas.ops.tpu.flash_attention) go through the same harness; if they
did not compile, the harness, not our kernel, would be at fault. They support fewer features, so they
run on the cases they accept (no GQA, no lengths, no windows; block-multiple lengths).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lstm_attn.kernels import flash_attention_tpu, flash_attention_triton
from lstm_attn.kernels.flash_attention import flash_attention


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  q_len: int = 1024
  kv_len: int = 1024
  heads: int = 8
  kv_heads: int = 8
  is_causal: bool = False
  lengths: bool = False  # query and key/value lengths (ragged batch)
  segments: bool = False
  window: tuple[int, int] | None = None
  batch: int = 2

  @property
  def plain(self) -> bool:
    """What JAX's bundled kernels take: no GQA, no lengths, no windows, equal block-multiple lengths."""
    return (
      self.heads == self.kv_heads
      and not (self.lengths or self.window)
      and self.q_len == self.kv_len
      and self.q_len % 128 == 0
    )


CASES = (
  Case('no_mask'),
  Case('causal', is_causal=True),
  Case('gqa_8_2', kv_heads=2),
  Case('causal_gqa_ragged', kv_heads=2, is_causal=True, lengths=True),
  Case('lengths', lengths=True),
  Case('segments', segments=True),
  Case('local_window', window=(128, 0)),
  Case('q_ne_kv', q_len=512, kv_len=1024),
  Case('not_block_multiple', q_len=1000, kv_len=1000, is_causal=True),
)
CASE_BY_NAME = {c.name: c for c in CASES}
# The cases that exercise different code (no mask; every mask at once; padding; segment ids): the subset
# the tests compile in the less common dtypes.
MIXED_CASES = ('no_mask', 'causal_gqa_ragged', 'not_block_multiple', 'segments')

OUR_KERNELS = ('triton', 'tpu')
CONTROL_KERNELS = ('jax_triton_mha', 'jax_tpu_flash')


def _mask_args(case: Case):
  """Abstract mask arrays of a case (int32 lengths [batch], segment ids [batch, len])."""
  args = {}
  if case.lengths:
    args['query_seq_lengths'] = jax.ShapeDtypeStruct((case.batch,), jnp.int32)
    args['key_value_seq_lengths'] = jax.ShapeDtypeStruct((case.batch,), jnp.int32)
  if case.segments:
    args['segment_ids'] = (
      jax.ShapeDtypeStruct((case.batch, case.q_len), jnp.int32),
      jax.ShapeDtypeStruct((case.batch, case.kv_len), jnp.int32),
    )
  return args


def block_sizes(kernel: str, head_dim: int, dtype, q_len: int, overrides: dict | None = None):
  """The block sizes our kernel uses by default at this shape, with `overrides` (field -> value) applied."""
  if kernel == 'triton':
    blocks = flash_attention_triton.BlockSizes.get_default(head_dim, dtype)
  else:
    blocks = flash_attention_tpu.BlockSizes.get_default(q_len)
  return dataclasses.replace(blocks, **(overrides or {}))


def _ours(backend: str, case: Case, blocks):
  def attend(q, k, v, mask):
    return flash_attention(
      q,
      k,
      v,
      is_causal=case.is_causal,
      local_window_size=case.window,
      block_sizes=blocks,
      backend=backend,
      interpret=False,
      **mask,
    )

  return attend


def _jax_triton_mha(case: Case):
  from jax.experimental.pallas.ops.gpu import attention as jax_attention

  def attend(q, k, v, mask):  # [batch, seq, heads, head_dim], as ours
    seg = mask['segment_ids'][0] if 'segment_ids' in mask else None  # one array: q_len == kv_len
    return jax_attention.mha(q, k, v, seg, causal=case.is_causal)

  return attend


def _jax_tpu_flash(case: Case):
  from jax.experimental.pallas.ops.tpu import flash_attention as jax_flash

  def attend(q, k, v, mask):  # [batch, heads, seq, head_dim] in JAX's kernel
    seg = None
    if 'segment_ids' in mask:
      seg = jax_flash.SegmentIds(*mask['segment_ids'])
    t = lambda x: x.transpose(0, 2, 1, 3)
    out = jax_flash.flash_attention(t(q), t(k), t(v), segment_ids=seg, causal=case.is_causal)
    return t(out)

  return attend


def supports(kernel: str, case: Case, head_dim: int, dtype) -> bool:
  if kernel in CONTROL_KERNELS:
    if not case.plain:
      return False
    if kernel == 'jax_triton_mha':  # the sweep runs it in bf16/fp16 at head dims up to 128
      return jnp.dtype(dtype) != jnp.float32 and head_dim <= 128
  return True


def build(kernel: str, case: Case, head_dim: int, dtype, mode: str, overrides: dict | None = None):
  """(fn, args) to compile: fn(q, k, v, mask[, cotangent]) with abstract args.

  overrides: block-size fields to change from our kernel's defaults (experiments/kernel_report.py).
  """
  dtype = jnp.dtype(dtype)
  if kernel in OUR_KERNELS:
    blocks = block_sizes(kernel, head_dim, dtype, case.q_len, overrides)
    attend = _ours('gpu' if kernel == 'triton' else 'tpu', case, blocks)
  elif kernel == 'jax_triton_mha':
    attend = _jax_triton_mha(case)
  elif kernel == 'jax_tpu_flash':
    attend = _jax_tpu_flash(case)
  else:
    raise ValueError(f'kernel must be one of {OUR_KERNELS + CONTROL_KERNELS}, got {kernel!r}.')
  q = jax.ShapeDtypeStruct((case.batch, case.q_len, case.heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((case.batch, case.kv_len, case.kv_heads, head_dim), dtype)
  mask = _mask_args(case)
  if mode == 'fwd':
    return attend, (q, kv, kv, mask)
  if mode != 'vjp':
    raise ValueError(f"mode must be 'fwd' or 'vjp', got {mode!r}.")

  def fwd_and_vjp(q, k, v, mask, cotangent):
    out, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
    return out, pullback(cotangent)

  return fwd_and_vjp, (q, kv, kv, mask, q)
