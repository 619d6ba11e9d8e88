"""The trainer's config: every field with its default (`base_config`), and every check (`check_config`).

This is the one place the trainer's defaults live; the code reads `config.<field>` without fallbacks.
Experiment configs (experiments/configs/*.py) start from `base_config(model_name)` and set only what
differs. `check_config` runs before a workdir is touched: a bad value is a ValueError naming
`config.<field>`, the value, and what would be right.

A config saved by an older version of the trainer (in a checkpoint's meta) may lack newer fields:
`complete_config(saved)` lays it over `base_config` of its model, so the saved values win and a missing
field takes today's default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

import ml_collections
from ml_collections import config_dict

from lstm_attn.models import MODEL_SPECS, default_model_config, model_config, model_spec
from lstm_attn.training import transfer

TOKENIZERS = ('byte', 'char', 'bpe', 'unigram')
MIN_MAX_BYTES = 20  # lstm_attn.data.corpora: the smallest cap it takes
BATCH_MODES = ('random', 'sequential')


def base_config(model_name: str) -> ml_collections.ConfigDict:
  """Every trainer field with its default; experiment configs override some.

  Placeholders (typed None) can be set from the command line: `--config.data.max_bytes=1000000`.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = default_model_config(model_name)  # the family's fields (lstm_attn/models/specs.py)
  c.num_classes = config_dict.placeholder(int)  # set: sequence classification
  c.init_from = ''  # fine-tuning: pretraining workdir (or checkpoint folder) to restore `init_subtree` from
  c.init_subtree = 'backbone'
  c.compare_from_scratch = False  # fine-tuning: also train from scratch for the same budget, print both

  c.data = ml_collections.ConfigDict()
  c.data.path = ''  # '': the embedded stdlib corpus
  c.data.required = False  # True: an empty path is an error (the experiment's numbers mean that text)
  c.data.max_bytes = config_dict.placeholder(int)  # None: all of it
  c.data.tokenizer = 'byte'  # byte | char | bpe | unigram
  c.data.vocab_size = config_dict.placeholder(int)  # subword tokenizers only
  c.data.seq_len = 128
  # 'random' windows (nanoGPT) or 'sequential': batch_size contiguous lanes, every token once per epoch
  # (required by carry_state; without it each window starts from a zero LSTM state either way).
  c.data.mode = 'sequential' if model_spec(model_name).carries_state else 'random'
  c.data.snippets_per_class = (512, 64, 64)  # classification only: (train, val, test) per class
  # MLM pre-training only: the share of tokens masked and scored (BERT: 0.15; Wettig et al. 2022 found 0.4
  # better for their models; for bert_mlm.py it was no better at step 250: BUILD_NOTES). Eval uses 0.15.
  c.data.mask_rate = 0.15

  # Truncated BPTT (AWD-LSTM, SHA-RNN): the batch is `batch_size` contiguous streams of the corpus and each
  # step starts from the previous step's final LSTM state; evaluation reads each split as one stream.
  # On by default for the families that carry state (lstm_lm, lstm_attn); data.mode is then sequential.
  c.carry_state = model_spec(model_name).carries_state
  # AWD-LSTM's randomised BPTT length (with carry_state): each step's window is seq_len // 2 with
  # probability bptt_half_prob (AWD: 0.05) else seq_len, jittered by N(0, bptt_std) (AWD: 5) and clipped
  # to [min(5, seq_len), seq_len]; the update is scaled by length / seq_len (AWD scales its learning rate
  # so). 0, 0: off.
  c.data.bptt_half_prob = 0.0
  c.data.bptt_std = 0.0
  c.num_train_steps = 1000
  c.batch_size = 16
  c.grad_accum_steps = 1
  c.eval_batch_size = config_dict.placeholder(int)  # None: batch_size
  c.eval_batches = 20  # per split and eval; 0: the whole split
  c.log_every = 50
  c.eval_every = 250
  c.checkpoint_every = 250
  c.keep_latest = 2
  c.keep_best = 1
  c.async_checkpoints = True
  c.mesh = ml_collections.ConfigDict()  # devices (lstm_attn.training.sharding); batch_size is GLOBAL
  c.mesh.data = -1  # devices along 'data' (-1: all that fsdp leaves)
  c.mesh.fsdp = 1  # > 1: parameters and optimizer state split that many ways (FSDP)
  c.mesh.fsdp_min_size = 2**14  # parameters with fewer elements stay replicated
  c.distributed = ml_collections.ConfigDict()  # multi-host: jax.distributed.initialize
  c.distributed.enabled = False
  c.distributed.coordinator_address = ''  # 'host0:1234' (or env JAX_COORDINATOR_ADDRESS)
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)
  c.distributed.initialization_timeout = config_dict.placeholder(int)
  c.cpu_ynn_fusion = 'default'  # XLA:CPU only: 'dots' = YNNPACK for matmuls only (training/steps.py)
  c.tensorboard = True  # event files in <workdir>/tensorboard (tensorboardX; it imports torch if present)

  c.optim = ml_collections.ConfigDict()  # lstm_attn.training.optimizer
  c.optim.learning_rate = 1e-3
  c.optim.min_learning_rate = 1e-4
  c.optim.warmup_steps = 100
  c.optim.decay_steps = config_dict.placeholder(int)  # None: num_train_steps
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.decay_embeddings = False  # True: decay embedding tables too (as nanoGPT)
  c.optim.grad_clip_norm = 1.0  # 0: no clipping
  # Fine-tuning from init_from (ULMFiT): the restored trunk (`init_subtree`) learns at backbone_lr_scale x
  # the head's rate (discriminative rates), and stays frozen for the first freeze_backbone_steps while the
  # fresh head learns alone (gradual unfreezing at its coarsest). A from-scratch run ignores both.
  c.optim.backbone_lr_scale = 1.0
  c.optim.freeze_backbone_steps = 0

  c.sample_tokens = 200  # generated after each eval (generative models); 0: never
  c.sampling = ml_collections.ConfigDict()
  c.sampling.prompt = '\n'
  c.sampling.temperature = 0.8  # 0: greedy
  c.sampling.top_k = config_dict.placeholder(int)
  c.sampling.top_p = config_dict.placeholder(float)
  c.sample_every_eval = True
  return c


