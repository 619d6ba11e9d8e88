"""Corpora, batchers (LM, MLM, NSP, classification) and the stdlib classification task.

Batchers are checked on token streams whose ids encode their positions (np.arange), so every window,
lane and segment can be verified exactly, not just by shape.
"""

import os

import numpy as np
import pytest

from lstm_attn.data import (
  BertBatcher,
  ByteTokenizer,
  ClassificationBatcher,
  LMBatcher,
  MLMBatcher,
  NSPBatcher,
  classification_eval_batches,
  eval_batches,
  load_corpus,
  mlm_mask,
  split_by_file,
  stdlib_classification_task,
  stdlib_corpus,
  stdlib_files,
)

SHAKESPEARE = '/work/shared/data/tinyshakespeare.txt'
SPLITS = ('train', 'val', 'test')


class FakeTokenizer:
  """Ids 0..n-1 are 'text'; the five specials follow, so positions in np.arange(n) streams stay readable."""

  def __init__(self, n):
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = n, n + 1, n + 2, n + 3, n + 4
    self.vocab_size = n + 5
    self.special_ids = tuple(range(n, n + 5))


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def check_resume(make, k=5, more=3):
  """State after k batches, restored into a fresh batcher (through numpy scalars, as a checkpoint gives it
  back): the next batches are identical to the uninterrupted run's."""
  ref = make()
  for _ in range(k):
    ref.next()
  state = ref.state()
  assert all(isinstance(v, int) for v in state.values()) and state['step'] == k
  fresh = make()
  fresh.restore({key: np.asarray(v) for key, v in state.items()})
  for _ in range(more):
    assert_batches_equal(fresh.next(), ref.next())
  # batch(i) is a pure function of (seed, i): out of order gives the same batches.
  assert_batches_equal(make().batch(k + 1), fresh.batch(k + 1))


# ----------------------------------------------------------------------------------------------- corpora


def test_stdlib_corpus_deterministic_and_split_by_file():
  a, b = stdlib_corpus(max_bytes=150_000), stdlib_corpus(max_bytes=150_000)
  for split in SPLITS:
    assert a.documents(split) == b.documents(split) and a.documents(split)
    assert a.info['files'][split] == b.info['files'][split]
  files = [set(a.info['files'][s]) for s in SPLITS]
  assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
  total = sum(len(d.encode('utf-8')) for s in SPLITS for d in a.documents(s))
  assert 0.95 * 150_000 <= total <= 150_000
  assert a.text('val') == '\n\n'.join(a.val)


def test_stdlib_files_exclusions_and_full_split():
  rels = stdlib_files()
  assert len(rels) > 100 and any(r.startswith('asyncio/') for r in rels)
  for r in rels:
    parts = r.split('/')
    assert r.endswith('.py')
    assert not {'test', 'tests', 'idle_test', 'site-packages'} & set(parts[:-1]), r
  splits = split_by_file(rels)
  assert sorted(sum(splits.values(), [])) == rels  # every file in exactly one split
  fractions = [len(splits[s]) / len(rels) for s in SPLITS]
  assert 0.85 < fractions[0] < 0.95 and fractions[1] > 0.02 and fractions[2] > 0.02


@pytest.mark.parametrize('n', [3, 4, 7])
def test_split_by_file_few_files(n):
  rels = [f'f{i}.txt' for i in range(n)]
  splits = split_by_file(rels)
  assert all(splits[s] for s in SPLITS)
  assert sorted(sum(splits.values(), [])) == sorted(rels)
  with pytest.raises(ValueError, match='at least 3'):
    split_by_file(rels[:2])


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason='tiny Shakespeare not present')
def test_shakespeare_nanogpt_split():
  c = load_corpus(SHAKESPEARE)
  assert (c.num_chars('train'), c.num_chars('val')) == (1_003_854, 111_540)  # nanoGPT's figures
  assert c.test == c.val and c.info['test_is_val']
  with open(SHAKESPEARE, encoding='utf-8') as f:
    assert c.train[0] + c.val[0] == f.read()


