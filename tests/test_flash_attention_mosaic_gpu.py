"""Tests of the Mosaic GPU (Hopper) flash attention kernels (`kernels/flash_attention_mosaic_gpu.py`).

`TestMosaicGPUInterpret` runs the shared sweep of tests/attention_harness.py (forward and random-cotangent
VJP against float64, every mask, fully masked rows, NaN propagation, no infinities under debug_infs) in
Pallas's GPU interpreter on CPU (jax 0.10's `InterpretGPUParams`: simulated shared memory, warpgroups,
mbarriers, TMA and wgmma), plus this kernel's own tests; `TestMosaicGPUCompiled` reruns all of it
compiled on a Hopper GPU (skipped elsewhere; `experiments/gpu_check.py` runs it).

Interpreted, every case costs one compile of each kernel's simulated program (~3 s apiece here, three
kernels a case), so the CPU run takes the harness cases that together hold every mask, both dtypes, the
default tiles, padding of lengths and head dims, GQA and MQA and every kind of fully masked row
(`INTERPRETED_CASES`); the compiled class runs all of them. Unwritten outputs cannot pass: the
interpreter starts every output buffer as NaN (`test_interpreter_poisons_unwritten_kernel_outputs`) and
NaN fails `rel_l2_error`.
"""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_harness import AttentionHarness

from lstm_attn.kernels import flash_attention_mosaic_gpu as fm
from lstm_attn.kernels.flash_attention import flash_attention

SMALL = fm.BlockSizes(block_q=64, block_k=64, block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64)

# The harness cases the interpreter runs (see the module docstring); the rest run compiled only.
INTERPRETED_CASES = (
  'no_mask_block_multiple',  # the unmasked path (no mask code at all), nothing padded
  'everything_gqa',  # causal + window + both lengths + packed segments + GQA, length 77, head dim 32
  'window_right_kv_lens_empty_rows_d128',  # right window, key lengths, q_len != kv_len, head dim 128
  'fully_masked_rows',  # past the query length, an orphan segment, key length 0; MQA
  'bf16_causal_gqa_lengths_default_blocks',  # the default tiles (128-key blocks), head dim 128
  'fp16_window_gqa_segments_pair',  # float16, segment-id pairs, head dim 40
)


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


class TestMosaicGPUInterpret(AttentionHarness):
  """The Mosaic GPU kernels in Pallas's GPU interpreter (CPU)."""

  INTERPRET = True
  DTYPES = ('bfloat16', 'float16')  # wgmma's input types; the harness runs its float32 cases in bf16
  BLOCK_SIZES = SMALL
  COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}

  def attention(self, q, k, v, **mask_kwargs):
    return flash_attention(
      q, k, v, backend='mosaic_gpu', interpret=self.INTERPRET, block_sizes=self.block_sizes, **mask_kwargs
    )

  def _compiled(self, fn, *args):
    # Interpreted, each kernel runs as its own computation (jax.vjp outside jit), so at most one kernel's
    # simulated threads hold XLA:CPU pool threads at a time (see PJRT_NPROC in conftest.py). Compiled, the
    # harness's single jit is used as is.
    if self.INTERPRET:
      return fn(*args)
    return super()._compiled(fn, *args)

  def skip_reason(self, case):
    if self.INTERPRET and case.name not in INTERPRETED_CASES + ('nan_inputs', 'debug_infs'):
      return 'interpreted: ~10 s a case on CPU; runs compiled in TestMosaicGPUCompiled'
    return super().skip_reason(case)

  @pytest.fixture(autouse=True)
  def _device(self):
    if not self.INTERPRET and not _is_hopper():
      pytest.skip('the compiled Mosaic GPU kernels need a Hopper (sm_90) GPU')
    if self.INTERPRET:
      fm.reset_interpreter()  # a kernel that raised leaves the interpreter's global state behind

  def test_interpreter_poisons_unwritten_kernel_outputs(self):
    # The premise of "unwritten elements fail" for plgpu.kernel: an output element no thread writes is
    # NaN in the GPU interpreter (the harness's version of this test is for pallas_call grids).
    if not self.INTERPRET:
      pytest.skip('only the interpreter poisons outputs')
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def kernel(x_ref, o_ref):
      o_ref[:4] = x_ref[:4]  # rows 4:8 are never written

    out = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((8, 128), jnp.float32), interpret=fm._interpret_params()
    )(jnp.ones((8, 128), jnp.float32))
    out = np.asarray(out)
    assert np.all(out[:4] == 1.0) and np.all(np.isnan(out[4:]))

  @pytest.mark.parametrize(
    'kwargs, match',
    [
      (dict(query=jnp.zeros((1, 8, 2, 32), jnp.float32)), 'not taken by the Mosaic GPU kernel'),
      (dict(block_sizes=fm.BlockSizes(block_q=96)), 'block_sizes.block_q must be a multiple of 64'),
      (dict(block_sizes=fm.BlockSizes(block_k=48)), 'block_sizes.block_k must be a multiple of 32'),
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

  def test_too_few_cpu_pool_threads_for_the_interpreter_is_an_error_not_a_hang(self, monkeypatch):
    # With fewer XLA:CPU pool threads than one kernel's simulated threads, the interpreter would wait at
    # its first barrier for ever (a CI run hung 90 minutes on 2 cores before PJRT_NPROC was set).
    if not self.INTERPRET:
      pytest.skip('compiled: no interpreter')
    monkeypatch.setenv('PJRT_NPROC', '2')
    x = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(RuntimeError, match='PJRT_NPROC=8'):
      fm.flash_attention_mosaic_gpu(x, x, x, interpret=True)

  def test_block_sizes_pick_the_mosaic_gpu_backend(self, monkeypatch):
    # Mosaic GPU block sizes with backend=None run this kernel, as TPU block sizes run the TPU kernel.
    calls = []
    monkeypatch.setattr(
      fm, 'flash_attention_mosaic_gpu_from_spec', lambda q, k, v, scale, spec, **kw: calls.append(kw) or q
    )
    x = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    flash_attention(x, x, x, block_sizes=SMALL, interpret=True)
    assert calls == [dict(block_sizes=SMALL, interpret=True)]


class TestMosaicGPUCompiled(TestMosaicGPUInterpret):
  """The same tests compiled with Mosaic GPU; skipped without a Hopper GPU."""

  INTERPRET = False
  COMPILER_OPTIONS = None
