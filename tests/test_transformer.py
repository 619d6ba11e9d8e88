"""MLP and TransformerBlock against float64 NumPy compositions; causality; KV cache; dropout switching."""

import math

import attention_np as ref_np
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_np import randn
from flax import nnx
from helpers import assert_close

from lstm_attn.transformer import MLP, TransformerBlock


def _np_mlp(mlp, x, activation):
  h = ref_np.linear(x, mlp.fc1)
  h = {
    'gelu': ref_np.gelu,
    'gelu_tanh': lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3))),
    'relu': lambda h: np.maximum(h, 0),
    'silu': lambda h: h / (1 + np.exp(-h)),
  }[activation](h)
  return ref_np.linear(h, mlp.fc2)


def test_mlp_activations_match_numpy():
  x = randn(0, (2, 5, 16))
  for activation in ('gelu', 'gelu_tanh', 'relu', 'silu'):
    mlp = MLP(16, 24, activation=activation, rngs=nnx.Rngs(1))
    assert_close(nnx.jit(lambda m, x: m(x))(mlp, x), _np_mlp(mlp, x, activation), what=activation)
  # The block checks its arguments once (the MLP it builds trusts them): activation here, the head counts
  # and dropout in its MultiHeadAttention.
  with pytest.raises(ValueError, match=r"activation must be one of .*got 'swish'"):
    TransformerBlock(16, 2, 24, activation='swish', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'dropout must be a number in \[0, 1\), got 1.0'):
    TransformerBlock(16, 2, 24, dropout=1.0, rngs=nnx.Rngs(0))


def _np_block(block, x, keep, pre_norm, positions=None):
  ln = lambda norm, h: ref_np.layer_norm(h, norm.scale[...], norm.bias[...], norm.epsilon)
  attn = lambda h: ref_np.mha(block.attn, h, None, keep, positions=positions)
  mlp = lambda h: _np_mlp(block.mlp, h, 'gelu')
  x = np.asarray(x, np.float64)
  if pre_norm:
    x = x + attn(ln(block.ln1, x))
    return x + mlp(ln(block.ln2, x))
  x = ln(block.ln1, x + attn(x))
  return ln(block.ln2, x + mlp(x))


@pytest.mark.parametrize('pre_norm', [True, False], ids=['pre_ln', 'post_ln'])
def test_block_matches_numpy(pre_norm):
  block = TransformerBlock(32, 4, 48, num_kv_heads=2, pre_norm=pre_norm, rngs=nnx.Rngs(0))
  # Random LayerNorm parameters, so that a swapped or skipped norm cannot pass.
  for i, norm in enumerate((block.ln1, block.ln2)):
    norm.scale[...] = 1 + 0.5 * randn(10 + i, (32,))
    norm.bias[...] = 0.5 * randn(20 + i, (32,))
  x = randn(1, (2, 9, 32))
  q_lens = jnp.array([9, 5], jnp.int32)
  y = nnx.jit(lambda m, x: m(x, is_causal=True, query_seq_lengths=q_lens))(block, x)
  keep = ref_np.mask(2, 9, 9, causal=True, q_lens=[9, 5])
  assert_close(y, _np_block(block, x, keep, pre_norm))


def test_causal_block_never_looks_ahead():
  block = TransformerBlock(32, 4, 48, rotary=True, rngs=nnx.Rngs(2))
  forward = nnx.jit(lambda m, x: m(x, is_causal=True))
  x = randn(3, (2, 9, 32))
  t = 4
  changed = x.at[:, t + 1 :].set(randn(4, (2, 9 - t - 1, 32)))
  y, y_changed = np.asarray(forward(block, x)), np.asarray(forward(block, changed))
  np.testing.assert_array_equal(y[:, : t + 1], y_changed[:, : t + 1])
  assert np.all(np.abs(y[:, t + 1 :] - y_changed[:, t + 1 :]).max(-1) > 1e-3), 'later outputs must change'


@pytest.mark.parametrize('pre_norm', [True, False], ids=['pre_ln', 'post_ln'])
def test_block_kv_cache_equals_full_forward(pre_norm):
  block = TransformerBlock(32, 4, 48, num_kv_heads=2, pre_norm=pre_norm, rotary=True, rngs=nnx.Rngs(5))
  x = randn(6, (2, 9, 32))
  full = nnx.jit(lambda m, x: m(x, is_causal=True))(block, x)
  step = nnx.jit(lambda m, x, c: m(x, is_causal=True, cache=c))
  cache = block.init_cache(2, 11)
  outs = []
  for start, stop in [(0, 6), (6, 7), (7, 8), (8, 9)]:  # prefill, then one token at a time
    y, cache = step(block, x[:, start:stop], cache)
    outs.append(y)
  assert_close(jnp.concatenate(outs, axis=1), full)


def test_block_dropout_and_gradients_with_an_empty_row():
  block = TransformerBlock(32, 4, 48, dropout=0.3, rngs=nnx.Rngs(7))
  x = randn(8, (2, 9, 32))
  kv_lens = jnp.array([0, 9], jnp.int32)  # batch row 0 sees no key at all
  forward = nnx.jit(lambda m, x: m(x, key_value_seq_lengths=kv_lens))
  block.eval()
  clean = forward(block, x)
  np.testing.assert_array_equal(clean, forward(block, x))
  block.train()
  assert np.abs(np.asarray(forward(block, x) - clean)).max() > 1e-2, 'dropout is on in train mode'
  block.eval()
  d_out = randn(9, x.shape)

  @nnx.jit
  def grads(block, x):
    return nnx.grad(lambda m, x: jnp.vdot(m(x, key_value_seq_lengths=kv_lens), d_out), argnums=(0, 1))(
      block, x
    )

  g_params, g_x = grads(block, x)
  leaves = jax.tree.leaves(nnx.state(g_params)) + [g_x]
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert float(jnp.abs(g_params.attn.query.kernel[...]).max()) > 0, 'row 1 still trains the query weights'


def test_gelu_exact_value_and_gradient_match_float64():
  # Odd size, tails included: value and vector-Jacobian product with a random cotangent vs float64 math.erf.
  from lstm_attn.transformer import gelu_exact

  x = np.concatenate([np.asarray(randn(3, (333,))) * 3, np.array([-12.0, -6.0, 0.0, 6.0, 12.0], np.float32)])
  ct = np.asarray(randn(4, x.shape), np.float64)
  x64 = x.astype(np.float64)
  erf = np.vectorize(math.erf)
  ref_y = 0.5 * x64 * (1 + erf(x64 / math.sqrt(2)))
  ref_dx = ct * (0.5 * (1 + erf(x64 / math.sqrt(2))) + x64 * np.exp(-0.5 * x64**2) / math.sqrt(2 * math.pi))
  y, vjp = jax.vjp(gelu_exact, jnp.asarray(x))
  (dx,) = vjp(jnp.asarray(ct, jnp.float32))
  assert_close(y, ref_y, what='gelu value')
  assert_close(dx, ref_dx, what='gelu vjp')
  np.testing.assert_allclose(np.asarray(y), np.asarray(jax.nn.gelu(x, approximate=False)), atol=1e-6)
