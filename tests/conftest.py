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

if not (glob.glob('/dev/nvidia[0-9]*') or glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')):
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
