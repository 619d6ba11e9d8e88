"""Tokenizers: exact round trips on arbitrary bytes and Unicode, UNK handling, plain-file save/load."""

import json
import os

import numpy as np
import pytest

from lstm_attn.data import (
  ByteTokenizer,
  CharTokenizer,
  SentencePieceTokenizer,
  load_tokenizer,
  make_tokenizer,
  stdlib_corpus,
)

SHAKESPEARE = '/work/shared/data/tinyshakespeare.txt'

# Code point pools: ASCII (with NUL, tab, CR, LF), Latin-1, Greek, CJK, combining marks, emoji (astral),
# zero-width joiner and variation selectors, private use. Never surrogates (not Unicode text).
_POOLS = [
  (0, 127),
  (128, 255),
  (0x370, 0x3FF),
  (0x4E00, 0x4FFF),
  (0x300, 0x36F),
  (0x1F300, 0x1FAFF),
  (0x200B, 0x200D),
  (0xFE00, 0xFE0F),
  (0xE000, 0xE0FF),
  (0x10000, 0x10FFFF),
]


def random_text(rng, n):
  pools = rng.integers(0, len(_POOLS), size=n)
  cps = [int(rng.integers(_POOLS[p][0], _POOLS[p][1] + 1)) for p in pools]
  cps = [c if not 0xD800 <= c <= 0xDFFF else 0x41 for c in cps]
  return ''.join(map(chr, cps)) + '\x00\r\n\te\u0301\U0001f468\u200d\U0001f469'


@pytest.fixture(scope='module')
def small_corpus():
  return stdlib_corpus(max_bytes=120_000)


@pytest.mark.parametrize('n', [0, 1, 7, 333])
def test_byte_round_trip_unicode(n):
  rng = np.random.default_rng(n)
  tok = ByteTokenizer()
  for _ in range(5):
    text = random_text(rng, n)
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, np.frombuffer(text.encode('utf-8'), np.uint8))
    assert tok.decode(ids) == text


def test_byte_decode_arbitrary_bytes():
  rng = np.random.default_rng(0)
  tok = ByteTokenizer()
  for n in (1, 7, 333):
    raw = rng.integers(0, 256, size=n).astype(np.uint8).tobytes()
    assert tok.decode(np.frombuffer(raw, np.uint8)) == raw.decode('utf-8', errors='replace')


def test_byte_specials():
  tok = ByteTokenizer()
  assert tok.vocab_size == 261
  assert tok.special_ids == (256, 257, 258, 259, 260)
  assert len({tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id}) == 5
  ids = [tok.cls_id, *tok.encode('hé'), tok.sep_id, tok.unk_id, tok.pad_id]
  assert tok.decode(ids) == 'hé\ufffd'
  assert tok.decode(ids, skip_special=False) == '[CLS]hé[SEP][UNK][PAD]'
  with pytest.raises(ValueError, match='ids'):
    tok.decode([0, 261])
  with pytest.raises(ValueError, match='text'):
    tok.encode('a\ud800b')  # a lone surrogate is not Unicode text


def test_char_round_trip_and_unk():
  rng = np.random.default_rng(1)
  corpus = random_text(rng, 2000)
  tok = CharTokenizer.from_text(corpus)
  assert tok.chars == sorted(set(corpus))
  assert tok.vocab_size == 5 + len(set(corpus))
  assert tok.special_ids == (0, 1, 2, 3, 4)
  # Known characters: any string drawn from the vocabulary round-trips exactly.
  for n in (1, 7, 333):
    text = ''.join(rng.choice(tok.chars, size=n))
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.min() >= 5
    assert tok.decode(ids) == text
  # Unknown characters -> UNK, decoded as U+FFFD; known ones around them unharmed.
  unknown = next(chr(c) for c in range(0x4E00, 0x10FFFF) if chr(c) not in set(corpus))
  known = tok.chars[0]
  ids = tok.encode(known + unknown + known)
  np.testing.assert_array_equal(ids, [5, tok.unk_id, 5])
  assert tok.decode(ids) == known + '\ufffd' + known


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason='tiny Shakespeare not present')
def test_char_shakespeare_vocab_is_nanogpts():
  with open(SHAKESPEARE, encoding='utf-8') as f:
    text = f.read()
  tok = CharTokenizer.from_text(text)
  assert len(tok.chars) == 65  # nanoGPT's shakespeare_char vocab_size
  assert tok.decode(tok.encode(text[:5000])) == text[:5000]


