"""Deviceless compile checks for an H200 (sm_90a): every kernel, forward and forward+VJP, every case.

XLA:GPU's whole pipeline runs on this CPU host (kernels/deviceless.py): Pallas -> Triton IR -> PTX ->
ptxas -> cubin (Mosaic GPU kernels: MLIR -> PTX -> ptxas inside the CUDA plugin). A kernel that only
passes interpret mode is not done: here it must compile, and in bf16 and fp16 at every head dim (64, 128,
256) every kernel must have 0 spill bytes, no wgmma serialised for lack of registers (ptxas C7511) and no
mma.sync (on sm_90a a sign that an operand needed transposing in registers). JAX's bundled Triton and
Mosaic GPU attention go through the same harness as the controls. Skipped, with the reason, where the CUDA
plugin or ptxas is missing; `.ci/run` installs them (`pip install -e '.[compile]'`).
"""

import jax
import jax.numpy as jnp
import pytest

from lstm_attn.attention import dot_product_attention
from lstm_attn.kernels import compile_sweep as sweep
from lstm_attn.kernels import deviceless

pytestmark = pytest.mark.skipif(
  deviceless.available('h200') is not None,
  reason=f'no deviceless H200 compile: {deviceless.available("h200")}',
)

# (dtype, head dim, case): every case in bf16 and fp16 at head dims 64 and 128 and in bf16 at 256; fp32
# (TF32x3 products on the tensor cores) on the cases that exercise different code.
_MIXED = sweep.MIXED_CASES
GRID = (
  [(dt, d, c.name) for dt in ('bfloat16', 'float16') for d in (64, 128) for c in sweep.CASES]
  + [('bfloat16', 256, c.name) for c in sweep.CASES]
  + [('float32', d, c) for d in (64, 128) for c in _MIXED]
)


def _compile(kernel, case, head_dim, dtype, mode, tmp_path):
  fn, args = sweep.build(kernel, sweep.CASE_BY_NAME[case], head_dim, dtype, mode)
  deviceless.compile_for(fn, *args, target='h200', dump_dir=str(tmp_path))
  return deviceless.gpu_kernel_resources(str(tmp_path))


@pytest.mark.parametrize('mode', ['fwd', 'vjp'])
@pytest.mark.parametrize('dtype, head_dim, case', GRID, ids=[f'{d}-{h}-{c}' for d, h, c in GRID])
def test_triton_kernels_compile_without_spills(dtype, head_dim, case, mode, tmp_path):
  kernels = {k.name: k for k in _compile('triton', case, head_dim, dtype, mode, tmp_path)}
  expected = {'flash_attention_fwd'} | (
    {'flash_attention_dkdv', 'flash_attention_dq'} if mode == 'vjp' else set()
  )
  assert expected <= set(kernels), f'kernels compiled: {sorted(kernels)}'
  if dtype == 'float32':
    # Compiles. TF32x3 (three products per element, for float32 accuracy) needs ~3x the registers of a
    # bf16 product and spills at head dim 128 (kernel_report shows how much); float32 is the accuracy
    # dtype on a GPU, bf16/fp16 the speed dtypes, and those are held to no spills.
    return
  for name in expected:
    k = kernels[name]
    assert k.spill_bytes == 0 and k.stack_bytes == 0, f'{name} spills: {k}'
    assert not k.wgmma_serialized, f'{name}: ptxas C7511, wgmma serialized for lack of registers: {k}'
    assert k.wgmma > 0 and k.mma_sync == 0, f'{name} does not use wgmma only: {k}'
    assert k.dynamic_shared_bytes <= 232448, f'{name} needs more shared memory than an H200 block has'


# Mosaic GPU: a forward+VJP compile is ~20-30 s here (three kernels through the plugin's MLIR -> PTX ->
# ptxas), so the suite compiles one point, the one that exercises the most code (causal + GQA + both
# lengths: every masked and unmasked loop of all three kernels); experiments/kernel_report.py
# --kernels=mosaic_gpu compiles the whole sweep in both dtypes and every head dim (BUILD_NOTES.md table).
MOSAIC_GRID = [('bfloat16', 64, 'causal_gqa_ragged', 'vjp')]