def test_folder_corpus(tmp_path):
  names = [f'doc{i}.txt' for i in range(7)] + ['sub/deep.txt']
  for i, name in enumerate(names):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text(f'document {i} ' * 20, encoding='utf-8')
  (tmp_path / '.hidden').write_text('never read', encoding='utf-8')
  c = load_corpus(tmp_path)
  files = [c.info['files'][s] for s in SPLITS]
  assert sorted(sum(files, [])) == sorted(names)
  assert all(files) and all(c.documents(s) for s in SPLITS)
  assert load_corpus(tmp_path).info['files'] == c.info['files']


def test_bad_corpora_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    load_corpus(tmp_path / 'missing.txt')
  empty = tmp_path / 'empty.txt'
  empty.write_text('  \n', encoding='utf-8')
  with pytest.raises(ValueError, match='empty.txt'):
    load_corpus(empty)
  bad = tmp_path / 'latin1.txt'
  bad.write_bytes('naïve text'.encode('latin-1'))
  with pytest.raises(ValueError, match=r'latin1\.txt.*byte offset 2.*UTF-8'):
    load_corpus(bad)
  folder = tmp_path / 'folder'
  folder.mkdir()
  with pytest.raises(ValueError, match='folder'):
    load_corpus(folder)  # no files
  for i in range(4):
    (folder / f'{i}.txt').write_text('text ' * 10, encoding='utf-8')
  (folder / 'bad.txt').write_bytes(b'ok so far \xff\xfe')
  with pytest.raises(ValueError, match=r'bad\.txt.*byte offset 10'):
    load_corpus(folder)
  few = tmp_path / 'few'
  few.mkdir()
  (few / 'a.txt').write_text('text', encoding='utf-8')
  with pytest.raises(ValueError, match='few'):
    load_corpus(few)
  with pytest.raises(ValueError, match='max_bytes'):
    load_corpus(None, max_bytes=-5)


# -------------------------------------------------------------------------------------------------- LM


@pytest.mark.parametrize('mode', ['random', 'sequential'])
def test_lm_batcher_windows_and_resume(mode):
  n, bsz, seq = 333, 7, 10
  tokens = np.arange(n, dtype=np.int32)
  make = lambda seed=3: LMBatcher(tokens, bsz, seq, seed=seed, mode=mode)
  lm = make()
  batches = [lm.next() for _ in range(12)]
  for b in batches:
    assert b['inputs'].shape == b['targets'].shape == (bsz, seq) and b['inputs'].dtype == np.int32
    np.testing.assert_array_equal(b['targets'], b['inputs'] + 1)  # next token
    np.testing.assert_array_equal(np.diff(b['inputs'], axis=1), 1)  # contiguous windows
    assert b['targets'].max() <= n - 1
  if mode == 'random':
    starts = np.concatenate([make().batch(i)['inputs'][:, 0] for i in range(200)])
    assert starts.min() == 0 and starts.max() == n - seq - 1  # nanoGPT: randint(len(data) - block_size)
    assert not np.array_equal(make(seed=4).batch(0)['inputs'], batches[0]['inputs'])
  else:
    lane = (n - 1) // bsz
    assert lm.steps_per_epoch == lane // seq
    for i in range(1, lm.steps_per_epoch):  # row b of batch i continues row b of batch i - 1
      np.testing.assert_array_equal(batches[i]['inputs'][:, 0], batches[i - 1]['inputs'][:, -1] + 1)
    np.testing.assert_array_equal(batches[0]['inputs'][:, 0], np.arange(bsz) * lane)
    assert_batches_equal(batches[lm.steps_per_epoch], batches[0])  # wraps after an epoch
    assert lm.epoch(lm.steps_per_epoch) == 1
  check_resume(make)


def test_lm_batcher_bad_input_and_foreign_state():
  tokens = np.arange(50)
  with pytest.raises(ValueError, match='seq_len'):
    LMBatcher(tokens, 2, 50, seed=0)
  with pytest.raises(ValueError, match='mode'):
    LMBatcher(tokens, 2, 8, seed=0, mode='shuffle')
  with pytest.raises(ValueError, match='tokens'):
    LMBatcher(tokens.reshape(5, 10), 2, 8, seed=0)
  with pytest.raises(ValueError, match='seed'):
    LMBatcher(tokens, 2, 8, seed=-1)
  state = LMBatcher(tokens, 2, 8, seed=0).state()
  with pytest.raises(ValueError, match='num_tokens'):
    LMBatcher(np.arange(60), 2, 8, seed=0).restore(state)
  with pytest.raises(ValueError, match='seed'):
    LMBatcher(tokens, 2, 8, seed=1).restore(state)
  with pytest.raises(ValueError, match='missing'):
    LMBatcher(tokens, 2, 8, seed=0).restore({'step': 3})


