"""One spec per model family: its config dataclass (the one source of its hyperparameters' defaults and
checks), its LM class, and what the trainer, the inputs, the heads and sampling need to know about it.

    spec = model_spec('gpt')        # ModelSpec(name='gpt', config=GPTConfig, lm=GPT, objective='lm', ...)
    cfg = spec.config(d_model=64)   # GPTConfig, checked once in __post_init__ (errors name the field)
    model = spec.lm(cfg, vocab_size, rngs=rngs)   # every LM and trunk takes its family's config

Nothing outside this module compares `config.model.name` with a family's name: ask the spec instead
(`objective`, `carries_state`, `uses_cls_token`, `context_window(cfg)`, `default_pooling`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from lstm_attn.attention.ops import IMPLEMENTATIONS
from lstm_attn.checks import check_rate
from lstm_attn.models.bert import BERT
from lstm_attn.models.common import parse_dtype
from lstm_attn.models.gpt import GPT, POSITIONS
from lstm_attn.models.hybrid import LSTMAttentionLM
from lstm_attn.models.lstm_lm import LSTMLM
from lstm_attn.transformer import ACTIVATIONS


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


# A field's annotation -> (check, what the error says it must be).
_KINDS: dict[str, tuple[Callable[[object], bool], str]] = {
  'int': (_is_int, 'an int'),
  'int | None': (lambda v: v is None or _is_int(v), 'an int or None'),
  'float': (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), 'a float'),
  'bool': (lambda v: isinstance(v, bool), 'a bool'),
  'str': (lambda v: isinstance(v, str), 'a str'),
  'str | None': (lambda v: v is None or isinstance(v, str), 'a str or None'),
  'tuple[int, ...]': (
    lambda v: isinstance(v, (tuple, list)) and all(_is_int(x) for x in v),
    'a tuple of ints',
  ),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Fields every family has. `dtype`: compute dtype (params stay float32). `pooling` and
  `classifier_dropout` are used when the config has num_classes (None: the family's default pooling).

  `__post_init__` is the one check of config.model: first every field's type, then each family's values
  (its subclass's `__post_init__`); the models built from a config check nothing again. Every error
  names `config.model.<field>`, the value and what would be right.
  """

  dtype: str | None = 'float32'
  pooling: str | None = None
  classifier_dropout: float = 0.0

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      check, what = _KINDS[field.type]
      if not check(value):
        raise ValueError(f'config.model.{field.name} must be {what}, got {value!r}.')
      if field.type == 'tuple[int, ...]':
        object.__setattr__(self, field.name, tuple(value))
    parse_dtype(self.dtype, 'config.model.dtype')
    self._rates('classifier_dropout')

  @property
  def compute_dtype(self):
    """`dtype` as a jnp dtype (None stays None: the layers compute in the params' float32)."""
    return parse_dtype(self.dtype, 'config.model.dtype')

  # Value checks for the subclasses, each naming config.model.<field>.
  def _require(self, ok: bool, field: str, what: str):
    if not ok:
      raise ValueError(f'config.model.{field} must be {what}, got {getattr(self, field)!r}.')

  def _positive(self, *fields: str):
    types = {f.name: f.type for f in dataclasses.fields(self)}
    for field in fields:
      optional = types[field] == 'int | None'
      value = getattr(self, field)
      ok = (optional and value is None) or value >= 1
      self._require(ok, field, 'a positive int' + ' or None' * optional)

  def _rates(self, *fields: str):
    for field in fields:
      check_rate(f'config.model.{field}', getattr(self, field))

  def _heads_divide(self, d_field: str = 'd_model'):
    d_model = getattr(self, d_field)
    self._require(
      d_model % self.num_heads == 0, 'num_heads', f'a divisor of config.model.{d_field}={d_model}'
    )

  def _positions(self):
    """`positions` is one of POSITIONS; rotary needs an even head size (it rotates pairs of features)."""
    self._choice('positions', POSITIONS)
    if self.positions == 'rotary' and (self.d_model // self.num_heads) % 2:
      raise ValueError(
        f"config.model.positions='rotary' needs an even head size, got config.model.d_model // "
        f'config.model.num_heads = {self.d_model} // {self.num_heads} = {self.d_model // self.num_heads}.'
      )

  def _choice(self, field: str, choices, *, none_ok: bool = False):
    value = getattr(self, field)
    ok = (none_ok and value is None) or value in choices
    self._require(ok, field, f'one of {tuple(choices)}' + (' or None' if none_ok else ''))


@dataclasses.dataclass(frozen=True)
class LSTMLMConfig(ModelConfig):
  """AWD-LSTM-style LM. proj_size 0: no LSTMP projection; dropouts are locked (one mask per sequence).

  AWD-LSTM's regularisers: embed_dropout (whole word types), input/hidden/output_dropout (locked),
  weight_drop (DropConnect on every hidden-to-hidden matrix), activation_reg (AR: alpha * mean of the
  squared dropped last-layer outputs) and temporal_activation_reg (TAR: beta * mean of the squared
  step-to-step change of the undropped ones), both added to the training loss only.
  """

  embed_dim: int = 128
  hidden_size: int = 256
  num_layers: int = 2
  proj_size: int = 0
  tie_embeddings: bool = True
  embed_dropout: float = 0.0
  input_dropout: float = 0.0
  hidden_dropout: float = 0.0
  output_dropout: float = 0.0
  weight_drop: float = 0.0
  activation_reg: float = 0.0
  temporal_activation_reg: float = 0.0
  embed_init: float = 0.1  # embedding ~ U(-embed_init, embed_init): AWD-LSTM's 0.1 (word level)

  def __post_init__(self):
    super().__post_init__()
    self._positive('embed_dim', 'hidden_size', 'num_layers')
    self._require(
      0 <= self.proj_size < self.hidden_size,
      'proj_size',
      f'0 (no projection) or in (0, config.model.hidden_size={self.hidden_size})',
    )
    self._rates('embed_dropout', 'input_dropout', 'hidden_dropout', 'output_dropout', 'weight_drop')
    self._require(self.embed_init > 0 and math.isfinite(self.embed_init), 'embed_init', 'a finite number > 0')
    for field in ('activation_reg', 'temporal_activation_reg'):
      value = getattr(self, field)
      self._require(math.isfinite(value) and value >= 0, field, 'a finite number >= 0 (0: off)')

  @property
  def width(self) -> int:
    """The size of each layer's output (and of h): proj_size, or hidden_size without a projection."""
    return self.proj_size or self.hidden_size


@dataclasses.dataclass(frozen=True)
class HybridConfig(ModelConfig):
  """SHA-RNN-style LSTM + attention. attention_layers: python indices of the blocks that also attend."""

  d_model: int = 256
  num_layers: int = 2
  attention_layers: tuple[int, ...] = (-1,)
  num_heads: int = 1
  boom_hidden: int = 0
  dropout: float = 0.0
  embed_dropout: float = 0.0
  weight_drop: float = 0.0  # DropConnect on each block's LSTM hidden-to-hidden matrix (AWD-LSTM)
  tie_embeddings: bool = True
  attention_impl: str | None = None

  def __post_init__(self):
    super().__post_init__()
    self._positive('d_model', 'num_layers', 'num_heads')
    self._heads_divide()
    n = self.num_layers
    self._require(
      all(-n <= i < n for i in self.attention_layers),
      'attention_layers',
      f'indices of the config.model.num_layers={n} blocks (each in [{-n}, {n}))',
    )
    self._require(self.boom_hidden >= 0, 'boom_hidden', 'an int >= 0 (0: no boom layer)')
    self._rates('dropout', 'embed_dropout', 'weight_drop')
    self._choice('attention_impl', IMPLEMENTATIONS, none_ok=True)

  @property
  def attending_blocks(self) -> tuple[int, ...]:
    """attention_layers as sorted non-negative block indices, without repeats."""
    return tuple(sorted({i % self.num_layers for i in self.attention_layers}))


@dataclasses.dataclass(frozen=True)
class GPTConfig(ModelConfig):
  """nanoGPT layout. num_kv_heads None: = num_heads; mlp_hidden None: 4 * d_model."""

  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int | None = None
  mlp_hidden: int | None = None
  max_len: int = 256
  positions: str = 'learned'
  dropout: float = 0.0
  tie_embeddings: bool = True
  activation: str = 'gelu_tanh'
  use_bias: bool = True
  attention_impl: str | None = None

  def __post_init__(self):
    super().__post_init__()
    self._positive('d_model', 'num_layers', 'num_heads', 'max_len', 'mlp_hidden')
    self._heads_divide()
    kv = self.num_kv_heads
    self._require(
      kv is None or (kv >= 1 and self.num_heads % kv == 0),
      'num_kv_heads',
      f'None or a divisor of config.model.num_heads={self.num_heads}',
    )
    self._positions()
    self._choice('activation', sorted(ACTIVATIONS))
    self._rates('dropout')
    self._choice('attention_impl', IMPLEMENTATIONS, none_ok=True)

  @property
  def mlp_width(self) -> int:
    """The MLP's hidden size: mlp_hidden, or 4 * d_model when None."""
    return 4 * self.d_model if self.mlp_hidden is None else self.mlp_hidden


@dataclasses.dataclass(frozen=True)
class BERTConfig(ModelConfig):
  """BERT encoder (MLM + NSP). mlp_hidden None: 4 * d_model; post-LN unless pre_norm."""

  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  mlp_hidden: int | None = None
  max_len: int = 256
  type_vocab_size: int = 2
  # 'learned': BERT's absolute position table; 'rotary': RoFormer's rotary positions inside attention
  # (no table): a byte-level MLM learns to read its neighbours far sooner (BUILD_NOTES, issue 13).
  positions: str = 'learned'
  dropout: float = 0.1
  pre_norm: bool = False
  activation: str = 'gelu'
  norm_epsilon: float = 1e-12
  attention_impl: str | None = None

  def __post_init__(self):
    super().__post_init__()
    self._positive('d_model', 'num_layers', 'num_heads', 'max_len', 'type_vocab_size', 'mlp_hidden')
    self._heads_divide()
    self._positions()
    self._choice('activation', sorted(ACTIVATIONS))
    self._rates('dropout')
    self._require(self.norm_epsilon > 0, 'norm_epsilon', 'a positive float')
    self._choice('attention_impl', IMPLEMENTATIONS, none_ok=True)

  @property
  def mlp_width(self) -> int:
    """The MLP's hidden size: mlp_hidden, or 4 * d_model when None."""
    return 4 * self.d_model if self.mlp_hidden is None else self.mlp_hidden


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model family: what everything outside lstm_attn.models needs to know about it.

  objective: 'lm' (next-token) or 'mlm' (masked LM + next-sentence prediction), for the trainer.
  poolings: the classifier poolings it supports; default_pooling, when config.model.pooling is None.
  carries_state: its trunk returns a recurrent state (LSTM carries) that can be carried across batches.
  uses_cls_token: its inputs start with [CLS] (the classification task adds it).
  context_window: the longest context it attends to (None: unbounded), given its config.
  """

  name: str
  config: type[ModelConfig]
  lm: type
  objective: str
  poolings: tuple[str, ...]
  default_pooling: str
  carries_state: bool = False
  uses_cls_token: bool = False
  context_window: Callable[[ModelConfig], int | None] = lambda cfg: None


MODEL_SPECS = {
  spec.name: spec
  for spec in (
    ModelSpec(
      'lstm_lm',
      LSTMLMConfig,
      LSTMLM,
      objective='lm',
      poolings=('final_state', 'last', 'mean', 'mean_max'),
      default_pooling='final_state',
      carries_state=True,
    ),
    ModelSpec(
      'lstm_attn',
      HybridConfig,
      LSTMAttentionLM,
      objective='lm',
      poolings=('final_state', 'last', 'mean', 'mean_max'),
      default_pooling='final_state',
      carries_state=True,
    ),
    ModelSpec(
      'gpt',
      GPTConfig,
      GPT,
      objective='lm',
      poolings=('last', 'mean', 'mean_max'),
      default_pooling='last',
      context_window=lambda cfg: cfg.max_len,
    ),
    ModelSpec(
      'bert',
      BERTConfig,
      BERT,
      objective='mlm',
      poolings=('cls', 'last', 'mean', 'mean_max'),
      default_pooling='cls',
      uses_cls_token=True,
    ),
  )
}


def model_spec(name) -> ModelSpec:
  """The spec of `config.model.name`; a ValueError naming the choices otherwise."""
  if name not in MODEL_SPECS:
    raise ValueError(f'config.model.name must be one of {sorted(MODEL_SPECS)}, got {name!r}.')
  return MODEL_SPECS[name]
