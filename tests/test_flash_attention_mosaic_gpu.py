"""Tests of the Mosaic GPU (Hopper) flash attention kernels (`kernels/flash_attention_mosaic_gpu.py`).

Forward and gradients (random cotangents through jax.vjp) against `reference.mha_reference` in float64
on the same inputs, by relative L2 error with the per-dtype tolerances of tests/helpers.py.
`TestMosaicGPUInterpret` runs the kernels in Pallas's GPU interpreter on CPU (jax 0.10's
`InterpretGPUParams`: simulated shared memory, warpgroups, mbarriers, TMA and wgmma);
`TestMosaicGPUCompiled` reruns every test compiled on a Hopper GPU (skipped elsewhere).

Unwritten outputs cannot pass: the interpreter starts every output buffer as NaN and NaN fails
`rel_l2_error`. Each case is a whole-array comparison with several masks at once, odd lengths (7, 100,
200, 333) and 64-row blocks, so every CTA role runs over several blocks, skipped, masked and unmasked
ones and padding included. Interpret mode costs one compile per kernel per case (~3 s each here), so the
sweep is a few dense cases rather than a cartesian product.
"""

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_attn.kernels import flash_attention_mosaic_gpu as fm
from lstm_attn.kernels import reference
from lstm_attn.kernels.flash_attention import flash_attention
from tests.helpers import TOLERANCE, rel_l2_error

SMALL = fm.BlockSizes(block_q=64, block_k=64, block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64)


