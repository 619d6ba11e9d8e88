"""Training and evaluation: `train_and_evaluate(config, workdir)` and the pure steps it jits.

The core is three pure functions of pytrees, jitted once:
  init_fn()                          -> state   (parameters are created under `jit`)
  train_step(state, batch)           -> (state, metrics)   (state donated)
  eval_step(params, rest, batch)     -> summed metrics
where `state = {'step', 'params', 'rest', 'opt_state'}`: `params` is the `nnx.State` of the model's
`nnx.Param`s, `rest` everything else the model holds (dropout RNG keys and counts), `opt_state` the optax
state mirroring `params`. The model's structure (an `nnx.GraphDef`, one for train mode and one for eval
mode) is static, closed over, and `nnx.merge`d inside the step. Because every array the run owns is an
explicit argument or result, adding a device mesh is passing shardings to `jax.jit` (`in_shardings` /
`out_shardings` from `lstm_attn.sharding`); nothing else changes. Checkpoints are that same tree.

Objectives (chosen from the model): next-token cross entropy ('lm': lstm_lm, lstm_attn, gpt), masked
LM + next-sentence prediction ('mlm': bert), sequence classification ('cls': any model with
`config.num_classes`). Mixed precision: `config.model.dtype='bfloat16'` makes the model compute in bf16
from fp32 parameters (see lstm_attn.models); losses (`cross_entropy_sums` casts logits to fp32), gradients
and the optimizer stay fp32. Gradient
accumulation: `config.grad_accum_steps = k` splits each batch into k micro-batches scanned in the step
(one optimizer update per step; the per-step batch size stays `config.batch_size`).

Where a run starts (checked in this order, as big_vision documents it):
  1. the latest restorable checkpoint in `<workdir>/checkpoints` (automatic resume; a broken latest one
     is moved aside with a message and the one before is used);
  2. else, for fine-tuning, the pretrained params of `config.init_from` restored into the matching
     subtree (`backbone`), the rest fresh;
  3. else from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lstm_attn import checkpointing, optim
from lstm_attn import logging_utils as lu

LN2 = math.log(2.0)
LM_MODELS = ('lstm_lm', 'lstm_attn', 'gpt')


class TrainingDiverged(FloatingPointError):
  """The training loss became NaN or inf; the run stopped without saving the bad state."""


# ---------------------------------------------------------------------------------------------------
# Losses (pure). Every one returns (mean loss to differentiate, dict of SUMS for exact aggregation).
# ---------------------------------------------------------------------------------------------------
def cross_entropy_sums(logits, labels, weights=None):
  """logits [..., C] (any float dtype), labels [...] int, weights [...] (default 1).

  Returns (sum of weighted losses, sum of weights, sum of weighted correct argmax), all fp32 scalars.
  """
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)  # [...]
  picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [...]
  loss = logz - picked
  w = jnp.ones_like(loss) if weights is None else weights.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum(loss * w), jnp.sum(w), jnp.sum(correct * w)


def next_token_loss(logits, targets, weights=None):
  """Causal LM. logits [B, T, V], targets [B, T] (inputs shifted by one), weights [B, T] or None."""
  loss_sum, n, correct = cross_entropy_sums(logits, targets, weights)
  mean = loss_sum / jnp.maximum(n, 1.0)
  return mean, {'loss': loss_sum, 'count': n, 'correct': correct}


def mlm_nsp_loss(mlm_logits, mlm_targets, mlm_weights, nsp_logits, nsp_labels):
  """BERT pre-training: mean MLM loss over masked positions + mean NSP loss over the batch.

  mlm_logits [B, T, V], mlm_targets [B, T], mlm_weights [B, T] (1 at the 15% chosen positions),
  nsp_logits [B, 2], nsp_labels [B] (1: B follows A).
  """
  mlm_sum, mlm_n, mlm_correct = cross_entropy_sums(mlm_logits, mlm_targets, mlm_weights)
  nsp_sum, nsp_n, nsp_correct = cross_entropy_sums(nsp_logits, nsp_labels)
  mean = mlm_sum / jnp.maximum(mlm_n, 1.0) + nsp_sum / jnp.maximum(nsp_n, 1.0)
  sums = {
    'loss': mlm_sum,  # eval loss / perplexity are the MLM's (per masked token)
    'count': mlm_n,
    'correct': mlm_correct,
    'nsp_loss': nsp_sum,
    'nsp_count': nsp_n,
    'nsp_correct': nsp_correct,
  }
  return mean, sums


def classification_loss(logits, labels, weights=None):
  """logits [B, C], labels [B] int, weights [B] (0 on padding rows) or None."""
  loss_sum, n, correct = cross_entropy_sums(logits, labels, weights)
  return loss_sum / jnp.maximum(n, 1.0), {'loss': loss_sum, 'count': n, 'correct': correct}


def objective_of(config) -> str:
  """'cls' when the config has num_classes, 'mlm' for BERT, 'lm' for the causal models."""
  if config.get('num_classes', None):
    return 'cls'
  name = config.model.name
  if name == 'bert':
    return 'mlm'
  if name in LM_MODELS:
    return 'lm'
  raise ValueError(f"config.model.name={name!r}: expected one of {LM_MODELS + ('bert',)}.")


def model_loss(model, batch: dict, objective: str):
  """Runs `model` on `batch` and returns (mean loss, sums). Batch keys (as `lstm_attn.data` yields them):

  lm:  inputs [B, T], targets [B, T] (inputs shifted by one), optional weights [B, T] (0 on padding).
  mlm: inputs (masked) [B, T], targets [B, T], weights [B, T] (1 where predicted), token_type_ids [B, T],
       seq_lengths [B], nsp_labels [B].
  cls: inputs [B, T], seq_lengths [B], labels [B], optional weights [B] and token_type_ids [B, T].
  """
  if objective == 'lm':
    logits = model(batch['inputs'])  # [B, T, V]
    return next_token_loss(logits, batch['targets'], batch.get('weights'))
  if objective == 'mlm':
    mlm_logits, nsp_logits = model(
      batch['inputs'], batch['token_type_ids'], seq_lengths=batch['seq_lengths']
    )  # [B, T, V], [B, 2]
    return mlm_nsp_loss(mlm_logits, batch['targets'], batch['weights'], nsp_logits, batch['nsp_labels'])
  if objective == 'cls':
    kwargs = {'token_type_ids': batch['token_type_ids']} if 'token_type_ids' in batch else {}
    logits = model(batch['inputs'], seq_lengths=batch['seq_lengths'], **kwargs)  # [B, C]
    return classification_loss(logits, batch['labels'], batch.get('weights'))
  raise ValueError(f"objective={objective!r}: expected 'lm', 'mlm' or 'cls'.")


# ---------------------------------------------------------------------------------------------------
# Pure steps.
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Steps:
  """The static pieces of a run and its jitted pure functions (see the module docstring)."""

  train_graphdef: Any
  eval_graphdef: Any
  tx: optax.GradientTransformation
  objective: str
  grad_accum_steps: int = 1

  def loss_and_rest(self, params, rest, batch):
    """Mean loss and sums of one (micro-)batch in train mode, and the updated non-param state."""
    # copy=True: fresh Variables at this trace level, so dropout may advance its RNG count under grad.
    model = nnx.merge(self.train_graphdef, params, rest, copy=True)
    loss, sums = model_loss(model, batch, self.objective)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return loss.astype(jnp.float32), (sums, new_rest)

  def train_step(self, state, batch):
    """One optimizer update. state as in the module docstring; batch: dict of [B, ...] arrays."""
    grad_fn = jax.value_and_grad(self.loss_and_rest, has_aux=True)
    params = state['params']
    k = self.grad_accum_steps
    if k == 1:
      (loss, (sums, rest)), grads = grad_fn(params, state['rest'], batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)  # [k, B/k, ...]

      def body(carry, mb):
        grads_acc, rest, loss_acc, sums_acc = carry
        (loss, (sums, rest)), grads = grad_fn(params, rest, mb)
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        sums_acc = jax.tree.map(jnp.add, sums_acc, sums)
        return (grads_acc, rest, loss_acc + loss, sums_acc), None

      first = jax.tree.map(lambda x: x[0], micro)
      sums0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: self.loss_and_rest(params, state['rest'], first)[1][0]))
      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, rest, loss, sums), _ = jax.lax.scan(body, (zeros, state['rest'], jnp.float32(0), sums0), micro)
      grads = jax.tree.map(lambda g: g / k, grads)
      loss = loss / k
    updates, opt_state = self.tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
    if self.objective == 'mlm':
      metrics['nsp_loss'] = sums['nsp_loss'] / jnp.maximum(sums['nsp_count'], 1.0)
    if self.objective == 'cls':
      metrics['accuracy'] = sums['correct'] / jnp.maximum(sums['count'], 1.0)
    new_state = {'step': state['step'] + 1, 'params': new_params, 'rest': rest, 'opt_state': opt_state}
    return new_state, metrics

  def eval_step(self, params, rest, batch):
    """Sums (loss, count, correct, ...) over one batch in eval mode (no dropout)."""
    model = nnx.merge(self.eval_graphdef, params, rest, copy=True)
    _, sums = model_loss(model, batch, self.objective)
    return sums


def build_steps(config, model_fn: Callable[[nnx.Rngs], nnx.Module], *, seed: int, mesh=None):
  """Abstract model -> graphdefs; returns (steps, init_fn, jitted train_step, jitted eval_step, abstract).

  `model_fn(rngs)` builds the model; it is traced, never run eagerly: `init_fn` creates the parameters
  and optimizer state under `jax.jit` (with `out_shardings` from the mesh when one is given).
  """
  tx = optim.make_optimizer(config)
  abstract_model = nnx.eval_shape(lambda: model_fn(_rngs(seed)))
  abstract_model.train()
  train_graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
  abstract_model.eval()
  eval_graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
  accum = int(config.get('grad_accum_steps', 1) or 1)
  if accum < 1 or config.batch_size % accum:
    raise ValueError(
      f'config.grad_accum_steps={accum} must be >= 1 and divide config.batch_size={config.batch_size}.'
    )
  steps = Steps(train_graphdef, eval_graphdef, tx, objective_of(config), accum)

  def init_fn():
    model = model_fn(_rngs(seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'rest': rest, 'opt_state': tx.init(params)}

  abstract_state = jax.eval_shape(init_fn)
  state_sh = batch_sh = None
  if mesh is not None:
    from lstm_attn import sharding

    state_sh = sharding.state_shardings(abstract_state, mesh)
    batch_sh = sharding.batch_sharding(mesh)
  init = jax.jit(init_fn, out_shardings=state_sh)
  train_step = jax.jit(
    steps.train_step,
    in_shardings=None if mesh is None else (state_sh, batch_sh),
    out_shardings=None if mesh is None else (state_sh, None),
    donate_argnums=0,
  )
  eval_step = jax.jit(steps.eval_step)
  abstract_state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh
  ) if state_sh is not None else abstract_state
  return steps, init, train_step, eval_step, abstract_state


def _rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(seed, params=seed, dropout=seed + 1)


def merged_model(steps: Steps, state, *, train: bool = False):
  """The NNX model holding `state`'s params (for sampling, export, inspection)."""
  return nnx.merge(steps.train_graphdef if train else steps.eval_graphdef, state['params'], state['rest'])


