"""BERT: a bidirectional Transformer encoder with masked-LM and next-sentence-prediction heads, in NNX.

    tokens [B, T], token_type_ids [B, T] -> word + token-type (+ learned position) embeddings -> LayerNorm
        -> dropout
        -> TransformerBlock x L (post-LN as in BERT, or pre-LN + a final LayerNorm)   = hidden [B, T, d]
    MLM:  gelu(Linear(hidden)) -> LayerNorm -> @ word_embeddings.T + bias           -> [B, T, vocab]
    NSP:  pooler = tanh(Linear(hidden[:, 0]))  ([CLS]) -> Linear(d, 2)              -> [B, 2]

Attention is non-causal; padding is hidden from every query through key_value_seq_lengths. Initialisation as
BERT / nanoGPT: Linear and Embed ~ N(0, 0.02), biases 0.

Parameter layout (the pooler is part of the backbone, so fine-tuning on [CLS] reuses it):
    model.backbone.word_embeddings / position_embeddings (learned only) / token_type_embeddings / embed_norm
    model.backbone.blocks[i]       lstm_attn.transformer.TransformerBlock
    model.backbone.final_norm      (pre-LN only)
    model.backbone.pooler          Linear(d, d), tanh
    model.mlm_transform, model.mlm_norm, model.mlm_bias, model.nsp
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lstm_attn.models.common import TrunkOutput, check_tokens, check_vocab_size, normal_reinit
from lstm_attn.transformer import ACTIVATIONS, TransformerBlock

if TYPE_CHECKING:
  from lstm_attn.models.specs import BERTConfig

Array = jax.Array


class BERTTrunk(nnx.Module):
  """Embeddings, encoder blocks and the [CLS] pooler: the reusable backbone.

  config: a BERTConfig (checked when it was made).
  """

  def __init__(self, config: BERTConfig, vocab_size: int, *, rngs: nnx.Rngs):
    check_vocab_size(vocab_size)
    d_model, dtype, eps = config.d_model, config.compute_dtype, config.norm_epsilon
    self.max_len, self.type_vocab_size = config.max_len, config.type_vocab_size
    self.pre_norm = config.pre_norm
    self.word_embeddings = nnx.Embed(vocab_size, d_model, dtype=dtype, rngs=rngs)
    self.features = d_model  # the size of each hidden state the trunk returns
    rotary = config.positions == 'rotary'
    # Learned absolute positions (BERT), or none here and rotary positions inside attention (RoFormer).
    self.position_embeddings = None if rotary else nnx.Embed(config.max_len, d_model, dtype=dtype, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(config.type_vocab_size, d_model, dtype=dtype, rngs=rngs)
    self.embed_norm = nnx.LayerNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs)
    self.drop = nnx.Dropout(config.dropout, rngs=rngs)
    self.blocks = nnx.List(
      [
        TransformerBlock(
          d_model,
          config.num_heads,
          config.mlp_width,
          dropout=config.dropout,
          pre_norm=config.pre_norm,
          rotary=rotary,
          activation=config.activation,
          norm_epsilon=eps,
          implementation=config.attention_impl,
          dtype=dtype,
          rngs=rngs,
        )
        for _ in range(config.num_layers)
      ]
    )
    self.final_norm = nnx.LayerNorm(d_model, epsilon=eps, dtype=dtype, rngs=rngs) if config.pre_norm else None
    self.pooler = nnx.Linear(d_model, d_model, dtype=dtype, rngs=rngs)
    normal_reinit(self, rngs.params(), std=0.02)

  def __call__(self, tokens, token_type_ids=None, *, seq_lengths=None):
    """tokens, token_type_ids [B, T] int (types default to 0) -> TrunkOutput(hidden [B, T, d_model])."""
    check_tokens(tokens, vocab_size=self.word_embeddings.num_embeddings)
    batch, seq = tokens.shape
    if self.position_embeddings is not None and seq > self.max_len:  # rotary positions extrapolate
      raise ValueError(f'tokens has {seq} positions but the position table has max_len={self.max_len}.')
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(tokens)
    elif jnp.shape(token_type_ids) != (batch, seq):
      raise ValueError(
        f'token_type_ids must have the shape of tokens {(batch, seq)}, got {jnp.shape(token_type_ids)}.'
      )
    else:
      check_tokens(token_type_ids, 'token_type_ids', vocab_size=self.type_vocab_size)
    x = self.word_embeddings(tokens) + self.token_type_embeddings(token_type_ids)  # [B, T, d]
    positions = np.arange(seq, dtype=np.int32)  # NumPy: constant rotary tables
    if self.position_embeddings is not None:
      x = x + self.position_embeddings(positions)[None]
    x = self.drop(self.embed_norm(x))
    for block in self.blocks:
      x = block(x, is_causal=False, key_value_seq_lengths=seq_lengths, positions=positions)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return TrunkOutput(x)

  def pool(self, hidden):
    """hidden [B, T, d] -> tanh(Linear(hidden[:, 0])) [B, d], the [CLS] summary."""
    return jnp.tanh(self.pooler(hidden[:, 0]))


class BERT(nnx.Module):
  """Encoder with MLM and NSP heads. `model(tokens, token_type_ids) -> (mlm [B, T, V], nsp [B, 2])`.

  config: a BERTConfig, e.g. `BERT(BERTConfig(d_model=64), vocab_size, rngs=nnx.Rngs(0))`.
  """

  def __init__(self, config: BERTConfig, vocab_size: int, *, rngs: nnx.Rngs):
    self.backbone = BERTTrunk(config, vocab_size, rngs=rngs)
    self.activation = config.activation
    d_model, dtype, init = config.d_model, config.compute_dtype, nnx.initializers.normal(0.02)
    self.mlm_transform = nnx.Linear(d_model, d_model, dtype=dtype, kernel_init=init, rngs=rngs)
    self.mlm_norm = nnx.LayerNorm(d_model, epsilon=config.norm_epsilon, dtype=dtype, rngs=rngs)
    self.mlm_bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))
    self.nsp = nnx.Linear(d_model, 2, dtype=dtype, kernel_init=init, rngs=rngs)

  def encode(self, tokens, token_type_ids=None, *, seq_lengths=None):
    """Hidden states [B, T, d_model] of the encoder."""
    return self.backbone(tokens, token_type_ids, seq_lengths=seq_lengths).hidden

  def mlm_logits(self, hidden):
    """hidden [..., d] -> [..., vocab] float32 (transform, LayerNorm, tied decoder + bias)."""
    h = self.mlm_norm(ACTIVATIONS[self.activation](self.mlm_transform(hidden)))
    return self.backbone.word_embeddings.attend(h).astype(jnp.float32) + self.mlm_bias[...]

  def __call__(self, tokens, token_type_ids=None, *, seq_lengths=None, mlm_positions=None):
    """-> (mlm_logits [B, T, V] (or [B, P, V] at mlm_positions [B, P]), nsp_logits [B, 2]), float32.

    mlm_positions, when given, restricts the vocabulary projection to those positions (the masked ones),
    which is what pre-training needs and saves a [B, T, V] matmul.
    """
    hidden = self.encode(tokens, token_type_ids, seq_lengths=seq_lengths)
    nsp = self.nsp(self.backbone.pool(hidden)).astype(jnp.float32)
    if mlm_positions is not None:
      hidden = jnp.take_along_axis(hidden, jnp.asarray(mlm_positions, jnp.int32)[..., None], axis=1)
    return self.mlm_logits(hidden), nsp
