"""A run directory nothing can damage, with real processes and signals: sample.py beside a live trainer
changes nothing and survives the trainer's retention deleting what it reads, a second trainer on the
workdir is refused in one line, SIGINT saves the current step and exits with one line, and a moved
workdir samples with its own tokenizer (issue 14, items 1-4)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from train_tiny import REPO, TINY_FLAGS, compilation_cache, tiny_config

from lstm_attn.data import tokenizers
from lstm_attn.training import train_and_evaluate

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


def _snapshot(path):
  """Every folder and file under `path` with the file's size and modification time."""
  out = {}
  for root, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.join(root, d)] = 'dir'
    for f in files:
      p = os.path.join(root, f)
      out[p] = (os.path.getsize(p), os.path.getmtime(p))
  return out


def _lines(text):
  return [line for line in text.splitlines() if line.strip()]


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def _committed_steps(workdir):
  folder = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def test_beside_a_live_trainer_readers_and_a_second_trainer_change_nothing(tmp_path, cache_dir):
  workdir = str(tmp_path / 'run')
  # Saves every step and keeps one: the step a reader picks is deleted by the trainer's retention soon.
  flags = TINY_FLAGS + [
    '--config.num_train_steps=100000',
    '--config.checkpoint_every=1',
    '--config.keep_latest=1',
    '--config.keep_best=0',
    '--config.eval_every=100000',
    f'--workdir={workdir}',
  ]
  env = _env(cache_dir)
  logs = {name: open(tmp_path / f'{name}.log', 'w+', encoding='utf-8') for name in ('a', 'b', 'sample')}
  trainer = subprocess.Popen(
    [sys.executable, TRAIN] + flags, cwd=REPO, env=env, stdout=logs['a'], stderr=logs['a']
  )
  try:
    deadline = time.time() + 300
    while not _committed_steps(workdir) and trainer.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert trainer.poll() is None and _committed_steps(workdir), (tmp_path / 'a.log').read_text()[-3000:]
    in_progress = os.path.join(workdir, 'checkpoints', '999999.orbax-checkpoint-tmp')  # a write in flight
    os.makedirs(os.path.join(in_progress, 'state'))
    # sample.py and a second trainer on the same workdir, both while the first one trains.
    sampler = subprocess.Popen(
      [sys.executable, SAMPLE, f'--workdir={workdir}', '--num_tokens=8'],
      cwd=REPO,
      env=env,
      stdout=logs['sample'],
      stderr=subprocess.STDOUT,
    )
    second = subprocess.Popen(
      [sys.executable, TRAIN] + flags, cwd=REPO, env=env, stdout=logs['b'], stderr=subprocess.PIPE, text=True
    )
    _, second_err = second.communicate(timeout=300)
    sampler.wait(timeout=300)
    sample_out = (tmp_path / 'sample.log').read_text()
    assert sampler.returncode == 0, sample_out[-3000:]
    assert '--- sample 0 ---' in sample_out and 'Traceback' not in sample_out, sample_out[-3000:]
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
    for p in (trainer,):
      if p.poll() is None:
        p.kill()
    for f in logs.values():
      f.close()
  out = (tmp_path / 'a.log').read_text()
  assert trainer.returncode == 128 + signal.SIGINT, out[-3000:]
  assert 'Traceback' not in out, out[-3000:]
  records = _records(workdir)
  last = max(r['step'] for r in records)
  stopped = [line for line in _lines(out) if 'SIGINT' in line]
  assert len(stopped) == 1 and f'step {last}' in stopped[0], out[-2000:]
  assert _committed_steps(workdir) == [last]
  # One record per step and split: nobody else wrote into metrics.jsonl.
  keys = [(r['step'], r['split']) for r in records]
  assert len(keys) == len(set(keys)) and sorted(r['step'] for r in records) == list(range(1, last + 1))


def test_moved_workdir_samples_with_its_own_tokenizer_and_sampling_writes_nothing(tmp_path, cache_dir):
  rng = random.Random(0)
  own, other = 'abcdefgh \n', 'ABCDEFGH.\n'  # two vocabularies of the same size
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(''.join(rng.choice(own) for _ in range(20_000)), encoding='utf-8')
  c = tiny_config('gpt', steps=2, **{'data.path': str(corpus), 'data.tokenizer': 'char'})
  train_and_evaluate(c, str(tmp_path / 'run'))
  shutil.move(tmp_path / 'run', tmp_path / 'moved')
  # Another run now lives at the old path, with another text's tokenizer.
  (tmp_path / 'run').mkdir()
  tokenizers.CharTokenizer.from_text(other).save(str(tmp_path / 'run' / 'tokenizer.json'))
  # The repro: a trainer's write in progress must survive sampling.
  os.makedirs(tmp_path / 'moved' / 'checkpoints' / '10.orbax-checkpoint-tmp' / 'state')
  before = _snapshot(tmp_path / 'moved')
  out = subprocess.run(
    [sys.executable, SAMPLE, f'--workdir={tmp_path / "moved"}', '--num_tokens=60', '--temperature=1.0'],
    cwd=REPO,
    env=_env(cache_dir),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout.split('--- sample 0 ---\n', 1)[1]
  assert set(text) - {'\ufffd'} <= set(own) and set(text) & set('abcdefgh'), repr(text)
  assert _snapshot(tmp_path / 'moved') == before  # nothing created, cleaned up or rewritten
