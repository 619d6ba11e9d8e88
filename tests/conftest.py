"""Pytest configuration shared by the whole suite."""

import os

# Tests are CPU-only unless a GPU is really there; keep XLA from grabbing every core's worth of threads
# in a way that starves parallel test processes.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