@pytest.mark.parametrize('contiguous', [False, True])
@pytest.mark.parametrize('n', [2, 71, 333])
def test_eval_batches_count_every_target_once(n, contiguous):
  bsz, seq = 7, 10
  tokens = np.arange(n, dtype=np.int32)
  batches = list(eval_batches(tokens, bsz, seq, contiguous=contiguous, pad_id=-1))
  got = []
  for b in batches:
    assert b['inputs'].shape == b['targets'].shape == b['weights'].shape == (bsz, seq)
    w = b['weights'] > 0
    np.testing.assert_array_equal(b['targets'][w], b['inputs'][w] + 1)
    assert (b['targets'][~w] == -1).all()
    got.append(b['targets'][w])
  np.testing.assert_array_equal(np.sort(np.concatenate(got)), np.arange(1, n))  # each target exactly once
  if contiguous and len(batches) > 1:
    first, second = batches[0], batches[1]
    rows = second['weights'][:, 0] > 0
    np.testing.assert_array_equal(second['inputs'][rows, 0], first['inputs'][rows, -1] + 1)


# ------------------------------------------------------------------------------------------ MLM and NSP


def test_mlm_mask_statistics():
  rng = np.random.default_rng(0)
  n_text = 1000
  tok = FakeTokenizer(n_text)
  tokens = rng.integers(0, n_text, size=(400, 500))
  specials = rng.random(tokens.shape) < 0.1
  tokens[specials] = rng.choice(tok.special_ids, size=specials.sum())
  out = mlm_mask(tokens, rng, vocab_size=tok.vocab_size, mask_id=tok.mask_id, special_ids=tok.special_ids)
  sel = out['weights'] > 0
  np.testing.assert_array_equal(out['targets'], tokens)
  assert not sel[specials].any()  # specials are never selected
  np.testing.assert_array_equal(out['inputs'][specials], tokens[specials])  # nor changed
  np.testing.assert_array_equal(out['inputs'][~sel], tokens[~sel])
  n_sel = sel.sum()
  # Binomial standard deviations: ~0.0006 for the 15%, ~0.003 for the 80/10/10 shares; 6 sigma bounds.
  assert abs(n_sel / (~specials).sum() - 0.15) < 0.004
  masked = out['inputs'][sel] == tok.mask_id
  changed = (out['inputs'][sel] != tokens[sel]) & ~masked
  kept = out['inputs'][sel] == tokens[sel]
  p_same = 1 / n_text  # a random replacement may draw the original id
  assert abs(masked.mean() - 0.8) < 0.018
  assert abs(changed.mean() - 0.1 * (1 - p_same)) < 0.012
  assert abs(kept.mean() - 0.1 * (1 + p_same)) < 0.012
  assert not np.isin(out['inputs'][sel][~masked], tok.special_ids).any()  # random ids are never specials
  assert out['inputs'].dtype == out['targets'].dtype == np.int32 and out['weights'].dtype == np.float32


def _doc_docs(lengths):
  """Documents whose ids are disjoint ranges of one arange, so a segment reveals its document and place."""
  starts = np.concatenate([[0], np.cumsum(lengths)])
  return [np.arange(starts[i], starts[i + 1]) for i in range(len(lengths))], starts


def _pairs(batch, tok):
  """Yields (label, A, B, seq_length) per row of an unmasked NSP batch, checking the row's layout."""
  for row, types, length, label in zip(
    batch['targets'], batch['token_type_ids'], batch['seq_lengths'], batch['nsp_labels']
  ):
    assert row[0] == tok.cls_id
    seps = np.flatnonzero(row == tok.sep_id)
    assert len(seps) == 2 and seps[1] == length - 1
    np.testing.assert_array_equal(types[: seps[0] + 1], 0)
    np.testing.assert_array_equal(types[seps[0] + 1 : length], 1)
    assert (row[length:] == tok.pad_id).all() and (types[length:] == 0).all()
    yield label, row[1 : seps[0]], row[seps[0] + 1 : length - 1], length