def _segments(rng, batch, length, num_segments):
  """Packed sequences: sorted random segment ids, [batch, length] int32."""
  cuts = np.sort(rng.integers(0, length, size=(batch, num_segments - 1)), axis=1)
  return jnp.asarray((np.arange(length)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)


# (name, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, block_sizes, mask arguments)
SWEEP = [
  ('causal_gqa_200_d40', 1, 200, 200, 4, 2, 40, 'bfloat16', SMALL, dict(is_causal=True)),
  (
    'ragged_window_mqa_q100_kv333',
    2,
    100,
    333,
    2,
    1,
    64,
    'float16',
    SMALL,
    dict(local_window_size=(40, 5), query_seq_lengths=[57, 37], key_value_seq_lengths=[300, 0]),
  ),
  (
    'segments_causal_lengths',
    2,
    200,
    200,
    2,
    2,
    64,
    'bfloat16',
    SMALL,
    dict(is_causal=True, segment_ids='packed'),
  ),
  ('default_blocks_causal_mqa_q7_d128', 1, 7, 256, 2, 1, 128, 'bfloat16', None, dict(is_causal=True)),
  ('no_mask_fp16_128', 1, 128, 128, 2, 2, 64, 'float16', SMALL, dict()),
]


@pytest.fixture(scope='module', autouse=True)
def _memoise_interpreter_compiles():
  """jax 0.10's GPU interpreter compiles each simulated thread's program anew at every grid point
  (`thread_map._run_jaxpr`: jit(...).trace().lower().compile() per call, 4-5 s). The program is the same
  object for every grid point of a kernel, so compile it once per (program, argument types). Nothing
  else of the interpreter changes. Skipped where the internals differ (a later jax)."""
  try:
    from jax._src.pallas.mosaic.interpret import thread_map
  except ImportError:
    yield
    return
  original = getattr(thread_map, '_run_jaxpr', None)
  if original is None:
    yield
    return
  cache, lock = {}, threading.Lock()

  def run_jaxpr(jaxpr, consts, *args):
    leaves = jax.tree.leaves((consts, args))
    key = (id(jaxpr), tuple((np.shape(x), str(getattr(x, 'dtype', type(x)))) for x in leaves))
    with lock:
      hit = cache.get(key)
      if hit is None or hit[0] is not jaxpr:  # the program is kept alive by the cache: ids stay unique
        fn = lambda consts, *args: jax.core.eval_jaxpr(jaxpr, consts, *args)
        options = {'xla_backend_optimization_level': 0}
        cache[key] = hit = (jaxpr, jax.jit(fn).trace(consts, *args).lower().compile(options))
    hit[1](consts, *args)

  thread_map._run_jaxpr = run_jaxpr
  yield
  thread_map._run_jaxpr = original


def _is_hopper() -> bool:
  if jax.default_backend() != 'gpu':
    return False
  return getattr(jax.devices()[0], 'compute_capability', '').startswith('9')


class TestMosaicGPUInterpret:
  """The Mosaic GPU kernels in Pallas's GPU interpreter (CPU)."""

  INTERPRET = True

  @pytest.fixture(autouse=True)
  def _device(self):
    if not self.INTERPRET and not _is_hopper():
      pytest.skip('the compiled Mosaic GPU kernels need a Hopper (sm_90) GPU')
    if self.INTERPRET:
      fm.reset_interpreter()  # a kernel that raised leaves the interpreter's global state behind

  def _inputs(self, rng, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
    def normal(*shape):
      return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    q = normal(batch, q_len, heads, head_dim)
    k = normal(batch, kv_len, kv_heads, head_dim)
    v = normal(batch, kv_len, kv_heads, head_dim)
    return q, k, v, normal(*q.shape)

  def _check(self, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, block_sizes, mask, seed=0):
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(dtype)
    mask = dict(mask)
    if mask.get('segment_ids') == 'packed':
      mask['segment_ids'] = _segments(rng, batch, q_len, 4)
    for name in ('query_seq_lengths', 'key_value_seq_lengths'):
      if name in mask:
        mask[name] = jnp.asarray(mask[name], jnp.int32)
    q, k, v, do = self._inputs(rng, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype)
    kernel = functools.partial(
      flash_attention, backend='mosaic_gpu', interpret=self.INTERPRET, block_sizes=block_sizes, **mask
    )
    out, pullback = jax.vjp(kernel, q, k, v)
    grads = pullback(do)
    with jax.enable_x64(True):
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
    return mask, out, grads

  @pytest.mark.parametrize('case', SWEEP, ids=[c[0] for c in SWEEP])
  def test_matches_float64_reference(self, case):
    mask, out, (dq, dk, dv) = self._check(*case[1:])
    if case[0].startswith('ragged'):
      # Fully masked rows get 0 output and 0 gradient: batch row 0's queries at or past its length 57,
      # and every row of batch row 1 (key length 0); batch row 1's keys get no gradient.
      out, dq, dk, dv = (np.asarray(x, np.float32) for x in (out, dq, dk, dv))
      assert np.all(out[0, 57:] == 0.0) and np.all(dq[0, 57:] == 0.0)
      assert np.all(out[1] == 0.0) and np.all(dq[1] == 0.0)
      assert np.all(dk[1] == 0.0) and np.all(dv[1] == 0.0)
      assert np.abs(out[0, :57]).min(axis=-1).max() > 0.0  # the other rows were written

  def test_nan_in_a_visible_key_propagates(self):
    rng = np.random.default_rng(2)
    q, k, v, _ = self._inputs(rng, 1, 128, 128, 1, 1, 64, jnp.bfloat16)
    k = k.at[0, 5, 0, 3].set(jnp.nan)
    out = np.asarray(
      flash_attention(
        q, k, v, is_causal=True, backend='mosaic_gpu', interpret=self.INTERPRET, block_sizes=SMALL
      ),
      np.float32,
    )
    assert np.all(np.isfinite(out[0, :5])), 'rows before key 5 do not see it'
    assert np.all(np.isnan(out[0, 5:])), 'rows that see key 5 are NaN'

  @pytest.mark.parametrize(
    'kwargs, match',
    [
      (dict(query=jnp.zeros((1, 8, 2, 32), jnp.float32)), 'not taken by the Mosaic GPU kernel'),
      (dict(block_sizes=fm.BlockSizes(block_q=96)), 'block_sizes.block_q must be a multiple of 64'),
      (dict(block_sizes=fm.BlockSizes(num_stages=0)), 'block_sizes.num_stages must be a positive int'),
      (dict(block_sizes=(64, 64)), 'block_sizes must be a flash_attention_mosaic_gpu.BlockSizes'),
      (dict(query=jnp.zeros((1, 8, 2, 320), jnp.bfloat16)), 'head_dim must be at most 256'),
      (dict(interpret='yes'), 'interpret must be a bool'),
    ],
  )
  def test_bad_input_raises_value_error(self, kwargs, match):
    query = kwargs.pop('query', jnp.zeros((1, 8, 2, 32), jnp.bfloat16))
    kv = jnp.zeros(query.shape[:2] + (1, query.shape[3]), query.dtype)
    kwargs.setdefault('interpret', self.INTERPRET)
    with pytest.raises(ValueError, match=match):
      fm.flash_attention_mosaic_gpu(query, kv, kv, **kwargs)


class TestMosaicGPUCompiled(TestMosaicGPUInterpret):
  """The same tests compiled with Mosaic GPU; skipped without a Hopper GPU."""

  INTERPRET = False
