"""Tests of lstm_attn.training.sharding and lstm_attn.attention.sharded: the FSDP rule, mesh and config
errors, and (in a subprocess with 8 host CPU devices, tests/_dist_sharding.py) equivalence of sharded
and single-device training, the FSDP layout, shard_attention vs the reference, and Orbax restores onto
other meshes."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from lstm_attn.attention import shard_attention
from lstm_attn.training import base_config, check_config, sharding

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------------
# The FSDP rule (pure).
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  'shape, fsdp, min_size, want',
  [
    ((256, 64), 4, 1, PartitionSpec('fsdp', None)),  # the largest dimension
    ((64, 256), 4, 1, PartitionSpec(None, 'fsdp')),
    ((333, 64), 4, 1, PartitionSpec(None, 'fsdp')),  # largest not divisible: the next one
    ((333, 7), 4, 1, PartitionSpec()),  # nothing divisible: replicated
    ((64, 256), 1, 1, PartitionSpec()),  # fsdp off
    ((64, 256), 4, 64 * 256 + 1, PartitionSpec()),  # below min_size: replicated
    ((), 4, 0, PartitionSpec()),  # scalars (step, Adam count)
    ((1, 8, 12), 2, 1, PartitionSpec(None, None, 'fsdp')),
    ((8, 8), 8, 1, PartitionSpec('fsdp', None)),  # ties: the first axis
  ],
)
def test_fsdp_spec(shape, fsdp, min_size, want):
  assert sharding.fsdp_spec(shape, fsdp, min_size) == want


def test_state_shardings_on_one_device_mesh():
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  tree = {'w': jax.ShapeDtypeStruct((64, 256), np.float32), 'step': jax.ShapeDtypeStruct((), np.int32)}
  out = sharding.state_shardings(tree, mesh, min_size=1)
  assert out['w'].spec == PartitionSpec() and out['step'].spec == PartitionSpec()  # fsdp=1: replicated
  assert out['w'].mesh.shape == {'data': 1, 'fsdp': 1}


# ---------------------------------------------------------------------------------------------------
# Mesh, config and batch errors.
# ---------------------------------------------------------------------------------------------------
def test_make_mesh_defaults_and_axis_types():
  n = jax.device_count()
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data', 'fsdp') and mesh.shape == {'data': n, 'fsdp': 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
  'data, fsdp, field',
  [(1, 0, 'mesh.fsdp'), (1, 3, 'mesh.fsdp'), (2, 1, 'mesh.data'), (0, 1, 'mesh.data'), (-2, 1, 'mesh.data')],
)
def test_make_mesh_bad_sizes(data, fsdp, field):
  devices = jax.devices()[:1]
  with pytest.raises(ValueError, match=field):
    sharding.make_mesh(data, fsdp, devices=devices)


def test_make_mesh_bad_sizes_name_the_device_count():
  with pytest.raises(ValueError, match=r'mesh.data \* mesh.fsdp must equal the number of devices: 3 \* 1'):
    sharding.make_mesh(3, 1, devices=jax.devices()[:1])


@pytest.mark.parametrize(
  'field, value, match',
  [
    ('data', 0, 'config.mesh.data=0'),
    ('fsdp', 0, 'config.mesh.fsdp=0'),
    ('fsdp_min_size', -1, 'config.mesh.fsdp_min_size=-1'),
  ],
)
def test_mesh_config_is_checked(field, value, match):
  config = base_config('gpt')
  config.mesh[field] = value
  with pytest.raises(ValueError, match=match):
    check_config(config)


def test_mesh_from_config():
  assert sharding.mesh_from_config(base_config('gpt')).shape['fsdp'] == 1


def test_check_global_batch():
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  sharding.check_global_batch(7, mesh)  # one device: any batch
  # A fake 3-device mesh's shape is all check_global_batch reads.
  fake = type('M', (), {'size': 3, 'shape': {'data': 3, 'fsdp': 1}})()
  with pytest.raises(
    ValueError, match=r'batch_size=7 must be a multiple of the number of devices in the mesh \(3'
  ):
    sharding.check_global_batch(7, fake)


def test_process_batch_slice_single_process():
  assert sharding.process_batch_slice(12) == slice(0, 12)
  assert sharding.is_main_process()


def test_make_global_batch_single_device():
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  x = np.arange(21, dtype=np.int32).reshape(7, 3)
  g = sharding.make_global_batch({'x': x}, mesh)['x']
  np.testing.assert_array_equal(np.asarray(g), x)
  assert g.sharding.spec == PartitionSpec(('data', 'fsdp'))


def test_maybe_initialize_distributed_not_asked(monkeypatch):
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  assert sharding.maybe_initialize_distributed(None) is False
  assert (
    sharding.maybe_initialize_distributed(ml_collections.ConfigDict({'distributed': {'enabled': False}}))
    is False
  )


@pytest.mark.parametrize(
  'dist, env, match',
  [
    ({'coordinator_address': 'localhost:1234'}, {}, 'needs distributed.num_processes'),
    (
      {'coordinator_address': 'localhost:1234', 'num_processes': 2, 'process_id': 2},
      {},
      r'process_id=2 in \[0, 2\)',
    ),
    (
      {},
      {'JAX_COORDINATOR_ADDRESS': 'localhost:1', 'JAX_NUM_PROCESSES': 'two', 'JAX_PROCESS_ID': '0'},
      "'two'",
    ),
  ],
)
def test_maybe_initialize_distributed_bad(monkeypatch, dist, env, match):
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  config = ml_collections.ConfigDict({'distributed': dist})
  with pytest.raises(ValueError, match=match):
    sharding.maybe_initialize_distributed(config)


def test_shard_attention_rejects_shared_axis():
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="head_axis='fsdp' is also in batch_axes"):
    shard_attention(lambda q, k, v: q, mesh, batch_axes=('data', 'fsdp'), head_axis='fsdp')


# ---------------------------------------------------------------------------------------------------
# 8 host devices (one subprocess, every check of tests/_dist_sharding.py).
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
  out = tmp_path_factory.mktemp('eight_devices')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [sys.executable, os.path.join(HERE, '_dist_sharding.py'), str(out)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  path = out / 'results.json'
  if proc.returncode or not path.exists():
    pytest.fail(
      f'_dist_sharding.py failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    )
  results = json.loads(path.read_text())
  errors = {k: v['detail'] for k, v in results.items() if k.endswith('_error')}
  assert not errors, errors
  return results


@pytest.mark.parametrize(
  'check',
  [
    'equivalence_2x4',
    'equivalence_8x1',
    'fsdp_layout',
    'carried_state_2x4',
    'restore_1x8',
    'restore_one_device',
    'attention_pallas_batch_and_heads',
    'attention_xla_batch_segments',
    'attention_indivisible_heads',
    'attention_per_shard_under_mesh',
    'batch_helpers',
  ],
)
def test_eight_devices(eight_devices, check):
  assert check in eight_devices, sorted(eight_devices)
  result = eight_devices[check]
  assert result['ok'], result['detail']
