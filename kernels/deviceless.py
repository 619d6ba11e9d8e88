"""Compile for chips that are not here: XLA:GPU for an H200 (sm_90a) and Mosaic TPU for v5e/v6e.

Interpret mode checks a kernel's numbers, not whether it compiles: a Triton kernel can pass every
interpreted test and still be rejected by the Triton verifier, or compile to a kernel that spills. This
module runs the real compilers on a CPU-only machine, through compile-only devices:

  * GPU: the CUDA PJRT plugin's topology built from a `GpuTargetConfigProto` (`H200_TARGET_CONFIG`):
    `jax.jit(f).trace(...).lower().compile()` then runs XLA:GPU's whole pipeline (Triton IR -> PTX for
    sm_90a -> ptxas -> cubin) with no GPU and no driver. It needs the plugin (`jax-cuda13-plugin`) and a
    CUDA 13 `ptxas` + `nvvm/libdevice` (a local toolkit under /usr/local/cuda, or the nvidia wheels).
  * TPU: libtpu's topologies ('v5e:2x2', 'v6e:2x2') run the real Mosaic compiler, which rejects kernels
    it cannot lay out and reports the temporary memory a program needs.

`compile_for(fn, *args, target=...)` compiles under `jax.default_device(<compile-only device>)`: Pallas
asks the default device what chip it lowers for (`tpu_info.get_tpu_info`, and in JAX 0.11 the GPU
lowering's `get_gpu_info`), which on a CPU host would otherwise be the CPU.

`gpu_kernel_resources(dump_dir)` reads what a GPU engineer reads: for every kernel XLA emitted, the launch
(grid, threads, dynamic shared memory, from XLA's thunk sequence) and ptxas's report on its PTX
(registers, spill bytes, stack, static shared memory, C7511 "wgmma serialized due to insufficient register
resources"), plus the count of `wgmma` and `mma.sync` instructions in the PTX.

The CUDA plugin refuses to initialise without cuDNN unless JAX is told CUDA is not its platform:
set `JAX_PLATFORMS=cpu` before JAX starts (tests/conftest.py and the report script do, when no GPU is
present). The compile-only topology is still available then.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess

import jax

# XLA's own H100 SXM spec (xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb) with the H200's memory: same SM
# (sm_90, 132 SMs, 228 KB shared memory per SM of which 227 KB per block, 64K registers), 141 GB HBM3e at
# 4.8 TB/s. The compile depends on the SM; bandwidth and size only feed XLA's cost model.
H200_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150754820096
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 patch: 0 }
runtime_version { major: 13 minor: 0 patch: 0 }
device_description_str: "NVIDIA H200"
"""

GPU_TARGETS = ('h200',)
TPU_TARGETS = {'v5e': 'v5e:2x2', 'v6e': 'v6e:2x2'}
TARGETS = GPU_TARGETS + tuple(TPU_TARGETS)


class Unavailable(RuntimeError):
  """The compiler for a target is not installed here; the message is one line saying what is missing."""


_MIN_PTXAS = (13, 0)  # the plugin is built for CUDA 13: its PTX needs a CUDA 13 ptxas


def _ptxas_version(path: str) -> tuple[int, int] | None:
  try:
    out = subprocess.run([path, '--version'], capture_output=True, text=True, timeout=30, check=False).stdout
  except OSError:
    return None
  m = re.search(r'release (\d+)\.(\d+)', out)
  return (int(m.group(1)), int(m.group(2))) if m else None


def _find_ptxas() -> str | None:
  """The first CUDA 13+ ptxas on PATH, under /usr/local/cuda*, or in the nvidia wheels."""
  candidates = [shutil.which('ptxas')]
  candidates += sorted(glob.glob('/usr/local/cuda*/bin/ptxas'), reverse=True)
  for spec in ('nvidia.cu13', 'nvidia.cuda_nvcc'):  # the nvidia-cuda-nvcc wheels
    try:
      found = importlib.util.find_spec(spec)
    except ModuleNotFoundError:
      found = None
    if found and found.submodule_search_locations:
      candidates += [os.path.join(p, 'bin', 'ptxas') for p in found.submodule_search_locations]
  found = (c for c in candidates if c and os.access(c, os.X_OK))
  return next((c for c in found if (_ptxas_version(c) or (0, 0)) >= _MIN_PTXAS), None)


@functools.cache
def ptxas() -> str:
  path = _find_ptxas()
  if path is None:
    raise Unavailable('no CUDA 13 ptxas found on PATH, under /usr/local/cuda*, or in the nvidia wheels')
  return path


@functools.cache
def device(target: str) -> jax.Device:
  """The compile-only device of `target` ('h200', 'v5e' or 'v6e'); raises Unavailable with the reason."""
  from jax.experimental import topologies

  if target not in TARGETS:
    raise ValueError(f'target must be one of {TARGETS}, got {target!r}.')
  if target in GPU_TARGETS:
    if not any(importlib.util.find_spec(f'jax_plugins.xla_cuda{v}') for v in (13, 12)):
      raise Unavailable("the JAX CUDA plugin is not installed (pip install -e '.[compile]')")
    ptxas()
    try:
      topology = topologies.get_topology_desc(
        platform='cuda', target_config=H200_TARGET_CONFIG, topology='1x1x1'
      )
    except NotImplementedError as e:
      raise Unavailable(
        'the JAX CUDA plugin did not initialise (without cuDNN, start JAX with JAX_PLATFORMS=cpu): '
        f'{str(e).splitlines()[0]}'
      ) from None
    return topology.devices[0]
  if importlib.util.find_spec('libtpu') is None:
    raise Unavailable("libtpu is not installed (pip install -e '.[compile]')")
  # libtpu takes a machine-wide lock file (/tmp/libtpu_lockfile) unless told that several processes may
  # load it: a compile-only topology drives no chip, so parallel test workers and reports can share it.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    return topologies.get_topology_desc(topology_name=TPU_TARGETS[target], platform='tpu').devices[0]
  except Exception as e:  # libtpu raises plain RuntimeErrors; say which and move on
    raise Unavailable(f'libtpu could not make a {target} topology: {str(e).splitlines()[0]}') from None