def test_save_load_plain_files(tmp_path):
  char = CharTokenizer.from_text('hello, wörld \U0001f600\n')
  for tok, name in ((ByteTokenizer(), 'byte.json'), (char, 'char.json')):
    path = tmp_path / name
    tok.save(path)
    with open(path, encoding='utf-8') as f:
      payload = json.load(f)  # plain JSON, never pickle
    assert payload['type'] == tok.kind
    for loaded in (type(tok).load(path), load_tokenizer(path)):
      assert loaded == tok and type(loaded) is type(tok)
      np.testing.assert_array_equal(loaded.encode('hello wörld?'), tok.encode('hello wörld?'))


def test_load_errors_name_the_path(tmp_path):
  missing = tmp_path / 'nope.json'
  with pytest.raises(FileNotFoundError, match='nope.json'):
    load_tokenizer(missing)
  wrong = tmp_path / 'wrong.json'
  ByteTokenizer().save(wrong)
  with pytest.raises(ValueError, match='wrong.json'):
    CharTokenizer.load(wrong)
  garbage = tmp_path / 'garbage.model'
  garbage.write_bytes(b'\x00\x01not a model')
  with pytest.raises(ValueError, match='garbage.model'):
    load_tokenizer(garbage)
  truncated = tmp_path / 'truncated.json'
  truncated.write_text('{"type": "char", "chars": ["a"', encoding='utf-8')
  with pytest.raises(ValueError, match='truncated.json'):
    load_tokenizer(truncated)


@pytest.mark.parametrize('model_type', ['bpe', 'unigram'])
def test_sentencepiece_train_save_load(tmp_path, small_corpus, model_type):
  path = tmp_path / 'sp.model'
  tok = SentencePieceTokenizer.train(small_corpus.text('train'), 400, path, model_type=model_type)
  assert tok.vocab_size == 400
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  loaded = load_tokenizer(path)
  assert isinstance(loaded, SentencePieceTokenizer) and loaded == tok
  rng = np.random.default_rng(2)
  for text in (small_corpus.text('val'), random_text(rng, 333), 'x = [CLS] [MASK]\n\n\t  y\r\n'):
    ids = loaded.encode(text)
    np.testing.assert_array_equal(ids, tok.encode(text))
    assert ids.dtype == np.int32
    # Byte fallback: nothing is unknown, and text never encodes to a control symbol.
    assert not np.isin(ids, tok.special_ids).any()
    assert loaded.decode(ids) == text
  # Line-by-line encoding (the fast path) equals sentencepiece's whole-text encoding.
  text = small_corpus.text('val')
  np.testing.assert_array_equal(tok.encode(text), tok._sp.encode(text))
  assert tok.decode([tok.cls_id, *tok.encode('ab'), tok.mask_id], skip_special=False) == '[CLS]ab[MASK]'


def test_sentencepiece_errors(tmp_path):
  with pytest.raises(ValueError, match='vocab_size'):
    SentencePieceTokenizer.train('some text\n', 10)
  with pytest.raises(ValueError, match='model_type'):
    SentencePieceTokenizer.train('some text\n', 400, model_type='wordpiece')
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    SentencePieceTokenizer.train([tmp_path / 'missing.txt'], 400)
  bad = tmp_path / 'latin1.txt'
  bad.write_bytes('caf\xe9\n'.encode('latin-1'))
  with pytest.raises(ValueError, match=r'latin1\.txt.*offset 3'):
    SentencePieceTokenizer.train([bad], 400)


def test_make_tokenizer_saves_and_reloads(tmp_path, small_corpus):
  text = small_corpus.text('train')
  char = make_tokenizer('char', text, tmp_path)
  assert (tmp_path / 'tokenizer.json').is_file()
  # A resumed run reloads the saved vocabulary, whatever text it is given.
  again = make_tokenizer('char', 'completely different', tmp_path)
  assert again == char
  with pytest.raises(ValueError, match='tokenizer.json'):
    make_tokenizer('byte', None, tmp_path / 'tokenizer.json')
  assert make_tokenizer('byte') == ByteTokenizer()
  make_tokenizer('byte', None, tmp_path / 'run.v2')  # a workdir with a dot in its name is still a folder
  assert (tmp_path / 'run.v2' / 'tokenizer.json').is_file()
  spm_dir = tmp_path / 'spm'
  sp = make_tokenizer('bpe', text, spm_dir, vocab_size=400)
  assert (spm_dir / 'tokenizer.model').is_file() and sp.vocab_size == 400
  assert make_tokenizer('sentencepiece', None, spm_dir) == sp
  with pytest.raises(ValueError, match='vocab_size'):
    make_tokenizer('byte', vocab_size=300)
  with pytest.raises(ValueError, match='kind'):
    make_tokenizer('wordpiece', text)
  with pytest.raises(ValueError, match='corpus_text'):
    make_tokenizer('char', '')
