"""AWD-LSTM's randomised BPTT length: the windows, the padded step, the scaled update, config and resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close
from train_tiny import tiny_config

from lstm_attn import training
from lstm_attn.data import batching
from lstm_attn.models import build_model
from lstm_attn.training import inputs as inputs_lib

VOCAB = 61


def _epoch(b, epoch):
  """The batches of one epoch of a random-BPTT batcher."""
  return [b.batch(i) for i in range(10_000) if b.epoch(i) == epoch]


def test_windows_tile_every_lane_and_move_between_epochs():
  tokens = np.arange(3001, dtype=np.int32)  # 4 lanes of 750
  b = batching.LMBatcher(tokens, 4, 16, mode='sequential', bptt_half_prob=0.3, bptt_std=2.0)
  for epoch in (0, 1):
    batches = _epoch(b, epoch)
    lengths = [int(x['seq_lengths'][0]) for x in batches]
    assert all(5 <= n <= 16 for n in lengths) and 750 - 16 < sum(lengths) <= 750
    assert len(set(lengths)) > 3 and min(lengths) < 12  # jittered, and some half-length windows
    for x, n in zip(batches, lengths):
      assert (x['seq_lengths'] == n).all() and x['seq_lengths'].dtype == np.int32
      np.testing.assert_array_equal(x['weights'], np.broadcast_to(np.arange(16) < n, (4, 16)))
      np.testing.assert_array_equal(x['targets'][:, :n], x['inputs'][:, :n] + 1)
    for lane in range(4):  # the valid tokens of the epoch's windows are the lane, in order, once each
      read = np.concatenate([x['inputs'][lane, :n] for x, n in zip(batches, lengths)])
      np.testing.assert_array_equal(read, tokens[lane * 750 : lane * 750 + sum(lengths)])
    assert [float(x['resets'][0, 0]) for x in batches] == [1.0] + [0.0] * (len(batches) - 1)
    if epoch == 0:
      first = lengths
      assert b.mean_window_length() == pytest.approx(np.mean(lengths))  # what tok/s counts
  assert lengths != first  # each epoch draws its own lengths, so the truncation points move
  # A pure function of (seed, step): a fresh batcher read backwards gives the same batches.
  again = batching.LMBatcher(tokens, 4, 16, mode='sequential', bptt_half_prob=0.3, bptt_std=2.0)
  for i in reversed(range(60)):
    for k, v in again.batch(i).items():
      np.testing.assert_array_equal(v, b.batch(i)[k], err_msg=f'{k} at step {i}')
  # AWD's two lengths only: every window is seq_len // 2 with probability 1.
  half = batching.LMBatcher(tokens, 4, 16, mode='sequential', bptt_half_prob=1.0)
  assert {int(half.batch(i)['seq_lengths'][0]) for i in range(100)} == {8}


def test_no_reset_falls_in_the_padding():
  tokens = np.arange(801, dtype=np.int32)
  starts = np.arange(0, 800, 7)  # a document every 7 tokens
  b = batching.LMBatcher(tokens, 2, 16, mode='sequential', doc_starts=starts, bptt_half_prob=1.0)
  x = b.batch(3)
  assert x['resets'][:, 8:].sum() == 0 and x['resets'][:, :8].sum() > 0
  np.testing.assert_array_equal(x['resets'][:, :8] > 0, x['inputs'][:, :8] % 7 == 0)


def test_random_bptt_needs_sequential_streams_and_a_carry():
  tokens = np.arange(400, dtype=np.int32)
  with pytest.raises(ValueError, match="randomised BPTT lengths need mode='sequential'"):
    batching.LMBatcher(tokens, 2, 16, bptt_half_prob=0.05)
  with pytest.raises(ValueError, match='bptt_half_prob must be a number in'):
    batching.LMBatcher(tokens, 2, 16, mode='sequential', bptt_half_prob=1.5)
  with pytest.raises(ValueError, match='bptt_std must be a finite number >= 0'):
    batching.LMBatcher(tokens, 2, 16, mode='sequential', bptt_std=-1.0)
  c = tiny_config('lstm_lm', **{'data.bptt_half_prob': 0.05, 'carry_state': False})
  with pytest.raises(ValueError, match=r'config.data.bptt_half_prob=0.05 .* config.carry_state=True'):
    training.check_config(c)
  c = tiny_config('lstm_lm', **{'data.bptt_half_prob': 0.05, 'num_classes': 3})
  with pytest.raises(
    ValueError, match=r'classification run .* has no BPTT window: set --config.data.bptt_half_prob=0'
  ):
    training.check_config(c)
  c = tiny_config('lstm_lm', **{'data.bptt_std': -2.0})
  with pytest.raises(
    ValueError, match=r'config.data.bptt_std=-2.0 is invalid: it must be a finite number >= 0'
  ):
    training.check_config(c)
  training.check_config(tiny_config('lstm_lm', **{'data.bptt_half_prob': 0.05, 'data.bptt_std': 5.0}))


def test_resuming_with_other_bptt_settings_names_the_field():
  tokens = np.arange(400, dtype=np.int32)
  config = tiny_config('lstm_lm')
  saved = batching.LMBatcher(tokens, 2, 16, mode='sequential', bptt_half_prob=0.05, bptt_std=5.0)
  saved.step = 9
  fixed = inputs_lib._TrainBatcher(batching.LMBatcher(tokens, 2, 16, mode='sequential'), config)
  with pytest.raises(ValueError, match=r'config.data.bptt_half_prob was 0.05 when the checkpoint was saved'):
    fixed.restore(saved.state())
  other = batching.LMBatcher(tokens, 2, 16, mode='sequential', bptt_half_prob=0.05, bptt_std=2.0)
  with pytest.raises(ValueError, match=r'config.data.bptt_std was 5 when .* and is 2 now'):
    inputs_lib._TrainBatcher(other, config).restore(saved.state())
  with pytest.raises(ValueError, match=r'config.data.bptt_half_prob was 0 when .* is 0.05 now'):
    inputs_lib._TrainBatcher(saved, config).restore(fixed.state())
  same = batching.LMBatcher(tokens, 2, 16, mode='sequential', bptt_half_prob=0.05, bptt_std=5.0)
  inputs_lib._TrainBatcher(same, config).restore(saved.state())
  assert same.step == 9
  # The batcher itself refuses either direction too (its random-BPTT identity is saved only when on).
  with pytest.raises(
    ValueError, match='bptt_half_prob_ppm=50000 but this LMBatcher has bptt_half_prob_ppm=0'
  ):
    batching.LMBatcher(tokens, 2, 16, mode='sequential').restore(saved.state())
  with pytest.raises(
    ValueError, match='bptt_half_prob_ppm=0 but this LMBatcher has bptt_half_prob_ppm=50000'
  ):
    same.restore(batching.LMBatcher(tokens, 2, 16, mode='sequential').state())


def test_a_reset_in_the_padding_leaves_the_state_alone():
  from lstm_attn import lstm as lstm_lib

  params = lstm_lib.init_lstm(jax.random.key(0), 3, 4)
  x = jax.random.normal(jax.random.key(1), (1, 6, 3))
  lengths = jnp.array([3])
  resets = jnp.zeros((1, 6), bool).at[0, 4].set(True)  # at a padded step
  _, want = lstm_lib.lstm(params, x, seq_lengths=lengths)
  _, got = lstm_lib.lstm(params, x, seq_lengths=lengths, resets=resets)
  assert float(jnp.abs(want.h).min()) > 0
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('name', ['lstm_lm', 'lstm_attn'])
def test_a_padded_window_is_the_short_window_with_a_scaled_update(name):
  """A step on a window of L of T tokens (padded, seq_lengths = L) == the same step on the L tokens alone:
  the same loss (AR/TAR included), the same final carry, and L / T of its parameter update."""
  overrides = {'model.dropout' if name == 'lstm_attn' else 'model.input_dropout': 0.0}
  if name == 'lstm_lm':
    overrides.update({'model.activation_reg': 2.0, 'model.temporal_activation_reg': 1.0})
  c = tiny_config(name, **overrides)
  steps = training.build_steps(c, lambda r: build_model(c, vocab_size=VOCAB, rngs=r))
  state = steps.init()
  rng = np.random.default_rng(0)
  seq, n = 16, 9
  tokens = rng.integers(0, VOCAB, (4, seq + 1)).astype(np.int32)
  resets = np.zeros((4, seq), np.float32)
  resets[:, 0], resets[1, 4] = 1.0, 1.0  # lane 1 starts a document inside the window
  padded = {
    'inputs': tokens[:, :-1],
    'targets': tokens[:, 1:],
    'resets': resets,
    'seq_lengths': np.full(4, n, np.int32),
    'weights': np.broadcast_to(np.arange(seq) < n, (4, seq)).astype(np.float32),
  }
  short = {'inputs': tokens[:, :n], 'targets': tokens[:, 1 : n + 1], 'resets': resets[:, :n]}
  # SGD at lr 1 (the update is minus the gradient; Adam's g / (|g| + eps) would blur tiny gradients), and
  # not donating `state`: both steps start from it.
  pure = dataclasses.replace(steps.pure, tx=optax.sgd(1.0))
  state = {**state, 'opt_state': pure.tx.init(state['params'])}
  step = jax.jit(pure.train_step)
  after_padded, m_padded = step(state, padded)
  after_short, m_short = step(state, short)
  assert_close(m_padded['loss'], m_short['loss'], tol=1e-6, what='loss')
  if name == 'lstm_lm':
    assert float(m_short['penalty']) > 0
    assert_close(m_padded['penalty'], m_short['penalty'], tol=1e-6, what='AR + TAR')
  for got, want in zip(jax.tree.leaves(after_padded['carry']), jax.tree.leaves(after_short['carry'])):
    assert_close(got, want, tol=1e-6, what='final carry')

  def update(after):
    moved = jax.tree.map(jnp.subtract, after['params'], state['params'])
    return jnp.concatenate([x.ravel() for x in jax.tree.leaves(moved)])

  full = update(after_short)
  assert float(jnp.abs(full).max()) > 0
  assert_close(update(after_padded), full * n / seq, tol=1e-4, what='update, padded vs short')


def test_training_with_random_bptt_resumes_exactly(tmp_path, monkeypatch):
  """Stopped after step 4 and resumed == run through: the batcher position, the window lengths and the
  carry all come back (the losses of steps 5-6 depend on them)."""
  import test_train

  c = tiny_config('lstm_lm', steps=6, **{'data.bptt_half_prob': 0.5, 'data.bptt_std': 3.0})
  full, _ = test_train.assert_resume_is_exact(c, tmp_path, monkeypatch, stop_after=4)
  assert np.isfinite(full['val_loss'])
  c.num_train_steps, c.data.bptt_std = 8, 1.0
  with pytest.raises(
    ValueError, match=r'different experiment \(config.data.bptt_std was 3.0 there, is 1.0 now\)'
  ):
    training.train_and_evaluate(c, str(tmp_path / 'resumed'))
