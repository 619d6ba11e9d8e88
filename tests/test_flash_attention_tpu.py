"""The Pallas Mosaic TPU flash-attention kernel: the shared sweep (tests/attention_harness.py) in Pallas
TPU interpret mode, its argument errors, and its lowering to Mosaic TPU custom calls.

On CPU the kernels run in Pallas TPU interpret mode (`interpret=True`, as the dispatcher calls it), which
starts every buffer as NaN (`pltpu.InterpretParams(uninitialized_memory='nan')`, the default;
`test_interpreter_poisons_unwritten_outputs` checks it). An output element that no grid step writes stays
NaN; one that a later grid step forgets holds what an earlier step left in the shared VMEM buffer, a value
of another block: both fail the comparison with float64. `TestFlashAttentionTpuCompiled` runs the same
tests compiled on a TPU when one is present and is skipped otherwise.
"""

import jax
import jax.numpy as jnp
import pytest
from attention_harness import AttentionHarness, Case, make_inputs
from jax.experimental.pallas import tpu as pltpu

from lstm_attn.kernels.flash_attention_tpu import BlockSizes, flash_attention_tpu

# A different tiling in each kernel, q tiles spanning several kv tiles (forward) and kv tiles spanning
# several q tiles (dK/dV), tiles larger than the sequence (q padded to 256, kv to 256).
MIXED = BlockSizes(
  block_q=256, block_kv=128, block_q_dkv=32, block_kv_dkv=128, block_q_dq=64, block_kv_dq=256
)


class TestFlashAttentionTpuInterpret(AttentionHarness):
  """The TPU kernels in Pallas TPU interpret mode (CPU): NaN-filled buffers, out-of-bounds reads raise.

  The sweep runs the default 128 x 128 tiles (query tiles shrunk for short queries): the kv tile cannot go
  below 128 lanes, so the sweep's 133-333 lengths already span several tiles, and smaller query tiles only
  multiply the interpreter's grid steps. `test_mixed_tiles` tiles each kernel differently.
  """

  INTERPRET = True
  BLOCK_SIZES = None  # the defaults
  POISON_INTERPRET = pltpu.InterpretParams()
  COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}

  def attention(self, q, k, v, **mask_kwargs):
    return flash_attention_tpu(q, k, v, block_sizes=self.block_sizes, interpret=self.INTERPRET, **mask_kwargs)

  def test_mixed_tiles(self, request):
    case = Case('mixed_tiles_causal_window', (1, 200, 200, 2, 1, 64), is_causal=True, window=(40, 0))
    case = self.prepare(request, case)
    self.block_sizes = MIXED
    self.check_against_float64(case)


class TestFlashAttentionTpuCompiled(TestFlashAttentionTpuInterpret):
  """The same tests compiled for a real TPU; skipped elsewhere."""

  INTERPRET = False
  POISON_INTERPRET = None
  COMPILER_OPTIONS = None

  @pytest.fixture(autouse=True)
  def _needs_tpu(self):
    if jax.default_backend() != 'tpu':
      pytest.skip('no TPU')


def _qkv(q_shape=(1, 8, 2, 64), kv_shape=(1, 8, 2, 64), dtype=jnp.float32):
  return jnp.zeros(q_shape, dtype), jnp.zeros(kv_shape, dtype), jnp.zeros(kv_shape, dtype)


@pytest.mark.parametrize(
  'bad, match',
  [
    (lambda: flash_attention_tpu(*_qkv(q_shape=(8, 2, 64))), 'query must have rank 4'),
    (lambda: flash_attention_tpu(*_qkv(q_shape=(1, 8, 3, 64))), r'query heads \(3\).*key/value heads \(2\)'),
    (lambda: flash_attention_tpu(jnp.zeros((1, 8, 2, 64)), *_qkv(dtype=jnp.bfloat16)[1:]), 'share a dtype'),
    (lambda: flash_attention_tpu(*_qkv(dtype=jnp.float64)), 'float64'),
    (lambda: flash_attention_tpu(*_qkv(), block_sizes=(128, 128)), 'block_sizes'),
    (lambda: flash_attention_tpu(*_qkv(), interpret='yes'), 'interpret'),
    (lambda: BlockSizes(block_q=100), r'BlockSizes.block_q must be a positive multiple of 8.*100'),
    (lambda: BlockSizes(block_kv_dq=64), r'BlockSizes.block_kv_dq must be a positive multiple of 128'),
    (lambda: BlockSizes(block_q_dkv=0), 'block_q_dkv'),
    (
      lambda: flash_attention_tpu(*_qkv(), query_seq_lengths=jnp.zeros((2,), jnp.int32)),
      'query_seq_lengths must have shape',
    ),
    (lambda: flash_attention_tpu(*_qkv(), local_window_size=(-1, 2)), 'local_window_size'),
  ],
)
def test_bad_inputs_raise(bad, match):
  with jax.enable_x64(True), pytest.raises(ValueError, match=match):
    bad()


def test_lowers_to_mosaic_tpu(monkeypatch):
  """Without a TPU: all three kernels, every mask, bf16, lower to Mosaic TPU custom calls (as for a v5e).

  This runs Pallas's TPU lowering rules and block-shape checks; libtpu's Mosaic compiler only runs in
  `TestFlashAttentionTpuCompiled`. The device kind is faked through a private module: skipped if it moves.
  """
  tpu_info = pytest.importorskip('jax._src.pallas.mosaic.tpu_info')
  if not all(hasattr(tpu_info, n) for n in ('get_device_kind', 'get_num_device_cores', 'get_tpu_info')):
    pytest.skip('jax._src.pallas.mosaic.tpu_info changed')
  monkeypatch.setattr(tpu_info, 'get_device_kind', lambda: 'TPU v5e')
  monkeypatch.setattr(tpu_info, 'get_num_device_cores', lambda: 1)
  tpu_info.get_tpu_info.cache_clear()
  case = Case(
    'lowering',
    (2, 200, 200, 4, 2, 40),
    dtype='bfloat16',
    is_causal=True,
    window=(30, 5),
    q_lens=(200, 100),
    segments='packed',
    seed=5,
  )
  (q, k, v, ct), kw, _ = make_inputs(case)
  fn = lambda *a: flash_attention_tpu(*a, **kw)
  grads = lambda q, k, v, ct: jax.vjp(fn, q, k, v)[1](ct)
  try:
    text = jax.jit(grads).trace(q, k, v, ct).lower(lowering_platforms=('tpu',)).as_text()
  finally:
    tpu_info.get_tpu_info.cache_clear()
  for kernel in ('_fwd_kernel', '_dkv_kernel', '_dq_kernel'):
    assert f'kernel_name = "{kernel}"' in text
  assert text.count('tpu_custom_call') == 3
