"""Errors a person can read (issue 14, items 6, 9, 10, 12): every command line fails with one line
`error: <what>, <which flag/field/file>, <what would be right>` on stderr, exit status 1 (2 for usage),
no traceback unless asked for; damaged metrics files, foreign pretrained runs, placeholders set to None.

Bad inputs run through tests/cli_harness.py (one process forked per case); what needs a trained run or a
full disk uses a plain subprocess of the script."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from cli_harness import assert_one_error_line, run_many
from train_tiny import REPO, TINY_FLAGS, compilation_cache, tiny_config

from lstm_attn import training as train
from lstm_attn.data import corpora, tokenizers
from lstm_attn.training import inputs, loop
from lstm_attn.training import metrics as lu

TRAIN, SAMPLE, PLOT = 'experiments/train.py', 'experiments/sample.py', 'experiments/plot.py'
# A char-level corpus whose capital letters start after byte 45,000: past TINY_FLAGS' 40,000-byte cap.
TEXT = ('the quick brown fox jumps over the lazy dog ' * 1100)[:45_000] + 'THE QUICK BROWN FOX ' * 750
RUN_FLAGS = TINY_FLAGS + [
  '--config.data.tokenizer=char',
  '--config.data.max_bytes=None',  # lifts TINY_FLAGS' cap (the last value of a field wins)
  '--config.num_train_steps=4',
  '--config.checkpoint_every=2',
  '--config.eval_every=2',
]


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('jax_cache')
  with compilation_cache(path):
    yield path


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


def _run(args, cache_dir=None, script=TRAIN, env=None):
  cmd = [sys.executable] + (['-c', script] if '\n' in script else [os.path.join(REPO, script)])
  return subprocess.run(
    cmd + args,
    cwd=REPO,
    env=_env(cache_dir, **(env or {})) if cache_dir else env,
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp('data') / 'text.txt'
  path.write_text(TEXT, encoding='utf-8')
  return path


@pytest.fixture(scope='module')
def trained(tmp_path_factory, cache_dir, corpus):
  """A GPT run of 4 steps through experiments/train.py, with --config.data.max_bytes=None."""
  workdir = tmp_path_factory.mktemp('gpt') / 'run'
  out = _run(RUN_FLAGS + [f'--config.data.path={corpus}', f'--workdir={workdir}'], cache_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


_OURS = {f for _, _, files in os.walk(os.path.join(REPO, 'lstm_attn')) for f in files if f.endswith('.py')}


def _orbax_lines(text):
  """The absl log records (`E1201 23:38:04.77 140 future.py:387] ...`) of files outside lstm_attn/."""
  records = (re.match(r'[IWEF]\d{4} [\d:.]+\s+\d+ ([\w.]+):\d+\]', line) for line in text.splitlines())
  return [m.string for m in records if m and m.group(1) not in _OURS]


# -----------------------------------------------------------------------------------------------------
# Item 12: `--config.<field>=None` from the command line.
# -----------------------------------------------------------------------------------------------------
def test_none_on_the_command_line_lifts_the_cap(trained):
  meta = train.checkpointing.peek_meta(str(trained / 'checkpoints'))
  assert meta['config']['data']['max_bytes'] is None
  with open(trained / 'tokenizer.json', encoding='utf-8') as f:
    chars = json.load(f)['chars']
  assert 'Q' in chars  # the capitals past byte 40,000 are in the train split


# -----------------------------------------------------------------------------------------------------
# Item 10: train.py's usage, config and workdir errors.
# -----------------------------------------------------------------------------------------------------
def _unwritable(path):
  """A folder this process cannot write into (chattr +i works for root too), or None."""
  path.mkdir()
  if (
    shutil.which('chattr') is None
    or subprocess.run(['chattr', '+i', str(path)], capture_output=True).returncode
  ):
    path.chmod(0o555)
  if os.access(path, os.W_OK):
    path.chmod(0o755)
    return None
  return path


def test_train_flag_config_and_workdir_errors(tmp_path):
  wd = tmp_path / 'w'
  (tmp_path / 'broken.py').write_text('def get_config(:\n')
  (tmp_path / 'a_file').write_text('x')
  locked = _unwritable(tmp_path / 'locked')
  default = os.path.join(REPO, 'experiments', 'configs', 'default.py')
  cases = [
    ([f'--workdir={wd}', '--config.bogus_field=1'], 2, 'config.bogus_field is not a config field'),
    (
      [f'--workdir={wd}', f'--config={default}', '--config.optim.lernig_rate=1'],
      2,
      'config.optim.learning_rate?',
    ),
    ([f'--workdir={wd}', '--config.model.d_modle=32'], 2, 'did you mean config.model.d_model?'),
    ([f'--workdir={wd}', '--config=no/such/config.py'], 2, '--config=no/such/config.py does not exist'),
    ([f'--workdir={wd}', f'--config={tmp_path}/broken.py'], 2, 'broken.py does not load: SyntaxError'),
    ([f'--workdir={wd}', '--config.data.seq_len=abc'], 2, '--config.data.seq_len=abc'),
    ([f'--workdir={wd}', '--no_such_flag'], 2, 'no_such_flag'),
    ([f'--workdir={wd}', 'stray'], 2, "unexpected arguments ['stray']"),
    (['--config.num_train_steps=1'], 2, '--workdir'),
    ([f'--workdir={wd}', '--config.optim.b2=1.5'], 1, 'config.optim.b2=1.5', '[0, 1)'),
    ([f'--workdir={wd}', '--config.optim.learning_rate=inf'], 1, 'config.optim.learning_rate=inf'),
    ([f'--workdir={wd}', '--config.sampling.top_p=2.0'], 1, 'config.sampling.top_p=2.0', '(0, 1]'),
    ([f'--workdir={wd}', '--config.data.max_bytes=5'], 1, 'config.data.max_bytes=5', '>= 20'),
    ([f'--workdir={wd}', '--config.batch_size=None'], 1, 'config.batch_size=None', 'integer >= 1'),
    ([f'--workdir={wd}', '--config.data.vocab_size=64'], 1, 'config.data.vocab_size=64', "tokenizer='byte'"),
    ([f'--workdir={wd}', '--config.data.path=/dev/null'], 1, "config.data.path='/dev/null'", 'not a regular'),
    ([f'--workdir={wd}', f'--config.init_from={tmp_path}/none'], 1, 'config.init_from=', 'no checkpoint'),
    ([f'--workdir={tmp_path}/a_file'], 1, f'--workdir={tmp_path}/a_file is a file'),
    ([f'--workdir={tmp_path}/a_file/run'], 1, 'lies under', 'which is a file'),
  ]
  if locked is not None:
    cases.append(([f'--workdir={locked}/run'], 1, f'--workdir={locked}/run', 'not writable'))
  traced = [
    {'argv': [f'--workdir={wd}', '--config.bogus_field=1', '--verbosity=1']},
    {'argv': [f'--workdir={wd}', '--config.optim.b2=1.5'], 'env': {'LSTM_ATTN_TRACEBACK': '1'}},
  ]
  try:
    results = run_many(TRAIN, [c[0] for c in cases] + traced, tmp_path)
  finally:
    if locked is not None:
      if shutil.which('chattr'):
        subprocess.run(['chattr', '-i', str(locked)], capture_output=True)
      locked.chmod(0o755)
  for (_, status, *needles), result in zip(cases, results):
    assert_one_error_line(result, status, *needles)
  for result, status in zip(results[len(cases) :], (2, 1)):
    assert result.returncode == status and 'Traceback' in result.stderr, str(result)
    assert result.stderr.strip().splitlines()[-1].startswith('error: '), str(result)
  assert not wd.exists()  # every check ran before the workdir was touched


def test_diverged_before_any_checkpoint_says_so(tmp_path):
  ckpt = train.checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))  # no checkpoint saved yet
  progress = lu.Progress(4, 0, 64)
  try:
    with pytest.raises(train.TrainingDiverged) as e:
      loop._flush_train_metrics([(3, {'loss': np.nan, 'grad_norm': np.inf})], 3, progress, None, ckpt, True)
  finally:
    ckpt.close()
  assert 'at step 3' in str(e.value) and 'No checkpoint was saved before it' in str(e.value)
  assert 'None' not in str(e.value)


def test_cli_maps_library_errors_to_one_line(tmp_path):
  script = tmp_path / 'main.py'
  script.write_text(
    'import sys\n'
    'from lstm_attn import cli\n'
    'from lstm_attn.training import CheckpointError, TrainingDiverged\n'
    'ERRORS = {"diverged": TrainingDiverged("loss is nan at step 3"),\n'
    '  "ckpt": CheckpointError("no good one"),\n'
    '  "perm": PermissionError(13, "Permission denied", "/x/y"),\n'
    '  "key": KeyError("a bug")}\n'
    'def main(argv):\n'
    '  raise ERRORS[argv[1]]\n'
    'cli.run_main(main)\n'
  )
  results = run_many(str(script), [['diverged'], ['ckpt'], ['perm'], ['key']], tmp_path)
  assert_one_error_line(results[0], 1, 'loss is nan at step 3')
  assert_one_error_line(results[1], 1, 'no good one')
  assert assert_one_error_line(results[2], 1) == 'error: Permission denied: /x/y'
  assert results[3].returncode == 1 and 'Traceback' in results[3].stderr  # a bug keeps its traceback


# -----------------------------------------------------------------------------------------------------
# Item 10 and 12: sample.py and plot.py.
# -----------------------------------------------------------------------------------------------------
def test_sample_and_plot_errors(tmp_path, trained):
  (tmp_path / 'no_ckpt' / 'checkpoints').mkdir(parents=True)
  (tmp_path / 'empty_run').mkdir()
  (tmp_path / 'empty_run' / 'metrics.jsonl').write_text('')
  (tmp_path / 'bad_run').mkdir()
  (tmp_path / 'bad_run' / 'metrics.jsonl').write_bytes(b'\xff\n[1, 2]\n{"split": "train", "loss": 1}\n')
  (tmp_path / 'out_dir').mkdir()
  (tmp_path / 'damaged').mkdir()
  shutil.copy(trained / 'metrics.jsonl', tmp_path / 'damaged')
  _damage(tmp_path / 'damaged' / 'metrics.jsonl')
  sample_cases = [
    ([f'--workdir={trained}', '--num_tokens=-5'], 2, '--num_tokens=-5'),
    ([f'--workdir={trained}', '--num_samples=0'], 2, '--num_samples=0'),
    ([f'--workdir={trained}', '--temperature=-1'], 2, '--temperature=-1', '>= 0'),
    ([f'--workdir={trained}', '--top_p=2'], 2, '--top_p=2', '(0, 1]'),
    ([f'--workdir={trained}', '--step=3'], 1, '--step=3 is not a checkpoint', '[2, 4]'),
    ([f'--workdir={tmp_path}/no_ckpt'], 1, 'no checkpoint in', 'yet'),
    ([f'--workdir={tmp_path}/nothing'], 1, f"--workdir='{tmp_path}/nothing'"),
  ]
  out = tmp_path / 'plot.png'
  plot_cases = [
    (['--workdirs=', f'--out={out}'], 2, '--workdirs'),
    ([f'--workdirs={tmp_path}/nothing', f'--out={out}'], 1, '--workdirs', 'nothing'),
    ([f'--workdirs={tmp_path}/empty_run', f'--out={out}'], 1, 'empty_run/metrics.jsonl', 'no loss'),
    ([f'--workdirs={tmp_path}/bad_run', f'--out={out}'], 1, 'bad_run/metrics.jsonl', 'no loss'),
    ([f'--workdirs={trained}', f'--out={tmp_path}/out_dir'], 1, f'--out={tmp_path}/out_dir is a folder'),
    ([f'--workdirs={trained}', f'--out={out}', '--x=words'], 2, '--x=words'),
  ]
  plotted = {'argv': [f'--workdirs={tmp_path}/damaged', f'--out={tmp_path}/curves'], 'script': PLOT}
  results = run_many(
    SAMPLE,
    [c[0] for c in sample_cases] + [{'argv': c[0], 'script': PLOT} for c in plot_cases] + [plotted],
    tmp_path / 'runs',
    preload=('lstm_attn.training', 'matplotlib.pyplot'),
  )
  for (_, status, *needles), result in zip(sample_cases + plot_cases, results):
    assert_one_error_line(result, status, *needles)
  assert not out.exists() and not os.path.exists(f'{tmp_path}/out_dir.png')
  bad = results[len(sample_cases) + 3].stderr
  assert 'line 1' in bad and 'line 2' in bad and 'line 3' in bad  # the skipped lines, each named
  # The damaged lines skipped with one warning; a path without a suffix gets .png, and says so.
  ok = results[-1]
  assert ok.returncode == 0 and 'Traceback' not in ok.stderr, str(ok)
  assert ok.stdout.strip() == f'wrote {tmp_path}/curves.png' and (tmp_path / 'curves.png').exists()
  warning = [line for line in ok.stderr.splitlines() if 'metrics.jsonl' in line]
  assert len(warning) == 1 and all(f'line {n}' in warning[0] for n in (2, 4, 6)), str(ok)


def test_sample_prints_no_orbax_logs(trained, cache_dir):
  out = _run([f'--workdir={trained}', '--num_tokens=8', '--prompt=the'], cache_dir, script=SAMPLE)
  assert out.returncode == 0, out.stderr[-3000:]
  assert '--- sample 0 ---' in out.stdout
  assert not _orbax_lines(out.stderr), out.stderr[-3000:]


# -----------------------------------------------------------------------------------------------------
# Item 6: a damaged metrics.jsonl; item 12: damaged-checkpoint recovery without tracebacks.
# -----------------------------------------------------------------------------------------------------
_DAMAGED = [b'\xff\xfe not utf-8\n', b'[1, 2]\n', b'{"split": "train", "loss": 9.0}\n']


def _damage(metrics_path):
  """Puts the three kinds of damage at lines 2, 4 and 6 of metrics.jsonl; returns those line numbers."""
  with open(metrics_path, 'rb') as f:
    lines = f.readlines()
  for n, bad in zip((1, 3, 5), _DAMAGED):
    lines.insert(n, bad)
  with open(metrics_path, 'wb') as f:
    f.writelines(lines)
  return len(lines)


def test_read_metrics_skips_damaged_lines_with_one_warning(tmp_path, capsys):
  writer = lu.MetricWriter(str(tmp_path), tensorboard=False)
  for step in (1, 2, 3):
    writer.write(step, 'train', {'loss': float(step)})
  _damage(tmp_path / lu.METRICS_FILE)
  assert [r['step'] for r in lu.read_metrics(str(tmp_path))] == [1, 2, 3]
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(tmp_path / lu.METRICS_FILE) in err[0], err
  assert all(f'line {n}' in err[0] for n in (2, 4, 6)), err
  writer.truncate_after(2)  # a resume from step 2: the damaged lines go to the superseded file too
  assert [r['step'] for r in lu.read_metrics(str(tmp_path))] == [1, 2]
  with open(tmp_path / lu.SUPERSEDED_FILE, 'rb') as f:
    superseded = f.read()
  assert all(bad in superseded for bad in _DAMAGED) and b'"step": 3' in superseded
  capsys.readouterr()
  lu.read_metrics(str(tmp_path))
  assert capsys.readouterr().err == ''  # the rewritten file is clean


def test_resume_past_damaged_metrics_and_checkpoint(tmp_path, trained, cache_dir, corpus):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  _damage(workdir / 'metrics.jsonl')
  for root, _, files in os.walk(workdir / 'checkpoints' / '4' / 'state'):
    for f in files:
      if 'ocdbt' in root or f.startswith('manifest'):
        with open(os.path.join(root, f), 'r+b') as fh:
          fh.write(b'\0garbage\0' * 4)
  args = [f for f in RUN_FLAGS if 'num_train_steps' not in f] + ['--config.num_train_steps=6']
  out = _run(args + [f'--config.data.path={corpus}', f'--workdir={workdir}'], cache_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'step 2 instead' in out.stdout, out.stdout[-2000:]  # fell back past the damaged step 4
  assert 'Traceback' not in out.stderr and not _orbax_lines(out.stderr), out.stderr[-3000:]
  warning = [line for line in out.stderr.splitlines() if 'metrics.jsonl' in line]
  assert len(warning) == 1 and all(f'line {n}' in warning[0] for n in (2, 4, 6)), out.stderr[-3000:]
  records = lu.read_metrics(str(workdir))
  assert sorted({r['step'] for r in records if r['split'] == 'train'}) == [1, 2, 3, 4, 5, 6]
  with open(workdir / lu.SUPERSEDED_FILE, 'rb') as f:
    superseded = f.read()
  assert all(bad in superseded for bad in _DAMAGED)


_DISK_FULL = r"""
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
sys.argv = ['experiments/train.py'] + sys.argv[1:]
runpy.run_path('experiments/train.py', run_name='__main__')
"""


def test_disk_full_during_a_checkpoint_is_one_error_line(tmp_path, trained, cache_dir, corpus):
  # trained's config: every compiled function comes from the cache, which is only read (its entries are
  # files past the size limit too).
  args = RUN_FLAGS + [f'--config.data.path={corpus}', f'--workdir={tmp_path}/r']
  out = _run(args, cache_dir, script=_DISK_FULL)
  assert out.returncode == 1, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'File too large' in lines[0], out.stderr[
    -3000:
  ]


# -----------------------------------------------------------------------------------------------------
# Item 9: a pretrained run of another model family.
# -----------------------------------------------------------------------------------------------------
def test_init_from_another_model_family_is_refused_before_the_workdir(tmp_path, trained):
  c = tiny_config('bert', num_classes=10, init_from=str(trained))
  with pytest.raises(ValueError, match=r"'gpt'.*'bert'") as e:
    train.check_config(c)
  assert 'config.init_from' in str(e.value) and 'config.model.name' in str(e.value)
  finetune = os.path.join(REPO, 'experiments', 'configs', 'finetune_cls.py')
  results = run_many(
    TRAIN,
    [  # a workdir, its checkpoints, one checkpoint
      [f'--config={finetune}', f'--config.init_from={trained}{step_dir}', f'--workdir={tmp_path}/ft']
      for step_dir in ('', '/checkpoints', '/checkpoints/4')
    ],
    tmp_path,
  )
  for result in results:
    assert_one_error_line(result, 1, "'gpt'", "'bert'", 'config.model.name')
  assert not (tmp_path / 'ft').exists()


# -----------------------------------------------------------------------------------------------------
# Item 10: messages of the data layer.
# -----------------------------------------------------------------------------------------------------
def test_data_messages_name_the_file_and_the_field(tmp_path):
  with pytest.raises(ValueError, match='/dev/null.*not a regular file'):
    tokenizers.load_tokenizer('/dev/null')
  with pytest.raises(ValueError, match='/dev/null.*not a regular file'):
    corpora.read_text_file('/dev/null')
  for name, content in (('tokenizer.json', b''), ('tokenizer.json', b'\0\0\0'), ('t.json', b' {"type": 1')):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match='not a JSON tokenizer file') as e:
      tokenizers.load_tokenizer(tmp_path / name)
    assert 'sentencepiece' not in str(e.value)
  # A corpus too short for the windows: the message names the fields and the file.
  small = tmp_path / 'small.txt'
  small.write_text('abcdefghij' * 3)
  c = tiny_config('gpt', **{'data.path': str(small), 'data.seq_len': 64})
  with pytest.raises(ValueError, match=r'config\.data\.seq_len=64') as e:
    inputs.make_inputs(train.config.complete_config(c.to_dict()), str(tmp_path / 'w'))
  assert str(small) in str(e.value)
  # A batcher state saved with another batch size: named as config.batch_size.
  c = tiny_config('gpt', **{'data.path': str(tmp_path / 'text.txt')})
  (tmp_path / 'text.txt').write_text(TEXT[:5000])
  data = inputs.make_inputs(train.config.complete_config(c.to_dict()), str(tmp_path / 'w2'))
  saved = {**data.train.state(), 'batch_size': 8}
  with pytest.raises(ValueError, match=r'config\.batch_size') as e:
    data.train.restore(saved)
  assert 'was 8' in str(e.value)
