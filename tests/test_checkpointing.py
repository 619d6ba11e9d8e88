"""lstm_attn.training.checkpointing: exact round trips (typed RNG keys included), retention, broken
checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from lstm_attn.training import checkpointing
from lstm_attn.training import optimizer as optim
from lstm_attn.training.transfer import transfer_params


class _Tiny(nnx.Module):
  def __init__(self, rngs):
    self.backbone = nnx.Linear(7, 5, rngs=rngs)
    self.norm = nnx.LayerNorm(5, rngs=rngs)
    self.head = nnx.Linear(5, 3, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.head(self.drop(self.norm(self.backbone(x))))


def _state(seed=0):
  model = _Tiny(nnx.Rngs(seed, dropout=seed + 1))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  # Move the optimizer moments off zero so a restore that drops them would be seen.
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(seed + 3), p.shape), params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {'step': jnp.int32(seed + 1), 'params': params, 'rest': rest, 'opt_state': opt_state}


def _assert_same(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def test_round_trip_is_exact_with_rng_keys_and_meta(tmp_path):
  state = _state()
  ck = checkpointing.Checkpointer(str(tmp_path / 'ck'))
  meta = {'data_state': {'step': 7, 'seed': 0}, 'config': {'a': [1, 2]}}
  ck.save(7, state, meta)
  ck.wait()
  step, restored, got_meta = ck.restore_latest_good(_abstract(state))
  ck.close()
  assert step == 7 and got_meta == meta
  _assert_same(restored, state)
  # The restored RNG stream continues exactly like the original one.
  key = restored['rest']['drop']['rngs']['key'][...]
  assert jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def test_keeps_latest_and_best_by_lowest_eval_loss(tmp_path):
  state = _state()
  ck = checkpointing.Checkpointer(str(tmp_path / 'ck'), keep_latest=2, keep_best=1, async_save=False)
  losses = {1: 3.0, 2: 1.0, 3: 2.5, 4: 2.0, 5: 4.0}  # best (lowest) at step 2
  for s, loss in losses.items():
    ck.save(s, state, {}, eval_loss=loss)
  ck.wait()
  assert ck.all_steps() == [2, 4, 5]
  assert ck.best_step() == 2
  ck.close()
  # After a restart the eval losses are still known: the best survives two more saves.
  ck = checkpointing.Checkpointer(str(tmp_path / 'ck'), keep_latest=2, keep_best=1, async_save=False)
  ck.save(6, state, {}, eval_loss=5.0)
  ck.save(7, state, {})
  ck.wait()
  assert ck.all_steps() == [2, 6, 7] and ck.best_step() == 2
  ck.close()


def _corrupt(step_dir):
  """Overwrites every array data file of a checkpoint with garbage of the same size."""
  n = 0
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    for f in files:
      if 'ocdbt' in root or f.startswith(('manifest', '_METADATA')):
        path = os.path.join(root, f)
        size = os.path.getsize(path)
        with open(path, 'wb') as fh:
          fh.write(os.urandom(max(size, 16)))
        n += 1
  assert n > 0


def test_corrupted_latest_falls_back_and_is_moved_aside(tmp_path, capsys):
  ck = checkpointing.Checkpointer(str(tmp_path / 'ck'), async_save=False)
  s1, s2 = _state(1), _state(2)
  ck.save(1, s1, {'which': 1})
  ck.save(2, s2, {'which': 2})
  ck.wait()
  _corrupt(str(tmp_path / 'ck' / '2'))
  step, restored, meta = ck.restore_latest_good(_abstract(s1))
  assert step == 1 and meta == {'which': 1}
  _assert_same(restored, s1)
  out = capsys.readouterr().out
  assert 'step 2' in out and 'could not be restored' in out and 'checkpoints_corrupted' in out
  assert ck.all_steps() == [1]
  assert len(os.listdir(tmp_path / 'checkpoints_corrupted')) == 1
  ck.save(2, s2, {'which': 2})  # the step can be written again
  ck.close()


def test_nothing_restorable_raises_and_moves_nothing(tmp_path):
  ck = checkpointing.Checkpointer(str(tmp_path / 'ck'), async_save=False)
  state = _state()
  ck.save(3, state, {})
  ck.wait()
  _corrupt(str(tmp_path / 'ck' / '3'))
  with pytest.raises(checkpointing.CheckpointError, match='step 3'):
    ck.restore_latest_good(_abstract(state))
  assert ck.all_steps() == [3]
  ck.close()


def test_non_finite_checkpoint_is_refused(tmp_path):
  ck = checkpointing.Checkpointer(str(tmp_path / 'ck'), async_save=False)
  good = _state(0)
  bad = jax.tree.map(lambda x: x, good)
  bad['params']['head']['kernel'][...] = jnp.full((5, 3), jnp.nan)
  ck.save(1, good, {})
  ck.save(2, bad, {})
  ck.wait()
  step, _, _ = ck.restore_latest_good(_abstract(good))
  assert step == 1
  ck.close()


def test_unfinished_write_is_ignored(tmp_path):
  """A step directory left as Orbax's temporary folder (process killed mid-write) is not a checkpoint."""
  ck = checkpointing.Checkpointer(str(tmp_path / 'ck'), async_save=False)
  state = _state()
  ck.save(1, state, {})
  ck.close()
  tmp = tmp_path / 'ck' / '2.orbax-checkpoint-tmp-1234'
  (tmp / 'state').mkdir(parents=True)
  (tmp / 'state' / 'junk').write_bytes(b'partial')
  ck = checkpointing.Checkpointer(str(tmp_path / 'ck'))
  assert ck.all_steps() == [1]
  step, restored, _ = ck.restore_latest_good(_abstract(state))
  assert step == 1
  _assert_same(restored, state)
  ck.close()


