"""Sequence-classification heads over the pretrained backbones.

    SequenceClassifier(backbone_kind, backbone, num_classes, pooling=..., dropout=..., rngs=...)
    model(tokens, *, seq_lengths=None, token_type_ids=None) -> logits [B, num_classes] (float32)

The trunk lives at `model.backbone`, exactly where it lives in the language model it came from
(LSTMLM / LSTMAttentionLM / GPT / BERT all keep their trunk at `.backbone`), so the parameter paths of the
pretrained trunk match one to one: restoring `checkpoint_params['backbone']` into `classifier.backbone`
transfers everything except the LM head. The new parameters are `model.classifier` (Linear) only.

Pooling (the features the classifier sees), by default per backbone kind:
    'final_state'  lstm_lm, lstm_attn: h of the last LSTM layer after each row's last valid token
                   (the LSTM's final carry respects seq_lengths)
    'last'         gpt: the hidden state at position seq_lengths - 1 (the only one that has seen all tokens)
    'cls'          bert: the pooler output on [CLS] (position 0)
    'mean'         any: the mean of the hidden states over the valid positions
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lstm_attn.models.common import gather_last_valid

Array = jax.Array

BACKBONE_KINDS = ('lstm_lm', 'lstm_attn', 'gpt', 'bert')
POOLINGS = ('final_state', 'last', 'cls', 'mean')
DEFAULT_POOLING = {'lstm_lm': 'final_state', 'lstm_attn': 'final_state', 'gpt': 'last', 'bert': 'cls'}


def mean_pool(hidden: Array, seq_lengths: Array | None) -> Array:
  """hidden [B, T, F] -> [B, F], the mean over positions < seq_lengths (all when None)."""
  if seq_lengths is None:
    return jnp.mean(hidden, axis=1)
  valid = jnp.arange(hidden.shape[1])[None, :] < jnp.asarray(seq_lengths)[:, None]  # [B, T]
  total = jnp.sum(jnp.where(valid[..., None], hidden, 0), axis=1)
  return total / jnp.maximum(jnp.sum(valid, axis=1), 1)[:, None].astype(hidden.dtype)


class SequenceClassifier(nnx.Module):
  """A pretrained trunk (`self.backbone`), a pooling rule, dropout and a Linear classifier."""

  def __init__(
    self,
    backbone_kind: str,
    backbone: nnx.Module,
    num_classes: int,
    *,
    pooling: str | None = None,
    dropout: float = 0.0,
    rngs: nnx.Rngs,
  ):
    if backbone_kind not in BACKBONE_KINDS:
      raise ValueError(f'backbone_kind must be one of {BACKBONE_KINDS}, got {backbone_kind!r}.')
    if int(num_classes) < 2:
      raise ValueError(f'num_classes must be an integer >= 2, got {num_classes!r}.')
    pooling = DEFAULT_POOLING[backbone_kind] if pooling is None else pooling
    if pooling not in POOLINGS:
      raise ValueError(f'pooling must be one of {POOLINGS}, got {pooling!r}.')
    if pooling == 'final_state' and backbone_kind not in ('lstm_lm', 'lstm_attn'):
      raise ValueError(f"pooling='final_state' needs an LSTM backbone, got backbone_kind={backbone_kind!r}.")
    if pooling == 'cls' and backbone_kind != 'bert':
      raise ValueError(f"pooling='cls' needs backbone_kind='bert', got {backbone_kind!r}.")
    if not 0.0 <= float(dropout) < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {dropout!r}.')
    self.backbone_kind, self.pooling, self.num_classes = backbone_kind, pooling, int(num_classes)
    self.backbone = backbone
    features = self._features_dim()
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.classifier = nnx.Linear(
      features, self.num_classes, kernel_init=nnx.initializers.normal(0.02), rngs=rngs
    )

  def _features_dim(self) -> int:
    b = self.backbone
    if self.backbone_kind == 'lstm_lm':
      return b.width
    if self.backbone_kind == 'lstm_attn':
      return b.d_model
    if self.backbone_kind == 'gpt':
      return b.wte.features
    return b.word_embeddings.features

  def features(self, tokens, *, seq_lengths=None, token_type_ids=None) -> Array:
    """tokens [B, T] -> pooled features [B, F]."""
    kind, pooling = self.backbone_kind, self.pooling
    if token_type_ids is not None and kind != 'bert':
      raise ValueError(f'token_type_ids is only used by a bert backbone, got backbone_kind={kind!r}.')
    if kind in ('lstm_lm', 'lstm_attn'):
      if kind == 'lstm_lm':
        hidden, carry = self.backbone(tokens, seq_lengths=seq_lengths)  # [B, T, F], h [L, B, F]
      else:
        hidden, carry, _ = self.backbone(tokens, seq_lengths=seq_lengths)
      if pooling == 'final_state':
        return carry.h[-1]  # [B, F]: the last layer after each row's last valid step
    elif kind == 'gpt':
      hidden = self.backbone(tokens, seq_lengths=seq_lengths)
    else:
      hidden = self.backbone(tokens, token_type_ids, seq_lengths=seq_lengths)
      if pooling == 'cls':
        return self.backbone.pool(hidden)
    if pooling == 'last':
      return gather_last_valid(hidden, seq_lengths)
    return mean_pool(hidden, seq_lengths)

  def __call__(self, tokens, *, seq_lengths=None, token_type_ids=None) -> Array:
    pooled = self.features(tokens, seq_lengths=seq_lengths, token_type_ids=token_type_ids)
    return self.classifier(self.dropout(pooled)).astype(jnp.float32)