# ---------------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------------
def evaluate(eval_step, state, batches, *, chars_per_token: float | None = None, bytes_per_token=None) -> dict:
  """Sums `eval_step` over `batches` and returns loss, perplexity, bits per token/char/byte, accuracy.

  Bits per character (byte) = bits per token / characters (UTF-8 bytes) per token of the split: exact
  for the char (byte) tokenizer, where that ratio is 1.
  """
  total = None
  for batch in batches:
    sums = eval_step(state['params'], state['rest'], batch)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:
    raise ValueError('evaluation got no batches: the eval split is smaller than one batch.')
  total = {k: float(v) for k, v in jax.device_get(total).items()}
  n = max(total['count'], 1.0)
  loss = total['loss'] / n
  out = {'loss': loss, 'accuracy': total['correct'] / n, 'tokens': total['count']}
  if 'nsp_loss' in total:
    out['nsp_loss'] = total['nsp_loss'] / max(total['nsp_count'], 1.0)
    out['nsp_accuracy'] = total['nsp_correct'] / max(total['nsp_count'], 1.0)
  out['perplexity'] = math.exp(min(loss, 700.0))
  out['bits_per_token'] = loss / LN2
  if chars_per_token:
    out['bits_per_char'] = out['bits_per_token'] / chars_per_token
  if bytes_per_token:
    out['bits_per_byte'] = out['bits_per_token'] / bytes_per_token
  return out


