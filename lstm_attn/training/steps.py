"""The pure core of training: losses per objective, the jitted train/eval steps, evaluation sums.

    steps = build_steps(config, model_fn, mesh=mesh)
    state = steps.init()                                  parameters are created under `jit`
    state, metrics = steps.train_step(state, batch)       (state donated)
    sums, carry = steps.eval_step(state['params'], state['rest'], batch, carry)
    model = steps.model(state)                            the NNX model holding state's params (eval mode)

where `state = {'step', 'params', 'rest', 'opt_state'}` (and `'carry'` when the run carries the LSTM state
across batches, truncated BPTT: `carries_state(config)`): `params` is the `nnx.State` of the model's
`nnx.Param`s, `rest` everything else the model holds (dropout RNG keys and counts), `opt_state` the optax
state mirroring `params`, `carry` the recurrent state of every stream of the batch. The model's
structure (an `nnx.GraphDef`, one for train mode and one for eval mode) is static, closed over, and
`nnx.merge`d inside the step. Because every array the run owns is an explicit argument or result,
adding a device mesh is passing shardings to `jax.jit` (from `lstm_attn.training.sharding`); nothing
else changes. Checkpoints are that same tree
(`steps.abstract_state` is its shape, dtype and sharding).

Objectives (chosen from the model's spec): next-token cross entropy ('lm': lstm_lm, lstm_attn, gpt),
masked LM + next-sentence prediction ('mlm': bert), sequence classification ('cls': any model with
`config.num_classes`). Mixed precision: `config.model.dtype='bfloat16'` makes the model compute in bf16
from fp32 parameters (see lstm_attn.models); losses (`cross_entropy_sums` casts logits to fp32), gradients
and the optimizer stay fp32. Gradient accumulation: `config.grad_accum_steps = k` splits each batch into k
micro-batches scanned inside the step (one optimizer update per step; the batch size stays
`config.batch_size`). The loss and gradient are the mean of the k micro-batch means: the full-batch mean
when every micro-batch scores the same number of tokens (the LM objectives without padding), a slightly
different weighting otherwise (MLM, whose masked-token count varies; weighted classification batches).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lstm_attn.models.specs import model_spec
from lstm_attn.training import optimizer, sharding

LN2 = math.log(2.0)


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
  """'cls' when the config has num_classes, else the model family's own ('lm' or 'mlm')."""
  if config.get('num_classes', None):
    return 'cls'
  return model_spec(config.model.name).objective


def model_loss(model, batch: dict, objective: str, carry=None):
  """Runs `model` on `batch` and returns (mean loss, sums, final carry or None). Batch keys (as
  `lstm_attn.data` yields them):

  lm:  inputs [B, T], targets [B, T] (inputs shifted by one), optional weights [B, T] (0 on padding);
       with a carry (truncated BPTT), resets [B, T] (1: the state restarts before that token: a stream
       wrapped or a document starts; the LSTMs zero it in-step, lstm_attn.lstm's `resets`), and with
       randomised BPTT lengths seq_lengths [B] (the carry is the state after the last valid token).
  mlm: inputs (masked) [B, T], targets [B, T], weights [B, T] (1 where predicted), token_type_ids [B, T],
       seq_lengths [B], nsp_labels [B].
  cls: inputs [B, T], seq_lengths [B], labels [B], optional weights [B] and token_type_ids [B, T].
  """
  if objective == 'lm' and hasattr(model, 'train_forward'):
    # The LSTM families: continue the carry (if the run carries one; cut from the last step's graph:
    # truncated BPTT) and add AR/TAR (the LSTM LM's).
    start = None if carry is None else jax.lax.stop_gradient(carry)
    resets, lengths = (None, None) if carry is None else (batch.get('resets'), batch.get('seq_lengths'))
    logits, final, penalty = model.train_forward(
      batch['inputs'], carry=start, resets=resets, seq_lengths=lengths
    )  # [B, T, V]
    mean, sums = next_token_loss(logits, batch['targets'], batch.get('weights'))
    return mean + penalty, {**sums, 'penalty': penalty}, None if carry is None else final
  if objective == 'lm':
    logits = model(batch['inputs'])  # [B, T, V]
    return (*next_token_loss(logits, batch['targets'], batch.get('weights')), None)
  if objective == 'mlm':
    mlm_logits, nsp_logits = model(
      batch['inputs'], batch['token_type_ids'], seq_lengths=batch['seq_lengths']
    )  # [B, T, V], [B, 2]
    loss = mlm_nsp_loss(mlm_logits, batch['targets'], batch['weights'], nsp_logits, batch['nsp_labels'])
    return (*loss, None)
  if objective == 'cls':
    kwargs = {'token_type_ids': batch['token_type_ids']} if 'token_type_ids' in batch else {}
    logits = model(batch['inputs'], seq_lengths=batch['seq_lengths'], **kwargs)  # [B, C]
    return (*classification_loss(logits, batch['labels'], batch.get('weights')), None)
  raise ValueError(f"objective={objective!r}: expected 'lm', 'mlm' or 'cls'.")


