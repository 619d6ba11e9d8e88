"""The LSTM recurrence as an XLA:CPU custom call (`lstm_cpu.cc`): packed weights, fused gates, threads.

Its reference is `lstm_attn.lstm` (`_forward_scan` and the backward scan of `_layer_bwd`), which uses it
on its own: `lstm(..., cpu_kernel=None)` (the default) runs this kernel when `unusable_reason` is None
and the plain `lax.scan` otherwise; `cpu_kernel=False` forces the scan, `True` raises with the reason
when the kernel cannot be used. `LSTM_ATTN_CPU_KERNEL=0` in the environment turns it off everywhere.

The C++ source is compiled on first use with the system's C++ compiler (`$CXX`, else g++ or c++), against
the XLA FFI headers that ship with jaxlib, into a cache folder (`$LSTM_ATTN_CACHE`, default
~/.cache/lstm_attn) keyed by the source, the flags and the jax version; about 6 s once per machine. Where
it cannot be built (no compiler, not x86-64 Linux with AVX2 and FMA), the LSTM falls back to the scan and
`unusable_reason` says why.

Shapes (time-major, as the scan): x [T, B, F], w_ih [F, 4H], b [4H], w_hh [H, 4H] (4H columns gate-major
i, f, g, o), h and c [B, H], mask and resets [T, B, 1] bool or None.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name('lstm_cpu.cc')
_FLAGS = ('-O3', '-mavx2', '-mfma', '-fopenmp', '-fPIC', '-shared', '-std=c++17')
_FORWARD, _BACKWARD = 'lstm_attn_lstm_forward', 'lstm_attn_lstm_backward'
_MATMUL, _WEIGHT_GRADIENT = 'lstm_attn_matmul', 'lstm_attn_weight_gradient'
# Units per packed weight panel in the kernel: the hidden size must be a multiple of it.
UNIT_MULTIPLE = 16


def _cache_dir() -> Path:
  return Path(os.environ.get('LSTM_ATTN_CACHE') or Path.home() / '.cache' / 'lstm_attn')


def _cpu_supports_avx2_fma() -> bool:
  try:
    flags = Path('/proc/cpuinfo').read_text().split()
  except OSError:
    return False
  return 'avx2' in flags and 'fma' in flags


def _compiler() -> str | None:
  for name in (os.environ.get('CXX'), 'g++', 'c++'):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


@functools.cache
def _load() -> tuple[bool, str]:
  """Builds (once per machine) and registers the custom calls: (ok, reason if not)."""
  if os.environ.get('LSTM_ATTN_CPU_KERNEL', '1') == '0':
    return False, 'LSTM_ATTN_CPU_KERNEL=0 is set'
  if platform.system() != 'Linux' or platform.machine() not in ('x86_64', 'AMD64'):
    return False, f'the kernel is x86-64 Linux only (this is {platform.system()} {platform.machine()})'
  if not _cpu_supports_avx2_fma():
    return False, 'this CPU lacks AVX2 or FMA'
  compiler = _compiler()
  if compiler is None:
    return False, 'no C++ compiler found (set $CXX or install g++)'
  source = _SOURCE.read_bytes()
  key = hashlib.sha256(source + ' '.join((compiler, *_FLAGS, jax.__version__)).encode()).hexdigest()[:16]
  library = _cache_dir() / f'lstm_cpu_{key}.so'
  try:
    if not library.exists():
      library.parent.mkdir(parents=True, exist_ok=True)
      # Build beside the target and rename: concurrent builders (pytest-xdist workers) never see half a file.
      with tempfile.TemporaryDirectory(dir=library.parent) as build_dir:
        partial = Path(build_dir) / library.name
        command = [compiler, *_FLAGS, '-isystem', jax.ffi.include_dir(), str(_SOURCE), '-o', str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
          return False, f'building {_SOURCE.name} failed ({" ".join(command)}):\n{result.stderr[-2000:]}'
        os.replace(partial, library)
    lib = ctypes.cdll.LoadLibrary(str(library))
  except OSError as error:  # an unwritable cache folder, a library that does not load
    return False, f'building {_SOURCE.name} failed: {error} (set LSTM_ATTN_CACHE to a writable folder)'
  targets = {
    _FORWARD: lib.LstmAttnLstmForward,
    _BACKWARD: lib.LstmAttnLstmBackward,
    _MATMUL: lib.LstmAttnMatmul,
    _WEIGHT_GRADIENT: lib.LstmAttnWeightGradient,
  }
  for name, handler in targets.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform='cpu')
  return True, ''


_warned: list[bool] = []


def unusable_reason(hidden_size: int, compute_dtype, state_dtype, projected: bool) -> str | None:
  """Why the kernel cannot run this LSTM layer here (None: it can)."""
  if jax.default_backend() != 'cpu':
    return f'the default backend is {jax.default_backend()}, not cpu'
  if jax.device_count() != 1:  # a custom call is not partitioned: under a mesh the scan shards, it would not
    return f'{jax.device_count()} devices (the kernel runs on a single CPU device)'
  if jnp.dtype(compute_dtype) != jnp.float32 or jnp.dtype(state_dtype) != jnp.float32:
    return f'compute dtype {jnp.dtype(compute_dtype)} and state dtype {jnp.dtype(state_dtype)} (float32 only)'
  if projected:
    return 'proj_size > 0 (the kernel has no LSTMP projection)'
  if hidden_size % UNIT_MULTIPLE:
    return f'hidden_size {hidden_size} is not a multiple of {UNIT_MULTIPLE}'
  ok, reason = _load()
  if not ok:
    if reason.startswith('building') and not _warned:
      _warned.append(True)  # once per process, not once per traced layer
      warnings.warn(f'lstm_attn: the CPU LSTM kernel is off, the scan runs instead: {reason}', stacklevel=3)
    return reason
  return None


def _flags(flag, num_steps: int, batch: int):
  """A [T, B, 1] bool mask (or None) as the kernel's [T, B] uint8."""
  if flag is None:
    return jnp.zeros((num_steps, batch), jnp.uint8)
  return flag.reshape(num_steps, batch).astype(jnp.uint8)