def available(target: str) -> str | None:
  """None when `target` can be compiled for here, else the one-line reason it cannot."""
  try:
    device(target)
  except Unavailable as e:
    return str(e)
  return None


def compile_for(fn, *args, target: str, dump_dir: str | None = None):
  """`jax.jit(fn)` compiled for `target` from abstract `args` (ShapeDtypeStructs or arrays).

  Returns the `jax.stages.Compiled`; its `memory_analysis()` gives the temporary memory. With dump_dir
  (GPU), XLA writes its PTX and thunk sequence there for `gpu_kernel_resources`.
  """
  dev = device(target)
  sharding = jax.sharding.SingleDeviceSharding(dev)
  specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
  options = {'xla_dump_to': dump_dir} if dump_dir else None
  with jax.default_device(dev):
    return jax.jit(fn).trace(*specs).lower().compile(compiler_options=options)


@dataclasses.dataclass(frozen=True)
class KernelResources:
  """One GPU kernel as compiled: its launch and ptxas's view of it."""

  name: str
  grid: tuple[int, ...]
  threads: int  # per block; num_warps = threads // 32
  dynamic_shared_bytes: int
  static_shared_bytes: int
  registers: int
  spill_store_bytes: int
  spill_load_bytes: int
  stack_bytes: int
  wgmma: int  # wgmma.mma_async instructions in the PTX
  mma_sync: int  # mma.sync instructions (Ampere-style MMA; on sm_90a a sign of a transposed operand)
  wgmma_serialized: bool  # ptxas C7511: wgmma serialized for lack of registers

  @property
  def num_warps(self) -> int:
    return self.threads // 32

  @property
  def spill_bytes(self) -> int:
    return self.spill_store_bytes + self.spill_load_bytes


_THUNK = re.compile(
  r'kCustomKernel.*?\]\s+(?P<name>\S+)\s+grid:\s*\[(?P<grid>[\d, ]+)\]\s+threads:\s*\[(?P<threads>[\d, ]+)\]'
  r'\s+shared_memory:\s*(?P<shmem>\d+)'
)
_ENTRY = re.compile(r'^\.(?:visible\s+)?\.entry\s+(\w+)\(', re.M)


def _ptxas_report(ptx_path: str) -> dict[str, dict]:
  """ptxas -v on one PTX file (the flags XLA uses): per entry function, its resource line."""
  run = subprocess.run(
    [ptxas(), '-arch=sm_90a', '-v', '--warn-on-spills', ptx_path, '-o', os.devnull],
    capture_output=True,
    text=True,
    check=False,
  )
  if run.returncode:
    raise RuntimeError(f'ptxas failed on {ptx_path}: {run.stderr.strip()[-2000:]}')
  report: dict[str, dict] = {}
  current = None
  for line in run.stderr.splitlines():
    if m := re.search(r"Compiling entry function '(\w+)'", line):
      current = report.setdefault(m.group(1), {'serialized': False})
    elif m := re.search(r"C7511.*function '(\w+)'", line):
      report.setdefault(m.group(1), {'serialized': False})['serialized'] = True
    elif current is not None and (
      m := re.search(r'(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+)', line)
    ):
      current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    elif current is not None and (m := re.search(r'Used (\d+) registers', line)):
      current['registers'] = int(m.group(1))
      smem = re.search(r'(\d+) bytes smem', line)
      current['smem'] = int(smem.group(1)) if smem else 0
  return report


def gpu_kernel_resources(dump_dir: str) -> list[KernelResources]:
  """Every kernel in an XLA:GPU dump (one compile per dump_dir), in launch order."""
  launches = {}
  for path in glob.glob(os.path.join(dump_dir, '*thunk_sequence.txt')):
    with open(path, encoding='utf-8') as f:
      for m in _THUNK.finditer(f.read()):
        grid = tuple(int(x) for x in m.group('grid').split(','))
        threads = 1
        for t in m.group('threads').split(','):
          threads *= int(t)
        launches.setdefault(m.group('name'), (grid, threads, int(m.group('shmem'))))
  kernels = []
  for path in sorted(glob.glob(os.path.join(dump_dir, '*.ptx'))):
    with open(path, encoding='utf-8') as f:
      ptx = f.read()
    entries = _ENTRY.findall(ptx)
    if not entries:
      continue
    report = _ptxas_report(path)
    for name in entries:
      r = report.get(name, {})
      grid, threads, shmem = launches.get(name, ((), 0, 0))
      kernels.append(
        KernelResources(
          name=name,
          grid=grid,
          threads=threads,
          dynamic_shared_bytes=shmem,
          static_shared_bytes=r.get('smem', 0),
          registers=r.get('registers', 0),
          spill_store_bytes=r.get('spill_stores', 0),
          spill_load_bytes=r.get('spill_loads', 0),
          stack_bytes=r.get('stack', 0),
          wgmma=ptx.count('wgmma.mma_async'),
          mma_sync=ptx.count('mma.sync'),
          wgmma_serialized=r.get('serialized', False),
        )
      )
  order = list(launches)
  return sorted(kernels, key=lambda k: order.index(k.name) if k.name in order else len(order))
