"""The models: LSTM LM, LSTM + attention hybrid, GPT, BERT, and classification heads, built from configs.

    model = build_model(config, vocab_size=tokenizer.vocab_size, rngs=nnx.Rngs(params=0, dropout=1))

`config.model.name` picks the family (`specs.MODEL_SPECS`); the other `config.model` fields are that
family's config dataclass in `specs.py` (`LSTMLMConfig`, `HybridConfig`, `GPTConfig`, `BERTConfig`, each
with `dtype`, `pooling` and `classifier_dropout` from `ModelConfig`): the one place their defaults, types
and value checks live. Every LM and trunk takes that dataclass (`GPT(GPTConfig(d_model=64), vocab_size,
rngs=rngs)`) and checks nothing again. Any field left out takes its default; a field no family knows (a
typo), a wrong type or a bad value is a ValueError naming `config.model.<field>`.
Fields of the other families are ignored, so `--config.model.name` can switch family on a config built
for another. `default_model_config(name)` returns a ConfigDict with every field of one family (None
defaults as typed placeholders, settable from the command line).
When `config.num_classes` is set (an int >= 2), the result is a `SequenceClassifier` whose `.backbone` is
the trunk of the named model, at the same parameter paths as in the language model (see heads.py).
attention_impl is passed to `dot_product_attention` as `implementation` (None = choose automatically).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections
from flax import nnx
from ml_collections import config_dict

from lstm_attn.models.bert import BERT, BERTTrunk
from lstm_attn.models.common import count_params
from lstm_attn.models.gpt import GPT, GPTTrunk
from lstm_attn.models.heads import SequenceClassifier
from lstm_attn.models.hybrid import HybridTrunk, LSTMAttentionLM
from lstm_attn.models.lstm_lm import LSTMLM, LSTMTrunk
from lstm_attn.models.specs import (
  MODEL_SPECS,
  BERTConfig,
  GPTConfig,
  HybridConfig,
  LSTMLMConfig,
  ModelConfig,
  ModelSpec,
  model_spec,
)

__all__ = [
  'BERT',
  'GPT',
  'LSTMLM',
  'LSTMAttentionLM',
  'SequenceClassifier',
  'BERTConfig',
  'GPTConfig',
  'HybridConfig',
  'LSTMLMConfig',
  'ModelConfig',
  'MODEL_REGISTRY',
  'MODEL_SPECS',
  'ModelSpec',
  'model_spec',
  'build_model',
  'model_config',
  'default_model_config',
  'count_params',
  'BERTTrunk',
  'GPTTrunk',
  'HybridTrunk',
  'LSTMTrunk',
]

MODEL_REGISTRY = {name: spec.lm for name, spec in MODEL_SPECS.items()}  # name -> LM class


def default_model_config(name: str) -> ml_collections.ConfigDict:
  """A ConfigDict with every field of model `name` at its default (from its config dataclass).

  None defaults become typed placeholders, so `--config.model.<field>=...` can set them.
  """
  spec = model_spec(name)
  placeholders = {'int | None': int, 'str | None': str}
  cfg = {'name': name}
  for field in dataclasses.fields(spec.config):
    default = field.default
    cfg[field.name] = (
      config_dict.placeholder(placeholders[field.type])
      if default is None and field.type in placeholders
      else default
    )
  return ml_collections.ConfigDict(cfg)


def _as_dict(section) -> dict:
  if isinstance(section, ml_collections.ConfigDict):
    return section.to_dict()
  if isinstance(section, Mapping):
    return dict(section)
  raise ValueError(f'config.model must be a ConfigDict or a mapping, got {type(section).__name__}.')


def model_config(model_config) -> tuple[ModelSpec, ModelConfig]:
  """config.model checked once: its spec and its frozen config dataclass.

  A field no family knows (a typo) is a ValueError naming it; fields of the other families are ignored,
  so `--config.model.name` can switch family on a config built for another.
  """
  fields = _as_dict(model_config)
  spec = model_spec(fields.get('name'))
  own = {f.name for f in dataclasses.fields(spec.config)}
  known_anywhere = {'name'}.union(
    *({f.name for f in dataclasses.fields(s.config)} for s in MODEL_SPECS.values())
  )
  unknown = sorted(set(fields) - known_anywhere)
  if unknown:
    known = sorted(own | {'name'})
    raise ValueError(
      f'config.model has unknown field(s) {unknown} for name={spec.name!r}; its fields: {known}.'
    )
  cfg = spec.config(**{k: v for k, v in fields.items() if k in own})
  if cfg.pooling is not None and cfg.pooling not in spec.poolings:
    raise ValueError(
      f'config.model.pooling={cfg.pooling!r} does not fit config.model.name={spec.name!r}; '
      f'it takes {spec.poolings} or None (= {spec.default_pooling!r}).'
    )
  return spec, cfg


def build_model(config, *, vocab_size: int, rngs: nnx.Rngs) -> nnx.Module:
  """The model named by config.model.name (a SequenceClassifier over its trunk if config.num_classes)."""
  if 'model' not in config:
    raise ValueError('config has no `model` section; see lstm_attn.models for its fields.')
  spec, cfg = model_config(config.model)
  num_classes = config.get('num_classes', None)
  if num_classes is not None and (
    isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
  ):
    raise ValueError(f'config.num_classes must be None or an integer >= 2, got {num_classes!r}.')
  lm = spec.lm(cfg, vocab_size, rngs=rngs)
  if num_classes is None:
    return lm
  # The LM is built whole (so the trunk is initialised exactly as in pre-training) and its trunk kept.
  return SequenceClassifier(
    spec.name, lm.backbone, num_classes, pooling=cfg.pooling, dropout=cfg.classifier_dropout, rngs=rngs
  )
