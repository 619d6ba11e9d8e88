"""Deviceless compile checks for an H200 (sm_90a): every kernel, forward and forward+VJP, every case.

XLA:GPU's whole pipeline runs on this CPU host (kernels/deviceless.py): Pallas -> Triton IR -> PTX ->
ptxas -> cubin. A kernel that only passes interpret mode is not done: here it must compile, and at head
dims 64 and 128 every kernel must have 0 spill bytes, no wgmma serialised for lack of registers (ptxas
C7511) and no mma.sync (on sm_90a a sign that an operand needed transposing in registers). JAX's bundled
Triton attention goes through the same harness as the control. Skipped, with the reason, where the CUDA
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

# (dtype, head dims, cases): the full sweep in bf16 at 64 and 128; fp16, fp32 and head dim 256 on the
# cases that exercise different code (no mask, every mask at once, ragged lengths).
_MIXED = ('no_mask', 'causal_gqa_ragged', 'not_block_multiple', 'segments')
GRID = (
  [('bfloat16', d, c.name) for d in (64, 128) for c in sweep.CASES]
  + [('float16', d, c) for d in (64, 128) for c in _MIXED]
  + [('bfloat16', 256, c) for c in _MIXED]
  + [('float32', d, c) for d in (64, 128) for c in _MIXED[:2]]
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
  if head_dim > 128:
    return  # compiles; spills are only asserted where the defaults are meant to be spill-free
  for name in expected:
    k = kernels[name]
    assert k.spill_bytes == 0 and k.stack_bytes == 0, f'{name} spills: {k}'
    assert not k.wgmma_serialized, f'{name}: ptxas C7511, wgmma serialized for lack of registers: {k}'
    if dtype != 'float32':
      assert k.wgmma > 0 and k.mma_sync == 0, f'{name} does not use wgmma only: {k}'
    assert k.dynamic_shared_bytes <= 232448, f'{name} needs more shared memory than an H200 block has'


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
