"""Runs a command line (an experiments/ main) on many bad inputs in one test, each a real process.

One Python process imports the library once (JAX, Flax, Orbax: ~3 s), then forks a child per case; the
child runs the script as `__main__` with the case's argv and environment, its stdout and stderr going to
files, and exits with the script's status. Only for cases that fail before any JAX computation (flag,
config and path errors): a forked child must not use a backend its parent started (the parent starts none).
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from train_tiny import REPO

_RUNNER = r"""
import json, os, runpy, sys, traceback
for module in sys.argv[1:]:
  __import__(module)  # paid once, before the forks
cases = json.loads(sys.stdin.read())
results = []
for i, case in enumerate(cases):
  out, err = f'{case["prefix"]}.out', f'{case["prefix"]}.err'
  pid = os.fork()
  if pid == 0:
    for fd, path in ((1, out), (2, err)):
      os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.update(case['env'])
    sys.argv = [case['script']] + case['argv']
    status = 0
    try:
      runpy.run_path(sys.argv[0], run_name='__main__')
    except SystemExit as e:  # what the interpreter does with it
      if e.code is None or isinstance(e.code, int):
        status = e.code or 0
      else:
        print(e.code, file=sys.stderr)
        status = 1
    except BaseException:
      traceback.print_exc()
      status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  _, wait_status = os.waitpid(pid, 0)
  results.append(os.waitstatus_to_exitcode(wait_status))
print(json.dumps(results))
"""


@dataclass
class Result:
  argv: list
  returncode: int
  stdout: str
  stderr: str

  def __str__(self):
    return f'argv {self.argv}: exit {self.returncode}\n--- stderr:\n{self.stderr[-3000:]}'


def run_many(script, cases, tmp_path, *, preload=('lstm_attn.training',), env=None) -> list[Result]:
  """Runs `script` (a path relative to the repository) once per case; a case is an argv list or a
  dict(argv=[...], env={...}, script=...) (its own script). Returns a Result per case, in order."""
  cases = [c if isinstance(c, dict) else {'argv': c} for c in cases]
  tmp_path.mkdir(parents=True, exist_ok=True)
  payload = [
    {
      'argv': c['argv'],
      'env': c.get('env', {}),
      'script': c.get('script', script),
      'prefix': str(tmp_path / f'case{i}'),
    }
    for i, c in enumerate(cases)
  ]
  full_env = dict(os.environ, **(env or {}))
  full_env['PYTHONPATH'] = os.pathsep.join([REPO, full_env.get('PYTHONPATH', '')])
  proc = subprocess.run(
    [sys.executable, '-c', _RUNNER, *preload],
    input=json.dumps(payload),
    cwd=REPO,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  codes = json.loads(proc.stdout.strip().splitlines()[-1])
  out = []
  for case, p, code in zip(cases, payload, codes):
    with open(p['prefix'] + '.out', encoding='utf-8', errors='replace') as f:
      stdout = f.read()
    with open(p['prefix'] + '.err', encoding='utf-8', errors='replace') as f:
      stderr = f.read()
    out.append(Result(case['argv'], code, stdout, stderr))
  return out


def assert_one_error_line(result: Result, status: int, *needles: str) -> str:
  """The run exited with `status` and its stderr ends in one `error: ...` line holding every needle,
  with no traceback. Returns that line."""
  assert result.returncode == status, str(result)
  assert 'Traceback' not in result.stderr, str(result)
  lines = result.stderr.strip().splitlines()
  assert lines and lines[-1].startswith('error: '), str(result)
  for needle in needles:
    assert needle in lines[-1], f'{needle!r} not in the error line\n{result}'
  return lines[-1]
