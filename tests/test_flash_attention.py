"""Tests of the fused attention kernels (`kernels/flash_attention.py`, `kernels/flash_attention_triton.py`).

`TestFlashAttentionInterpret` runs the shared sweep of tests/attention_harness.py (forward and random-
cotangent VJP against float64, every mask, fully masked rows, NaN propagation) on the Triton kernels in
the Pallas interpreter on CPU, plus the tests of this kernel alone (block sizes, errors, dispatch, export);
`TestFlashAttentionGPU` reruns all of it compiled when a GPU is present (skipped otherwise), as jax-ml/jax
tests/pallas/gpu_ops_test.py does.

Unwritten outputs cannot pass: the interpreter starts every output buffer as NaN (checked by
`test_interpreter_poisons_unwritten_outputs`), NaN anywhere fails `rel_l2_error`, and the comparisons
cover whole arrays, fully masked rows included. The sweep runs with 16/32 blocks (`SMALL`) so every path
runs over several blocks, partial blocks included; one case runs the default tiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_harness import AttentionHarness

from lstm_attn.kernels import flash_attention_triton as ft
from lstm_attn.kernels.flash_attention import flash_attention

SMALL = ft.BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)
TINY = ft.BlockSizes(16, 16, 16, 16, 16, 16)


class TestFlashAttentionInterpret(AttentionHarness):
  """The Triton kernels in the Pallas interpreter (CPU)."""

  INTERPRET = True
  BLOCK_SIZES = SMALL
  POISON_INTERPRET = True
  # The interpreted kernels are large XLA while loops: a lower optimisation level compiles ~30% faster.
  COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}

  def attention(self, q, k, v, **mask_kwargs):
    return flash_attention(
      q, k, v, backend='gpu', interpret=self.INTERPRET, block_sizes=self.block_sizes, **mask_kwargs
    )

  @pytest.fixture(autouse=True)
  def _needs_device(self):
    if not self.INTERPRET and jax.default_backend() != 'gpu':
      pytest.skip('compiled Triton kernels need a GPU')

  def test_same_result_for_every_block_size(self):
    # Different tilings visit different masked/unmasked block splits and paddings; all must agree.
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 77, 2, 32)), jnp.float32) for _ in range(3))
    outs = [
      flash_attention(
        q,
        k,
        v,
        is_causal=True,
        local_window_size=(20, 3),
        backend='gpu',
        interpret=self.INTERPRET,
        block_sizes=bs,
      )
      for bs in (TINY, SMALL, None)
    ]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[0], outs[2], rtol=1e-5, atol=1e-6)

  @pytest.mark.parametrize(
    'kwargs, match',
    [
      (dict(query=jnp.zeros((2, 8, 4))), 'query must have rank 4'),
      (dict(key=jnp.zeros((1, 8, 3, 32)), value=jnp.zeros((1, 8, 3, 32))), 'multiple of key/value heads'),
      (dict(key=jnp.zeros((1, 8, 2, 32), jnp.bfloat16)), 'share a dtype'),
      (dict(block_sizes=ft.BlockSizes(block_q=24)), 'block_sizes.block_q must be a power of two'),
      (dict(block_sizes=ft.BlockSizes(block_k_dq=8)), 'block_sizes.block_k_dq must be a power of two'),
      (dict(block_sizes=(128, 64)), 'block_sizes must be'),
      (dict(backend='cuda'), 'backend must be one of'),
      (dict(query_seq_lengths=jnp.ones((3,), jnp.int32)), 'query_seq_lengths must have shape'),
      (dict(local_window_size=(-1, 2)), 'local_window_size must be non-negative'),
      (dict(interpret='yes'), 'interpret must be a bool'),
    ],
  )
  def test_bad_input_raises_value_error(self, kwargs, match):
    args = dict(query=jnp.zeros((1, 8, 4, 32)), key=jnp.zeros((1, 8, 2, 32)), value=jnp.zeros((1, 8, 2, 32)))
    args.update({name: kwargs.pop(name) for name in list(kwargs) if name in args})
    kwargs.setdefault('interpret', self.INTERPRET)
    with pytest.raises(ValueError, match=match):
      flash_attention(
        args['query'], args['key'], args['value'], backend=kwargs.pop('backend', 'gpu'), **kwargs
      )

  def test_head_dim_over_256_and_float64_compiled_raise(self):
    x = jnp.zeros((1, 8, 1, 320))
    with pytest.raises(ValueError, match='head_dim must be at most 256'):
      ft.flash_attention_triton(x, x, x, interpret=True)
    with jax.enable_x64(True):
      x = jnp.zeros((1, 8, 1, 32), jnp.float64)
      with pytest.raises(ValueError, match='float64 runs only with interpret=True'):
        ft.flash_attention_triton(x, x, x, interpret=False)

  @pytest.mark.parametrize('backend', [None, 'gpu', 'triton', 'tpu'])
  def test_dispatch(self, backend, monkeypatch):
    # Which kernels each backend traces, compiled (for the platforms they run on) and interpreted (for
    # the rest): the choice is made at lowering by lax.platform_dependent, not from the default device.
    from lstm_attn.kernels import flash_attention_tpu

    # flash_attention validates once and hands each backend's validated-input entry the MaskSpec.
    calls = set()
    for module, name in ((ft, 'flash_attention_triton'), (flash_attention_tpu, 'flash_attention_tpu')):

      def fake(query, key, value, scale, spec, *, _name=name, **kw):
        calls.add((_name, kw['interpret'], spec.is_causal, spec.local_window))
        return query

      monkeypatch.setattr(module, f'{name}_from_spec', fake)
    x = jnp.zeros((1, 8, 2, 32))
    jax.jit(lambda x: flash_attention(x, x, x, is_causal=True, local_window_size=3, backend=backend))(x)
    triton, tpu, w = 'flash_attention_triton', 'flash_attention_tpu', (3, 3)
    expected = {
      None: {(triton, False, True, w), (tpu, False, True, w), (triton, True, True, w)},
      'tpu': {(tpu, False, True, w), (tpu, True, True, w)},
    }.get(backend, {(triton, False, True, w), (triton, True, True, w)})
    assert calls == expected

  def test_pallas_exported_for_gpu_from_a_cpu_host_holds_the_triton_kernel(self):
    # jax.export lowers for the named platform with no device: the GPU program must hold the compiled
    # Triton kernel, while the same function lowered here for the CPU holds the interpreter's loops.
    if not self.INTERPRET:
      pytest.skip('a CPU-host check')
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, is_causal=True))
    x = jax.ShapeDtypeStruct((1, 64, 2, 32), jnp.bfloat16)
    triton_call = '__gpu$xla.gpu.triton'
    allow = [jax.export.DisabledSafetyCheck.custom_call(triton_call)]
    gpu = jax.export.export(fn, platforms=['cuda'], disabled_checks=allow)(x, x, x).mlir_module()
    assert gpu.count(triton_call) == 1 and 'stablehlo.while' not in gpu
    cpu = fn.lower(x, x, x).as_text()
    assert triton_call not in cpu and 'tpu_custom_call' not in cpu and 'stablehlo.while' in cpu


class TestFlashAttentionGPU(TestFlashAttentionInterpret):
  """The same tests, compiled with Triton; skipped without a GPU."""

  INTERPRET = False
  POISON_INTERPRET = None
  COMPILER_OPTIONS = None
