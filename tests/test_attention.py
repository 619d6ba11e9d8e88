"""dot_product_attention (every implementation through the shared sweep, plus what only the op has: dense
bias/mask, argument errors, the default choice, unbatched inputs), rotary embeddings, and
MultiHeadAttention with its KV cache.

References: a float64 NumPy implementation of the equations (tests/attention_np.py), used by the shared
sweep of tests/attention_harness.py, and jax.nn.dot_product_attention itself for the semantics of that
reference (rows jax.nn leaves as a uniform average are the fully masked rows we return as zeros, so only
rows that see a key are compared with it).
"""

import attention_np as ref_np
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_harness import CASE_BY_NAME, CASES, AttentionHarness, Case, make_inputs
from attention_np import randn
from flax import nnx
from helpers import TOLERANCE, assert_close

from lstm_attn import attention
from lstm_attn.attention import KVCache, MultiHeadAttention, apply_rotary, dot_product_attention


class OpHarness(AttentionHarness):
  """The shared sweep through dot_product_attention(implementation=IMPLEMENTATION).

  The op passes no block sizes: its backends run their defaults, so the kernels' multi-block paths are
  swept with small blocks in their own files (tests/test_chunked_attention.py, test_flash_attention*.py).
  """

  IMPLEMENTATION = None

  def attention(self, q, k, v, **mask_kwargs):
    return dot_product_attention(q, k, v, implementation=self.IMPLEMENTATION, **mask_kwargs)


def _only(names, reason):
  """SKIP for every sweep case but `names`."""
  unknown = set(names) - set(CASE_BY_NAME)
  assert not unknown, unknown
  return {c.name: reason for c in CASES if c.name not in names}


# Through the op, the fused backends add only the routing of every mask argument to the kernel: they run
# the cases that pass all of them (and the special tests); the kernels' sweeps are in their own files.
_ROUTING = ('everything_gqa', 'fully_masked_rows', 'huge_window_causal', 'fp16_window_gqa_segments_pair')


class TestOpReference(OpHarness):
  IMPLEMENTATION = 'reference'


class TestOpXla(OpHarness):
  IMPLEMENTATION = 'xla'


class TestOpChunked(OpHarness):
  IMPLEMENTATION = 'chunked'
  SKIP = _only(
    _ROUTING + ('bf16_causal_gqa_lengths_default_blocks',),
    'chunked_attention is swept with small blocks in tests/test_chunked_attention.py',
  )


class TestOpPallas(OpHarness):
  IMPLEMENTATION = 'pallas'  # on CPU: the Triton kernels in the Pallas interpreter, default tiles
  SKIP = _only(_ROUTING, 'the Pallas kernels are swept with small blocks in tests/test_flash_attention*.py')
  COMPILER_OPTIONS = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None


class TestOpDefault(OpHarness):
  IMPLEMENTATION = None  # 'pallas' on GPU/TPU (head dims 32-256); on CPU 'xla' at these sizes
  if jax.default_backend() == 'cpu':
    SKIP = {
      **_only(_ROUTING, "on CPU the default is 'xla' at these sizes, swept in TestOpXla"),
      'debug_infs': "on CPU the default is 'xla' at these sizes, checked in TestOpXla",
    }


@pytest.mark.parametrize('case', [c for c in CASES if c.name != 'huge_window_causal'], ids=lambda c: c.name)
def test_float64_reference_matches_jax_nn(case: Case):
  """The sweep's float64 NumPy reference has jax.nn's semantics (causal, lengths, window; segment ids as a
  dense mask) on every row that sees a key; jax.nn's window of 2**31 - 2 would overflow int32."""
  (q, k, v, _), kwargs, keep = make_inputs(case)
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))  # XLA:CPU has no float16 dot under jit
  seg_mask = None
  if case.segments is not None:
    seg = kwargs['segment_ids']
    q_seg, kv_seg = seg if isinstance(seg, tuple) else (seg, seg)
    seg_mask = q_seg[:, None, :, None] == kv_seg[:, None, None, :]
  expected = jax.jit(
    lambda q, k, v: jax.nn.dot_product_attention(
      q,
      k,
      v,
      mask=seg_mask,
      scale=case.scale,
      is_causal=case.is_causal,
      query_seq_lengths=kwargs.get('query_seq_lengths'),
      key_value_seq_lengths=kwargs.get('key_value_seq_lengths'),
      local_window_size=case.window,
      implementation='xla',
    )
  )(q, k, v)
  ours = ref_np.attention(q, k, v, keep, scale=case.scale)
  rows = keep[:, 0].any(-1)  # [B, T]: rows that see a key
  if case.expect_empty_rows:
    assert not rows.all(), 'the case is meant to have fully masked rows'
  assert_close(np.asarray(expected)[rows], ours[rows])


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.float32):
  q = randn(seed, (batch, q_len, heads, head_dim), dtype)
  k = randn(seed + 1000, (batch, kv_len, kv_heads, head_dim), dtype)
  v = randn(seed + 2000, (batch, kv_len, kv_heads, head_dim), dtype)
  return q, k, v


