"""lstm_attn: language models from LSTMs and attention in JAX/Flax, with a Pallas fused-attention kernel.

The repository's `kernels/` folder is installed as the subpackage `lstm_attn.kernels` (see package_dir):
a top-level package named `kernels` would clash with the PyPI package of that name.
"""

from setuptools import find_packages, setup

_library = find_packages(include=['lstm_attn', 'lstm_attn.*'])
_kernels = ['lstm_attn.kernels'] + ['lstm_attn.kernels.' + p for p in find_packages(where='kernels')]

setup(
  name='lstm_attn',
  version='0.1.0',
  description='LSTM and attention language models in JAX/Flax with a Pallas flash-attention kernel.',
  long_description=open('README.md', encoding='utf-8').read(),
  long_description_content_type='text/markdown',
  python_requires='>=3.10',
  packages=_library + _kernels,
  package_dir={'lstm_attn.kernels': 'kernels'},
  # The CPU LSTM kernel's C++ source, compiled on first use (kernels/lstm_cpu.py).
  package_data={'lstm_attn.kernels': ['lstm_cpu.cc']},
  install_requires=[
    'jax>=0.10.2',
    'flax>=0.12',
    'optax>=0.2.4',
    'numpy>=1.26',
    'orbax-checkpoint>=0.12',
    'absl-py>=2.1',
    'ml-collections>=1.0',
    'sentencepiece>=0.2',
    'tensorboardX>=2.6',
  ],
  extras_require={
    # matplotlib: plot.py's tests run the real script.
    'test': ['pytest>=8', 'pytest-xdist>=3.5', 'pytest-timeout>=2.3', 'ruff>=0.6', 'matplotlib>=3.8'],
    # torch (CPU build) is optional: only for peer comparisons in the benchmarks and the
    # torch.nn.LSTM conversion tests, which are skipped without it.
    'bench': ['matplotlib>=3.8'],
    # Deviceless compile checks (tests/test_compile_*.py, experiments/kernel_report.py): the CUDA plugin
    # (XLA:GPU for sm_90a; uses the local CUDA 13 toolkit's ptxas/libdevice) and libtpu (Mosaic TPU),
    # both pinned by jax's own extras to the installed jax version. No GPU or TPU is needed.
    'compile': ['jax[tpu,cuda13-local]>=0.10.2'],
  },
)
