"""Data for lstm_attn: tokenizers, corpora, resumable batchers and the downstream classification task.

Typical use (what the trainer does):

  corpus = load_corpus(path_or_None, max_bytes=...)          # None: this interpreter's stdlib sources
  tok = make_tokenizer('char', corpus.text('train'), workdir)  # reloaded from workdir on resume
  train = LMBatcher(tok.encode(corpus.text('train')), batch_size, seq_len, seed=seed)
  batch = train.next()                                       # {'inputs', 'targets'} int32 [batch, seq_len]
  ckpt['data'] = train.state(); ...; train.restore(ckpt['data'])
  for b in eval_batches(tok.encode(corpus.text('val')), batch_size, seq_len): ...  # + 'weights'

See each module's docstring for the exact formats.
"""

from lstm_attn.data.batching import (
  BertBatcher,
  LMBatcher,
  MLMBatcher,
  NSPBatcher,
  eval_batches,
  mlm_mask,
)
from lstm_attn.data.classification import (
  ClassificationBatcher,
  classification_eval_batches,
  stdlib_classification_task,
  stdlib_packages,
)
from lstm_attn.data.corpora import Corpus, load_corpus, split_by_file, stdlib_corpus, stdlib_files
from lstm_attn.data.tokenizers import (
  ByteTokenizer,
  CharTokenizer,
  SentencePieceTokenizer,
  load_tokenizer,
  make_tokenizer,
)

__all__ = [
  'BertBatcher',
  'ByteTokenizer',
  'CharTokenizer',
  'ClassificationBatcher',
  'Corpus',
  'LMBatcher',
  'MLMBatcher',
  'NSPBatcher',
  'SentencePieceTokenizer',
  'classification_eval_batches',
  'eval_batches',
  'load_corpus',
  'load_tokenizer',
  'make_tokenizer',
  'mlm_mask',
  'split_by_file',
  'stdlib_classification_task',
  'stdlib_corpus',
  'stdlib_files',
  'stdlib_packages',
]
