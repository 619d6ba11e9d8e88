"""LSTM + causal self-attention language model, in the spirit of SHA-RNN (Merity 2019).

A stack of residual blocks over a width-d stream; every block has an LSTM, some also attend:

    x = embed(tokens)                                  # [B, T, d]
    for block in blocks:
      x = x + drop(LSTM(LN(x)))                        # carried state: the block's LSTMCarry
      if block attends:  x = x + drop(MHA(LN(x), causal))   # single-head when num_heads == 1; KV cache
      if boom_hidden:    x = x + drop(W2 gelu(W1 LN(x)))    # SHA-RNN's feed-forward "boom" layer
    logits = LN(x) @ embed.T + bias                    # tied softmax (or an untied Linear)

No positional embedding: the LSTM already knows the order. Every attention call goes through
`lstm_attn.attention.MultiHeadAttention`, i.e. `dot_product_attention`.

Parameter layout:
    model.backbone.embed.embedding         [vocab, d_model]
    model.backbone.blocks[i].lstm_norm / lstm / attn_norm / attn / boom_norm / boom
    model.backbone.final_norm
    model.decoder_bias (tied) or model.decoder (untied)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lstm_attn.attention import KVCache, MultiHeadAttention
from lstm_attn.lstm import LSTM, LSTMCarry
from lstm_attn.models.common import (
  EmbeddingDropout,
  LockedDropout,
  TrunkOutput,
  check_tokens,
  check_vocab_size,
  uniform_init,
)

if TYPE_CHECKING:
  from lstm_attn.models.specs import HybridConfig

Array = jax.Array


class HybridCache(NamedTuple):
  """Decoding state: the LSTM carries of all blocks (stacked: h, c [num_layers, B, d]) and one KVCache per
  attending block, in block order."""

  carry: LSTMCarry
  kv: tuple[KVCache, ...]


class Boom(nnx.Module):
  """Feed-forward layer d -> boom_hidden -> d with GELU."""

  def __init__(self, d_model: int, hidden: int, *, dtype=None, rngs: nnx.Rngs):
    self.up = nnx.Linear(d_model, hidden, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(hidden, d_model, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class HybridBlock(nnx.Module):
  """LSTM sub-layer, then (optionally) causal self-attention, then (optionally) a boom layer, all residual."""

  def __init__(
    self,
    d_model: int,
    *,
    attention: bool,
    num_heads: int,
    boom_hidden: int,
    dropout: float,
    weight_drop: float = 0.0,
    implementation=None,
    dtype=None,
    rngs: nnx.Rngs,
  ):
    self.lstm_norm = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs)
    self.lstm = LSTM(d_model, d_model, weight_drop=weight_drop, dtype=dtype, rngs=rngs)
    self.attn_norm = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs) if attention else None
    self.attn = (
      MultiHeadAttention(
        num_heads, d_model, dropout=0.0, implementation=implementation, dtype=dtype, rngs=rngs
      )
      if attention
      else None
    )
    self.boom_norm = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs) if boom_hidden else None
    self.boom = Boom(d_model, boom_hidden, dtype=dtype, rngs=rngs) if boom_hidden else None
    self.drop = LockedDropout(dropout, rngs=rngs)  # the one dropout of every branch (MHA's own is off)

  def __call__(self, x, *, seq_lengths=None, carry=None, kv_cache=None, resets=None):
    """x [B, T, d] -> (x, final LSTMCarry, new KVCache or None)."""
    y, final = self.lstm(self.lstm_norm(x), seq_lengths=seq_lengths, initial_carry=carry, resets=resets)
    x = x + self.drop(y)
    new_kv = None
    if self.attn is not None:
      h = self.attn_norm(x)
      if kv_cache is None:
        # A document that starts inside the window (resets) is its own segment: attention, like the LSTM,
        # sees nothing of the one before it. [B, T] ids, one more at every document start.
        segments = None if resets is None else jnp.cumsum(resets, axis=1, dtype=jnp.int32)
        y = self.attn(h, is_causal=True, key_value_seq_lengths=seq_lengths, segment_ids=segments)
      else:
        y, new_kv = self.attn(h, is_causal=True, cache=kv_cache)
      x = x + self.drop(y)
    if self.boom is not None:
      x = x + self.drop(self.boom(self.boom_norm(x)))
    return x, final, new_kv


class HybridTrunk(nnx.Module):
  """Embedding, residual LSTM/attention blocks and a final LayerNorm: the reusable backbone.

  config: a HybridConfig (checked when it was made).
  """

  def __init__(self, config: HybridConfig, vocab_size: int, *, rngs: nnx.Rngs):
    check_vocab_size(vocab_size)
    d_model, dtype = config.d_model, config.compute_dtype
    self.num_layers = config.num_layers
    self.d_model = d_model
    self.features = d_model  # the size of each hidden state the trunk returns
    self.attention_layers = config.attending_blocks
    self.dtype = dtype
    self.embed = nnx.Embed(vocab_size, d_model, dtype=dtype, embedding_init=uniform_init(0.1), rngs=rngs)
    self.embed_dropout = EmbeddingDropout(config.embed_dropout, rngs=rngs)
    self.input_dropout = LockedDropout(config.dropout, rngs=rngs)
    self.blocks = nnx.List(
      [
        HybridBlock(
          d_model,
          attention=i in self.attention_layers,
          num_heads=config.num_heads,
          boom_hidden=config.boom_hidden,
          dropout=config.dropout,
          weight_drop=config.weight_drop,
          implementation=config.attention_impl,
          dtype=dtype,
          rngs=rngs,
        )
        for i in range(config.num_layers)
      ]
    )
    self.final_norm = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs)

  def zero_carry(self, batch_size: int, dtype=jnp.float32) -> LSTMCarry:
    """The LSTM state of every block before any token: h and c [blocks, B, d_model]."""
    zeros = jnp.zeros((self.num_layers, batch_size, self.d_model), dtype)
    return LSTMCarry(zeros, zeros)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> HybridCache:
    carry = self.zero_carry(batch_size, dtype)
    kv = tuple(
      self.blocks[i].attn.init_cache(batch_size, max_len, self.dtype or dtype) for i in self.attention_layers
    )
    return HybridCache(carry, kv)

  def __call__(
    self,
    tokens,
    *,
    seq_lengths=None,
    cache: HybridCache | None = None,
    carry: LSTMCarry | None = None,
    resets=None,
  ):
    """tokens [B, T] -> TrunkOutput(hidden [B, T, d] after the final LayerNorm, final LSTMCarry stacked over
    blocks, new HybridCache or None). With a cache, tokens continue the cached sequence (seq_lengths
    unsupported). With a carry (and no cache), the LSTMs continue from it and attention sees this window
    only (truncated BPTT, as SHA-RNN trains without its attention memory). resets [B, T]: the LSTMs
    restart from zero before those tokens, and attention sees only the tokens of the same document."""
    check_tokens(tokens, vocab_size=self.embed.num_embeddings)
    if cache is not None and seq_lengths is not None:
      raise ValueError('seq_lengths is not supported together with a decoding cache; pass one or the other.')
    if cache is not None and carry is not None:
      raise ValueError('pass carry or cache, not both: a decoding cache holds its own carry.')
    if cache is not None:
      carry = cache.carry
    table = self.embed_dropout(self.embed.embedding[...])  # [V, d]
    x = jnp.take(table, tokens, axis=0)  # [B, T, d]
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = self.input_dropout(x)
    hs, cs, kvs = [], [], []
    kv_iter = iter(cache.kv) if cache is not None else None
    for i, block in enumerate(self.blocks):
      init = None if carry is None else LSTMCarry(carry.h[i : i + 1], carry.c[i : i + 1])
      kv = next(kv_iter) if (cache is not None and block.attn is not None) else None
      x, block_carry, new_kv = block(x, seq_lengths=seq_lengths, carry=init, kv_cache=kv, resets=resets)
      hs.append(block_carry.h)
      cs.append(block_carry.c)
      if new_kv is not None:
        kvs.append(new_kv)
    final = LSTMCarry(jnp.concatenate(hs, axis=0), jnp.concatenate(cs, axis=0))
    new_cache = HybridCache(final, tuple(kvs)) if cache is not None else None
    return TrunkOutput(self.final_norm(x), final, new_cache)


class LSTMAttentionLM(nnx.Module):
  """SHA-RNN-style language model. `model(tokens) -> logits [B, T, vocab]` (float32).

  config: a HybridConfig, e.g. `LSTMAttentionLM(HybridConfig(num_layers=4), vocab_size, rngs=nnx.Rngs(0))`.
  """

  def __init__(self, config: HybridConfig, vocab_size: int, *, rngs: nnx.Rngs):
    self.backbone = HybridTrunk(config, vocab_size, rngs=rngs)
    self.tie_embeddings = config.tie_embeddings
    self.decoder_bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32)) if self.tie_embeddings else None
    self.decoder = (
      None
      if self.tie_embeddings
      else nnx.Linear(config.d_model, vocab_size, dtype=config.compute_dtype, rngs=rngs)
    )

  def logits_from_hidden(self, h):
    if self.tie_embeddings:
      return self.backbone.embed.attend(h).astype(jnp.float32) + self.decoder_bias[...]
    return self.decoder(h).astype(jnp.float32)

  def __call__(self, tokens, *, seq_lengths=None):
    return self.logits_from_hidden(self.backbone(tokens, seq_lengths=seq_lengths).hidden)

  def train_forward(self, tokens, *, carry: LSTMCarry | None = None, resets=None, seq_lengths=None):
    """(logits, final carry, penalty) for the training loss; the hybrid adds no penalty (AR/TAR are the
    LSTM LM's). seq_lengths [B]: the carry is the state after each row's last valid token."""
    out = self.backbone(tokens, seq_lengths=seq_lengths, carry=carry, resets=resets)
    logits, final = self.logits_from_hidden(out.hidden), out.state
    return logits, final, jnp.zeros((), jnp.float32)

  def forward(self, tokens, *, seq_lengths=None, carry: LSTMCarry | None = None):
    """(logits [B, T, vocab], final LSTMCarry): feeding the carry back continues the LSTMs."""
    out = self.backbone(tokens, seq_lengths=seq_lengths, carry=carry)
    return self.logits_from_hidden(out.hidden), out.state

  def zero_carry(self, batch_size: int, dtype=jnp.float32) -> LSTMCarry:
    return self.backbone.zero_carry(batch_size, dtype)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> HybridCache:
    return self.backbone.init_cache(batch_size, max_len, dtype)

  def decode(self, tokens, cache: HybridCache):
    """tokens [B, t] continuing the cached sequence -> (logits [B, t, V], new cache)."""
    out = self.backbone(tokens, cache=cache)
    return self.logits_from_hidden(out.hidden), out.cache
