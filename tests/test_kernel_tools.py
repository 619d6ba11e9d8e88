"""The kernel tools run end to end: experiments/kernel_report.py (deviceless) and experiments/gpu_check.py
(in --smoke mode, which runs on any machine; on CPU our kernel is interpreted)."""

import json
import os
import subprocess
import sys

import pytest

from lstm_attn.kernels import deviceless

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *flags):
  cmd = [sys.executable, os.path.join(_ROOT, 'experiments', script), *flags]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=_ROOT, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_gpu_check_smoke_checks_correctness_then_times(tmp_path):
  out = tmp_path / 'gpu_check.json'
  _run('gpu_check.py', '--smoke', f'--output_json={out}')
  rows = json.loads(out.read_text())['rows']
  assert {(r['impl'], r['is_causal'], r['mode']) for r in rows} == {
    (i, c, m) for i in ('pallas', 'xla') for c in (False, True) for m in ('fwd', 'fwd_bwd')
  }
  for r in rows:
    assert 'error' not in r and r['rel_err'] < 2e-2 and r['seconds'] > 0 and r['tflops'] > 0, r
  assert (tmp_path / 'gpu_check.md').read_text().count('| pallas |') == 4


def test_gpu_check_test_command_is_accepted_by_pytest():
  # Its step 1 must really run the compiled test class (a flag pytest.ini's addopts reject would leave
  # nothing run and nothing said): collect with the same command.
  sys.path.insert(0, os.path.join(_ROOT, 'experiments'))
  try:
    import gpu_check
  finally:
    sys.path.pop(0)
  cmd = [sys.executable, *gpu_check.TEST_COMMAND, '--collect-only']
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=_ROOT, check=False)
  assert done.returncode == 0 and 'TestFlashAttentionGPU' in done.stdout, done.stdout[-2000:] + done.stderr


def test_gpu_check_refuses_a_cpu_without_smoke():
  if deviceless.jax.default_backend() == 'gpu':
    pytest.skip('there is a GPU')
  cmd = [sys.executable, os.path.join(_ROOT, 'experiments', 'gpu_check.py')]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=_ROOT, check=False)
  assert done.returncode != 0 and 'this is the GPU check' in done.stderr


def test_kernel_report_rows_and_summary(tmp_path):
  reason = deviceless.available('h200')
  if reason:
    pytest.skip(f'no deviceless H200 compile: {reason}')
  out = tmp_path / 'report.json'
  stdout = _run(
    'kernel_report.py',
    '--targets=h200',
    '--kernels=triton',
    '--cases=causal',
    '--head_dims=64',
    '--modes=vjp',
    f'--output_json={out}',
  )
  rows = json.loads(out.read_text())['rows']
  assert {r['gpu_kernel'] for r in rows} == {
    'flash_attention_fwd',
    'flash_attention_dkdv',
    'flash_attention_dq',
  }
  for r in rows:
    assert r['compiled'] and r['spill_bytes'] == 0 and r['registers'] > 0 and r['wgmma'] > 0, r
  assert '| h200 | triton | 64 | bfloat16 | vjp | flash_attention_dkdv | 1/1 |' in stdout