def forward(x, w_ih, b, w_hh, h0, c0, mask, resets, *, reverse: bool, keep_residuals: bool):
  """The layer's forward, input projection included, as `lstm._project` + `lstm._forward_scan`.

  x [T, B, F], w_ih [F, 4H]: each step computes [x_t, h] @ [W_ih; W_hh] in one fused matmul. Returns
  hs [T, B, H] (the carry after each step), hT, cT and, if keep_residuals, (gates [T, B, 4H] activated,
  c_prev [T, B, H]); else None.
  """
  num_steps, batch, _ = x.shape
  hidden = w_hh.shape[0]
  f32 = jnp.float32
  valid = jnp.ones((num_steps, batch), jnp.uint8) if mask is None else _flags(mask, num_steps, batch)
  residual_shapes = (
    [
      jax.ShapeDtypeStruct((num_steps, batch, 4 * hidden), f32),
      jax.ShapeDtypeStruct((num_steps, batch, hidden), f32),
    ]  # fmt: skip
    if keep_residuals
    else [jax.ShapeDtypeStruct((0,), f32), jax.ShapeDtypeStruct((0,), f32)]
  )
  call = jax.ffi.ffi_call(
    _FORWARD,
    [jax.ShapeDtypeStruct((num_steps, batch, hidden), f32), jax.ShapeDtypeStruct((batch, hidden), f32),
     jax.ShapeDtypeStruct((batch, hidden), f32), *residual_shapes],
    vmap_method='sequential',
  )  # fmt: skip
  hs, h_t, c_t, gates, c_prev = call(
    x.astype(f32), w_ih.astype(f32), b.astype(f32), w_hh.astype(f32), h0, c0, valid,
    _flags(resets, num_steps, batch), reverse=bool(reverse),
  )  # fmt: skip
  return hs, h_t, c_t, ((gates, c_prev) if keep_residuals else None)


def backward(d_hs, gates, c_prev, c_t, w_hh, d_h_t, d_c_t, mask, resets, *, reverse: bool):
  """The backward recurrence of `forward`: dz [T, B, 4H] (written over gates), d_h0, d_c0."""
  num_steps, batch, gates4 = gates.shape
  hidden = gates4 // 4
  f32 = jnp.float32
  valid = jnp.ones((num_steps, batch), jnp.uint8) if mask is None else _flags(mask, num_steps, batch)
  call = jax.ffi.ffi_call(
    _BACKWARD,
    [jax.ShapeDtypeStruct(gates.shape, f32), jax.ShapeDtypeStruct((batch, hidden), f32),
     jax.ShapeDtypeStruct((batch, hidden), f32)],
    input_output_aliases={1: 0},
    vmap_method='sequential',
  )  # fmt: skip
  return call(
    d_hs.astype(f32), gates, c_prev, c_t, w_hh.astype(f32), d_h_t.astype(f32), d_c_t.astype(f32), valid,
    _flags(resets, num_steps, batch), reverse=bool(reverse),
  )  # fmt: skip


def matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False):
  """op(a) @ op(b) in float32 (op: transpose if asked) with the kernel's blocked GEMM; N % 16 == 0.

  For the backward pass's large products (dW = [x, h_prev]^T dz, dx = dz W_ih^T), which XLA:CPU's dot
  runs slower on these shapes; a transposed operand is read in place, never copied by XLA.
  """
  m = a.shape[1] if transpose_a else a.shape[0]
  n = b.shape[0] if transpose_b else b.shape[1]
  call = jax.ffi.ffi_call(_MATMUL, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method='sequential')
  return call(a.astype(jnp.float32), b.astype(jnp.float32), transpose_a=transpose_a, transpose_b=transpose_b)


def weight_gradient(x, hs, h0, resets, dz, *, reverse: bool):
  """[dW_ih; dW_hh] [F + H, 4H] = [x, h_prev]^T dz over all T * B rows, h_prev read in place.

  h_prev is the h each step's recurrent matmul read: hs shifted by one step in scan order (h0 first), zero
  where resets [T, B, 1] is set. x [T, B, F], hs [T, B, H], h0 [B, H], dz [T, B, 4H].
  """
  num_steps, batch, features = x.shape
  call = jax.ffi.ffi_call(
    _WEIGHT_GRADIENT,
    jax.ShapeDtypeStruct((features + hs.shape[-1], dz.shape[-1]), jnp.float32),
    vmap_method='sequential',
  )
  f32 = jnp.float32
  return call(
    x.astype(f32),
    hs.astype(f32),
    h0.astype(f32),
    _flags(resets, num_steps, batch),
    dz.astype(f32),
    reverse=bool(reverse),
  )


def _self_check() -> None:
  """Smoke test: python -m lstm_attn.kernels.lstm_cpu (prints the max error against the scan)."""
  from lstm_attn import lstm as lstm_lib

  params = lstm_lib.init_lstm(jax.random.key(0), 24, 32)
  x = jax.random.normal(jax.random.key(1), (3, 7, 24))
  print('kernel:', unusable_reason(32, jnp.float32, jnp.float32, False) or 'usable')
  fast, _ = lstm_lib.lstm(params, x, cpu_kernel=True)
  slow, _ = lstm_lib.lstm(params, x, cpu_kernel=False)
  print('max |kernel - scan|:', float(np.max(np.abs(np.asarray(fast) - np.asarray(slow)))))


if __name__ == '__main__':
  _self_check()