def tiny_shakespeare_budget(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """gpt_char's data and token budget, shared by the character-level tiny-Shakespeare configs.

  The text is required (`--config.data.path`; no default corpus stands in for it), character tokens,
  context 64, batch 12, 2000 steps: 1.5M training characters (nanoGPT's CPU "baby GPT" budget), evaluated
  on the whole val split every 500 steps, with 300-character samples.
  """
  c.data.required = True
  c.data.tokenizer = 'char'
  c.data.seq_len = 64
  c.batch_size = 12
  c.num_train_steps = 2000
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500
  c.eval_batch_size = 64
  c.eval_batches = 0  # the whole val split
  c.sample_tokens = 300
  return c


def stdlib_budget(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The default experiment's data and token budget on the embedded stdlib corpus, shared by the
  stdlib pre-training configs (default.py, lstm_stdlib.py): 8 MB of source, 1500 steps, lr 2e-3 -> 2e-4,
  evaluation and checkpoints every 500 steps, 300-byte samples continuing 'def '."""
  c.data.max_bytes = 8_000_000
  c.num_train_steps = 1500
  c.optim.learning_rate = 2e-3
  c.optim.min_learning_rate = 2e-4
  c.eval_every = 500
  c.checkpoint_every = 500
  c.eval_batch_size = 64
  c.sample_tokens = 300
  c.sampling.prompt = 'def '
  return c


def complete_config(saved: dict) -> ml_collections.ConfigDict:
  """A config saved with a checkpoint, laid over today's `base_config` of its model (saved values win)."""
  name = (saved.get('model') or {}).get('name')
  config = base_config(name)
  config.update(ml_collections.ConfigDict(saved))
  if 'carry_state' not in saved:  # saved before truncated BPTT existed: those runs never carried state
    config.carry_state = False
  return config


# -----------------------------------------------------------------------------------------------------
# Checks. Each names config.<field>, the value and what would be right.
# -----------------------------------------------------------------------------------------------------
def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


class UnknownFieldError(ValueError):
  """A config field that does not exist (a typo): a usage error on the command line (exit status 2)."""


def _need(ok: bool, field: str, value, what: str) -> None:
  if not ok:
    raise ValueError(f'config.{field}={value!r} is invalid: it must be {what}.')


def _check_section(config, section: str, checks: dict) -> None:
  sub = config[section]
  for field, (test, what) in checks.items():
    value = sub[field]
    _need(test(value), f'{section}.{field}', value, what)


_POSITIVE_INT = (lambda v: _int(v) and v >= 1, 'an integer >= 1')
_OPT_POSITIVE_INT = (lambda v: v is None or (_int(v) and v >= 1), 'None or an integer >= 1')
_FINITE_NONNEG = (lambda v: _num(v) and math.isfinite(v) and v >= 0, 'a finite number >= 0')
_UNIT = (lambda v: _num(v) and 0 <= v < 1, 'a number in [0, 1)')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Every check of the trainer's fields (model fields: `lstm_attn.models.model_config`).

  Unknown fields are an UnknownFieldError (a typo would otherwise be ignored); experiment configs are
  built from `base_config`, whose field set is the reference. The one check that reads a file comes last:
  `config.init_from` must hold checkpoints of the same model family (`transfer.check_init_from`).
  """
  if not isinstance(config, ml_collections.ConfigDict):
    getattr(config, 'model', None)  # a config file that failed to load (config_flags) raises its error here
    raise ValueError(f'config must be an ml_collections.ConfigDict, got {type(config).__name__}.')
  if 'model' not in config or 'name' not in config.model:
    raise ValueError('config.model.name is missing: start the config from base_config(<model name>).')
  _check_model_fields(config.model)
  spec, _ = model_config(config.model)
  _check_fields(config, base_config(spec.name))
  for field in ('num_train_steps', 'batch_size', 'log_every', 'eval_every', 'checkpoint_every'):
    _need(_POSITIVE_INT[0](config[field]), field, config[field], _POSITIVE_INT[1])
  _need(_int(config.seed), 'seed', config.seed, 'an integer')
  _need(
    _int(config.grad_accum_steps)
    and config.grad_accum_steps >= 1
    and config.batch_size % config.grad_accum_steps == 0,
    'grad_accum_steps',
    config.grad_accum_steps,
    f'an integer >= 1 that divides config.batch_size={config.batch_size}',
  )
  _need(
    _OPT_POSITIVE_INT[0](config.eval_batch_size),
    'eval_batch_size',
    config.eval_batch_size,
    _OPT_POSITIVE_INT[1],
  )
  _need(
    _int(config.eval_batches) and config.eval_batches >= 0,
    'eval_batches',
    config.eval_batches,
    'an integer >= 0 (0: the whole split)',
  )
  _need(
    _POSITIVE_INT[0](config.keep_latest),
    'keep_latest',
    config.keep_latest,
    'an integer >= 1 (the latest checkpoint is the resume point)',
  )
  _need(_int(config.keep_best) and config.keep_best >= 0, 'keep_best', config.keep_best, 'an integer >= 0')
  _need(
    config.cpu_ynn_fusion in ('default', 'dots'),
    'cpu_ynn_fusion',
    config.cpu_ynn_fusion,
    "'default' or 'dots'",
  )
  _need(
    _int(config.sample_tokens) and config.sample_tokens >= 0,
    'sample_tokens',
    config.sample_tokens,
    'an integer >= 0 (0: never sample)',
  )
  num_classes = config.num_classes
  _need(
    num_classes is None or (_int(num_classes) and num_classes >= 2),
    'num_classes',
    num_classes,
    'None (language modelling) or an integer >= 2',
  )
  _need(isinstance(config.init_from, str), 'init_from', config.init_from, 'a path or empty')
  _need(isinstance(config.init_subtree, str), 'init_subtree', config.init_subtree, "a subtree name ('': all)")
  if config.carry_state and not spec.carries_state:
    raise ValueError(
      f'config.carry_state=True but config.model.name={spec.name!r} has no recurrent state to carry; '
      f'set --config.carry_state=False (families that carry state: '
      f'{sorted(n for n, s in MODEL_SPECS.items() if s.carries_state)}).'
    )
  mask_rate = config.data.mask_rate
  _need(
    _num(mask_rate) and 0 < mask_rate < 1,
    'data.mask_rate',
    mask_rate,
    'a number in (0, 1) (the share of tokens masked for MLM)',
  )
  if config.carry_state and config.data.mode != 'sequential' and not num_classes:
    raise ValueError(
      f'config.carry_state=True reads the corpus as contiguous streams, but config.data.mode='
      f'{config.data.mode!r}: set --config.data.mode=sequential, or --config.carry_state=False.'
    )
  half_prob, bptt_std = config.data.bptt_half_prob, config.data.bptt_std
  _need(_num(half_prob) and 0 <= half_prob <= 1, 'data.bptt_half_prob', half_prob, 'a probability in [0, 1]')
  _need(
    _num(bptt_std) and math.isfinite(bptt_std) and bptt_std >= 0,
    'data.bptt_std',
    bptt_std,
    'a finite number >= 0 (0: no jitter)',
  )
  if (half_prob or bptt_std) and num_classes:
    raise ValueError(
      f'config.data.bptt_half_prob={half_prob!r} / config.data.bptt_std={bptt_std!r}: a classification '
      'run (config.num_classes is set) has no BPTT window: set --config.data.bptt_half_prob=0 '
      '--config.data.bptt_std=0.'
    )
  if (half_prob or bptt_std) and not config.carry_state:
    raise ValueError(
      f'config.data.bptt_half_prob={half_prob!r} / config.data.bptt_std={bptt_std!r} randomise the '
      'truncated-BPTT window, which only a run with config.carry_state=True has: set both to 0, or '
      'train an LSTM family (lstm_lm, lstm_attn) with --config.carry_state=True.'
    )
  if config.compare_from_scratch and not config.init_from:
    raise ValueError(
      'config.compare_from_scratch=True compares a fine-tuned model with one from scratch, but '
      'config.init_from is empty: pass --config.init_from=<workdir of the pretraining run>.'
    )
  _check_section(
    config,
    'data',
    {
      'path': (lambda v: isinstance(v, str), "a path, or '' for the embedded corpus"),
      'tokenizer': (lambda v: v in TOKENIZERS, f'one of {TOKENIZERS}'),
      'mode': (lambda v: v in BATCH_MODES, f'one of {BATCH_MODES}'),
      'seq_len': _POSITIVE_INT,
      'max_bytes': (
        lambda v: v is None or (_int(v) and v >= MIN_MAX_BYTES),
        f'None (the whole corpus) or an integer >= {MIN_MAX_BYTES}',
      ),
      'vocab_size': _OPT_POSITIVE_INT,
      'snippets_per_class': (
        lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and all(_int(x) and x >= 1 for x in v),
        '(train, val, test) snippets per class, each an integer >= 1',
      ),
    },
  )
  _check_section(
    config,
    'mesh',
    {
      'data': (lambda v: _int(v) and (v == -1 or v >= 1), '-1 (all devices fsdp leaves) or >= 1'),
      'fsdp': _POSITIVE_INT,
      'fsdp_min_size': (lambda v: _int(v) and v >= 0, 'an integer >= 0'),
    },
  )
  _check_section(
    config,
    'optim',
    {
      'learning_rate': (lambda v: _num(v) and math.isfinite(v) and v > 0, 'a finite number > 0'),
      'min_learning_rate': _FINITE_NONNEG,
      'warmup_steps': (lambda v: _int(v) and v >= 0, 'an integer >= 0'),
      'decay_steps': _OPT_POSITIVE_INT,
      'b1': _UNIT,
      'b2': _UNIT,
      'eps': (lambda v: _num(v) and math.isfinite(v) and v > 0, 'a finite number > 0'),
      'weight_decay': _FINITE_NONNEG,
      'grad_clip_norm': (
        lambda v: v is None or (_num(v) and math.isfinite(v) and v >= 0),
        'a finite number >= 0 (0: no clipping)',
      ),
      'backbone_lr_scale': (lambda v: _num(v) and math.isfinite(v) and v > 0, 'a finite number > 0'),
      'freeze_backbone_steps': (lambda v: _int(v) and v >= 0, 'an integer >= 0'),
    },
  )
  _check_section(
    config,
    'sampling',
    {
      'prompt': (lambda v: isinstance(v, str), 'a string'),
      'temperature': (lambda v: _num(v) and math.isfinite(v) and v >= 0, 'a finite number >= 0 (0: greedy)'),
      'top_k': _OPT_POSITIVE_INT,
      'top_p': (lambda v: v is None or (_num(v) and 0 < v <= 1), 'None or a number in (0, 1]'),
    },
  )
  if config.data.vocab_size is not None and config.data.tokenizer in ('byte', 'char'):
    raise ValueError(
      f'config.data.vocab_size={config.data.vocab_size} is for subword tokenizers, but '
      f'config.data.tokenizer={config.data.tokenizer!r} has a fixed vocabulary: drop vocab_size, or set '
      "tokenizer to 'bpe' or 'unigram'."
    )
  if config.init_from:
    transfer.check_init_from(config)


def _unknown(prefix: str, key: str, names, what: str = '') -> UnknownFieldError:
  close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
  hint = f'did you mean {prefix}.{close[0]}?' if close else f'the fields of {prefix}{what}: {sorted(names)}'
  return UnknownFieldError(f'{prefix}.{key} is not a config field: {hint}')


def _check_model_fields(model) -> None:
  """config.model's fields all belong to some model family (fields of the other families are ignored:
  `--config.model.name` may switch family); before model_config, for the did-you-mean message."""
  spec = model_spec(model.get('name'))
  known = {'name'}.union(*({f.name for f in dataclasses.fields(s.config)} for s in MODEL_SPECS.values()))
  own = {'name'} | {f.name for f in dataclasses.fields(spec.config)}
  for key in model.keys():
    if key not in known:
      raise _unknown('config.model', key, own, f' ({spec.name})')


def _check_fields(config, reference, prefix='config') -> None:
  """Every field of `config` exists in `reference` (the base config); model fields are checked by
  model_config, which also knows the other families' fields."""
  for key in config.keys():
    if key == 'model':
      continue
    if key not in reference:
      raise _unknown(prefix, key, list(reference.keys()))
    if isinstance(config[key], ml_collections.ConfigDict) and isinstance(
      reference[key], ml_collections.ConfigDict
    ):
      _check_fields(config[key], reference[key], f'{prefix}.{key}')