@pytest.mark.parametrize(
  'dtype, head_dim, case, mode', MOSAIC_GRID, ids=['-'.join(map(str, g)) for g in MOSAIC_GRID]
)
def test_mosaic_gpu_kernels_compile_without_spills(dtype, head_dim, case, mode):
  _, kernels = sweep.compile_and_measure('mosaic_gpu', sweep.CASE_BY_NAME[case], head_dim, dtype, mode)
  names = {k.name: k for k in kernels}
  expected = {'flash_attention_mgpu_fwd'} | (
    {'flash_attention_mgpu_dkdv', 'flash_attention_mgpu_dq'} if mode == 'vjp' else set()
  )
  assert {f'{n}_mosaic_gpu_kernel' for n in expected} == set(names), f'kernels compiled: {sorted(names)}'
  for name, k in names.items():
    assert k.spill_bytes == 0 and k.stack_bytes == 0, f'{name} spills: {k}'
    assert not k.wgmma_serialized, f'{name}: ptxas C7511, wgmma serialized for lack of registers: {k}'
    assert k.wgmma > 0 and k.mma_sync == 0, f'{name} does not use wgmma only: {k}'
    assert 0 < k.dynamic_shared_bytes <= 232448, f'{name} needs more shared memory than an H200 block has'


def test_control_jax_attention_mgpu_compiles():
  # JAX's own Mosaic GPU attention through the same harness: if it did not compile, the harness would
  # be wrong, not our kernel.
  _, kernels = sweep.compile_and_measure(
    'jax_attention_mgpu', sweep.CASE_BY_NAME['causal'], 64, 'float16', 'fwd'
  )
  assert [k.name for k in kernels] == ['entry_mosaic_gpu_kernel'] and kernels[0].wgmma > 0, kernels


@pytest.mark.parametrize('mode', ['fwd', 'vjp'])
@pytest.mark.parametrize('case', ['no_mask', 'causal', 'segments'])
def test_control_jax_triton_mha_compiles(case, mode, tmp_path):
  # If JAX's own kernel did not compile here, the harness would be wrong, not our kernel.
  kernels = _compile('jax_triton_mha', case, 64, 'bfloat16', mode, tmp_path)
  assert any(k.name.startswith('mha') for k in kernels), [k.name for k in kernels]


def test_pallas_from_a_cpu_host_compiles_the_gpu_kernel(tmp_path):
  # implementation='pallas' chooses its kernel when lowered for a platform, not from the default device:
  # compiled for an H200 from this CPU host, the program holds the Triton kernels, not the interpreter.
  q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)

  def attend(q, k, v):
    return dot_product_attention(q, k, v, is_causal=True, implementation='pallas')

  deviceless.compile_for(attend, q, q, q, target='h200', dump_dir=str(tmp_path))
  assert 'flash_attention_fwd' in [k.name for k in deviceless.gpu_kernel_resources(str(tmp_path))]


def test_float32_beyond_head_dim_128_is_refused_by_triton_and_runs_chunked(tmp_path):
  # float32-accurate (TF32x3) tiles at head dim 256 need 262-328 KB of shared memory (> 227 KB): the
  # compiled Triton kernel refuses them by name, and flash_attention lowered for a GPU runs the chunked
  # jnp implementation instead of failing to compile.
  from lstm_attn.kernels import flash_attention_triton
  from lstm_attn.kernels.flash_attention import flash_attention

  q = jax.ShapeDtypeStruct((1, 256, 2, 256), jnp.float32)
  with pytest.raises(ValueError, match='float32 at head_dim 256'):
    deviceless.compile_for(
      lambda q, k, v: flash_attention_triton.flash_attention_triton(q, k, v, interpret=False),
      q,
      q,
      q,
      target='h200',
    )
  compiled = deviceless.compile_for(
    lambda q, k, v: flash_attention(q, k, v, is_causal=True), q, q, q, target='h200', dump_dir=str(tmp_path)
  )
  names = [k.name for k in deviceless.gpu_kernel_resources(str(tmp_path))]
  assert names and not [n for n in names if n.startswith('flash')], names  # XLA's fusions, no Triton
  assert '__gpu$xla.gpu.triton' not in compiled.as_text()


def test_head_dim_over_256_with_no_backend_named_still_reaches_the_tpu_kernel(tmp_path):
  # Every platform's branch is traced: Triton (which stops at 256) must not reject what TPU takes.
  from lstm_attn.kernels.flash_attention import flash_attention

  q = jax.ShapeDtypeStruct((1, 128, 2, 512), jnp.bfloat16)
  attend = lambda q, k, v: flash_attention(q, k, v, is_causal=True)
  deviceless.compile_for(attend, q, q, q, target='h200', dump_dir=str(tmp_path))  # chunked there
  if deviceless.available('v5e') is None:
    assert 'tpu_custom_call' in deviceless.compile_for(attend, q, q, q, target='v5e').as_text()
