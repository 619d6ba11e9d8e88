"""Shared test utilities: relative L2 error against a higher-precision reference, per-dtype tolerances."""

import jax.numpy as jnp
import numpy as np

# Relative L2 error allowed, by the dtype the computation under test ran in.
TOLERANCE = {
  np.dtype('float64'): 1e-10,
  np.dtype('float32'): 1e-5,
  np.dtype(jnp.bfloat16): 1e-2,
  np.dtype('float16'): 2e-3,
}


def rel_l2_error(actual, expected) -> float:
  """||actual - expected|| / ||expected|| in float64; NaN or inf anywhere in `actual` gives inf."""
  # Straight to float64 (bf16/fp16 widen exactly): a float32 round trip would hide float64-level errors.
  actual = np.asarray(actual).astype(np.float64)
  expected = np.asarray(expected).astype(np.float64)
  if actual.shape != expected.shape:
    raise AssertionError(f'shape mismatch: {actual.shape} vs {expected.shape}')
  if not np.all(np.isfinite(actual)):
    return float('inf')
  denom = np.linalg.norm(expected)
  diff = np.linalg.norm(actual - expected)
  return float(diff / denom) if denom > 0 else float(diff)


def assert_close(actual, expected, tol=None, dtype=None, what='value'):
  """Asserts rel_l2_error(actual, expected) <= tol (default: TOLERANCE[dtype or actual.dtype])."""
  if tol is None:
    tol = TOLERANCE[np.dtype(dtype if dtype is not None else jnp.asarray(actual).dtype)]
  err = rel_l2_error(actual, expected)
  assert err <= tol, f'{what}: relative L2 error {err:.3e} > tolerance {tol:.1e}'
  return err
