"""The key/value cache of `MultiHeadAttention` for generation: fixed-size buffers and a length."""

from __future__ import annotations

from typing import NamedTuple

import jax

Array = jax.Array


class KVCache(NamedTuple):
  """Keys and values of the tokens seen so far, in fixed-size buffers (static shapes for jit).

  key, value: [batch, max_len, num_kv_heads, head_dim]; positions >= length hold garbage (zeros at init).
  length: int32 scalar array, the number of tokens already in the cache.
  """

  key: Array
  value: Array
  length: Array
