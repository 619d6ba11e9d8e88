"""One process of a multi-process training run on localhost, launched by tests/test_distributed.py.

    python tests/_dist_train.py PROCESS_ID NUM_PROCESSES PORT WORKDIR FSDP

Each process has 4 CPU devices; with 2 processes the ('data', 'fsdp') mesh spans 8 devices in two
processes (fsdp=FSDP, data=-1). The run is `lstm_attn.training.train_and_evaluate` itself on the tiny GPT of
tests/train_tiny.py: jax.distributed from config.distributed, each process feeding its own rows of every
batch, sharded checkpoints in WORKDIR (resumed from when present). Prints `RESULT {json}` at the end.
"""

from __future__ import annotations

import json
import os
import sys

import jax

if __name__ == '__main__':  # the test imports config_for from here in its own (one-device) process
  jax.config.update('jax_num_cpu_devices', 4)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_tiny import tiny_config  # noqa: E402

from lstm_attn.training import train_and_evaluate  # noqa: E402

STEPS = 6


def config_for(fsdp: int, distributed: dict | None = None):
  """The run's config; the single-process reference in the test uses it with distributed=None."""
  c = tiny_config('gpt', steps=STEPS, checkpoint_every=3, eval_every=STEPS)
  c.batch_size = 8  # 8 devices: one row each
  c.eval_batch_size = 8
  c.mesh.fsdp = fsdp
  c.mesh.fsdp_min_size = 1  # the tiny model's parameters are split too
  c.sample_tokens = 5  # sampling runs on every process; only process 0 prints
  if distributed:
    c.distributed.update(distributed)
  return c


def main(argv):
  process_id, num_processes, port, workdir, fsdp = argv[1:6]
  config = config_for(
    int(fsdp),
    {
      'coordinator_address': f'localhost:{port}',
      'num_processes': int(num_processes),
      'process_id': int(process_id),
      'initialization_timeout': 60,
    },
  )
  summary = train_and_evaluate(config, workdir)
  result = {
    'process_index': jax.process_index(),
    'process_count': jax.process_count(),
    'device_count': jax.device_count(),
    'local_device_count': jax.local_device_count(),
    'val_loss': summary.get('val_loss'),
    'step': summary.get('step'),
  }
  print('RESULT ' + json.dumps(result), flush=True)


if __name__ == '__main__':
  main(sys.argv)
