"""Fused (flash) attention: one public entry point, one kernel file per backend behind it.

  backend='gpu' (alias 'triton')  `flash_attention_triton.py`, the Pallas Triton kernels (any NVIDIA/AMD
                                  GPU that Triton supports; JAX 0.10 and 0.11).
  backend='tpu'                   `flash_attention_tpu.py`, the Pallas Mosaic TPU kernels.
  backend=None                    the kernel of the platform the call is lowered for: TPU's on TPU,
                                  Triton's on CUDA/ROCm, and on CPU the Triton kernels in the Pallas
                                  interpreter (slow, exact: for tests and `implementation='pallas'` on a
                                  laptop). Chosen at lowering (`lax.platform_dependent`), so compiling or
                                  exporting for a GPU/TPU from a CPU host gets the compiled kernel.

  backend='mosaic_gpu'            `flash_attention_mosaic_gpu.py`, the Pallas Mosaic GPU kernels for Hopper
                                  (sm_90a: wgmma, TMA pipeline, warp specialisation), bfloat16/float16.
                                  Opt-in only: compiled on CUDA, interpreted elsewhere; never picked by
                                  backend=None until a GPU run has verified and timed it (BUILD_NOTES.md).

Semantics are those of `reference.mha_reference` (= `jax.nn.dot_product_attention` plus segment ids, with
fully masked rows giving 0 and zero gradient). Arguments are validated once, by `reference.check_inputs`
in `flash_attention`; `flash_attention_from_spec` takes what it returns (scale and a `MaskSpec`) and is
the entry `dot_product_attention` calls, having validated them itself. Each backend file has the same pair.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from lstm_attn.kernels import reference

BACKENDS = ('gpu', 'triton', 'tpu', 'mosaic_gpu')

# The MaskSpec fields that are arrays: operands of lax.platform_dependent (the rest is static).
_SPEC_ARRAYS = ('query_seq_lengths', 'key_value_seq_lengths', 'q_segment_ids', 'kv_segment_ids')

# The platforms whose compiled kernel each backend is; on every other platform it runs interpreted.
_COMPILED_ON = {'gpu': ('cuda', 'rocm'), 'tpu': ('tpu',), 'mosaic_gpu': ('cuda',)}


def _default_backend() -> str:
  platform = jax.default_backend()
  if platform == 'tpu':
    return 'tpu'
  return 'gpu'  # 'gpu'/'cuda'/'rocm' compiled; 'cpu' (and anything else) through the interpreter


def _kernel(backend: str):
  """The backend's validated-input entry: (query, key, value, scale, spec, *, block_sizes, interpret)."""
  if backend == 'tpu':
    from lstm_attn.kernels.flash_attention_tpu import flash_attention_tpu_from_spec

    return flash_attention_tpu_from_spec
  if backend == 'mosaic_gpu':
    from lstm_attn.kernels.flash_attention_mosaic_gpu import flash_attention_mosaic_gpu_from_spec

    return flash_attention_mosaic_gpu_from_spec
  from lstm_attn.kernels.flash_attention_triton import flash_attention_triton_from_spec

  return flash_attention_triton_from_spec


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
    block_sizes: the chosen backend's BlockSizes (`flash_attention_triton.BlockSizes`,
      `flash_attention_tpu.BlockSizes` or `flash_attention_mosaic_gpu.BlockSizes`), or None for its
      defaults.
    backend: 'gpu' (or 'triton'), 'tpu', 'mosaic_gpu' (Hopper, bf16/fp16, opt-in), or None: the kernel of
      the platform the call is lowered for (TPU on TPU, Triton elsewhere).
    interpret: run in the Pallas interpreter; None means "when lowered for a platform other than the
      backend's". The choice is made when the computation is lowered, not from the default device, so
      `jax.jit(...).lower()` / `jax.export` for a GPU or TPU from a CPU host contain the compiled kernel.

  Returns:
    [batch, q_len, num_heads, head_dim] in query.dtype. Rows that see no key are 0, with zero gradient.

  Where the Triton kernel cannot take the inputs, its branches run `chunked_attention` (exact): float32 at
  head_dim > 128 lowered for a GPU with default tiles (they do not fit in shared memory), and, with
  backend=None, head_dim > 256 (the TPU kernel's branch takes it). Block sizes of one backend pick that
  backend: TPU block sizes with backend=None run the TPU kernel, interpreted off a TPU.
  """
  scale, spec = reference.check_inputs(
    query,
    key,
    value,
    scale=scale,
    is_causal=is_causal,
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    local_window_size=local_window_size,
    segment_ids=segment_ids,
  )
  return flash_attention_from_spec(
    query, key, value, scale, spec, block_sizes=block_sizes, backend=backend, interpret=interpret
  )


def flash_attention_from_spec(
  query, key, value, scale: float, spec: reference.MaskSpec, *, block_sizes=None, backend=None, interpret=None
):
  """`flash_attention` on validated inputs: the 'pallas' entry of `dot_product_attention`'s table.

  scale, spec: what `reference.check_inputs` returned for query, key and value; the other arguments are
  those of `flash_attention`. The backend kernel checks only its own limits and options.
  """
  if backend is not None and backend not in BACKENDS:
    raise ValueError(f'backend must be one of {BACKENDS} or None, got {backend!r}.')
  if backend == 'triton':
    backend = 'gpu'
  if backend is None and block_sizes is not None:  # block sizes belong to one backend's kernel
    from lstm_attn.kernels import flash_attention_mosaic_gpu, flash_attention_tpu

    if isinstance(block_sizes, flash_attention_tpu.BlockSizes):
      backend = 'tpu'
    elif isinstance(block_sizes, flash_attention_mosaic_gpu.BlockSizes):
      backend = 'mosaic_gpu'
    else:
      backend = 'gpu'
  if interpret is not None:
    backend = backend or _default_backend()
    return _kernel(backend)(query, key, value, scale, spec, block_sizes=block_sizes, interpret=interpret)
  if jnp.dtype(query.dtype) == jnp.float64:  # no compiled kernel takes float64: the interpreter does
    return _kernel(backend or 'gpu')(query, key, value, scale, spec, block_sizes=block_sizes, interpret=True)

  from lstm_attn.kernels import flash_attention_triton

  # lax.platform_dependent traces every branch on every platform, so no branch may reject inputs another
  # accepts. Where Triton cannot take them, its branches run the exact flash-style jnp implementation:
  # float32 at head_dim > 128 compiled (its tiles do not fit in shared memory; see its error) with the
  # default tiles, and, when no backend was named, head_dim > 256 (which the TPU kernel takes).
  head_dim = query.shape[-1]
  too_wide = backend is None and head_dim > flash_attention_triton.MAX_HEAD_DIM
  compiled_fits = flash_attention_triton.compiles_for(head_dim, query.dtype) or block_sizes is not None

  def triton_takes(interpret: bool) -> bool:
    return not too_wide and (interpret or compiled_fits)

  def branch(kernel_backend, interpret):
    def run(query, key, value, arrays):
      branch_spec = dataclasses.replace(spec, **arrays)  # the operands, not the closed-over arrays
      if kernel_backend == 'gpu' and not triton_takes(interpret):
        from lstm_attn.kernels.chunked_attention import chunked_attention_from_spec

        return chunked_attention_from_spec(query, key, value, scale, branch_spec)
      return _kernel(kernel_backend)(
        query, key, value, scale, branch_spec, block_sizes=block_sizes, interpret=interpret
      )

    return run

  arrays = {name: getattr(spec, name) for name in _SPEC_ARRAYS}  # None where absent
  backends = (backend,) if backend else ('gpu', 'tpu')
  compiled = {}
  for b in backends:  # one function object per backend: platform_dependent merges platforms that share one
    run_compiled = branch(b, False)
    compiled.update({p: run_compiled for p in _COMPILED_ON[b]})
  # Elsewhere (CPU): the chosen backend's kernel, or Triton's, in the interpreter.
  return lax.platform_dependent(query, key, value, arrays, default=branch(backend or 'gpu', True), **compiled)