def test_load_params_and_transfer_only_matching(tmp_path):
  src = _state(0)
  ck = checkpointing.Checkpointer(str(tmp_path / 'run' / 'checkpoints'), async_save=False)
  ck.save(5, src, {})
  ck.close()
  raw, step = checkpointing.load_params(str(tmp_path / 'run'))
  assert step == 5
  dst = _state(9)['params']
  # A head of another shape must stay fresh even though its path matches.
  dst['head']['kernel'][...] = jnp.zeros((5, 3))
  new, restored, fresh, unused = transfer_params(dst, raw, 'backbone')
  assert sorted(restored) == ['backbone/bias', 'backbone/kernel']
  assert any(f.startswith('head/kernel') for f in fresh) and any(f.startswith('norm/') for f in fresh)
  np.testing.assert_array_equal(
    np.asarray(new['backbone']['kernel'][...]), np.asarray(src['params']['backbone']['kernel'][...])
  )
  np.testing.assert_array_equal(np.asarray(new['head']['kernel'][...]), 0.0)
  assert 'head/kernel' in unused
  with pytest.raises(FileNotFoundError, match='holds no checkpoint'):
    checkpointing.load_params(str(tmp_path / 'nowhere'))


def test_decay_mask_skips_biases_norms_embeddings():
  class M(nnx.Module):
    def __init__(self, rngs):
      self.wte = nnx.Embed(11, 4, rngs=rngs)
      self.ln_f = nnx.LayerNorm(4, rngs=rngs)
      self.fc = nnx.Linear(4, 6, rngs=rngs)

  params = nnx.state(M(nnx.Rngs(0)), nnx.Param)
  mask = {
    jax.tree_util.keystr(p): bool(v)
    for p, v in jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]
  }
  decayed = sorted(k for k, v in mask.items() if v)
  assert len(mask) == 5 and decayed == ["['fc']['kernel'].value"], mask


def test_fine_tuning_freezes_then_scales_the_restored_trunk_only():
  # ULMFiT's recipe at two levels: the trunk does not move (not even by weight decay) for the first
  # freeze_backbone_steps, then learns at backbone_lr_scale x the head's rate; without init_from (the
  # from-scratch twin) both knobs are ignored.
  from lstm_attn.training import base_config, check_config

  class M(nnx.Module):
    def __init__(self, rngs):
      self.backbone = nnx.Linear(4, 4, rngs=rngs)
      self.classifier = nnx.Linear(4, 3, rngs=rngs)

  params = nnx.state(M(nnx.Rngs(0)), nnx.Param)
  grads = jax.tree.map(lambda x: jnp.ones_like(x), params)
  c = base_config('bert')
  c.num_classes, c.init_from = 3, '/pretrained'
  c.optim.update(warmup_steps=0, weight_decay=0.1, freeze_backbone_steps=2, backbone_lr_scale=0.25)
  c.optim.min_learning_rate = c.optim.learning_rate  # a constant rate: updates comparable step to step

  def updates(config, steps):
    tx = optim.make_optimizer(config)
    state, out = tx.init(params), []
    for _ in range(steps):
      u, state = tx.update(grads, state, params)
      out.append({k: float(jnp.abs(v['kernel'].value).sum()) for k, v in u.items()})
    return out

  fine = updates(c, 3)
  assert [u['backbone'] for u in fine[:2]] == [0.0, 0.0] and fine[2]['backbone'] > 0
  assert all(u['classifier'] > 0 for u in fine)
  scratch = ml_collections.ConfigDict(c.to_dict())
  scratch.init_from = ''
  plain = updates(scratch, 3)
  np.testing.assert_allclose(fine[2]['backbone'], 0.25 * plain[2]['backbone'], rtol=1e-6)
  np.testing.assert_allclose([u['classifier'] for u in fine], [u['classifier'] for u in plain], rtol=1e-6)
  bad = ml_collections.ConfigDict(c.to_dict())
  bad.optim.backbone_lr_scale = 0.0
  with pytest.raises(ValueError, match='config.optim.backbone_lr_scale'):
    check_config(bad)


