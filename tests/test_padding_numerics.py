"""The LSTM's padding can hold anything: with NaN, inf or huge values at steps >= seq_lengths, outputs, the
final carry and every gradient equal those of the same call with zero padding, bit for bit, in the
hand-written backward pass and in autodiff alike. And the public op refuses what it cannot compute in
(a non-floating compute dtype or inputs) instead of returning zeros.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lstm_attn.lstm import LSTM, LSTMCarry, init_lstm, lstm

LENGTHS = (6, 3, 1)  # batch 3, time 6: rows 1 and 2 are padded from step 3 and 1 on
TIME, FEATURES, HIDDEN = 6, 5, 7

# name -> (num_layers, bidirectional, proj_size, reverse)
CONFIGS = {
  'one_layer': (1, False, 0, False),
  'stacked_proj': (2, False, 3, False),
  'reverse': (1, False, 0, True),
  'bidirectional_stacked': (2, True, 0, False),
}
POISONS = {'nan': np.nan, 'inf': np.inf, '-inf': -np.inf, 'huge': 3e38}


def _setup(config):
  num_layers, bidirectional, proj, _ = config
  keys = jax.random.split(jax.random.key(0), 6)
  params = init_lstm(
    keys[0], FEATURES, HIDDEN, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj
  )
  n = num_layers * (2 if bidirectional else 1)
  batch = len(LENGTHS)
  carry = LSTMCarry(
    jax.random.normal(keys[1], (n, batch, proj or HIDDEN)), jax.random.normal(keys[2], (n, batch, HIDDEN))
  )
  x = jax.random.normal(keys[3], (batch, TIME, FEATURES))
  width = (2 if bidirectional else 1) * (proj or HIDDEN)
  cotangents = (
    jax.random.normal(keys[4], (batch, TIME, width)),  # nonzero at padded steps too
    LSTMCarry(*(jax.random.normal(jax.random.fold_in(keys[5], i), a.shape) for i, a in enumerate(carry))),
  )
  return params, carry, x, cotangents


@pytest.mark.parametrize('custom_vjp', [True, False], ids=['custom_vjp', 'autodiff'])
@pytest.mark.parametrize('config', sorted(CONFIGS))
def test_padding_contents_never_matter(config, custom_vjp):
  params, carry, x, cotangents = _setup(CONFIGS[config])
  reverse = CONFIGS[config][3]
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  pad = (jnp.arange(TIME)[None, :] >= lengths[:, None])[..., None]  # [B, T, 1]

  @jax.jit
  def run(params, x, carry):
    f = lambda p, x, c: lstm(
      p, x, seq_lengths=lengths, initial_carry=c, reverse=reverse, custom_vjp=custom_vjp
    )
    out, vjp = jax.vjp(f, params, x, carry)
    return out, vjp(cotangents)

  (out0, final0), grads0 = run(params, jnp.where(pad, 0.0, x), carry)
  leaves0 = jax.tree.leaves(grads0)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves0)
  for name, poison in POISONS.items():
    (out, final), grads = run(params, jnp.where(pad, poison, x), carry)
    np.testing.assert_array_equal(out, out0, err_msg=f'{name} padding: outputs')
    np.testing.assert_array_equal(final.h, final0.h, err_msg=f'{name} padding: final h')
    np.testing.assert_array_equal(final.c, final0.c, err_msg=f'{name} padding: final c')
    for (path, g), g0 in zip(jax.tree_util.tree_leaves_with_path(grads), leaves0):
      np.testing.assert_array_equal(g, g0, err_msg=f'{name} padding: gradient {jax.tree_util.keystr(path)}')
  assert np.all(np.asarray(out0)[np.broadcast_to(np.asarray(pad), out0.shape)] == 0.0)
  d_x = np.asarray(grads0[1])
  assert np.all(d_x[np.broadcast_to(np.asarray(pad), d_x.shape)] == 0.0), 'padded inputs get no gradient'


def test_lstm_module_padding_never_matters():
  """The NNX module (what the models call) inherits it: NaN padding changes no parameter gradient."""
  model = LSTM(FEATURES, HIDDEN, num_layers=2, rngs=nnx.Rngs(0))
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  x = jax.random.normal(jax.random.key(1), (len(LENGTHS), TIME, FEATURES))
  pad = (jnp.arange(TIME)[None, :] >= lengths[:, None])[..., None]
  ct = jax.random.normal(jax.random.key(2), (len(LENGTHS), TIME, HIDDEN))
  grad = nnx.jit(nnx.grad(lambda m, x: jnp.vdot(m(x, seq_lengths=lengths)[0], ct)))
  clean, poisoned = grad(model, jnp.where(pad, 0.0, x)), grad(model, jnp.where(pad, jnp.nan, x))
  for a, b in zip(jax.tree.leaves(nnx.state(poisoned)), jax.tree.leaves(nnx.state(clean))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.int8, jnp.uint8, bool, 'int16', jnp.complex64, 'float33'])
def test_non_floating_compute_dtype_is_refused(dtype):
  params = init_lstm(jax.random.key(0), 3, 4)
  x = jax.random.normal(jax.random.key(1), (2, 5, 3))
  with pytest.raises(ValueError, match=r'dtype must be a floating dtype .* or None, got'):
    lstm(params, x, dtype=dtype)


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.uint8, jnp.bool_])
def test_non_floating_inputs_are_refused(dtype):
  params = init_lstm(jax.random.key(0), 3, 4)
  with pytest.raises(ValueError, match='inputs must have a floating dtype'):
    lstm(params, jnp.ones((2, 5, 3), dtype))


def test_floating_compute_dtypes_still_run():
  params = init_lstm(jax.random.key(0), 3, 4)
  x = jax.random.normal(jax.random.key(1), (2, 5, 3))
  for dtype in (jnp.bfloat16, jnp.float16, 'float32', np.float32):
    out, _ = lstm(params, x, dtype=dtype)
    assert out.dtype == jnp.dtype(dtype) and bool(jnp.all(jnp.isfinite(out)))
