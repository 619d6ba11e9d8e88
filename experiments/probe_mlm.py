r"""Does a pre-trained BERT read its context? MLM accuracy with the context intact, shuffled and masked.

A masked-LM that predicts from its context scores far lower once the unmasked tokens around each masked
one are shuffled within their row; one stuck on the unigram plateau (it predicts frequent tokens whatever
it reads) scores the same. Three scores on the same masked val batch (BERT's 15%: 80/10/10):

  intact     the batch as the model was trained on it;
  shuffled   every unmasked token of a row moved to a random unmasked position of that row;
  no context every unmasked token replaced by [MASK] ([CLS]/[SEP] kept): the unigram prior alone.

    python experiments/probe_mlm.py --workdir=/tmp/lstm_attn/bert_mlm

Read-only: the workdir's latest checkpoint and its tokenizer; nothing is written.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from lstm_attn import cli
from lstm_attn.data import batching, corpora
from lstm_attn.data.tokenizers import load_tokenizer
from lstm_attn.models import build_model
from lstm_attn.training import checkpointing, transfer
from lstm_attn.training.config import complete_config

FLAGS = flags.FLAGS


def define_flags():
  """The command line (defined when run as a script, so that importing this module defines no flags)."""
  flags.DEFINE_string('workdir', None, 'Workdir of a BERT pre-training run (bert_mlm.py).')
  flags.DEFINE_integer('rows', 64, 'Val rows to score.', lower_bound=1)
  flags.DEFINE_integer('seed', 0, 'Seed of the masking and the shuffles.')
  flags.mark_flag_as_required('workdir')


def load_mlm(workdir: str):
  """(config, tokenizer, model in eval mode) from the latest checkpoint of a BERT run in `workdir`."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  meta = checkpointing.peek_meta(ckpt_dir) if os.path.isdir(ckpt_dir) else None
  if meta is None:
    raise FileNotFoundError(
      f'--workdir={workdir!r} has no checkpoint: give the workdir of a bert_mlm.py run.'
    )
  config = complete_config(meta['config'])
  if config.model.name != 'bert' or config.get('num_classes'):
    raise ValueError(f'--workdir={workdir!r} trained {config.model.name!r}, not a BERT MLM pre-training run.')
  tokenizer = load_tokenizer(checkpointing.resolve_in_workdir(meta['tokenizer'], workdir))
  model = build_model(config, vocab_size=tokenizer.vocab_size, rngs=nnx.Rngs(0))
  raw, _ = checkpointing.load_params(workdir)
  params, _, fresh, _ = transfer.transfer_params(nnx.state(model, nnx.Param), raw, '')
  if fresh:
    raise ValueError(f'the checkpoint in {workdir!r} lacks {fresh}: is it a run of this code version?')
  nnx.update(model, params)
  model.eval()
  return config, tokenizer, model


def probe(model, tokenizer, batch: dict, rng: np.random.Generator) -> dict[str, float]:
  """MLM accuracy on batch's masked positions with its context intact, shuffled and replaced by [MASK]."""
  inputs, weights = batch['inputs'], batch['weights']  # [rows, seq_len]
  special = np.isin(inputs, list(tokenizer.special_ids))
  context = (weights == 0) & ~special  # unmasked, non-special tokens

  def accuracy(tokens):
    logits, _ = model(
      jnp.asarray(tokens), jnp.asarray(batch['token_type_ids']), seq_lengths=jnp.asarray(batch['seq_lengths'])
    )  # [rows, seq_len, vocab]
    hit = np.asarray(jnp.argmax(logits, -1)) == batch['targets']
    return float((hit * weights).sum() / weights.sum())

  shuffled = inputs.copy()
  for row in range(len(inputs)):
    where = np.flatnonzero(context[row])
    shuffled[row, where] = inputs[row, rng.permutation(where)]
  no_context = np.where(context, tokenizer.mask_id, inputs)
  return {'intact': accuracy(inputs), 'shuffled': accuracy(shuffled), 'no_context': accuracy(no_context)}


def main(argv):
  del argv
  config, tokenizer, model = load_mlm(FLAGS.workdir)
  corpus = corpora.load_corpus(config.data.path or None, max_bytes=config.data.max_bytes)
  tokens = tokenizer.encode(corpus.text('val'))
  batch = batching.MLMBatcher(
    tokens, FLAGS.rows, config.data.seq_len, seed=FLAGS.seed, tokenizer=tokenizer
  ).batch(0)
  scores = probe(model, tokenizer, batch, np.random.default_rng(FLAGS.seed))
  print(f'MLM accuracy on {int(batch["weights"].sum())} masked val tokens of {FLAGS.workdir}:')
  for name, value in scores.items():
    print(f'  {name:10s} {value:.3f}')


if __name__ == '__main__':
  define_flags()
  cli.run_main(main)
