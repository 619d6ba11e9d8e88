"""Pytest configuration shared by the whole suite."""

import glob
import os

# Keep JAX from preallocating most of a GPU's memory in each of the parallel test processes.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

# On a machine without a GPU or TPU, run JAX on the CPU only. With the compile extra installed (the
# CUDA plugin and libtpu, for the deviceless compile checks), JAX would otherwise try to start those
# backends in every process: the CUDA plugin refuses to initialise without cuDNN and libtpu logs its
# search for a TPU. The compile-only topologies work either way (kernels/deviceless.py).
# libtpu's machine-wide lock file would let only one test worker use the compile-only TPU topologies.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

# Pallas's GPU interpreter (the Mosaic GPU kernels' interpreted tests) runs each simulated thread of a
# kernel as its own XLA:CPU computation, and a thread waiting at a barrier holds one of the CPU client's
# pool threads, sized by PJRT_NPROC or else the number of cores. On 2 cores the pool runs out before every
# thread has arrived and the test hangs for ever (reproduced on one core: `taskset -c 0` hangs, with
# PJRT_NPROC=8 it passes in 8 s). One kernel needs 1 + 3 threads; 8 leaves room.
os.environ.setdefault('PJRT_NPROC', str(max(8, os.cpu_count() or 1)))

if not (glob.glob('/dev/nvidia[0-9]*') or glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')):
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
