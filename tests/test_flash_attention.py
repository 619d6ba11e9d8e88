"""Tests of the fused attention kernels (`kernels/flash_attention.py`, `kernels/flash_attention_triton.py`).

Forward and gradients (random cotangents through jax.vjp) against `reference.mha_reference` computed in
float64 on the same inputs, by relative L2 error with per-dtype tolerances. `TestFlashAttentionInterpret`
runs the Triton kernels in the Pallas interpreter on CPU; `TestFlashAttentionGPU` reruns every test
compiled when a GPU is present (skipped otherwise), as jax-ml/jax tests/pallas/gpu_ops_test.py does.

Unwritten outputs cannot pass: the interpreter starts every output buffer as NaN (checked by
`test_interpreter_poisons_unwritten_outputs`), NaN anywhere fails `rel_l2_error`, and the comparisons
cover whole arrays, fully masked rows included. Shapes are small and odd (1, 7, 200, 333; head dims 40,
64, 128) with 16/32 blocks so every path runs over several blocks, partial blocks included.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from lstm_attn.kernels import flash_attention_triton as ft
from lstm_attn.kernels import reference
from lstm_attn.kernels.flash_attention import flash_attention
from tests.helpers import TOLERANCE, rel_l2_error

_enable_x64 = getattr(jax, 'enable_x64', None)
if _enable_x64 is None:  # older JAX spelled it jax.experimental.enable_x64
  from jax.experimental import enable_x64 as _enable_x64

SMALL = ft.BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)
TINY = ft.BlockSizes(16, 16, 16, 16, 16, 16)


def _segments(rng, batch, length, num_segments):
  """Packed sequences: sorted random segment ids, [batch, length] int32."""
  cuts = np.sort(rng.integers(0, length, size=(batch, num_segments - 1)), axis=1)
  return jnp.asarray((np.arange(length)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)


# A sweep chosen to cover each feature a few times, not the cartesian product (interpret mode is slow).
# (name, q_len, kv_len, heads, kv_heads, head_dim, dtype, block_sizes, mask arguments)
SWEEP = [
  ('mha_200', 200, 200, 2, 2, 64, 'float32', SMALL, dict()),
  ('causal_gqa_333_d40', 333, 333, 4, 2, 40, 'float32', SMALL, dict(is_causal=True)),
  ('causal_mqa_q7_kv200', 7, 200, 4, 1, 64, 'float32', TINY, dict(is_causal=True)),
  ('q1_kv200_scale', 1, 200, 2, 1, 64, 'float32', SMALL, dict(scale=0.3)),
  (
    'ragged_lengths',
    200,
    200,
    2,
    2,
    64,
    'float32',
    SMALL,
    dict(query_seq_lengths=[200, 57], key_value_seq_lengths=[131, 0]),
  ),
  ('segments_causal', 200, 200, 2, 1, 64, 'float32', SMALL, dict(is_causal=True, segment_ids='packed')),
  ('window_q200_kv333_d128', 200, 333, 2, 2, 128, 'float32', SMALL, dict(local_window_size=(17, 5))),
  (
    'window_causal_333',
    333,
    333,
    2,
    2,
    64,
    'float32',
    SMALL,
    dict(is_causal=True, local_window_size=(31, 0)),
  ),
  ('bf16_default_blocks_causal_gqa', 333, 333, 4, 2, 128, 'bfloat16', None, dict(is_causal=True)),
  ('fp16_q7_kv7_window_gqa', 7, 7, 4, 2, 40, 'float16', TINY, dict(local_window_size=2)),
]


class TestFlashAttentionInterpret:
  """The Triton kernels in the Pallas interpreter (CPU)."""

  INTERPRET = True

  @pytest.fixture(autouse=True)
  def _needs_device(self):
    if not self.INTERPRET and jax.default_backend() != 'gpu':
      pytest.skip('compiled Triton kernels need a GPU')

  def _vjp(self, fn, q, k, v, do):
    """(out, (dq, dk, dv)) of fn at (q, k, v) with cotangent do, in one jitted computation."""
    run = jax.jit(lambda q, k, v, do: (lambda o, f: (o, f(do)))(*jax.vjp(fn, q, k, v)))
    lowered = run.lower(q, k, v, do)
    # The interpreted kernels are large XLA while loops: a lower optimisation level compiles ~30% faster.
    options = {'xla_backend_optimization_level': 0} if self.INTERPRET else None
    return lowered.compile(compiler_options=options)(q, k, v, do)

  def _check(self, q_len, kv_len, heads, kv_heads, head_dim, dtype, block_sizes, mask, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(dtype)
    mask = dict(mask)
    if mask.get('segment_ids') == 'packed':
      mask['segment_ids'] = _segments(rng, batch, q_len, 4)
    for name in ('query_seq_lengths', 'key_value_seq_lengths'):
      if name in mask:
        mask[name] = jnp.asarray(mask[name], jnp.int32)

    def normal(*shape):
      return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    q = normal(batch, q_len, heads, head_dim)
    k = normal(batch, kv_len, kv_heads, head_dim)
    v = normal(batch, kv_len, kv_heads, head_dim)
    do = normal(batch, q_len, heads, head_dim)
    kernel = functools.partial(
      flash_attention, backend='gpu', interpret=self.INTERPRET, block_sizes=block_sizes, **mask
    )
    out, grads = self._vjp(kernel, q, k, v, do)
    with _enable_x64(True):
      f64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, do)]
      ref_out, ref_vjp = jax.vjp(functools.partial(reference.mha_reference, **mask), *f64[:3])
      ref_grads = ref_vjp(f64[3])
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    errors = {'out': rel_l2_error(out, ref_out)}
    for name, g, ref_g, x in zip(('dq', 'dk', 'dv'), grads, ref_grads, (q, k, v)):
      assert g.dtype == dtype and g.shape == x.shape, name
      errors[name] = rel_l2_error(g, ref_g)
    assert all(e <= tol for e in errors.values()), f'relative L2 errors {errors} > {tol:.0e}'
    return out, grads

  @pytest.mark.parametrize('case', SWEEP, ids=[c[0] for c in SWEEP])
  def test_matches_float64_reference(self, case):
    self._check(*case[1:])

  def test_fully_masked_rows_are_zero_with_zero_gradient(self):
    # Batch row 0: queries past 37 are beyond the query length, and query segment 9 has no key of its
    # own segment. Batch row 1: key length 0 hides every key. Everything else is compared as usual.
    q_len, kv_len = 100, 67
    q_seg = np.zeros((2, q_len), np.int32)
    q_seg[0, 20:30] = 9
    mask = dict(
      query_seq_lengths=[37, q_len],
      key_value_seq_lengths=[kv_len, 0],
      segment_ids=(jnp.asarray(q_seg), jnp.zeros((2, kv_len), jnp.int32)),
      is_causal=True,
    )
    out, (dq, dk, dv) = self._check(q_len, kv_len, 2, 1, 64, 'float32', SMALL, mask)
    empty = np.zeros((2, q_len), bool)
    empty[0, 37:] = empty[0, 20:30] = empty[1] = True
    out, dq = np.asarray(out), np.asarray(dq)
    assert np.all(out[empty] == 0.0) and np.all(dq[empty] == 0.0)
    assert np.all(np.asarray(dk)[1] == 0.0) and np.all(np.asarray(dv)[1] == 0.0)
    assert np.abs(out[~empty]).min(axis=-1).max() > 0.0  # the other rows were written

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
    with _enable_x64(True):
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

  def test_interpreter_poisons_unwritten_outputs(self):
    # The premise of "unwritten elements fail": an output block the kernel never stores to is NaN.
    if not self.INTERPRET:
      pytest.skip('only the interpreter poisons outputs')

    def kernel(x_ref, o_ref):
      @pl.when(pl.program_id(0) == 0)
      def _():
        o_ref[...] = x_ref[...]

    out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((32,), jnp.float32),
      grid=(2,),
      in_specs=[pl.BlockSpec((16,), lambda i: (i,))],
      out_specs=pl.BlockSpec((16,), lambda i: (i,)),
      interpret=True,
    )(jnp.ones((32,)))
    assert np.all(np.asarray(out[:16]) == 1.0) and np.all(np.isnan(np.asarray(out[16:])))


class TestFlashAttentionGPU(TestFlashAttentionInterpret):
  """The same tests, compiled with Triton; skipped without a GPU."""

  INTERPRET = False
