"""Tiny configs for the trainer tests (tests/test_train.py, tests/test_faults.py): seconds, not minutes."""

import contextlib
import json
import os

import numpy as np

from lstm_attn.training import base_config

# The same settings as command-line overrides of experiments/configs/default.py (for subprocess tests).
TINY_FLAGS = [
  '--config.model.d_model=16',
  '--config.model.num_layers=1',
  '--config.model.num_heads=2',
  '--config.model.max_len=16',
  '--config.model.dropout=0.1',
  '--config.data.seq_len=16',
  '--config.data.max_bytes=40000',
  '--config.batch_size=4',
  '--config.eval_batch_size=4',
  '--config.eval_batches=2',
  '--config.sample_tokens=0',
  '--config.optim.warmup_steps=2',
  '--config.log_every=1',
  '--config.tensorboard=False',
]


def tiny_config(name='gpt', steps=6, **overrides):
  c = base_config(name)
  if name == 'gpt':
    c.model.update(d_model=16, num_layers=1, num_heads=2, max_len=16, dropout=0.1)
  elif name == 'bert':
    c.model.update(d_model=16, num_layers=1, num_heads=2, max_len=32, dropout=0.1)
  elif name == 'lstm_lm':
    c.model.update(embed_dim=8, hidden_size=16, num_layers=1, input_dropout=0.1)
  elif name == 'lstm_attn':
    c.model.update(d_model=16, num_layers=1, num_heads=2, boom_hidden=32, dropout=0.1)
  c.data.seq_len = 32 if name == 'bert' else 16
  c.data.max_bytes = 40_000
  c.data.snippets_per_class = (8, 4, 4)
  c.batch_size = 4
  c.eval_batch_size = 4
  c.eval_batches = 2
  c.num_train_steps = steps
  c.log_every = 1
  c.eval_every = 3
  c.checkpoint_every = 2
  c.sample_tokens = 0
  c.tensorboard = False  # tensorboardX imports torch: seconds per process; one test turns it on
  c.optim.warmup_steps = 2
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


@contextlib.contextmanager
def compilation_cache(path):
  """JAX's persistent compilation cache in `path` for the block: identical runs (an interrupted run and
  its resumption, subprocesses of one test) compile each step function once. Restores the settings."""
  import jax

  names = (
    'jax_compilation_cache_dir',
    'jax_persistent_cache_min_compile_time_secs',
    'jax_persistent_cache_min_entry_size_bytes',
  )
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update('jax_compilation_cache_dir', str(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  try:
    yield
  finally:
    for n, v in old.items():
      jax.config.update(n, v)


def train_losses(workdir):
  """{step: loss} of the train records in <workdir>/metrics.jsonl."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      r = json.loads(line)
      if r['split'] == 'train':
        out[r['step']] = r['loss']
  return out


def final_params(workdir):
  """Flat {path: np.ndarray} of the params in the latest checkpoint of a workdir."""
  import jax

  from lstm_attn.training import checkpointing

  raw, step = checkpointing.load_params(workdir)
  return step, {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(raw)[0]
  }


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_from_flags(flags, config_file='experiments/configs/default.py'):
  """The config `experiments/train.py --config=<config_file> <flags>` runs (for in-process references)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location('_cfg', os.path.join(REPO, config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for flag in flags:
    name, value = flag[len('--config.') :].split('=', 1)
    *parents, leaf = name.split('.')
    node = c
    for p in parents:
      node = node[p]
    old = node.get(leaf)
    if isinstance(old, bool):
      node[leaf] = value == 'True'
    elif isinstance(old, int):
      node[leaf] = int(value)
    elif isinstance(old, float):
      node[leaf] = float(value)
    elif old is None:
      node[leaf] = int(value) if value.lstrip('-').isdigit() else float(value)
    else:
      node[leaf] = value
  return c
