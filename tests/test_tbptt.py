"""Truncated BPTT: the LSTM state carried across batches in training and evaluation, resets, resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close
from train_tiny import tiny_config, train_losses

from lstm_attn import training
from lstm_attn.data import batching
from lstm_attn.models import build_model
from lstm_attn.training import steps as steps_lib

VOCAB = 61


def _steps(name='lstm_lm', **overrides):
  c = tiny_config(name, **overrides)
  c.model.update(
    {'input_dropout': 0.0} if name == 'lstm_lm' else {'dropout': 0.0}
  )  # deterministic: train mode == eval mode
  return c, training.build_steps(c, lambda r: build_model(c, vocab_size=VOCAB, rngs=r))


def _lane_batches(rng, batch, seq_len, n, resets):
  """n consecutive batches of `batch` lanes; resets[i] [B]: restart lane b at the start of batch i."""
  tokens = rng.integers(0, VOCAB, (batch, n * seq_len + 1)).astype(np.int32)  # [B, n*T + 1]
  out = []
  for i in range(n):
    r = np.zeros((batch, seq_len), np.float32)
    r[:, 0] = resets[i]
    cols = slice(i * seq_len, (i + 1) * seq_len)
    out.append({'inputs': tokens[:, cols], 'targets': tokens[:, i * seq_len + 1 : (i + 1) * seq_len + 1],
                'resets': r})  # fmt: skip
  return out


@pytest.mark.parametrize('name', ['lstm_lm', 'lstm_attn'])
def test_train_step_starts_from_the_last_carry_and_resets_per_stream(name):
  c, steps = _steps(name)
  state = steps.init()
  b1, b2 = _lane_batches(np.random.default_rng(0), 4, 16, 2, [[1, 1, 1, 1], [1, 0, 0, 1]])
  zero = steps.zero_carry(4)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state['carry']))
  params1 = state['params']
  forward = jax.jit(lambda st, x, c: steps.model(st).forward(x, carry=c)[1])  # the final carry
  want1 = forward(state, jnp.asarray(b1['inputs']), zero)
  state, _ = steps.train_step(state, b1)
  for got, want in zip(jax.tree.leaves(state['carry']), jax.tree.leaves(want1)):
    assert_close(got, want, what='carry after step 1')
  # Step 2 continues rows 1 and 2 and restarts rows 0 and 3.
  keep = jnp.asarray([0.0, 1.0, 1.0, 0.0])[None, :, None]
  start2 = jax.tree.map(lambda a: a * keep, want1)
  want2 = forward(state, jnp.asarray(b2['inputs']), start2)
  state, _ = steps.train_step(state, b2)
  for got, want in zip(jax.tree.leaves(state['carry']), jax.tree.leaves(want2)):
    assert_close(got, want, what='carry after step 2')
  assert params1 is not state['params']


def test_grad_accumulation_splits_the_streams_and_their_carries():
  """SGD (lr 1): the update is the gradient; 2 micro-batches of 2 streams each == one batch of 4."""
  _, steps = _steps('lstm_lm')
  state0 = steps.init()
  b1, b2 = _lane_batches(np.random.default_rng(1), 4, 16, 2, [[1] * 4, [0] * 4])
  results = []
  for accum in (1, 2):
    pure = dataclasses.replace(steps.pure, tx=optax.sgd(1.0), grad_accum_steps=accum)
    step = jax.jit(pure.train_step)
    state = {**state0, 'opt_state': pure.tx.init(state0['params'])}
    state, _ = step(state, b1)
    before = state['params']
    state, metrics = step(state, b2)  # starts from step 1's carry
    update = jax.tree.map(jnp.subtract, state['params'], before)
    results.append((jnp.concatenate([x.ravel() for x in jax.tree.leaves(update)]), state['carry'], metrics))
  (u1, c1, m1), (u2, c2, m2) = results
  assert_close(u2, u1, what='gradient from carried state, 2 micro-batches vs 1')
  for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c2)):
    assert_close(b, a, what='final carry')
  assert_close(m2['loss'], m1['loss'], what='loss')


def test_stateful_evaluation_equals_one_pass_over_each_lane():
  """Contiguous eval batches with the carry threaded == the model run once over each whole lane."""
  _, steps = _steps('lstm_lm')
  state = steps.init()
  # Larger weights than at init, so the model's predictions depend on its context.
  state['params'] = jax.tree.map(lambda p: 4 * p, state['params'])
  tokens = np.random.default_rng(2).integers(0, VOCAB, 3 * 40 + 1).astype(np.int32)  # 3 lanes of 40
  got = steps_lib.evaluate(steps, state, batching.eval_batches(tokens, 3, 16, contiguous=True))
  lanes_in = tokens[:-1].reshape(3, 40)
  lanes_out = tokens[1:].reshape(3, 40)
  logits = jax.jit(lambda st, x: steps.model(st)(x))(state, jnp.asarray(lanes_in))
  logits = np.asarray(logits, np.float64)  # [3, 40, V]
  top = logits.max(-1, keepdims=True)
  logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  picked = np.take_along_axis(logits, lanes_out[..., None], axis=-1)[..., 0]
  want = float(np.mean(logz - picked))
  assert got['tokens'] == 120
  np.testing.assert_allclose(got['loss'], want, rtol=1e-5)
  # Without the carry each window restarts from zero: another number (the carry is really threaded).
  stateless = dataclasses.replace(steps, pure=dataclasses.replace(steps.pure, carries_state=False))
  windows = steps_lib.evaluate(stateless, state, batching.eval_batches(tokens, 3, 16, contiguous=True))
  assert abs(windows['loss'] - want) > 1e-2


def test_sequential_batches_flag_the_epoch_start():
  b = batching.LMBatcher(np.arange(200, dtype=np.int32), 4, 8, mode='sequential')
  assert b.steps_per_epoch == 6
  resets = [b.batch(i)['resets'] for i in range(13)]
  assert [float(r[0, 0]) for r in resets] == [1, 0, 0, 0, 0, 0] * 2 + [1]
  assert all(float(r[:, 1:].sum()) == 0 and float(r[1:, 0].sum()) == 3 * r[0, 0] for r in resets)
  assert 'resets' not in batching.LMBatcher(np.arange(200, dtype=np.int32), 4, 8).batch(0)
  # Documents starting at tokens 10 and 60: lane 0 (tokens 0..48) sees 10 at step 1, offset 2;
  # lane 1 (tokens 49..97) sees 60 at step 1, offset 3.
  d = batching.LMBatcher(np.arange(200, dtype=np.int32), 4, 8, mode='sequential', doc_starts=[0, 10, 60])
  r = d.batch(1)['resets']
  assert d.batch(1)['inputs'][0, 2] == 10 and d.batch(1)['inputs'][1, 3] == 60
  assert np.argwhere(r).tolist() == [[0, 2], [1, 3]]
  e = list(batching.eval_batches(np.arange(50, dtype=np.int32), 2, 8, contiguous=True, doc_starts=[0, 30]))
  assert [np.argwhere(b['resets']).tolist() for b in e] == [[[0, 0], [1, 5]], [], [], []]  # lanes of 25


def test_carry_state_config_checks():
  c = tiny_config('gpt')
  c.carry_state = True
  with pytest.raises(ValueError, match=r"config.carry_state=True but config.model.name='gpt'"):
    training.check_config(c)
  c = tiny_config('lstm_lm')
  assert c.carry_state and c.data.mode == 'sequential'  # the default of the families that carry state
  c.data.mode = 'random'
  with pytest.raises(ValueError, match='config.data.mode=sequential'):
    training.check_config(c)


def test_resume_with_carried_state_is_exact(tmp_path, monkeypatch):
  """The carry is part of the checkpoint: a run stopped after step 5 and resumed matches one that ran
  through, bit for bit (the losses of steps 5-7 depend on the carry restored at step 4)."""
  import test_train

  test_train.assert_resume_is_exact(tiny_config('lstm_lm', steps=7), tmp_path, monkeypatch, stop_after=5)


def test_documents_encode_as_the_joined_text_with_their_start_positions():
  from lstm_attn.data.corpora import Corpus
  from lstm_attn.data.tokenizers import ByteTokenizer
  from lstm_attn.training import inputs

  docs = ['first doc', 'é second', 'x']
  corpus = Corpus('t', docs, docs[:1], docs[:1])
  tok = ByteTokenizer()
  ids, starts = inputs._encode(tok, corpus, 'train')
  np.testing.assert_array_equal(ids, tok.encode(corpus.text('train')))
  assert starts.tolist() == [0, 11, 22]  # 'first doc' 9 bytes + the 2-byte separator; 'é second' 9 bytes
  assert [int(ids[s]) for s in starts] == [tok.encode(d)[0] for d in docs]


def test_a_workdir_saved_before_carried_state_resumes_and_samples(tmp_path):
  """Checkpoints whose meta predates carry_state and the AWD fields (as 945b42c's trainer wrote them, no
  checksums): the same run resumes (no 'different experiment'), and their config completes stateless."""
  import json
  import os

  from lstm_attn.training.config import complete_config

  c = tiny_config('lstm_lm', steps=4)
  c.carry_state, c.data.mode = False, 'random'
  training.train_and_evaluate(c, str(tmp_path))
  new_fields = ('weight_drop', 'activation_reg', 'temporal_activation_reg', 'embed_init')
  ckpt_dir = tmp_path / 'checkpoints'
  for step in (d for d in os.listdir(ckpt_dir) if d.isdigit()):
    path = ckpt_dir / step / 'meta' / 'metadata'
    meta = json.loads(path.read_text())
    meta.pop('checksums', None)
    del meta['config']['carry_state']
    for section in (meta['config'], meta['fingerprint']):
      for field in new_fields:
        del section['model'][field]
    path.write_text(json.dumps(meta))
  old = complete_config(meta['config'])
  assert old.carry_state is False and old.model.embed_init == 0.1
  c.num_train_steps = 6
  summary = training.train_and_evaluate(c, str(tmp_path))  # resumes from step 4
  assert summary['step'] == 6 and sorted(train_losses(tmp_path)) == list(range(1, 7))


def test_hybrid_attention_does_not_cross_a_document_start_inside_the_window():
  # A document starting at step 6 of a window: the hybrid's logits from there on equal those of the
  # document alone from a zero carry. (Before, the LSTM restarted but attention still read the previous
  # document's tokens.)
  c, steps = _steps('lstm_attn')
  state = steps.init()
  model = steps.model(state)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (2, 16)), jnp.int32)
  resets = np.zeros((2, 16), np.float32)
  resets[0, 6] = resets[1, 11] = 1.0
  logits, _, _ = model.train_forward(tokens, carry=steps.zero_carry(2), resets=jnp.asarray(resets))
  for row, start in ((0, 6), (1, 11)):
    alone, _, _ = model.train_forward(tokens[row : row + 1, start:], carry=steps.zero_carry(1))
    assert_close(logits[row : row + 1, start:], alone, what=f'row {row} after its document start')
  whole, _, _ = model.train_forward(tokens, carry=steps.zero_carry(2))
  assert float(jnp.abs(whole[0, 6:] - logits[0, 6:]).max()) > 1e-3  # the reset does change them
