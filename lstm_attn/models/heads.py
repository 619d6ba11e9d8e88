"""Sequence-classification heads over the pretrained backbones.

    SequenceClassifier(family, backbone, num_classes, pooling=..., dropout=..., rngs=...)
    model(tokens, *, seq_lengths=None, token_type_ids=None) -> logits [B, num_classes] (float32)

The trunk lives at `model.backbone`, exactly where it lives in the language model it came from
(LSTMLM / LSTMAttentionLM / GPT / BERT all keep their trunk at `.backbone`), so the parameter paths of the
pretrained trunk match one to one: restoring `checkpoint_params['backbone']` into `classifier.backbone`
transfers everything except the LM head. The new parameters are `model.classifier` (Linear) only.

Every trunk returns a `TrunkOutput(hidden, state, cache)` and has `.features`; the family's `ModelSpec`
(models/specs.py) says which poolings it supports and its default:
    'final_state'  LSTM trunks (spec.carries_state): h of the last LSTM layer after each row's last valid
                   token (the LSTM's final carry respects seq_lengths)
    'last'         the hidden state at position seq_lengths - 1 (for a causal trunk, the only one that has
                   seen all tokens; GPT's default)
    'cls'          trunks fed a [CLS] token (spec.uses_cls_token, BERT): its pooler output at position 0
    'mean'         any: the mean of the hidden states over the valid positions
    'mean_max'     any: [mean, max] over the valid positions, concatenated ([B, 2F]; ULMFiT's concat
                   pooling without its last state): a max lets a feature that fires once anywhere count
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lstm_attn.checks import check_rate
from lstm_attn.models.common import gather_last_valid
from lstm_attn.models.specs import model_spec

Array = jax.Array


def mean_pool(hidden: Array, seq_lengths: Array | None) -> Array:
  """hidden [B, T, F] -> [B, F], the mean over positions < seq_lengths (all when None)."""
  if seq_lengths is None:
    return jnp.mean(hidden, axis=1)
  valid = jnp.arange(hidden.shape[1])[None, :] < jnp.asarray(seq_lengths)[:, None]  # [B, T]
  total = jnp.sum(jnp.where(valid[..., None], hidden, 0), axis=1)
  return total / jnp.maximum(jnp.sum(valid, axis=1), 1)[:, None].astype(hidden.dtype)


def max_pool(hidden: Array, seq_lengths: Array | None) -> Array:
  """hidden [B, T, F] -> [B, F], the max over positions < seq_lengths (all when None; 0 for an empty row)."""
  if seq_lengths is None:
    return jnp.max(hidden, axis=1)
  valid = jnp.arange(hidden.shape[1])[None, :] < jnp.asarray(seq_lengths)[:, None]  # [B, T]
  low = jnp.finfo(hidden.dtype).min
  top = jnp.max(jnp.where(valid[..., None], hidden, low), axis=1)
  return jnp.where(jnp.any(valid, axis=1)[:, None], top, jnp.zeros((), hidden.dtype))


class SequenceClassifier(nnx.Module):
  """A pretrained trunk (`self.backbone`), a pooling rule, dropout and a Linear classifier."""

  def __init__(
    self,
    family: str,
    backbone: nnx.Module,
    num_classes: int,
    *,
    pooling: str | None = None,
    dropout: float = 0.0,
    rngs: nnx.Rngs,
  ):
    spec = model_spec(family)
    if int(num_classes) < 2:
      raise ValueError(f'num_classes must be an integer >= 2, got {num_classes!r}.')
    pooling = spec.default_pooling if pooling is None else pooling
    if pooling not in spec.poolings:
      raise ValueError(f'pooling must be one of {spec.poolings} for a {family!r} backbone, got {pooling!r}.')
    check_rate('dropout', dropout)
    self.family, self.pooling, self.num_classes = family, pooling, int(num_classes)
    self.takes_token_types = spec.uses_cls_token
    self.backbone = backbone
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    pooled = 2 * backbone.features if pooling == 'mean_max' else backbone.features
    self.classifier = nnx.Linear(
      pooled, self.num_classes, kernel_init=nnx.initializers.normal(0.02), rngs=rngs
    )

  def features(self, tokens, *, seq_lengths=None, token_type_ids=None) -> Array:
    """tokens [B, T] -> pooled features [B, F] ([B, 2F] for mean_max)."""
    if token_type_ids is not None and not self.takes_token_types:
      raise ValueError(f'token_type_ids is only used by a bert backbone, got a {self.family!r} backbone.')
    types = {'token_type_ids': token_type_ids} if self.takes_token_types else {}
    out = self.backbone(tokens, seq_lengths=seq_lengths, **types)  # TrunkOutput
    if self.pooling == 'final_state':
      return out.state.h[-1]  # [B, F]: the last layer after each row's last valid step
    if self.pooling == 'cls':
      return self.backbone.pool(out.hidden)
    if self.pooling == 'last':
      return gather_last_valid(out.hidden, seq_lengths)
    if self.pooling == 'mean_max':
      return jnp.concatenate([mean_pool(out.hidden, seq_lengths), max_pool(out.hidden, seq_lengths)], -1)
    return mean_pool(out.hidden, seq_lengths)

  def __call__(self, tokens, *, seq_lengths=None, token_type_ids=None) -> Array:
    pooled = self.features(tokens, seq_lengths=seq_lengths, token_type_ids=token_type_ids)
    return self.classifier(self.dropout(pooled)).astype(jnp.float32)
