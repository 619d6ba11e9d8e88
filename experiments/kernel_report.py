r"""What each attention kernel compiles to on an H200 and on TPU v5e/v6e, from a CPU-only machine.

For every kernel x case x head dim x dtype x mode of `kernels/compile_sweep.py`, compiled deviceless
(`kernels/deviceless.py`): whether it compiled (else the error), and per GPU kernel the registers, spill
bytes, stack, static and dynamic shared memory, threads (num_warps), grid, pipeline stages, `wgmma` and
`mma.sync` counts in the PTX and ptxas C7511 (wgmma serialised); per compile the temporary memory from
`memory_analysis()` (GPU and TPU). JAX's bundled kernels (`jax_triton_mha`, `jax_tpu_flash`) are the
control. Prints a summary table (worst case over the cases) and writes every row as JSON and Markdown.

  pip install -e '.[compile]'
  python experiments/kernel_report.py --output_json=results/kernel_report.json
  # Our Mosaic GPU kernels beside JAX's attention_mgpu (the control), every case, bf16 and fp16:
  python experiments/kernel_report.py --targets=h200 --kernels=mosaic_gpu,jax_attention_mgpu \
      --dtypes=bfloat16,float16 --output_json=results/kernel_report_mosaic_gpu.json
  # Try other block sizes for our kernels (fields of the backend's BlockSizes):
  python experiments/kernel_report.py --targets=h200 --kernels=triton --head_dims=128 \
      --block_overrides=num_stages=4,num_stages_bwd=2 --output_json=/tmp/report.json
"""

from __future__ import annotations

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile-only devices; see kernels/deviceless.py

import collections
import json
import sys
import time

from absl import app, flags

from lstm_attn.kernels import compile_sweep as sweep
from lstm_attn.kernels import deviceless

_TARGETS = flags.DEFINE_list('targets', list(deviceless.TARGETS), f'Subset of {deviceless.TARGETS}.')
_KERNELS = flags.DEFINE_list(
  'kernels',
  list(sweep.OUR_KERNELS + sweep.CONTROL_KERNELS),
  'Kernels (GPU ones on h200, TPU ones on v5e/v6e).',
)
_CASES = flags.DEFINE_list('cases', [c.name for c in sweep.CASES], 'Cases of kernels/compile_sweep.py.')
_HEAD_DIMS = flags.DEFINE_list('head_dims', ['64', '128', '256'], 'Head dims.')
_DTYPES = flags.DEFINE_list('dtypes', ['bfloat16'], 'Input dtypes: bfloat16, float16, float32.')
_MODES = flags.DEFINE_list('modes', ['fwd', 'vjp'], "'fwd' (forward only) and/or 'vjp' (forward + VJP).")
_OVERRIDES = flags.DEFINE_list(
  'block_overrides', [], "field=value pairs applied to our kernels' default BlockSizes, e.g. num_stages=4."
)
_OUTPUT_JSON = flags.DEFINE_string(
  'output_json', None, 'Where to write every row (and a .md table beside it); parent must exist.'
)

_GPU_KERNELS = ('triton', 'mosaic_gpu', 'jax_triton_mha', 'jax_attention_mgpu')


def _parse_overrides(pairs):
  overrides = {}
  for pair in pairs:
    field, sep, value = pair.partition('=')
    if not sep or not value.lstrip('-').isdigit():
      raise app.UsageError(f'--block_overrides takes field=int pairs, got {pair!r}.')
    overrides[field] = int(value)
  return overrides


def _stages(kernel, kernel_name, blocks):
  """Pipeline stages a GPU kernel was compiled with (Triton's num_stages; Mosaic GPU's TMA ring depth)."""
  if blocks is None:  # JAX's mha and attention_mgpu: 2 stages (num_stages / max_concurrent_steps)
    return 2
  return blocks.num_stages if 'fwd' in kernel_name else blocks.num_stages_bwd


def _compile_rows(target, kernel, case, head_dim, dtype, mode, overrides):
  base = dict(
    target=target, kernel=kernel, case=case.name, head_dim=head_dim, dtype=dtype, mode=mode, compiled=False
  )
  if not sweep.supports(kernel, case, head_dim, dtype):
    return []
  ours = kernel in sweep.OUR_KERNELS
  blocks = sweep.block_sizes(kernel, head_dim, dtype, case.q_len, overrides) if ours else None
  try:
    start = time.perf_counter()
    if target == 'h200':
      compiled, kernels = sweep.compile_and_measure(
        kernel, case, head_dim, dtype, mode, overrides if ours else None
      )
    else:
      fn, args = sweep.build(kernel, case, head_dim, dtype, mode, overrides if ours else None)
      compiled, kernels = deviceless.compile_for(fn, *args, target=target), []
    base.update(compiled=True, compile_s=round(time.perf_counter() - start, 2))
    base['temp_bytes'] = compiled.memory_analysis().temp_size_in_bytes
    if target != 'h200':
      return [base]
    rows = []
    # Triton fusions are named by the pallas_call; Mosaic GPU kernels by kernel_name (ours) or by the
    # body function (attention_mgpu: entry, kernel_dq, kernel_dkv).
    for k in kernels:
      if k.name.startswith(('flash_attention', 'mha', 'entry', 'kernel_d')):
        row = dict(base, gpu_kernel=k.name, num_stages=_stages(kernel, k.name, blocks))
        row.update({f: getattr(k, f) for f in k.__dataclass_fields__}, num_warps=k.num_warps)
        row['spill_bytes'] = k.spill_bytes
        row.pop('name')
        rows.append(row)
    return rows
  except Exception as e:  # a kernel that does not compile is a row of the report, not a crash
    return [dict(base, error=f'{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}')]


