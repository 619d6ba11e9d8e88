"""Tests of lstm_attn.generate: the sampling filters on fixed logits, greedy decoding against a slow
re-run-the-prefix reference, reproducibility, one compilation per configuration, and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lstm_attn import generate as gen
from lstm_attn.models import GPT, LSTMLM, GPTConfig, HybridConfig, LSTMAttentionLM, LSTMLMConfig, common

V = 13

MODELS = {
  'lstm_lm': lambda rngs: LSTMLM(LSTMLMConfig(embed_dim=8, hidden_size=16, num_layers=2), V, rngs=rngs),
  'hybrid': lambda rngs: LSTMAttentionLM(
    HybridConfig(d_model=16, num_layers=2, num_heads=2, boom_hidden=24), V, rngs=rngs
  ),
  'gpt_learned': lambda rngs: GPT(GPTConfig(d_model=16, num_layers=2, num_heads=2, max_len=12), V, rngs=rngs),
  'gpt_rotary': lambda rngs: GPT(
    GPTConfig(d_model=16, num_layers=2, num_heads=4, num_kv_heads=1, max_len=12, positions='rotary'),
    V,
    rngs=rngs,
  ),
}


@functools.cache
def make(name):
  return MODELS[name](nnx.Rngs(0))


def random_logits(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape) * 3.0


# ------------------------------------------------------------------------------------------------------
# Filters on fixed logits.


@pytest.mark.parametrize('k', [1, 7, 333])
def test_top_k_keeps_exactly_the_k_largest(k):
  logits = random_logits(0, (3, 333))
  out = np.asarray(gen.top_k_filter(logits, k))
  kept = np.isfinite(out)
  assert np.all(kept.sum(axis=-1) == k)
  expected = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
  for row in range(3):
    assert set(np.flatnonzero(kept[row])) == set(expected[row])
  np.testing.assert_array_equal(out[kept], np.asarray(logits)[kept])
  assert np.all(out[~kept] == -np.inf)


def test_top_k_with_ties_still_keeps_exactly_k():
  out = np.asarray(gen.top_k_filter(jnp.zeros((2, 9)), 4))
  assert np.all(np.isfinite(out).sum(axis=-1) == 4)


def _nucleus_reference(logits, p):
  """Indices of the smallest set of most likely tokens with probability mass >= p (float64)."""
  x = np.asarray(logits, np.float64)
  probs = np.exp(x - x.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
  return set(order[: min(n, len(order))]), probs


@pytest.mark.parametrize('p', [0.05, 0.6, 0.8, 0.93, 1.0])
def test_top_p_keeps_the_smallest_set_with_mass_p(p):
  fixed = np.log(np.array([0.05, 0.5, 0.1, 0.2, 0.15]))
  rows = [jnp.asarray(fixed, jnp.float32)] + list(random_logits(1, (3, 333)))
  for logits in rows:
    out = np.asarray(gen.top_p_filter(logits, p))
    kept = set(np.flatnonzero(np.isfinite(out)))
    expected, probs = _nucleus_reference(logits, p)
    assert kept == expected, (p, sorted(kept), sorted(expected))
    mass = sorted(probs[list(kept)])
    assert sum(mass) >= p - 1e-6 and sum(mass[1:]) < p  # enough mass, and no smaller set has it
  # The fixed row by hand: 0.5 alone covers 0.05; 0.5 + 0.2 = 0.7 < 0.8 <= 0.85 needs three tokens.
  assert set(np.flatnonzero(np.isfinite(gen.top_p_filter(jnp.asarray(fixed), 0.8)))) == {1, 3, 4}


def test_temperature_zero_is_argmax_and_temperature_scales():
  logits = random_logits(2, (5, 333))
  for kw in ({}, {'top_k': 7}, {'top_p': 0.5}):
    tokens = gen.sample_logits(jax.random.key(0), logits, temperature=0, **kw)
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), axis=-1))
  np.testing.assert_allclose(gen.filter_logits(logits, temperature=2.0), np.asarray(logits) / 2.0, rtol=1e-6)


def test_sampling_frequencies_follow_the_filtered_softmax():
  logits = jnp.log(jnp.array([0.05, 0.4, 0.1, 0.25, 0.2]))
  n = 20000
  keys = jax.random.split(jax.random.key(3), n)
  draw = jax.jit(jax.vmap(lambda k: gen.sample_logits(k, logits, temperature=0.5, top_k=3)))
  counts = np.bincount(np.asarray(draw(keys)), minlength=5) / n
  kept = np.array([1, 3, 4])  # the three largest
  target = np.zeros(5)
  target[kept] = np.asarray(jax.nn.softmax(logits[kept] / 0.5))
  assert counts[0] == 0 and counts[2] == 0
  sigma = np.sqrt(target * (1 - target) / n)
  assert np.all(np.abs(counts - target) <= 5 * sigma + 1e-12), (counts, target)


# ------------------------------------------------------------------------------------------------------
# generate() against a slow reference.


@functools.partial(jax.jit, static_argnums=0)
def _logits_at(graphdef, state, tokens, t):
  """Full forward of the whole (padded) buffer; logits at position t (causal: later tokens don't matter)."""
  model = nnx.merge(graphdef, state)
  model.eval()
  return model(tokens)[:, t]


def _greedy_reference(model, prompt, steps):
  graphdef, state = nnx.split(model)
  batch, t0 = prompt.shape
  buf = jnp.zeros((batch, t0 + steps), jnp.int32).at[:, :t0].set(prompt)
  for i in range(steps):
    logits = _logits_at(graphdef, state, buf, t0 + i - 1)
    buf = buf.at[:, t0 + i].set(jnp.argmax(logits, axis=-1))
  return np.asarray(buf)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_greedy_generate_equals_rerunning_the_prefix(name):
  model = make(name)
  # Large weights: at the default N(0, 0.02) init every row repeats one token, which would hide decode
  # bugs (wrong cache positions, an off-by-one in the loop). Per model, a draw whose greedy rows vary.
  std, seed = {'gpt_learned': (0.5, 1), 'gpt_rotary': (0.5, 7), 'hybrid': (0.5, 1), 'lstm_lm': (1.0, 5)}[name]
  common.normal_reinit(model, jax.random.key(seed), std=std)
  prompt = jax.random.randint(jax.random.key(4), (3, 5), 0, V)
  out = gen.generate(model, prompt, 7, rng=jax.random.key(0), temperature=0)
  assert out.shape == (3, 12) and out.dtype == jnp.int32
  assert all(len(set(row[5:].tolist())) > 1 for row in np.asarray(out)), 'generated rows must vary'
  np.testing.assert_array_equal(out, _greedy_reference(model, prompt, 7))


def test_sampling_is_reproducible_and_compiled_once():
  model = make('lstm_lm')
  prompt = jax.random.randint(jax.random.key(4), (3, 5), 0, V)  # the shapes of the greedy test above
  a = gen.generate(model, prompt, 7, rng=jax.random.key(1), temperature=1.0, top_p=0.95)
  size = gen._generate._cache_size()
  b = gen.generate(model, prompt, 7, rng=jax.random.key(1), temperature=1.0, top_p=0.95)
  c = gen.generate(model, prompt, 7, rng=jax.random.key(2), temperature=0.7, top_p=0.9)
  assert gen._generate._cache_size() == size, 'a new rng, temperature or top_p must not recompile'
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))
  np.testing.assert_array_equal(a[:, :5], prompt)
  assert np.all((np.asarray(a) >= 0) & (np.asarray(a) < V))
  # top_k=1 sampling is greedy decoding.
  np.testing.assert_array_equal(
    gen.generate(model, prompt, 7, rng=jax.random.key(1), top_k=1),
    gen.generate(model, prompt, 7, rng=jax.random.key(7), temperature=0),
  )
  # The caller's model keeps its mode (generate switches dropout off in a traced copy only).
  assert model.backbone.layers[0].deterministic is False


