"""Float64 NumPy references for the attention tests: the mask predicate, attention and its gradients,
LayerNorm and GELU, written from the equations and independent of the library code under test."""

import math

import jax.numpy as jnp
import numpy as np


def randn(seed, shape, dtype=jnp.float32):
  """Standard normal test data from NumPy (jax.random would compile a kernel for every new shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32).astype(dtype))


def mask(
  batch, q_len, kv_len, *, causal=False, window=None, q_lens=None, kv_lens=None, q_seg=None, kv_seg=None
):
  """[batch, 1, q_len, kv_len] bool, True = attend (jax.nn's top-left causal, window (left, right))."""
  qi = np.arange(q_len)[:, None]
  kj = np.arange(kv_len)[None, :]
  keep = np.ones((batch, q_len, kv_len), bool)
  if causal:
    keep &= kj <= qi
  if window is not None:
    left, right = (window, window) if isinstance(window, int) else window
    keep &= (kj >= qi - left) & (kj <= qi + right)
  if q_lens is not None:
    keep &= np.arange(q_len)[None, :, None] < np.asarray(q_lens)[:, None, None]
  if kv_lens is not None:
    keep &= np.arange(kv_len)[None, None, :] < np.asarray(kv_lens)[:, None, None]
  if q_seg is not None:
    keep &= np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
  return keep[:, None]


def _f64(x):
  a = np.asarray(x)
  return a if a.dtype == np.float64 else a.astype(np.float32).astype(np.float64)


def attention(q, k, v, keep, scale=None, bias=None, d_out=None):
  """q [B, T, N, D], k/v [B, S, K, D], keep broadcastable to [B, N, T, S] -> out [B, T, N, D].

  Empty rows give zeros. With d_out (a cotangent like out), returns (out, (dq, dk, dv)).
  """
  q, k, v = _f64(q), _f64(k), _f64(v)
  heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
  group = heads // kv_heads
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # head h uses kv head h // group
  s = np.einsum('btnd,bsnd->bnts', q, kr) * scale
  if bias is not None:
    s = s + _f64(bias)
  keep = np.broadcast_to(keep, s.shape)
  s = np.where(keep, s, -np.inf)
  m = s.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(keep, np.exp(s - m), 0.0)
  denom = p.sum(-1, keepdims=True)
  p = p / np.where(denom == 0, 1.0, denom)
  out = np.einsum('bnts,bsnd->btnd', p, vr)
  if d_out is None:
    return out
  do = _f64(d_out)
  dv = np.einsum('bnts,btnd->bsnd', p, do)
  dp = np.einsum('btnd,bsnd->bnts', do, vr)
  ds = p * (dp - (p * dp).sum(-1, keepdims=True))
  dq = np.einsum('bnts,bsnd->btnd', ds, kr) * scale
  dk = np.einsum('bnts,btnd->bsnd', ds, q) * scale
  fold = lambda g: g.reshape(g.shape[0], g.shape[1], kv_heads, group, head_dim).sum(3)
  return out, (dq, fold(dk), fold(dv))


def layer_norm(x, scale, bias, eps):
  x = _f64(x)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * _f64(scale) + _f64(bias)


def gelu(x):
  """Exact (erf) GELU."""
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def linear(x, layer):
  """An nnx.Linear applied in float64."""
  y = _f64(x) @ _f64(layer.kernel[...])
  return y if layer.bias is None else y + _f64(layer.bias[...])


def mha(module, x, context, keep, positions=None, base=10000.0):
  """The module's forward pass in float64 NumPy from its parameters: projections, heads, attention."""
  b, t, _ = x.shape
  src = x if context is None else context
  q = linear(x, module.query).reshape(b, t, module.num_heads, module.head_dim)
  k = linear(src, module.key).reshape(b, src.shape[1], module.num_kv_heads, module.head_dim)
  v = linear(src, module.value).reshape(k.shape)
  if positions is not None:  # rotary, as complex multiplication
    half = module.head_dim // 2
    theta = np.asarray(positions, np.float64)[..., None, None] * base ** (
      -np.arange(half) * 2 / module.head_dim
    )
    rot = lambda a: (lambda z: np.concatenate([z.real, z.imag], -1))(
      (a[..., :half] + 1j * a[..., half:]) * np.exp(1j * theta)
    )
    q, k = rot(q), rot(k)
  out = attention(q, k, v, keep)
  return linear(out.reshape(b, t, -1), module.out)