def _value_and_vjp(fn, args, d_out):
  """fn(*args) and the gradients of <fn(*args), d_out> (a random cotangent, never a .sum())."""
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(d_out)


@pytest.mark.parametrize('implementation', ['reference', 'xla'])
def test_dense_bias_and_mask(implementation):
  q, k, v = _inputs(3, 2, 7, 9, 4, 2, 8)
  bias = randn(4, (1, 4, 7, 9))
  mask = np.random.default_rng(0).random((7, 9)) < 0.6  # 2-D: broadcast like jax.nn
  mask[2] = False  # one fully masked query row
  fn = lambda q, k, v, bias: dot_product_attention(
    q, k, v, bias, jnp.asarray(mask), is_causal=True, implementation=implementation
  )
  d_out = randn(5, q.shape)
  out, grads = jax.jit(lambda *a: _value_and_vjp(fn, *a))((q, k, v, bias), d_out)
  keep = ref_np.mask(2, 7, 9, causal=True) & mask
  exp_out, exp_grads = ref_np.attention(q, k, v, keep, bias=bias, d_out=d_out)
  assert_close(out, exp_out)
  for g, e in zip(grads[:3], exp_grads):
    assert_close(g, e)
  assert np.all(np.asarray(out)[:, 2] == 0)


@pytest.mark.parametrize('implementation', ['chunked', 'pallas'])
def test_fused_backends_reject_dense_bias_and_mask(implementation):
  q, k, v = _inputs(0, 1, 4, 4, 2, 2, 8)
  with pytest.raises(ValueError, match="'xla'"):
    dot_product_attention(q, k, v, bias=jnp.zeros((1, 1, 4, 4)), implementation=implementation)
  with pytest.raises(ValueError, match="'xla'"):
    dot_product_attention(q, k, v, mask=jnp.ones((4, 4), bool), implementation=implementation)


def test_default_implementation(monkeypatch):
  shape = lambda t: jax.ShapeDtypeStruct((1, t, 2, 8), jnp.float32)
  auto = attention._auto_implementation
  assert auto(shape(64), shape(64), has_dense=True) == 'xla'
  assert auto(jax.ShapeDtypeStruct((1, 64, 2, 8), jnp.float64), shape(64), has_dense=False) == 'xla'
  if jax.default_backend() == 'cpu':
    assert auto(shape(64), shape(64), has_dense=False) == 'xla'
    monkeypatch.setattr(attention.ops, 'CHUNKED_MIN_ELEMENTS', 64 * 64)  # read where it is defined
    assert auto(shape(64), shape(64), has_dense=False) == 'chunked'
    assert auto(shape(64), shape(63), has_dense=False) == 'xla'
  (q, k, v, _), kwargs, keep = make_inputs(CASE_BY_NAME['everything_gqa'])
  out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, **kwargs))(q, k, v)
  assert_close(out, ref_np.attention(q, k, v, keep))


def _bad(**overrides):
  q, k, v = _inputs(0, 2, 5, 5, 4, 2, 8)
  args = dict(query=q, key=k, value=v)
  args.update(overrides)
  return args


