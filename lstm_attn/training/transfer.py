"""Transfer learning: start a run from another run's parameters (`config.init_from`).

`transfer_params` copies every pretrained leaf whose path (under `config.init_subtree`, default the
trunk `backbone`) and shape match; `init_from_pretrained` does that for a fresh train state, re-creates
the optimizer state, and records what was restored, what stayed fresh and what went unused in
`<workdir>/transfer.json`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lstm_attn.training import checkpointing, sharding
from lstm_attn.training import metrics as lu


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


def init_from_pretrained(state, config, steps, workdir: str):
  """`state` with the pretrained params of `config.init_from` where they match, and a fresh optimizer."""
  raw, src_step = checkpointing.load_params(config.init_from)
  subtree = config.init_subtree
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
  abstract = steps.abstract_state
  params = sharding.put_like(params, abstract['params'])
  opt_sh = jax.tree.map(lambda a: a.sharding, abstract['opt_state'])
  opt_state = jax.jit(steps.tx.init, out_shardings=opt_sh)(params)
  if sharding.is_main_process():
    record = {
      'init_from': config.init_from,
      'step': src_step,
      'restored': restored,
      'fresh': fresh,
      'unused': unused,
    }
    with open(os.path.join(workdir, 'transfer.json'), 'w', encoding='utf-8') as f:
      json.dump(record, f, indent=1)
  return {**state, 'params': params, 'opt_state': opt_state}
