"""Optax optimizer from a config: AdamW, linear warmup then cosine decay, global-norm clipping, decay mask.

The optimizer works on a pytree of parameters (an `nnx.State` of `nnx.Param`s, or any pytree of arrays):
the train step is a pure function of that tree, so the optimizer state mirrors the parameter tree and
inherits its sharding when a device mesh is added.

Config fields (`config.optim`):
  learning_rate: peak learning rate, reached after `warmup_steps`.
  min_learning_rate: the value the cosine decays to at `decay_steps` (nanoGPT's `min_lr`), then held.
  warmup_steps: linear warmup from 0.
  decay_steps: end of the cosine (default: `config.num_train_steps`), like nanoGPT's `lr_decay_iters`.
  b1, b2, eps: Adam moments.
  weight_decay: decoupled decay (AdamW), applied only where `decay_mask` says so.
  decay_embeddings: also decay embedding tables (nanoGPT decays every parameter with >= 2 dimensions,
    its tied token embedding included; default False: embeddings are skipped).
  grad_clip_norm: clip the global gradient norm to this (0 or None: no clipping).
  backbone_lr_scale, freeze_backbone_steps: fine-tuning from `config.init_from` only: the update of the
    restored subtree (`config.init_subtree`) is 0 for the first freeze_backbone_steps, then scaled by
    backbone_lr_scale (ULMFiT's discriminative learning rates and gradual unfreezing, at two levels:
    trunk and head). Scaling the whole AdamW update scales its weight decay alike: a frozen trunk does
    not move at all.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

# Parameter names (any path component, lower case) that never get weight decay: biases, normalisation
# scales and offsets, and embeddings (token, position, segment).
_NO_DECAY_NAMES = ('bias', 'scale', 'norm', 'ln', 'embed', 'embedding', 'wte', 'wpe', 'pos_emb')


def _path_names(path) -> list[str]:
  names = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)).lower())
        break
  return names


_EMBEDDING_NAMES = ('embed', 'embedding', 'wte', 'wpe', 'pos_emb')


def _decays(path, leaf, embeddings: bool = False) -> bool:
  if getattr(leaf, 'ndim', 0) < 2:
    return False  # biases, scales, scalars
  for name in _path_names(path):
    if name == 'value':
      continue
    is_embedding = name in _EMBEDDING_NAMES or 'embed' in name
    if is_embedding and embeddings:
      continue
    if name in _NO_DECAY_NAMES or is_embedding or 'norm' in name:
      return False
  return True


def decay_mask(params, *, embeddings: bool = False):
  """A pytree of bools like `params`: True where weight decay applies (matrices that are not embeddings).

  Biases, LayerNorm/RMSNorm scales and offsets (anything with fewer than 2 dimensions or a path component
  naming a norm) and, unless `embeddings=True`, embedding tables (a path component containing 'embed')
  are excluded.
  """
  return jax.tree_util.tree_map_with_path(lambda p, x: _decays(p, x, embeddings), params)


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup 0 -> learning_rate over warmup_steps, cosine to min_learning_rate at decay_steps."""
  o = config.optim
  decay_steps = o.decay_steps or config.num_train_steps
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=float(o.learning_rate),
    warmup_steps=min(o.warmup_steps, decay_steps),
    decay_steps=max(decay_steps, o.warmup_steps + 1),
    end_value=float(o.min_learning_rate),
  )


def make_optimizer(config) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule, b1, b2, eps, weight_decay, mask=decay_mask).

  `config` has passed `lstm_attn.training.config.check_config` (the fields' defaults and checks live there).
  """
  o = config.optim
  clip = [optax.clip_by_global_norm(float(o.grad_clip_norm))] if o.grad_clip_norm else []
  adamw = optax.adamw(
    learning_rate=learning_rate_schedule(config),
    b1=float(o.b1),
    b2=float(o.b2),
    eps=float(o.eps),
    weight_decay=float(o.weight_decay),
    mask=functools.partial(decay_mask, embeddings=bool(o.decay_embeddings)),
  )
  trunk = []
  if config.init_from and (o.backbone_lr_scale != 1 or o.freeze_backbone_steps):
    frozen, scale = int(o.freeze_backbone_steps), float(o.backbone_lr_scale)
    trunk_scale = optax.scale_by_schedule(lambda step: jnp.where(step < frozen, 0.0, scale))
    trunk = [optax.masked(trunk_scale, functools.partial(subtree_mask, subtree=config.init_subtree))]
  return optax.chain(*clip, adamw, *trunk)


def subtree_mask(params, *, subtree: str):
  """A pytree of bools like `params`: True under the top-level attribute `subtree` ('' : everywhere)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: not subtree or _path_names(path[:1]) == [subtree.lower()], params
  )