def test_generate_edge_lengths():
  model = make('gpt_learned')
  prompt = jax.random.randint(jax.random.key(4), (3, 5), 0, V)
  np.testing.assert_array_equal(gen.generate(model, prompt, 0, rng=jax.random.key(0)), prompt)
  one = gen.generate(model, prompt, 1, rng=jax.random.key(0), temperature=0)
  seven = gen.generate(model, prompt, 7, rng=jax.random.key(0), temperature=0)
  assert one.shape == (3, 6)
  np.testing.assert_array_equal(one, seven[:, :6])


def test_generate_rejects_bad_input():
  model = make('gpt_learned')
  prompt = jnp.array([[1, 2, 3]])
  key = jax.random.key(0)
  cases = [
    ((make('lstm_lm').backbone, prompt, 2), {}, 'init_cache'),  # a trunk, like BERT, has no decode
    ((model, prompt, 2), {'temperature': -1.0}, 'temperature'),
    ((model, prompt, 2), {'top_p': 0.0}, 'top_p'),
    ((model, prompt, 2), {'top_p': 1.5}, 'top_p'),
    ((model, prompt, 2), {'top_k': 0}, 'top_k'),
    ((model, jnp.array([1, 2, 3]), 2), {}, 'prompt_tokens'),
    ((model, jnp.ones((1, 3)), 2), {}, 'prompt_tokens'),
    ((model, prompt, -1), {}, 'max_new_tokens'),
    ((model, prompt, 10), {}, 'max_len'),  # 3 + 10 > the 12 learned positions
  ]
  for args, kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      gen.generate(*args, rng=key, **kwargs)
  with pytest.raises(ValueError, match='top_k'):
    gen.top_k_filter(jnp.zeros((2, 5)), 6)
