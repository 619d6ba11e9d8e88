"""dot_product_attention at its edges, the same in every backend.

- A query row whose bias is -inf at every key it may see is fully masked: output 0 and gradient 0, never
  NaN, as a row that sees no key at all ('reference', 'xla' and implementation=None with a dense bias).
- Zero-sized batch or lengths give the empty result (or zeros: with no key, every row sees nothing) and a
  VJP of zeros shaped like the inputs, in every implementation; the arguments are still checked.
"""

import attention_np as ref_np
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_np import randn
from helpers import TOLERANCE, assert_close

from lstm_attn.attention import IMPLEMENTATIONS, dot_product_attention

B, T, S, N, K, D = 2, 5, 7, 4, 2, 16
DENSE = ['reference', 'xla', None]  # the implementations that take a dense bias (None picks 'xla')


def _bias(case):
  """[B, N, T, S] finite random bias with -inf entries; the rows meant to be fully masked."""
  bias = np.array(randn(3, (B, N, T, S)))
  bias[1, :, 0, 4:] = -np.inf  # a partly -inf row: still sees keys 0..3
  if case == 'whole_row':
    bias[0, :, 1, :] = -np.inf  # every head of query 1 in batch row 0
    bias[1, 2, 3, :] = -np.inf  # one head only
  else:  # 'visible_keys': causal row 2 sees keys 0..2, all -inf; the hidden keys 3.. stay finite
    bias[0, :, 2, :3] = -np.inf
  return bias


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'float16'])
@pytest.mark.parametrize('implementation', DENSE, ids=str)
@pytest.mark.parametrize('case', ['whole_row', 'visible_keys'])
def test_a_row_of_only_neg_inf_bias_is_fully_masked(case, implementation, dtype):
  causal = case == 'visible_keys'
  q, k, v = (randn(i, shape, dtype) for i, shape in enumerate([(B, T, N, D), (B, S, K, D), (B, S, K, D)]))
  bias = jnp.asarray(_bias(case), dtype)
  d_out = randn(4, (B, T, N, D), dtype)

  @jax.jit
  def run(q, k, v, bias):
    f = lambda q, k, v, bias: dot_product_attention(
      q, k, v, bias, is_causal=causal, implementation=implementation
    )
    out, vjp = jax.vjp(f, q, k, v, bias)
    return out, vjp(d_out)

  out, (dq, dk, dv, d_bias) = run(q, k, v, bias)
  for name, x in (('out', out), ('dq', dq), ('dk', dk), ('dv', dv), ('d_bias', d_bias)):
    assert bool(jnp.all(jnp.isfinite(x))), f'{name} has NaN or inf'
  keep = ref_np.mask(B, T, S, causal=causal) & ~np.isneginf(np.asarray(bias, np.float32))  # [B, N, T, S]
  empty = ~keep.any(-1).transpose(0, 2, 1)  # [B, T, N]
  assert empty.sum() == (5 if case == 'whole_row' else 4), 'the case must have fully masked rows'
  np.testing.assert_array_equal(np.asarray(out, np.float32)[empty], 0.0, err_msg='fully masked rows are 0')
  np.testing.assert_array_equal(np.asarray(dq, np.float32)[empty], 0.0, err_msg='and get 0 dq')
  db = np.asarray(d_bias, np.float32)
  np.testing.assert_array_equal(db[~keep], 0.0, err_msg='a hidden (or -inf) logit gets 0 bias gradient')
  # Everything else as the float64 reference (the fully masked rows included: 0 there too).
  ref_out, ref_grads = ref_np.attention(q, k, v, keep, bias=np.where(keep, bias, 0.0), d_out=d_out)
  tol = 3 * TOLERANCE[np.dtype(dtype)]  # low precision: the tolerance of the shared dtype table, with room
  assert_close(out, ref_out, tol=tol, what=f'{implementation} out')
  for name, g, ref in zip(('dq', 'dk', 'dv'), (dq, dk, dv), ref_grads):
    assert_close(g, ref, tol=tol, what=f'{implementation} {name}')


