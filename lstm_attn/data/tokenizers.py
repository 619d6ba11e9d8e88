"""Tokenizers: byte-level, character-level and sentencepiece subwords, behind one small interface.

Every tokenizer has
  `vocab_size`                     number of ids, specials included (ids are 0 .. vocab_size - 1);
  `encode(text) -> np.int32 [n]`   plain text to ids; never inserts special tokens;
  `decode(ids) -> str`             ids to text; specials are dropped (UNK becomes U+FFFD) unless
                                   `skip_special=False`, which renders them as '[PAD]', '[UNK]', ...;
  `save(path)`, `cls.load(path)`   plain files (JSON, or sentencepiece's .model protobuf), never pickle;
  `pad_id, unk_id, cls_id, sep_id, mask_id` and `special_ids` (all five, sorted).

Five special ids are reserved by every tokenizer so that any of them can drive any objective (BERT needs
PAD, MASK, CLS and SEP; classification pads with PAD):
  ByteTokenizer:           ids 0..255 are the UTF-8 bytes (id == byte value), PAD=256 UNK=257 CLS=258
                           SEP=259 MASK=260, vocab_size 261. UNK is never produced by `encode`.
  CharTokenizer:           PAD=0 UNK=1 CLS=2 SEP=3 MASK=4, then the corpus's characters sorted by code
                           point from id 5. Characters outside the vocabulary encode to UNK.
  SentencePieceTokenizer:  PAD=0 UNK=1 CLS=2 SEP=3 MASK=4 ('[CLS]', '[SEP]', '[MASK]' are control
                           symbols: text never encodes to them), then '\\n' as a user symbol, then 256 byte
                           pieces (byte fallback, so no text is unknown) and the learned pieces.

`load_tokenizer(path)` opens any saved tokenizer (JSON by its 'type' field, anything else as a
sentencepiece model); `make_tokenizer(kind, corpus_text, workdir_or_path)` builds, or reloads on resume, the
tokenizer a training run uses.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable

import numpy as np

SPECIAL_NAMES = ('pad', 'unk', 'cls', 'sep', 'mask')
_FORMAT_VERSION = 1


class _Specials:
  """Mixin: the five reserved ids as attributes, `special_ids` and the rendering used by decode."""

  pad_id: int
  unk_id: int
  cls_id: int
  sep_id: int
  mask_id: int

  @property
  def special_ids(self) -> tuple[int, ...]:
    """The ids of PAD, UNK, CLS, SEP and MASK, sorted."""
    return tuple(sorted(getattr(self, f'{n}_id') for n in SPECIAL_NAMES))

  def _special_text(self, i: int, skip_special: bool) -> str:
    if i == self.unk_id and skip_special:
      return '\ufffd'
    if skip_special:
      return ''
    name = next(n for n in SPECIAL_NAMES if getattr(self, f'{n}_id') == i)
    return f'[{name.upper()}]'


def _as_ids(ids, vocab_size: int) -> np.ndarray:
  """Validates ids for decode: a 1-D integer sequence within [0, vocab_size)."""
  arr = np.asarray(ids)
  if arr.ndim == 0:
    arr = arr.reshape(1)
  if arr.ndim != 1:
    raise ValueError(f'ids: expected a 1-D sequence of token ids, got shape {arr.shape}')
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f'ids: expected integer token ids, got dtype {arr.dtype}')
  if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
    raise ValueError(f'ids: values must be in [0, {vocab_size}), got min {arr.min()} max {arr.max()}')
  return arr.astype(np.int64)


def _atomic_write(path, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file of its own in the same folder, then renames it.

  Atomic: a crash never leaves a half-written tokenizer. The temporary name is unique (mkstemp), not a
  fixed '.tmp': every host of a multi-host run writes the same tokenizer, and with one shared name the
  second rename found the file already moved (FileNotFoundError); pids repeat across hosts.
  """
  path = os.fspath(path)
  parent = os.path.dirname(path) or '.'
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=os.path.basename(path) + '.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _write_json(path, payload: dict) -> None:
  _atomic_write(path, json.dumps(payload, ensure_ascii=True).encode('utf-8'))


