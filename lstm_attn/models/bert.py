"""BERT: a bidirectional Transformer encoder with masked-LM and next-sentence-prediction heads, in NNX.

    tokens [B, T], token_type_ids [B, T] -> word + position + token-type embeddings -> LayerNorm -> dropout
        -> TransformerBlock x L (post-LN as in BERT, or pre-LN + a final LayerNorm)   = hidden [B, T, d]
    MLM:  gelu(Linear(hidden)) -> LayerNorm -> @ word_embeddings.T + bias           -> [B, T, vocab]
    NSP:  pooler = tanh(Linear(hidden[:, 0]))  ([CLS]) -> Linear(d, 2)              -> [B, 2]

Attention is non-causal; padding is hidden from every query through key_value_seq_lengths. Initialisation as
BERT / nanoGPT: Linear and Embed ~ N(0, 0.02), biases 0.

Parameter layout (the pooler is part of the backbone, so fine-tuning on [CLS] reuses it):
    model.backbone.word_embeddings / position_embeddings / token_type_embeddings / embed_norm
    model.backbone.blocks[i]       lstm_attn.transformer.TransformerBlock
    model.backbone.final_norm      (pre-LN only)
    model.backbone.pooler          Linear(d, d), tanh
    model.mlm_transform, model.mlm_norm, model.mlm_bias, model.nsp
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lstm_attn.models.common import TrunkOutput, check_sizes, check_tokens, normal_reinit
from lstm_attn.transformer import ACTIVATIONS, TransformerBlock

Array = jax.Array


class BERTTrunk(nnx.Module):
  """Embeddings, encoder blocks and the [CLS] pooler: the reusable backbone."""

  def __init__(
    self,
    vocab_size: int,
    *,
    d_model: int,
    num_layers: int,
    num_heads: int,
    mlp_hidden: int,
    max_len: int,
    type_vocab_size: int,
    dropout: float,
    pre_norm: bool,
    activation: str,
    norm_epsilon: float = 1e-12,
    implementation=None,
    dtype=None,
    rngs: nnx.Rngs,
  ):
    check_sizes(
      vocab_size=vocab_size,
      d_model=d_model,
      num_layers=num_layers,
      num_heads=num_heads,
      mlp_hidden=mlp_hidden,
      max_len=max_len,
      type_vocab_size=type_vocab_size,
    )
    if d_model % num_heads:
      raise ValueError(f'd_model ({d_model}) must be divisible by num_heads ({num_heads}).')
    if activation not in ACTIVATIONS:
      raise ValueError(f'activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.')
    if not 0.0 <= float(dropout) < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {dropout!r}.')
    self.max_len, self.type_vocab_size, self.pre_norm = max_len, type_vocab_size, bool(pre_norm)
    self.word_embeddings = nnx.Embed(vocab_size, d_model, dtype=dtype, rngs=rngs)
    self.features = d_model  # the size of each hidden state the trunk returns
    self.position_embeddings = nnx.Embed(max_len, d_model, dtype=dtype, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(type_vocab_size, d_model, dtype=dtype, rngs=rngs)
    self.embed_norm = nnx.LayerNorm(d_model, epsilon=norm_epsilon, dtype=dtype, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.blocks = nnx.List(
      [
        TransformerBlock(
          d_model,
          num_heads,
          mlp_hidden,
          dropout=dropout,
          pre_norm=self.pre_norm,
          activation=activation,
          norm_epsilon=norm_epsilon,
          implementation=implementation,
          dtype=dtype,
          rngs=rngs,
        )
        for _ in range(num_layers)
      ]
    )
    self.final_norm = (
      nnx.LayerNorm(d_model, epsilon=norm_epsilon, dtype=dtype, rngs=rngs) if self.pre_norm else None
    )
    self.pooler = nnx.Linear(d_model, d_model, dtype=dtype, rngs=rngs)
    normal_reinit(self, rngs.params(), std=0.02)

  def __call__(self, tokens, token_type_ids=None, *, seq_lengths=None):
    """tokens, token_type_ids [B, T] int (types default to 0) -> TrunkOutput(hidden [B, T, d_model])."""
    check_tokens(tokens, vocab_size=self.word_embeddings.num_embeddings)
    batch, seq = tokens.shape
    if seq > self.max_len:
      raise ValueError(f'tokens has {seq} positions but the position table has max_len={self.max_len}.')
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(tokens)
    elif jnp.shape(token_type_ids) != (batch, seq):
      raise ValueError(
        f'token_type_ids must have the shape of tokens {(batch, seq)}, got {jnp.shape(token_type_ids)}.'
      )
    else:
      check_tokens(token_type_ids, 'token_type_ids', vocab_size=self.type_vocab_size)
    x = (
      self.word_embeddings(tokens)
      + self.position_embeddings(jnp.arange(seq))[None]
      + self.token_type_embeddings(token_type_ids)
    )  # [B, T, d]
    x = self.drop(self.embed_norm(x))
    for block in self.blocks:
      x = block(x, is_causal=False, key_value_seq_lengths=seq_lengths)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return TrunkOutput(x)

  def pool(self, hidden):
    """hidden [B, T, d] -> tanh(Linear(hidden[:, 0])) [B, d], the [CLS] summary."""
    return jnp.tanh(self.pooler(hidden[:, 0]))


class BERT(nnx.Module):
  """Encoder with MLM and NSP heads. `model(tokens, token_type_ids) -> (mlm [B, T, V], nsp [B, 2])`."""

  def __init__(
    self,
    vocab_size: int,
    *,
    d_model: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    mlp_hidden: int | None = None,
    max_len: int = 256,
    type_vocab_size: int = 2,
    dropout: float = 0.1,
    pre_norm: bool = False,
    activation: str = 'gelu',
    norm_epsilon=1e-12,
    implementation=None,
    dtype=None,
    rngs: nnx.Rngs,
  ):
    mlp_hidden = 4 * d_model if mlp_hidden is None else mlp_hidden
    self.backbone = BERTTrunk(
      vocab_size,
      d_model=d_model,
      num_layers=num_layers,
      num_heads=num_heads,
      mlp_hidden=mlp_hidden,
      max_len=max_len,
      type_vocab_size=type_vocab_size,
      dropout=dropout,
      pre_norm=pre_norm,
      activation=activation,
      norm_epsilon=norm_epsilon,
      implementation=implementation,
      dtype=dtype,
      rngs=rngs,
    )
    self.activation = activation
    init = nnx.initializers.normal(0.02)
    self.mlm_transform = nnx.Linear(d_model, d_model, dtype=dtype, kernel_init=init, rngs=rngs)
    self.mlm_norm = nnx.LayerNorm(d_model, epsilon=norm_epsilon, dtype=dtype, rngs=rngs)
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