# ---------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------
def _config_fingerprint(config) -> dict:
  """The config fields that must match for a checkpoint to be resumed into this run."""
  d = config.to_dict()
  return {'model': d.get('model'), 'num_classes': d.get('num_classes'), 'data': d.get('data'), 'seed': d.get('seed')}


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

  inputs = train_inputs.make_inputs(config, workdir)
  seed = int(config.seed)
  objective = objective_of(config)
  from lstm_attn.models import build_model

  def model_fn(rngs):
    return build_model(config, vocab_size=inputs.vocab_size, rngs=rngs)

  steps, init, train_step, eval_step, abstract_state = build_steps(config, model_fn, seed=seed)
  ckpt = checkpointing.Checkpointer(
    ckpt_dir,
    keep_latest=int(config.get('keep_latest', 2)),
    keep_best=int(config.get('keep_best', 1)),
    async_save=bool(config.get('async_checkpoints', True)),
  )
  writer = lu.MetricWriter(workdir, tensorboard=bool(config.get('tensorboard', True)))
  try:
    # -- where the run starts (see the module docstring for the order) --------------------------------
    restored = ckpt.restore_latest_good(abstract_state)
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
        state = _init_from_pretrained(state, config, steps, writer)
    num_steps = int(config.num_train_steps)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state['params']))
    lu.log(
      f'{config.model.name} ({objective}), {n_params:,} params, vocab {inputs.vocab_size}, batch '
      f'{config.batch_size} x {inputs.seq_len}, {num_steps} steps, workdir {workdir}'
    )
    progress = lu.Progress(num_steps, start_step, inputs.tokens_per_step)
    pending = []  # (step, device metrics) since the last log
    last_eval = {}
    best_val = math.inf
    step = start_step
    while step < num_steps:
      batch = inputs.train.next()
      state, metrics = train_step(state, batch)
      step += 1
      pending.append((step, metrics))
      is_last = step == num_steps
      do_log = step % config.log_every == 0 or is_last
      do_eval = step % config.eval_every == 0 or is_last
      do_ckpt = step % config.checkpoint_every == 0 or is_last or do_eval
      if do_log or do_ckpt:
        _flush_train_metrics(pending, step, progress, writer, ckpt, do_log)
        pending = []
      if do_eval:
        last_eval = _run_eval(config, inputs, steps, eval_step, state, step, writer, is_last)
        best_val = min(best_val, last_eval['val']['loss'])
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
    if not last_eval:  # resumed at the end: evaluate the restored state
      last_eval = _run_eval(config, inputs, steps, eval_step, state, step, writer, True)
    summary = {'step': step, 'params': n_params, **{f'{k}_{m}': v for k, d in last_eval.items() if isinstance(d, dict) for m, v in d.items()}}
    if 'sample' in last_eval:
      summary['sample'] = last_eval['sample']
    with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=1)
  finally:
    writer.close()
    ckpt.close()
  if config.get('init_from', '') and config.get('compare_from_scratch', False):
    summary['from_scratch'] = _compare_from_scratch(config, workdir, summary)
  return summary


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
        f'without saving. The last good checkpoint (step {last}) in {ckpt.directory} is intact; lower '
        'optim.learning_rate or set optim.grad_clip_norm, then resume or restart.'
      )
  if not do_log:
    return
  keys = sorted(fetched[-1], key=lambda k: (k != 'loss', k))  # loss first in the log line
  mean = {k: float(np.mean([m[k] for m in fetched])) for k in keys}
  line, rates = progress.line(step, mean)
  lu.log(line)
  writer.write(step, 'train', {**mean, **rates})


