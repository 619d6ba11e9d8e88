"""The Pallas Mosaic TPU flash-attention kernel against the float64 reference.

On CPU the kernels run in Pallas TPU interpret mode (`interpret=True`, as the dispatcher calls it), which
fills every buffer a kernel has not written with NaN (`pltpu.InterpretParams(uninitialized_memory='nan')`,
the default): the outputs start poisoned, an element a kernel forgets to write stays NaN, and NaN never
passes `assert_close`. `TestFlashAttentionTpuCompiled` runs the same tests compiled
on a TPU when one is present and is skipped otherwise.

Interpret mode compiles slowly (a few seconds per case), so each case of the sweep combines features.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOLERANCE, assert_close

from lstm_attn.kernels import reference
from lstm_attn.kernels.flash_attention_tpu import BlockSizes, flash_attention_tpu

# A different tiling in each kernel, q tiles spanning several kv tiles (forward) and kv tiles spanning
# several q tiles (dK/dV), tiles larger than the sequence (q padded to 256, kv to 256).
_SMALL = BlockSizes(
  block_q=256, block_kv=128, block_q_dkv=32, block_kv_dkv=128, block_q_dq=64, block_kv_dq=256
)

# name: ((batch, q_len, kv_len, heads, kv_heads, head_dim), mask keyword arguments[, block_sizes]).
# The default scale 1/sqrt(head_dim) everywhere but the first.
_CASES = {
  'dense_multiblock_scale': ((2, 200, 200, 2, 2, 64), {'scale': 0.3}),
  'causal_gqa_hd40': ((1, 200, 200, 4, 2, 40), {'is_causal': True}),
  'ragged_segments_hd128': (
    (2, 200, 200, 2, 2, 128),
    {'query_seq_lengths': [200, 150], 'key_value_seq_lengths': [130, 200], 'segment_ids': 'random'},
  ),
  'window_small_blocks': ((1, 200, 200, 2, 1, 64), {'is_causal': True, 'local_window_size': (40, 0)}, _SMALL),
  'q1_kv200_two_sided_window': ((1, 1, 200, 2, 2, 64), {'local_window_size': (3, 150)}),
  'q7_kv200_causal_mqa': ((2, 7, 200, 2, 1, 64), {'is_causal': True, 'key_value_seq_lengths': [5, 200]}),
  'q200_kv7_causal_mqa': ((2, 200, 7, 2, 1, 64), {'is_causal': True, 'query_seq_lengths': [200, 3]}),
  # Rows with no visible key: a batch row with kv length 0, queries past their length, and query
  # segments (id 3) that no key has.
  'fully_masked_rows': (
    (2, 40, 40, 2, 2, 64),
    {'query_seq_lengths': [40, 30], 'key_value_seq_lengths': [0, 40], 'segment_ids': 'pair_with_orphans'},
  ),
}


def _inputs(rng, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
  q = rng.standard_normal((batch, q_len, heads, head_dim))
  k = rng.standard_normal((batch, kv_len, kv_heads, head_dim))
  v = rng.standard_normal((batch, kv_len, kv_heads, head_dim))
  ct = rng.standard_normal((batch, q_len, heads, head_dim))
  return [jnp.asarray(x, dtype) for x in (q, k, v)], jnp.asarray(ct, jnp.float32)


def _mask_kwargs(rng, mask, batch, q_len, kv_len):
  kw = dict(mask)
  for name in ('query_seq_lengths', 'key_value_seq_lengths'):
    if name in kw:
      kw[name] = jnp.asarray(kw[name], jnp.int32)
  if kw.get('segment_ids') == 'random':  # sorted ids: packed sequences of random lengths
    kw['segment_ids'] = jnp.asarray(np.sort(rng.integers(0, 4, (batch, q_len)), axis=1), jnp.int32)
  elif kw.get('segment_ids') == 'pair_with_orphans':
    q_ids = np.sort(rng.integers(0, 4, (batch, q_len)), axis=1)
    kv_ids = np.sort(rng.integers(0, 3, (batch, kv_len)), axis=1)
    kw['segment_ids'] = (jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32))
  return kw


def _reference_vjp(q, k, v, ct, kw):
  """reference.mha_reference and its VJP in float64 (one jit: far cheaper than op-by-op here)."""

  def out_and_grads(*args):
    out, vjp = jax.vjp(lambda *a: reference.mha_reference(*a, **kw), *args[:3])
    return out, vjp(args[3])

  with jax.enable_x64(True):
    out, grads = jax.jit(out_and_grads)(*[jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, ct)])
    return np.asarray(out), [np.asarray(g) for g in grads]


class TestFlashAttentionTpuInterpret:
  # interpret=True is pltpu.InterpretParams(): NaN-filled buffers, out-of-bounds reads raise.
  INTERPRET = True

  def _run(self, q, k, v, ct, kw, block_sizes=None):
    fn = lambda *a: flash_attention_tpu(*a, block_sizes=block_sizes, interpret=self.INTERPRET, **kw)
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct.astype(out.dtype))

  @pytest.mark.parametrize('case', list(_CASES))
  def test_matches_reference(self, case):
    (batch, q_len, kv_len, heads, kv_heads, head_dim), mask, *block_sizes = _CASES[case]
    block_sizes = block_sizes[0] if block_sizes else None
    rng = np.random.default_rng(list(_CASES).index(case))
    (q, k, v), ct = _inputs(rng, batch, q_len, kv_len, heads, kv_heads, head_dim, jnp.float32)
    kw = _mask_kwargs(rng, mask, batch, q_len, kv_len)
    out, grads = self._run(q, k, v, ct, kw, block_sizes)
    ref_out, ref_grads = _reference_vjp(q, k, v, ct, kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref_out, dtype=jnp.float32, what=f'{case} output')
    for name, g, rg, x in zip(('dq', 'dk', 'dv'), grads, ref_grads, (q, k, v)):
      assert g.shape == x.shape and g.dtype == x.dtype
      assert_close(g, rg, dtype=jnp.float32, what=f'{case} {name}')

    # Rows that see no key: exactly 0 output and 0 dq; keys that no query sees: exactly 0 dk and dv.
    _, spec = reference.check_inputs(q, k, v, **kw)
    visible = np.asarray(reference.dense_mask(spec, batch, q_len, kv_len))[:, 0]  # [B, T, S]
    empty_rows, unseen_keys = ~visible.any(axis=2), ~visible.any(axis=1)
    if case == 'fully_masked_rows':
      assert empty_rows.sum() >= 40 and unseen_keys.sum() >= 40, 'the case must mask whole rows and keys'
    np.testing.assert_array_equal(np.asarray(out)[empty_rows], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0])[empty_rows], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[1])[unseen_keys], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[2])[unseen_keys], 0.0)

  @pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
  def test_low_precision(self, dtype):
    rng = np.random.default_rng(7)
    (q, k, v), ct = _inputs(rng, 1, 200, 200, 2, 2, 64, dtype)
    kw = {'is_causal': True, 'key_value_seq_lengths': jnp.asarray([180], jnp.int32)}
    out, grads = self._run(q, k, v, ct, kw)
    ref_out, ref_grads = _reference_vjp(q, k, v, ct.astype(dtype), kw)  # same inputs, float64 math
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(out, ref_out, dtype=dtype, what='output')
    for name, g, rg in zip(('dq', 'dk', 'dv'), grads, ref_grads):
      assert_close(g, rg, tol=TOLERANCE[np.dtype(dtype)], what=name)


class TestFlashAttentionTpuCompiled(TestFlashAttentionTpuInterpret):
  """The same tests compiled for a real TPU; skipped elsewhere."""

  INTERPRET = False

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
  rng = np.random.default_rng(5)
  (q, k, v), ct = _inputs(rng, 2, 200, 200, 4, 2, 40, jnp.bfloat16)
  kw = _mask_kwargs(
    rng,
    {
      'is_causal': True,
      'local_window_size': (30, 5),
      'segment_ids': 'random',
      'query_seq_lengths': [200, 100],
    },
    2,
    200,
    200,
  )
  fn = lambda *a: flash_attention_tpu(*a, **kw)
  grads = lambda q, k, v, ct: jax.vjp(fn, q, k, v)[1](ct)
  try:
    text = jax.jit(grads).trace(q, k, v, ct.astype(q.dtype)).lower(lowering_platforms=('tpu',)).as_text()
  finally:
    tpu_info.get_tpu_info.cache_clear()
  for kernel in ('_fwd_kernel', '_dkv_kernel', '_dq_kernel'):
    assert f'kernel_name = "{kernel}"' in text
  assert text.count('tpu_custom_call') == 3
