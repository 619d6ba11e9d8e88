"""Training and evaluation runs: `train_and_evaluate(config, workdir)` and `base_config(model_name)`.

The pure pieces (losses, the jitted train/eval steps, evaluation sums) live in `lstm_attn.steps`; this
module is the loop around them: data (`lstm_attn.train_inputs`), checkpoints (`lstm_attn.checkpointing`),
logs and metrics (`lstm_attn.logging_utils`), periodic evaluation and samples, NaN guard, transfer.

Where a run starts (checked in this order, as big_vision documents it):
  1. the latest restorable checkpoint in `<workdir>/checkpoints` (automatic resume; a broken latest one
     is moved aside with a message and the one before is used);
  2. else, for fine-tuning, the pretrained params of `config.init_from` restored into the matching
     subtree (`backbone`), the rest fresh;
  3. else from scratch.
A stopped run resumes exactly: the checkpoint holds params, optimizer state, step, the dropout RNG state
and the batcher position, so on CPU the losses at every later step and the final params are identical to
an uninterrupted run's (tests/test_train.py, tests/test_faults.py).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lstm_attn import checkpointing
from lstm_attn import logging_utils as lu
from lstm_attn.models import model_config
from lstm_attn.steps import (  # noqa: F401  (re-exported: the trainer's public pieces)
  Steps,
  build_steps,
  check_config,
  classification_loss,
  cross_entropy_sums,
  evaluate,
  merged_model,
  mlm_nsp_loss,
  model_loss,
  next_token_loss,
  objective_of,
)


class TrainingDiverged(FloatingPointError):
  """The training loss became NaN or inf; the run stopped without saving the bad state."""


# ---------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------
def _config_fingerprint(config) -> dict:
  """The config fields that must match for a checkpoint to be resumed into this run."""
  d = config.to_dict()
  return {
    'model': d.get('model'),
    'num_classes': d.get('num_classes'),
    'data': d.get('data'),
    'seed': d.get('seed'),
  }


def _to_json(x):
  return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o)))


def _validate(config, workdir) -> None:
  if not workdir:
    raise ValueError("workdir='' : give --workdir=<folder for checkpoints, metrics and samples>.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'workdir={workdir!r} exists and is not a folder.')
  for field in ('num_train_steps', 'batch_size', 'log_every', 'eval_every', 'checkpoint_every'):
    v = config.get(field, None)
    if not isinstance(v, int) or v < 1:
      raise ValueError(f'config.{field}={v!r} must be a positive integer.')
  if not isinstance(config.get('eval_batches', 0), int) or config.get('eval_batches', 0) < 0:
    raise ValueError(f'config.eval_batches={config.eval_batches!r} must be an int >= 0 (0: whole split).')
  check_config(config)  # the step builder's checks, before anything is written to the workdir
  if not config.get('num_classes', None):  # (the classification task brings its own data)
    from lstm_attn import train_inputs

    train_inputs.data_path(config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint), evaluates, samples.

  Returns a summary dict (final step, final val/test metrics, sample text). Writes
  `<workdir>/metrics.jsonl`, TensorBoard events in `<workdir>/tensorboard`, checkpoints in
  `<workdir>/checkpoints`, the tokenizer, and `<workdir>/summary.json`.
  """
  from lstm_attn import train_inputs  # data plumbing: corpus, tokenizer, batchers

  _validate(config, workdir)
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  # Refuse a workdir that holds another experiment's checkpoints before writing anything into it.
  existing = _existing_meta(ckpt_dir)
  now = _to_json(_config_fingerprint(config))
  if existing is not None and existing.get('fingerprint') != now:
    diff = _diff(existing.get('fingerprint') or {}, now)
    raise ValueError(
      f'workdir={workdir!r} holds checkpoints of a different experiment ({"; ".join(diff)}). '
      'Use a fresh --workdir, or the same config to resume; nothing in the workdir was changed.'
    )
  os.makedirs(workdir, exist_ok=True)

  place = _Placement(config)
  inputs = train_inputs.make_inputs(config, workdir)
  seed = int(config.seed)
  objective = objective_of(config)
  from lstm_attn.models import build_model

  def model_fn(rngs):
    return build_model(config, vocab_size=inputs.vocab_size, rngs=rngs)

  steps, init, train_step, eval_step, abstract_state = build_steps(
    config, model_fn, seed=seed, mesh=place.mesh
  )
  ckpt = checkpointing.Checkpointer(
    ckpt_dir,
    keep_latest=int(config.get('keep_latest', 2)),
    keep_best=int(config.get('keep_best', 1)),
    async_save=bool(config.get('async_checkpoints', True)),
  )
  if place.main:
    writer = lu.MetricWriter(workdir, tensorboard=bool(config.get('tensorboard', True)))
  else:
    writer = lu.NullWriter()
  try:
    # -- where the run starts (see the module docstring for the order) --------------------------------
    try:
      restored = ckpt.restore_latest_good(abstract_state)
    except checkpointing.CheckpointError as e:
      # Often not damage but a config change that reshapes the optimizer state (e.g. clipping turned
      # on after a divergence): say which fields changed.
      changed = _diff((existing or {}).get('config') or {}, _to_json(config.to_dict()))
      if not changed:
        raise
      raise checkpointing.CheckpointError(
        f'{e}\nThe config differs from the one these checkpoints were saved with: {"; ".join(changed)}. '
        'Resume with that config, or start this config in a fresh --workdir.'
      ) from e
    if restored is not None:
      start_step, state, meta = restored
      inputs.train.restore(meta['data_state'])
      writer.truncate_after(start_step)
      lu.log(f'Resumed from {ckpt_dir}/{start_step} (step {start_step}).')
    else:
      start_step = 0
      writer.truncate_after(0)  # a fresh start: no records of an earlier, checkpoint-less attempt
      state = init()
      if config.get('init_from', ''):
        state = _init_from_pretrained(state, config, steps, workdir, abstract_state)
    num_steps = int(config.num_train_steps)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state['params']))
    lu.log(
      f'{config.model.name} ({objective}), {n_params:,} params, vocab {inputs.vocab_size}, batch '
      f'{config.batch_size} x {inputs.seq_len}, {num_steps} steps, workdir {workdir}'
    )
    progress = lu.Progress(num_steps, start_step, inputs.tokens_per_step)
    pending = []  # (step, device metrics) since the last log
    last_eval = {}
    step = start_step
    while step < num_steps:
      batch = place.train_batch(inputs.train.next())
      state, metrics = train_step(state, batch)
      step += 1
      pending.append((step, metrics))
      is_last = step == num_steps
      do_log = step % config.log_every == 0 or is_last
      do_eval = step % config.eval_every == 0 or is_last
      # Also at every eval when the best-N policy ranks checkpoints by eval loss.
      do_ckpt = step % config.checkpoint_every == 0 or is_last or (do_eval and config.keep_best > 0)
      if do_log or do_ckpt:
        _flush_train_metrics(pending, step, progress, writer, ckpt, do_log)
        pending = []
      if do_eval:
        last_eval = _run_eval(config, inputs, place, steps, eval_step, state, step, writer, is_last)
      if do_ckpt:
        meta = {
          'step': step,
          'data_state': _to_json(inputs.train.state()),
          'fingerprint': _to_json(_config_fingerprint(config)),
          'config': _to_json(config.to_dict()),
          'tokenizer': inputs.tokenizer_path,
        }
        ckpt.save(step, state, meta, eval_loss=last_eval['val']['loss'] if do_eval else None)
    ckpt.wait()
    summary = _finished_summary(workdir, step) if not last_eval else None
    if summary is not None:  # resumed a finished run: its final evaluation is on record already
      lu.log(f'{workdir} had already finished step {step}; its summary: {workdir}/summary.json.')
    else:
      if not last_eval:  # resumed at the end of an unfinished write-up: evaluate the restored state
        last_eval = _run_eval(config, inputs, place, steps, eval_step, state, step, writer, True)
      summary = {
        'step': step,
        'params': n_params,
        **{f'{k}_{m}': v for k, d in last_eval.items() if isinstance(d, dict) for m, v in d.items()},
      }
      if 'sample' in last_eval:
        summary['sample'] = last_eval['sample']
      if place.main:
        with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
          json.dump(summary, f, indent=1)
  finally:
    writer.close()
    ckpt.close()
  if config.get('init_from', '') and config.get('compare_from_scratch', False):
    summary['from_scratch'] = _compare_from_scratch(config, workdir, summary)
  return summary