def _run_eval(config, inputs, steps, eval_step, state, step, writer, is_last) -> dict:
  out = {}
  for split in inputs.eval_splits:
    if split == 'test' and not (is_last or config.get('eval_test_every_time', False)):
      continue
    m = evaluate(
      eval_step,
      state,
      inputs.eval_batches(split),
      chars_per_token=inputs.chars_per_token.get(split),
      bytes_per_token=inputs.bytes_per_token.get(split),
    )
    out[split] = m
    writer.write(step, split, m)
    keys = [k for k in ('loss', 'perplexity', 'bits_per_char', 'bits_per_byte', 'accuracy', 'nsp_accuracy') if k in m]
    if steps.objective == 'cls':
      keys = ['loss', 'accuracy']
    lu.log(f'  eval {split} @ {step}: ' + ', '.join(f'{k} {m[k]:.4f}' for k in keys))
  if steps.objective == 'lm' and config.get('sample_tokens', 0) and (is_last or config.get('sample_every_eval', True)):
    text = sample_text(config, inputs, steps, state, step)
    out['sample'] = text
    writer.write_text(step, 'sample', text)
    lu.log(f'  sample @ {step}:\n{text}\n  ---')
  writer.flush()
  return out


def sample_text(config, inputs, steps, state, step, *, prompt: str | None = None, num_tokens=None) -> str:
  """Generates from the current params (eval mode) with the config's sampling settings.

  A GPT with learned positions sees at most `model.max_len` tokens: longer samples are generated in
  windows, each continuing from the last half window of the text so far (as nanoGPT crops its context).
  """
  from lstm_attn.generate import generate

  s = config.get('sampling', ml_collections.ConfigDict())
  prompt = s.get('prompt', '\n') if prompt is None else prompt
  tokens = np.asarray(inputs.tokenizer.encode(prompt), np.int32)
  if tokens.size == 0:
    tokens = np.asarray(inputs.tokenizer.encode('\n'), np.int32)
  total = int(num_tokens or config.sample_tokens)
  window = None
  if config.model.name == 'gpt' and config.model.get('positions', 'learned') == 'learned':
    window = int(config.model.max_len)
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


