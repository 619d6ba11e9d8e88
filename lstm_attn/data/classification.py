"""A downstream classification task with no download: which standard-library package is a snippet from?

`stdlib_classification_task(tokenizer, seq_len)` picks ~10 top-level stdlib packages (folders such as
asyncio, email, xml), splits each package's .py files BY FILE into train/val/test 70/15/15 (by a hash of the
path, as the corpus does, so no file lands in two splits), and cuts snippets: windows of `seq_len` tokens at
distinct uniform random positions inside one file (a file shorter than the window gives one snippet, the
whole file, padded with pad_id). Every split has the same number of snippets per class. Test suites are
excluded as in the corpus.

Caveat for transfer experiments: the task splits 70/15/15 while the stdlib corpus splits 90/5/5, so most
task val/test files are in the corpus's train split: pre-training has seen their text (never the labels).
Compare fine-tuned and from-scratch models on the same task splits, as the trainer does.

`ClassificationBatcher` draws training batches over a split, reshuffled every epoch, resumable by
state()/restore(); `classification_eval_batches` covers a split once with a weight mask on padding rows.
"""

from __future__ import annotations

import collections

import numpy as np

from lstm_attn.data.batching import _Batcher, _check_positive
from lstm_attn.data.corpora import SPLITS, read_stdlib_file, split_by_file, stdlib_files

TASK_FRACTIONS = (0.70, 0.15, 0.15)  # train/val/test share of each package's files

# In order of preference; the default takes the first `DEFAULT_NUM_CLASSES` that exist with enough files.
# Left out on purpose: encodings (generated code tables, trivially told apart) and pydoc_data (one file).
PREFERRED_PACKAGES = (
  'asyncio',
  'email',
  'xml',
  'multiprocessing',
  'importlib',
  'unittest',
  'tkinter',
  'http',
  'json',
  'urllib',
  'concurrent',
  'ctypes',
  'logging',
  'sqlite3',
  'html',
  'xmlrpc',
  'wsgiref',
  'distutils',
)
DEFAULT_NUM_CLASSES = 10
MIN_FILES = 5


def stdlib_packages(min_files: int = MIN_FILES) -> dict[str, list[str]]:
  """Top-level stdlib packages (folders) -> their .py files (relative paths), for those with >= min_files."""
  groups = collections.defaultdict(list)
  for rel in stdlib_files():
    if '/' in rel:
      groups[rel.split('/', 1)[0]].append(rel)
  return {k: v for k, v in sorted(groups.items()) if len(v) >= min_files}


def _snippets_per_split(snippets_per_class) -> tuple[int, int, int]:
  if isinstance(snippets_per_class, (int, np.integer)) and not isinstance(snippets_per_class, bool):
    counts = (int(snippets_per_class),) * 3
  else:
    counts = tuple(int(c) for c in snippets_per_class)
  if len(counts) != 3 or min(counts) < 1:
    raise ValueError(
      f'snippets_per_class: expected an int >= 1 or (train, val, test) ints >= 1, got {snippets_per_class!r}'
    )
  return counts


