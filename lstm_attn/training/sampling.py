"""Text from a language model: `sample_text(model, tokenizer, ...)`, as the trainer and sample.py use it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lstm_attn.generate import generate


def sample_text(
  model: nnx.Module,
  tokenizer,
  *,
  rng: jax.Array,
  num_tokens: int,
  prompt: str = '\n',
  context_window: int | None = None,
  temperature: float = 0.8,
  top_k: int | None = None,
  top_p: float | None = None,
) -> str:
  """The prompt and `num_tokens` generated tokens after it, decoded.

  A model with a `context_window` (a GPT is trained on windows of `model.max_len` tokens: learned
  positions end there; rotary ones run on but were never trained on longer contexts) generates in
  windows, each continuing from the last half window of the text so far (as nanoGPT crops its context);
  None (the LSTMs) generates in one pass. An empty prompt starts from a newline.
  """
  tokens = np.asarray(tokenizer.encode(prompt), np.int32)
  if tokens.size == 0:
    tokens = np.asarray(tokenizer.encode('\n'), np.int32)
  if context_window is not None:
    tokens = tokens[-(context_window // 2) :]
  out = tokens
  produced = 0
  while produced < num_tokens:
    context = out if context_window is None else out[-(context_window // 2) :]
    n = num_tokens - produced
    if context_window is not None:
      n = min(n, context_window - len(context))
    rng, key = jax.random.split(rng)
    new = generate(
      model,
      jnp.asarray(context)[None, :],
      int(n),
      rng=key,
      temperature=float(temperature),
      top_k=top_k,
      top_p=top_p,
    )
    out = np.concatenate([out, np.asarray(new)[0, len(context) :]])
    produced += n
  return tokenizer.decode(out.tolist())
