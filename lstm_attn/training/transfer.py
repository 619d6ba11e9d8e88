"""Transfer learning: start a run from another run's parameters (`config.init_from`).

`transfer_params` copies every pretrained leaf whose path (under `config.init_subtree`, default the
trunk `backbone`) and shape match; `init_from_pretrained` does that for a fresh train state, re-creates
the optimizer state, and records what was restored, what stayed fresh and what went unused in
`<workdir>/transfer.json`. `check_init_from` (run by check_config, before a workdir is touched) refuses a
pretrained run of another model family.
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


def check_init_from(config) -> None:
  """`config.init_from` holds checkpoints of a run of the same model family as `config.model.name`.

  Read-only: the newest readable checkpoint meta (`checkpointing.peek_meta`) of the workdir, its
  checkpoints/ folder or the folder of the checkpoints/<step> given. FileNotFoundError if there is none;
  ValueError naming both families if they differ (a GPT's tensors would otherwise fill a BERT wherever
  names and shapes happen to match).
  """
  given = config.init_from
  path = os.path.abspath(os.path.expanduser(given))
  candidates = [os.path.join(path, 'checkpoints'), path]
  if os.path.basename(path).isdigit():
    candidates.append(os.path.dirname(path))
  meta = next((m for m in map(checkpointing.peek_meta, candidates) if m is not None), None)
  if meta is None:
    raise FileNotFoundError(
      f'config.init_from={given!r} holds no checkpoint: give the workdir of a pretraining run '
      '(experiments/train.py), its checkpoints/ folder or one checkpoints/<step> folder.'
    )
  theirs, ours = ((meta.get('config') or {}).get('model') or {}).get('name'), config.model.name
  if theirs is not None and theirs != ours:
    raise ValueError(
      f'config.init_from={given!r} is a run of a {theirs!r} model, but config.model.name={ours!r}: '
      f'parameters transfer within one model family only. Give the workdir of a {ours!r} pretraining run, '
      f"or set --config.model.name={theirs} (and that run's sizes) to fine-tune the {theirs!r} model."
    )


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
