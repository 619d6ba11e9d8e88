"""LSTM language model with AWD-LSTM-style regularisation (Merity et al. 2017), in Flax NNX.

    tokens [B, T] -> embedding (word-type dropout) -> locked dropout -> LSTM_1 -> locked dropout -> ...
                  -> LSTM_L -> locked dropout -> (projection) -> softmax over the vocabulary (tied or not)

Parameter layout (stable; the classifier in heads.py reuses the trunk under the same name):
    model.backbone.embed.embedding        [vocab, embed_dim]
    model.backbone.layers[i]              one single-layer `lstm_attn.lstm.LSTM` per layer
    model.out_proj                        Linear(width -> embed_dim), only when tied and width != embed_dim
    model.decoder                         Linear(width -> vocab), only when untied
    model.decoder_bias                    [vocab], only when tied
where width = proj_size or hidden_size. The carry is one `LSTMCarry` with the layers stacked first,
h [num_layers, batch, width] and c [num_layers, batch, hidden_size], as in torch.nn.LSTM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

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
  from lstm_attn.models.specs import LSTMLMConfig

Array = jax.Array


class LSTMTrunk(nnx.Module):
  """Embedding + stacked LSTM layers with AWD-style dropout. The reusable backbone of LSTMLM.

  Each layer is its own single-layer LSTM so a locked dropout mask (one per sequence, shared over time) can
  sit between layers; torch.nn.LSTM's inter-layer dropout draws a fresh mask per step instead.
  config: an LSTMLMConfig (checked when it was made).
  """

  def __init__(self, config: LSTMLMConfig, vocab_size: int, *, rngs: nnx.Rngs):
    check_vocab_size(vocab_size)
    dtype = config.compute_dtype
    self.num_layers = config.num_layers
    self.hidden_size = config.hidden_size
    self.width = config.width
    self.features = self.width  # the size of each hidden state the trunk returns
    self.dtype = dtype
    embed_dim = config.embed_dim
    self.embed = nnx.Embed(
      vocab_size, embed_dim, dtype=dtype, embedding_init=uniform_init(config.embed_init), rngs=rngs
    )
    self.embed_dropout = EmbeddingDropout(config.embed_dropout, rngs=rngs)
    self.input_dropout = LockedDropout(config.input_dropout, rngs=rngs)
    self.hidden_dropout = LockedDropout(config.hidden_dropout, rngs=rngs)
    self.output_dropout = LockedDropout(config.output_dropout, rngs=rngs)
    self.layers = nnx.List(
      [
        LSTM(
          embed_dim if i == 0 else self.width,
          config.hidden_size,
          proj_size=config.proj_size,
          weight_drop=config.weight_drop,
          dtype=dtype,
          rngs=rngs,
        )
        for i in range(config.num_layers)
      ]
    )

  def zero_carry(self, batch_size: int, dtype=jnp.float32) -> LSTMCarry:
    return LSTMCarry(
      h=jnp.zeros((self.num_layers, batch_size, self.width), dtype),  # [L, B, width]
      c=jnp.zeros((self.num_layers, batch_size, self.hidden_size), dtype),  # [L, B, hidden]
    )

  def __call__(
    self, tokens: Array, *, seq_lengths: Array | None = None, carry: LSTMCarry | None = None
  ) -> TrunkOutput:
    """tokens [B, T] int -> TrunkOutput(outputs [B, T, width], final carry with layers stacked first).

    With seq_lengths [B], the final carry of row b is the state after its last valid token and outputs at
    padded steps are whatever the LSTM module gives there (zeros); carry=None starts from zeros.
    """
    return self.run(tokens, seq_lengths=seq_lengths, carry=carry)[0]

  def run(self, tokens, *, seq_lengths=None, carry=None, resets=None) -> tuple[TrunkOutput, Array]:
    """(the TrunkOutput, the last layer's outputs [B, T, width] before its output dropout: for TAR).
    resets [B, T]: where set, every layer's state restarts from zero before that token."""
    check_tokens(tokens, vocab_size=self.embed.num_embeddings)
    table = self.embed_dropout(self.embed.embedding[...])  # [V, E]; whole word types dropped
    x = jnp.take(table, tokens, axis=0)  # [B, T, E]
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = self.input_dropout(x)
    hs, cs = [], []
    for i, layer in enumerate(self.layers):
      init = None if carry is None else LSTMCarry(carry.h[i : i + 1], carry.c[i : i + 1])
      x, final = layer(x, seq_lengths=seq_lengths, initial_carry=init, resets=resets)  # [B, T, width]
      hs.append(final.h)
      cs.append(final.c)
      raw = x
      x = self.hidden_dropout(x) if i < self.num_layers - 1 else self.output_dropout(x)
    carry = LSTMCarry(jnp.concatenate(hs, axis=0), jnp.concatenate(cs, axis=0))
    return TrunkOutput(x, carry), raw


class LSTMLM(nnx.Module):
  """Next-token LSTM language model. `model(tokens) -> logits [B, T, vocab]` (float32).

  config: an LSTMLMConfig, e.g. `LSTMLM(LSTMLMConfig(hidden_size=512), vocab_size, rngs=nnx.Rngs(0))`.
  """

  def __init__(self, config: LSTMLMConfig, vocab_size: int, *, rngs: nnx.Rngs):
    self.backbone = LSTMTrunk(config, vocab_size, rngs=rngs)
    dtype = config.compute_dtype
    self.tie_embeddings = tied = config.tie_embeddings
    width, embed_dim = config.width, config.embed_dim
    # Each attribute is assigned once: None where the option leaves it out.
    self.out_proj = (
      nnx.Linear(width, embed_dim, dtype=dtype, rngs=rngs) if tied and width != embed_dim else None
    )
    self.decoder_bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32)) if tied else None
    self.decoder = None if tied else nnx.Linear(width, vocab_size, dtype=dtype, rngs=rngs)
    self.activation_reg = config.activation_reg
    self.temporal_activation_reg = config.temporal_activation_reg

  def logits_from_hidden(self, h: Array) -> Array:
    """h [B, T, width] -> logits [B, T, vocab] in float32."""
    if self.tie_embeddings:
      if self.out_proj is not None:
        h = self.out_proj(h)
      logits = self.backbone.embed.attend(h)
      return logits.astype(jnp.float32) + self.decoder_bias[...]
    return self.decoder(h).astype(jnp.float32)

  def forward(
    self, tokens: Array, *, seq_lengths: Array | None = None, carry: LSTMCarry | None = None
  ) -> tuple[Array, LSTMCarry]:
    """(logits [B, T, vocab], final carry). Feeding the carry back continues the sequence exactly."""
    out = self.backbone(tokens, seq_lengths=seq_lengths, carry=carry)
    return self.logits_from_hidden(out.hidden), out.state

  def __call__(
    self, tokens: Array, *, seq_lengths: Array | None = None, carry: LSTMCarry | None = None
  ) -> Array:
    return self.forward(tokens, seq_lengths=seq_lengths, carry=carry)[0]

  def train_forward(
    self,
    tokens: Array,
    *,
    carry: LSTMCarry | None = None,
    resets: Array | None = None,
    seq_lengths: Array | None = None,
  ):
    """(logits [B, T, vocab], final carry, AR + TAR penalty) for the training loss (Merity et al. 2017):
    AR = activation_reg * mean(dropped last-layer outputs ** 2), TAR = temporal_activation_reg *
    mean((raw_t - raw_{t-1}) ** 2) over the undropped ones; means over every element, as AWD-LSTM.
    With seq_lengths [B] the means are over the valid steps (and step pairs) only."""
    out, raw = self.backbone.run(tokens, carry=carry, resets=resets, seq_lengths=seq_lengths)
    time, width = raw.shape[1], raw.shape[2]
    valid = jnp.ones(raw.shape[:2], jnp.float32)  # [B, T]
    if seq_lengths is not None:
      valid = (jnp.arange(time)[None, :] < seq_lengths[:, None]).astype(jnp.float32)

    def masked_mean_square(x, w):  # x [B, t, width], w [B, t]
      total = jnp.sum(jnp.square(x.astype(jnp.float32)) * w[..., None])
      return total / jnp.maximum(jnp.sum(w) * width, 1.0)

    penalty = jnp.zeros((), jnp.float32)
    if self.activation_reg:
      penalty += self.activation_reg * masked_mean_square(out.hidden, valid)
    if self.temporal_activation_reg and time > 1:
      penalty += self.temporal_activation_reg * masked_mean_square(raw[:, 1:] - raw[:, :-1], valid[:, 1:])
    return self.logits_from_hidden(out.hidden), out.state, penalty

  def zero_carry(self, batch_size: int, dtype=jnp.float32) -> LSTMCarry:
    """The state before any token: h [layers, B, width], c [layers, B, hidden]."""
    return self.backbone.zero_carry(batch_size, dtype)

  # Generation protocol (see lstm_attn.generate): a cache is whatever carries the past; here the carry.
  def init_cache(self, batch_size: int, max_len: int | None = None, dtype=jnp.float32) -> LSTMCarry:
    del max_len  # an LSTM's state does not grow with the sequence
    return self.backbone.zero_carry(batch_size, dtype)

  def decode(self, tokens: Array, cache: LSTMCarry) -> tuple[Array, LSTMCarry]:
    """tokens [B, t] continuing the sequence summarised by `cache` -> (logits [B, t, V], new cache)."""
    return self.forward(tokens, carry=cache)
