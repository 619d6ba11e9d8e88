"""Device meshes, parameter and batch shardings, multi-host set-up: JAX's own machinery, no hand collectives.

The mesh has two axes, ('data', 'fsdp'). A batch is split over both (every device sees different
examples). Parameters are replicated over 'data' and, when FSDP is on, each parameter (and, through
`optax` state that mirrors the parameter tree, its optimizer moments) is split along its largest dimension
that the 'fsdp' axis size divides — the rule big_vision uses, so FSDP is turned on by configuration alone
(`config.mesh.fsdp > 1`) and no model code changes. XLA's SPMD partitioner inserts the all-gathers and
reduce-scatters that the annotated `jit` needs.

Config fields read here (all optional, see `experiments/configs/*`):
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
  shard_attention / per_shard_attention / with_mesh    attention kernels run per shard (shard_map)
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

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
  """The mesh of `config.mesh` (data=-1, fsdp=1 when the section or a field is absent)."""
  mesh_cfg = config.get('mesh', None)
  if mesh_cfg is None:
    return make_mesh()
  values = {}
  for field, default in (('data', -1), ('fsdp', 1)):
    v = mesh_cfg.get(field, default)
    if isinstance(v, bool) or not isinstance(v, int):
      raise ValueError(f'mesh.{field}={v!r} must be an integer.')
    values[field] = v
  return make_mesh(values['data'], values['fsdp'])


def fsdp_min_size(config, default: int = 2**14) -> int:
  """`config.mesh.fsdp_min_size` (parameters with fewer elements stay replicated)."""
  mesh_cfg = config.get('mesh', None)
  v = default if mesh_cfg is None else mesh_cfg.get('fsdp_min_size', default)
  if isinstance(v, bool) or not isinstance(v, int) or v < 0:
    raise ValueError(f'mesh.fsdp_min_size={v!r} must be an integer >= 0.')
  return v


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
  """`fn` called (and so traced) under `jax.set_mesh(mesh)`: kernels wrapped with `per_shard_attention`
  inside it then run per shard."""

  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
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


def shard_attention(attention_fn, mesh: Mesh, *, batch_axes=MESH_AXES, head_axis=None):
  """Runs `attention_fn(query, key, value, **kwargs)` per shard with `jax.shard_map`.

  Attention is independent across batch rows and heads, so each device runs the (Pallas) kernel on its
  own [batch / |batch_axes|, seq, heads / |head_axis|, head_dim] block with no communication.
  query [batch, q_len, heads, head_dim]; key/value [batch, kv_len, kv_heads, head_dim]; per-example
  arguments (query_seq_lengths, key_value_seq_lengths [batch]; segment_ids [batch, seq]) are split over
  the batch too. With `head_axis`, heads (and kv heads: GQA groups stay whole on one device) split over
  that mesh axis, and `batch_axes` must not contain it.
  """
  if head_axis is not None and head_axis in batch_axes:
    raise ValueError(f'head_axis={head_axis!r} is also in batch_axes={batch_axes!r}; use distinct axes.')
  batch = tuple(batch_axes) if batch_axes else None
  qkv_spec = PartitionSpec(batch, None, head_axis, None)
  row_spec = PartitionSpec(batch)
  rows2_spec = PartitionSpec(batch, None)

  def wrapped(
    query,
    key,
    value,
    *,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    segment_ids=None,
    **static_kwargs,
  ):
    per_example = {
      'query_seq_lengths': query_seq_lengths,
      'key_value_seq_lengths': key_value_seq_lengths,
      'segment_ids': segment_ids,
    }
    present = {k: v for k, v in per_example.items() if v is not None}
    _check_divisible('query/key/value batch', query.shape[0], batch, mesh)
    if head_axis is not None:
      _check_divisible('query heads', query.shape[2], (head_axis,), mesh)
      _check_divisible('key/value heads', key.shape[2], (head_axis,), mesh)

    def spec_of(x):
      return jax.tree.map(lambda a: row_spec if a.ndim == 1 else rows2_spec, x)

    def body(q, k, v, extra):
      return attention_fn(q, k, v, **extra, **static_kwargs)

    return jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(qkv_spec, qkv_spec, qkv_spec, {k: spec_of(v) for k, v in present.items()}),
      out_specs=qkv_spec,
      check_vma=False,
    )(query, key, value, present)

  return wrapped


def per_shard_attention(attention_fn, *, batch_axes=MESH_AXES):
  """`attention_fn` run per shard whenever it is traced under `jax.set_mesh(mesh)` on a multi-device mesh.

  For kernels the SPMD partitioner cannot split (a Pallas call is opaque to it: it would gather the
  whole batch onto every device). When the mesh has every axis of `batch_axes` (default the trainer's
  ('data', 'fsdp')), they hold more than one device and their size divides the batch, the call goes
  through `shard_attention` (batch split over those axes, no communication); otherwise (no mesh, one
  device, other axis names, or e.g. a batch of 1 while sampling) it is called as is. The trainer traces
  its steps under `jax.set_mesh(mesh)`; an attention dispatcher wraps its kernel:
  `kernel = sharding.per_shard_attention(kernel)`.
  """
  batch_axes = tuple(batch_axes)

  def wrapped(query, key, value, **kwargs):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(batch_axes) <= set(mesh.axis_names):
      return attention_fn(query, key, value, **kwargs)
    size = int(np.prod([mesh.shape[a] for a in batch_axes], dtype=np.int64))
    if size == 1 or query.shape[0] % size:
      return attention_fn(query, key, value, **kwargs)
    return shard_attention(attention_fn, mesh, batch_axes=batch_axes)(query, key, value, **kwargs)

  return wrapped


def _check_divisible(what: str, size: int, axes, mesh: Mesh) -> None:
  n = int(np.prod([mesh.shape[a] for a in axes or ()], dtype=np.int64))
  if size % n:
    raise ValueError(
      f'shard_attention: {what}={size} must be divisible by the mesh axes {tuple(axes)} (size {n}).'
    )