@pytest.mark.parametrize('lengths', [[40, 7, 333, 90, 2, 150], [2000]])
def test_nsp_pairs_and_balance(lengths):
  docs, starts = _doc_docs(lengths)
  tok = FakeTokenizer(int(starts[-1]))
  bsz, seq = 8, 37
  make = lambda: NSPBatcher(docs, bsz, seq, seed=5, tokenizer=tok)
  nsp = make()
  labels = []
  for _ in range(60):
    batch = nsp.next()
    assert (batch['nsp_labels'] == 1).sum() == bsz // 2  # exactly balanced per batch
    np.testing.assert_array_equal(batch['inputs'], batch['targets'])  # mask_rate=0
    for label, a, b, _ in _pairs(batch, tok):
      labels.append(label)
      assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= seq - 3
      np.testing.assert_array_equal(np.diff(a), 1)  # contiguous spans of one document
      np.testing.assert_array_equal(np.diff(b), 1)
      doc_a, doc_b = (np.searchsorted(starts, s[0], side='right') - 1 for s in (a, b))
      assert doc_a == np.searchsorted(starts, a[-1], side='right') - 1
      if label == 0:
        assert b[0] == a[-1] + 1  # B is what follows A
      elif len(docs) > 1:
        assert doc_b != doc_a  # random B from a different document
      else:
        assert b[0] >= a[-1] + seq - 3 or b[-1] < a[0] - (seq - 3)  # far from A in the one document
  assert np.mean(labels) == 0.5
  check_resume(make)


def test_bert_batcher_masks_pairs_not_specials():
  tok = ByteTokenizer()
  corpus = stdlib_corpus(max_bytes=60_000)
  make = lambda: BertBatcher(corpus.train, 16, 64, seed=1, tokenizer=tok)
  bert = make()
  sel_rates, labels = [], []
  for _ in range(20):
    batch = bert.next()
    labels.append(batch['nsp_labels'])
    special = np.isin(batch['targets'], tok.special_ids)
    assert not (batch['weights'][special] > 0).any()  # CLS/SEP/PAD never masked
    np.testing.assert_array_equal(batch['inputs'][special], batch['targets'][special])
    sel_rates.append(batch['weights'][~special].mean())
    # The unmasked pair is real text: for 'is next' rows, A + B is a contiguous piece of a document.
    for label, a, b, _ in _pairs(batch, tok):
      if label == 0:
        assert tok.decode(np.concatenate([a, b])).encode() in b''.join(d.encode() for d in corpus.train)
  assert abs(np.mean(sel_rates) - 0.15) < 0.02
  assert np.mean(labels) == 0.5
  check_resume(make)


def test_mlm_batcher():
  tokens = np.arange(500)
  tok = FakeTokenizer(500)
  make = lambda: MLMBatcher(tokens, 6, 33, seed=2, tokenizer=tok)
  batch = make().next()
  assert (batch['targets'][:, 0] == tok.cls_id).all() and (batch['targets'][:, -1] == tok.sep_id).all()
  np.testing.assert_array_equal(np.diff(batch['targets'][:, 1:-1], axis=1), 1)
  assert (batch['seq_lengths'] == 33).all() and (batch['token_type_ids'] == 0).all()
  assert batch['weights'][:, [0, -1]].sum() == 0
  check_resume(make)
  with pytest.raises(ValueError, match='tokenizer'):
    MLMBatcher(tokens, 6, 33, seed=2, tokenizer=object())
  with pytest.raises(ValueError, match=r'tokens: ids must be in \[0, 105\)'):  # ids past the vocabulary
    MLMBatcher(tokens, 6, 33, seed=2, tokenizer=FakeTokenizer(100))
  with pytest.raises(ValueError, match='mask_rate'):  # at construction, not at the first batch
    MLMBatcher(tokens, 6, 33, seed=2, tokenizer=tok, mask_rate=1.5)
  with pytest.raises(ValueError, match='documents: ids must be in'):
    BertBatcher([np.arange(500)], 4, 32, seed=0, tokenizer=FakeTokenizer(100))