@pytest.mark.parametrize(
  'overrides,match',
  [
    (dict(query=jnp.zeros((2, 5, 8))), 'query'),
    (dict(key=jnp.zeros((2, 5, 2, 8), jnp.int32)), 'key'),
    (dict(value=jnp.zeros((2, 5, 2, 8), jnp.bfloat16)), 'dtype'),
    (dict(key=jnp.zeros((2, 5, 3, 8)), value=jnp.zeros((2, 5, 3, 8))), 'heads'),
    (dict(key=jnp.zeros((2, 5, 2, 6)), value=jnp.zeros((2, 5, 2, 6))), 'head_dim'),
    (dict(query_seq_lengths=jnp.array([1, 2, 3])), 'query_seq_lengths'),
    (dict(key_value_seq_lengths=jnp.array([1.0, 2.0])), 'key_value_seq_lengths'),
    (dict(segment_ids=jnp.zeros((2, 4), jnp.int32)), 'segment_ids'),
    (dict(local_window_size=(-1, 2)), 'local_window_size'),
    (dict(mask=jnp.ones((5, 5), jnp.int32)), 'mask'),
    (dict(bias=jnp.zeros((1, 1, 1, 5, 5))), 'bias'),
    (dict(bias=jnp.tril(jnp.ones((5, 5), bool))), 'bias must be a float'),  # a mask passed as bias
    (dict(bias=jnp.zeros((5, 7))), 'bias must be broadcastable'),
    (dict(mask=jnp.ones((3, 5, 5), bool)), 'mask must be broadcastable'),
    (dict(scale=float('nan')), 'scale must be finite'),
    (dict(implementation='cudnn'), 'implementation'),
  ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(overrides, match):
  args = _bad(**overrides)
  with pytest.raises(ValueError, match=match):
    dot_product_attention(args.pop('query'), args.pop('key'), args.pop('value'), **args)


# ----------------------------------------------------------------------------------------------------
# Rotary embeddings.


def test_rotary_matches_complex_rotation():
  x = randn(0, (2, 7, 3, 10))
  positions = jnp.array([[0, 1, 2, 3, 4, 5, 6], [9, 3, 0, 100, 7, 7, 2]])
  out = apply_rotary(x, positions, base=500.0)
  xn = np.asarray(x, np.float64)
  z = xn[..., :5] + 1j * xn[..., 5:]  # pair (j, j + half) as one complex number
  theta = np.asarray(positions, np.float64)[..., None, None] * 500.0 ** (-np.arange(5) * 2 / 10)
  z = z * np.exp(1j * theta)
  assert_close(out, np.concatenate([z.real, z.imag], -1))
  assert_close(apply_rotary(x, jnp.arange(7)), apply_rotary(x, jnp.tile(jnp.arange(7), (2, 1))))
  # NumPy positions take the constant-table path (the GPT default): same rotation.
  assert_close(apply_rotary(x, np.asarray(positions), base=500.0), out)
  assert_close(apply_rotary(x, np.arange(7)), apply_rotary(x, jnp.arange(7)))


@pytest.mark.parametrize('batched_positions', [False, True])
def test_rotary_gradients_match_float64_autodiff(batched_positions):
  # apply_rotary's VJP is hand-written (the inverse rotation); check it, and the gradient with respect to
  # float positions, against plain autodiff of the complex-number form in float64, random cotangent.
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 3, 8)))  # [B, T, H, D] float64
    positions = jnp.asarray(np.random.default_rng(4).uniform(0, 50, (2, 5) if batched_positions else (5,)))
    cotangent = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape))

    def reference(x, positions):
      theta = jnp.broadcast_to(positions, (2, 5))[..., None, None] * 10000.0 ** (-jnp.arange(4) * 2 / 8)
      z = (x[..., :4] + 1j * x[..., 4:]) * jnp.exp(1j * theta)
      return jnp.concatenate([z.real, z.imag], -1)

    out, vjp = jax.vjp(apply_rotary, x, positions)
    out_ref, vjp_ref = jax.vjp(reference, x, positions)
    assert out.dtype == jnp.float64
    assert_close(out, out_ref, tol=1e-12)
    for got, want, what in zip(vjp(cotangent), vjp_ref(cotangent), ('dx', 'dpositions')):
      assert_close(got, want, tol=1e-12, what=what)
    # The NumPy-positions path (constant tables; the GPT default) under jit: same dx.
    np_positions = np.asarray(positions)
    dx = jax.jit(lambda x, g: jax.vjp(lambda x: apply_rotary(x, np_positions), x)[1](g)[0])(x, cotangent)
    assert_close(dx, vjp_ref(cotangent)[0], tol=1e-12, what='dx, NumPy positions')


def test_rotary_scores_depend_only_on_relative_position():
  q = randn(1, (1, 1, 1, 16))
  k = randn(2, (1, 1, 1, 16))
  score = lambda m, n: jnp.sum(apply_rotary(q, jnp.array([m])) * apply_rotary(k, jnp.array([n])))
  assert abs(float(score(3, 1)) - float(score(40, 38))) < 1e-4
  assert abs(float(score(3, 1)) - float(score(3, 2))) > 1e-3


