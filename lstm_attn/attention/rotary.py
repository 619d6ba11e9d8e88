"""Rotary position embedding (RoFormer; the half-split layout of GPT-NeoX and LLaMA).

`apply_rotary(x, positions)` is the public function. `MultiHeadAttention` builds the cos/sin tables once
with `rotary_tables` and applies them to queries and keys with `apply_tables`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def apply_rotary(x, positions, base: float = 10000.0):
  """Rotary position embedding (RoFormer; the half-split layout of GPT-NeoX and LLaMA).

  Channel pairs (j, j + head_dim/2) are rotated by the angle positions * base^(-2j / head_dim).

  Args:
    x: [batch, seq, heads, head_dim], head_dim even.
    positions: [seq] or [batch, seq] integer (or float) absolute positions; a NumPy array makes the
      cos/sin tables compile-time constants (faster under jit).
    base: the frequency base (10000 in the paper).

  Returns:
    [batch, seq, heads, head_dim] in x.dtype (computed in float32, float64 for float64 inputs).
  """
  return apply_tables(x, rotary_tables(x, positions, base))


def rotary_tables(x, positions, base):
  """(cos, sin) [1|B, T, 1, head_dim/2] for x [B, T, H, D]; any x with the same B, T, D shares them."""
  if jnp.ndim(x) != 4:
    raise ValueError(f'x must have rank 4 [batch, seq, heads, head_dim], got shape {jnp.shape(x)}.')
  batch, seq, _, head_dim = x.shape
  if head_dim % 2:
    raise ValueError(f'rotary embeddings need an even head_dim, got {head_dim}.')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'x must be a float array (queries or keys), got {x.dtype}.')
  positions = positions if isinstance(positions, np.ndarray) else jnp.asarray(positions)
  if positions.shape not in ((seq,), (batch, seq)):
    raise ValueError(
      f'positions must have shape [seq] = ({seq},) or [batch, seq] = ({batch}, {seq}), got {positions.shape}.'
    )
  compute = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
  # NumPy positions (the default arange) give NumPy tables, constants in the compiled program: traced
  # ones let XLA recompute cos/sin inside every fusion that reads them (the transposing copies of the
  # weight-gradient matmuls, for one), which cost ~2 ms of the gpt_char step on CPU.
  xp = np if isinstance(positions, np.ndarray) else jnp
  inv_freq = base ** (-xp.arange(head_dim // 2, dtype=compute) * 2 / head_dim)  # [half]
  angles = positions.astype(compute)[..., None] * inv_freq  # [(batch,) seq, half]
  angles = angles[..., None, :] if positions.ndim == 2 else angles[None, :, None, :]  # [1|B, T, 1, half]
  return xp.cos(angles), xp.sin(angles)


def apply_tables(x, tables):
  cos, sin = tables
  return _rotate(x.astype(cos.dtype), cos, sin).astype(x.dtype)


@jax.custom_vjp
def _rotate(x, cos, sin):
  """x [B, T, H, D] rotated pairwise by the angles whose cos/sin are [1|B, T, 1, D/2].

  A custom VJP because the gradient of a rotation is the inverse rotation, one fused elementwise op;
  autodiff of the half slices instead pads and adds two half-size cotangents (XLA:CPU profile of the
  gpt_char train step: 1.9 ms of pad fusions plus copies, ~7% of the step, vs ~0.3 ms this way).
  """
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rotate_fwd(x, cos, sin):
  return _rotate(x, cos, sin), (x, cos, sin)


def _rotate_bwd(res, g):
  x, cos, sin = res
  half = x.shape[-1] // 2
  x1, x2, g1, g2 = x[..., :half], x[..., half:], g[..., :half], g[..., half:]
  dx = jnp.concatenate([g1 * cos + g2 * sin, g2 * cos - g1 * sin], axis=-1)  # rotation by -angle
  # Cotangents of the tables, summed over the axes they were broadcast along (XLA drops them when
  # positions are integers, the usual case).
  reduce = lambda t, like: jnp.sum(
    t, axis=tuple(i for i in range(4) if like.shape[i] == 1 < t.shape[i]), keepdims=True
  )
  dcos = reduce(g1 * x1 + g2 * x2, cos)
  dsin = reduce(g2 * x1 - g1 * x2, sin)
  return dx, dcos, dsin


_rotate.defvjp(_rotate_fwd, _rotate_bwd)
