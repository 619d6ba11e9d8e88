"""Faults, end to end through experiments/train.py: SIGTERM and SIGKILL, a kill during a checkpoint write
(TensorBoard read back after it), a corrupted checkpoint, a diverging (NaN) run, bad flags / configs /
paths / workdirs. Tiny models, few subprocesses."""

import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from train_tiny import REPO, TINY_FLAGS, compilation_cache, config_from_flags, final_params, train_losses

from lstm_attn import training as train

STEPS = 80  # room for a signal to land late under load (the stop windows below)
# Logs every 3 steps, checkpoints every 4: a stop between two logs must carry the pending steps' metrics.
RUN_FLAGS = [f for f in TINY_FLAGS if not f.startswith('--config.log_every=')] + [
  '--config.log_every=3',
  f'--config.num_train_steps={STEPS}',
  '--config.checkpoint_every=4',
  '--config.eval_every=20',
]

_KILL_DURING_WRITE = r"""
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity
step = os.environ['KILL_WHILE_WRITING_STEP']
original = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *args, **kwargs):
  if self._final_path.name == step:  # every file of the step is written; it is not committed yet
    os.kill(os.getpid(), signal.SIGKILL)
  return await original(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv = ['experiments/train.py'] + sys.argv[1:]
runpy.run_path('experiments/train.py', run_name='__main__')
"""


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('jax_cache')
  with compilation_cache(path):
    yield path


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache_dir):
  """The uninterrupted run, in process (same config as the subprocesses get from their flags)."""
  workdir = tmp_path_factory.mktemp('reference')
  train.train_and_evaluate(config_from_flags(RUN_FLAGS), str(workdir))
  return workdir


def _env(cache_dir, **extra):
  env = dict(
    os.environ,
    JAX_COMPILATION_CACHE_DIR=str(cache_dir),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
    **extra,
  )
  env['PYTHONPATH'] = os.pathsep.join([REPO, env.get('PYTHONPATH', '')])
  return env


def _main(args, cache_dir, script=None, **env):
  cmd = [sys.executable] + (['-c', script] if script else [os.path.join(REPO, 'experiments', 'train.py')])
  return subprocess.run(
    cmd + args, cwd=REPO, env=_env(cache_dir, **env), capture_output=True, text=True, timeout=600
  )


def _assert_same_run(workdir, reference):
  (s1, p1), (s2, p2) = final_params(reference), final_params(workdir)
  assert s1 == s2 == STEPS and p1.keys() == p2.keys()
  for k in p1:
    np.testing.assert_array_equal(p2[k], p1[k], err_msg=k)
  assert train_losses(workdir) == train_losses(reference)  # every step, before and after the restart


def _last_train_step(workdir):
  try:
    return max(train_losses(workdir), default=0)
  except (FileNotFoundError, ValueError):  # not written yet, or a line being written
    return 0


def _tensorboard_scalars(workdir, tag):
  """{step: value} of `tag` as TensorBoard shows it: the event files in name order, each record parsed from
  its TFRecord frame, and a SessionLog.START at step s (a resumed run's purge_step) discarding what
  earlier files hold for steps >= s."""
  from tensorboardX.proto import event_pb2

  out = {}
  folder = os.path.join(workdir, 'tensorboard')
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack('<Q', data[pos : pos + 8])  # length, its crc, the record, the record's crc
      record = data[pos + 12 : pos + 12 + n]
      pos += 12 + n + 4
      if len(record) < n:
        break  # cut short by a kill
      event = event_pb2.Event.FromString(record)
      if event.HasField('session_log') and event.session_log.status == event_pb2.SessionLog.START:
        out = {s: v for s, v in out.items() if s < event.step}
      for v in event.summary.value:
        if v.tag == tag:
          out[event.step] = v.simple_value
  return out


def _start(args, cache_dir, log):
  return subprocess.Popen(
    [sys.executable, os.path.join(REPO, 'experiments', 'train.py')] + args,
    cwd=REPO,
    env=_env(cache_dir),
    stdout=log,
    stderr=log,
  )


def _wait_for_step(workdir, proc, step):
  deadline = time.time() + 300
  while _last_train_step(workdir) < step and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert proc.poll() is None, f'the run ended before it could be stopped at step {step}'