def test_rotary_bad_inputs():
  with pytest.raises(ValueError, match='head_dim'):
    apply_rotary(jnp.zeros((1, 4, 2, 7)), jnp.arange(4))
  with pytest.raises(ValueError, match='positions'):
    apply_rotary(jnp.zeros((1, 4, 2, 8)), jnp.arange(5))


# ----------------------------------------------------------------------------------------------------
# MultiHeadAttention.


# Most module tests share one shape (4 heads, 32 features, [2, 9, 32] inputs) so that JAX compiles each
# small operation once for the whole file.


def _mha(rngs_seed=0, **kwargs):
  return MultiHeadAttention(4, 32, rngs=nnx.Rngs(rngs_seed), **kwargs)


def test_mha_self_attention_matches_numpy():
  mha = _mha(num_kv_heads=2)
  x = randn(1, (2, 9, 32))
  y = nnx.jit(lambda m, x: m(x, is_causal=True, query_seq_lengths=jnp.array([9, 4], jnp.int32)))(mha, x)
  assert y.shape == (2, 9, 32)
  keep = ref_np.mask(2, 9, 9, causal=True, q_lens=[9, 4])
  assert_close(y, ref_np.mha(mha, x, None, keep))


def test_mha_cross_attention_matches_numpy():
  mha = _mha(2, num_kv_heads=1, head_dim=6, kv_features=12, qkv_bias=False)
  x = randn(3, (2, 9, 32))
  ctx = randn(4, (2, 11, 12))
  y = nnx.jit(lambda m, x, c: m(x, context=c, key_value_seq_lengths=jnp.array([11, 6], jnp.int32)))(
    mha, x, ctx
  )
  keep = ref_np.mask(2, 9, 11, kv_lens=[11, 6])
  assert_close(y, ref_np.mha(mha, x, ctx, keep))


def test_mha_rotary_matches_numpy():
  mha = _mha(5, num_kv_heads=2, rotary=True, rotary_base=100.0)
  x = randn(6, (2, 9, 32))
  positions = jnp.array([list(range(9)), [0, 1, 2, 3, 0, 1, 2, 3, 4]])  # restart in the second segment
  seg = jnp.array([[0] * 9, [0] * 4 + [1] * 5], jnp.int32)
  y = nnx.jit(lambda m, x: m(x, is_causal=True, segment_ids=seg, positions=positions))(mha, x)
  keep = ref_np.mask(2, 9, 9, causal=True, q_seg=np.asarray(seg), kv_seg=np.asarray(seg))
  assert_close(y, ref_np.mha(mha, x, None, keep, positions=positions, base=100.0))


@pytest.mark.parametrize('rotary,kv_heads,window', [(False, 4, None), (True, 1, 3)])
def test_kv_cache_prefill_and_steps_equal_full_forward(rotary, kv_heads, window):
  mha = _mha(7, num_kv_heads=kv_heads, rotary=rotary)
  x = randn(8, (2, 9, 32))
  full = nnx.jit(lambda m, x: m(x, is_causal=True, local_window_size=window))(mha, x)
  step = nnx.jit(lambda m, x, c: m(x, is_causal=True, local_window_size=window, cache=c))
  cache = mha.init_cache(2, 11)
  outs = []
  for start, stop in [(0, 4), (4, 7), (7, 8), (8, 9)]:  # prefill, a 3-token chunk, one-token steps
    y, cache = step(mha, x[:, start:stop], cache)
    outs.append(y)
  assert int(cache.length) == 9
  assert_close(jnp.concatenate(outs, axis=1), full)
  assert np.all(np.asarray(cache.key[:, 9:]) == 0), 'only positions [0, length) are written'


def test_kv_cache_bad_inputs():
  mha = _mha()
  cache = mha.init_cache(2, 11)
  assert cache.key.shape == (2, 11, 4, 8) and cache.length.dtype == jnp.int32
  x = randn(0, (2, 9, 32))
  _, cache = mha(x, cache=cache)
  with pytest.raises(ValueError, match='overflow'):
    mha(x, cache=cache)
  # Under jit the length is traced and cannot raise: the overflowing call gives NaN, not stale keys.
  jitted = nnx.jit(lambda m, x, c: m(x, cache=c))
  out, _ = jitted(mha, x[:, :2], cache)
  assert np.all(np.isfinite(np.asarray(out)))  # 9 + 2 = 11 fits
  out, _ = jitted(mha, x[:, :3], cache)
  assert np.all(np.isnan(np.asarray(out)))  # 9 + 3 > 11
  with pytest.raises(ValueError, match='segment_ids'):
    mha(x, cache=cache, segment_ids=jnp.zeros((2, 9), jnp.int32))
  with pytest.raises(ValueError, match='cache'):
    mha(x, cache=KVCache(jnp.zeros((2, 11, 1, 8)), jnp.zeros((2, 11, 1, 8)), jnp.array(0)))
  with pytest.raises(ValueError, match='x must have shape'):
    mha(jnp.zeros((2, 9, 31)))
  with pytest.raises(ValueError, match='num_kv_heads'):
    MultiHeadAttention(4, 32, num_kv_heads=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='implementation'):
    MultiHeadAttention(4, 32, implementation='flash', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='head_dim'):
    MultiHeadAttention(4, 30, rngs=nnx.Rngs(0))


