r"""PyTorch eager GPT of the same shape as gpt_char, for the quality and speed comparison with lstm_attn.

    python experiments/torch_gpt_baseline.py --data_path=../shared/data/tinyshakespeare.txt \
      --out=/tmp/lstm_attn/torch_gpt.json

1. Correctness first: the torch model, loaded with the JAX model's initial parameters, gives the same
   logits (relative L2 error printed; must be < 1e-5 in float32).
2. Speed, side by side: R rounds, each timing `--block` train steps of torch, then `--block` steps of the
   jitted JAX step (from `lstm_attn.training.build_steps`, the trainer's own), on the same batches. Medians of
   per-step times per framework and the median of per-round ratios are reported, so machine load hits both
   alike. Both use every core by default; `--threads=1` asks for one thread each (XLA still runs some
   loops on 2 threads: prefix `taskset -c 0` for a true single core). `--frameworks=torch|jax` times one
   framework only, to compare them in separate processes (run the script once per framework).
3. Quality (`--train_steps`, default 2000): trains the torch model with the same recipe (AdamW with
   lstm_attn.training.optimizer's decay mask, warmup + cosine, clipping 1.0, same batches) and evaluates
   the whole val split as lstm_attn does; prints val loss, to set next to `experiments/configs/gpt_char.py`'s.

The architecture is lstm_attn's GPT as the config sets it: rotary (gpt_char) or learned positions
(`--positions=learned`, nanoGPT's), pre-LN blocks (biases as `config.model.use_bias`;
gpt_char has none, as nanoGPT's bias=False), LayerNorm eps 1e-5, exact GELU, tied embeddings; attention is
`F.scaled_dot_product_attention(is_causal=True)` (as nanoGPT's flash path).
"""

import atexit
import json
import math
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags

_DATA = flags.DEFINE_string('data_path', '../shared/data/tinyshakespeare.txt', 'Text file (nanoGPT split).')
_THREADS = flags.DEFINE_integer('threads', 0, 'torch.set_num_threads (0: the usable cores).')
_ROUNDS = flags.DEFINE_integer(
  'rounds', 7, 'Timing rounds (each: block torch steps, block JAX steps).', lower_bound=1
)
_BLOCK = flags.DEFINE_integer('block', 20, 'Steps per framework per round.', lower_bound=1)
_TRAIN = flags.DEFINE_integer('train_steps', 2000, 'Torch training steps for the quality number (0: skip).')
_OUT = flags.DEFINE_string('out', '', 'Write the results as JSON here.')
_POSITIONS = flags.DEFINE_enum(
  'positions', None, ['rotary', 'learned'], "Override gpt_char's positions ('learned' is nanoGPT's model)."
)
_FRAMEWORKS = flags.DEFINE_enum(
  'frameworks',
  'both',
  ['both', 'torch', 'jax'],
  'Time both interleaved in this process, or only one (run the script twice, one framework per process, '
  'for a comparison where the two thread pools never share a process).',
)


