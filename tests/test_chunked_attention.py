"""Chunked (flash-style jnp) attention against the float64 reference: outputs, gradients, memory growth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOLERANCE, assert_close

from lstm_attn.kernels import reference
from lstm_attn.kernels.chunked_attention import chunked_attention

# Small blocks so that every case spans several query and key/value blocks, padding and skipping.
BLOCKS = dict(block_q=64, block_kv=48)


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
  d_out = jax.random.normal(keys[3], q.shape, jnp.float32).astype(dtype)  # random cotangent
  return q, k, v, d_out


def _value_and_vjp(fn):
  """jit(q, k, v, d_out -> (fn(q, k, v), (dq, dk, dv))): one compiled forward + backward."""

  def run(q, k, v, d_out):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(d_out)

  return jax.jit(run)


def _check_against_reference(q, k, v, d_out, blocks=BLOCKS, **mask_kw):
  """Chunked forward + vjp in the inputs' dtype vs the reference in float64; returns the chunked results."""
  out, grads = _value_and_vjp(lambda q, k, v: chunked_attention(q, k, v, **mask_kw, **blocks))(q, k, v, d_out)
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x.astype(jnp.float32)), jnp.float64)
    ref_fn = lambda q, k, v: reference.mha_reference(q, k, v, **mask_kw)
    ref_out, ref_grads = _value_and_vjp(ref_fn)(f64(q), f64(k), f64(v), f64(d_out))
  assert out.dtype == q.dtype and out.shape == q.shape
  tol = TOLERANCE[np.dtype(q.dtype)]
  assert_close(out, ref_out, tol=tol, what='output')
  for name, g, ref_g in zip(('dq', 'dk', 'dv'), grads, ref_grads):
    assert g.dtype == q.dtype
    # Gradients of a softmax carry a few more roundings than the forward pass.
    assert_close(g, ref_g, tol=3 * tol, what=name)
  return out, grads


CASES = {
  'no_mask_no_padding': dict(shape=(2, 200, 192, 4, 4, 64), kw={}),  # 192 = 4 x 48: no mask at all
  'causal_gqa_333': dict(shape=(1, 333, 333, 4, 2, 40), kw=dict(is_causal=True)),
  'mqa_q_shorter': dict(shape=(2, 7, 200, 4, 1, 64), kw=dict(is_causal=True)),
  'q_longer_than_kv_empty_rows': dict(  # rows 37+ see no key: whole query blocks skipped
    shape=(1, 200, 7, 2, 2, 40), kw=dict(is_causal=True, local_window_size=(30, 0))
  ),
  'one_query_padded_kv': dict(shape=(2, 1, 333, 2, 1, 64), kw={}),  # 333 keys in 7 blocks of 48: 3 padded
  'window_pair': dict(shape=(1, 200, 200, 2, 2, 64), kw=dict(is_causal=True, local_window_size=(50, 0))),
  'window_int_one_query_block': dict(
    shape=(1, 200, 333, 2, 1, 40), kw=dict(local_window_size=30), blocks=dict(block_q=256, block_kv=64)
  ),
}


@pytest.mark.parametrize('name', list(CASES))
def test_matches_reference_float32(name):
  case = CASES[name]
  q, k, v, d_out = _inputs(0, *case['shape'], jnp.float32)
  _check_against_reference(q, k, v, d_out, blocks=case.get('blocks', BLOCKS), **case['kw'])


def test_ragged_lengths_and_fully_masked_rows():
  # Batch row 1 has no visible key at all (kv length 0): its output and gradients must be exactly 0.
  q, k, v, d_out = _inputs(1, 3, 200, 333, 4, 2, 64, jnp.float32)
  q_lens, kv_lens = jnp.array([200, 7, 150]), jnp.array([333, 0, 1])
  out, (dq, dk, dv) = _check_against_reference(
    q, k, v, d_out, query_seq_lengths=q_lens, key_value_seq_lengths=kv_lens, is_causal=True
  )
  assert np.all(np.asarray(out[1]) == 0) and np.all(np.asarray(dq[1]) == 0)
  assert np.all(np.asarray(out[2, 150:]) == 0), 'query rows past query_seq_lengths must be 0'
  assert np.all(np.asarray(dk[1]) == 0) and np.all(np.asarray(dv[2, 1:]) == 0)


