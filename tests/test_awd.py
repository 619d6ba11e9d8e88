"""AWD-LSTM regularisation: weight drop (DropConnect on w_hh), AR and TAR, against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close
from test_lstm import CONFIGS, _setup, numpy_lstm

from lstm_attn.lstm import LSTM, LSTMCarry, lstm
from lstm_attn.models import LSTMLM
from lstm_attn.models.specs import LSTMLMConfig


def _dropped(params, rng, rate):
  """The params `lstm(..., weight_drop=rate, rng=rng)` runs with: each w_hh times its mask / (1 - rate)."""
  _, drop_key = jax.random.split(rng)
  out = {}
  for index, (name, cell) in enumerate(params.items()):  # layer-major, forward before reverse
    keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(drop_key, index), 1 - rate, cell['w_hh'].shape))
    out[name] = {**cell, 'w_hh': np.where(keep, np.asarray(cell['w_hh'], np.float64) / (1 - rate), 0.0)}
  return out, keep


@pytest.mark.parametrize('name', ['plain', 'bidirectional_proj_batch1'])
def test_weight_drop_is_dropconnect_on_w_hh_shared_over_steps_and_rows(name):
  params, x, lengths, carry, reverse = _setup(CONFIGS[name])
  rng = jax.random.key(7)
  got, final = jax.jit(
    lambda p, x, c: lstm(p, x, seq_lengths=lengths, initial_carry=c, weight_drop=0.5, rng=rng)
  )(params, x, carry)
  dropped, keep = _dropped(params, rng, 0.5)
  want, want_final = numpy_lstm(dropped, x, lengths, carry)  # one masked matrix for every step and row
  assert_close(got, want, what='outputs with weight drop')
  assert_close(final.c, want_final.c, what='final c with weight drop')
  assert 0.3 < keep.mean() < 0.7  # a real mask at rate 0.5
  undropped, _ = numpy_lstm(params, x, lengths, carry)
  assert np.abs(np.asarray(got) - undropped).max() > 1e-2


def test_weight_drop_gradients_custom_vjp_match_autodiff():
  """The hand-written backward through the masked matrix against autodiff of the same (float64-checked)
  forward, random cotangents (a float64 run would draw another mask: bernoulli samples in the float
  dtype; float64 check_grads of the custom VJP is test_lstm.py's, the mask only scales w_hh)."""
  params, x, lengths, _, _ = _setup(CONFIGS['ragged_reverse_stacked_proj'], seed=4)

  def grads(params, x, cts, custom_vjp):
    fn = lambda p, x: lstm(
      p, x, seq_lengths=lengths, weight_drop=0.3, rng=jax.random.key(3), custom_vjp=custom_vjp
    )[0]  # fmt: skip
    return jax.vjp(fn, params, x)[1](cts)

  cts = jax.random.normal(jax.random.key(5), jax.eval_shape(lambda: lstm(params, x)[0]).shape)
  got = jax.jit(grads, static_argnums=3)(params, x, cts, True)
  want = jax.jit(grads, static_argnums=3)(params, x, cts, False)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(g, w, what='gradient with weight drop, custom VJP vs autodiff')


def test_weight_drop_only_in_train_mode_and_checked():
  m = LSTM(3, 4, weight_drop=0.5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 3))
  m.eval()
  np.testing.assert_array_equal(np.asarray(m(x)[0]), np.asarray(lstm(m.pure_params(), x)[0]))
  m.train()
  assert np.abs(np.asarray(m(x)[0]) - np.asarray(lstm(m.pure_params(), x)[0])).max() > 1e-3
  with pytest.raises(ValueError, match='weight_drop must be a number in'):
    LSTM(3, 4, weight_drop=1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='weight_drop > 0 needs rng'):
    lstm(m.pure_params(), x, weight_drop=0.1)
  with pytest.raises(ValueError, match='config.model.weight_drop'):
    LSTMLMConfig(weight_drop=-0.1)
  with pytest.raises(ValueError, match='config.model.temporal_activation_reg'):
    LSTMLMConfig(temporal_activation_reg=float('inf'))


def test_ar_and_tar_penalties_match_float64():
  cfg = LSTMLMConfig(
    embed_dim=6, hidden_size=8, num_layers=2, activation_reg=2.0, temporal_activation_reg=1.5
  )
  model = LSTMLM(cfg, 11, rngs=nnx.Rngs(0))
  model.eval()  # no dropout: the dropped and the raw outputs are the same
  tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, 11)
  logits, _, penalty = model.train_forward(tokens)
  h = np.asarray(model.backbone(tokens).hidden, np.float64)  # [B, T, width]
  want = 2.0 * np.mean(h**2) + 1.5 * np.mean((h[:, 1:] - h[:, :-1]) ** 2)
  np.testing.assert_allclose(float(penalty), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model(tokens)), rtol=1e-6, atol=1e-6)
  off = LSTMLM(LSTMLMConfig(embed_dim=6, hidden_size=8), 11, rngs=nnx.Rngs(0))
  assert float(off.train_forward(tokens)[2]) == 0.0