def test_sigterm_then_sigkill_mid_training_then_restart_matches_uninterrupted(tmp_path, cache_dir, reference):
  """Preempted (SIGTERM), resumed, killed (SIGKILL), resumed again: the same losses and params as the
  uninterrupted run."""
  workdir = str(tmp_path / 'run')
  args = RUN_FLAGS + [f'--workdir={workdir}']
  # 1. SIGTERM, how a cluster preempts a job: the current step is saved, one line, status 128 + 15.
  with open(tmp_path / 'log1', 'w+', encoding='utf-8') as log:
    proc = _start(args, cache_dir, log)
    _wait_for_step(workdir, proc, 10)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
  out = (tmp_path / 'log1').read_text()
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  assert 'Traceback' not in out, out[-3000:]
  stopped_at = max(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  stopped = [line for line in out.splitlines() if 'SIGTERM' in line]
  assert len(stopped) == 1 and f'step {stopped_at}' in stopped[0], out[-2000:]
  assert 10 <= stopped_at < STEPS - 12
  # 2. Resumed from that step, then SIGKILL: its lock file stays behind, no longer held.
  with open(tmp_path / 'log2', 'w+', encoding='utf-8') as log:
    proc = _start(args, cache_dir, log)
    _wait_for_step(workdir, proc, stopped_at + 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  out = (tmp_path / 'log2').read_text()
  assert f'checkpoints/{stopped_at} (step {stopped_at})' in out, out[-2000:]
  assert stopped_at + 8 <= _last_train_step(workdir) < STEPS
  assert os.path.exists(os.path.join(workdir, '.lock'))
  # 3. Resumed to the end.
  out = _main(args, cache_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Resumed from' in out.stdout
  _assert_same_run(workdir, reference)


def test_killed_during_checkpoint_write_previous_checkpoint_restores(tmp_path, cache_dir, reference):
  workdir = str(tmp_path / 'run')
  args = RUN_FLAGS + ['--config.tensorboard=True', f'--workdir={workdir}']
  out = _main(args, cache_dir, script=_KILL_DURING_WRITE, KILL_WHILE_WRITING_STEP='12')
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  entries = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert '12' not in entries and any(e.startswith('12.orbax-checkpoint-tmp') for e in entries), entries
  out = _main(args, cache_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Resumed from' in out.stdout and 'checkpoints/8 (step 8)' in out.stdout, out.stdout[-2000:]
  _assert_same_run(workdir, reference)
  # TensorBoard shows what metrics.jsonl holds: every logged step once (those up to the checkpoint the run
  # resumed from were flushed before the kill), the killed run's later ones superseded by the resumed run's.
  losses = train_losses(workdir)
  assert _tensorboard_scalars(workdir, 'train/loss') == {s: np.float32(v) for s, v in losses.items()}


def test_corrupted_latest_checkpoint_falls_back_with_message(tmp_path, cache_dir, capsys):
  c = config_from_flags(TINY_FLAGS + ['--config.num_train_steps=6', '--config.checkpoint_every=2'])
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)
  step, before = final_params(workdir)
  assert step == 6
  state_dir = os.path.join(workdir, 'checkpoints', '6', 'state')
  for root, _, files in os.walk(state_dir):
    for f in files:
      if 'ocdbt' in root or f.startswith('manifest'):
        with open(os.path.join(root, f), 'r+b') as fh:
          fh.write(b'\0garbage\0' * 4)
  capsys.readouterr()
  train.train_and_evaluate(c, workdir)  # falls back to step 4, trains 5 and 6 again
  out = capsys.readouterr().out
  assert 'checkpoint at step 6' in out and 'could not be restored' in out and 'step 4 instead' in out, out
  step, after = final_params(workdir)
  assert step == 6
  for k in before:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, cache_dir):
  # lr 1e30 from step 2 on (warmup from 0): the parameters blow up and the loss at step 3 is not finite.
  c = config_from_flags(
    TINY_FLAGS
    + [
      '--config.num_train_steps=8',
      '--config.checkpoint_every=1',
      '--config.optim.learning_rate=1e30',
      '--config.optim.grad_clip_norm=0.0',
    ]
  )
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.TrainingDiverged, match=r'at step \d: stopping without saving') as e:
    train.train_and_evaluate(c, workdir)
  bad_step = int(str(e.value).split('at step ')[1].split(':')[0])
  assert 'is intact' in str(e.value)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert steps and steps[-1] == bad_step - 1
  step, params = final_params(workdir)
  assert step == bad_step - 1 and all(np.all(np.isfinite(v)) for v in params.values())


def _snapshot(path):
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      out[p] = (os.path.getsize(p), os.path.getmtime(p))
  return out


def test_bad_flags_configs_paths_and_foreign_workdir_exit_nonzero(tmp_path, cache_dir, reference):
  before = _snapshot(reference)
  # A workdir holding another experiment's checkpoints: refused, nothing touched.
  out = _main(RUN_FLAGS + ['--config.model.d_model=32', f'--workdir={reference}'], cache_dir)
  assert out.returncode == 1 and 'different experiment' in out.stderr and 'config.model.d_model' in out.stderr
  assert _snapshot(reference) == before
  # A data path that does not exist.
  workdir = tmp_path / 'fresh'
  out = _main(TINY_FLAGS + ['--config.data.path=/no/such/file.txt', f'--workdir={workdir}'], cache_dir)
  assert out.returncode == 1 and '/no/such/file.txt' in out.stderr and 'error' in out.stderr.lower()
  assert not workdir.exists() or not any(workdir.iterdir())
  # A config field that does not exist and a config file that does not exist: flag errors.
  out = _main(['--config.no_such_field=1', f'--workdir={workdir}'], cache_dir)
  assert out.returncode != 0 and 'no_such_field' in out.stderr
  out = _main(['--config=experiments/configs/no_such_config.py', f'--workdir={workdir}'], cache_dir)
  assert out.returncode != 0 and 'no_such_config.py' in out.stderr
