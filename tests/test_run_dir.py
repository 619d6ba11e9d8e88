"""A run directory nothing can damage, with real processes and signals: sample.py beside a live trainer
changes nothing and survives the trainer's retention deleting what it reads, a second trainer on the
workdir is refused in one line, SIGINT saves the current step and exits with one line, and a moved
workdir samples with its own tokenizer (issue 14, items 1-4). One scenario, to keep the processes few."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from train_tiny import REPO, TINY_FLAGS, compilation_cache, config_from_flags

from lstm_attn.data import tokenizers
from lstm_attn.training import inputs, train_and_evaluate

TRAIN = os.path.join(REPO, 'experiments', 'train.py')
SAMPLE = os.path.join(REPO, 'experiments', 'sample.py')


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('jax_cache')
  with compilation_cache(path):
    yield path


def _env(cache_dir):
  env = dict(
    os.environ,
    JAX_COMPILATION_CACHE_DIR=str(cache_dir),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
  )
  env['PYTHONPATH'] = os.pathsep.join([REPO, env.get('PYTHONPATH', '')])
  return env


def _lines(text):
  return [line for line in text.splitlines() if line.strip()]


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def _committed_steps(workdir):
  folder = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


class _Stop(Exception):
  pass


def _train_steps_in_process(monkeypatch, config, workdir, n):
  """Trains `config` for `n` steps in this process (its batcher raises at step n + 1), so the subprocess
  that resumes the same config finds its step function in the compilation cache."""
  real = inputs.make_inputs

  def make(config, workdir):
    data = real(config, workdir)
    batcher, calls, next_batch = data.train, [0], data.train.next

    def next_():
      calls[0] += 1
      if calls[0] > n:
        raise _Stop()
      return next_batch()

    batcher.next = next_
    return data

  monkeypatch.setattr(inputs, 'make_inputs', make)
  with pytest.raises(_Stop):
    train_and_evaluate(config, workdir)
  monkeypatch.undo()


def test_moved_workdir_beside_its_live_trainer_sample_and_a_second_trainer_change_nothing(
  tmp_path, cache_dir, monkeypatch
):
  """A run trained a little, its workdir moved and another run's tokenizer left at the old path; then, while
  its trainer goes on in the moved workdir (checkpointing every step, keeping three, so the step a reader
  picks is soon deleted; test_checkpointing.py has the deterministic race): sample.py decodes with the
  workdir's own tokenizer and deletes no write in progress, a second trainer is refused in one line, and
  SIGINT stops the first with its current step saved."""
  rng = random.Random(0)
  own, other = 'abcdefgh \n', 'ABCDEFGH.\n'  # two vocabularies of the same size
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(''.join(rng.choice(own) for _ in range(20_000)), encoding='utf-8')
  flags = TINY_FLAGS + [
    f'--config.data.path={corpus}',
    '--config.data.tokenizer=char',
    '--config.checkpoint_every=1',
    '--config.keep_latest=3',
    '--config.keep_best=0',
    '--config.eval_every=100000',
    '--config.num_train_steps=100000',
  ]
  _train_steps_in_process(monkeypatch, config_from_flags(flags), str(tmp_path / 'run'), 2)
  workdir = str(tmp_path / 'moved')
  shutil.move(tmp_path / 'run', workdir)
  (tmp_path / 'run').mkdir()  # another run now lives at the old path, with another text's tokenizer
  tokenizers.CharTokenizer.from_text(other).save(str(tmp_path / 'run' / 'tokenizer.json'))

  flags += [f'--workdir={workdir}']
  env = _env(cache_dir)
  logs = {
    name: open(tmp_path / f'{name}.log', 'w+', encoding='utf-8')
    for name in ('a', 'b', 'sample', 'sample_err')
  }
  trainer = subprocess.Popen(
    [sys.executable, TRAIN] + flags, cwd=REPO, env=env, stdout=logs['a'], stderr=logs['a']
  )
  try:
    deadline = time.time() + 300
    while max(_committed_steps(workdir)) <= 2 and trainer.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert trainer.poll() is None and max(_committed_steps(workdir)) > 2, (tmp_path / 'a.log').read_text()[
      -3000:
    ]
    in_progress = os.path.join(workdir, 'checkpoints', '999999.orbax-checkpoint-tmp')  # a write in flight
    os.makedirs(os.path.join(in_progress, 'state'))
    # sample.py and a second trainer on the same workdir, both while the first one trains.
    sampler = subprocess.Popen(
      [sys.executable, SAMPLE, f'--workdir={workdir}', '--num_tokens=60', '--temperature=1.0'],
      cwd=REPO,
      env=env,
      stdout=logs['sample'],
      stderr=logs['sample_err'],
    )
    second = subprocess.Popen(
      [sys.executable, TRAIN] + flags, cwd=REPO, env=env, stdout=logs['b'], stderr=subprocess.PIPE, text=True
    )
    _, second_err = second.communicate(timeout=300)
    sampler.wait(timeout=300)
    sample_out, sample_err = (tmp_path / 'sample.log').read_text(), (tmp_path / 'sample_err.log').read_text()
    assert sampler.returncode == 0 and 'Traceback' not in sample_err, sample_err[-3000:]
    text = sample_out.split('--- sample 0 ---\n', 1)[1]
    assert set(text) - {'\ufffd'} <= set(own) and set(text) & set('abcdefgh'), repr(text)
    assert os.path.isdir(os.path.join(in_progress, 'state'))  # the reader deleted no write in progress
    # The second trainer: exit 1, one line naming who holds the workdir and since when.
    assert second.returncode == 1, second_err[-3000:]
    assert 'Traceback' not in second_err
    locked = [line for line in _lines(second_err) if 'in use' in line]
    assert len(locked) == 1 and f'pid {trainer.pid}' in locked[0] and 'since' in locked[0], second_err
    # The first trainer is unharmed and still training.
    before = max(r['step'] for r in _records(workdir))
    deadline = time.time() + 60
    while max(r['step'] for r in _records(workdir)) < before + 3 and time.time() < deadline:
      time.sleep(0.05)
    assert trainer.poll() is None, (tmp_path / 'a.log').read_text()[-3000:]
    # Ctrl-C: the current step is saved, one line, no traceback.
    trainer.send_signal(signal.SIGINT)
    trainer.wait(timeout=120)
  finally:
    if trainer.poll() is None:
      trainer.kill()
    for f in logs.values():
      f.close()
  out = (tmp_path / 'a.log').read_text()
  assert trainer.returncode == 128 + signal.SIGINT, out[-3000:]
  assert 'Traceback' not in out, out[-3000:]
  records = _records(workdir)
  last = max(r['step'] for r in records)
  stopped = [line for line in _lines(out) if 'SIGINT' in line]
  assert len(stopped) == 1 and f'step {last}' in stopped[0], out[-2000:]
  assert _committed_steps(workdir)[-1] == last
  # One record per step and split: nobody else wrote into metrics.jsonl.
  keys = [(r['step'], r['split']) for r in records]
  train_steps = sorted(r['step'] for r in records if r['split'] == 'train')
  assert len(keys) == len(set(keys)) and train_steps == list(range(1, last + 1))
