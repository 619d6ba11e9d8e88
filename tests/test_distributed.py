"""A real two-process run on localhost: 2 processes x 4 CPU devices, `jax.distributed` (gloo collectives).

The run (tests/_dist_train.py, i.e. `train_and_evaluate`) trains the tiny GPT of tests/train_tiny.py on
an 8-device ('data', 'fsdp') mesh spanning both processes, each process feeding its own rows of every
batch; it checkpoints, and a second launch resumes from the checkpoint onto a different mesh. Losses
must match a single-process, single-device run of the same config on the same global batches.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from train_tiny import train_losses

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(workdir, fsdp, tmp_path, tag):
  """Runs the two processes to completion (bounded); returns their stdout texts."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  procs, logs = [], []
  for pid in range(2):
    log = open(tmp_path / f'{tag}_{pid}.log', 'w+', encoding='utf-8')
    procs.append(
      subprocess.Popen(
        [
          sys.executable,
          os.path.join(HERE, '_dist_train.py'),
          str(pid),
          '2',
          str(port),
          str(workdir),
          str(fsdp),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
    logs.append(log)
  outputs = []
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.seek(0)
      outputs.append(log.read())
      log.close()
  for pid, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {pid} of {tag} exited {p.returncode}:\n{out[-6000:]}'
  return outputs


def _result(output):
  lines = [line for line in output.splitlines() if line.startswith('RESULT ')]
  assert lines, output[-3000:]
  return json.loads(lines[-1][len('RESULT ') :])


def _train_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [r for r in map(json.loads, f) if r['split'] == 'train']


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), a
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope='module')
def reference_losses(tmp_path_factory):
  """The same config on this (single-device, single-process) pytest process."""
  sys.path.insert(0, HERE)
  import jax

  from lstm_attn.training import train_and_evaluate

  if jax.default_backend() != 'cpu' or jax.device_count() != 1:
    pytest.skip('the reference run needs a single-CPU-device pytest process (the two processes run on CPU)')
  from _dist_train import config_for

  workdir = tmp_path_factory.mktemp('reference')
  summary = train_and_evaluate(config_for(1), str(workdir))
  return train_losses(workdir), summary


def test_two_processes_train_checkpoint_and_resume_on_another_mesh(tmp_path, reference_losses):
  ref, ref_summary = reference_losses
  workdir = tmp_path / 'run'

  # 1. Train 6 steps on a data 4 x fsdp 2 mesh over two processes; checkpoints at steps 3 and 6.
  out0, out1 = _launch(workdir, 2, tmp_path, 'first')
  r0, r1 = _result(out0), _result(out1)
  assert (r0['process_index'], r1['process_index']) == (0, 1)
  assert r0['process_count'] == 2 and r0['device_count'] == 8 and r0['local_device_count'] == 4
  first = train_losses(workdir)
  assert sorted(first) == list(range(1, 7))
  steps = [r['step'] for r in _train_records(workdir)]
  assert steps == sorted(set(steps)), f'metrics written more than once per step: {steps}'  # process 0 only
  assert 'step 1/6' in out0 and 'step 1/6' not in out1, 'only process 0 prints the progress log'
  assert 'sample @ 6' in out0 and 'sample @ 6' not in out1, 'only process 0 prints samples'
  # Same losses as one device on the same global batches (each process fed its own half of each batch).
  err = _rel_err([first[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)])
  assert err <= 1e-5, (first, ref)
  assert abs(r0['val_loss'] - ref_summary['val_loss']) <= 1e-5 * abs(ref_summary['val_loss'])
  ckpts = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert ckpts[-2:] == [3, 6], ckpts

  # 2. Drop the last checkpoint and relaunch on a data 2 x fsdp 4 mesh: it restores step 3 onto the new
  # mesh and continues to step 6 with the same losses.
  shutil.rmtree(workdir / 'checkpoints' / '6')
  out0, out1 = _launch(workdir, 4, tmp_path, 'resumed')
  assert 'Resumed from' in out0 and '(step 3)' in out0, out0[-3000:]
  resumed = train_losses(workdir)
  assert sorted(resumed) == list(range(1, 7))
  err = _rel_err([resumed[s] for s in (4, 5, 6)], [ref[s] for s in (4, 5, 6)])
  assert err <= 1e-5, (resumed, ref)
  assert abs(_result(out0)['val_loss'] - ref_summary['val_loss']) <= 1e-5 * abs(ref_summary['val_loss'])
