r"""LSTM benchmark: forward and forward+backward of one layer against Flax, jax.experimental.rnn and torch.

Implementations, all with the same weights and inputs [batch, time, input_size]:
  ours           lstm_attn.lstm.lstm as used: on a CPU the recurrence runs in the AVX2 custom call
                 (lstm_attn.kernels.lstm_cpu) where it can, else the scan (input projection hoisted,
                 hand-written backward pass).
  ours_scan      lstm_attn.lstm.lstm with cpu_kernel=False: the lax.scan, hand-written backward pass.
  ours_autodiff  the scan's forward, gradient by autodiff of lax.scan (custom_vjp=False).
  flax           flax.nnx.RNN(flax.nnx.OptimizedLSTMCell).
  lstm_ref       jax.experimental.rnn.lstm_ref (the cuDNN-LSTM reference in JAX).
  torch          torch.nn.LSTM (only when torch is importable; CPU build; autocast to bf16 for bfloat16).

First every implementation's output and gradients (random cotangent) are checked against ours in float32
(and its bf16 output against ours in float32); then each is compiled, warmed up and timed. Calls are
interleaved (one call of each implementation per round) so load changes hit all alike; medians of wall
time are reported with ratios to torch and to ours, GFLOP/s against a large matmul measured in the same
run, and the median CPU time of the process per call (all threads; on a shared machine it shows the work
done when wall time is inflated by other processes).
FLOPs: forward 2 * B * T * (input + hidden) * 4 * hidden; forward+backward 3x the forward.

Threads: torch gets as many threads as the cores this process may use (`--torch_threads=0`), which is
also what XLA uses. Default (quick, float32: ours, ours_scan, flax, torch; < 1 min):
  python experiments/bench_lstm.py --output_json=/tmp/bench_lstm.json
All implementations and bf16:
  python experiments/bench_lstm.py --full --output_json=/tmp/bench_lstm_full.json
Where ours' forward time goes (projection, recurrent matmuls alone, next to torch.mm doing the latter):
  python experiments/bench_lstm.py --implementations=ours,torch --breakdown
One core for everyone (XLA and torch both follow the affinity; no XLA flags needed):
  taskset -c 0 python experiments/bench_lstm.py --output_json=/tmp/bench_lstm_1core.json
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax import lax
from jax.experimental import rnn as jax_rnn

from lstm_attn import lstm as lstm_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch', 32, 'Batch size.')
flags.DEFINE_integer('time', 128, 'Sequence length.')
flags.DEFINE_integer('input_size', 256, 'Input features.')
flags.DEFINE_integer('hidden_size', 512, 'Hidden size.')
ALL_IMPLEMENTATIONS = ('ours', 'ours_scan', 'ours_autodiff', 'flax', 'lstm_ref', 'torch')
flags.DEFINE_list('dtypes', None, 'Compute dtypes: float32 and/or bfloat16. Default: float32 (--full: both).')
flags.DEFINE_list(
  'implementations', None, f'Any of {ALL_IMPLEMENTATIONS}. Default: ours, flax, torch (--full: all).'
)
flags.DEFINE_bool('full', False, 'All implementations and both dtypes (several minutes: compiling is most).')
flags.DEFINE_integer('repeats', 5, 'Timed rounds (after one warm-up call); medians are reported.')
flags.DEFINE_integer('unroll', lstm_lib.DEFAULT_UNROLL, 'lax.scan unroll of ours.')
flags.DEFINE_integer(
  'torch_threads', 0, 'torch.set_num_threads for torch.nn.LSTM (0: the cores this process may use, as XLA).'
)
flags.DEFINE_bool(
  'breakdown',
  False,
  "Also time the parts of ours' forward (input projection, recurrent matmuls alone) "
  "and torch's recurrent matmuls alone (a Python loop of torch.mm), to show where the time goes.",
)
flags.DEFINE_string('output_json', None, 'Write the results as JSON here.')


def _num_cores():
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def _make_jax_impls(params, x, ct, dtype):
  """name -> (forward(args, x), forward_backward(args, x), args, grad -> dL/dW_hh as [H, 4H]), jitted."""
  batch, _, features = x.shape
  hidden = params['w_hh'].shape[1] // 4
  cdt = jnp.dtype(dtype)

  def ours(custom_vjp, cpu_kernel=None):
    def fwd(p, x):
      return lstm_lib.lstm(
        {'layer0': p}, x, dtype=cdt, unroll=FLAGS.unroll, custom_vjp=custom_vjp, cpu_kernel=cpu_kernel
      )[0]

    return fwd

  # Flax: the same weights in nnx.RNN(OptimizedLSTMCell) (same gate order and [in, out] layout).
  rnn = nnx.RNN(nnx.OptimizedLSTMCell(features, hidden, dtype=cdt, rngs=nnx.Rngs(0)))
  rnn.cell.dense_i.kernel[...] = params['w_ih']
  rnn.cell.dense_h.kernel[...] = params['w_hh']
  rnn.cell.dense_h.bias[...] = params['b']
  graphdef, flax_state = nnx.split(rnn)

  def flax_fwd(state, x):
    return nnx.merge(graphdef, state)(x.astype(cdt))

  def ref_fwd(p, x):
    h0 = jnp.zeros((1, batch, hidden), cdt)
    lengths = jnp.full((batch,), x.shape[1], jnp.int32)
    w = lambda a: {0: a.T.astype(cdt)}
    b = {0: p['b'].astype(cdt)}
    out, _, _ = jax_rnn.lstm_ref(
      x.astype(cdt), h0, h0, w(p['w_ih']), w(p['w_hh']), b, {0: jnp.zeros_like(b[0])}, lengths,
      features, hidden, 1, 0.0, False,
    )  # fmt: skip
    return out

  ours_w_hh = lambda g: g['w_hh']
  flax_w_hh = lambda g: g['cell']['dense_h']['kernel'][...]
  fwds = {
    'ours': (ours(True), params, ours_w_hh),
    'ours_scan': (ours(True, cpu_kernel=False), params, ours_w_hh),
    'ours_autodiff': (ours(False), params, ours_w_hh),
    'flax': (flax_fwd, flax_state, flax_w_hh),
    'lstm_ref': (ref_fwd, params, ours_w_hh),
  }
  impls = {}
  for name, (fwd, args, w_hh_grad) in fwds.items():

    def fwd_bwd(p, x, fwd=fwd):
      out, vjp = jax.vjp(fwd, p, x)
      return vjp(ct.astype(out.dtype))

    impls[name] = (jax.jit(fwd), jax.jit(fwd_bwd), args, w_hh_grad)
  return impls


def _torch_impls(params, x, ct, dtype):
  import torch

  torch.manual_seed(0)
  torch.set_num_threads(FLAGS.torch_threads or _num_cores())
  features = x.shape[-1]
  hidden = params['w_hh'].shape[1] // 4
  model = torch.nn.LSTM(features, hidden, batch_first=True)
  model.load_state_dict(lstm_lib.params_to_torch({'layer0': params}))
  xt = torch.from_numpy(np.asarray(x, np.float32))
  ctt = torch.from_numpy(np.asarray(ct, np.float32))
  autocast = dtype == 'bfloat16'

  def run(x_in):
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
      return model(x_in)[0]

  def fwd():
    with torch.no_grad():
      return run(xt).float().numpy()

  def fwd_bwd():
    model.zero_grad(set_to_none=True)
    x_in = xt.clone().requires_grad_(True)
    out = run(x_in)
    out.backward(ctt.to(out.dtype))
    return x_in.grad.numpy(), model.weight_hh_l0.grad.numpy()

  return fwd, fwd_bwd, torch.__version__, torch.get_num_threads()


def _time_rounds(calls, repeats):
  """calls: name -> zero-arg callable (already warm). Interleaves them.

  Returns name -> (median wall seconds, median process CPU seconds over all threads, median MiB of
  memory first touched (minor page faults x page size): fresh allocations the call paid for).
  """
  wall, cpu, faults = ({name: [] for name in calls} for _ in range(3))
  for _ in range(repeats):
    for name, call in calls.items():
      start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start, start_cpu = time.perf_counter(), time.process_time()
      call()
      cpu[name].append(time.process_time() - start_cpu)
      wall[name].append(time.perf_counter() - start)
      faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
  page_mib = resource.getpagesize() / 2**20
  return {
    name: (
      statistics.median(wall[name]),
      statistics.median(cpu[name]),
      statistics.median(faults[name]) * page_mib,
    )
    for name in calls
  }


def _matmul_peak(dtype):
  """GFLOP/s of a large matmul of the benchmark's kind, measured now (the hardware's practical limit)."""
  a = jnp.ones((4096, 768), dtype)
  b = jnp.ones((768, 2048), dtype)
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(a, b))
  seconds = _time_rounds({'mm': lambda: jax.block_until_ready(f(a, b))}, 5)['mm'][0]
  return 2 * 4096 * 768 * 2048 / seconds / 1e9


def _breakdown(params, x, dtype, with_torch):
  """ms and GFLOP/s of the parts of one layer's forward, timed side by side (interleaved rounds).

  projection: x @ W_ih for all steps, one [B * T, F] x [F, 4H] matmul; recurrent_matmuls: T dependent
  [B, H] x [H, 4H] matmuls in a lax.scan and nothing else (h_t = (xw_t + h_{t-1} @ W_hh)[:, :H]);
  forward: ours, whole (projection, recurrent matmuls, gates); torch_recurrent_matmuls: the same T
  matmuls as a Python loop of torch.mm (torch.nn.LSTM runs them inside oneDNN's fused RNN instead).
  """
  cdt = jnp.dtype(dtype)
  batch, time_, features = x.shape
  hidden = params['w_hh'].shape[1] // 4
  w_ih, w_hh = params['w_ih'].astype(cdt), params['w_hh'].astype(cdt)
  x_tm = jnp.swapaxes(x, 0, 1).astype(cdt)  # [T, B, F]
  project = jax.jit(lambda x, w: (x.reshape(-1, features) @ w).reshape(time_, batch, 4 * hidden))
  xw = jax.block_until_ready(project(x_tm, w_ih))  # [T, B, 4H]

  def recurrent(xw, w):
    step = lambda h, z: ((z + h @ w)[:, :hidden], None)
    return lax.scan(step, jnp.zeros((batch, hidden), cdt), xw)[0]

  recurrent = jax.jit(recurrent)
  forward = jax.jit(lambda p, x: lstm_lib.lstm({'layer0': p}, x, dtype=cdt, unroll=FLAGS.unroll)[0])
  calls = {
    'projection': lambda: jax.block_until_ready(project(x_tm, w_ih)),
    'recurrent_matmuls': lambda: jax.block_until_ready(recurrent(xw, w_hh)),
    'forward': lambda: jax.block_until_ready(forward(params, x)),
  }
  if with_torch and dtype == 'float32':
    import torch

    w_t, xw_t = torch.from_numpy(np.asarray(w_hh)), torch.from_numpy(np.asarray(xw))

    def torch_recurrent():
      h = torch.zeros(batch, hidden)
      for t in range(time_):
        h = torch.addmm(xw_t[t], h, w_t)[:, :hidden]
      return h

    calls['torch_recurrent_matmuls'] = torch_recurrent
  for call in calls.values():
    call()
  times = _time_rounds(calls, FLAGS.repeats)
  flops = {
    'projection': 2 * batch * time_ * features * 4 * hidden,
    'recurrent_matmuls': 2 * batch * time_ * hidden * 4 * hidden,
    'forward': 2 * batch * time_ * (features + hidden) * 4 * hidden,
  }
  flops['torch_recurrent_matmuls'] = flops['recurrent_matmuls']
  return {
    name: {'ms': 1e3 * wall, 'gflops': flops[name] / wall / 1e9} for name, (wall, _, _) in times.items()
  }


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b)) if np.all(np.isfinite(a)) else float('inf')


def main(argv):
  del argv
  batch, time_, features, hidden = FLAGS.batch, FLAGS.time, FLAGS.input_size, FLAGS.hidden_size
  dtypes = FLAGS.dtypes or (['float32', 'bfloat16'] if FLAGS.full else ['float32'])
  implementations = FLAGS.implementations or (
    list(ALL_IMPLEMENTATIONS) if FLAGS.full else ['ours', 'ours_scan', 'flax', 'torch']
  )
  for d in dtypes:
    if d not in ('float32', 'bfloat16'):
      raise ValueError(f'--dtypes must be float32 and/or bfloat16, got {d!r}')
  for name in implementations:
    if name not in ALL_IMPLEMENTATIONS:
      raise ValueError(f'--implementations: unknown {name!r}; choose from {ALL_IMPLEMENTATIONS}')
  keys = jax.random.split(jax.random.key(0), 4)
  params = lstm_lib.init_lstm(keys[0], features, hidden)['layer0']
  params['b'] = 0.1 * jax.random.normal(keys[1], params['b'].shape)
  x = jax.random.normal(keys[2], (batch, time_, features))
  ct = jax.random.normal(keys[3], (batch, time_, hidden))
  flops_fwd = 2 * batch * time_ * (features + hidden) * 4 * hidden
  try:
    import torch  # noqa: F401

    have_torch = 'torch' in implementations
  except ImportError:
    have_torch = False

  results = {
    'config': {'batch': batch, 'time': time_, 'input_size': features, 'hidden_size': hidden,
               'repeats': FLAGS.repeats, 'unroll': FLAGS.unroll,
               'xla_flags': os.environ.get('XLA_FLAGS', '')},
    'jax_version': jax.__version__, 'backend': jax.default_backend(), 'machine': platform.processor() or
    platform.machine(), 'cpu_count': os.cpu_count(), 'cores_used': _num_cores(),
    'load_average': os.getloadavg() if hasattr(os, 'getloadavg') else None,
    'date': datetime.datetime.now().isoformat(timespec='seconds'), 'runs': [],
  }  # fmt: skip
  for dtype in dtypes:
    tol = 1e-4 if dtype == 'float32' else 3e-2
    impls = _make_jax_impls(params, x, ct, dtype)
    impls = {k: v for k, v in impls.items() if k in implementations}
    calls_fwd, calls_fb = {}, {}
    # Correctness first: against the scan in float32 (the kernel is checked against it too).
    scan = lambda p, x: lstm_lib.lstm({'layer0': p}, x, cpu_kernel=False)[0]
    ref_out = np.asarray(jax.jit(scan)(params, x))
    ref_grads = jax.jit(
      lambda p, x: jax.vjp(lambda p, x: lstm_lib.lstm({'layer0': p}, x, custom_vjp=False)[0], p, x)[1](ct)
    )(params, x)
    checks = {}
    for name, (fwd, fwd_bwd, args, w_hh_grad) in impls.items():
      out = jax.block_until_ready(fwd(args, x))
      g_args, g_x = jax.block_until_ready(fwd_bwd(args, x))
      checks[name] = {
        'output': _rel(out, ref_out),
        'grad_x': _rel(g_x, ref_grads[1]),
        'grad_w_hh': _rel(w_hh_grad(g_args), ref_grads[0]['w_hh']),
      }
      calls_fwd[name] = lambda f=fwd, a=args: jax.block_until_ready(f(a, x))
      calls_fb[name] = lambda f=fwd_bwd, a=args: jax.block_until_ready(f(a, x))
    torch_version = None
    if have_torch:
      t_fwd, t_fb, torch_version, torch_threads = _torch_impls(params, x, ct, dtype)
      results['config']['torch_threads'] = torch_threads
      g_x, g_w_hh = t_fb()
      checks['torch'] = {
        'output': _rel(t_fwd(), ref_out),
        'grad_x': _rel(g_x, ref_grads[1]),
        'grad_w_hh': _rel(g_w_hh.T, ref_grads[0]['w_hh']),
      }
      calls_fwd['torch'], calls_fb['torch'] = t_fwd, t_fb
    for name, errs in checks.items():
      print(f'[{dtype}] check {name:14s} ' + '  '.join(f'{k} {v:.1e}' for k, v in errs.items()))
      bad = [k for k, v in errs.items() if not v <= tol]
      if bad:
        raise SystemExit(f'{name} ({dtype}) disagrees with ours (float32) on {bad}: {errs} (tol {tol})')
    # Warm-up already done by the checks; timed rounds.
    fwd_t = _time_rounds(calls_fwd, FLAGS.repeats)
    fb_t = _time_rounds(calls_fb, FLAGS.repeats)
    peak = _matmul_peak(jnp.dtype(dtype))
    for name in calls_fwd:
      (fwd_s, fwd_cpu, fwd_faults), (fb_s, fb_cpu, fb_faults) = fwd_t[name], fb_t[name]
      run = {
        'dtype': dtype, 'implementation': name, 'forward_ms': 1e3 * fwd_s, 'forward_backward_ms': 1e3 * fb_s,
        'forward_cpu_ms': 1e3 * fwd_cpu, 'forward_backward_cpu_ms': 1e3 * fb_cpu,
        'forward_faulted_mib': fwd_faults, 'forward_backward_faulted_mib': fb_faults,
        'check_rel_l2': checks[name], 'forward_gflops': flops_fwd / fwd_s / 1e9,
        'forward_backward_gflops': 3 * flops_fwd / fb_s / 1e9, 'matmul_peak_gflops': peak,
      }  # fmt: skip
      for base in ('ours', 'torch'):
        if base in fwd_t:
          run[f'forward_vs_{base}'] = fwd_s / fwd_t[base][0]
          run[f'forward_backward_vs_{base}'] = fb_s / fb_t[base][0]
      results['runs'].append(run)
    if torch_version:
      results['torch_version'] = torch_version
    if FLAGS.breakdown:
      parts = _breakdown(params, x, dtype, have_torch)
      results.setdefault('breakdown', {})[dtype] = parts
      print(
        f'[{dtype}] forward breakdown (matmul peak {peak:.0f} GFLOP/s): '
        + ', '.join(f'{name} {v["ms"]:.1f} ms ({v["gflops"]:.0f} GFLOP/s)' for name, v in parts.items())
      )

  header = (
    f'{"dtype":9s} {"implementation":14s} {"fwd ms":>8s} {"fwd+bwd ms":>11s} {"fwd/torch":>9s}'
    f' {"fb/torch":>9s} {"fb/ours":>8s}'
    f' {"fb GFLOP/s":>11s} {"of peak":>8s} {"fb CPU ms":>10s} {"faulted MiB fwd/fb":>19s}'
  )
  print(
    f'\nB={batch} T={time_} input={features} hidden={hidden}; medians of {FLAGS.repeats} rounds;', end=' '
  )
  load = results['load_average']
  print(f'jax {jax.__version__}; {results["cores_used"]} of {results["cpu_count"]} CPUs', end='')
  print(f'; torch threads {results["config"].get("torch_threads", "-")}; load {load[0]:.1f}' if load else '')
  print(header)
  for r in results['runs']:
    vs_torch = f'{r["forward_backward_vs_torch"]:.2f}' if 'forward_backward_vs_torch' in r else '-'
    fwd_vs_torch = f'{r["forward_vs_torch"]:.2f}' if 'forward_vs_torch' in r else '-'
    print(
      f'{r["dtype"]:9s} {r["implementation"]:14s} {r["forward_ms"]:8.1f} {r["forward_backward_ms"]:11.1f}'
      f' {fwd_vs_torch:>9s} {vs_torch:>9s} {r.get("forward_backward_vs_ours", float("nan")):8.2f}'
      f' {r["forward_backward_gflops"]:11.1f} {r["forward_backward_gflops"] / r["matmul_peak_gflops"]:8.0%}'
      f' {r["forward_backward_cpu_ms"]:10.1f}'
      f' {r["forward_faulted_mib"]:9.1f}/{r["forward_backward_faulted_mib"]:<9.1f}'
    )
  if FLAGS.output_json:
    with open(FLAGS.output_json, 'w') as f:
      json.dump(results, f, indent=2)
    print(f'wrote {FLAGS.output_json}')


if __name__ == '__main__':
  app.run(main)