# ---------------------------------------------------------------------------------------------------
# Pure steps.
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PureSteps:
  """The static pieces of a run and its pure step functions (jitted by `build_steps`).

  With `carries_state`, `state['carry']` holds the recurrent state of every stream (row) of the batch:
  each train step starts from the previous step's final carry (truncated BPTT) and stores its own.
  """

  train_graphdef: Any
  eval_graphdef: Any
  tx: optax.GradientTransformation
  objective: str
  grad_accum_steps: int = 1
  carries_state: bool = False

  def loss_and_rest(self, params, rest, batch, carry=None):
    """Mean loss of one (micro-)batch in train mode; (sums, the updated non-param state, final carry)."""
    # copy=True: fresh Variables at this trace level, so dropout may advance its RNG count under grad.
    model = nnx.merge(self.train_graphdef, params, rest, copy=True)
    loss, sums, carry = model_loss(model, batch, self.objective, carry)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return loss.astype(jnp.float32), (sums, new_rest, carry)

  def train_step(self, state, batch):
    """One optimizer update. state as in the module docstring; batch: dict of [B, ...] arrays."""
    grad_fn = jax.value_and_grad(self.loss_and_rest, has_aux=True)
    params, carry = state['params'], state.get('carry')
    k = self.grad_accum_steps
    if k == 1:
      (loss, (sums, rest, carry)), grads = grad_fn(params, state['rest'], batch, carry)
    else:
      micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)  # [k, B/k, ...]
      # carry leaves [L, B, F] -> [k, L, B/k, F]: micro-batch i continues rows i*B/k.. of the streams.
      micro_carry = jax.tree.map(
        lambda c: jnp.moveaxis(c.reshape(c.shape[0], k, -1, *c.shape[2:]), 1, 0), carry
      )

      def body(acc, xs):
        grads_acc, rest, loss_acc, sums_acc = acc
        mb, mc = xs
        (loss, (sums, rest, mc)), grads = grad_fn(params, rest, mb, mc)
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        sums_acc = jax.tree.map(jnp.add, sums_acc, sums)
        return (grads_acc, rest, loss_acc + loss, sums_acc), mc

      first = jax.tree.map(lambda x: x[0], (micro, micro_carry))
      sums0 = jax.tree.map(
        jnp.zeros_like, jax.eval_shape(lambda: self.loss_and_rest(params, state['rest'], *first)[1][0])
      )
      zeros = jax.tree.map(jnp.zeros_like, params)
      init = (zeros, state['rest'], jnp.float32(0), sums0)
      (grads, rest, loss, sums), carries = jax.lax.scan(body, init, (micro, micro_carry))
      carry = jax.tree.map(lambda c: jnp.moveaxis(c, 0, 1).reshape(c.shape[1], -1, *c.shape[3:]), carries)
      grads = jax.tree.map(lambda g: g / k, grads)
      loss = loss / k
    updates, opt_state = self.tx.update(grads, state['opt_state'], params)
    if self.carries_state and 'seq_lengths' in batch:
      # Randomised BPTT: a window of L < T tokens moves the params by L / T of a full one, as AWD-LSTM
      # scales its learning rate (the mean loss would otherwise weigh its tokens more).
      scale = jnp.mean(batch['seq_lengths'].astype(jnp.float32)) / batch['inputs'].shape[1]
      updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
    new_params = optax.apply_updates(params, updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
    if 'penalty' in sums:  # AR + TAR, part of `loss` (the cross entropy is loss - penalty)
      metrics['penalty'] = sums['penalty'] / k
    if self.objective == 'mlm':
      metrics['nsp_loss'] = sums['nsp_loss'] / jnp.maximum(sums['nsp_count'], 1.0)
    if self.objective == 'cls':
      metrics['accuracy'] = sums['correct'] / jnp.maximum(sums['count'], 1.0)
    new_state = {'step': state['step'] + 1, 'params': new_params, 'rest': rest, 'opt_state': opt_state}
    if self.carries_state:
      new_state['carry'] = carry
    return new_state, metrics

  def eval_step(self, params, rest, batch, carry=None):
    """(sums (loss, count, correct, ...) over one batch in eval mode (no dropout), final carry or None)."""
    model = nnx.merge(self.eval_graphdef, params, rest, copy=True)
    _, sums, carry = model_loss(model, batch, self.objective, carry)
    return sums, carry


# XLA:CPU hands matmuls AND reductions to YNNPACK by default. On the short rows of a small transformer
# (softmax backward over 64 keys, LayerNorm over 128 features) the YNNPACK reduce fusions are slower than
# XLA's own loops: 0.6-0.8 ms each for the [12, 4, 64, 64] softmax-backward sums in gpt_char's step.
# config.cpu_ynn_fusion='dots' keeps YNNPACK for matmuls only (gpt_char step 0.95x; the default byte GPT,
# BERT and the LSTMs gain nothing, so it stays opt-in; BUILD_NOTES.md, "Results: speed").
_CPU_YNN_FUSION = {
  'default': {},
  'dots': {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'},
}


def compiler_options(config) -> dict[str, str]:
  """XLA compiler options for the train and eval steps from `config.cpu_ynn_fusion` (CPU only)."""
  options = _CPU_YNN_FUSION[config.cpu_ynn_fusion]
  if not options or jax.default_backend() != 'cpu' or not _cpu_accepts(config.cpu_ynn_fusion):
    return {}
  return dict(options)


@functools.cache
def _cpu_accepts(choice: str) -> bool:
  # The options are experimental: a jaxlib that no longer knows one rejects it at compile time. Then the
  # steps compile with XLA's defaults (same numbers, the default speed) after one warning.
  options = _CPU_YNN_FUSION[choice]
  try:
    jax.jit(lambda x: x + 1, compiler_options=options)(jnp.zeros(()))
    return True
  except Exception as e:  # noqa: BLE001 (XLA raises its own runtime error types)
    logging.warning('XLA rejected compiler options %s (%s); using its defaults.', options, e)
    return False


@dataclasses.dataclass(frozen=True)
class Steps:
  """A run's jitted functions (see the module docstring) and the static pieces they close over."""

  pure: PureSteps
  init: Callable[[], dict]
  train_step: Callable
  eval_step: Callable
  abstract_state: Any  # the state's ShapeDtypeStructs (with shardings under a mesh): the restore target

  @property
  def objective(self) -> str:
    return self.pure.objective

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.pure.tx

  @property
  def carries_state(self) -> bool:
    return self.pure.carries_state

  def model(self, state, *, train: bool = False) -> nnx.Module:
    """The NNX model holding `state`'s params (for sampling, export, inspection)."""
    graphdef = self.pure.train_graphdef if train else self.pure.eval_graphdef
    return nnx.merge(graphdef, state['params'], state['rest'])

  def zero_carry(self, batch_size: int):
    """A zero carry for `batch_size` streams (None when the run carries no state), e.g. for evaluation."""
    if not self.carries_state:
      return None
    return jax.tree.map(
      lambda a: jnp.zeros((a.shape[0], batch_size, *a.shape[2:]), a.dtype), self.abstract_state['carry']
    )


def build_steps(config, model_fn: Callable[[nnx.Rngs], nnx.Module], *, mesh=None) -> Steps:
  """Jitted init/train/eval functions of `model_fn(rngs)` under `config` (checked by check_config).

  `model_fn` is traced, never run eagerly: `init` creates the parameters and optimizer state under
  `jax.jit` (with `out_shardings` from the mesh when one is given), seeded by `config.seed`.
  """
  seed = int(config.seed)
  tx = optimizer.make_optimizer(config)
  abstract_model = nnx.eval_shape(lambda: model_fn(_rngs(seed)))
  abstract_model.train()
  train_graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
  abstract_model.eval()
  eval_graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
  carries = carries_state(config)
  pure = PureSteps(
    train_graphdef, eval_graphdef, tx, objective_of(config), int(config.grad_accum_steps), carries
  )

  def init_fn():
    model = model_fn(_rngs(seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'rest': rest, 'opt_state': tx.init(params)}
    if carries:  # float32 whatever the compute dtype: the state accumulates over the whole stream
      state['carry'] = model.zero_carry(config.batch_size)  # leaves [layers, batch, features]
    return state

  abstract_state = jax.eval_shape(init_fn)
  state_sh = batch_sh = None
  if mesh is not None:
    state_sh = sharding.state_shardings(abstract_state, mesh, min_size=int(config.mesh.fsdp_min_size))
    if carries:  # the carry of a stream lives with that stream's rows of the batch
      carry_sh = NamedSharding(mesh, PartitionSpec(None, sharding.MESH_AXES))
      state_sh['carry'] = jax.tree.map(lambda _: carry_sh, abstract_state['carry'])
    batch_sh = sharding.batch_sharding(mesh)
    abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh
    )
  options = compiler_options(config)
  init = jax.jit(init_fn, out_shardings=state_sh)
  train_step = jax.jit(
    pure.train_step,
    in_shardings=None if mesh is None else (state_sh, batch_sh),
    out_shardings=None if mesh is None else (state_sh, None),
    donate_argnums=0,
    compiler_options=options,
  )
  eval_step = jax.jit(pure.eval_step, compiler_options=options)
  if mesh is not None:  # traced under jax.set_mesh: attention kernels then run per shard
    init, train_step, eval_step = (sharding.with_mesh(f, mesh) for f in (init, train_step, eval_step))
  return Steps(pure, init, train_step, eval_step, abstract_state)


def carries_state(config) -> bool:
  """Whether the run carries the recurrent state across batches (truncated BPTT): `config.carry_state`
  for a language model whose spec carries state (checked in lstm_attn.training.config)."""
  return bool(config.carry_state) and objective_of(config) == 'lm'


def _rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(seed, params=seed, dropout=seed + 1)


# ---------------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------------
def evaluate(
  steps: Steps, state, batches, *, chars_per_token: float | None = None, bytes_per_token=None
) -> dict:
  """Sums `steps.eval_step` over `batches`; returns loss, perplexity, bits per token/char/byte, accuracy.

  A run that carries state evaluates its batches in order from a zero carry, each continuing the last
  (contiguous lanes: the loss is the model's on the whole split read as a stream, as AWD-LSTM reports).
  Bits per character (byte) = bits per token / characters (UTF-8 bytes) per token of the split: exact
  for the char (byte) tokenizer, where that ratio is 1.
  """
  total = carry = None
  for batch in batches:
    if carry is None and steps.carries_state:
      carry = steps.zero_carry(len(batch['inputs']))
    sums, carry = steps.eval_step(state['params'], state['rest'], batch, carry)
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