def test_ar_reads_the_dropped_outputs_and_tar_the_raw_ones():
  """AWD-LSTM: AR on the last layer's outputs after its (locked) dropout, TAR on them before it."""
  cfg = LSTMLMConfig(
    embed_dim=6,
    hidden_size=8,
    num_layers=2,
    output_dropout=0.5,
    activation_reg=2.0,
    temporal_activation_reg=1.5,
  )
  model = LSTMLM(cfg, 11, rngs=nnx.Rngs(0))
  model.train()
  tokens = jax.random.randint(jax.random.key(2), (3, 9), 0, 11)
  twin = nnx.clone(model)  # the same dropout RNG state, so the same masks
  _, _, penalty = model.train_forward(tokens)
  out, raw = twin.backbone.run(tokens)
  dropped, raw = np.asarray(out.hidden, np.float64), np.asarray(raw, np.float64)  # [B, T, width]
  assert np.mean(dropped == 0) > 0.2 and np.abs(dropped - raw).max() > 1e-2  # the dropout is on
  tar = 1.5 * np.mean((raw[:, 1:] - raw[:, :-1]) ** 2)
  np.testing.assert_allclose(float(penalty), 2.0 * np.mean(dropped**2) + tar, rtol=1e-5)
  swapped = 2.0 * np.mean(raw**2) + 1.5 * np.mean((dropped[:, 1:] - dropped[:, :-1]) ** 2)
  assert abs(float(penalty) - swapped) > 1e-3 * abs(swapped)


def _numpy_with_resets(params, x, resets, carry):
  """float64 reference: the sequence cut at every reset, each piece run from a zero state."""
  batch, time, _ = x.shape
  outs = np.zeros((batch, time, params['layer0']['w_hh'].shape[0]))
  h_all, c_all = [], []
  for b in range(batch):
    starts = [0] + [t for t in range(1, time) if resets[b, t]] + [time]
    state = LSTMCarry(carry.h[:, b : b + 1], carry.c[:, b : b + 1])
    if resets[b, 0]:
      state = LSTMCarry(np.zeros_like(state.h), np.zeros_like(state.c))
    for s, e in zip(starts[:-1], starts[1:]):
      y, state = numpy_lstm(params, x[b : b + 1, s:e], initial_carry=state)
      outs[b, s:e] = y[0]
      state = LSTMCarry(np.zeros_like(state.h), np.zeros_like(state.c)) if e < time else state
    h_all.append(state.h)
    c_all.append(state.c)
  return outs, LSTMCarry(np.concatenate(h_all, 1), np.concatenate(c_all, 1))


def test_resets_restart_the_state_inside_a_sequence():
  """A document starting at step t inside a carried stream: outputs and final carry equal running each
  piece from zeros (float64 NumPy); gradients by the custom VJP equal autodiff with random cotangents."""
  params, x, _, carry, _ = _setup((3, 8, 4, 5, 2, False, 0, False, False), seed=6)
  resets = np.zeros((3, 8), bool)
  resets[0, 3] = resets[1, 0] = resets[1, 5] = resets[2, 7] = True
  out, final = jax.jit(lambda p, x, c: lstm(p, x, initial_carry=c, resets=resets))(params, x, carry)
  want, want_final = _numpy_with_resets(params, np.asarray(x, np.float64), resets, carry)
  assert_close(out, want, what='outputs with resets')
  assert_close(final.h, want_final.h, what='final h with resets')
  assert_close(final.c, want_final.c, what='final c with resets')

  def grads(params, x, c, cts, custom_vjp):
    fn = lambda p, x, c: lstm(p, x, initial_carry=c, resets=resets, custom_vjp=custom_vjp)
    return jax.vjp(fn, params, x, c)[1](cts)

  shapes = jax.eval_shape(lambda: lstm(params, x, initial_carry=carry))
  keys = iter(jax.random.split(jax.random.key(8), 4))
  cts = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype), shapes)
  got = jax.jit(grads, static_argnums=4)(params, x, carry, cts, True)
  ref = jax.jit(grads, static_argnums=4)(params, x, carry, cts, False)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert_close(g, w, what='gradient with resets, custom VJP vs autodiff')
  # Row 1 resets at step 0: nothing flows back into its initial carry.
  assert float(jnp.abs(got[2].h[:, 1]).max()) == 0 and float(jnp.abs(got[2].c[:, 1]).max()) == 0
  with pytest.raises(ValueError, match='resets must have shape'):
    lstm(params, x, resets=resets[:, :3])