def _init_from_pretrained(state, config, steps, writer):
  raw, src_step = checkpointing.load_params(config.init_from)
  subtree = config.get('init_subtree', 'backbone')
  params, restored, fresh, unused = transfer_params(state['params'], raw, subtree)
  if not restored:
    raise ValueError(
      f'config.init_from={config.init_from!r}: no parameter under {subtree!r} matches this model '
      f'(pretrained has {len(unused)} leaves). Is it a checkpoint of the same model family and sizes?'
    )
  lu.log(f'Initialised from {config.init_from} (step {src_step}): restored {len(restored)} tensors under '
         f'{subtree!r}, fresh {len(fresh)}: {fresh}; unused from the checkpoint: {len(unused)}.')
  with open(os.path.join(writer.path.rsplit(os.sep, 1)[0], 'transfer.json'), 'w', encoding='utf-8') as f:
    json.dump({'init_from': config.init_from, 'step': src_step, 'restored': restored, 'fresh': fresh,
               'unused': unused}, f, indent=1)
  opt_state = jax.jit(steps.tx.init)(params)
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
    lu.log(f'  {name:<16} {s.get("val_accuracy", float("nan")):>8.4f} {s.get("test_accuracy", float("nan")):>9.4f} '
           f'{s.get("val_loss", float("nan")):>9.4f}')
  table = {name: {k: s.get(k) for k in ('val_accuracy', 'test_accuracy', 'val_loss', 'test_loss')} for name, s in rows}
  with open(os.path.join(workdir, 'transfer_comparison.json'), 'w', encoding='utf-8') as f:
    json.dump(table, f, indent=1)
  return {k: scratch.get(k) for k in ('val_accuracy', 'test_accuracy', 'val_loss', 'test_loss')}


# ---------------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------------
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
  c.data.mode = 'random'
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
  c.optim.grad_clip_norm = 1.0

  c.sample_tokens = 200  # generated after each eval (generative models); 0: never
  c.sampling = ml_collections.ConfigDict()
  c.sampling.prompt = '\n'
  c.sampling.temperature = 0.8
  c.sampling.top_k = config_dict.placeholder(int)
  c.sampling.top_p = config_dict.placeholder(float)
  c.sample_every_eval = True
  return c
