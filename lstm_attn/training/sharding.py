"""Device meshes, parameter and batch shardings, multi-host set-up: JAX's own machinery, no hand collectives.

The mesh has two axes, ('data', 'fsdp'). A batch is split over both (every device sees different
examples). Parameters are replicated over 'data' and, when FSDP is on, each parameter (and, through
`optax` state that mirrors the parameter tree, its optimizer moments) is split along its largest dimension
that the 'fsdp' axis size divides — the rule big_vision uses, so FSDP is turned on by configuration alone
(`config.mesh.fsdp > 1`) and no model code changes. XLA's SPMD partitioner inserts the all-gathers and
reduce-scatters that the annotated `jit` needs.

Config fields read here (defaults and checks: lstm_attn.training.config):
  config.mesh.data: devices along 'data' (-1: all devices left after fsdp).
  config.mesh.fsdp: devices along 'fsdp' (1: plain data parallelism).
  config.mesh.fsdp_min_size: parameters with fewer elements stay replicated (sharding them costs more
    in collectives than it saves in memory).
  config.distributed.enabled / coordinator_address / num_processes / process_id /
    initialization_timeout: multi-host (or the environment variables JAX_COORDINATOR_ADDRESS, ...).

The pieces, in the order a run uses them:
  maybe_initialize_distributed(config)      jax.distributed.initialize when asked (before any device use)
  mesh_from_config(config) / make_mesh      the ('data', 'fsdp') mesh, Auto axis types
  state_shardings(abstract_state, mesh)     the FSDP rule over params and optimizer state (fsdp_spec)
  batch_sharding / process_batch_slice / make_global_batch    each process feeds its own rows
  global_array_from_full / eval_batch_sharding / put_like / host_copy    data every process holds whole
  is_main_process()                         only process 0 logs, writes metrics and prints samples
  with_mesh(fn, mesh)                       traced under the mesh: attention kernels run per shard
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lstm_attn.attention.sharded import attention_batch_axes

MESH_AXES = ('data', 'fsdp')
BATCH_SPEC = PartitionSpec(MESH_AXES)


def make_mesh(data: int = -1, fsdp: int = 1, *, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all devices of all processes).

  Axis types are passed explicitly: `jax.make_mesh` defaults to Explicit axes since JAX 0.9, and our
  shardings are annotations for the SPMD partitioner (Auto), not part of the array types.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f'mesh.fsdp={fsdp} must be >= 1 and divide the number of devices ({n}).')
  if data == -1:
    data = n // fsdp
  if data < 1 or data * fsdp != n:
    raise ValueError(
      f'mesh.data * mesh.fsdp must equal the number of devices: {data} * {fsdp} != {n}. '
      'Set mesh.data=-1 to use all devices left after fsdp.'
    )
  return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def mesh_from_config(config) -> Mesh:
  """The mesh of `config.mesh` (checked by lstm_attn.training.config)."""
  return make_mesh(config.mesh.data, config.mesh.fsdp)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**14) -> PartitionSpec:
  """Shards the largest dimension that fsdp_size divides over 'fsdp'; small or indivisible stay whole."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return PartitionSpec()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = 'fsdp'
      return PartitionSpec(*spec)
  return PartitionSpec()


def state_shardings(abstract_state, mesh: Mesh, *, min_size: int = 2**14):
  """NamedShardings for a pytree of arrays (params or optimizer state): FSDP rule or replicated."""
  fsdp_size = mesh.shape['fsdp']

  def one(x):
    shape = getattr(x, 'shape', ())
    return NamedSharding(mesh, fsdp_spec(tuple(shape), fsdp_size, min_size))

  return jax.tree.map(one, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp; other dimensions whole."""
  return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_global_batch(global_batch_size: int, mesh: Mesh) -> None:
  n = mesh.size
  if global_batch_size % n:
    raise ValueError(
      f'batch_size={global_batch_size} must be a multiple of the number of devices in the mesh '
      f'({n} = data {mesh.shape["data"]} x fsdp {mesh.shape["fsdp"]}).'
    )
  if global_batch_size % jax.process_count():
    raise ValueError(
      f'batch_size={global_batch_size} must be a multiple of the number of processes ({jax.process_count()}).'
    )


def process_batch_slice(global_batch_size: int) -> slice:
  """The rows of the global batch this process reads and feeds (its own slice of the data)."""
  per_process = global_batch_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def make_global_batch(local_batch, mesh: Mesh):
  """Builds global arrays from this process's rows (`jax.make_array_from_process_local_data`)."""
  sharding = batch_sharding(mesh)

  def one(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(one, local_batch)


def global_array_from_full(tree, sharding: NamedSharding):
  """Global arrays from host data that every process holds whole (e.g. an eval batch or a prompt).

  Each process fills only its addressable shards from its own (identical) copy, so this works across
  processes, where `jax.device_put` of host data to a sharding spanning processes would not be portable.
  """

  def one(x):
    x = np.asarray(x)
    spec = sharding.spec if x.ndim else PartitionSpec()
    sh = NamedSharding(sharding.mesh, spec)
    return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])

  return jax.tree.map(one, tree)