def test_schedule_warmup_cosine_floor():
  from lstm_attn.training import base_config, check_config

  c = base_config('gpt')
  c.num_train_steps = 2000
  c.optim.update({'learning_rate': 1e-3, 'min_learning_rate': 1e-4, 'warmup_steps': 100})
  lr = optim.learning_rate_schedule(c)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(50)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(100)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(1050)), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-5)  # cosine midpoint
  np.testing.assert_allclose(float(lr(2000)), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(5000)), 1e-4, rtol=1e-6)
  for field, bad in (('learning_rate', -1.0), ('learning_rate', float('inf')), ('b2', 1.5), ('eps', 0.0)):
    c.optim[field], good = bad, c.optim[field]
    with pytest.raises(ValueError, match=f'config.optim.{field}={bad!r}'):
      check_config(c)
    c.optim[field] = good


# -- integrity: checksums recorded at save, verified at restore -------------------------------------------
def _big_state(seed):
  """A train state with one array large enough (16 KiB) to be stored out of line in an OCDBT data file."""
  return {**_state(seed), 'big': jax.random.normal(jax.random.key(seed), (64, 64))}


def _flip_one_byte(step_dir):
  """Flips one bit in the middle of the largest array data file of a checkpoint, on disk."""
  files = [
    os.path.join(root, f)
    for root, _, names in os.walk(os.path.join(step_dir, 'state'))
    if os.path.basename(root) == 'd'
    for f in names
  ]
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as fh:
    fh.seek(os.path.getsize(path) // 2)
    byte = fh.read(1)
    fh.seek(-1, os.SEEK_CUR)
    fh.write(bytes([byte[0] ^ 0x10]))


def test_one_flipped_byte_in_a_data_file_is_caught_quarantined_and_skipped(tmp_path, capsys):
  ck = checkpointing.Checkpointer(str(tmp_path / 'ck'), async_save=False)
  s1, s2 = _big_state(1), _big_state(2)
  ck.save(1, s1, {'which': 1})
  ck.save(2, s2, {'which': 2})
  ck.wait()
  _flip_one_byte(str(tmp_path / 'ck' / '2'))
  step, restored, meta = ck.restore_latest_good(_abstract(s1))
  out = capsys.readouterr().out
  assert step == 1 and meta == {'which': 1}, (step, out)
  _assert_same(restored, s1)
  assert 'step 2' in out and 'checksum' in out and 'checkpoints_corrupted' in out, out
  assert ck.all_steps() == [1] and len(os.listdir(tmp_path / 'checkpoints_corrupted')) == 1
  ck.close()


def test_checkpoint_without_checksums_still_restores_and_new_saves_record_them(tmp_path):
  """A checkpoint written before checksums existed (its meta has none) is accepted as it is."""
  ck = checkpointing.Checkpointer(str(tmp_path / 'ck'), async_save=False)
  state = _big_state(3)
  ck.save(1, state, {'which': 1})
  ck.wait()
  meta_file = tmp_path / 'ck' / '1' / 'meta' / 'metadata'
  meta = json.loads(meta_file.read_text())
  assert set(meta) == {'which', 'checksums'}
  meta_file.write_text(json.dumps({'which': 1}))  # as the code before checksums wrote it
  step, restored, got = ck.restore_latest_good(_abstract(state))
  assert step == 1 and got == {'which': 1}
  _assert_same(restored, state)
  ck.save(2, state, {'which': 2})
  ck.wait()
  assert 'checksums' in json.loads((tmp_path / 'ck' / '2' / 'meta' / 'metadata').read_text())
  ck.close()


def test_load_params_of_a_workdir_with_a_damaged_latest_step_uses_the_older_good_one(tmp_path, capsys):
  ck = checkpointing.Checkpointer(str(tmp_path / 'run' / 'checkpoints'), keep_latest=3, async_save=False)
  s4, s6, s8 = _big_state(4), _big_state(6), _big_state(8)
  ck.save(4, s4, {})
  ck.save(6, s6, {})
  ck.save(8, s8, {})
  ck.close()
  _flip_one_byte(str(tmp_path / 'run' / 'checkpoints' / '8'))  # silent damage: only a checksum sees it
  _corrupt(str(tmp_path / 'run' / 'checkpoints' / '6'))  # loud damage: Orbax fails to read it
  before = sorted(os.listdir(tmp_path / 'run' / 'checkpoints'))
  raw, step = checkpointing.load_params(str(tmp_path / 'run'))
  assert step == 4
  want = np.asarray(s4['params']['head']['kernel'][...])
  np.testing.assert_array_equal(raw['head']['kernel']['value'], want)
  lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
  assert len(lines) == 2 and 'step 8' in lines[0] and 'checksum' in lines[0] and 'step 6' in lines[1], lines
  assert all('using step 4' in line for line in lines), lines
  assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == before  # another run's workdir: untouched
  # A damaged step named explicitly: one CheckpointError naming it, no fallback.
  with pytest.raises(checkpointing.CheckpointError, match='step 8') as e:
    checkpointing.load_params(str(tmp_path / 'run' / 'checkpoints' / '8'))
  assert '\n' not in str(e.value)


# -- readers beside a live trainer --------------------------------------------------------------------------
def test_reader_survives_the_trainers_retention_deleting_the_step_it_picked(tmp_path):
  writer = checkpointing.Checkpointer(str(tmp_path / 'ck'), keep_latest=1, keep_best=0, async_save=False)
  state = _state(0)
  writer.save(1, state, {'which': 1})
  writer.wait()
  reader = checkpointing.Checkpointer(str(tmp_path / 'ck'), read_only=True)
  assert reader.latest_step() == 1
  writer.save(2, _state(2), {'which': 2})  # retention deletes step 1 while the reader holds its pick
  writer.wait()
  assert not (tmp_path / 'ck' / '1').exists()
  step, restored, meta = reader.restore_latest_good(_abstract(state))
  assert step == 2 and meta == {'which': 2}
  _assert_same(restored, _state(2))
  # A step asked for by number that is gone: a one-line CheckpointError naming what is there.
  with pytest.raises(checkpointing.CheckpointError, match=r'step 1 .*available: \[2\]') as e:
    reader.restore(1, _abstract(state))
  assert '\n' not in str(e.value)
  reader.close()
  writer.close()


def test_workdir_paths_resolve_inside_a_moved_workdir(tmp_path):
  moved = tmp_path / 'moved'
  moved.mkdir()
  (moved / 'tokenizer.json').write_text('{}')
  # New checkpoints store paths relative to the workdir.
  assert checkpointing.resolve_in_workdir('tokenizer.json', str(moved)) == str(moved / 'tokenizer.json')
  # Old checkpoints stored the absolute path of the workdir they were written in: the moved workdir's own
  # file of that name wins over whatever now lives at the old path.
  (tmp_path / 'old').mkdir()
  (tmp_path / 'old' / 'tokenizer.json').write_text('{"another": "run"}')
  old = str(tmp_path / 'old' / 'tokenizer.json')
  assert checkpointing.resolve_in_workdir(old, str(moved)) == str(moved / 'tokenizer.json')
  assert checkpointing.relative_to_workdir(str(moved / 'tokenizer.json'), str(moved)) == 'tokenizer.json'


# -- the workdir lock ---------------------------------------------------------------------------------------
def test_workdir_lock_names_its_holder_and_a_dead_holders_lock_file_does_not_block(tmp_path):
  with checkpointing.WorkdirLock(str(tmp_path)):
    with pytest.raises(checkpointing.WorkdirLocked) as e:
      checkpointing.WorkdirLock(str(tmp_path)).acquire()
    message = str(e.value)
    assert f'pid {os.getpid()}' in message and 'since' in message and str(tmp_path) in message
    assert '\n' not in message
  # The lock file stays behind (as after a SIGKILL) with a holder that is gone: it does not block.
  assert (tmp_path / '.lock').exists()
  with checkpointing.WorkdirLock(str(tmp_path)):
    pass