ZERO_SIZED = {'batch0': (0, 5, 7), 'q_len0': (2, 0, 7), 'kv_len0': (2, 5, 0), 'all0': (0, 0, 0)}


@pytest.mark.parametrize('implementation', [*IMPLEMENTATIONS, None], ids=str)
@pytest.mark.parametrize('sizes', sorted(ZERO_SIZED))
def test_zero_sized_batch_or_lengths_give_zeros_and_a_zero_vjp(sizes, implementation):
  batch, q_len, kv_len = ZERO_SIZED[sizes]
  q = randn(0, (batch, q_len, N, D))
  k, v = randn(1, (batch, kv_len, K, D)), randn(2, (batch, kv_len, K, D))
  lengths = jnp.full((batch,), kv_len, jnp.int32)
  segments = (jnp.zeros((batch, q_len), jnp.int32), jnp.zeros((batch, kv_len), jnp.int32))
  d_out = randn(3, q.shape)

  @jax.jit
  def run(q, k, v):
    f = lambda q, k, v: dot_product_attention(
      q,
      k,
      v,
      is_causal=True,
      key_value_seq_lengths=lengths,
      segment_ids=segments,
      implementation=implementation,
    )
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(d_out)

  out, grads = run(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_array_equal(out, 0.0)  # no key: every row is fully masked
  for g, x in zip(grads, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize('implementation', DENSE, ids=str)
@pytest.mark.parametrize('sizes', sorted(ZERO_SIZED))
def test_zero_sized_with_a_dense_bias_and_mask(sizes, implementation):
  batch, q_len, kv_len = ZERO_SIZED[sizes]
  q, k = randn(0, (batch, q_len, N, D)), randn(1, (batch, kv_len, K, D))
  bias, mask = randn(2, (batch, N, q_len, kv_len)), jnp.ones((q_len, kv_len), bool)
  f = lambda q, k, bias: dot_product_attention(q, k, k, bias, mask, implementation=implementation)
  out, vjp = jax.vjp(f, q, k, bias)
  assert out.shape == q.shape
  assert [g.shape for g in vjp(jnp.ones_like(out))] == [q.shape, k.shape, bias.shape]


def test_zero_sized_unbatched():
  out = dot_product_attention(randn(0, (0, N, D)), randn(1, (3, K, D)), randn(2, (3, K, D)))
  assert out.shape == (0, N, D)


def test_zero_sized_arguments_are_still_checked():
  q0, k0 = randn(0, (0, T, N, D)), randn(1, (0, S, K, D))
  with pytest.raises(ValueError, match='share a dtype'):
    dot_product_attention(q0, k0, k0.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match='multiple of key/value heads'):
    dot_product_attention(q0, randn(1, (0, S, 3, D)), randn(1, (0, S, 3, D)))
  q, k = randn(0, (2, 0, N, D)), randn(1, (2, S, K, D))
  with pytest.raises(ValueError, match='key and value must have the same shape'):
    dot_product_attention(randn(0, (2, T, N, D)), randn(1, (2, 0, K, D)), randn(1, (2, 1, K, D)))
  with pytest.raises(ValueError, match=r'query segment_ids must have shape \(2, 0\)'):
    dot_product_attention(q, k, k, segment_ids=(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, S), jnp.int32)))
  with pytest.raises(ValueError, match=r'key_value_seq_lengths must have shape \[batch\]'):
    dot_product_attention(q, k, k, key_value_seq_lengths=jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match='takes no dense bias'):
    dot_product_attention(q, k, k, jnp.zeros((0, S)), implementation='chunked')
  with pytest.raises(ValueError, match='bias must be broadcastable'):
    dot_product_attention(q, k, k, jnp.zeros((2, S)), implementation='xla')
  with pytest.raises(ValueError, match='scale must be finite'):
    dot_product_attention(q, k, k, scale=float('nan'))