def stdlib_classification_task(
  tokenizer,
  seq_len: int,
  *,
  packages=None,
  snippets_per_class=(512, 64, 64),
  seed: int = 0,
  add_cls: bool = False,
) -> dict:
  """Snippet -> package classification from this interpreter's standard library.

  tokenizer: any lstm_attn.data tokenizer (encode, pad_id, cls_id).
  seq_len: tokens per example; with add_cls=True the first is [CLS] (for BERT's pooled head) and the
    snippet fills the remaining seq_len - 1.
  packages: top-level stdlib package names (the classes, in label order); default: the first 10 of
    PREFERRED_PACKAGES that exist here with >= 5 source files.
  snippets_per_class: an int (every split) or (train, val, test) counts per class.
  seed: snippet positions and example order are a pure function of it.

  Returns {'train', 'val', 'test': {'tokens': int32 [n, seq_len] (pad_id after seq_lengths),
    'seq_lengths': int32 [n], 'labels': int32 [n], 'sources': [n] relative file paths,
    'offsets': int [n] token offset of the snippet in its file},
    'class_names': [num_classes], 'files': {split: {class: [relative paths]}},
    'num_unique': {split: distinct snippets (fewer than n when a class's split is too short to give n
    distinct windows, and snippets repeat)}}.
  """
  seq_len = _check_positive('seq_len', seq_len, minimum=2 if add_cls else 1)
  seed = _check_positive('seed', seed, minimum=0)
  counts = _snippets_per_split(snippets_per_class)
  available = stdlib_packages(min_files=3)
  if packages is None:
    packages = [p for p in PREFERRED_PACKAGES if len(available.get(p, ())) >= MIN_FILES][:DEFAULT_NUM_CLASSES]
    if len(packages) < 2:
      raise ValueError(
        f"this interpreter's stdlib has fewer than 2 packages with >= {MIN_FILES} source files"
      )
  packages = list(packages)
  for p in packages:
    if p not in available:
      raise ValueError(
        f'packages: {p!r} is not a stdlib package with at least 3 source files here; '
        f'available: {sorted(available)}'
      )
  if len(set(packages)) != len(packages) or len(packages) < 2:
    raise ValueError(f'packages: expected >= 2 distinct package names, got {packages}')

  width = seq_len - 1 if add_cls else seq_len  # snippet tokens per example
  files = {s: {} for s in SPLITS}
  examples = {s: [] for s in SPLITS}  # (tokens, label, source, offset)
  num_unique = {s: 0 for s in SPLITS}
  for label, package in enumerate(packages):
    by_split = split_by_file(available[package], TASK_FRACTIONS)
    for si, split in enumerate(SPLITS):
      rels, toks = [], []
      for rel in by_split[split]:
        text = read_stdlib_file(rel)
        if text:
          ids = tokenizer.encode(text)
          if len(ids):
            rels.append(rel)
            toks.append(ids)
      if not toks:
        raise ValueError(f'package {package!r}: no readable source in its {split!r} files {by_split[split]}')
      files[split][package] = rels
      n_windows = np.array([max(1, len(t) - width + 1) for t in toks])  # distinct starts per file
      cum = np.concatenate([[0], np.cumsum(n_windows)])
      rng = np.random.default_rng((seed, si, label))
      n = counts[si]
      picks = np.sort(rng.choice(int(cum[-1]), size=n, replace=n > cum[-1]))
      num_unique[split] += len(np.unique(picks))
      for pick in picks:
        f = int(np.searchsorted(cum, pick, side='right') - 1)
        off = int(pick - cum[f])
        examples[split].append((toks[f][off : off + width], label, rels[f], off))

  out = {'class_names': packages, 'files': files, 'num_unique': num_unique}
  for si, split in enumerate(SPLITS):
    ex = examples[split]
    order = np.random.default_rng((seed, si, len(packages))).permutation(len(ex))
    tokens = np.full((len(ex), seq_len), tokenizer.pad_id, np.int32)  # [n, seq_len]
    lengths = np.zeros(len(ex), np.int32)
    first = 1 if add_cls else 0
    if add_cls:
      tokens[:, 0] = tokenizer.cls_id
    for row, i in enumerate(order):
      snippet = ex[i][0]
      tokens[row, first : first + len(snippet)] = snippet
      lengths[row] = first + len(snippet)
    out[split] = {
      'tokens': tokens,
      'seq_lengths': lengths,
      'labels': np.array([ex[i][1] for i in order], np.int32),
      'sources': [ex[i][2] for i in order],
      'offsets': np.array([ex[i][3] for i in order], np.int64),
    }
  return out


def _check_split(split):
  try:
    n = len(split['labels'])
    ok = split['tokens'].shape[0] == n and len(split['seq_lengths']) == n and n > 0
  except (KeyError, TypeError, AttributeError):
    ok = False
  if not ok:
    raise ValueError(
      "split: expected a non-empty dict with 'tokens' [n, seq_len], 'seq_lengths' [n], 'labels' [n]"
    )
  return n


class ClassificationBatcher(_Batcher):
  """Training batches over one split of the task: each epoch a fresh permutation (a pure function of
  (seed, epoch)); batches run across epoch boundaries, so every batch is full.

  Returns {'inputs': int32 [batch, seq_len], 'seq_lengths': int32 [batch], 'labels': int32 [batch]}.
  """

  _stream = 4

  def __init__(self, split: dict, batch_size: int, *, seed: int = 0, shuffle: bool = True):
    super().__init__(seed)
    self.n = _check_split(split)
    self.split = split
    self.batch_size = _check_positive('batch_size', batch_size)
    self.shuffle = bool(shuffle)

  def _identity(self):
    return {'num_examples': self.n, 'batch_size': self.batch_size, 'shuffle': int(self.shuffle)}

  def batch(self, step: int) -> dict[str, np.ndarray]:
    g = int(step) * self.batch_size + np.arange(self.batch_size)  # global example counter
    epochs, pos = g // self.n, g % self.n
    idx = pos.copy()
    if self.shuffle:
      for e in np.unique(epochs):
        perm = self._rng(int(e)).permutation(self.n)
        idx[epochs == e] = perm[pos[epochs == e]]
    return {
      'inputs': self.split['tokens'][idx],
      'seq_lengths': self.split['seq_lengths'][idx],
      'labels': self.split['labels'][idx],
    }


def classification_eval_batches(split: dict, batch_size: int):
  """Covers a split once in order; the last batch is padded (copies of row 0) with 'weights' 0 [batch]."""
  n = _check_split(split)
  batch_size = _check_positive('batch_size', batch_size)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    weights = (idx < n).astype(np.float32)
    idx = np.where(idx < n, idx, 0)
    yield {
      'inputs': split['tokens'][idx],
      'seq_lengths': split['seq_lengths'][idx],
      'labels': split['labels'][idx],
      'weights': weights,
    }