def _finished_summary(workdir: str, step: int) -> dict | None:
  """The summary.json of a run that already ended at `step`, or None."""
  try:
    with open(os.path.join(workdir, 'summary.json'), encoding='utf-8') as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if isinstance(summary, dict) and summary.get('step') == step else None


class _Placement:
  """Where a run's arrays live (lstm_attn.sharding): the device mesh from `config.mesh`, this process's rows
  of every batch, and who writes (process 0). One device is the 1x1 mesh: the same code path."""

  def __init__(self, config):
    from lstm_attn import sharding

    self._sharding = sharding
    sharding.maybe_initialize_distributed(config)  # before anything touches a device
    self.mesh = sharding.mesh_from_config(config)
    sharding.check_global_batch(int(config.batch_size), self.mesh)
    self.batch_size = int(config.batch_size)
    self.main = sharding.is_main_process()

  def train_batch(self, batch: dict):
    """The global batch (every process passes the same full batch; each contributes its own rows)."""
    rows = self._sharding.process_batch_slice(self.batch_size)
    return self._sharding.make_global_batch({k: v[rows] for k, v in batch.items()}, self.mesh)

  def eval_batch(self, batch: dict):
    n = len(next(iter(batch.values())))
    return self._sharding.global_array_from_full(batch, self._sharding.eval_batch_sharding(n, self.mesh))


