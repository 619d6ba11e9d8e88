"""The models: LSTM LM, LSTM + attention hybrid, GPT, BERT, and classification heads, built from configs.

    model = build_model(config, vocab_size=tokenizer.vocab_size, rngs=nnx.Rngs(params=0, dropout=1))

`config.model.name` picks the architecture; the other `config.model` fields set its sizes (any field left
out takes the default below; a field no model knows (a typo), a wrong type or a bad value is a ValueError
naming `config.model.<field>`; fields of the other model families are ignored, so `--config.model.name`
can switch family on a config built for another). `default_model_config(name)` returns a ConfigDict with
every field of one model plus the classifier fields, None defaults as typed placeholders so that
`--config.model.<field>=...` can set them.
When `config.num_classes` is set (an int >= 2), the result is a `SequenceClassifier` whose `.backbone` is
the trunk of the named model, at the same parameter paths as in the language model (see heads.py).

Fields of config.model, by name (defaults in brackets):
  all models:
    dtype            compute dtype: None/'float32' ['float32'] or 'bfloat16'; params stay float32.
  'lstm_lm' (LSTMLM, AWD-LSTM style):
    embed_dim [128], hidden_size [256], num_layers [2], proj_size [0: none; LSTMP otherwise, < hidden_size],
    tie_embeddings [True] (a Linear maps the LSTM width to embed_dim when they differ),
    embed_dropout [0.0] (drops whole word types), input_dropout [0.0] (locked, on the embeddings),
    hidden_dropout [0.0] (locked, between LSTM layers), output_dropout [0.0] (locked, on the last layer).
  'lstm_attn' (LSTMAttentionLM, SHA-RNN style):
    d_model [256], num_layers [2] (residual LSTM blocks), attention_layers [(-1,)] (blocks that also
    attend; python indices), num_heads [1] (1 = single-head attention), boom_hidden [0: no feed-forward],
    dropout [0.0] (locked, on every residual branch and the embeddings), embed_dropout [0.0],
    tie_embeddings [True], attention_impl [None].
  'gpt' (GPT):
    d_model [128], num_layers [4], num_heads [4], num_kv_heads [None: = num_heads], mlp_hidden
    [None: 4 * d_model], max_len [256], positions ['learned' | 'rotary'], dropout [0.0],
    tie_embeddings [True], activation ['gelu_tanh'], use_bias [True] (False: no biases in the Linears and
    LayerNorms, as nanoGPT's bias=False), attention_impl [None].
  'bert' (BERT):
    d_model [128], num_layers [4], num_heads [4], mlp_hidden [None: 4 * d_model], max_len [256],
    type_vocab_size [2], dropout [0.1], pre_norm [False: post-LN as BERT], activation ['gelu'],
    norm_epsilon [1e-12], attention_impl [None].
  classifier only (used when config.num_classes is set):
    pooling [None: 'final_state' for LSTMs, 'last' for gpt, 'cls' for bert; or 'mean'],
    classifier_dropout [0.0].

attention_impl is passed to `dot_product_attention` as `implementation` (None = choose automatically).
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections
from flax import nnx
from ml_collections import config_dict

from lstm_attn.models.bert import BERT, BERTTrunk
from lstm_attn.models.common import count_params, parse_dtype
from lstm_attn.models.gpt import GPT, GPTTrunk
from lstm_attn.models.heads import POOLINGS, SequenceClassifier
from lstm_attn.models.hybrid import HybridTrunk, LSTMAttentionLM
from lstm_attn.models.lstm_lm import LSTMLM, LSTMTrunk

__all__ = [
  'BERT',
  'GPT',
  'LSTMLM',
  'LSTMAttentionLM',
  'SequenceClassifier',
  'MODEL_REGISTRY',
  'build_model',
  'default_model_config',
  'count_params',
  'BERTTrunk',
  'GPTTrunk',
  'HybridTrunk',
  'LSTMTrunk',
]

MODEL_REGISTRY = {'lstm_lm': LSTMLM, 'lstm_attn': LSTMAttentionLM, 'gpt': GPT, 'bert': BERT}

_INT, _FLOAT, _BOOL, _STR = 'int', 'float', 'bool', 'str'
_OPT_INT, _OPT_STR, _INT_TUPLE = 'int or None', 'str or None', 'tuple of ints'

# name -> {field: (default, kind)}. The constructor keyword is the field name, except attention_impl.
_FIELDS = {
  'lstm_lm': {
    'embed_dim': (128, _INT),
    'hidden_size': (256, _INT),
    'num_layers': (2, _INT),
    'proj_size': (0, _INT),
    'tie_embeddings': (True, _BOOL),
    'embed_dropout': (0.0, _FLOAT),
    'input_dropout': (0.0, _FLOAT),
    'hidden_dropout': (0.0, _FLOAT),
    'output_dropout': (0.0, _FLOAT),
  },
  'lstm_attn': {
    'd_model': (256, _INT),
    'num_layers': (2, _INT),
    'attention_layers': ((-1,), _INT_TUPLE),
    'num_heads': (1, _INT),
    'boom_hidden': (0, _INT),
    'dropout': (0.0, _FLOAT),
    'embed_dropout': (0.0, _FLOAT),
    'tie_embeddings': (True, _BOOL),
    'attention_impl': (None, _OPT_STR),
  },
  'gpt': {
    'd_model': (128, _INT),
    'num_layers': (4, _INT),
    'num_heads': (4, _INT),
    'num_kv_heads': (None, _OPT_INT),
    'mlp_hidden': (None, _OPT_INT),
    'max_len': (256, _INT),
    'positions': ('learned', _STR),
    'dropout': (0.0, _FLOAT),
    'tie_embeddings': (True, _BOOL),
    'activation': ('gelu_tanh', _STR),
    'use_bias': (True, _BOOL),
    'attention_impl': (None, _OPT_STR),
  },
  'bert': {
    'd_model': (128, _INT),
    'num_layers': (4, _INT),
    'num_heads': (4, _INT),
    'mlp_hidden': (None, _OPT_INT),
    'max_len': (256, _INT),
    'type_vocab_size': (2, _INT),
    'dropout': (0.1, _FLOAT),
    'pre_norm': (False, _BOOL),
    'activation': ('gelu', _STR),
    'norm_epsilon': (1e-12, _FLOAT),
    'attention_impl': (None, _OPT_STR),
  },
}
_COMMON = {
  'name': (None, _STR),
  'dtype': (None, _OPT_STR),
  'pooling': (None, _OPT_STR),
  'classifier_dropout': (0.0, _FLOAT),
}


def default_model_config(name: str) -> ml_collections.ConfigDict:
  """A ConfigDict with every field of model `name` at its default (plus name, dtype and classifier fields)."""
  if name not in _FIELDS:
    raise ValueError(f'config.model.name must be one of {sorted(_FIELDS)}, got {name!r}.')
  placeholder = {_OPT_INT: int, _OPT_STR: str}
  cfg = {'name': name, 'dtype': 'float32'}
  fields = {
    **_FIELDS[name],
    'pooling': _COMMON['pooling'],
    'classifier_dropout': _COMMON['classifier_dropout'],
  }
  for k, (v, kind) in fields.items():
    cfg[k] = config_dict.placeholder(placeholder[kind]) if v is None and kind in placeholder else v
  return ml_collections.ConfigDict(cfg)


def _check_kind(field, value, kind):
  bad = False
  if kind == _INT:
    bad = isinstance(value, bool) or not isinstance(value, int)
  elif kind == _OPT_INT:
    bad = value is not None and (isinstance(value, bool) or not isinstance(value, int))
  elif kind == _FLOAT:
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
  elif kind == _BOOL:
    bad = not isinstance(value, bool)
  elif kind == _STR:
    bad = not isinstance(value, str)
  elif kind == _OPT_STR:
    bad = value is not None and not isinstance(value, str)
  elif kind == _INT_TUPLE:
    bad = not isinstance(value, (tuple, list)) or any(
      isinstance(v, bool) or not isinstance(v, int) for v in value
    )
  if bad:
    raise ValueError(f'config.model.{field} must be {"an" if kind == _INT else "a"} {kind}, got {value!r}.')


def _as_dict(section) -> dict:
  if isinstance(section, ml_collections.ConfigDict):
    return section.to_dict()
  if isinstance(section, Mapping):
    return dict(section)
  raise ValueError(f'config.model must be a ConfigDict or a mapping, got {type(section).__name__}.')


def model_kwargs(model_config) -> tuple[str, dict, dict]:
  """Validates config.model; returns (name, constructor kwargs, classifier options)."""
  fields = _as_dict(model_config)
  name = fields.get('name')
  if name not in _FIELDS:
    raise ValueError(f'config.model.name must be one of {sorted(_FIELDS)}, got {name!r}.')
  spec = {**_FIELDS[name], **_COMMON}
  known_anywhere = set(_COMMON).union(*_FIELDS.values())
  unknown = sorted(set(fields) - known_anywhere)
  if unknown:
    raise ValueError(
      f'config.model has unknown field(s) {unknown} for name={name!r}; its fields: {sorted(spec)}.'
    )
  values = {k: fields.get(k, default) for k, (default, _) in spec.items()}
  for k, (_, kind) in spec.items():
    _check_kind(k, values[k], kind)
  if values['pooling'] is not None and values['pooling'] not in POOLINGS:
    raise ValueError(f'config.model.pooling must be one of {POOLINGS} or None, got {values["pooling"]!r}.')
  kwargs = {k: values[k] for k in _FIELDS[name]}
  if 'attention_impl' in kwargs:
    kwargs['implementation'] = kwargs.pop('attention_impl')
  if 'attention_layers' in kwargs:
    kwargs['attention_layers'] = tuple(kwargs['attention_layers'])
  kwargs['dtype'] = parse_dtype(values['dtype'], 'config.model.dtype')
  pooling = values['pooling']
  if pooling == 'cls' and name != 'bert' or pooling == 'final_state' and name not in ('lstm_lm', 'lstm_attn'):
    raise ValueError(
      f'config.model.pooling={pooling!r} does not fit config.model.name={name!r} '
      "('cls' is for bert, 'final_state' for lstm_lm / lstm_attn; 'last' and 'mean' for any)."
    )
  head = {'pooling': pooling, 'dropout': values['classifier_dropout']}
  return name, kwargs, head


def build_model(config, *, vocab_size: int, rngs: nnx.Rngs) -> nnx.Module:
  """The model named by config.model.name (a SequenceClassifier over its trunk if config.num_classes)."""
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
    raise ValueError(f'vocab_size must be a positive integer, got {vocab_size!r}.')
  if 'model' not in config:
    raise ValueError('config has no `model` section; see lstm_attn.models for its fields.')
  name, kwargs, head = model_kwargs(config.model)
  num_classes = config.get('num_classes', None) if hasattr(config, 'get') else None
  if num_classes is not None and (
    isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
  ):
    raise ValueError(f'config.num_classes must be None or an integer >= 2, got {num_classes!r}.')
  try:
    lm = MODEL_REGISTRY[name](vocab_size, **kwargs, rngs=rngs)
  except ValueError as e:
    raise ValueError(f'bad config.model (name={name!r}): {e}') from None
  if num_classes is None:
    return lm
  # The LM is built whole (so the trunk is initialised exactly as in pre-training) and its trunk kept.
  try:
    return SequenceClassifier(
      name, lm.backbone, num_classes, pooling=head['pooling'], dropout=head['dropout'], rngs=rngs
    )
  except ValueError as e:
    raise ValueError(
      f'bad classifier config (config.model.pooling / classifier_dropout / num_classes): {e}'
    ) from None