def _summary(rows):
  """Worst case over cases, per (target, kernel, head_dim, dtype, mode, GPU kernel)."""
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r['target'], r['kernel'], r['head_dim'], r['dtype'], r['mode'], r.get('gpu_kernel', '-'))].append(
      r
    )
  header = (
    '| target | kernel | head dim | dtype | mode | GPU kernel | compiled | max regs | max spill B | C7511 '
    '| wgmma | mma.sync | warps | stages | max dyn smem KB | max temp MB |'
  )
  lines = [header, '|' + '---|' * (header.count('|') - 1)]
  for key, group in groups.items():
    ok = [r for r in group if r['compiled']]
    gpu = [r for r in ok if 'registers' in r]

    def span(field, rs=gpu):
      values = sorted({r[field] for r in rs})
      return '-' if not values else (str(values[0]) if len(values) == 1 else f'{values[0]}-{values[-1]}')

    temps = [r.get('temp_bytes', 0) for r in ok]
    lines.append(
      f'| {" | ".join(map(str, key))} | {len(ok)}/{len(group)} '
      f'| {max((r["registers"] for r in gpu), default="-")} '
      f'| {max((r["spill_bytes"] for r in gpu), default="-")} '
      f'| {sum(r["wgmma_serialized"] for r in gpu) if gpu else "-"} '
      f'| {span("wgmma")} | {span("mma_sync")} | {span("num_warps")} | {span("num_stages")} '
      f'| {max((r["dynamic_shared_bytes"] for r in gpu), default=0) / 1024:.0f} '
      f'| {max(temps, default=0) / 2**20:.1f} |'
    )
  return '\n'.join(lines)


def _full_table(rows):
  fields = (
    'target kernel case head_dim dtype mode gpu_kernel compiled registers spill_bytes stack_bytes '
    'wgmma_serialized wgmma mma_sync num_warps num_stages grid static_shared_bytes dynamic_shared_bytes '
    'temp_bytes error'
  ).split()
  lines = ['| ' + ' | '.join(fields) + ' |', '|' + '---|' * len(fields)]
  for r in rows:
    lines.append('| ' + ' | '.join(str(r.get(f, '')) for f in fields) + ' |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  overrides = _parse_overrides(_OVERRIDES.value)
  unknown = set(_CASES.value) - set(sweep.CASE_BY_NAME)
  if unknown:
    raise app.UsageError(f'--cases: unknown {sorted(unknown)}; choose from {sorted(sweep.CASE_BY_NAME)}.')
  if _OUTPUT_JSON.value and not os.path.isdir(os.path.dirname(os.path.abspath(_OUTPUT_JSON.value))):
    raise app.UsageError(f'--output_json: the folder of {_OUTPUT_JSON.value!r} does not exist.')
  rows = []
  for target in _TARGETS.value:
    reason = deviceless.available(target)
    if reason:
      print(f'{target}: skipped ({reason})', file=sys.stderr)
      continue
    for kernel in _KERNELS.value:
      if (kernel in _GPU_KERNELS) != (target == 'h200'):
        continue
      for case in (sweep.CASE_BY_NAME[c] for c in _CASES.value):
        for head_dim in map(int, _HEAD_DIMS.value):
          for dtype in _DTYPES.value:
            for mode in _MODES.value:
              new = _compile_rows(target, kernel, case, head_dim, dtype, mode, overrides)
              for r in new:
                status = 'ok' if r['compiled'] else r['error']
                where = f'{target} {kernel} {case.name} d{head_dim} {dtype} {mode}'
                print(f'{where} {r.get("gpu_kernel", "")}: {status}')
              rows += new
  print()
  print(_summary(rows))
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, 'w', encoding='utf-8') as f:
      json.dump({'block_overrides': overrides, 'rows': rows}, f, indent=1)
    with open(os.path.splitext(_OUTPUT_JSON.value)[0] + '.md', 'w', encoding='utf-8') as f:
      f.write(_summary(rows) + '\n\n' + _full_table(rows) + '\n')
    print(f'\nwrote {_OUTPUT_JSON.value} and its .md table')


if __name__ == '__main__':
  app.run(main)