def _config(data_path):
  import importlib.util

  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'gpt_char.py')
  spec = importlib.util.spec_from_file_location('gpt_char', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.path = data_path
  if _POSITIONS.value:
    c.model.positions = _POSITIONS.value
  return c


def _torch_model(vocab, c):
  import torch
  import torch.nn.functional as F
  from torch import nn

  d, h, L, T = c.model.d_model, c.model.num_heads, c.model.num_layers, c.model.max_len
  bias = bool(c.model.get('use_bias', True))  # nanoGPT's bias=False drops Linear and LayerNorm biases
  rotary = c.model.get('positions', 'learned') == 'rotary'
  if rotary:  # lstm_attn.attention.apply_rotary: half-split pairs (j, j + hd/2), base 10000, float32
    half = d // h // 2
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float32) * 2 / (d // h))  # [hd/2]
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq  # [T, hd/2]
    cos_table = torch.cat([angles.cos(), angles.cos()], dim=-1)  # [T, hd]
    sin_table = torch.cat([-angles.sin(), angles.sin()], dim=-1)  # [T, hd]: sign folds in rotate-half

    def rotate(x):  # [B, h, T, hd] -> same, x * cos + swap_halves(x) * (-sin, sin)
      n = x.shape[2]
      swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
      return x * cos_table[:n] + swapped * sin_table[:n]

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-5, bias=bias), nn.LayerNorm(d, eps=1e-5, bias=bias)
      self.query, self.key, self.value, self.out = (nn.Linear(d, d, bias=bias) for _ in range(4))
      self.fc1, self.fc2 = nn.Linear(d, 4 * d, bias=bias), nn.Linear(4 * d, d, bias=bias)

    def forward(self, x):  # [B, T, d]
      B, T_, _ = x.shape
      y = self.ln1(x)
      q, k, v = (p(y).view(B, T_, h, d // h).transpose(1, 2) for p in (self.query, self.key, self.value))
      if rotary:
        q, k = rotate(q), rotate(k)
      a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, h, T, hd]
      x = x + self.out(a.transpose(1, 2).reshape(B, T_, d))
      return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte = nn.Embedding(vocab, d)
      self.wpe = None if rotary else nn.Embedding(T, d)
      self.blocks = nn.ModuleList(Block() for _ in range(L))
      self.ln_f = nn.LayerNorm(d, eps=1e-5, bias=bias)

    def forward(self, idx):  # [B, T] -> [B, T, V]
      x = self.wte(idx)
      if self.wpe is not None:
        x = x + self.wpe(torch.arange(idx.shape[1]))
      for b in self.blocks:
        x = b(x)
      return self.ln_f(x) @ self.wte.weight.T

  return GPT()


def _load_jax_params(model, params):
  """Copies lstm_attn GPT params (nnx.State) into the torch model (kernels [in, out] -> weight [out, in])."""
  import torch

  b = params['backbone']
  sd = {'wte.weight': b['wte']['embedding']}
  if 'wpe' in b:  # learned positions only (rotary models have no table)
    sd['wpe.weight'] = b['wpe']['embedding']

  def put(prefix, tree, weight, transpose=False):
    w = tree[weight]
    sd[f'{prefix}.weight'] = np.asarray(w[...]).T if transpose else w
    if 'bias' in tree:
      sd[f'{prefix}.bias'] = tree['bias']

  put('ln_f', b['ln_f'], 'scale')
  for i, blk in b['blocks'].items():
    for name in ('query', 'key', 'value', 'out'):
      put(f'blocks.{i}.{name}', blk['attn'][name], 'kernel', transpose=True)
    for name in ('fc1', 'fc2'):
      put(f'blocks.{i}.{name}', blk['mlp'][name], 'kernel', transpose=True)
    for ln in ('ln1', 'ln2'):
      put(f'blocks.{i}.{ln}', blk[ln], 'scale')
  from flax import nnx

  sd = {k: torch.tensor(np.array(v[...] if isinstance(v, nnx.Variable) else v)) for k, v in sd.items()}
  missing, extra = set(model.state_dict()) - set(sd), set(sd) - set(model.state_dict())
  if missing or extra:
    raise ValueError(
      f'torch and JAX parameters differ: no JAX counterpart {sorted(missing)}, no torch one {sorted(extra)}'
    )
  model.load_state_dict(sd)


def _torch_optimizer(model, c):
  import torch

  def decays(name, p):  # as lstm_attn.training.optimizer.decay_mask
    is_embedding = 'wte' in name or 'wpe' in name
    return p.dim() >= 2 and (c.optim.get('decay_embeddings', False) or not is_embedding)

  decay = [p for n, p in model.named_parameters() if decays(n, p)]
  no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
  o = c.optim
  opt = torch.optim.AdamW(
    [{'params': decay, 'weight_decay': o.weight_decay}, {'params': no_decay, 'weight_decay': 0.0}],
    lr=o.learning_rate,
    betas=(o.b1, o.b2),
    eps=o.eps,
  )

  def lr_at(step):  # optax.warmup_cosine_decay_schedule(0, lr, warmup, num_steps, min_lr)
    if step < o.warmup_steps:
      return o.learning_rate * step / o.warmup_steps
    t = min((step - o.warmup_steps) / max(c.num_train_steps - o.warmup_steps, 1), 1.0)
    return o.min_learning_rate + 0.5 * (o.learning_rate - o.min_learning_rate) * (1 + math.cos(math.pi * t))

  return opt, lr_at


def main(argv):
  del argv
  cores = len(os.sched_getaffinity(0))  # `taskset -c 0 python ...` pins both frameworks to one core
  threads = _THREADS.value or cores
  if not os.path.isfile(_DATA.value):
    raise app.UsageError(f'--data_path={_DATA.value!r} is not a file (tiny Shakespeare, or any text file).')
  if threads == 1:  # Eigen's XLA:CPU pool on one thread (some XLA loops still use 2: see the docstring)
    os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false'
  elif threads != cores:
    raise ValueError(
      f'--threads={threads}: use 1 or the number of usable cores ({cores}); XLA uses them all.'
    )
  import jax
  import jax.numpy as jnp
  import torch
  import torch.nn.functional as F

  from lstm_attn.models import build_model
  from lstm_attn.training import build_steps
  from lstm_attn.training import inputs as train_inputs

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  c = _config(_DATA.value)
  # A fresh folder per run for the tokenizer: a shared one would reuse another text's vocabulary.
  workdir = tempfile.mkdtemp(prefix='lstm_attn_torch_baseline_')
  atexit.register(shutil.rmtree, workdir, ignore_errors=True)
  inputs = train_inputs.make_inputs(c, workdir)
  vocab = inputs.vocab_size
  steps = build_steps(c, lambda r: build_model(c, vocab_size=vocab, rngs=r))
  jax_step = steps.train_step
  state = steps.init()

  # 1. Correctness: same parameters -> same logits.
  model = _torch_model(vocab, c)
  _load_jax_params(model, jax.device_get(state['params']))
  batch = inputs.train.batch(0)
  jax_logits = np.asarray(steps.model(state)(jnp.asarray(batch['inputs'])))
  with torch.no_grad():
    torch_logits = model(torch.tensor(batch['inputs'], dtype=torch.long)).numpy()
  err = float(np.linalg.norm(torch_logits - jax_logits) / np.linalg.norm(jax_logits))
  print(f'correctness: torch vs JAX logits, relative L2 error {err:.2e}')
  if not err < 1e-5:
    raise SystemExit(
      f'torch baseline does not match the JAX model (rel L2 {err:.2e}); timings would mean nothing'
    )

  # 2. Speed, interleaved.
  opt, lr_at = _torch_optimizer(model, c)

  def torch_step(b, step):
    for g in opt.param_groups:
      g['lr'] = lr_at(step)
    x = torch.from_numpy(b['inputs']).long()
    y = torch.from_numpy(b['targets']).long()
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), c.optim.grad_clip_norm)
    opt.step()
    return loss.detach()

  batches = [inputs.train.batch(i) for i in range(_BLOCK.value)]
  jbatches = [jax.device_put(b) for b in batches]
  run_torch, run_jax = _FRAMEWORKS.value in ('both', 'torch'), _FRAMEWORKS.value in ('both', 'jax')
  for i in range(min(3, len(batches))):  # warm-up (compile, allocator) of the frameworks being timed
    if run_torch:
      torch_step(batches[i], i)
    if run_jax:
      state, m = jax_step(state, jbatches[i])
  jax.block_until_ready(state)
  t_torch, t_jax, ratios = [], [], []
  for r in range(_ROUNDS.value):
    t0 = time.perf_counter()
    for i, b in enumerate(batches if run_torch else ()):
      float(torch_step(b, i))
    t1 = time.perf_counter()
    for b in jbatches if run_jax else ():
      state, m = jax_step(state, b)
      float(m['loss'])  # per-step sync, as the torch loop's float(loss)
    t2 = time.perf_counter()
    tt, tj = (t1 - t0) / len(batches), (t2 - t1) / len(batches)
    line = f'round {r}:'
    if run_torch:
      t_torch.append(tt)
      line += f' torch {1e3 * tt:.2f} ms/step'
    if run_jax:
      t_jax.append(tj)
      line += f' JAX {1e3 * tj:.2f} ms/step'
    if run_torch and run_jax:
      ratios.append(tj / tt)
      line += f' JAX/torch {tj / tt:.3f}'
    print(line)
  median_ms = lambda ts: 1e3 * statistics.median(ts) if ts else float('nan')
  result = {
    'frameworks': _FRAMEWORKS.value,
    'torch_ms_per_step_median': median_ms(t_torch),
    'jax_ms_per_step_median': median_ms(t_jax),
    'jax_over_torch_median_ratio': statistics.median(ratios) if ratios else float('nan'),
    'threads': threads,
    'cpu_affinity': sorted(os.sched_getaffinity(0)),
    'rounds': _ROUNDS.value,
    'block': _BLOCK.value,
    'load_average': os.getloadavg(),
    'torch': torch.__version__,
    'jax': jax.__version__,
    'correctness_rel_l2': err,
  }
  print(
    f'\n| framework | median ms/step |\n|---|---|\n'
    f'| PyTorch eager ({threads} threads, {_FRAMEWORKS.value}) | '
    f'{result["torch_ms_per_step_median"]:.2f} |\n'
    f'| lstm_attn JAX (jit) | {result["jax_ms_per_step_median"]:.2f} |\n'
    f'JAX / torch, median of per-round ratios: {result["jax_over_torch_median_ratio"]:.3f}'
  )

  # 3. Quality: train the torch model with the same recipe and batches.
  if _TRAIN.value:
    model = _torch_model(vocab, c)
    _load_jax_params(model, jax.device_get(steps.init()['params']))  # same initial parameters as lstm_attn
    opt, lr_at = _torch_optimizer(model, c)
    t0 = time.perf_counter()
    for s in range(_TRAIN.value):
      loss = torch_step(inputs.train.batch(s), s)
      if (s + 1) % 500 == 0:
        print(f'torch step {s + 1}: train loss {float(loss):.4f} ({time.perf_counter() - t0:.0f}s)')
    model.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
      for b in inputs.eval_batches('val'):
        logits = model(torch.from_numpy(b['inputs']).long())
        nll = F.cross_entropy(
          logits.view(-1, logits.shape[-1]), torch.from_numpy(b['targets']).long().view(-1), reduction='none'
        )
        w = torch.from_numpy(b['weights']).view(-1)
        total += float((nll * w).sum())
        count += float(w.sum())
    result['torch_val_loss'] = total / count
    result['torch_train_seconds'] = time.perf_counter() - t0
    print(
      f'torch val loss after {_TRAIN.value} steps: {result["torch_val_loss"]:.4f} '
      f'({result["torch_val_loss"] / math.log(2):.4f} bits/char)'
    )
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  app.run(main)
