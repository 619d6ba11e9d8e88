"""Small pieces shared by the models: initialisers, dtype parsing, dropout flavours, position helpers."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


class TrunkOutput(NamedTuple):
  """What every trunk returns: hidden [B, T, features]; the final recurrent state (an LSTMCarry, layers
  stacked first) or None for trunks without one; the new decoding cache, or None when none was given."""

  hidden: jax.Array
  state: Any = None
  cache: Any = None


def parse_dtype(name: str | None, field: str = 'config.model.dtype'):
  """'float32' / 'bfloat16' / 'float16' -> that jnp dtype; None stays None (the params' float32)."""
  if name is not None and name not in _DTYPES:
    raise ValueError(f'{field} must be one of {sorted(_DTYPES)} or None, got {name!r}.')
  return None if name is None else _DTYPES[name]


def uniform_init(scale: float):
  """U(-scale, scale), the AWD-LSTM embedding initialiser."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


class LockedDropout(nnx.Module):
  """Variational ("locked") dropout: one mask per sequence, shared across time. x: [batch, time, features]."""

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    self.drop = nnx.Dropout(rate, broadcast_dims=(1,), rngs=rngs)

  def __call__(self, x):
    return self.drop(x)


class EmbeddingDropout(nnx.Module):
  """Drops whole word types (rows of the embedding table) at once, as in AWD-LSTM (Gal & Ghahramani).

  Every occurrence of a dropped word in the batch gets the zero vector; the kept rows are scaled by
  1 / (1 - rate). Call with the table [vocab, features]; returns the (possibly) masked table.
  """

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    self.drop = nnx.Dropout(rate, broadcast_dims=(1,), rngs=rngs)

  def __call__(self, table):
    return self.drop(table)


def segment_positions(segment_ids: Array) -> Array:
  """Position of each token inside its own segment. segment_ids: [batch, seq] int -> [batch, seq] int32.

  A segment starts wherever the id changes, so packed documents each count from 0.
  """
  seq = segment_ids.shape[1]
  idx = jnp.arange(seq, dtype=jnp.int32)[None, :]  # [1, seq]
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)  # [batch, seq]
  return (idx - start_idx).astype(jnp.int32)


def gather_last_valid(hidden: Array, seq_lengths: Array | None) -> Array:
  """hidden [batch, seq, features] -> [batch, features] at position seq_lengths - 1 (or the last one)."""
  batch, seq = hidden.shape[:2]
  if seq_lengths is None:
    return hidden[:, -1]
  last = jnp.clip(jnp.asarray(seq_lengths, jnp.int32) - 1, 0, seq - 1)  # [batch]
  return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def normal_reinit(
  module: nnx.Module,
  key: Array,
  *,
  std: float = 0.02,
  residual_std: float | None = None,
  is_residual=lambda path: False,
):
  """nanoGPT / BERT initialisation of every Linear and Embed in `module`, in place.

  Linear kernels and embeddings ~ N(0, std), biases 0 (LayerNorms keep ones/zeros). Linears whose path
  satisfies `is_residual` (the projections that write into the residual stream) use `residual_std`
  (nanoGPT: 0.02 / sqrt(2 * num_layers)).
  """
  nodes = [(path, node) for path, node in nnx.iter_graph(module) if isinstance(node, (nnx.Linear, nnx.Embed))]
  keys = jax.random.split(key, max(len(nodes), 1))
  for k, (path, node) in zip(keys, nodes):
    if isinstance(node, nnx.Embed):
      table = node.embedding
      table[...] = (std * jax.random.normal(k, table.shape)).astype(table.dtype)
      continue
    s = residual_std if (residual_std is not None and is_residual(path)) else std
    node.kernel[...] = (s * jax.random.normal(k, node.kernel.shape)).astype(node.kernel.dtype)
    if node.bias is not None:
      node.bias[...] = jnp.zeros(node.bias.shape, node.bias.dtype)


def residual_std(num_layers: int, std: float = 0.02) -> float:
  return std / math.sqrt(2 * num_layers)


def check_vocab_size(vocab_size) -> None:
  """vocab_size (the one model size not in the config: it comes from the tokenizer) is a positive int."""
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
    raise ValueError(f'vocab_size must be a positive integer, got {vocab_size!r}.')


def check_tokens(tokens, name='tokens', *, vocab_size: int | None = None):
  """tokens must be a rank-2 integer array [batch, seq], with ids in [0, vocab_size) when they are concrete.

  The range is checked only outside jit (a traced array has no values): an id past the table would
  otherwise read NaN embeddings with no error.
  """
  if jnp.ndim(tokens) != 2:
    raise ValueError(f'{name} must have shape [batch, seq], got shape {jnp.shape(tokens)}.')
  dtype = jnp.result_type(tokens)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f'{name} must be integers, got {dtype}.')
  if vocab_size is None or isinstance(tokens, jax.core.Tracer) or not jnp.size(tokens):
    return
  ids = np.asarray(tokens)  # NumPy: no tracing even when the call is inside jit with constant tokens
  lo, hi = int(ids.min()), int(ids.max())
  if lo < 0 or hi >= vocab_size:
    raise ValueError(f'{name} must be ids in [0, {vocab_size}), got values from {lo} to {hi}.')


def count_params(module: nnx.Module) -> int:
  """Number of scalars in the module's nnx.Param variables (tied weights counted once)."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
