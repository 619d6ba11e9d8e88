"""The CPU LSTM kernel (lstm_attn.kernels.lstm_cpu) against the float64 scan, on fresh random inputs.

Where the kernel cannot run (not x86-64 Linux with AVX2/FMA, no compiler) these tests skip, except under
CI=true, where the kernel must build: a CI that silently fell back to the scan would test nothing here.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close

from lstm_attn import lstm as lstm_lib
from lstm_attn.kernels import lstm_cpu

_REASON = lstm_cpu.unusable_reason(16, jnp.float32, jnp.float32, False)
if _REASON and os.environ.get('CI') == 'true':
  raise RuntimeError(f'CI=true but the CPU LSTM kernel is unusable here: {_REASON}')
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f'CPU LSTM kernel unusable: {_REASON}')

# (batch, time, input, hidden, layers, bidirectional, reverse, ragged, resets, threads):
# batches 7 and 13 give every microkernel height (13 = 5 + 4 + 4, 7 = 4 + 3); hidden 96 with 3 threads
# splits 6 panels between 3 threads' unit ranges. (Weight drop only changes w_hh before the kernel; its
# mask is not reproducible in float64, whose uniforms differ: test_awd covers it.)
CONFIGS = {
  'plain': (4, 9, 12, 16, 1, False, False, False, False, None),
  'ragged_resets': (7, 11, 5, 32, 1, False, False, True, True, None),
  'reverse_ragged': (13, 6, 8, 48, 1, False, True, True, False, None),
  'stacked_bidirectional': (3, 8, 10, 32, 2, True, False, True, False, None),
  'stacked_three_threads': (5, 7, 9, 96, 2, False, False, True, True, '3'),
}


@pytest.mark.parametrize('name', list(CONFIGS))
def test_kernel_matches_float64_scan(name, monkeypatch):
  """Outputs, final carry and every gradient (random cotangents) against the scan in float64."""
  batch, time, features, hidden, layers, bidir, reverse, ragged, resets, threads = CONFIGS[name]
  if threads:
    monkeypatch.setenv('LSTM_ATTN_CPU_THREADS', threads)
  keys = iter(jax.random.split(jax.random.key(list(CONFIGS).index(name)), 16))
  params = lstm_lib.init_lstm(next(keys), features, hidden, num_layers=layers, bidirectional=bidir)
  x = jax.random.normal(next(keys), (batch, time, features))
  carry = lstm_lib.LSTMCarry(
    *(jax.random.normal(next(keys), a.shape) for a in lstm_lib.zero_carry(params, batch))
  )  # fmt: skip
  kwargs = {'reverse': reverse}
  if ragged:
    kwargs['seq_lengths'] = jax.random.randint(next(keys), (batch,), 0, time + 1).at[0].set(time)
  if resets:
    kwargs['resets'] = jax.random.bernoulli(next(keys), 0.2, (batch, time))

  def run(params, x, carry, cts, kernel):
    fn = lambda p, x, c: lstm_lib.lstm(p, x, initial_carry=c, cpu_kernel=kernel, **kwargs)
    out, vjp = jax.vjp(fn, params, x, carry)
    return out, vjp(cts)

  shapes = jax.eval_shape(lambda: lstm_lib.lstm(params, x, initial_carry=carry, **kwargs))
  cts = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype), shapes)
  got_out, got_grads = jax.jit(run, static_argnums=4)(params, x, carry, cts, True)
  with jax.enable_x64(True):
    to64 = lambda t: jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), t)
    run64 = jax.jit(run, static_argnums=4)
    want_out, want_grads = run64(to64(params), to64(x), to64(carry), to64(cts), False)
    want_out, want_grads = jax.tree.map(np.asarray, (want_out, want_grads))
  for what, got, want in (('outputs', got_out, want_out), ('gradient', got_grads, want_grads)):
    flat, _ = jax.tree_util.tree_flatten_with_path(got)
    for (path, g), g_ref in zip(flat, jax.tree.leaves(want)):
      assert g.dtype == jnp.float32
      assert_close(g, g_ref, what=f'{name} {what} {jax.tree_util.keystr(path)}')


def test_nan_in_a_valid_step_propagates_as_in_the_scan():
  """A diverged run must show NaN: the vector exp/tanh clamp their inputs, and NaN must pass the clamp."""
  params = lstm_lib.init_lstm(jax.random.key(0), 8, 32)
  x = jax.random.normal(jax.random.key(1), (3, 5, 8)).at[1, 2, 0].set(jnp.nan)
  fast, _ = lstm_lib.lstm(params, x, cpu_kernel=True)
  slow, _ = lstm_lib.lstm(params, x, cpu_kernel=False)
  np.testing.assert_array_equal(np.isnan(fast), np.isnan(slow))
  assert np.isnan(fast).sum() > 0


def test_default_uses_the_kernel_and_false_the_scan():
  params = lstm_lib.init_lstm(jax.random.key(0), 8, 32)
  x = jnp.ones((2, 3, 8))
  hlo = lambda **kw: jax.jit(lambda x: lstm_lib.lstm(params, x, **kw)[0]).lower(x).as_text()
  assert 'lstm_attn_lstm_forward' in hlo()
  assert 'lstm_attn_lstm_forward' not in hlo(cpu_kernel=False)
  assert 'lstm_attn_lstm_forward' not in hlo(dtype=jnp.bfloat16)  # bf16 runs the scan


@pytest.mark.parametrize(
  ('kwargs', 'hidden', 'proj_size', 'message'),
  [
    ({'dtype': jnp.bfloat16}, 32, 0, 'compute dtype bfloat16'),
    ({}, 24, 0, 'hidden_size 24 is not a multiple of 16'),
    ({}, 32, 8, 'proj_size > 0'),
    ({'custom_vjp': False}, 32, 0, 'custom_vjp=False'),
  ],
)
def test_cpu_kernel_true_names_why_it_cannot_run(kwargs, hidden, proj_size, message):
  params = lstm_lib.init_lstm(jax.random.key(0), 8, hidden, proj_size=proj_size)
  with pytest.raises(ValueError, match=f'cpu_kernel=True.*{message}'):
    lstm_lib.lstm(params, jnp.ones((2, 3, 8)), cpu_kernel=True, **kwargs)


@pytest.mark.parametrize(('m', 'k', 'n'), [(13, 300, 48), (7, 5, 16), (40, 513, 32)])
@pytest.mark.parametrize('transpose_a', [False, True])
@pytest.mark.parametrize('transpose_b', [False, True])
def test_matmul_matches_float64(m, k, n, transpose_a, transpose_b):
  """The blocked GEMM at shapes off every block size (M % 6, K % 256) against NumPy float64."""
  rng = np.random.default_rng(m * k + n)
  a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
  a_in, b_in = (a.T if transpose_a else a), (b.T if transpose_b else b)
  got = lstm_cpu.matmul(
    jnp.asarray(a_in, jnp.float32), jnp.asarray(b_in, jnp.float32), transpose_a=transpose_a,
    transpose_b=transpose_b,
  )  # fmt: skip
  assert_close(got, a @ b, what='matmul')


def test_build_failure_and_off_switch_fall_back_to_the_scan(tmp_path):
  """A compiler that fails warns once and runs the scan; LSTM_ATTN_CPU_KERNEL=0 turns the kernel off."""
  script = (
    'import warnings, jax, jax.numpy as jnp\n'
    'from lstm_attn import lstm as L\n'
    'from lstm_attn.kernels import lstm_cpu\n'
    'p = L.init_lstm(jax.random.key(0), 4, 16)\n'
    'with warnings.catch_warnings(record=True) as caught:\n'
    '  warnings.simplefilter("always")\n'
    '  y, _ = L.lstm(p, jnp.ones((2, 3, 4)))\n'
    'print("REASON", lstm_cpu.unusable_reason(16, jnp.float32, jnp.float32, False))\n'
    'print("WARNED", any("CPU LSTM kernel is off" in str(w.message) for w in caught))\n'
    'print("FINITE", bool(jnp.all(jnp.isfinite(y))))\n'
  )
  env = dict(os.environ, LSTM_ATTN_CACHE=str(tmp_path), CXX='false', JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'REASON building lstm_cpu.cc failed' in out.stdout and 'WARNED True' in out.stdout, out.stdout
  assert 'FINITE True' in out.stdout
  env = dict(env, LSTM_ATTN_CPU_KERNEL='0')
  out = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
  assert 'REASON LSTM_ATTN_CPU_KERNEL=0 is set' in out.stdout and 'WARNED False' in out.stdout, out.stdout