def _diff(saved: dict, now: dict, prefix='config.') -> list[str]:
  out = []
  for k in sorted(set(saved) | set(now)):
    a, b = saved.get(k), now.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f'{prefix}{k}.')
    elif a != b:
      out.append(f'{prefix}{k} was {a!r} there, is {b!r} now')
  return out


def _existing_meta(ckpt_dir):
  if not os.path.isdir(ckpt_dir):
    return None
  steps = sorted((int(d) for d in os.listdir(ckpt_dir) if d.isdigit()), reverse=True)
  for step in steps:
    path = os.path.join(ckpt_dir, str(step), 'meta', 'metadata')
    try:
      with open(path, encoding='utf-8') as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError):
      continue
  return None


def _flush_train_metrics(pending, step, progress, writer, ckpt, do_log) -> None:
  """Fetches the pending per-step metrics; stops the run on NaN/inf; writes the log line and JSONL."""
  fetched = jax.device_get([m for _, m in pending])
  for (s, _), m in zip(pending, fetched):
    if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
      ckpt.wait()
      last = ckpt.latest_step()
      raise TrainingDiverged(
        f'training loss is {float(m["loss"])} (grad norm {float(m["grad_norm"])}) at step {s}: stopping '
        f'without saving. The last good checkpoint (step {last}) in {ckpt.directory} is intact: lower '
        'optim.learning_rate (or optim.grad_clip_norm) and resume from it; turning clipping on from 0 '
        'changes the optimizer state, so that needs a fresh --workdir.'
      )
  if not do_log:
    return
  keys = sorted(fetched[-1], key=lambda k: (k != 'loss', k))  # loss first in the log line
  mean = {k: float(np.mean([m[k] for m in fetched])) for k in keys}
  line, rates = progress.line(step, mean)
  lu.log(line)
  writer.write(step, 'train', {**mean, **rates})