def eval_batch_sharding(batch_size: int, mesh: Mesh) -> NamedSharding:
  """Batch-split when `batch_size` divides over the mesh, else replicated (eval batches of any size)."""
  return batch_sharding(mesh) if batch_size % mesh.size == 0 else replicated(mesh)


def host_copy(tree):
  """Numpy copies of (possibly sharded, multi-process) arrays, whole on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def put_like(tree, like):
  """`tree`'s leaves placed with the shardings of `like`'s leaves (arrays or ShapeDtypeStructs).

  Leaves already placed that way are kept; others (e.g. parameters restored on one device for
  fine-tuning) are moved, across processes too (each process fills its own shards from its full copy).
  Leaves of `like` without a sharding leave the matching leaf as it is.
  """

  def one(x, ref):
    target = getattr(ref, 'sharding', None)
    if target is None:
      return x
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
      return x
    if jax.process_count() == 1 or jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.device_put(x, target)
    # A leaf that is not spread over processes (e.g. restored on this process's one device) is already
    # whole here; gathering it across processes would stack the P copies into a P-times-longer array.
    host = np.asarray(x) if not isinstance(x, jax.Array) or x.is_fully_addressable else host_copy(x)
    return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

  return jax.tree.map(one, tree, like)


def with_mesh(fn, mesh: Mesh):
  """`fn` called (and so traced) under `jax.set_mesh(mesh)`, with the batch split over MESH_AXES: the
  attention kernels inside it then run per shard (`lstm_attn.attention.sharded`)."""

  def call(*args, **kwargs):
    with jax.set_mesh(mesh), attention_batch_axes(MESH_AXES):
      return fn(*args, **kwargs)

  return call


def maybe_initialize_distributed(config=None) -> bool:
  """Calls `jax.distributed.initialize` when the config or the environment asks for a multi-process run.

  Asked for by `config.distributed.enabled`, or by the environment variables JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (as set by a launcher), or on a cluster JAX detects itself
  (SLURM, Open MPI, Cloud TPU) when `config.distributed.enabled` is True with no address. Returns whether
  this call initialized (False when not asked for, or already initialized). Must run before anything
  touches a JAX device.
  """
  dist = config.get('distributed', None) if config is not None else None
  enabled = bool(dist and dist.get('enabled', False))
  address = (dist.get('coordinator_address', None) if dist else None) or os.environ.get(
    'JAX_COORDINATOR_ADDRESS'
  )
  if not enabled and not address:
    return False
  if jax.distributed.is_initialized():
    return False
  kwargs = {}
  if address:
    kwargs['coordinator_address'] = address
    num = (dist.get('num_processes', None) if dist else None) or os.environ.get('JAX_NUM_PROCESSES')
    pid = dist.get('process_id', None) if dist else None
    if pid is None:
      pid = os.environ.get('JAX_PROCESS_ID')
    if num is None or pid is None:
      raise ValueError(
        f'distributed.coordinator_address={address!r} needs distributed.num_processes and '
        'distributed.process_id (or the environment variables JAX_NUM_PROCESSES and JAX_PROCESS_ID).'
      )
    try:
      num, pid = int(num), int(pid)
    except (TypeError, ValueError):
      raise ValueError(
        f'distributed.num_processes={num!r} and distributed.process_id={pid!r} must be integers.'
      ) from None
    if num < 1 or not 0 <= pid < num:
      raise ValueError(
        f'distributed.num_processes={num} must be >= 1 and distributed.process_id={pid} in [0, {num}).'
      )
    kwargs['num_processes'] = num
    kwargs['process_id'] = pid
  timeout = dist.get('initialization_timeout', None) if dist else None
  if timeout:
    kwargs['initialization_timeout'] = int(timeout)
  jax.distributed.initialize(**kwargs)
  return True


def is_main_process() -> bool:
  """Only process 0 logs, writes metrics and prints samples."""
  return jax.process_index() == 0
