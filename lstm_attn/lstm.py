"""Functional LSTM: a pure `lax.scan` over a params pytree, with a hand-written backward pass.

The equations (gate order i, f, g, o as in PyTorch; LSTMP projection when proj_size > 0):

  z_t = x_t @ W_ih + b + h_{t-1} @ W_hh       # [batch, 4 * hidden]
  i, f, o = sigmoid(z_i), sigmoid(z_f), sigmoid(z_o);  g = tanh(z_g)
  c_t = f * c_{t-1} + i * g
  h_t = (o * tanh(c_t)) @ W_hr                # W_hr only when proj_size > 0

Params pytree (weights laid out [in, out]; one bias per cell, since b_ih + b_hh is all that matters):

  {'layer0': {'w_ih': [input_size, 4H], 'w_hh': [R, 4H], 'b': [4H], 'w_hr': [H, P] (only if P > 0)},
   'layer0_reverse': {...} (bidirectional only), 'layer1': {...}, ...}      with R = P if P > 0 else H.

Speed: the input projection for all time steps and all four gates is one matmul before the scan; each
step does one fused [R, 4H] recurrent matmul. Each layer and direction is a `jax.custom_vjp` (projection
included) whose forward scan writes the activated gates over the projection buffer in place and emits the
cell state entering each step; its reverse scan only does the per-step recurrent matmul (dz_t @ W_hh^T,
plus dh_t @ W_hr^T with a projection); dW_hh, dW_ih, d(inputs) and db are single large matmuls (or one
sum) over all T * B rows after the scan (autodiff of `lax.scan` would do small per-step weight-gradient
matmuls). Memory matters on CPU: XLA allocates all temporaries of a jitted function as one buffer, which
glibc serves by a fresh mmap on every call once it is over 32 MiB, so every temporary MB costs page faults
(~0.4 ms/MB here); see BUILD_NOTES.md.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from lstm_attn.checks import check_rate
from lstm_attn.kernels import lstm_cpu

Params = dict[str, dict[str, jax.Array]]

# Default scan unroll. On the 2-core CPU (experiments/bench_lstm.py, B=32, T=128, 256 -> 512, one thread)
# unroll 2 was level with 1 and 3, 8, 16 were slower (16: 1.5x) while compiling longer.
DEFAULT_UNROLL = 1


class LSTMCarry(NamedTuple):
  """State of every layer and direction, in PyTorch's layout (index = layer * num_directions + direction).

  h: [num_layers * num_directions, batch, proj_size or hidden_size]
  c: [num_layers * num_directions, batch, hidden_size]
  """

  h: jax.Array
  c: jax.Array


# ---------------------------------------------------------------------------------------------------------
# Parameters.


def _cell_name(layer: int, direction: int) -> str:
  return f'layer{layer}' + ('_reverse' if direction else '')


def init_lstm(
  key: jax.Array,
  input_size: int,
  hidden_size: int,
  *,
  num_layers: int = 1,
  bidirectional: bool = False,
  proj_size: int = 0,
  forget_bias: float = 1.0,
  orthogonal_recurrent: bool = True,
  param_dtype: Any = jnp.float32,
) -> Params:
  """Returns a params pytree (see the module docstring).

  Input and projection weights are U(-1/sqrt(H), 1/sqrt(H)) as in PyTorch; the bias is zero except the
  forget gate's, which is `forget_bias`; each gate's block of the recurrent weight is orthogonal when
  `orthogonal_recurrent` (else PyTorch's uniform).
  """
  for name, value, low in (('input_size', input_size, 1), ('hidden_size', hidden_size, 1)):
    if not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f'{name} must be a positive integer, got {value!r}')
  if not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
    raise ValueError(f'num_layers must be a positive integer, got {num_layers!r}')
  if not isinstance(proj_size, (int, np.integer)) or not 0 <= proj_size < hidden_size:
    raise ValueError(f'proj_size must be an integer in [0, hidden_size={hidden_size}), got {proj_size!r}')
  hidden, recurrent = hidden_size, proj_size or hidden_size
  num_directions = 2 if bidirectional else 1
  bound = 1.0 / np.sqrt(hidden)
  uniform = lambda k, shape: jax.random.uniform(k, shape, param_dtype, -bound, bound)
  orthogonal = jax.nn.initializers.orthogonal()
  params = {}
  for layer in range(num_layers):
    layer_input = input_size if layer == 0 else recurrent * num_directions
    for direction in range(num_directions):
      key, k_ih, k_hh, k_hr = jax.random.split(key, 4)
      if orthogonal_recurrent:
        blocks = [orthogonal(k, (recurrent, hidden), param_dtype) for k in jax.random.split(k_hh, 4)]
        w_hh = jnp.concatenate(blocks, axis=1)
      else:
        w_hh = uniform(k_hh, (recurrent, 4 * hidden))
      b = jnp.zeros((4 * hidden,), param_dtype).at[hidden : 2 * hidden].set(forget_bias)
      cell = {'w_ih': uniform(k_ih, (layer_input, 4 * hidden)), 'w_hh': w_hh, 'b': b}
      if proj_size:
        cell['w_hr'] = uniform(k_hr, (hidden, proj_size))
      params[_cell_name(layer, direction)] = cell
  return params


class _Config(NamedTuple):
  num_layers: int
  num_directions: int
  input_size: int
  hidden_size: int
  proj_size: int


def _config(params: Params) -> _Config:
  """Reads (and checks) the structure of a params pytree."""
  if not isinstance(params, dict) or 'layer0' not in params:
    raise ValueError(f"params must be a dict from init_lstm with a 'layer0' entry, got {type(params)}")
  num_layers = 0
  while _cell_name(num_layers, 0) in params:
    num_layers += 1
  num_directions = 2 if 'layer0_reverse' in params else 1
  expected = {_cell_name(layer, d) for layer in range(num_layers) for d in range(num_directions)}
  if set(params) != expected:
    raise ValueError(f'params has entries {sorted(params)}, expected {sorted(expected)}')
  cell = params['layer0']
  hidden = cell['w_hh'].shape[1] // 4
  proj = cell['w_hr'].shape[1] if 'w_hr' in cell else 0
  recurrent = proj or hidden
  for name, cell in params.items():
    layer_input = cell['w_ih'].shape[0] if name.startswith('layer0') else recurrent * num_directions
    shapes = {'w_ih': (layer_input, 4 * hidden), 'w_hh': (recurrent, 4 * hidden), 'b': (4 * hidden,)}
    if proj:
      shapes['w_hr'] = (hidden, proj)
    got = {k: tuple(jnp.shape(v)) for k, v in cell.items()}
    if got != shapes:
      raise ValueError(f'params[{name!r}] has shapes {got}, expected {shapes}')
  return _Config(num_layers, num_directions, params['layer0']['w_ih'].shape[0], hidden, proj)


def zero_carry(params: Params, batch_size: int) -> LSTMCarry:
  """All-zero LSTMCarry (float32, or the params' dtype if wider) for `batch_size` examples."""
  cfg = _config(params)
  dtype = jnp.promote_types(params['layer0']['w_hh'].dtype, jnp.float32)
  n = cfg.num_layers * cfg.num_directions
  return LSTMCarry(
    h=jnp.zeros((n, batch_size, cfg.proj_size or cfg.hidden_size), dtype),
    c=jnp.zeros((n, batch_size, cfg.hidden_size), dtype),
  )


# ---------------------------------------------------------------------------------------------------------
# One layer, one direction: the recurrence after the input projection.


def _dot(a, b, cdt, sdt):
  """a @ b with the inputs in the compute dtype and the result in the state dtype.

  The product is formed in the compute dtype and then widened: XLA:CPU has no bf16 x bf16 -> f32 dot, and
  on GPU a bf16 dot accumulates in f32 anyway.
  """
  a = a.astype(cdt)
  return jnp.matmul(a, b).astype(sdt)


def _gates(z):
  """Activated gates (i, f, g, o) from the pre-activations z [B, 4H]."""
  i, f, g, o = jnp.split(z, 4, axis=-1)
  return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


def _forward_scan(xw, b, w_hh, w_hr, h0, c0, mask, resets, reverse, cdt, unroll, keep_residuals):
  """Runs the recurrence. xw: [T, B, 4H] (x @ W_ih, state dtype, bias not added); mask: [T, B, 1] or None;
  resets: [T, B, 1] or None (where set, the state entering that step is zero: a new document starts).

  Returns hs [T, B, R] (the carried h after each step, state dtype), hT, cT and, if keep_residuals, the
  residuals of the backward pass: `gates` [T, B, 4H] (activated (i, f, g, o), written over xw in place:
  xw is a loop-carried buffer, so no second [T, B, 4H] array is allocated), `c_prev` [T, B, H] (the cell
  state entering each step, so the backward pass needs no shifted copy) and, with a projection,
  m = o * tanh(c) [T, B, H] (zero at padded steps).
  """
  sdt = h0.dtype
  w_hh_c = w_hh.astype(cdt)
  w_hr_c = None if w_hr is None else w_hr.astype(cdt)

  def cell(h, c, z_in, valid, reset):
    if reset is not None:  # (the residual c_prev keeps the state before the reset: the backward needs it)
      h, c = jnp.where(reset, jnp.zeros((), h.dtype), h), jnp.where(reset, jnp.zeros((), c.dtype), c)
    gates = _gates(z_in + b + _dot(h, w_hh_c, cdt, sdt))
    i, f, g, o = gates
    c_new = f * c + i * g
    m = o * jnp.tanh(c_new)  # [B, H]
    h_new = m if w_hr_c is None else _dot(m, w_hr_c, cdt, sdt)  # [B, R]
    if valid is not None:
      h_new = jnp.where(valid, h_new, h)
      c_new = jnp.where(valid, c_new, c)
      m = jnp.where(valid, m, 0)
    return h_new, c_new, gates, m

  if not keep_residuals:

    def step(carry, xs):
      h, c = carry  # [B, R], [B, H]
      h_new, c_new, _, _ = cell(h, c, *xs)
      return (h_new, c_new), h_new

    (hT, cT), hs = lax.scan(step, (h0, c0), (xw, mask, resets), reverse=reverse, unroll=unroll)
    return hs, hT, cT, None

  def step_res(carry, xs):
    h, c, buf = carry  # [B, R], [B, H], [T, B, 4H]: xw, becoming the gates step by step
    t, valid, reset = xs
    h_new, c_new, gates, m = cell(h, c, lax.dynamic_index_in_dim(buf, t, keepdims=False), valid, reset)
    buf = lax.dynamic_update_index_in_dim(buf, jnp.concatenate(gates, axis=-1), t, 0)
    return (h_new, c_new, buf), (h_new, c, None if w_hr_c is None else m)

  steps = jnp.arange(xw.shape[0])
  (hT, cT, gates), (hs, c_prev, m) = lax.scan(
    step_res, (h0, c0, xw), (steps, mask, resets), reverse=reverse, unroll=unroll
  )
  return hs, hT, cT, (gates, c_prev, m)


def _project(x, w_ih, cdt, sdt):
  """The input projection of all steps and gates as one matmul: x [T, B, F] -> [T, B, 4H] (no bias)."""
  return _dot(_rows(x), w_ih.astype(cdt), cdt, sdt).reshape(*x.shape[:2], w_ih.shape[1])


# The forward pass without residuals projects the inputs this many steps at a time (largest divisor of T
# up to this): a [chunk, B, 4H] buffer that a loop reuses, where one [T, B, 4H] projection is a fresh
# allocation of every call (32 MiB at B=32 T=128 H=512, page-faulted at ~0.4 ms/MB).
PROJECTION_CHUNK = 16


def _time_chunk(num_steps: int) -> int:
  """The projection chunk for T steps: the largest divisor of T <= PROJECTION_CHUNK (T itself if < 4)."""
  best = max(d for d in range(1, min(num_steps, PROJECTION_CHUNK) + 1) if num_steps % d == 0)
  return num_steps if best < 4 else best


def _layer_autodiff(x, w_ih, b, w_hh, w_hr, h0, c0, mask, resets, reverse, cdt, unroll):
  """One layer and direction: x [T, B, F] (compute dtype) -> (hs [T, B, R], hT [B, R], cT [B, H]).

  Differentiated by plain autodiff of the scan; `_layer` is the same function with the hand-written
  backward pass (see the module docstring). The input projection runs chunk by chunk of time
  (`_time_chunk`) inside an outer scan; the arithmetic is the same as one projection of all steps.
  """
  num_steps, batch = x.shape[:2]
  chunk = _time_chunk(num_steps)
  if chunk == num_steps:
    xw = _project(x, w_ih, cdt, h0.dtype)
    hs, hT, cT, _ = _forward_scan(xw, b, w_hh, w_hr, h0, c0, mask, resets, reverse, cdt, unroll, False)
    return hs, hT, cT

  def by_chunk(seq):  # [T, B, N] -> [T / chunk, chunk, B, N]
    return None if seq is None else seq.reshape(num_steps // chunk, chunk, *seq.shape[1:])

  def run_chunk(carry, xs):
    h, c = carry
    x_c, mask_c, resets_c = xs
    xw = _project(x_c, w_ih, cdt, h0.dtype)  # [chunk, B, 4H]
    hs, h, c, _ = _forward_scan(xw, b, w_hh, w_hr, h, c, mask_c, resets_c, reverse, cdt, unroll, False)
    return (h, c), hs

  xs = (by_chunk(x), by_chunk(mask), by_chunk(resets))
  (hT, cT), hs = lax.scan(run_chunk, (h0, c0), xs, reverse=reverse)
  return hs.reshape(num_steps, batch, hs.shape[-1]), hT, cT


def _layer_primal(x, w_ih, b, w_hh, w_hr, h0, c0, mask, resets, reverse, cdt, unroll, kernel):
  """`_layer_autodiff`, or with `kernel` the same recurrence as the CPU custom call (`lstm_cpu`)."""
  if not kernel:
    return _layer_autodiff(x, w_ih, b, w_hh, w_hr, h0, c0, mask, resets, reverse, cdt, unroll)
  hs, hT, cT, _ = lstm_cpu.forward(
    x, w_ih, b, w_hh, h0, c0, mask, resets, reverse=reverse, keep_residuals=False
  )
  return hs, hT, cT


_layer = jax.custom_vjp(_layer_primal, nondiff_argnums=(9, 10, 11, 12))


def _layer_fwd(x, w_ih, b, w_hh, w_hr, h0, c0, mask, resets, reverse, cdt, unroll, kernel):
  if kernel:
    hs, hT, cT, (gates, c_prev) = lstm_cpu.forward(
      x, w_ih, b, w_hh, h0, c0, mask, resets, reverse=reverse, keep_residuals=True
    )
    residuals = (gates, c_prev, None)
  else:
    xw = _project(x, w_ih, cdt, h0.dtype)
    hs, hT, cT, residuals = _forward_scan(xw, b, w_hh, w_hr, h0, c0, mask, resets, reverse, cdt, unroll, True)
  return (hs, hT, cT), (x, w_ih, b, w_hh, w_hr, h0, cT, mask, resets, hs, *residuals)


def _rows(seq):
  """[T, B, N] -> [T * B, N]."""
  return seq.reshape(-1, seq.shape[-1])


def _shift(seq, first, reverse):
  """The value before each step in scan order: [first, seq[0], ..., seq[T-2]] (mirrored if reverse)."""
  if reverse:
    return jnp.concatenate([seq[1:], first[None]], axis=0)
  return jnp.concatenate([first[None], seq[:-1]], axis=0)


def _layer_bwd(reverse, cdt, unroll, kernel, residuals, cotangents):
  x, w_ih, b, w_hh, w_hr, h0, cT, mask, resets, hs, gates, c_prev, m = residuals
  d_hs, d_hT, d_cT = cotangents  # [T, B, R], [B, R], [B, H]
  sdt = h0.dtype
  if kernel:  # the recurrence in the CPU custom call; the weight gradients below are the same
    dz, d_h0, d_c0 = lstm_cpu.backward(
      d_hs, gates, c_prev, cT, w_hh, d_hT, d_cT, mask, resets, reverse=reverse
    )
    dz_rows = _rows(dz)  # [T * B, 4H]
    # [dW_ih; dW_hh] = [x, h_prev]^T dz: one matmul over all T * B rows, in the kernel's GEMM.
    d_w = lstm_cpu.weight_gradient(x, hs, h0, resets, dz, reverse=reverse)
    d_w_ih, d_w_hh = d_w[: x.shape[-1]].astype(w_ih.dtype), d_w[x.shape[-1] :].astype(w_hh.dtype)
    d_x = jnp.matmul(dz_rows, w_ih.T).reshape(x.shape).astype(x.dtype)  # [T, B, F]
    d_b = jnp.sum(dz_rows, axis=0).astype(b.dtype)
    return d_x, d_w_ih, d_b, d_w_hh, None, d_h0, d_c0, None, None
  w_hh_t = w_hh.T.astype(cdt)  # [4H, R]
  w_hr_t = None if w_hr is None else w_hr.T.astype(cdt)  # [P, H]

  def step(carry, xs):
    # Cotangents of the carried h [B, R] and c [B, H] after this step; the cell state after this step.
    dh, dc, c_t = carry
    d_y, gates_t, c_prev_t, valid, reset = xs
    dh = dh + d_y
    i, f, g, o = jnp.split(gates_t, 4, axis=-1)
    if valid is None:
      dh_in, dc_in = dh, dc
    else:  # a padded step passes the carry through unchanged
      dh_in, dc_in = jnp.where(valid, dh, 0), jnp.where(valid, dc, 0)
    dm = dh_in if w_hr_t is None else _dot(dh_in, w_hr_t, cdt, sdt)  # [B, H]
    tanh_c = jnp.tanh(c_t)
    dc_in = dc_in + dm * o * (1 - tanh_c * tanh_c)
    c_read = c_prev_t if reset is None else jnp.where(reset, jnp.zeros((), c_prev_t.dtype), c_prev_t)
    dz = jnp.concatenate(
      [
        dc_in * g * i * (1 - i),
        dc_in * c_read * f * (1 - f),
        dc_in * i * (1 - g * g),
        dm * tanh_c * o * (1 - o),
      ],
      axis=-1,
    )  # [B, 4H]: the gradient of the gate pre-activations
    if valid is not None:  # exactly 0 at a padded step, whatever its gates hold (0 * NaN is NaN)
      dz = jnp.where(valid, dz, jnp.zeros((), dz.dtype))
    dh_prev = _dot(dz, w_hh_t, cdt, sdt)
    dc_prev = dc_in * f
    if valid is not None:
      dh_prev, dc_prev = dh_prev + jnp.where(valid, 0, dh), dc_prev + jnp.where(valid, 0, dc)
    if reset is not None:  # the state entering this step was replaced by zeros: nothing flows back
      dh_prev, dc_prev = jnp.where(reset, 0, dh_prev), jnp.where(reset, 0, dc_prev)
    return (dh_prev, dc_prev, c_prev_t), (dz, None if w_hr_t is None else dh_in)

  xs = (d_hs, gates, c_prev, mask, resets)
  (d_h0, d_c0, _), (dz, dh) = lax.scan(step, (d_hT, d_cT, cT), xs, reverse=not reverse, unroll=unroll)
  return _weight_gradients(x, w_ih, b, w_hh, w_hr, h0, resets, hs, m, reverse, cdt, dz, dh, d_h0, d_c0)


def _weight_gradients(x, w_ih, b, w_hh, w_hr, h0, resets, hs, m, reverse, cdt, dz, dh, d_h0, d_c0):
  """The cotangents of `_layer`'s inputs from dz [T, B, 4H]: one matmul over all steps and rows each."""
  sdt = h0.dtype
  dz_rows = _rows(dz).astype(cdt)  # [T * B, 4H]
  h_prev = _shift(hs, h0, reverse)  # [T, B, R]
  if resets is not None:  # the h each step's recurrent matmul read
    h_prev = jnp.where(resets, jnp.zeros((), h_prev.dtype), h_prev)
  d_w_hh = _dot(_rows(h_prev).T, dz_rows, cdt, sdt)  # [R, 4H]
  d_w_ih = _dot(_rows(x).T, dz_rows, cdt, sdt)  # [F, 4H]
  d_x = _dot(dz_rows, w_ih.T.astype(cdt), cdt, sdt).reshape(x.shape)  # [T, B, F]
  d_w_hr = None
  if w_hr is not None:
    d_w_hr = _dot(_rows(m).T, _rows(dh).astype(cdt), cdt, sdt).astype(w_hr.dtype)  # [H, P]
  d_b = jnp.sum(_rows(dz), axis=0).astype(b.dtype)
  d_w_ih, d_w_hh = d_w_ih.astype(w_ih.dtype), d_w_hh.astype(w_hh.dtype)
  return d_x.astype(x.dtype), d_w_ih, d_b, d_w_hh, d_w_hr, d_h0, d_c0, None, None


_layer.defvjp(_layer_fwd, _layer_bwd)


def _layer_with_kernel(kernel, *args):
  return _layer(*args, kernel)


# ---------------------------------------------------------------------------------------------------------
# The public function.


def _check_inputs(cfg: _Config, inputs, seq_lengths, initial_carry, dropout, rng, dtype):
  if not hasattr(inputs, 'shape') or jnp.ndim(inputs) != 3:
    raise ValueError(
      f'inputs must have rank 3 [batch, time, features], got shape {getattr(inputs, "shape", type(inputs))}'
    )
  if not jnp.issubdtype(inputs.dtype, jnp.floating):
    raise ValueError(f'inputs must have a floating dtype, got {inputs.dtype}')
  if dtype is not None:  # an integer or bool compute dtype would return all-zero outputs
    try:
      ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
      ok = False
    if not ok:
      raise ValueError(
        f'dtype must be a floating dtype (e.g. jnp.bfloat16, jnp.float32) or None, got {dtype!r}'
      )
  batch, time, features = inputs.shape
  if features != cfg.input_size:
    raise ValueError(f'inputs has {features} features (shape {inputs.shape}), params expect {cfg.input_size}')
  if seq_lengths is not None:
    if jnp.shape(seq_lengths) != (batch,) or not jnp.issubdtype(jnp.result_type(seq_lengths), jnp.integer):
      raise ValueError(
        f'seq_lengths must be an integer array of shape [batch]=({batch},), got shape '
        f'{jnp.shape(seq_lengths)} and dtype {jnp.result_type(seq_lengths)}'
      )
    try:
      lengths = np.asarray(seq_lengths)
    except jax.errors.TracerArrayConversionError:  # under jit: values are not known here
      lengths = None
    if lengths is not None and lengths.size and (lengths.min() < 0 or lengths.max() > time):
      raise ValueError(f'seq_lengths must lie in [0, time={time}], got {lengths.tolist()}')
  if initial_carry is not None:
    if not isinstance(initial_carry, tuple) or len(initial_carry) != 2:
      raise ValueError(f'initial_carry must be an LSTMCarry(h, c), got {type(initial_carry)}')
    n = cfg.num_layers * cfg.num_directions
    want = LSTMCarry((n, batch, cfg.proj_size or cfg.hidden_size), (n, batch, cfg.hidden_size))
    got = LSTMCarry(*(tuple(jnp.shape(a)) for a in initial_carry))
    if got != want:
      raise ValueError(f'initial_carry has shapes h={got.h}, c={got.c}; expected h={want.h}, c={want.c}')
  check_rate('dropout', dropout)
  if dropout > 0.0 and rng is None:
    raise ValueError('dropout > 0 needs rng (a jax.random key); pass dropout=0.0 for evaluation')


def _use_cpu_kernel(cpu_kernel, cfg: _Config, cdt, sdt, custom_vjp: bool) -> bool:
  """Whether `lstm` runs its recurrence in the CPU custom call (see its `cpu_kernel` argument)."""
  if cpu_kernel is False:
    return False
  reason = 'custom_vjp=False (autodiff needs the scan)' if not custom_vjp else None
  reason = reason or lstm_cpu.unusable_reason(cfg.hidden_size, cdt, sdt, cfg.proj_size > 0)
  if reason and cpu_kernel:
    raise ValueError(f'cpu_kernel=True, but the CPU LSTM kernel cannot run this call: {reason}')
  return reason is None


def lstm(
  params: Params,
  inputs: jax.Array,
  *,
  seq_lengths: jax.Array | None = None,
  initial_carry: LSTMCarry | None = None,
  resets: jax.Array | None = None,
  reverse: bool = False,
  dropout: float = 0.0,
  weight_drop: float = 0.0,
  rng: jax.Array | None = None,
  dtype: Any = None,
  unroll: int = DEFAULT_UNROLL,
  custom_vjp: bool = True,
  cpu_kernel: bool | None = None,
) -> tuple[jax.Array, LSTMCarry]:
  """Runs a (stacked, optionally bidirectional and projected) LSTM over a batch of sequences.

  Args:
    params: pytree from `init_lstm` or `params_from_torch`.
    inputs: [batch, time, input_size].
    seq_lengths: optional int [batch]; steps t >= seq_lengths[b] are padding: their outputs are exactly
      zero and they do not change the state, so the final carry is each example's state after its last
      valid step. What padded inputs hold (even NaN or inf) changes no output, carry or gradient.
    initial_carry: optional LSTMCarry (default zeros); see LSTMCarry for the layout.
    resets: optional bool [batch, time]: where set, every layer's state entering that step is zero (a new
      document starts there inside a carried stream), and no gradient flows back across it.
      Unidirectional, forward only. A reset at a padded step (t >= seq_lengths[b]) is ignored.
    reverse: run every layer from each example's last valid step back to its first (unidirectional only).
    dropout: dropout rate on the inputs of layers 1..num_layers-1 (as torch.nn.LSTM); needs `rng`.
    weight_drop: DropConnect rate on every hidden-to-hidden matrix w_hh (AWD-LSTM's WeightDrop): one
      mask per call, shared by every step and every row, applied once to the matrix the recurrent
      matmul reads (w_hh * mask / (1 - rate)), never a copy per step; needs `rng`.
    rng: jax.random key for dropout and weight_drop.
    dtype: compute dtype of the matmuls (e.g. jnp.bfloat16); state, gates and accumulation stay float32
      (or the params' dtype if wider). Default: the promoted dtype of inputs and params.
    unroll: `lax.scan` unroll factor of the forward and backward scans.
    custom_vjp: use the hand-written backward pass (False: plain autodiff of the scan; same values).
    cpu_kernel: run the recurrence (forward and backward) as the AVX2 custom call of
      `lstm_attn.kernels.lstm_cpu` instead of the `lax.scan`: None (default) where it can (float32, no
      projection, hidden_size a multiple of 16, one CPU device, custom_vjp, the kernel built), False
      never, True always (a ValueError says why it cannot). Same values to float32 rounding. The
      custom call has no derivative of its own: for second-order gradients pass cpu_kernel=False.

  Returns:
    outputs: [batch, time, num_directions * (proj_size or hidden_size)] in the compute dtype (forward and
      backward direction concatenated on the last axis), and the final LSTMCarry (state dtype).
  """
  cfg = _config(params)
  _check_inputs(cfg, inputs, seq_lengths, initial_carry, dropout, rng, dtype)
  check_rate('weight_drop', weight_drop)
  if weight_drop > 0.0 and rng is None:
    raise ValueError('weight_drop > 0 needs rng (a jax.random key); pass weight_drop=0.0 for evaluation')
  if reverse and cfg.num_directions == 2:
    raise ValueError('reverse=True is only defined for a unidirectional LSTM; got bidirectional params')
  if resets is not None:
    if reverse or cfg.num_directions == 2:
      raise ValueError('resets are defined for a forward, unidirectional LSTM (a document starts at t)')
    if jnp.shape(resets) != inputs.shape[:2]:
      raise ValueError(f'resets must have shape [batch, time] = {inputs.shape[:2]}, got {jnp.shape(resets)}')
  param_dtype = params['layer0']['w_hh'].dtype
  cdt = jnp.dtype(dtype if dtype is not None else jnp.promote_types(inputs.dtype, param_dtype))
  sdt = jnp.promote_types(param_dtype, jnp.float32)
  batch, time, _ = inputs.shape
  carry = zero_carry(params, batch) if initial_carry is None else initial_carry
  h_init, c_init = jnp.asarray(carry[0], sdt), jnp.asarray(carry[1], sdt)
  if time == 0:
    width = cfg.num_directions * (cfg.proj_size or cfg.hidden_size)
    return jnp.zeros((batch, 0, width), cdt), LSTMCarry(h_init, c_init)
  mask = None
  if seq_lengths is not None:
    mask = (jnp.arange(time)[:, None] < jnp.asarray(seq_lengths)[None, :])[..., None]  # [T, B, 1]
  kernel = _use_cpu_kernel(cpu_kernel, cfg, cdt, sdt, custom_vjp)
  layer_fn = functools.partial(_layer_with_kernel, kernel) if custom_vjp else _layer_autodiff
  reset_tm = None if resets is None else jnp.swapaxes(jnp.asarray(resets, bool), 0, 1)[..., None]  # [T, B, 1]
  if reset_tm is not None and mask is not None:  # padded steps keep the state: a reset there must too
    reset_tm = reset_tm & mask

  # Time-major inside: transposing the (narrow) inputs once is cheaper than a [B, T, 4H] -> [T, B, 4H]
  # projection layout, which XLA:CPU runs as a slow non-canonical dot.
  x = jnp.swapaxes(inputs, 0, 1).astype(cdt)  # [T, B, F]
  if mask is not None:  # padding never reaches a matmul: NaN or inf there would poison every gradient
    x = jnp.where(mask, x, jnp.zeros((), cdt))
  if weight_drop > 0.0:
    rng, drop_key = jax.random.split(rng)
  h_final, c_final = [], []
  for layer in range(cfg.num_layers):
    if layer > 0 and dropout > 0.0:
      rng, key = jax.random.split(rng)
      keep = jax.random.bernoulli(key, 1.0 - dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), 0).astype(cdt)
    outputs = []
    for direction in range(cfg.num_directions):
      cell = params[_cell_name(layer, direction)]
      index = layer * cfg.num_directions + direction
      w_hh = cell['w_hh']  # [R, 4H]
      if weight_drop > 0.0:
        keep = jax.random.bernoulli(jax.random.fold_in(drop_key, index), 1.0 - weight_drop, w_hh.shape)
        w_hh = jnp.where(keep, w_hh / (1.0 - weight_drop), jnp.zeros((), w_hh.dtype))
      hs, hT, cT = layer_fn(
        x, cell['w_ih'], cell['b'].astype(sdt), w_hh, cell.get('w_hr'), h_init[index], c_init[index],
        mask, reset_tm, bool(reverse) != bool(direction), cdt, unroll,
      )  # fmt: skip
      if mask is not None:
        hs = jnp.where(mask, hs, 0)
      outputs.append(hs.astype(cdt))  # [T, B, R]
      h_final.append(hT)
      c_final.append(cT)
    x = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=-1)  # [T, B, D * R]
  return jnp.swapaxes(x, 0, 1), LSTMCarry(jnp.stack(h_final), jnp.stack(c_final))


# ---------------------------------------------------------------------------------------------------------
# PyTorch conversion.


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor
    value = value.detach().cpu().float().numpy()
  return np.asarray(value)


def params_from_torch(state_dict) -> Params:
  """Converts a torch.nn.LSTM state_dict (any num_layers, bidirectional, proj_size, bias) to params."""
  sd = {k: _to_numpy(v) for k, v in state_dict.items()}
  if 'weight_ih_l0' not in sd:
    raise ValueError(f"state_dict is not a torch.nn.LSTM state_dict (no 'weight_ih_l0'); keys: {sorted(sd)}")
  params = {}
  layer = 0
  while f'weight_ih_l{layer}' in sd:
    for direction, suffix in enumerate(('', '_reverse')):
      key = f'l{layer}{suffix}'
      if f'weight_ih_{key}' not in sd:
        continue
      w_hh = sd[f'weight_hh_{key}']  # [4H, R]
      b = sd.get(f'bias_ih_{key}', np.zeros(w_hh.shape[0], w_hh.dtype))
      b = b + sd.get(f'bias_hh_{key}', np.zeros_like(b))
      cell = {'w_ih': jnp.asarray(sd[f'weight_ih_{key}'].T), 'w_hh': jnp.asarray(w_hh.T), 'b': jnp.asarray(b)}
      if f'weight_hr_{key}' in sd:
        cell['w_hr'] = jnp.asarray(sd[f'weight_hr_{key}'].T)  # torch [P, H] -> [H, P]
      params[_cell_name(layer, direction)] = cell
    layer += 1
  _config(params)
  return params


def params_to_torch(params: Params) -> dict[str, Any]:
  """Converts params to a torch.nn.LSTM state_dict (torch tensors if torch is importable, else NumPy).

  Our single bias goes to bias_ih; bias_hh is zero (the LSTM only sees their sum).
  """
  cfg = _config(params)
  sd = {}
  for layer in range(cfg.num_layers):
    for direction in range(cfg.num_directions):
      cell = {k: np.asarray(v) for k, v in params[_cell_name(layer, direction)].items()}
      key = f'l{layer}' + ('_reverse' if direction else '')
      sd[f'weight_ih_{key}'] = cell['w_ih'].T
      sd[f'weight_hh_{key}'] = cell['w_hh'].T
      sd[f'bias_ih_{key}'] = cell['b']
      sd[f'bias_hh_{key}'] = np.zeros_like(cell['b'])
      if 'w_hr' in cell:
        sd[f'weight_hr_{key}'] = cell['w_hr'].T
  try:
    import torch
  except ImportError:
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}
  return {k: torch.from_numpy(np.array(v, order='C')) for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------------
# Flax NNX module.


class LSTM(nnx.Module):
  """Thin NNX holder of an `init_lstm` params pytree around `lstm`.

  Between-layer dropout and weight drop are active only when `deterministic` is False (`model.train()` /
  `model.eval()` toggle it); their keys come from the 'dropout' stream of `rngs`, kept in the module like
  nnx.Dropout.
  """

  def __init__(
    self,
    input_size: int,
    hidden_size: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    proj_size: int = 0,
    dropout: float = 0.0,
    weight_drop: float = 0.0,
    dtype: Any = None,
    forget_bias: float = 1.0,
    orthogonal_recurrent: bool = True,
    param_dtype: Any = jnp.float32,
    deterministic: bool = False,
    rngs: nnx.Rngs,
  ):
    check_rate('dropout', dropout)
    check_rate('weight_drop', weight_drop)
    params = init_lstm(
      rngs.params(), input_size, hidden_size, num_layers=num_layers, bidirectional=bidirectional,
      proj_size=proj_size, forget_bias=forget_bias, orthogonal_recurrent=orthogonal_recurrent,
      param_dtype=param_dtype,
    )  # fmt: skip
    self.params = nnx.data(jax.tree.map(nnx.Param, params))
    self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
    self.bidirectional, self.proj_size = bidirectional, proj_size
    self.dropout, self.weight_drop = dropout, weight_drop
    self.dtype, self.deterministic = dtype, deterministic
    self.rngs = rngs['dropout'].fork()

  def set_view(self, deterministic: bool | None = None):
    """For nnx.view: deterministic=True disables between-layer dropout."""
    if deterministic is not None:
      self.deterministic = deterministic

  def pure_params(self) -> Params:
    """The params pytree of plain arrays, as `lstm` takes it."""
    return jax.tree.map(lambda v: v[...], self.params, is_leaf=lambda v: isinstance(v, nnx.Variable))

  def zero_carry(self, batch_size: int) -> LSTMCarry:
    return zero_carry(self.pure_params(), batch_size)

  def __call__(self, inputs, *, seq_lengths=None, initial_carry=None, resets=None, reverse=False):
    """inputs [batch, time, input_size] -> (outputs [batch, time, D * (P or H)], final LSTMCarry)."""
    dropout = 0.0 if self.deterministic or self.num_layers == 1 else self.dropout
    weight_drop = 0.0 if self.deterministic else self.weight_drop
    rng = self.rngs() if dropout > 0.0 or weight_drop > 0.0 else None
    return lstm(
      self.pure_params(), inputs, seq_lengths=seq_lengths, initial_carry=initial_carry, resets=resets,
      reverse=reverse, dropout=dropout, weight_drop=weight_drop, rng=rng, dtype=self.dtype,
    )  # fmt: skip
