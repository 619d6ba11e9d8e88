"""Tests for lstm_attn.lstm against float64 references, Flax, jax.experimental.rnn and PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close
from jax.experimental import rnn as jax_rnn
from jax.test_util import check_grads

from lstm_attn import lstm as lstm_lib
from lstm_attn.lstm import LSTM, LSTMCarry, init_lstm, lstm, params_from_torch, params_to_torch, zero_carry


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_lstm(params, x, seq_lengths=None, initial_carry=None, reverse=False):
  """The equations in float64 NumPy, one example and one step at a time."""
  p = {name: {k: np.asarray(v, np.float64) for k, v in cell.items()} for name, cell in params.items()}
  num_layers = sum(1 for name in p if not name.endswith('_reverse'))
  num_directions = 2 if 'layer0_reverse' in p else 1
  x = np.asarray(x, np.float64)
  batch, time, _ = x.shape
  lengths = [time] * batch if seq_lengths is None else [int(n) for n in seq_lengths]
  carry = zero_carry(params, batch) if initial_carry is None else initial_carry
  h_n, c_n = np.array(carry.h, np.float64), np.array(carry.c, np.float64)
  for layer in range(num_layers):
    outputs = []
    for direction in range(num_directions):
      cell = p[f'layer{layer}' + ('_reverse' if direction else '')]
      index = layer * num_directions + direction
      y = np.zeros((batch, time, cell['w_hh'].shape[0]))
      for b in range(batch):
        h, c = h_n[index, b], c_n[index, b]
        steps = range(lengths[b])
        for t in reversed(steps) if reverse != bool(direction) else steps:
          i, f, g, o = np.split(x[b, t] @ cell['w_ih'] + cell['b'] + h @ cell['w_hh'], 4)
          c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
          h = _sigmoid(o) * np.tanh(c)
          if 'w_hr' in cell:
            h = h @ cell['w_hr']
          y[b, t] = h
        h_n[index, b], c_n[index, b] = h, c
      outputs.append(y)
    x = np.concatenate(outputs, axis=-1)
  return x, LSTMCarry(h_n, c_n)


def _random_carry(params, batch, key, dtype=jnp.float32):
  zero = zero_carry(params, batch)
  k1, k2 = jax.random.split(key)
  return LSTMCarry(jax.random.normal(k1, zero.h.shape, dtype), jax.random.normal(k2, zero.c.shape, dtype))


# (batch, time, input, hidden, num_layers, bidirectional, proj_size, reverse, ragged)
CONFIGS = {
  'plain': (3, 7, 5, 7, 1, False, 0, False, False),
  'ragged_reverse_stacked_proj': (5, 9, 7, 6, 2, False, 3, True, True),
  'bidirectional_proj_batch1': (1, 6, 4, 7, 3, True, 2, False, True),
}


def _setup(config, seed=0, dtype=jnp.float32):
  batch, time, features, hidden, num_layers, bidirectional, proj, reverse, ragged = config
  keys = jax.random.split(jax.random.key(seed), 4)
  params = init_lstm(
    keys[0], features, hidden, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj,
    forget_bias=0.5, param_dtype=dtype,
  )  # fmt: skip
  # Random biases so every gate's bias is exercised.
  params = {n: {**c, 'b': jax.random.normal(jax.random.fold_in(keys[1], i), c['b'].shape, dtype)}
            for i, (n, c) in enumerate(params.items())}  # fmt: skip
  x = jax.random.normal(keys[2], (batch, time, features), dtype)
  lengths = None
  if ragged:  # includes a full-length and a zero-length example when the batch allows
    lengths = jnp.asarray(np.random.default_rng(seed).integers(0, time + 1, batch), jnp.int32)
    lengths = lengths.at[0].set(time)
    if batch > 2:
      lengths = lengths.at[1].set(0)
  carry = _random_carry(params, batch, keys[3], dtype)
  return params, x, lengths, carry, reverse


# Bidirectional, stacked, ragged without projection: see the lstm_ref and torch comparisons below.
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_matches_numpy_float64(name):
  params, x, lengths, carry, reverse = _setup(CONFIGS[name])
  out, final = jax.jit(lambda p, x, n, c: lstm(p, x, seq_lengths=n, initial_carry=c, reverse=reverse))(
    params, x, lengths, carry
  )
  ref_out, ref_final = numpy_lstm(params, x, lengths, carry, reverse)
  assert out.dtype == jnp.float32 and final.h.dtype == jnp.float32
  assert_close(out, ref_out, what='outputs')
  assert_close(final.h, ref_final.h, what='final h')
  assert_close(final.c, ref_final.c, what='final c')
  if lengths is not None:  # padded outputs are exactly zero
    pad = np.arange(x.shape[1])[None, :] >= np.asarray(lengths)[:, None]
    assert np.all(np.asarray(out)[pad] == 0.0)


def test_bf16_compute_matches_numpy():
  params, x, lengths, carry, reverse = _setup(CONFIGS['ragged_reverse_stacked_proj'], seed=1)
  out, final = lstm(params, x, seq_lengths=lengths, initial_carry=carry, reverse=reverse, dtype=jnp.bfloat16)
  ref_out, ref_final = numpy_lstm(params, x, lengths, carry, reverse)
  assert (
    out.dtype == jnp.bfloat16
    and final.c.dtype == jnp.float32
    and params['layer0']['w_ih'].dtype == jnp.float32
  )
  assert_close(out, ref_out, dtype=jnp.bfloat16, what='bf16 outputs')
  assert_close(final.c, ref_final.c, dtype=jnp.bfloat16, what='bf16 final c')


def test_default_init():
  params = init_lstm(jax.random.key(0), 333, 7, num_layers=2, proj_size=0)
  b = np.asarray(params['layer1']['b'])
  assert np.all(b[7:14] == 1.0) and np.all(b[:7] == 0.0) and np.all(b[14:] == 0.0)
  for gate in range(4):  # each gate's recurrent block is orthogonal
    w = np.asarray(params['layer0']['w_hh'][:, gate * 7 : (gate + 1) * 7])
    np.testing.assert_allclose(w.T @ w, np.eye(7), atol=1e-5)
  plain = init_lstm(jax.random.key(0), 3, 7, forget_bias=0.0, orthogonal_recurrent=False)
  assert np.all(np.asarray(plain['layer0']['b']) == 0.0)
  assert np.max(np.abs(np.asarray(plain['layer0']['w_hh']))) <= 1 / np.sqrt(7)


@pytest.mark.parametrize('cell_type', ['optimized', 'plain'])
def test_matches_flax_nnx_rnn(cell_type):
  batch, time, features, hidden = 4, 9, 5, 7
  params, x, lengths, _, _ = _setup((batch, time, features, hidden, 1, False, 0, False, True), seed=2)
  lengths = lengths.at[1].set(3)  # Flax's final carry needs at least one valid step
  w_ih, w_hh, b = params['layer0']['w_ih'], params['layer0']['w_hh'], params['layer0']['b']
  rngs = nnx.Rngs(0)
  if cell_type == 'optimized':
    cell = nnx.OptimizedLSTMCell(features, hidden, rngs=rngs)
    cell.dense_i.kernel[...] = w_ih
    cell.dense_h.kernel[...] = w_hh
    cell.dense_h.bias[...] = b
  else:
    cell = nnx.LSTMCell(features, hidden, rngs=rngs)
    for k, (ii, hh) in enumerate([('ii', 'hi'), ('if_', 'hf'), ('ig', 'hg'), ('io', 'ho')]):
      gate = slice(k * hidden, (k + 1) * hidden)
      getattr(cell, ii).kernel[...] = w_ih[:, gate]
      getattr(cell, hh).kernel[...] = w_hh[:, gate]
      getattr(cell, hh).bias[...] = b[gate]
  valid = np.arange(time)[None, :, None] < np.asarray(lengths)[:, None, None]
  for reverse in (False, True):
    rnn = nnx.RNN(cell, return_carry=True, reverse=reverse, keep_order=True)
    (c_ref, h_ref), out_ref = rnn(x, seq_lengths=lengths)
    out, final = lstm(params, x, seq_lengths=lengths, reverse=reverse)
    assert_close(np.where(valid, out, 0), np.where(valid, out_ref, 0), what=f'outputs reverse={reverse}')
    assert_close(final.h[0], h_ref, what='final h')
    assert_close(final.c[0], c_ref, what='final c')


@pytest.mark.parametrize('bidirectional', [False, True])
def test_matches_jax_experimental_lstm_ref(bidirectional):
  batch, time, features, hidden, num_layers = 5, 8, 3, 6, 2
  params, x, lengths, carry, _ = _setup(
    (batch, time, features, hidden, num_layers, bidirectional, 0, False, True)
  )
  lengths = jnp.maximum(lengths, 1)  # lstm_ref indexes step length - 1
  names = [
    f'layer{layer}' + s for layer in range(num_layers) for s in (['', '_reverse'] if bidirectional else [''])
  ]
  w_ih = {k: params[n]['w_ih'].T for k, n in enumerate(names)}
  w_hh = {k: params[n]['w_hh'].T for k, n in enumerate(names)}
  b_ih = {k: params[n]['b'] for k, n in enumerate(names)}
  b_hh = {k: jnp.zeros_like(params[n]['b']) for k, n in enumerate(names)}
  out_ref, h_ref, c_ref = jax_rnn.lstm_ref(
    x, carry.h, carry.c, w_ih, w_hh, b_ih, b_hh, lengths, features, hidden, num_layers, 0.0, bidirectional
  )
  out, final = lstm(params, x, seq_lengths=lengths, initial_carry=carry)
  assert_close(out, out_ref, what='outputs')
  assert_close(final.h, h_ref, what='final h')
  assert_close(final.c, c_ref, what='final c')


@pytest.mark.parametrize('name', ['ragged_reverse_stacked_proj', 'bidirectional_proj_batch1'])
def test_check_grads_float64(name):
  batch, time, features, hidden, num_layers, bidirectional, proj, reverse, ragged = CONFIGS[name]
  small = (min(batch, 3), 4, 3, 3, min(num_layers, 2), bidirectional, min(proj, 2), reverse, ragged)
  with jax.enable_x64(True):
    params, x, lengths, carry, reverse = _setup(small, seed=3, dtype=jnp.float64)
    f = jax.jit(lambda p, x, c: lstm(p, x, seq_lengths=lengths, initial_carry=c, reverse=reverse))
    check_grads(f, (params, x, carry), order=1, modes=['rev'], eps=1e-5, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('name', ['ragged_reverse_stacked_proj', 'bidirectional_proj_batch1'])
def test_grads_float32_match_float64_autodiff(name):
  """The hand-written backward pass in float32 against autodiff of the (NumPy-checked) scan in float64."""
  params, x, lengths, carry, reverse = _setup(CONFIGS[name], seed=4)

  def grads(params, x, carry, cts, custom_vjp):
    fn = lambda p, x, c: lstm(
      p, x, seq_lengths=lengths, initial_carry=c, reverse=reverse, custom_vjp=custom_vjp
    )  # fmt: skip
    out, vjp = jax.vjp(fn, params, x, carry)
    return out, vjp(cts)

  shapes = jax.eval_shape(lambda p, x, c: lstm(p, x, seq_lengths=lengths, initial_carry=c), params, x, carry)
  keys = iter(jax.random.split(jax.random.key(5), 4))
  cts = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype), shapes)
  out, got = jax.jit(grads, static_argnums=4)(params, x, carry, cts, True)
  with jax.enable_x64(True):
    to64 = lambda t: jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), t)
    _, want = jax.jit(grads, static_argnums=4)(to64(params), to64(x), to64(carry), to64(cts), False)
    want = jax.tree.map(np.asarray, want)
  assert np.all(np.isfinite(out[0]))
  flat, _ = jax.tree_util.tree_flatten_with_path(got)
  for (path, g), g_ref in zip(flat, jax.tree.leaves(want)):
    assert g.dtype == jnp.float32
    assert_close(g, g_ref, what=f'gradient {jax.tree_util.keystr(path)}')


def test_custom_vjp_matches_autodiff_bf16():
  params, x, lengths, carry, _ = _setup((3, 5, 4, 6, 1, False, 2, True, True), seed=6)

  def grads(params, x, custom_vjp):
    fn = lambda p, x: lstm(
      p, x, seq_lengths=lengths, initial_carry=carry, reverse=True, dtype=jnp.bfloat16, custom_vjp=custom_vjp
    )  # fmt: skip
    out, vjp = jax.vjp(fn, params, x)
    return vjp(jax.tree.map(lambda a: jax.random.normal(jax.random.key(7), a.shape, a.dtype), out))

  got, want = (jax.jit(grads, static_argnums=2)(params, x, custom) for custom in (True, False))
  for g, g_ref in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(g, g_ref, dtype=jnp.bfloat16, what='bf16 custom vjp vs autodiff')


def test_torch_round_trip():
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  features, hidden, proj, batch, time = 5, 7, 3, 4, 6
  model = torch.nn.LSTM(features, hidden, num_layers=2, bidirectional=True, proj_size=proj, batch_first=True)
  x = np.random.default_rng(0).standard_normal((batch, time, features)).astype(np.float32)
  lengths = np.array([6, 2, 5, 1])
  packed = torch.nn.utils.rnn.pack_padded_sequence(
    torch.from_numpy(x), torch.from_numpy(lengths), batch_first=True, enforce_sorted=False
  )
  with torch.no_grad():
    out_t, (h_t, c_t) = model(packed)
    out_t, _ = torch.nn.utils.rnn.pad_packed_sequence(out_t, batch_first=True, total_length=time)
    full_t, (hf_t, cf_t) = model(torch.from_numpy(x))
  params = params_from_torch(model.state_dict())
  out, final = lstm(params, jnp.asarray(x), seq_lengths=jnp.asarray(lengths, jnp.int32))
  assert_close(out, out_t.numpy(), what='ragged outputs vs torch')
  assert_close(final.h, h_t.numpy(), what='h_n vs torch')
  assert_close(final.c, c_t.numpy(), what='c_n vs torch')
  full, full_final = lstm(params, jnp.asarray(x))
  assert_close(full, full_t.numpy(), what='outputs vs torch')
  assert_close(full_final.h, hf_t.numpy(), what='h_n vs torch (full length)')
  # Back to torch: a fresh torch.nn.LSTM loaded from our params gives the same outputs.
  model2 = torch.nn.LSTM(features, hidden, num_layers=2, bidirectional=True, proj_size=proj, batch_first=True)
  model2.load_state_dict(params_to_torch(params))
  with torch.no_grad():
    full2, _ = model2(torch.from_numpy(x))
  assert_close(full2.numpy(), full_t.numpy(), what='torch -> params -> torch')


def test_nnx_module_and_one_step_generation():
  batch, time, features, hidden = 3, 5, 4, 6
  model = LSTM(features, hidden, num_layers=2, proj_size=3, dropout=0.3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (batch, time, features))
  model.eval()
  out, final = model(x)
  ref, ref_final = lstm(model.pure_params(), x)
  np.testing.assert_array_equal(out, ref)
  np.testing.assert_array_equal(final.c, ref_final.c)
  # Stepping one step at a time with the carry reproduces the full scan.
  carry = model.zero_carry(batch)
  steps = []
  for t in range(time):
    y, carry = model(x[:, t : t + 1], initial_carry=carry)
    steps.append(y)
  assert_close(jnp.concatenate(steps, axis=1), out, what='one step at a time')
  assert_close(carry.h, final.h, what='final h after stepping')
  # Train mode: between-layer dropout draws fresh keys from the module's 'dropout' stream.
  model.train()
  a, _ = model(x)
  b, _ = model(x)
  assert not np.allclose(a, b) and not np.allclose(a, out)
  grads = nnx.grad(lambda m: jnp.vdot(m(x)[0], ref))(model)
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in jax.tree.leaves(grads))


def test_one_step_reverse_and_empty_sequences():
  params, x, _, carry, _ = _setup(CONFIGS['plain'], seed=8)
  out, final = lstm(params, x[:, :0], initial_carry=carry)
  assert out.shape == (3, 0, 7)
  np.testing.assert_array_equal(final.h, carry.h)
  zero = jnp.zeros((3,), jnp.int32)  # every example empty: outputs zero, carry unchanged
  out, final = lstm(params, x, seq_lengths=zero, initial_carry=carry, reverse=True)
  assert np.all(np.asarray(out) == 0.0)
  np.testing.assert_array_equal(final.c, carry.c)


def test_bad_inputs_raise():
  params = init_lstm(jax.random.key(0), 4, 5, num_layers=2)
  x = jnp.ones((2, 3, 4))
  with pytest.raises(ValueError, match='inputs must have rank 3'):
    lstm(params, jnp.ones((3, 4)))
  with pytest.raises(ValueError, match='inputs has 5 features'):
    lstm(params, jnp.ones((2, 3, 5)))
  with pytest.raises(ValueError, match='inputs must have a floating dtype'):
    lstm(params, jnp.ones((2, 3, 4), jnp.int32))
  with pytest.raises(ValueError, match='seq_lengths must be an integer array of shape'):
    lstm(params, x, seq_lengths=jnp.ones((3,), jnp.int32))
  with pytest.raises(ValueError, match='seq_lengths must be an integer array of shape'):
    lstm(params, x, seq_lengths=jnp.ones((2,), jnp.float32))
  with pytest.raises(ValueError, match=r'seq_lengths must lie in \[0, time=3\]'):
    lstm(params, x, seq_lengths=jnp.array([1, 4]))
  bad_carry = LSTMCarry(jnp.zeros((1, 2, 5)), jnp.zeros((1, 2, 5)))
  with pytest.raises(ValueError, match='initial_carry has shapes'):
    lstm(params, x, initial_carry=bad_carry)
  with pytest.raises(ValueError, match='dropout > 0 needs rng'):
    lstm(params, x, dropout=0.5)
  with pytest.raises(ValueError, match=r'dropout must be a number in \[0, 1\), got 1.0'):
    lstm(params, x, dropout=1.0, rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r'dropout must be a number in \[0, 1\), got -0.5'):
    LSTM(5, 4, dropout=-0.5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='reverse=True is only defined'):
    lstm(init_lstm(jax.random.key(0), 4, 5, bidirectional=True), x, reverse=True)
  with pytest.raises(ValueError, match='proj_size must be'):
    init_lstm(jax.random.key(0), 4, 5, proj_size=5)
  with pytest.raises(ValueError, match='params'):
    lstm({'layer0': {**params['layer0'], 'w_hh': jnp.zeros((5, 7))}}, x)
  with pytest.raises(ValueError, match='state_dict'):
    params_from_torch({'weight': np.zeros(3)})
  assert lstm_lib.DEFAULT_UNROLL >= 1
