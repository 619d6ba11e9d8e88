"""What the trainer feeds: corpus -> tokenizer -> train batcher and eval batches, per objective.

`make_inputs(config, workdir)` returns an `Inputs` with
  tokenizer, tokenizer_path, vocab_size, seq_len, tokens_per_step;
  train: a resumable batcher (`next()`, `state()`, `restore(state)`, from `lstm_attn.data`);
  eval_splits and `eval_batches(split)`: a fresh, deterministic, finite iterator of batches;
  chars_per_token / bytes_per_token per eval split (1.0 exactly for char / byte tokenizers), to turn bits
  per token into bits per character / byte.

Config fields read (config.data unless noted):
  path: None or '' for the embedded stdlib corpus; a text file (nanoGPT's 90/10 split) or a folder.
  required: if True, a missing/empty `path` is an error (for experiments whose numbers mean that data).
  max_bytes: cap the corpus (None: all of it).
  tokenizer: 'byte' | 'char' | 'bpe' | 'unigram';  vocab_size: subword vocabulary size.
  seq_len; mode ('random' like nanoGPT, or 'sequential').
  config.batch_size, config.eval_batch_size (default batch_size), config.eval_batches (max batches per
  eval; 0 or None: the whole split), config.seed.
  classification (config.num_classes set): config.data.per_class ... see `_classification`.
Fine-tuning (config.init_from set) reuses the tokenizer saved in the pretraining workdir, so token ids
mean what the pretrained embeddings learned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import Callable, Iterator

import numpy as np

from lstm_attn.data import batching, classification, corpora, tokenizers
from lstm_attn.models.specs import model_spec
from lstm_attn.training.steps import carries_state


@dataclasses.dataclass
class Inputs:
  tokenizer: object
  tokenizer_path: str
  seq_len: int
  tokens_per_step: int
  train: object
  eval_splits: tuple[str, ...]
  _eval_fn: Callable[[str], Iterator[dict]]
  chars_per_token: dict = dataclasses.field(default_factory=dict)
  bytes_per_token: dict = dataclasses.field(default_factory=dict)

  @property
  def vocab_size(self) -> int:
    return int(self.tokenizer.vocab_size)

  def eval_batches(self, split: str) -> Iterator[dict]:
    return self._eval_fn(split)


def _find_tokenizer(path: str) -> str:
  """The tokenizer file saved by the run whose workdir (or checkpoint folder inside it) is `path`."""
  p = os.path.abspath(os.path.expanduser(path))
  for _ in range(4):  # workdir, workdir/checkpoints, workdir/checkpoints/<step>
    for name in ('tokenizer.json', 'tokenizer.model'):
      if os.path.isfile(os.path.join(p, name)):
        return os.path.join(p, name)
    p = os.path.dirname(p)
  raise FileNotFoundError(
    f'config.init_from={path!r}: no tokenizer.json / tokenizer.model in that workdir or above it; '
    'init_from must point at the workdir (or a checkpoint) of a run made by experiments/train.py.'
  )


def _tokenizer(config, corpus, workdir):
  d = config.data
  if config.init_from:
    src = _find_tokenizer(config.init_from)
    tok = tokenizers.load_tokenizer(src)
    dst = os.path.join(workdir, os.path.basename(src))
    if not os.path.exists(dst):
      tok.save(dst)
    return tok, dst
  kind = d.tokenizer
  vocab = d.vocab_size if kind in ('bpe', 'unigram', 'sentencepiece') else None
  text = corpus.text('train') if kind != 'byte' else None
  tok = tokenizers.make_tokenizer(kind, text, workdir, vocab)
  path = os.path.join(
    workdir, 'tokenizer.model' if kind in ('bpe', 'unigram', 'sentencepiece') else 'tokenizer.json'
  )
  return tok, path


def data_path(config) -> str | None:
  """`config.data.path`, checked (required by the config? present on disk?); None: the embedded corpus."""
  d = config.data
  path = d.path or None
  if d.required and path is None:
    raise ValueError(
      f'config.data.path is required for this experiment ({config.model.name}) but is empty: pass '
      '--config.data.path=<text file>, e.g. ../shared/data/tinyshakespeare.txt.'
    )
  if path is not None:
    path = os.path.expanduser(path)
    if not os.path.exists(path):
      raise FileNotFoundError(
        f'config.data.path={path!r} does not exist (give a text file or a folder of them).'
      )
    if not (os.path.isfile(path) or os.path.isdir(path)):
      raise ValueError(
        f'config.data.path={path!r} is not a regular file or a folder (a device or a pipe?): give a text '
        'file or a folder of them.'
      )
  return path


def _data_name(config) -> str:
  """The data as messages name it: config.data.path (or the embedded corpus) and its cap."""
  d = config.data
  name = f'config.data.path={d.path!r}' if d.path else 'the embedded stdlib corpus (config.data.path empty)'
  return name + (f' capped at config.data.max_bytes={d.max_bytes}' if d.max_bytes else '')


@contextlib.contextmanager
def _fitting(config, split: str = 'train'):
  """A batcher's ValueError about too little data, reworded to name the config fields and the data."""
  try:
    yield
  except ValueError as e:
    raise ValueError(
      f'config.data.seq_len={config.data.seq_len} and config.batch_size={config.batch_size} need more text '
      f'than the {split} split of {_data_name(config)} holds ({e}): lower them, or give more text.'
    ) from e