def _run_eval(config, inputs, place, steps, eval_step, state, step, writer, is_last) -> dict:
  out = {}
  for split in inputs.eval_splits:
    if split == 'test' and not is_last:
      continue
    m = evaluate(
      eval_step,
      state,
      (place.eval_batch(b) for b in inputs.eval_batches(split)),
      chars_per_token=inputs.chars_per_token.get(split),
      bytes_per_token=inputs.bytes_per_token.get(split),
    )
    out[split] = m
    writer.write(step, split, m)
    keys = [
      k
      for k in ('loss', 'perplexity', 'bits_per_char', 'bits_per_byte', 'accuracy', 'nsp_accuracy')
      if k in m
    ]
    if steps.objective == 'cls':
      keys = ['loss', 'accuracy']
    lu.log(f'  eval {split} @ {step}: ' + ', '.join(f'{k} {m[k]:.4f}' for k in keys))
  # Every process samples (the model's arrays span all of them); lu.log prints on process 0 only.
  if (
    steps.objective == 'lm'
    and config.get('sample_tokens', 0)
    and (is_last or config.get('sample_every_eval', True))
  ):
    text = sample_text(config, inputs, steps, state, step)
    out['sample'] = text
    writer.write_text(step, 'sample', text)
    lu.log(f'  sample @ {step}:\n{text}\n  ---')
  writer.flush()
  return out