def test_bert_single_short_document_errors():
  tok = FakeTokenizer(100)
  with pytest.raises(ValueError, match='single document'):
    BertBatcher([np.arange(100)], 4, 32, seed=0, tokenizer=tok)
  with pytest.raises(ValueError, match='documents'):
    BertBatcher([np.arange(1)], 4, 32, seed=0, tokenizer=tok)


# --------------------------------------------------------------------------------------- classification


@pytest.fixture(scope='module')
def task():
  return stdlib_classification_task(ByteTokenizer(), 48, snippets_per_class=(24, 6, 6), seed=0)


def test_classification_splits_share_no_file_and_are_balanced(task):
  tok = ByteTokenizer()
  names = task['class_names']
  assert len(names) == 10 and len(set(names)) == 10
  per_split = {s: set(sum(task['files'][s].values(), [])) for s in SPLITS}
  assert not (per_split['train'] & per_split['val'] or per_split['train'] & per_split['test'])
  assert not per_split['val'] & per_split['test']
  for split, count in zip(SPLITS, (24, 6, 6)):
    d = task[split]
    n = count * len(names)
    assert d['tokens'].shape == (n, 48) and d['tokens'].dtype == np.int32
    np.testing.assert_array_equal(np.bincount(d['labels'], minlength=len(names)), count)  # balanced
    assert set(d['sources']) <= per_split[split]
    assert len(set(zip(d['sources'], d['offsets'].tolist()))) == n == task['num_unique'][split]  # distinct
    for i in range(0, n, 7):  # a snippet is a window of its file, padded after seq_lengths
      src, off, length = d['sources'][i], d['offsets'][i], d['seq_lengths'][i]
      assert src.split('/')[0] == names[d['labels'][i]]
      with open(os.path.join(os.path.dirname(os.__file__), src), encoding='utf-8') as f:
        expected = tok.encode(f.read())[off : off + length]
      np.testing.assert_array_equal(d['tokens'][i, :length], expected)
      assert (d['tokens'][i, length:] == tok.pad_id).all()
  again = stdlib_classification_task(ByteTokenizer(), 48, snippets_per_class=(24, 6, 6), seed=0)
  np.testing.assert_array_equal(again['test']['tokens'], task['test']['tokens'])


def test_classification_add_cls_and_bad_packages():
  tok = ByteTokenizer()
  t = stdlib_classification_task(
    tok, 17, packages=['json', 'email'], snippets_per_class=3, seed=1, add_cls=True
  )
  assert t['class_names'] == ['json', 'email']
  assert (t['train']['tokens'][:, 0] == tok.cls_id).all() and t['train']['tokens'].shape == (6, 17)
  # Windows longer than every json file: one candidate per file, so snippets repeat, and num_unique says so.
  t = stdlib_classification_task(tok, 60_000, packages=['json', 'email'], snippets_per_class=4, seed=0)
  for split in SPLITS:
    d = t[split]
    assert t['num_unique'][split] == len(set(zip(d['sources'], d['offsets'].tolist()))) < 8
    assert (d['seq_lengths'][d['labels'] == 0] < 60_000).all()
  with pytest.raises(ValueError, match='no_such_package'):
    stdlib_classification_task(tok, 16, packages=['json', 'no_such_package'])
  with pytest.raises(ValueError, match='snippets_per_class'):
    stdlib_classification_task(tok, 16, snippets_per_class=0)


def test_classification_batcher_epochs_and_resume(task):
  n = 13
  split = {'tokens': np.arange(n)[:, None], 'seq_lengths': np.ones(n, np.int32), 'labels': np.arange(n)}
  make = lambda: ClassificationBatcher(split, 5, seed=7)
  b = make()
  seen = np.concatenate([b.next()['labels'] for _ in range(13)])  # 65 examples = 5 epochs
  for e in range(5):
    np.testing.assert_array_equal(np.sort(seen[e * n : (e + 1) * n]), np.arange(n))  # a permutation
  assert not np.array_equal(seen[:n], seen[n : 2 * n])  # reshuffled each epoch
  check_resume(make)
  check_resume(lambda: ClassificationBatcher(task['train'], 16, seed=0))
  evals = list(classification_eval_batches(split, 5))
  weights = np.concatenate([e['weights'] for e in evals])
  labels = np.concatenate([e['labels'] for e in evals])
  np.testing.assert_array_equal(labels[weights > 0], np.arange(n))
