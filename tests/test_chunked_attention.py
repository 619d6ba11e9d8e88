"""Chunked (flash-style jnp) attention: the shared sweep (tests/attention_harness.py) with small blocks,
its own argument errors, and memory that grows linearly with the sequence length."""

import jax
import jax.numpy as jnp
import pytest
from attention_harness import AttentionHarness

from lstm_attn.kernels import reference
from lstm_attn.kernels.chunked_attention import chunked_attention

# Small blocks so that every case spans several query and key/value blocks, padding and skipping:
# 256 = 4 x 64 = 8 x 32 (nothing padded), and the odd lengths pad the last block.
BLOCKS = dict(block_q=64, block_kv=32)


class TestChunkedAttention(AttentionHarness):
  """The shared sweep on `chunked_attention` called directly, with blocks small enough that every case
  spans several query and key/value blocks, with padding and skipped blocks."""

  BLOCK_SIZES = BLOCKS

  def attention(self, q, k, v, **mask_kwargs):
    return chunked_attention(q, k, v, **mask_kwargs, **(self.block_sizes or {}))


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
