r"""Attention benchmark: forward and forward+backward time, TFLOP/s, memory, fraction of the matmul peak.

Implementations (all with the same [batch, seq, heads, head_dim] inputs):
  pallas      lstm_attn's fused Pallas kernel (compiled on GPU/TPU; on CPU only the interpreter, which is
              not a performance path, so it is left out there unless asked for).
  mosaic_gpu  lstm_attn's Pallas Mosaic GPU kernel for Hopper (wgmma, TMA, warp specialisation; bf16/fp16;
              GPU only here: on CPU it exists only in the GPU interpreter). Opt-in, never the default.
  xla         jax.nn.dot_product_attention(implementation='xla'): the materialising XLA baseline.
  cudnn       jax.nn.dot_product_attention(implementation='cudnn') (NVIDIA GPU only).
  jax_mha     JAX's bundled Pallas Triton `mha` (GPU only; MHA and block-multiple lengths only).
  chunked     lstm_attn's flash-style jnp path (`kernels/chunked_attention.py`), the CPU default for long
              sequences.
  reference   the float32 materialising reference (`kernels/reference.py`), run while memory allows.

Every implementation is first checked against the float64 reference (output and gradients with a random
cotangent) at a small size; then, per (N, D, causal), each is compiled, its compiled temp memory read from
`memory_analysis()`, warmed up, and timed: the implementations are called round-robin --repeats times and
the median is reported, so a load change on a shared machine hits all of them alike. FLOPs: forward
4 * B * H * N * N * D, half with a causal mask; forward+backward 3.5x the forward (backward 2.5x). The
fraction of the hardware's limit is against a large matmul measured in the same run (before and after the
runs; the better of the two). On GPU each row also records the device's peak bytes in use so far.
--memory_only_seq_lens adds rows for lengths too large to run: compiled temp memory only (this is how the
16k-token memory goal is measured on CPU).

CPU (the table in BUILD_NOTES.md):
  python experiments/bench_attention.py --seq_lens=256,512,1024,2048 --head_dims=64,128 \
      --memory_only_seq_lens=4096,8192,16384 --repeats=5 \
      --output_json=/tmp/bench_attention_cpu.json --output_png=/tmp/bench_attention_cpu.png
GPU (bf16, 512 to 16k tokens, head dims 64 and 128, causal on and off; mosaic_gpu beside pallas, cudnn):
  python experiments/bench_attention.py --output_json=/tmp/bench_attention_gpu.json
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lstm_attn.attention import dot_product_attention
from lstm_attn.kernels import reference

ALL_IMPLEMENTATIONS = ('pallas', 'mosaic_gpu', 'cudnn', 'jax_mha', 'xla', 'chunked', 'reference')
_GPU_ONLY = ('mosaic_gpu', 'cudnn', 'jax_mha')

FLAGS = flags.FLAGS
flags.DEFINE_list('seq_lens', None, 'Sequence lengths (q_len = kv_len). Default: GPU 512..16k, CPU 256..8k.')
flags.DEFINE_list('head_dims', ['64', '128'], 'Head dimensions.')
flags.DEFINE_list('causal', ['false', 'true'], 'Causal settings to run: any of false, true.')
flags.DEFINE_string(
  'dtype', None, 'float32, bfloat16 or float16. Default: bfloat16 on GPU/TPU, float32 on CPU.'
)
flags.DEFINE_list('implementations', None, f'Any of {ALL_IMPLEMENTATIONS}. Default: all that fit the device.')
flags.DEFINE_integer('batch', 1, 'Batch size.')
flags.DEFINE_integer('heads', None, 'Query heads. Default: 16 on GPU/TPU, 4 on CPU.')
flags.DEFINE_integer('kv_heads', None, 'Key/value heads (GQA when fewer than --heads). Default: --heads.')
flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement (after one warm-up); the median is reported.')
flags.DEFINE_bool('include_backward', True, 'Also time forward+backward (jax.vjp with a random cotangent).')
flags.DEFINE_float(
  'max_temp_gb',
  None,
  'Skip a run whose compiled temp memory exceeds this. Default: 80% of GPU memory, 4 GB on CPU.',
)
flags.DEFINE_list(
  'memory_only_seq_lens',
  None,
  'Lengths reported by compiled memory only (not run). Default: 16384 on CPU, none on GPU.',
)
flags.DEFINE_string('output_json', None, 'Write all results here.')
flags.DEFINE_string('output_png', None, 'Write a TFLOP/s-vs-length plot here (matplotlib).')


# --------------------------------------------------------------------------------------------------
# The implementations, as functions of (q, k, v) with the mask settings closed over.


def _attention_fn(name: str, is_causal: bool):
  """(q, k, v) -> out for implementation `name`; [batch, seq, heads, head_dim] in and out."""
  if name == 'xla':
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation='xla')
  if name == 'cudnn':
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation='cudnn')
  if name == 'jax_mha':
    from jax.experimental.pallas.ops.gpu import attention as jax_pallas

    return lambda q, k, v: jax_pallas.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=is_causal)
  return lambda q, k, v: dot_product_attention(q, k, v, is_causal=is_causal, implementation=name)


def _fwd_bwd(fn):
  def run(q, k, v, d_out):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(d_out)

  return run


def _inputs(seed, batch, seq_len, heads, kv_heads, head_dim, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, seq_len, heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (batch, seq_len, kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (batch, seq_len, kv_heads, head_dim), jnp.float32).astype(dtype)
  d_out = jax.random.normal(keys[3], q.shape, jnp.float32).astype(dtype)
  return q, k, v, d_out


def _rel_l2(actual, expected) -> float:
  a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
  if not np.all(np.isfinite(a)):
    return float('inf')
  return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


_TOLERANCE = {'float32': 1e-4, 'bfloat16': 2e-2, 'float16': 5e-3}


def check_correctness(names, dtype, head_dims, causals, heads, kv_heads) -> dict:
  """Each implementation vs the float64 reference at a small size; raises if any is wrong."""
  results = {}
  seq_len = 256
  for name in names:
    for head_dim in head_dims:
      for is_causal in causals:
        q, k, v, d_out = _inputs(0, 1, seq_len, heads, kv_heads, head_dim, dtype)
        out, grads = jax.jit(_fwd_bwd(_attention_fn(name, is_causal)))(q, k, v, d_out)
        with jax.enable_x64(True):
          f64 = lambda x: jnp.asarray(np.asarray(x.astype(jnp.float32)), jnp.float64)
          ref = _fwd_bwd(lambda q, k, v, c=is_causal: reference.mha_reference(q, k, v, is_causal=c))
          ref_out, ref_grads = jax.jit(ref)(f64(q), f64(k), f64(v), f64(d_out))
          errors = [_rel_l2(a, e) for a, e in zip((out, *grads), (ref_out, *ref_grads))]
        key = f'{name}/d{head_dim}/{"causal" if is_causal else "full"}'
        results[key] = dict(zip(('out', 'dq', 'dk', 'dv'), errors))
        tol = _TOLERANCE[jnp.dtype(dtype).name]
        if max(errors) > tol:
          raise RuntimeError(f'{key} is wrong: relative L2 errors (out, dq, dk, dv) = {errors}, tol {tol}.')
        print(f'correct  {key:28s} ' + '  '.join(f'{n}={e:.1e}' for n, e in results[key].items()))
  return results


# --------------------------------------------------------------------------------------------------
# Measurement.


def _median_ms(compiled, args, repeats) -> float:
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _interleaved_median_ms(calls: dict, repeats: int) -> dict:
  """{name: (compiled, args)} -> {name: median ms}, timing the calls round-robin so that a load change on
  a shared machine hits every implementation alike (the ratios are what the goals are about)."""
  for compiled, args in calls.values():
    jax.block_until_ready(compiled(*args))  # warm-up
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (compiled, args) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def measure_matmul_peak(dtype, repeats) -> float:
  """TFLOP/s of a large square matmul in `dtype`: the hardware limit the attention numbers are against."""
  n = 8192 if jax.default_backend() in ('gpu', 'tpu') else 2048
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32).astype(dtype) for i in range(2))
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)).lower(a, b).compile()
  return 2 * n**3 / (_median_ms(f, (a, b), max(repeats, 3)) * 1e-3) / 1e12


def _temp_bytes(compiled) -> int | None:
  analysis = compiled.memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def _device_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get('peak_bytes_in_use', 0))


def bench_group(
  names,
  seq_len,
  head_dim,
  is_causal,
  dtype,
  batch,
  heads,
  kv_heads,
  repeats,
  include_backward,
  max_temp_bytes,
  peak_tflops,
  run=True,
) -> list[dict]:
  """One row per implementation at one (N, D, causal): compile, read the compiled temp memory, and (if
  `run` and it fits in max_temp_bytes) time forward and forward+backward, implementations interleaved."""
  flops = 4 * batch * heads * seq_len * seq_len * head_dim * (0.5 if is_causal else 1.0)
  spec_q = jax.ShapeDtypeStruct((batch, seq_len, heads, head_dim), dtype)
  spec_kv = jax.ShapeDtypeStruct((batch, seq_len, kv_heads, head_dim), dtype)
  args = _inputs(1, batch, seq_len, heads, kv_heads, head_dim, dtype) if run else None
  rows = {
    n: dict(implementation=n, seq_len=seq_len, head_dim=head_dim, causal=is_causal, status='ok')
    for n in names
  }
  passes = [('fwd', lambda fn: fn, 3, flops)]
  if include_backward:
    passes.append(('fwd_bwd', _fwd_bwd, 4, 3.5 * flops))
  for label, wrap, num_args, pass_flops in passes:
    calls = {}
    for name in names:
      row = rows[name]
      if row['status'].startswith('unsupported'):
        continue
      try:
        specs = (spec_q, spec_kv, spec_kv, spec_q)[:num_args]
        compiled = jax.jit(wrap(_attention_fn(name, is_causal))).lower(*specs).compile()
      except Exception as e:  # noqa: BLE001 - an unsupported configuration is a row, not a crash
        row['status'] = f'unsupported: {type(e).__name__}: {str(e).splitlines()[0][:120]}'
        continue
      temp = _temp_bytes(compiled)
      row[f'{label}_temp_bytes'] = temp
      if not run:
        row['status'] = 'memory only'
      elif temp is not None and temp > max_temp_bytes:
        row['status'] = f'skipped: {label} needs {temp / 2**30:.1f} GiB temp'
      else:
        calls[name] = (compiled, args[:num_args])
    for name, ms in _interleaved_median_ms(calls, repeats).items():
      row = rows[name]
      row[f'{label}_ms'] = ms
      row[f'{label}_tflops'] = pass_flops / (ms * 1e-3) / 1e12
      row[f'{label}_peak_fraction'] = row[f'{label}_tflops'] / peak_tflops
      row[f'{label}_device_peak_bytes_so_far'] = _device_peak_bytes()
  return list(rows.values())


# --------------------------------------------------------------------------------------------------
# Reporting.


def _fmt(value, spec):
  return '-' if value is None else format(value, spec)


def format_table(rows, include_backward) -> str:
  header = '| impl | N | D | causal | fwd ms | fwd TFLOP/s | fwd % peak | fwd temp MiB |'
  if include_backward:
    header += ' fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd % peak | fwd+bwd temp MiB |'
  header += ' status |'
  lines = [header, '|' + '---|' * (header.count('|') - 1)]
  for r in rows:
    mib = lambda b: None if b is None else b / 2**20
    pct = lambda f: None if f is None else 100 * f
    line = (
      f'| {r["implementation"]} | {r["seq_len"]} | {r["head_dim"]} | {r["causal"]} | '
      f'{_fmt(r.get("fwd_ms"), ".2f")} | {_fmt(r.get("fwd_tflops"), ".3f")} | '
      f'{_fmt(pct(r.get("fwd_peak_fraction")), ".1f")} | {_fmt(mib(r.get("fwd_temp_bytes")), ".1f")} |'
    )
    if include_backward:
      line += (
        f' {_fmt(r.get("fwd_bwd_ms"), ".2f")} | {_fmt(r.get("fwd_bwd_tflops"), ".3f")} | '
        f'{_fmt(pct(r.get("fwd_bwd_peak_fraction")), ".1f")} | '
        f'{_fmt(mib(r.get("fwd_bwd_temp_bytes")), ".1f")} |'
      )
    lines.append(line + f' {r["status"]} |')
  return '\n'.join(lines)


def _find(rows, name, seq_len, head_dim, causal):
  for r in rows:
    if (r['implementation'], r['seq_len'], r['head_dim'], r['causal']) == (name, seq_len, head_dim, causal):
      return r
  return None


def ratios(rows, numerator, denominator, key) -> list[dict]:
  """numerator / denominator of `key` for every (N, D, causal) where both were measured."""
  out = []
  for r in rows:
    if r['implementation'] != numerator or r.get(key) is None:
      continue
    d = _find(rows, denominator, r['seq_len'], r['head_dim'], r['causal'])
    if d is not None and d.get(key):
      out.append(
        dict(seq_len=r['seq_len'], head_dim=r['head_dim'], causal=r['causal'], ratio=r[key] / d[key])
      )
  return out


def plot(rows, path):
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  panels = sorted({(r['head_dim'], r['causal']) for r in rows})
  keys = ['fwd_tflops', 'fwd_bwd_tflops']
  fig, axes = plt.subplots(len(keys), len(panels), figsize=(4.5 * len(panels), 7), squeeze=False)
  for col, (head_dim, causal) in enumerate(panels):
    for row_i, key in enumerate(keys):
      ax = axes[row_i][col]
      for name in dict.fromkeys(r['implementation'] for r in rows):
        pts = sorted(
          (r['seq_len'], r[key])
          for r in rows
          if r['implementation'] == name
          and (r['head_dim'], r['causal']) == (head_dim, causal)
          and r.get(key) is not None
        )
        if pts:
          ax.plot(*zip(*pts), marker='o', label=name)
      ax.set_xscale('log', base=2)
      ax.set_title(f'{key.replace("_tflops", "")}  D={head_dim} causal={causal}', fontsize=9)
      ax.set_xlabel('sequence length')
      ax.set_ylabel('TFLOP/s')
      ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------------------


def _parse_bool(text: str) -> bool:
  lowered = text.strip().lower()
  if lowered not in ('true', 'false', '1', '0'):
    raise ValueError(f'--causal takes true/false values, got {text!r}.')
  return lowered in ('true', '1')


def _parse_ints(name, values) -> list[int]:
  try:
    parsed = [int(v) for v in values]
  except ValueError:
    raise ValueError(f'--{name} must be a comma-separated list of ints, got {values!r}.') from None
  if any(v < 1 for v in parsed):
    raise ValueError(f'--{name} must be positive, got {parsed}.')
  return parsed


def main(argv):
  del argv
  backend = jax.default_backend()
  accelerator = backend in ('gpu', 'tpu')
  seq_lens = _parse_ints(
    'seq_lens',
    FLAGS.seq_lens
    or ([512, 1024, 2048, 4096, 8192, 16384] if accelerator else [256, 512, 1024, 2048, 4096, 8192]),
  )
  memory_only = _parse_ints(
    'memory_only_seq_lens', FLAGS.memory_only_seq_lens or ([] if accelerator else [16384])
  )
  head_dims = _parse_ints('head_dims', FLAGS.head_dims)
  causals = [_parse_bool(c) for c in FLAGS.causal]
  dtype = jnp.dtype(FLAGS.dtype or ('bfloat16' if accelerator else 'float32'))
  if dtype.name not in _TOLERANCE:
    raise ValueError(f'--dtype must be float32, bfloat16 or float16, got {FLAGS.dtype!r}.')
  heads = FLAGS.heads or (16 if accelerator else 4)
  kv_heads = FLAGS.kv_heads or heads
  if heads % kv_heads:
    raise ValueError(f'--heads ({heads}) must be a multiple of --kv_heads ({kv_heads}).')
  notes = []
  if FLAGS.implementations:
    names = list(FLAGS.implementations)
    bad = [n for n in names if n not in ALL_IMPLEMENTATIONS]
    if bad:
      raise ValueError(f'--implementations must be among {ALL_IMPLEMENTATIONS}, got {bad}.')
  else:
    names = [n for n in ALL_IMPLEMENTATIONS if backend == 'gpu' or n not in _GPU_ONLY]
    if not accelerator:
      names.remove('pallas')
      notes.append(
        'pallas: not run on CPU (only the Pallas interpreter exists there, which is a '
        'correctness tool, not a performance path).'
      )
  if backend != 'gpu':
    for n in _GPU_ONLY:
      if n in names:
        names.remove(n)
        notes.append(f'{n}: GPU only, not run on {backend}.')
  if 'mosaic_gpu' in names and dtype.itemsize != 2:
    names.remove('mosaic_gpu')
    notes.append(f'mosaic_gpu: bfloat16/float16 only (wgmma inputs), not run in {dtype.name}.')
  if backend == 'gpu' and 'jax_mha' in names and kv_heads != heads:
    names.remove('jax_mha')
    notes.append("jax_mha: JAX's bundled Pallas mha has no GQA; not run with --kv_heads < --heads.")
  if FLAGS.max_temp_gb is not None:
    max_temp = FLAGS.max_temp_gb * 2**30
  elif accelerator:
    stats = jax.devices()[0].memory_stats() or {}
    max_temp = 0.8 * stats.get('bytes_limit', 16 * 2**30)
  else:
    max_temp = 4 * 2**30

  device = jax.devices()[0]
  info = dict(
    date=datetime.datetime.now().isoformat(timespec='seconds'),
    jax=jax.__version__,
    backend=backend,
    device=device.device_kind,
    host=platform.node(),
    dtype=dtype.name,
    batch=FLAGS.batch,
    heads=heads,
    kv_heads=kv_heads,
    repeats=FLAGS.repeats,
    notes=notes,
  )
  print(json.dumps(info))
  for note in notes:
    print('note:', note)

  correctness = check_correctness(names, dtype, head_dims, causals, heads, kv_heads)
  peak = measure_matmul_peak(dtype, FLAGS.repeats)
  print(f'matmul peak ({dtype.name}): {peak:.3f} TFLOP/s')

  rows = []
  run_lens = [(n, True) for n in seq_lens] + [(n, False) for n in memory_only if n not in seq_lens]
  for head_dim in head_dims:
    for is_causal in causals:
      for seq_len, run in run_lens:
        group = bench_group(
          names,
          seq_len,
          head_dim,
          is_causal,
          dtype,
          FLAGS.batch,
          heads,
          kv_heads,
          FLAGS.repeats,
          FLAGS.include_backward,
          max_temp,
          peak,
          run=run,
        )
        rows.extend(group)
        print('\n'.join(format_table(group, FLAGS.include_backward).splitlines()[2:]), flush=True)

  # On a shared machine one matmul measurement can land in a load spike: measure again after the runs
  # and state every fraction against the better of the two.
  peak_after = measure_matmul_peak(dtype, FLAGS.repeats)
  print(f'matmul peak ({dtype.name}) after the runs: {peak_after:.3f} TFLOP/s')
  if peak_after > peak:
    for row in rows:
      for label in ('fwd', 'fwd_bwd'):
        if row.get(f'{label}_tflops') is not None:
          row[f'{label}_peak_fraction'] = row[f'{label}_tflops'] / peak_after
    peak = peak_after
  table = format_table(rows, FLAGS.include_backward)
  summary = {}
  pairs = (
    ('chunked', 'xla'),
    ('pallas', 'cudnn'),
    ('pallas', 'jax_mha'),
    ('mosaic_gpu', 'cudnn'),
    ('mosaic_gpu', 'pallas'),
  )
  for num, den in pairs:
    if num in names and den in names:
      for key in ('fwd_ms', 'fwd_bwd_ms'):
        summary[f'{num}/{den} {key}'] = ratios(rows, num, den, key)
  if 'chunked' in names and 'reference' in names:
    for key in ('fwd_temp_bytes', 'fwd_bwd_temp_bytes'):
      summary[f'chunked/reference {key}'] = ratios(rows, 'chunked', 'reference', key)
  print('\n' + table + '\n')
  for name, values in summary.items():
    print(
      name
      + ': '
      + ', '.join(
        f'N={v["seq_len"]} D={v["head_dim"]} causal={v["causal"]}: {v["ratio"]:.3g}' for v in values
      )
    )
  if FLAGS.output_json:
    with open(FLAGS.output_json, 'w') as f:
      json.dump(
        dict(
          info=info, correctness=correctness, matmul_peak_tflops=peak, rows=rows, ratios=summary, table=table
        ),
        f,
        indent=1,
      )
  if FLAGS.output_png:
    plot(rows, FLAGS.output_png)


if __name__ == '__main__':
  app.run(main)
