"""Corpora: the embedded standard-library corpus, or any text file or folder of text files.

A `Corpus` holds train/val/test as lists of documents (strings). Three sources, all deterministic:

  stdlib_corpus()        the .py files of the running interpreter's standard library (on every machine, no
                         download), split BY FILE into train/val/test 90/5/5 by a hash of the relative path,
                         so a file common to two Python versions lands in the same split in both.
  load_corpus('x.txt')   one file, split like nanoGPT: the first 90% of characters train, the last 10% val;
                         test IS val (nanoGPT has no test split; `info['test_is_val']` says so).
  load_corpus('dir/')    every non-hidden file under the folder, split by file like the stdlib.

`max_bytes` caps a corpus for fast runs, deterministically: for split-by-file corpora each split keeps
files in hash order until its share (90/5/5 of max_bytes, UTF-8 bytes) is full, cutting the last file; a
single file is cut to its first max_bytes before the 90/10 split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import sysconfig

SPLITS = ('train', 'val', 'test')
FILE_FRACTIONS = (0.90, 0.05, 0.05)
DOC_SEPARATOR = '\n\n'
# Directories of the stdlib that are test suites (test/, tests/, idlelib/idle_test, lib2to3/tests) or not
# the standard library at all.
_STDLIB_SKIP_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages', 'dist-packages', '__pycache__'})


@dataclasses.dataclass
class Corpus:
  """train/val/test as lists of documents (str). `info` records where they came from.

  info keys: 'source' (path or 'stdlib'), 'files' ({split: [relative paths]}, split-by-file corpora only),
  'test_is_val' (single-file corpora), 'skipped' (stdlib files skipped as not UTF-8), 'max_bytes'.
  """

  name: str
  train: list[str]
  val: list[str]
  test: list[str]
  info: dict = dataclasses.field(default_factory=dict)

  def documents(self, split: str) -> list[str]:
    if split not in SPLITS:
      raise ValueError(f'split: expected one of {SPLITS}, got {split!r}')
    return getattr(self, split)

  def text(self, split: str, separator: str = DOC_SEPARATOR) -> str:
    """The split's documents joined with `separator` (a blank line by default)."""
    return separator.join(self.documents(split))

  def num_chars(self, split: str) -> int:
    return sum(len(d) for d in self.documents(split))


def _hash_unit(relpath: str) -> float:
  """A deterministic number in [0, 1) from a relative path ('/'-separated), independent of the platform."""
  digest = hashlib.sha256(relpath.replace(os.sep, '/').encode('utf-8')).hexdigest()
  return int(digest[:12], 16) / float(16**12)


def split_by_file(relpaths, fractions=FILE_FRACTIONS) -> dict[str, list[str]]:
  """Assigns each path to train/val/test by a hash of the path (thresholds at the cumulative fractions).

  Every file lands in exactly one split; within a split, paths are in hash order. If the hash thresholds
  leave a split empty (folders of a few files), files are dealt by rank of their hash instead, at least
  one to each split; fewer than 3 files cannot be split and raise ValueError.
  """
  relpaths = sorted(set(relpaths), key=lambda p: (_hash_unit(p), p))
  if len(relpaths) < 3:
    raise ValueError(
      f'cannot split {len(relpaths)} file(s) by file into train/val/test; at least 3 are needed'
    )
  cut1, cut2 = fractions[0], fractions[0] + fractions[1]
  out = {s: [] for s in SPLITS}
  for p in relpaths:
    u = _hash_unit(p)
    out['train' if u < cut1 else 'val' if u < cut2 else 'test'].append(p)
  if all(out.values()):
    return out
  n = len(relpaths)
  n_val = max(1, round(n * fractions[1]))
  n_test = max(1, round(n * fractions[2]))
  n_train = n - n_val - n_test
  return {
    'train': relpaths[:n_train],
    'val': relpaths[n_train : n_train + n_val],
    'test': relpaths[n_train + n_val :],
  }


