r"""What carrying the LSTM state costs per train step: the trainer's own jitted step, with and without it.

    python experiments/bench_tbptt.py --output_json=/tmp/bench_tbptt.json

The `lstm_char` config's model and batch (24 streams x 32 characters, vocabulary 70) on the same random
sequential batches; the carried step also starts from the last step's carry and restarts at resets.
Calls are interleaved (one of each per round) so load changes hit both alike; medians of wall time and
of process CPU time per step are reported, with the ratio carried / stateless (issue 13: at most 1.05).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from lstm_attn.models import build_model
from lstm_attn.training import build_steps

flags.DEFINE_integer('repeats', 30, 'Timed rounds (after two warm-up steps each); medians are reported.')
flags.DEFINE_string('output_json', None, 'Write the results as JSON here.')
FLAGS = flags.FLAGS
VOCAB = 70


def _config(carry: bool):
  import importlib.util

  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'lstm_char.py')
  spec = importlib.util.spec_from_file_location('lstm_char', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.carry_state = carry
  return c


def main(argv):
  del argv
  configs = {'carried': _config(True), 'stateless': _config(False)}
  c = configs['carried']
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (c.batch_size, c.data.seq_len + 1)).astype(np.int32)
  resets = np.zeros((c.batch_size, c.data.seq_len), np.float32)
  resets[0, 5] = 1.0
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'resets': resets}
  runs = {}
  for name, config in configs.items():
    steps = build_steps(config, lambda r, config=config: build_model(config, vocab_size=VOCAB, rngs=r))
    state = steps.init()
    for _ in range(2):  # compile, warm up
      state, m = steps.train_step(state, batch)
    jax.block_until_ready(m)
    runs[name] = {'steps': steps, 'state': state, 'wall': [], 'cpu': []}
  for _ in range(FLAGS.repeats):
    for run in runs.values():
      t0, c0 = time.perf_counter(), time.process_time()
      run['state'], m = run['steps'].train_step(run['state'], batch)
      jax.block_until_ready(m)
      run['wall'].append(time.perf_counter() - t0)
      run['cpu'].append(time.process_time() - c0)
  rows = {
    name: {'wall_ms': 1e3 * statistics.median(r['wall']), 'cpu_ms': 1e3 * statistics.median(r['cpu'])}
    for name, r in runs.items()
  }
  ratio = {k: rows['carried'][k] / rows['stateless'][k] for k in ('wall_ms', 'cpu_ms')}
  print(f'train step, lstm_char model, batch {c.batch_size} x {c.data.seq_len}, {FLAGS.repeats} rounds')
  print('| step | wall ms | CPU ms |\n|---|---|---|')
  for name, row in rows.items():
    print(f'| {name} | {row["wall_ms"]:.2f} | {row["cpu_ms"]:.2f} |')
  print(f'| carried / stateless | {ratio["wall_ms"]:.3f} | {ratio["cpu_ms"]:.3f} |')
  if FLAGS.output_json:
    with open(FLAGS.output_json, 'w', encoding='utf-8') as f:
      json.dump(
        {
          'date': datetime.datetime.now().isoformat(timespec='seconds'),
          'jax': jax.__version__,
          'machine': platform.processor() or platform.machine(),
          'load': os.getloadavg(),
          'rows': rows,
          'ratio': ratio,
        },
        f,
        indent=1,
      )


if __name__ == '__main__':
  app.run(main)
