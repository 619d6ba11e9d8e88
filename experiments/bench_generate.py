r"""Cached generation vs re-running the forward for every new token (what generation without a cache costs).

    python experiments/bench_generate.py --new_tokens=64,256 --output_json=/tmp/bench_generate.json

Correctness first: greedy `lstm_attn.generate.generate` (prefill once, then one cached step per token)
must produce the same tokens as greedy decoding that re-runs the whole forward for every new token, on a
fixed-shape buffer of prompt + all new tokens (one compiled shape; causal, so the logits at the current
position are those of the prefix alone; it costs up to ~2x a forward over the growing prefix). Then
medians of `--repeats` timed runs of both greedy paths per (model, length), batch 1, baby-GPT-sized
models (vocab 65).
"""

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from lstm_attn.generate import generate
from lstm_attn.models import GPT, LSTMLM, GPTConfig, LSTMLMConfig

_NEW = flags.DEFINE_list('new_tokens', ['64', '256'], 'Numbers of new tokens to generate.')
_PROMPT = flags.DEFINE_integer('prompt_len', 16, 'Prompt length.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per row (median reported).')
_OUT = flags.DEFINE_string('output_json', '', 'Write the table as JSON here.')


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def _rerun_prefix(model, prompt, new_tokens):
  """Greedy decoding that re-runs the whole forward per token on a fixed-shape buffer (no cache)."""
  graphdef, state = nnx.split(model)
  p = prompt.shape[1]
  buf = jnp.zeros((1, p + new_tokens), jnp.int32).at[:, :p].set(prompt)
  for i in range(new_tokens):
    nxt = jnp.argmax(_forward(graphdef, state, buf)[:, p + i - 1], -1)
    buf = buf.at[:, p + i].set(nxt)
  return buf[:, p:].block_until_ready()


def _median_time(fn, repeats):
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main(argv):
  del argv
  lengths = [int(n) for n in _NEW.value]
  max_len = _PROMPT.value + max(lengths)
  gpt = GPT(GPTConfig(d_model=128, num_layers=4, num_heads=4, max_len=max_len), 65, rngs=nnx.Rngs(0))
  lstm = LSTMLM(LSTMLMConfig(embed_dim=128, hidden_size=256, num_layers=2), 65, rngs=nnx.Rngs(0))
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, 65, (1, _PROMPT.value)), jnp.int32)
  rows = []
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, batch 1, prompt {_PROMPT.value}')
  print('| model | new tokens | generate() ms/token | re-run forward ms/token | speed-up |')
  print('|---|---|---|---|---|')
  for name, model in (('gpt 4x128', gpt), ('lstm 2x256', lstm)):
    model.eval()
    for n in lengths:
      cached = generate(model, prompt, n, rng=jax.random.key(0), temperature=0.0)
      cached = np.asarray(cached)[:, -n:]
      rerun = np.asarray(_rerun_prefix(model, prompt, n))
      if not np.array_equal(cached, rerun):
        raise SystemExit(f'{name}: cached greedy tokens differ from re-running the prefix ({n} tokens).')
      t_cached = _median_time(
        lambda m=model, n=n: generate(
          m, prompt, n, rng=jax.random.key(1), temperature=0.0
        ).block_until_ready(),
        _REPEATS.value,
      )
      t_rerun = _median_time(lambda m=model, n=n: _rerun_prefix(m, prompt, n), _REPEATS.value)
      row = {
        'model': name,
        'new_tokens': n,
        'cached_ms_per_token': 1e3 * t_cached / n,
        'rerun_ms_per_token': 1e3 * t_rerun / n,
      }
      rows.append(row)
      print(
        f'| {name} | {n} | {row["cached_ms_per_token"]:.3f} | {row["rerun_ms_per_token"]:.3f} | '
        f'{t_rerun / t_cached:.1f}x |'
      )
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump({'jax': jax.__version__, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