def test_segment_ids_pair_and_empty_segments():
  # Query segment 3 exists in no key/value row: those query rows are fully masked.
  q, k, v, d_out = _inputs(2, 2, 200, 133, 4, 2, 64, jnp.float32)
  q_seg = jnp.sort(jax.random.randint(jax.random.key(5), (2, 200), 0, 4), axis=1)
  kv_seg = jnp.sort(jax.random.randint(jax.random.key(6), (2, 133), 0, 3), axis=1)
  out, (dq, _, _) = _check_against_reference(q, k, v, d_out, segment_ids=(q_seg, kv_seg))
  empty = np.asarray(q_seg) == 3
  assert empty.any() and np.all(np.asarray(out)[empty] == 0) and np.all(np.asarray(dq)[empty] == 0)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
  q, k, v, d_out = _inputs(3, 2, 333, 200, 4, 2, 64, dtype)
  segment_ids = jnp.sort(jax.random.randint(jax.random.key(7), (2, 200), 0, 2), axis=1)
  _check_against_reference(
    q,
    k,
    v,
    d_out,
    is_causal=True,
    key_value_seq_lengths=jnp.array([200, 120]),
    segment_ids=(jnp.zeros((2, 333), jnp.int32), segment_ids),
  )


@pytest.mark.parametrize(
  'bad, match',
  [
    (dict(query=jnp.zeros((2, 8, 4))), 'query must have rank 4'),
    (dict(key=jnp.zeros((1, 8, 3, 16)), value=jnp.zeros((1, 8, 3, 16))), 'multiple of key/value heads'),
    (dict(value=jnp.zeros((1, 8, 2, 16), jnp.bfloat16)), 'share a dtype'),
    (dict(block_q=0), 'block_q must be a positive int'),
    (dict(block_kv=2.5), 'block_kv must be a positive int'),
    (dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), 'segment_ids'),
    (dict(key_value_seq_lengths=jnp.zeros((2,), jnp.int32)), 'key_value_seq_lengths'),
    (dict(local_window_size=(-1, 2)), 'local_window_size'),
  ],
)
def test_bad_inputs_raise(bad, match):
  args = dict(query=jnp.zeros((1, 8, 4, 16)), key=jnp.zeros((1, 8, 2, 16)), value=jnp.zeros((1, 8, 2, 16)))
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    chunked_attention(args.pop('query'), args.pop('key'), args.pop('value'), **args)


def _fwd_bwd_temp_bytes(fn, seq_len, heads=4, head_dim=64):
  spec = jax.ShapeDtypeStruct((1, seq_len, heads, head_dim), jnp.float32)

  def fwd_bwd(q, k, v, d_out):
    _, vjp = jax.vjp(fn, q, k, v)
    return vjp(d_out)

  analysis = jax.jit(fwd_bwd).lower(spec, spec, spec, spec).compile().memory_analysis()
  if analysis is None:
    pytest.skip('this backend gives no compiled memory analysis')
  return analysis.temp_size_in_bytes


def test_memory_grows_linearly():
  chunked = lambda q, k, v: chunked_attention(q, k, v, is_causal=True, block_q=128, block_kv=128)
  ref = lambda q, k, v: reference.mha_reference(q, k, v, is_causal=True)
  small, large = (_fwd_bwd_temp_bytes(chunked, n) for n in (1024, 2048))
  ref_large = _fwd_bwd_temp_bytes(ref, 2048)
  assert large < 2.5 * small, f'chunked temp memory {small} -> {large} bytes is not linear in length'
  assert large * 8 < ref_large, f'chunked {large} bytes vs reference {ref_large} bytes'