def sample_text(config, inputs, steps, state, step, *, prompt: str | None = None, num_tokens=None) -> str:
  """Generates from the current params (eval mode) with the config's sampling settings.

  A GPT is trained on windows of `model.max_len` tokens (learned positions end there; rotary ones run on
  but were never trained on longer contexts): longer samples are generated in windows, each continuing
  from the last half window of the text so far (as nanoGPT crops its context).
  """
  from lstm_attn.generate import generate

  s = config.get('sampling', ml_collections.ConfigDict())
  prompt = s.get('prompt', '\n') if prompt is None else prompt
  tokens = np.asarray(inputs.tokenizer.encode(prompt), np.int32)
  if tokens.size == 0:
    tokens = np.asarray(inputs.tokenizer.encode('\n'), np.int32)
  total = int(num_tokens or config.sample_tokens)
  spec, model_cfg = model_config(config.model)
  window = spec.context_window(model_cfg)  # None: the model takes any context (LSTMs)
  if window is not None:
    tokens = tokens[-(window // 2) :]
  model = merged_model(steps, state)
  rng = jax.random.fold_in(jax.random.key(int(config.seed) + 7), step)
  out = tokens
  produced = 0
  while produced < total:
    context = out if window is None else out[-(window // 2) :]
    n = total - produced if window is None else min(total - produced, window - len(context))
    rng, key = jax.random.split(rng)
    new = generate(
      model,
      jnp.asarray(context)[None, :],
      int(n),
      rng=key,
      temperature=float(s.get('temperature', 0.8)),
      top_k=s.get('top_k', None),
      top_p=s.get('top_p', None),
    )
    out = np.concatenate([out, np.asarray(new)[0, len(context) :]])
    produced += n
  return inputs.tokenizer.decode(out.tolist())


# ---------------------------------------------------------------------------------------------------
# Transfer learning.
# ---------------------------------------------------------------------------------------------------
def _path_key(path) -> tuple[str, ...]:
  names = []
  for k in path:
    name = getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))
    names.append(str(name))
  if names and names[-1] == 'value':
    names = names[:-1]
  return tuple(names)


def transfer_params(params, pretrained: dict, subtree: str = 'backbone'):
  """Copies the leaves of `pretrained` (raw nested dicts) into `params` where path and shape match.

  Only leaves under `subtree` (a top-level attribute name; '' for all) are candidates. Returns
  (new params, restored paths, fresh paths, unused pretrained paths), paths as 'a/b/c' strings.
  """
  source = {_path_key(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(pretrained)[0]}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  new, restored, fresh, used = [], [], [], set()
  for path, x in leaves:
    key = _path_key(path)
    src = source.get(key)
    in_subtree = not subtree or (key and key[0] == subtree)
    if in_subtree and src is not None and src.shape == x.shape:
      new.append(jnp.asarray(src, dtype=x.dtype))
      restored.append('/'.join(key))
      used.add(key)
    else:
      new.append(x)
      fresh.append('/'.join(key) + ('' if src is None else f' (shape {src.shape} != {x.shape})'))
  unused = ['/'.join(k) for k in source if k not in used]
  return jax.tree_util.tree_unflatten(treedef, new), restored, fresh, unused


def _init_from_pretrained(state, config, steps, workdir, abstract_state):
  raw, src_step = checkpointing.load_params(config.init_from)
  subtree = config.get('init_subtree', 'backbone')
  params, restored, fresh, unused = transfer_params(state['params'], raw, subtree)
  if not restored:
    raise ValueError(
      f'config.init_from={config.init_from!r}: no parameter under {subtree!r} matches this model '
      f'(pretrained has {len(unused)} leaves). Is it a checkpoint of the same model family and sizes?'
    )
  lu.log(
    f'Initialised from {config.init_from} (step {src_step}): restored {len(restored)} tensors under '
    f'{subtree!r}, fresh {len(fresh)}: {fresh}; unused from the checkpoint: {len(unused)}.'
  )
  from lstm_attn import sharding

  params = sharding.put_like(params, abstract_state['params'])
  opt_sh = jax.tree.map(lambda a: a.sharding, abstract_state['opt_state'])
  opt_state = jax.jit(steps.tx.init, out_shardings=opt_sh)(params)
  if not sharding.is_main_process():
    return {**state, 'params': params, 'opt_state': opt_state}
  with open(os.path.join(workdir, 'transfer.json'), 'w', encoding='utf-8') as f:
    json.dump(
      {
        'init_from': config.init_from,
        'step': src_step,
        'restored': restored,
        'fresh': fresh,
        'unused': unused,
      },
      f,
      indent=1,
    )
  return {**state, 'params': params, 'opt_state': opt_state}


def _compare_from_scratch(config, workdir, summary) -> dict:
  """Trains the same model from scratch for the same budget in `<workdir>/from_scratch`; prints both."""
  scratch_cfg = ml_collections.ConfigDict(config.to_dict())
  scratch_cfg.init_from = ''
  scratch_cfg.compare_from_scratch = False
  scratch = train_and_evaluate(scratch_cfg, os.path.join(workdir, 'from_scratch'))
  rows = [('pretrained init', summary), ('from scratch', scratch)]
  lu.log(f'\nTransfer vs scratch ({config.num_train_steps} steps each):')
  lu.log(f'  {"init":<16} {"val acc":>8} {"test acc":>9} {"val loss":>9}')
  for name, s in rows:
    acc, test_acc, loss = (s.get(k, float('nan')) for k in ('val_accuracy', 'test_accuracy', 'val_loss'))
    lu.log(f'  {name:<16} {acc:>8.4f} {test_acc:>9.4f} {loss:>9.4f}')
  table = {
    name: {k: s.get(k) for k in ('val_accuracy', 'test_accuracy', 'val_loss', 'test_loss')}
    for name, s in rows
  }
  from lstm_attn import sharding

  if sharding.is_main_process():  # one writer, as for summary.json
    with open(os.path.join(workdir, 'transfer_comparison.json'), 'w', encoding='utf-8') as f:
      json.dump(table, f, indent=1)
  return {k: scratch.get(k) for k in ('val_accuracy', 'test_accuracy', 'val_loss', 'test_loss')}


# ---------------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------------
def tiny_shakespeare_budget(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """gpt_char's data and token budget, shared by the character-level tiny-Shakespeare configs.

  The text is required (`--config.data.path`; no default corpus stands in for it), character tokens,
  context 64, batch 12, 2000 steps: 1.5M training characters (nanoGPT's CPU "baby GPT" budget), evaluated
  on the whole val split every 500 steps, with 300-character samples.
  """
  c.data.required = True
  c.data.tokenizer = 'char'
  c.data.seq_len = 64
  c.batch_size = 12
  c.num_train_steps = 2000
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500
  c.eval_batch_size = 64
  c.eval_batches = 0  # the whole val split
  c.sample_tokens = 300
  return c


def base_config(model_name: str) -> ml_collections.ConfigDict:
  """Every trainer field with its default; experiment configs (experiments/configs/*.py) override some.

  Placeholders (typed None) can be set from the command line: `--config.data.max_bytes=1000000`.
  """
  from ml_collections import config_dict

  from lstm_attn.models import default_model_config

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = default_model_config(model_name)
  c.num_classes = config_dict.placeholder(int)  # set: sequence classification
  c.init_from = ''  # fine-tuning: pretraining workdir (or checkpoint folder) to restore `init_subtree` from
  c.init_subtree = 'backbone'
  c.compare_from_scratch = False  # fine-tuning: also train from scratch for the same budget, print both

  c.data = ml_collections.ConfigDict()
  c.data.path = ''  # '': the embedded stdlib corpus
  c.data.required = False
  c.data.max_bytes = config_dict.placeholder(int)
  c.data.tokenizer = 'byte'  # byte | char | bpe | unigram
  c.data.vocab_size = config_dict.placeholder(int)  # subword tokenizers only
  c.data.seq_len = 128
  c.data.mode = 'random'  # or 'sequential': consecutive windows, every token once per epoch (no state
  # is carried across batches: each window starts from a zero LSTM state either way)
  c.data.snippets_per_class = (512, 64, 64)  # classification only

  c.num_train_steps = 1000
  c.batch_size = 16
  c.grad_accum_steps = 1
  c.eval_batch_size = config_dict.placeholder(int)
  c.eval_batches = 20  # per split and eval; 0: the whole split
  c.log_every = 50
  c.eval_every = 250
  c.checkpoint_every = 250
  c.keep_latest = 2
  c.keep_best = 1
  c.async_checkpoints = True
  c.mesh = ml_collections.ConfigDict()  # devices (lstm_attn.sharding); batch_size is the GLOBAL batch
  c.mesh.data = -1  # devices along 'data' (-1: all that fsdp leaves)
  c.mesh.fsdp = 1  # > 1: parameters and optimizer state split that many ways (FSDP)
  c.mesh.fsdp_min_size = 2**14  # parameters with fewer elements stay replicated
  c.distributed = ml_collections.ConfigDict()  # multi-host: jax.distributed.initialize
  c.distributed.enabled = False
  c.distributed.coordinator_address = ''  # 'host0:1234' (or env JAX_COORDINATOR_ADDRESS)
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)
  c.distributed.initialization_timeout = config_dict.placeholder(int)
  c.cpu_ynn_fusion = 'default'  # XLA:CPU only: 'dots' = YNNPACK for matmuls only (lstm_attn.steps)
  c.tensorboard = True  # event files in <workdir>/tensorboard (tensorboardX; it imports torch if present)

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-3
  c.optim.min_learning_rate = 1e-4
  c.optim.warmup_steps = 100
  c.optim.decay_steps = config_dict.placeholder(int)  # default: num_train_steps
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.decay_embeddings = False  # True: decay embedding tables too (as nanoGPT)
  c.optim.grad_clip_norm = 1.0

  c.sample_tokens = 200  # generated after each eval (generative models); 0: never
  c.sampling = ml_collections.ConfigDict()
  c.sampling.prompt = '\n'
  c.sampling.temperature = 0.8
  c.sampling.top_k = config_dict.placeholder(int)
  c.sampling.top_p = config_dict.placeholder(float)
  c.sample_every_eval = True
  return c