def test_mha_dropout_on_output_in_train_mode_only():
  mha = _mha(dropout=0.5)
  x = randn(1, (2, 9, 32))
  mha.eval()
  clean = mha(x)
  np.testing.assert_array_equal(clean, mha(x))
  mha.train()
  noisy = mha(x)
  dropped = np.asarray(noisy) == 0
  assert 0.35 < dropped.mean() < 0.65
  np.testing.assert_allclose(np.asarray(noisy)[~dropped], 2 * np.asarray(clean)[~dropped], rtol=1e-5)


def test_mha_bfloat16_compute():
  mha32 = _mha()
  mha16 = _mha(dtype=jnp.bfloat16)
  x = randn(1, (2, 9, 32))
  y16 = mha16(x, is_causal=True)
  assert y16.dtype == jnp.bfloat16 and mha16.query.kernel[...].dtype == jnp.float32
  assert_close(y16, mha32(x, is_causal=True), tol=TOLERANCE[np.dtype(jnp.bfloat16)])


def test_mha_float16_under_nnx_jit():
  mha16 = _mha(dtype=jnp.float16)
  x = randn(2, (2, 9, 32)).astype(jnp.float16)
  y = nnx.jit(lambda m, x: m(x, is_causal=True))(mha16, x)
  assert y.dtype == jnp.float16
  assert_close(y, _mha()(x.astype(jnp.float32), is_causal=True), tol=TOLERANCE[np.dtype(jnp.float16)])


@pytest.mark.parametrize('implementation', ['reference', 'xla', 'chunked', 'pallas'])
def test_unbatched_inputs_as_jax_nn(implementation):
  # [seq, heads, head_dim] in, [seq, heads, head_dim] out, as jax.nn.dot_product_attention takes them;
  # lengths are then scalars and segment ids [seq].
  q, k, v = (randn(s, (7, 4, 16)) for s in (9, 10, 11))
  k, v = k[:, :2], v[:, :2]
  seg = jnp.asarray([0, 0, 0, 1, 1, 1, 1], jnp.int32)
  kwargs = dict(is_causal=True, key_value_seq_lengths=6, segment_ids=seg, implementation=implementation)
  out = dot_product_attention(q, k, v, **kwargs)
  kwargs.update(key_value_seq_lengths=jnp.asarray([6]), segment_ids=seg[None])
  batched = dot_product_attention(q[None], k[None], v[None], **kwargs)
  assert out.shape == q.shape
  np.testing.assert_array_equal(np.asarray(out), np.asarray(batched[0]))
  expected = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=jnp.asarray([6]))
  rows = np.asarray(seg) == 0  # rows 0-2 are in segment 0 alone, so jax.nn (no segments) agrees there
  assert_close(out[rows], expected[rows], tol=1e-5)
  with pytest.raises(ValueError, match='key and value must be too'):
    dot_product_attention(q, k[None], v[None])


def test_reference_row_with_only_minus_inf_bias_is_zero():
  # The reference is the ground truth: a row whose every visible logit is -inf (a user's additive -inf
  # bias) sees nothing and is 0, as a masked row is, never NaN (finite masking must not change that).
  q, k, v = (randn(s, (1, 3, 1, 8)) for s in (12, 13, 14))
  bias = np.zeros((1, 1, 3, 3), np.float32)
  bias[0, 0, 1, :] = -np.inf
  out = np.asarray(dot_product_attention(q, k, v, bias=jnp.asarray(bias), implementation='reference'))
  assert np.all(out[0, 1] == 0.0) and np.all(np.isfinite(out))
  assert_close(out[0, [0, 2]], ref_np.attention(q, k, v, np.ones((1, 1, 3, 3), bool))[0, [0, 2]], tol=1e-5)