class _TrainBatcher:
  """The train batcher, whose restore() names the config field (or the data) behind a saved position
  that does not fit this run, instead of the batcher's own field names."""

  _FIELDS = {
    'batch_size': 'config.batch_size',
    'seq_len': 'config.data.seq_len',
    'mode': 'config.data.mode',
    'seed': 'config.seed',
  }
  # Randomised BPTT (saved only when on): batcher state key -> (config field, scale of the saved int).
  _BPTT = {
    'bptt_half_prob_ppm': ('config.data.bptt_half_prob', 1e6),
    'bptt_std_milli': ('config.data.bptt_std', 1e3),
  }

  def __init__(self, batcher, config):
    self._batcher = batcher
    self._config = config

  def __getattr__(self, name):
    return getattr(self._batcher, name)

  def restore(self, state) -> None:
    ours = self._batcher.state()
    for key, (field, scale) in self._BPTT.items():
      saved = int(np.asarray(state[key])) / scale if key in state else 0.0
      now = ours.get(key, 0) / scale
      if saved != now:
        raise ValueError(
          f'{field} was {saved:g} when the checkpoint was saved and is {now:g} now: resume with '
          f'{field}={saved:g}, or start this config in a fresh --workdir.'
        )
    for key, now in ours.items():
      if key in self._BPTT or key == 'step' or key not in state or int(np.asarray(state[key])) == now:
        continue
      saved = int(np.asarray(state[key]))
      if key == 'mode':
        saved, now = batching.LM_MODES[saved], batching.LM_MODES[now]
      if key in self._FIELDS:
        raise ValueError(
          f'{self._FIELDS[key]} was {saved!r} when the checkpoint was saved and is {now!r} now: resume with '
          f'{self._FIELDS[key]}={saved!r}, or start this config in a fresh --workdir.'
        )
      raise ValueError(
        f'the train split of {_data_name(self._config)} has {now} {key.removeprefix("num_")} now, {saved} '
        'when the checkpoint was saved: the data changed (the file, its cap or the tokenizer). Resume with '
        'the data the run started with, or start in a fresh --workdir.'
      )
    self._batcher.restore(state)


def _load_corpus(config):
  return corpora.load_corpus(data_path(config), max_bytes=config.data.max_bytes)


def _limit(it, n):
  return itertools.islice(it, n) if n else it


