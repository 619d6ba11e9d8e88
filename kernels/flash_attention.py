"""Fused (flash) attention: one public entry point, one kernel file per backend behind it.

  backend='gpu' (alias 'triton')  `flash_attention_triton.py`, the Pallas Triton kernels (any NVIDIA/AMD
                                  GPU that Triton supports; JAX 0.10 and 0.11).
  backend='tpu'                   `flash_attention_tpu.py`, the Pallas Mosaic TPU kernels.
  backend=None                    the default device's kernel; on CPU the Triton kernels in the Pallas
                                  interpreter (slow, exact: for tests and for `implementation='pallas'` on
                                  a laptop).

A Mosaic GPU (Hopper: wgmma, TMA, warp specialisation) kernel would be a third file,
`flash_attention_mosaic_gpu.py`, with the same keyword signature; `backend='gpu'` would pick it on
compute capability 9.x and keep Triton elsewhere (see BUILD_NOTES.md, "Mosaic GPU plan").

Semantics are those of `reference.mha_reference` (= `jax.nn.dot_product_attention` plus segment ids, with
fully masked rows giving 0 and zero gradient); every argument is validated by `reference.check_inputs`.
"""

from __future__ import annotations

import jax

BACKENDS = ('gpu', 'triton', 'tpu')


def _default_backend() -> str:
  platform = jax.default_backend()
  if platform == 'tpu':
    return 'tpu'
  return 'gpu'  # 'gpu'/'cuda'/'rocm' compiled; 'cpu' (and anything else) through the interpreter


def flash_attention(
  query,
  key,
  value,
  *,
  scale=None,
  is_causal=False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  local_window_size=None,
  segment_ids=None,
  block_sizes=None,
  backend=None,
  interpret=None,
):
  """Multi-head attention with a fused Pallas kernel; differentiable in query, key and value.

  Args:
    query: [batch, q_len, num_heads, head_dim], float16/bfloat16/float32.
    key, value: [batch, kv_len, num_kv_heads, head_dim]; num_heads % num_kv_heads == 0 (GQA/MQA).
    scale: logit scale; default 1 / sqrt(head_dim).
    is_causal: key position <= query position, top-left aligned (as jax.nn.dot_product_attention).
    query_seq_lengths, key_value_seq_lengths: [batch] ints; positions at or past them are hidden.
    local_window_size: int or (left, right): query i sees keys in [i - left, i + right].
    segment_ids: [batch, seq] ints (q_len == kv_len) or a (query_ids, key_value_ids) pair.
    block_sizes: the chosen backend's BlockSizes (`flash_attention_triton.BlockSizes` or
      `flash_attention_tpu.BlockSizes`), or None for its defaults.
    backend: 'gpu' (or 'triton'), 'tpu', or None for the default device's.
    interpret: run in the Pallas interpreter; None means "when the backend's device is absent".

  Returns:
    [batch, q_len, num_heads, head_dim] in query.dtype. Rows that see no key are 0, with zero gradient.
  """
  if backend is None:
    backend = _default_backend()
  if backend not in BACKENDS:
    raise ValueError(f'backend must be one of {BACKENDS} or None, got {backend!r}.')
  kwargs = dict(
    scale=scale,
    is_causal=is_causal,
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    local_window_size=local_window_size,
    segment_ids=segment_ids,
    block_sizes=block_sizes,
  )
  platform = jax.default_backend()
  if backend == 'tpu':
    from lstm_attn.kernels.flash_attention_tpu import flash_attention_tpu

    if interpret is None:
      interpret = platform != 'tpu'
    return flash_attention_tpu(query, key, value, interpret=interpret, **kwargs)

  from lstm_attn.kernels.flash_attention_triton import flash_attention_triton

  if interpret is None:
    interpret = platform not in ('gpu', 'cuda', 'rocm')
  return flash_attention_triton(query, key, value, interpret=interpret, **kwargs)
