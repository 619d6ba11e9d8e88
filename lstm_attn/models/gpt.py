"""GPT: a decoder-only Transformer language model (GPT-2 / nanoGPT layout), in Flax NNX.

    tokens [B, T] -> wte (+ wpe for learned positions) -> dropout -> pre-LN TransformerBlock x L -> ln_f
                  -> logits = h @ wte.T                       (tied; an untied lm_head when asked)

`use_bias=False` drops every bias (Q/K/V/O and MLP Linears, and the LayerNorms' offsets), as nanoGPT's
`bias=False`; LayerNorm epsilon is 1e-5 everywhere (ln_f included), as nanoGPT and GPT-2.

Initialisation as nanoGPT: every Linear and Embed ~ N(0, 0.02), biases 0, and the two projections that
write into the residual stream (attn.out, mlp.fc2) ~ N(0, 0.02 / sqrt(2 * num_layers)). Positions are
learned (wpe, up to max_len) or rotary (applied inside attention; no wpe). Every attention call goes
through `lstm_attn.attention.MultiHeadAttention`, i.e. `dot_product_attention`.

Parameter layout:
    model.backbone.wte.embedding            [vocab, d_model]
    model.backbone.wpe.embedding            [max_len, d_model]    (learned positions only)
    model.backbone.blocks[i]                lstm_attn.transformer.TransformerBlock (ln1, attn, ln2, mlp)
    model.backbone.ln_f
    model.lm_head                           Linear(d_model -> vocab, no bias), only when untied
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lstm_attn.attention import KVCache
from lstm_attn.models.common import (
  TrunkOutput,
  check_tokens,
  check_vocab_size,
  count_params,
  normal_reinit,
  residual_std,
  segment_positions,
)
from lstm_attn.transformer import TransformerBlock

if TYPE_CHECKING:
  from lstm_attn.models.specs import GPTConfig

Array = jax.Array
POSITIONS = ('learned', 'rotary')


def _is_residual_projection(path) -> bool:
  names = tuple(str(p) for p in path)
  return names[-2:] in (('attn', 'out'), ('mlp', 'fc2'))


class GPTTrunk(nnx.Module):
  """Token (+ position) embedding, pre-LN blocks and the final LayerNorm: the reusable backbone.

  config: a GPTConfig (checked when it was made).
  """

  def __init__(self, config: GPTConfig, vocab_size: int, *, rngs: nnx.Rngs):
    check_vocab_size(vocab_size)
    d_model, dtype = config.d_model, config.compute_dtype
    self.num_layers, self.max_len, self.positions = config.num_layers, config.max_len, config.positions
    self.dtype = dtype
    self.wte = nnx.Embed(vocab_size, d_model, dtype=dtype, rngs=rngs)
    self.features = d_model  # the size of each hidden state the trunk returns
    learned = config.positions == 'learned'
    self.wpe = nnx.Embed(config.max_len, d_model, dtype=dtype, rngs=rngs) if learned else None
    self.drop = nnx.Dropout(config.dropout, rngs=rngs)
    self.blocks = nnx.List(
      [
        TransformerBlock(
          d_model,
          config.num_heads,
          config.mlp_width,
          num_kv_heads=config.num_kv_heads,
          dropout=config.dropout,
          pre_norm=True,
          rotary=config.positions == 'rotary',
          activation=config.activation,
          use_bias=config.use_bias,
          implementation=config.attention_impl,
          dtype=dtype,
          rngs=rngs,
        )
        for _ in range(config.num_layers)
      ]
    )
    self.ln_f = nnx.LayerNorm(d_model, epsilon=1e-5, use_bias=config.use_bias, dtype=dtype, rngs=rngs)
    normal_reinit(
      self,
      rngs.params(),
      std=0.02,
      residual_std=residual_std(config.num_layers),
      is_residual=_is_residual_projection,
    )

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> tuple[KVCache, ...]:
    if self.positions == 'learned' and max_len > self.max_len:
      raise ValueError(
        f'max_len {max_len} exceeds the learned positions of the model (max_len={self.max_len}).'
      )
    return tuple(block.init_cache(batch_size, max_len, dtype) for block in self.blocks)

  def __call__(self, tokens, *, seq_lengths=None, segment_ids=None, positions=None, cache=None):
    """tokens [B, T] -> TrunkOutput(hidden [B, T, d_model] after ln_f, no state, new cache or None).

    seq_lengths [B]: right padding (keys past the length are hidden). segment_ids [B, T]: packed documents
    (attention stays inside a segment; positions restart at each segment). positions [B, T] or [T]
    overrides the defaults (arange; the cache length + arange with a cache).
    """
    check_tokens(tokens, vocab_size=self.wte.num_embeddings)
    batch, seq = tokens.shape
    if cache is not None:
      if seq_lengths is not None or segment_ids is not None:
        raise ValueError('with a cache, seq_lengths and segment_ids must be None.')
      if positions is None:
        positions = cache[0].length + jnp.arange(seq, dtype=jnp.int32)  # [T]
    elif positions is None:
      positions = (
        segment_positions(jnp.asarray(segment_ids))
        if segment_ids is not None
        else np.arange(seq, dtype=np.int32)  # NumPy: constant rotary tables (attention.apply_rotary)
      )
    if self.wpe is not None and cache is None and seq > self.max_len:  # rotary positions extrapolate
      raise ValueError(
        f'tokens has {seq} positions but the learned position table has max_len={self.max_len}.'
      )
    x = self.wte(tokens)  # [B, T, d]
    if self.wpe is not None:
      x = x + self.wpe(positions)  # [(B,) T, d]
    x = self.drop(x)
    new_cache = []
    for i, block in enumerate(self.blocks):
      if cache is None:
        x = block(
          x, is_causal=True, key_value_seq_lengths=seq_lengths, segment_ids=segment_ids, positions=positions
        )
      else:
        x, c = block(x, is_causal=True, positions=positions, cache=cache[i])
        new_cache.append(c)
    x = self.ln_f(x)
    return TrunkOutput(x, None, None if cache is None else tuple(new_cache))


class GPT(nnx.Module):
  """Causal Transformer language model. `model(tokens) -> logits [B, T, vocab]` (float32).

  config: a GPTConfig, e.g. `GPT(GPTConfig(d_model=64, num_layers=2), vocab_size, rngs=nnx.Rngs(0))`.
  """

  def __init__(self, config: GPTConfig, vocab_size: int, *, rngs: nnx.Rngs):
    self.backbone = GPTTrunk(config, vocab_size, rngs=rngs)
    self.tie_embeddings = config.tie_embeddings
    self.lm_head = (
      None
      if self.tie_embeddings
      else nnx.Linear(
        config.d_model,
        vocab_size,
        use_bias=False,
        dtype=config.compute_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
      )
    )

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), as nanoGPT's estimate_mfu (PaLM appendix B):
    6 * (params without position embeddings) + 12 * layers * d_model * seq_len for attention."""
    params = count_params(self)
    if self.backbone.wpe is not None:
      params -= self.backbone.wpe.embedding.size
    d_model = self.backbone.wte.features
    return 6.0 * params + 12.0 * self.backbone.num_layers * d_model * seq_len

  def logits_from_hidden(self, h):
    if self.lm_head is None:
      return self.backbone.wte.attend(h).astype(jnp.float32)
    return self.lm_head(h).astype(jnp.float32)

  def __call__(self, tokens, *, seq_lengths=None, segment_ids=None, positions=None):
    out = self.backbone(tokens, seq_lengths=seq_lengths, segment_ids=segment_ids, positions=positions)
    return self.logits_from_hidden(out.hidden)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> tuple[KVCache, ...]:
    return self.backbone.init_cache(batch_size, max_len, dtype)

  def decode(self, tokens, cache):
    """tokens [B, t] continuing the cached sequence -> (logits [B, t, V], new cache)."""
    out = self.backbone(tokens, cache=cache)
    return self.logits_from_hidden(out.hidden), out.cache