def make_inputs(config, workdir: str) -> Inputs:
  if config.num_classes:
    return _classification(config, workdir)
  corpus = _load_corpus(config)
  tok, tok_path = _tokenizer(config, corpus, workdir)
  seq_len = int(config.data.seq_len)
  seed = int(config.seed)
  bs = int(config.batch_size)
  ebs = config.eval_batch_size or bs
  n_eval = config.eval_batches
  splits = ('val', 'test') if not corpus.info.get('test_is_val', False) else ('val',)
  if model_spec(config.model.name).objective == 'mlm':
    mask_rate = float(config.data.mask_rate)
    with _fitting(config):
      train = _TrainBatcher(
        batching.BertBatcher(corpus.train, bs, seq_len, seed=seed, tokenizer=tok, mask_rate=mask_rate),
        config,
      )
    eval_batchers = {}
    for i, s in enumerate(splits):
      with _fitting(config, s):
        eval_batchers[s] = batching.BertBatcher(
          corpus.documents(s), ebs, seq_len, seed=seed + 1000 + i, tokenizer=tok
        )  # BERT's 15% whatever the training rate: val/test MLM losses compare across runs

    def eval_fn(split):
      b = eval_batchers[split]
      return (b.batch(i) for i in range(n_eval or 20))

    return Inputs(tok, tok_path, seq_len, bs * seq_len, train, splits, eval_fn)

  # A run that carries state restarts it at every document (and reads each eval split as lanes).
  contiguous = carries_state(config)
  ids, doc_starts = {}, {}
  for s in ('train', *splits):
    ids[s], doc_starts[s] = _encode(tok, corpus, s) if contiguous else (_encode_text(tok, corpus, s), None)
  with _fitting(config):
    lm_batcher = batching.LMBatcher(
      ids['train'],
      bs,
      seq_len,
      seed=seed,
      mode=config.data.mode,
      doc_starts=doc_starts['train'],
      bptt_half_prob=float(config.data.bptt_half_prob),
      bptt_std=float(config.data.bptt_std),
    )
    train = _TrainBatcher(lm_batcher, config)
  chars, nbytes = {}, {}
  for s in splits:
    if len(ids[s]) < 2:
      raise ValueError(
        f'the {s} split of {_data_name(config)} has {len(ids[s])} token(s); evaluating needs 2 or more: '
        'give more text.'
      )
    text = corpus.text(s)
    n_tok = max(len(ids[s]), 1)
    chars[s] = len(text) / n_tok
    nbytes[s] = len(text.encode('utf-8')) / n_tok

  def eval_fn(split):
    batches = batching.eval_batches(
      ids[split], ebs, seq_len, contiguous=contiguous, pad_id=tok.pad_id, doc_starts=doc_starts[split]
    )
    return _limit(batches, n_eval)

  # tok/s counts the tokens trained on: with random BPTT lengths, the mean window of the first epoch.
  per_step = round(bs * lm_batcher.mean_window_length())
  return Inputs(tok, tok_path, seq_len, per_step, train, splits, eval_fn, chars, nbytes)


def _encode_text(tok, corpus, split) -> np.ndarray:
  return np.asarray(tok.encode(corpus.text(split)), np.int32)


def _encode(tok, corpus, split) -> tuple[np.ndarray, np.ndarray]:
  """The split's tokens, documents joined by the separator as in corpus.text, and the token position
  where each document starts. Encoded a document at a time (for the char and byte tokenizers the same
  tokens as encoding the joined text; a subword tokenizer may split differently at a boundary)."""
  sep = tok.encode(corpora.DOC_SEPARATOR)
  pieces, starts, n = [], [], 0
  for i, doc in enumerate(corpus.documents(split)):
    if i:
      pieces.append(sep)
      n += len(sep)
    starts.append(n)
    piece = tok.encode(doc)
    pieces.append(piece)
    n += len(piece)
  ids = np.concatenate([np.asarray(p, np.int32) for p in pieces]) if pieces else np.zeros(0, np.int32)
  return ids, np.asarray(starts, np.int64)


def _classification(config, workdir: str) -> Inputs:
  """The embedded stdlib package-classification task (lstm_attn.data.classification).

  config.data.snippets_per_class: (train, val, test) snippets per class; config.data.seq_len.
  The tokenizer is the pretraining run's (config.init_from) or built from the stdlib corpus train split.
  BERT inputs start with [CLS] (its pooled head reads position 0).
  """
  d = config.data
  if config.init_from:
    tok, tok_path = _tokenizer(config, None, workdir)
  else:
    kind = d.tokenizer
    corpus = None if kind == 'byte' else _load_corpus(config)
    tok, tok_path = _tokenizer(config, corpus, workdir)
  seq_len = int(d.seq_len)
  seed = int(config.seed)
  task = classification.stdlib_classification_task(
    tok,
    seq_len,
    snippets_per_class=tuple(d.snippets_per_class),
    seed=seed,
    add_cls=model_spec(config.model.name).uses_cls_token,
  )
  if len(task['class_names']) != int(config.num_classes):
    raise ValueError(
      f'config.num_classes={config.num_classes} but the stdlib task here has {len(task["class_names"])} '
      f'classes ({task["class_names"]}); set --config.num_classes={len(task["class_names"])}.'
    )
  bs = int(config.batch_size)
  ebs = config.eval_batch_size or bs
  train = _TrainBatcher(classification.ClassificationBatcher(task['train'], bs, seed=seed), config)

  def eval_fn(split):
    return classification.classification_eval_batches(task[split], ebs)

  return Inputs(tok, tok_path, seq_len, bs * seq_len, train, ('val', 'test'), eval_fn)
