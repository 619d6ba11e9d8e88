"""Sampling from the language models: temperature, top-k and top-p (nucleus), with cached decoding.

    tokens = generate(model, prompt [B, T0], max_new_tokens, rng=jax.random.key(0),
                      temperature=0.8, top_k=40, top_p=0.95)          # -> [B, T0 + max_new_tokens]

A model takes part through two methods (LSTMLM, LSTMAttentionLM and GPT have them):
    cache = model.init_cache(batch_size, max_len)        # LSTM carry / KV caches (+ carry for the hybrid)
    logits, cache = model.decode(tokens [B, t], cache)   # continue the sequence by t tokens
The prompt is fed once (prefill, one `decode` over T0 tokens); then each new token is one `decode` of
length 1 inside a `lax.fori_loop`, all in one `jax.jit` (compiled once per model structure, shapes and
sampling flags), so a token costs one cached step and never a re-run of the prefix. Dropout is off
(the model is put in eval mode inside the traced copy; the caller's model is left as it is).

The filters are pure functions on logits [..., vocab] and can be used on their own:
    top_k_filter(logits, k), top_p_filter(logits, p), filter_logits(...), sample_logits(...)
Order of operations as in Hugging Face: logits / temperature, then top-k, then top-p, then sample.
temperature=0 is greedy decoding (argmax; top-k/top-p do not change the argmax).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def _scatter_last(mask_sorted: Array, order: Array) -> Array:
  """Puts mask_sorted[..., j] at position order[..., j] of the last axis (inverse of a gather)."""
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(mask_sorted, inverse, axis=-1)


def top_k_filter(logits: Array, k: int) -> Array:
  """Keeps exactly the k largest logits of each row (ties broken by lower index); the rest become -inf."""
  vocab = logits.shape[-1]
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
    raise ValueError(f'top_k must be an integer in [1, vocab={vocab}], got {k!r}.')
  if k == vocab:
    return logits
  order = jnp.argsort(-logits, axis=-1, stable=True)  # [..., V] descending, ties by lower index
  keep = _scatter_last(jnp.broadcast_to(jnp.arange(vocab) < k, logits.shape), order)
  return jnp.where(keep, logits, -jnp.inf)


def top_p_filter(logits: Array, p) -> Array:
  """Keeps the smallest set of most likely tokens whose probability mass is >= p; the rest become -inf.

  A token is kept when the mass of the tokens ranked above it is < p, so the most likely token is always
  kept. p may be a traced scalar; p >= 1 keeps every token with non-zero probability.
  """
  order = jnp.argsort(-logits, axis=-1, stable=True)  # [..., V] descending
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # [..., V] mass of strictly better-ranked tokens
  keep_sorted = (mass_before < p) | (p >= 1.0)  # float32 mass can reach 1 before the tail: keep it all
  keep_sorted = keep_sorted.at[..., 0].set(True)
  return jnp.where(_scatter_last(keep_sorted, order), logits, -jnp.inf)


def _check_sampling(temperature, top_k, top_p):
  if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
    raise ValueError(f'temperature must be a number >= 0 (0 = greedy), got {temperature!r}.')
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f'top_k must be None or a positive integer, got {top_k!r}.')
  if top_p is not None and (
    isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0
  ):
    raise ValueError(f'top_p must be None or in (0, 1], got {top_p!r}.')


def filter_logits(logits: Array, *, temperature=1.0, top_k: int | None = None, top_p=None) -> Array:
  """logits / temperature, then top-k, then top-p. Filtered-out entries are -inf. temperature > 0."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    logits = top_k_filter(logits, min(top_k, logits.shape[-1]))
  if top_p is not None:
    logits = top_p_filter(logits, top_p)
  return logits


def sample_logits(
  rng: Array, logits: Array, *, temperature=1.0, top_k: int | None = None, top_p=None
) -> Array:
  """One token id per row of logits [..., V] -> [...] int32. temperature == 0 is argmax (greedy)."""
  if isinstance(temperature, (int, float)) and temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'greedy', 'top_k', 'use_top_p'))
def _generate(graphdef, state, prompt, rng, temperature, top_p, *, max_new_tokens, greedy, top_k, use_top_p):
  model = nnx.merge(graphdef, state)
  model.eval()  # the traced copy only
  batch, prompt_len = prompt.shape

  def sample(key, logits):  # logits [B, V] -> [B]
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_logits(
      key, logits, temperature=temperature, top_k=top_k, top_p=top_p if use_top_p else None
    )

  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits, cache = model.decode(prompt, cache)  # prefill: [B, T0, V]
  rng, key = jax.random.split(rng)
  first = sample(key, logits[:, -1])  # [B]
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)

  def body(i, carry):  # one cached step: feed token i - 1, sample token i
    out, cache, rng = carry
    logits, cache = model.decode(jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1), cache)  # [B, 1, V]
    rng, key = jax.random.split(rng)
    out = out.at[:, i].set(sample(key, logits[:, 0]))
    return out, cache, rng

  out, _, _ = jax.lax.fori_loop(1, max_new_tokens, body, (out, cache, rng))
  return jnp.concatenate([prompt.astype(jnp.int32), out], axis=1)


def generate(
  model: nnx.Module,
  prompt_tokens,
  max_new_tokens: int,
  *,
  rng: Array,
  temperature=1.0,
  top_k: int | None = None,
  top_p=None,
) -> Array:
  """Samples max_new_tokens after each prompt row. prompt_tokens [B, T0] int -> [B, T0 + max_new_tokens].

  Every row has the same prompt length T0 >= 1 (left-truncate or batch by length). GPT with learned
  positions needs T0 + max_new_tokens <= its max_len. The same rng gives the same tokens.
  """
  if not (hasattr(model, 'init_cache') and hasattr(model, 'decode')):
    raise ValueError(
      f'model {type(model).__name__} cannot generate: it needs init_cache() and decode() '
      '(LSTMLM, LSTMAttentionLM and GPT have them; BERT and classifiers do not).'
    )
  prompt = jnp.asarray(prompt_tokens)
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(
      f'prompt_tokens must be an integer array [batch, T0] with T0 >= 1, got shape '
      f'{prompt.shape} and dtype {prompt.dtype}.'
    )
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f'max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.')
  _check_sampling(temperature, top_k, top_p)
  if max_new_tokens == 0:
    return prompt.astype(jnp.int32)
  graphdef, state = nnx.split(model)
  return _generate(
    graphdef,
    state,
    prompt,
    rng,
    jnp.float32(max(temperature, 1e-6)),
    jnp.float32(1.0 if top_p is None else top_p),
    max_new_tokens=max_new_tokens,
    greedy=temperature == 0,
    top_k=top_k,
    use_top_p=top_p is not None,
  )
