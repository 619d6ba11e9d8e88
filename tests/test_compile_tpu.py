"""Deviceless compile checks for TPU v5e and v6e: the real Mosaic compiler, through libtpu's topologies.

Every case of kernels/compile_sweep.py, forward and forward+VJP, on v5e at head dims 64, 128 and 256 in
bf16 (fp16, computed in fp32, and fp32 on four cases) and on v6e at 128 and 256 in bf16 (its MXU is 256
wide). v6e skips head dim 64 and the other dtypes to keep the suite in its CI time: a trade-off, not a
proof that they lower the same way (they compiled on both chips while v6e ran the whole grid, to
2026-12-02). Mosaic rejects kernels it cannot lay out, which interpret mode never does. The forward
pass must need no temporary HBM (it once wrote a 128-lane log-sum-exp that only the backward pass reads),
like JAX's bundled TPU flash attention, which goes through the same harness as the control. Skipped,
with the reason, where libtpu is missing.
"""

import jax.numpy as jnp
import pytest

from lstm_attn.kernels import compile_sweep as sweep
from lstm_attn.kernels import deviceless

_MIXED = sweep.MIXED_CASES
_HEAD_DIMS = {'v5e': (64, 128, 256), 'v6e': (128, 256)}
GRID = [(t, 'bfloat16', d, c.name) for t, dims in _HEAD_DIMS.items() for d in dims for c in sweep.CASES] + [
  ('v5e', dt, 128, c) for dt in ('float16', 'float32') for c in _MIXED
]


def _skip_unless(target):
  reason = deviceless.available(target)
  if reason is not None:
    pytest.skip(f'no deviceless {target} compile: {reason}')


@pytest.mark.parametrize('mode', ['fwd', 'vjp'])
@pytest.mark.parametrize('target, dtype, head_dim, case', GRID, ids=['-'.join(map(str, g)) for g in GRID])
def test_tpu_kernels_compile(target, dtype, head_dim, case, mode):
  _skip_unless(target)
  fn, args = sweep.build('tpu', sweep.CASE_BY_NAME[case], head_dim, dtype, mode)
  compiled = deviceless.compile_for(fn, *args, target=target)
  assert 'tpu_custom_call' in compiled.as_text()
  if mode == 'fwd':
    # Nothing but the kernel's own output: no LSE, and transposes/pads fused into the operands.
    temp = compiled.memory_analysis().temp_size_in_bytes
    if dtype == 'bfloat16' and head_dim % 128 == 0 and case in ('no_mask', 'causal', 'gqa_8_2'):
      assert temp == 0, f'forward needs {temp} bytes of temporary HBM'


@pytest.mark.parametrize('target', ['v5e', 'v6e'])
def test_forward_needs_no_temporary_memory_like_jax_flash(target):
  # The shape: batch 2, 2048 tokens, 8 heads, head dim 128, bf16, causal. JAX's kernel is the
  # control (0 bytes); ours wrote a [B, H, T, 128] fp32 LSE (16.8 MB) that no forward-only caller reads.
  _skip_unless(target)
  case = sweep.Case('issue', q_len=2048, kv_len=2048, is_causal=True)
  temps = {}
  for kernel in ('tpu', 'jax_tpu_flash'):
    fn, args = sweep.build(kernel, case, 128, jnp.bfloat16, 'fwd')
    temps[kernel] = deviceless.compile_for(fn, *args, target=target).memory_analysis().temp_size_in_bytes
  assert temps == {'tpu': 0, 'jax_tpu_flash': 0}, temps


@pytest.mark.parametrize('mode', ['fwd', 'vjp'])
@pytest.mark.parametrize('case', ['no_mask', 'causal', 'segments'])
def test_control_jax_tpu_flash_compiles(case, mode):
  _skip_unless('v5e')
  fn, args = sweep.build('jax_tpu_flash', sweep.CASE_BY_NAME[case], 128, jnp.bfloat16, mode)
  assert 'tpu_custom_call' in deviceless.compile_for(fn, *args, target='v5e').as_text()