def _check_file(path, what: str = 'tokenizer file') -> str:
  """`path` as a str; FileNotFoundError if nothing is there, ValueError if it is not a regular file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{what} {path!r} does not exist')
  if not os.path.isfile(path):
    raise ValueError(f'{what} {path!r} is not a regular file (a folder, a device or a pipe)')
  return path


def _read_json(path, expected_type: str | None = None) -> dict:
  """The JSON payload of a tokenizer file (of `expected_type`, if given); errors name the file."""
  path = _check_file(path)
  try:
    with open(path, encoding='utf-8') as f:
      payload = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(
      f'tokenizer file {path!r} is not a JSON tokenizer file (damaged or cut short?): {e}'
    ) from e
  if not isinstance(payload, dict):
    raise ValueError(
      f'tokenizer file {path!r} is not a JSON tokenizer file: it holds a JSON {type(payload).__name__}, '
      'not an object with a "type"'
    )
  if expected_type is not None and payload.get('type') != expected_type:
    got = payload.get('type') if isinstance(payload, dict) else type(payload).__name__
    raise ValueError(f'tokenizer file {path!r} holds type {got!r}, expected {expected_type!r}')
  return payload


class ByteTokenizer(_Specials):
  """UTF-8 bytes as ids 0..255 (id == byte value); specials PAD=256 UNK=257 CLS=258 SEP=259 MASK=260.

  Needs no files and round-trips any string exactly. `decode` of an arbitrary id sequence replaces
  invalid UTF-8 with U+FFFD (errors='replace'), as a sampled byte stream may cut a character.
  """

  kind = 'byte'
  pad_id, unk_id, cls_id, sep_id, mask_id = 256, 257, 258, 259, 260
  vocab_size = 261

  def encode(self, text: str) -> np.ndarray:
    """text -> int32 [len(text.encode('utf-8'))]."""
    if not isinstance(text, str):
      raise ValueError(f'text: expected str, got {type(text).__name__}')
    try:
      raw = text.encode('utf-8')
    except UnicodeEncodeError as e:  # lone surrogates are not Unicode text
      raise ValueError(f'text: not valid Unicode at index {e.start} ({text[e.start]!r})') from e
    return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)

  def decode(self, ids, *, skip_special: bool = True) -> str:
    ids = _as_ids(ids, self.vocab_size)
    out, run = [], []
    for i in ids.tolist():
      if i < 256:
        run.append(i)
        continue
      out.append(bytes(run).decode('utf-8', errors='replace'))
      run = []
      out.append(self._special_text(i, skip_special))
    out.append(bytes(run).decode('utf-8', errors='replace'))
    return ''.join(out)

  def save(self, path) -> None:
    _write_json(path, {'type': 'byte', 'version': _FORMAT_VERSION})

  @classmethod
  def load(cls, path) -> ByteTokenizer:
    _read_json(path, 'byte')
    return cls()

  def __eq__(self, other):
    return isinstance(other, ByteTokenizer)

  def __hash__(self):
    return hash('byte')

  def __repr__(self):
    return 'ByteTokenizer(vocab_size=261)'


class CharTokenizer(_Specials):
  """One id per Unicode code point seen in the corpus: PAD=0 UNK=1 CLS=2 SEP=3 MASK=4, chars from 5.

  The vocabulary is the sorted set of characters of `from_text(text)`; unknown characters encode to UNK
  (and decode to U+FFFD). On tiny Shakespeare this is nanoGPT's 65-character vocabulary plus 5 specials.
  """

  kind = 'char'
  pad_id, unk_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4
  num_special = 5

  def __init__(self, chars: Iterable[str]):
    chars = list(chars)
    for c in chars:
      if not isinstance(c, str) or len(c) != 1:
        raise ValueError(f'chars: every entry must be a single character, got {c!r}')
    if len(set(chars)) != len(chars) or chars != sorted(chars):
      raise ValueError('chars: expected distinct characters sorted by code point')
    self.chars = chars
    # Dense code point -> id table for a vectorised encode; its last entry (UNK) catches larger code points.
    top = max((ord(c) for c in chars), default=0)
    self._table = np.full(top + 2, self.unk_id, np.int32)
    self._table[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.int32) + self.num_special

  @classmethod
  def from_text(cls, text: str) -> CharTokenizer:
    """The vocabulary of `text`: its distinct characters, sorted by code point."""
    if not isinstance(text, str):
      raise ValueError(f'text: expected str, got {type(text).__name__}')
    if not text:
      raise ValueError('text: cannot build a character vocabulary from an empty text')
    return cls(sorted(set(text)))

  @property
  def vocab_size(self) -> int:
    return self.num_special + len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """text -> int32 [len(text)]; characters outside the vocabulary -> unk_id."""
    if not isinstance(text, str):
      raise ValueError(f'text: expected str, got {type(text).__name__}')
    cps = np.frombuffer(text.encode('utf-32-le', errors='surrogatepass'), dtype=np.uint32)
    return self._table[np.minimum(cps, len(self._table) - 1)]

  def decode(self, ids, *, skip_special: bool = True) -> str:
    ids = _as_ids(ids, self.vocab_size)
    return ''.join(
      self.chars[i - self.num_special] if i >= self.num_special else self._special_text(i, skip_special)
      for i in ids.tolist()
    )

  def save(self, path) -> None:
    _write_json(path, {'type': 'char', 'version': _FORMAT_VERSION, 'chars': ''.join(self.chars)})

  @classmethod
  def load(cls, path) -> CharTokenizer:
    payload = _read_json(path, 'char')
    chars = payload.get('chars')
    if not isinstance(chars, str):
      raise ValueError(f"tokenizer file {os.fspath(path)!r}: field 'chars' must be a string")
    return cls(list(chars))

  def __eq__(self, other):
    return isinstance(other, CharTokenizer) and self.chars == other.chars

  def __hash__(self):
    return hash(('char', ''.join(self.chars)))

  def __repr__(self):
    return f'CharTokenizer(vocab_size={self.vocab_size})'


class SentencePieceTokenizer(_Specials):
  """Subwords from sentencepiece (BPE or unigram), trained offline on the corpus; saved as its .model file.

  Trained for source code and exact round trips: identity normalisation, whitespace kept as is (no dummy
  prefix, no collapsing), '\\n' as a user symbol (training reads the text line by line), byte fallback so
  every string encodes without UNK, digits split.
  """

  kind = 'sentencepiece'

  def __init__(self, model_proto: bytes, source: str = '<memory>'):
    import sentencepiece as spm

    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.pad_id = int(self._sp.pad_id())
    self.unk_id = int(self._sp.unk_id())
    for name in ('cls', 'sep', 'mask'):
      piece = f'[{name.upper()}]'
      i = int(self._sp.piece_to_id(piece))
      if i == self.unk_id or not self._sp.is_control(i):
        raise ValueError(
          f'sentencepiece model {source!r} lacks the control symbol {piece!r}; train it with '
          'SentencePieceTokenizer.train (which reserves PAD/UNK/CLS/SEP/MASK)'
        )
      setattr(self, f'{name}_id', i)
    newline = int(self._sp.piece_to_id('\n'))
    self._newline_id = None
    if newline != self.unk_id and not self._sp.is_control(newline) and _is_bpe(self._proto):
      self._newline_id = newline  # enables the line-by-line fast path of encode (BPE only)
    if self.pad_id < 0:
      raise ValueError(f'sentencepiece model {source!r} has no pad id; train it with pad_id=0')

  @classmethod
  def train(
    cls,
    text_or_files,
    vocab_size: int,
    model_path=None,
    *,
    model_type: str = 'bpe',
    max_sentences: int = 0,
    seed: int = 0,
    num_threads: int = 2,
  ) -> SentencePieceTokenizer:
    """Trains on a string (split into lines) or a list of UTF-8 files; saves to `model_path` if given.

    model_type: 'bpe' or 'unigram'. max_sentences > 0 trains on that many lines sampled with `seed`
    (sentencepiece's input_sentence_size), for large corpora; 0 uses every line (deterministic).
    vocab_size must leave room for 5 specials + '\\n' + 256 byte pieces + the corpus's characters.
    """
    import sentencepiece as spm

    if model_type not in ('bpe', 'unigram'):
      raise ValueError(f"model_type: expected 'bpe' or 'unigram', got {model_type!r}")
    if isinstance(text_or_files, str):
      lines = text_or_files.split('\n')
    else:
      lines = []
      for p in text_or_files:
        p = os.fspath(p)
        if not os.path.isfile(p):
          raise FileNotFoundError(f'text_or_files: training file {p!r} does not exist')
        with open(p, 'rb') as f:
          raw = f.read()
        try:
          lines.extend(raw.decode('utf-8').split('\n'))
        except UnicodeDecodeError as e:
          raise ValueError(
            f'training file {p!r} is not valid UTF-8 at byte offset {e.start}; re-encode it to UTF-8'
          ) from e
    lines = [line for line in lines if line]
    if not lines:
      raise ValueError('text_or_files: no non-empty line to train a sentencepiece model on')
    min_vocab = 5 + 1 + 256 + 1
    if not isinstance(vocab_size, int) or vocab_size < min_vocab:
      raise ValueError(
        f'vocab_size: expected an int >= {min_vocab} (specials + byte pieces), got {vocab_size}'
      )
    spm.set_random_generator_seed(int(seed))
    out = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        control_symbols=['[CLS]', '[SEP]', '[MASK]'],
        user_defined_symbols=['\n'],
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        input_sentence_size=int(max_sentences),
        shuffle_input_sentence=bool(max_sentences),
        num_threads=int(num_threads),
        minloglevel=2,
      )
    except RuntimeError as e:  # e.g. vocab_size larger than the corpus supports
      raise ValueError(f'sentencepiece training failed (vocab_size={vocab_size}): {e}') from e
    tok = cls(out.getvalue())
    if model_path is not None:
      tok.save(model_path)
    return tok

  @property
  def vocab_size(self) -> int:
    return int(self._sp.vocab_size())

  def encode(self, text: str) -> np.ndarray:
    if not isinstance(text, str):
      raise ValueError(f'text: expected str, got {type(text).__name__}')
    if self._newline_id is None or '\n' not in text:
      return np.asarray(self._sp.encode(text), dtype=np.int32)
    # BPE: '\n' is a user symbol, which sentencepiece splits out before anything else, so encoding line by
    # line (in parallel) and joining with its id is identical to encoding the whole text, and ~7x faster on
    # megabytes of code (BPE merging slows down on one huge 'sentence'). Unigram is fast on the whole text,
    # and line by line it may break ties between equal-score segmentations differently, so it is not split.
    pieces = self._sp.encode(text.split('\n'), num_threads=2)
    out = np.empty(sum(len(p) for p in pieces) + len(pieces) - 1, np.int32)
    pos = 0
    for i, p in enumerate(pieces):
      if i:
        out[pos] = self._newline_id
        pos += 1
      out[pos : pos + len(p)] = p
      pos += len(p)
    return out

  def decode(self, ids, *, skip_special: bool = True) -> str:
    ids = _as_ids(ids, self.vocab_size)
    specials = set(self.special_ids)
    out, run = [], []
    for i in ids.tolist():
      if i not in specials:
        run.append(i)
        continue
      out.append(self._sp.decode(run))
      run = []
      out.append(self._special_text(i, skip_special))
    out.append(self._sp.decode(run))
    return ''.join(out)

  def save(self, path) -> None:
    _atomic_write(path, self._proto)

  @classmethod
  def load(cls, path) -> SentencePieceTokenizer:
    path = _check_file(path, 'sentencepiece model')
    with open(path, 'rb') as f:
      proto = f.read()
    try:
      return cls(proto, source=path)
    except RuntimeError as e:
      raise ValueError(f'{path!r} is not a sentencepiece model: {e}') from e

  def __eq__(self, other):
    return isinstance(other, SentencePieceTokenizer) and self._proto == other._proto

  def __hash__(self):
    return hash(self._proto)

  def __repr__(self):
    return f'SentencePieceTokenizer(vocab_size={self.vocab_size})'


def _is_bpe(model_proto: bytes) -> bool:
  try:
    from sentencepiece import sentencepiece_model_pb2
  except ImportError:  # protobuf missing: always encode the whole text (correct, slower for BPE)
    return False
  model = sentencepiece_model_pb2.ModelProto()
  model.ParseFromString(model_proto)
  return model.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE


def load_tokenizer(path):
  """Opens a saved tokenizer: a `.json` file (or one that starts with '{') by its 'type' ('byte' or
  'char'), anything else as a sentencepiece .model."""
  path = _check_file(path)
  with open(path, 'rb') as f:
    head = f.read(64).lstrip()
  if path.endswith('.json') or head.startswith(b'{'):
    kind = _read_json(path).get('type')
    if kind == 'byte':
      return ByteTokenizer.load(path)
    if kind == 'char':
      return CharTokenizer.load(path)
    raise ValueError(f"tokenizer file {path!r}: unknown type {kind!r}, expected 'byte' or 'char'")
  return SentencePieceTokenizer.load(path)


TOKENIZER_KINDS = ('byte', 'char', 'bpe', 'unigram')


def make_tokenizer(
  kind: str, corpus_text: str | None = None, workdir_or_path=None, vocab_size: int | None = None
):
  """The tokenizer a run uses: loaded from `workdir_or_path` if saved there, else built and saved there.

  kind: 'byte' | 'char' | 'bpe' | 'unigram' ('sentencepiece' means 'bpe').
  corpus_text: the training text (needed to build 'char' and subword vocabularies; unused for 'byte').
  workdir_or_path: None (nothing saved); a file path ending in .json or .model; or else a folder (made
    if missing) holding `tokenizer.json`, or `tokenizer.model` for sentencepiece. Reusing the saved
    file keeps a resumed run's ids identical to the first run's even if the corpus changed.
  vocab_size: subword vocabulary size (default 2048); must be None for 'byte' and 'char'.
  """
  kind = 'bpe' if kind == 'sentencepiece' else kind
  if kind not in TOKENIZER_KINDS:
    raise ValueError(f'kind: expected one of {TOKENIZER_KINDS} or "sentencepiece", got {kind!r}')
  if kind in ('byte', 'char') and vocab_size is not None:
    raise ValueError(f'vocab_size: only subword tokenizers take a vocab_size, got {vocab_size} for {kind!r}')
  path = None
  if workdir_or_path is not None:
    path = os.fspath(workdir_or_path)
    if os.path.isdir(path) or os.path.splitext(path)[1] not in ('.json', '.model'):
      path = os.path.join(path, 'tokenizer.model' if kind in ('bpe', 'unigram') else 'tokenizer.json')
    if os.path.isfile(path):
      tok = load_tokenizer(path)
      want = 'sentencepiece' if kind in ('bpe', 'unigram') else kind
      if tok.kind != want:
        raise ValueError(
          f'tokenizer file {path!r} holds a {tok.kind!r} tokenizer but kind={kind!r} was asked for'
        )
      if vocab_size is not None and tok.vocab_size != vocab_size:
        raise ValueError(
          f'tokenizer file {path!r} has vocab_size {tok.vocab_size}, but vocab_size={vocab_size}'
        )
      return tok
  if kind == 'byte':
    tok = ByteTokenizer()
  else:
    if not corpus_text:
      raise ValueError(f'corpus_text: a non-empty training text is needed to build a {kind!r} tokenizer')
    if kind == 'char':
      tok = CharTokenizer.from_text(corpus_text)
    else:
      tok = SentencePieceTokenizer.train(corpus_text, vocab_size or 2048, model_type=kind)
  if path is not None:
    tok.save(path)
  return tok
