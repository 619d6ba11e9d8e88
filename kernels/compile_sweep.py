"""The deviceless compile sweep of the attention kernels, shared by tests/test_compile_gpu.py,
tests/test_compile_tpu.py and experiments/kernel_report.py: which cases, and the function each compiles.

A case is a shape and a mask; `build(kernel, case, head_dim, dtype, mode)` returns (fn, args): fn takes
abstract arrays, mode 'fwd' compiles the forward pass, 'vjp' the forward and its VJP with a cotangent
argument (so nothing is constant-folded, as with a real random cotangent). The mask arrays (lengths,
segment ids) are arguments too, never constants, so the kernels compile their general paths.

JAX's bundled kernels are the control: `jax_triton_mha` (jax.experimental.pallas.ops.gpu.attention),
`jax_attention_mgpu` (jax.experimental.pallas.ops.gpu.attention_mgpu, Mosaic GPU, float16 only, no causal
backward) and `jax_tpu_flash` (jax.experimental.pallas.ops.tpu.flash_attention) go through the same
harness; if they did not compile, the harness, not our kernel, would be at fault. They support fewer
features, so they run on the cases they accept (no GQA, no lengths, no windows; block-multiple lengths).

Mosaic GPU kernels are not Triton fusions: XLA hands them to the CUDA plugin, which compiles them to PTX
and runs ptxas inside the same XLA compile. `compile_mosaic_gpu` sets `MOSAIC_GPU_DUMP_TO` for that compile
and `mosaic_gpu_resources` reads what the plugin wrote (the PTX, ptxas's report, the launch's dynamic
shared memory) into the same `deviceless.KernelResources` as the Triton kernels.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import tempfile

import jax
import jax.numpy as jnp

from lstm_attn.kernels import (
  deviceless,
  flash_attention_mosaic_gpu,
  flash_attention_tpu,
  flash_attention_triton,
)
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

OUR_KERNELS = ('triton', 'mosaic_gpu', 'tpu')
CONTROL_KERNELS = ('jax_triton_mha', 'jax_attention_mgpu', 'jax_tpu_flash')
MOSAIC_GPU_KERNELS = ('mosaic_gpu', 'jax_attention_mgpu')  # compiled by the CUDA plugin, not as Triton


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
  elif kernel == 'mosaic_gpu':
    blocks = flash_attention_mosaic_gpu.BlockSizes.get_default(head_dim)
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


def _jax_attention_mgpu(case: Case, head_dim: int):
  from jax.experimental.pallas.ops.gpu import attention_mgpu

  block_kv = 128 if head_dim <= 128 else 64  # its own main()'s choice; 128 at 256 exceeds shared memory
  config = attention_mgpu.TuningConfig(
    block_q=64,
    block_kv=block_kv,
    max_concurrent_steps=2,
    causal=case.is_causal,
    block_q_dkv=64,
    block_kv_dkv=64,
    block_q_dq=64,
    block_kv_dq=64,
  )

  def attend(q, k, v, mask):  # [batch, seq, heads, head_dim], as ours; no masks but causal
    del mask
    return attention_mgpu.attention(q, k, v, config)

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
    if kernel == 'jax_attention_mgpu':  # float16 only ("Mixed input dtypes" otherwise), no segment ids
      return jnp.dtype(dtype) == jnp.float16 and head_dim % 64 == 0 and not case.segments
  if kernel == 'mosaic_gpu':
    return flash_attention_mosaic_gpu.compiles_for(head_dim, dtype)
  return True


def build(kernel: str, case: Case, head_dim: int, dtype, mode: str, overrides: dict | None = None):
  """(fn, args) to compile: fn(q, k, v, mask[, cotangent]) with abstract args.

  overrides: block-size fields to change from our kernel's defaults (experiments/kernel_report.py).
  """
  dtype = jnp.dtype(dtype)
  if kernel in OUR_KERNELS:
    blocks = block_sizes(kernel, head_dim, dtype, case.q_len, overrides)
    attend = _ours({'triton': 'gpu'}.get(kernel, kernel), case, blocks)
  elif kernel == 'jax_triton_mha':
    attend = _jax_triton_mha(case)
  elif kernel == 'jax_attention_mgpu':
    attend = _jax_attention_mgpu(case, head_dim)
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


def compile_mosaic_gpu(fn, *args, dump_dir: str):
  """`deviceless.compile_for(fn, *args, target='h200')` with the CUDA plugin's Mosaic GPU dumps (PTX,
  ptxas report, MLIR) written to dump_dir. The plugin reads MOSAIC_GPU_DUMP_TO at each compile; it is
  restored afterwards. Returns the `jax.stages.Compiled`."""
  previous = os.environ.get('MOSAIC_GPU_DUMP_TO')
  os.environ['MOSAIC_GPU_DUMP_TO'] = dump_dir
  try:
    return deviceless.compile_for(fn, *args, target='h200', dump_dir=dump_dir)
  finally:
    if previous is None:
      os.environ.pop('MOSAIC_GPU_DUMP_TO', None)
    else:
      os.environ['MOSAIC_GPU_DUMP_TO'] = previous


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_PTXAS_SPILLS = re.compile(r'(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads')
_PTXAS_REGISTERS = re.compile(r'Used (\d+) registers')
_DYNAMIC_SMEM = re.compile(r'dynamic_shared_memory_size %c(\d+)_i32')
_MOSAIC_THREADS = 384  # 3 warpgroups: ours and attention_mgpu alike


def mosaic_gpu_resources(dump_dir: str) -> list[deviceless.KernelResources]:
  """Every Mosaic GPU kernel the plugin compiled into dump_dir (one `<name>_<n>.ptx` / `.ptxas` pair each,
  from `compile_mosaic_gpu`), as `deviceless.KernelResources`; grid is left empty (the launch is dynamic)."""
  kernels = []
  for ptxas_path in sorted(glob.glob(os.path.join(dump_dir, '*.ptxas'))):
    base = ptxas_path[: -len('.ptxas')]
    with open(ptxas_path, encoding='utf-8') as f:
      report = f.read()
    ptx = ''
    if os.path.exists(base + '.ptx'):
      with open(base + '.ptx', encoding='utf-8') as f:
        ptx = f.read()
    smem = 0
    log = base + '.mlir-passes.log'
    if os.path.exists(log):
      with open(log, encoding='utf-8', errors='replace') as f:
        found = _DYNAMIC_SMEM.search(f.read())
      smem = int(found.group(1)) if found else 0
    entry = _PTXAS_ENTRY.search(report)
    spills = _PTXAS_SPILLS.search(report)
    registers = _PTXAS_REGISTERS.search(report)
    kernels.append(
      deviceless.KernelResources(
        name=os.path.basename(base).rsplit('_', 1)[0] if entry is None else entry.group(1),
        grid=(),
        threads=_MOSAIC_THREADS,
        dynamic_shared_bytes=smem,
        static_shared_bytes=0,
        registers=int(registers.group(1)) if registers else 0,
        spill_store_bytes=int(spills.group(2)) if spills else 0,
        spill_load_bytes=int(spills.group(3)) if spills else 0,
        stack_bytes=int(spills.group(1)) if spills else 0,
        wgmma=ptx.count('wgmma.mma_async'),
        mma_sync=ptx.count('mma.sync'),
        wgmma_serialized='C7511' in report,
      )
    )
  return kernels


def compile_and_measure(kernel: str, case: Case, head_dim: int, dtype, mode: str, overrides=None):
  """(compiled, [KernelResources]) of one sweep point on the H200, Triton or Mosaic GPU alike."""
  fn, args = build(kernel, case, head_dim, dtype, mode, overrides)
  with tempfile.TemporaryDirectory() as dump:
    if kernel in MOSAIC_GPU_KERNELS:
      compiled = compile_mosaic_gpu(fn, *args, dump_dir=dump)
      return compiled, mosaic_gpu_resources(dump)
    compiled = deviceless.compile_for(fn, *args, target='h200', dump_dir=dump)
    return compiled, deviceless.gpu_kernel_resources(dump)