def read_text_file(path) -> str:
  """Reads a file as UTF-8 (a leading BOM dropped); ValueError naming the file and byte offset if not."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'corpus file {path!r} does not exist')
  if not os.path.isfile(path):
    raise ValueError(f'corpus file {path!r} is not a regular file (a device or a pipe?); give a text file')
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(
      f'corpus file {path!r} is not valid UTF-8 at byte offset {e.start} (byte 0x{raw[e.start]:02x}); '
      're-encode it to UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`'
    ) from e
  return text[1:] if text.startswith('\ufeff') else text


def _cap(text: str, max_bytes: int) -> str:
  """The longest prefix of `text` whose UTF-8 encoding fits in max_bytes (never cuts a character)."""
  raw = text.encode('utf-8')
  if len(raw) <= max_bytes:
    return text
  return raw[:max_bytes].decode('utf-8', errors='ignore')


def _check_max_bytes(max_bytes):
  if max_bytes is not None and (
    not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 20
  ):
    raise ValueError(f'max_bytes: expected None or an int >= 20, got {max_bytes!r}')


def _from_files(name: str, root: str, relpaths, read, max_bytes, info) -> Corpus:
  """Split-by-file corpus: `read(relpath) -> str or None` (None skips the file)."""
  splits = split_by_file(relpaths)
  docs = {s: [] for s in SPLITS}
  files = {s: [] for s in SPLITS}
  for split, frac in zip(SPLITS, FILE_FRACTIONS):
    budget = None if max_bytes is None else max(1, int(max_bytes * frac))
    for rel in splits[split]:
      if budget is not None and budget <= 0:
        break
      text = read(rel)
      if text is None or not text:
        continue
      if budget is not None:
        text = _cap(text, budget)
        budget -= len(text.encode('utf-8'))
        if not text:
          break
      docs[split].append(text)
      files[split].append(rel)
  for split in SPLITS:
    if not any(d.strip() for d in docs[split]):
      raise ValueError(
        f'corpus {root!r}: the {split!r} split is empty ({len(splits[split])} file(s) assigned to it'
        f'{", max_bytes=" + str(max_bytes) if max_bytes else ""}); add text or raise max_bytes'
      )
  return Corpus(name, docs['train'], docs['val'], docs['test'], dict(info, files=files, max_bytes=max_bytes))


def stdlib_root() -> str:
  """The running interpreter's standard-library folder (sysconfig's 'stdlib' path)."""
  return sysconfig.get_paths()['stdlib']


def stdlib_files() -> list[str]:
  """Relative paths ('/'-separated, sorted) of the stdlib's .py files, minus test suites and site-packages."""
  root = stdlib_root()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith('.'))
    for fn in filenames:
      if fn.endswith('.py'):
        out.append(os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, '/'))
  return sorted(out)


def read_stdlib_file(relpath: str) -> str | None:
  """A stdlib source file's text, or None if it is not valid UTF-8 (such files are left out)."""
  try:
    return read_text_file(os.path.join(stdlib_root(), relpath))
  except ValueError:
    return None


def stdlib_corpus(max_bytes: int | None = None) -> Corpus:
  """The embedded default: this interpreter's standard-library .py sources, split by file 90/5/5.

  About 13 MB in ~1,700 files on CPython 3.11. Files that are not valid UTF-8 are skipped (counted in
  info['skipped']). info['python'] records the interpreter version, since the corpus depends on it.
  """
  _check_max_bytes(max_bytes)
  root = stdlib_root()
  relpaths = stdlib_files()
  if not relpaths:
    raise ValueError(f'no .py files found in the standard library folder {root!r}')
  skipped = []

  def read(rel):
    text = read_stdlib_file(rel)
    if text is None:
      skipped.append(rel)
    return text

  info = {'source': 'stdlib', 'root': root, 'python': sys.version.split()[0], 'skipped': skipped}
  return _from_files('stdlib', root, relpaths, read, max_bytes, info)


def load_corpus(path=None, *, max_bytes: int | None = None) -> Corpus:
  """None -> `stdlib_corpus`; a text file -> nanoGPT's 90/10 split (test = val); a folder -> split by file.

  Raises FileNotFoundError for a missing path, ValueError for an empty corpus or split and for a file that
  is not UTF-8 (naming the file and the byte offset).
  """
  _check_max_bytes(max_bytes)
  if path is None:
    return stdlib_corpus(max_bytes)
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'corpus path {path!r} does not exist (expected a text file or a folder of them)')
  name = os.path.basename(os.path.normpath(path)) or path
  if os.path.isdir(path):
    relpaths = []
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
      for fn in filenames:
        if not fn.startswith('.') and os.path.isfile(os.path.join(dirpath, fn)):
          relpaths.append(os.path.relpath(os.path.join(dirpath, fn), path).replace(os.sep, '/'))
    if not relpaths:
      raise ValueError(f'corpus folder {path!r} holds no files')
    if len(relpaths) < 3:
      raise ValueError(
        f'corpus folder {path!r} holds {len(relpaths)} file(s); splitting by file needs at least 3 '
        '(pass a single file instead for a 90/10 split)'
      )
    read = lambda rel: read_text_file(os.path.join(path, rel))
    return _from_files(name, path, relpaths, read, max_bytes, {'source': path})
  text = read_text_file(path)
  if max_bytes is not None:
    text = _cap(text, max_bytes)
  if not text.strip():
    raise ValueError(f'corpus file {path!r} is empty (no non-whitespace text)')
  n = len(text)
  cut = int(n * 0.9)  # nanoGPT: train_data = data[:int(n*0.9)], val_data = data[int(n*0.9):]
  train, val = text[:cut], text[cut:]
  if not train.strip() or not val.strip():
    raise ValueError(f'corpus file {path!r}: too short for a 90/10 split ({n} characters)')
  info = {'source': path, 'test_is_val': True, 'max_bytes': max_bytes}
  return Corpus(name, [train], [val], [val], info)
