r"""The one-command GPU check, for the day an H100/H200 is there: tests compiled, then speed.

1. The compiled GPU test classes (tests/test_flash_attention.py::TestFlashAttentionGPU and
   tests/test_flash_attention_mosaic_gpu.py::TestMosaicGPUCompiled: the float64 reference sweep,
   gradients with random cotangents, masked rows) in a subprocess. The Mosaic GPU kernel is verified
   on CPU only in the GPU interpreter; this is its first compiled numerical check.
2. Speed, bf16, head dims 64 and 128, 1k-16k tokens (batch * tokens = 16k), causal and not, forward and
   forward+backward: our Pallas Triton kernel (`implementation='pallas'`) and our Mosaic GPU kernel
   (`implementation='mosaic_gpu'`, Hopper) against jax.nn.dot_product_attention with cuDNN and with XLA,
   and JAX's bundled Pallas Triton `mha`. Every implementation is first checked
   against XLA's output on the same inputs (relative L2 error), then warmed up and timed (median of
   --iters, each synchronised). TFLOP/s count only the unmasked score elements (causal: (T+1)/2T of them),
   forward 4*B*H*T*S*D, backward 2.5x forward, so a forward+backward step counts 3.5x.
   The bar, from NVIDIA's published cuDNN 9.19 H200 figures (bf16, head dim 128, GQA 64/8, batch 1):
   forward 688 TFLOP/s at 32k causal and 702 at 16k non-causal; backward 581 / 612.
3. The bar's own shapes (--bar, on by default): bf16, head dim 128, 64 query / 8 key-value heads, batch
   1, 16k non-causal and 32k causal: mosaic_gpu and pallas against cuDNN (the reference there: XLA's
   32k x 32k logits do not fit). The goal for mosaic_gpu: forward >= 1.05x the published cuDNN figure,
   forward+backward >= cuDNN's.

Stops timing new rows after --budget_s seconds (default 8 minutes in all) and writes what it has:

  python experiments/gpu_check.py --output_json=results/gpu_check_h200.json

`--smoke` runs a tiny shape on any machine (on CPU our kernel runs interpreted), to test the script.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lstm_attn.attention import dot_product_attention

_OUTPUT_JSON = flags.DEFINE_string('output_json', None, 'Where to write the rows (a .md table beside it).')
_HEAD_DIMS = flags.DEFINE_list('head_dims', ['64', '128'], 'Head dims.')
_SEQ_LENS = flags.DEFINE_list('seq_lens', ['1024', '4096', '16384'], 'Sequence lengths (q = kv).')
_TOKENS = flags.DEFINE_integer('tokens', 16384, 'batch * seq_len: batch = tokens // seq_len (at least 1).')
_MODEL_DIM = flags.DEFINE_integer(
  'model_dim', 2048, 'heads = model_dim // head_dim (MHA: JAX mha takes no GQA).'
)
_IMPLS = flags.DEFINE_list(
  'implementations', ['pallas', 'mosaic_gpu', 'cudnn', 'xla', 'jax_mha'], 'What to time.'
)
_BAR = flags.DEFINE_bool('bar', True, "Also time the published cuDNN figures' shapes (GQA 64/8, 16k, 32k).")
_ITERS = flags.DEFINE_integer('iters', 20, 'Timed iterations per row (median reported).')
_BUDGET_S = flags.DEFINE_float('budget_s', 480.0, 'Wall-clock budget for the whole check, tests included.')
_SKIP_TESTS = flags.DEFINE_bool('skip_tests', False, 'Skip step 1 (the compiled GPU test classes).')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny shapes, 2 iterations, no tests: checks the script runs.')

_TOLERANCE = 2e-2  # bf16 outputs and gradients against XLA's bf16 computation


def _attention_fn(impl: str, is_causal: bool):
  if impl in ('pallas', 'mosaic_gpu'):
    return lambda q, k, v: dot_product_attention(q, k, v, is_causal=is_causal, implementation=impl)
  if impl in ('cudnn', 'xla'):
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation=impl)
  if impl == 'jax_mha':
    from jax.experimental.pallas.ops.gpu import attention as jax_attention

    scale = lambda q: 1.0 / math.sqrt(q.shape[-1])
    return lambda q, k, v: jax_attention.mha(q, k, v, None, sm_scale=scale(q), causal=is_causal)
  raise app.UsageError(f'--implementations: unknown {impl!r}.')


def _step(fn, mode):
  if mode == 'fwd':
    return jax.jit(fn)

  def fwd_bwd(q, k, v, do):
    out, pullback = jax.vjp(fn, q, k, v)
    return out, pullback(do)

  return jax.jit(fwd_bwd)


def _rel_l2(a, b) -> float:
  a, b = (np.asarray(x, np.float64) for x in (a, b))
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)) if np.all(np.isfinite(a)) else math.inf


def _time(run, args, iters):
  jax.block_until_ready(run(*args))  # compile + warm-up
  jax.block_until_ready(run(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(run(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _flops(batch, heads, seq, head_dim, is_causal, mode):
  visible = seq * (seq + 1) / 2 if is_causal else seq * seq
  forward = 4 * batch * heads * visible * head_dim
  return forward * (1.0 if mode == 'fwd' else 3.5)


# One process (`-n 0` overrides pytest.ini's `-n 2`: one GPU), the compiled test classes only.
TEST_COMMAND = (
  '-m',
  'pytest',
  '-q',
  '-n',
  '0',
  'tests/test_flash_attention.py::TestFlashAttentionGPU',
  'tests/test_flash_attention_mosaic_gpu.py::TestMosaicGPUCompiled',
)
# The published cuDNN 9.19 H200 figures (TFLOP/s; bf16, head dim 128, GQA 64/8, batch 1): (seq, causal).
CUDNN_BAR = {(16384, False): {'fwd': 702.0, 'bwd': 612.0}, (32768, True): {'fwd': 688.0, 'bwd': 581.0}}


def _run_tests(deadline) -> dict:
  cmd = [sys.executable, *TEST_COMMAND]
  start = time.perf_counter()
  try:
    done = subprocess.run(
      cmd, capture_output=True, text=True, timeout=max(30.0, deadline - time.perf_counter()), check=False
    )
  except subprocess.TimeoutExpired:
    return {'command': ' '.join(cmd), 'returncode': None, 'summary': 'timed out'}
  summary = (done.stdout.strip().splitlines() or ['(no output)'])[-1]
  print(f'tests ({time.perf_counter() - start:.0f} s): {summary}', flush=True)
  if done.returncode:
    print(done.stdout[-4000:] + done.stderr[-4000:], file=sys.stderr)
  return {'command': ' '.join(cmd), 'returncode': done.returncode, 'summary': summary}


def _table(rows) -> str:
  lines = [
    '| impl | head dim | seq | batch | heads | causal | mode | ms | TFLOP/s | rel err vs ref |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    ms = f'{r["seconds"] * 1e3:.3f}' if r.get('seconds') else r.get('error', '-')
    tf = f'{r["tflops"]:.1f}' if r.get('tflops') else '-'
    err = f'{r["rel_err"]:.1e}' if r.get('rel_err') is not None else '-'
    heads = f'{r["heads"]}/{r.get("kv_heads", r["heads"])}'
    lines.append(
      f'| {r["impl"]} | {r["head_dim"]} | {r["seq"]} | {r["batch"]} | {heads} | {r["is_causal"]} '
      f'| {r["mode"]} | {ms} | {tf} | {err} |'
    )
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _OUTPUT_JSON.value and not os.path.isdir(os.path.dirname(os.path.abspath(_OUTPUT_JSON.value))):
    raise app.UsageError(f'--output_json: the folder of {_OUTPUT_JSON.value!r} does not exist.')
  deadline = time.perf_counter() + _BUDGET_S.value
  platform = jax.default_backend()
  smoke = _SMOKE.value
  impls = ['pallas', 'xla'] if smoke else _IMPLS.value
  head_dims = [32] if smoke else [int(d) for d in _HEAD_DIMS.value]
  seq_lens = [64] if smoke else [int(s) for s in _SEQ_LENS.value]
  iters = 2 if smoke else _ITERS.value
  if platform != 'gpu' and not smoke:
    raise app.UsageError(
      f'this is the GPU check; the default backend is {platform!r} (use --smoke to test it).'
    )
  report = {'device': str(jax.devices()[0].device_kind), 'jax': jax.__version__, 'rows': []}
  if not (smoke or _SKIP_TESTS.value):
    report['tests'] = _run_tests(deadline)
  rng = np.random.default_rng(0)
  shapes = []  # (head_dim, seq, batch, heads, kv_heads, causal, reference implementation)
  for head_dim in head_dims:
    heads = max(1, (_MODEL_DIM.value if not smoke else 64) // head_dim)
    for seq in seq_lens:
      batch = max(1, (_TOKENS.value if not smoke else 128) // seq)
      shapes += [(head_dim, seq, batch, heads, heads, c, 'xla') for c in (False, True)]
  if _BAR.value and not smoke:
    shapes += [(128, seq, 1, 64, 8, c, 'cudnn') for seq, c in CUDNN_BAR]
  for head_dim, seq, batch, heads, kv_heads, is_causal, ref_impl in shapes:
    q, do = (jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), jnp.bfloat16) for _ in range(2))
    k, v = (
      jnp.asarray(rng.standard_normal((batch, seq, kv_heads, head_dim)), jnp.bfloat16) for _ in range(2)
    )
    # jax_mha takes no GQA; on the bar's shapes XLA's logits do not fit: cuDNN is the reference there.
    row_impls = [
      i
      for i in impls
      if not (kv_heads != heads and i == 'jax_mha') and not (ref_impl != 'xla' and i == 'xla')
    ]
    for mode in ('fwd', 'fwd_bwd'):
      args = (q, k, v) if mode == 'fwd' else (q, k, v, do)
      expected, reference_error = None, None
      for impl in [ref_impl] + [i for i in row_impls if i != ref_impl]:  # the reference first
        row = dict(
          impl=impl,
          head_dim=head_dim,
          seq=seq,
          batch=batch,
          heads=heads,
          kv_heads=kv_heads,
          is_causal=is_causal,
          mode=mode,
          reference=ref_impl,
        )
        if time.perf_counter() > deadline:
          row['error'] = 'over budget'
          report['rows'].append(row)
          continue
        if reference_error is not None:  # never compare an implementation with itself
          row['error'] = f'not checked: the {ref_impl} reference failed ({reference_error})'
          report['rows'].append(row)
          continue
        try:
          run = _step(_attention_fn(impl, is_causal), mode)
          got = jax.tree.leaves(run(*args))
          if expected is None:
            expected = got
          row['rel_err'] = max(_rel_l2(a, b) for a, b in zip(got, expected))
          if row['rel_err'] > _TOLERANCE:
            row['error'] = f'wrong: rel err {row["rel_err"]:.1e} > {_TOLERANCE}'
          else:
            row['seconds'] = _time(run, args, iters)
            row['tflops'] = _flops(batch, heads, seq, head_dim, is_causal, mode) / row['seconds'] / 1e12
            bar = CUDNN_BAR.get((seq, is_causal)) if (heads, kv_heads, head_dim) == (64, 8, 128) else None
            if bar is not None:
              published = bar['fwd'] if mode == 'fwd' else 3.5 / (1 / bar['fwd'] + 2.5 / bar['bwd'])
              row['vs_published_cudnn'] = row['tflops'] / published
        except Exception as e:  # an implementation that cannot run this shape is a row, not a crash
          row['error'] = f'{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}'
          if impl == ref_impl:
            reference_error = row['error']
        if impl in impls:
          report['rows'].append(row)
          print(_table([row]).splitlines()[-1], flush=True)
  table = _table(report['rows'])
  print('\n' + table)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1)
    with open(os.path.splitext(_OUTPUT_JSON.value)[0] + '.md', 'w', encoding='utf-8') as f:
      f.write(f'{report["device"]}, jax {report["jax"]}\n\n{table}\n')
  if report.get('tests', {}).get('returncode'):
    raise SystemExit(f'the compiled GPU tests failed: {report["tests"]["summary"]}')


if __name__ == '__main__':
  app.run(main)
