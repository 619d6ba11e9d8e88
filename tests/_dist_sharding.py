"""Sharding checks on 8 host CPU devices, run in a subprocess by tests/test_sharding.py.

    python tests/_dist_sharding.py OUT_DIR

The device count must be fixed before JAX starts, hence a separate process. Writes OUT_DIR/results.json:
{check name: {'ok': bool, 'detail': str, ...numbers}}; the test file asserts on each entry. Checks:
  equivalence   the trainer's jitted step (lstm_attn.training.build_steps) on a 2x4 mesh with FSDP and on an
                8x1 mesh gives the same losses and params as one device on the same global batches.
  fsdp_layout   on 2x4, big parameters and their Adam moments are split 4 ways over 'fsdp'.
  attention     shard_attention over the Pallas kernel (interpret mode) and the chunked kernel, batch and
                heads split, GQA, sequence lengths: output and gradients vs the float32 reference.
  restore       an Orbax checkpoint saved from the 2x4 mesh restores onto 1x8 and onto one device with the
                target shardings and identical values.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback

import jax

jax.config.update('jax_num_cpu_devices', 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding  # noqa: E402

from lstm_attn.attention import attention_batch_axes, per_shard_attention, shard_attention  # noqa: E402
from lstm_attn.training import sharding  # noqa: E402

VOCAB, SEQ, BATCH, STEPS = 67, 17, 16, 3


def rel_err(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if not np.all(np.isfinite(a)):
    return float('inf')
  d = np.linalg.norm(b)
  return float(np.linalg.norm(a - b) / (d if d > 0 else 1.0))


def tree_rel_err(a, b) -> float:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  num = sum(
    float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)) for x, y in zip(la, lb)
  )
  den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in lb)
  if not all(np.all(np.isfinite(np.asarray(x))) for x in la):
    return float('inf')
  return (num / den) ** 0.5


def tiny_config():
  from lstm_attn.training import base_config

  c = base_config('gpt')
  c.model.update(d_model=64, num_layers=1, num_heads=4, num_kv_heads=2, max_len=32, dropout=0.0)
  c.batch_size = BATCH
  c.num_train_steps = 10
  c.optim.warmup_steps = 1
  c.optim.learning_rate = 1e-3
  return c


def batches():
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    tokens = rng.integers(0, VOCAB, (BATCH, SEQ + 1), dtype=np.int32)
    out.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]})
  return out


def train(config, mesh):
  """STEPS steps of the trainer's own jitted step; returns (losses, final state, abstract state)."""
  from lstm_attn.models import build_model
  from lstm_attn.training import build_steps

  def model_fn(rngs):
    return build_model(config, vocab_size=VOCAB, rngs=rngs)

  steps = build_steps(config, model_fn, mesh=mesh)
  train_step, abstract = steps.train_step, steps.abstract_state
  state = steps.init()
  losses = []
  for b in batches():
    if mesh is not None:
      b = sharding.make_global_batch(b, mesh)
    state, metrics = train_step(state, b)
    losses.append(float(metrics['loss']))
  return losses, state, abstract


def check_equivalence(results, store):
  config = tiny_config()
  ref_losses, ref_state, _ = train(config, None)
  store['ref_state'] = ref_state
  for name, (data, fsdp) in {'2x4': (2, 4), '8x1': (8, 1)}.items():
    mesh = sharding.make_mesh(data, fsdp)
    losses, state, abstract = train(config, mesh)
    store[name] = (state, abstract, mesh)
    loss_err = rel_err(losses, ref_losses)
    param_err = tree_rel_err(jax.device_get(state['params']), jax.device_get(ref_state['params']))
    results[f'equivalence_{name}'] = {
      'ok': loss_err <= 1e-5 and param_err <= 1e-5 and len(losses) == STEPS,
      'loss_rel_err': loss_err,
      'param_rel_err': param_err,
      'losses': losses,
      'ref_losses': ref_losses,
      'detail': f'{name}: losses {losses} vs one device {ref_losses}; params rel err {param_err:.2e}',
    }


def check_carried_state(results):
  """Truncated BPTT on the 2x4 mesh: the carry lives with its streams' rows (batch-sharded), and the
  losses, params and final carry equal one device's."""
  from lstm_attn.training import base_config

  c = base_config('lstm_lm')
  c.model.update(embed_dim=16, hidden_size=32, num_layers=2)
  c.batch_size, c.optim.warmup_steps = BATCH, 1
  rng = np.random.default_rng(1)
  lanes = rng.integers(0, VOCAB, (BATCH, STEPS * SEQ + 1), dtype=np.int32)
  data = []
  for i in range(STEPS):
    resets = np.zeros((BATCH, SEQ), np.float32)
    resets[::3, i % SEQ] = 1.0  # documents starting inside some windows
    cols = slice(i * SEQ, (i + 1) * SEQ)
    data.append(
      {'inputs': lanes[:, cols], 'targets': lanes[:, i * SEQ + 1 : (i + 1) * SEQ + 1], 'resets': resets}
    )
  out = {}
  for name, mesh in (('one', None), ('2x4', sharding.make_mesh(2, 4))):
    steps = build_lm_steps(c, mesh)
    state, losses = steps.init(), []
    for b in data:
      state, m = steps.train_step(state, b if mesh is None else sharding.make_global_batch(b, mesh))
      losses.append(float(m['loss']))
    out[name] = (losses, jax.device_get(state['params']), jax.device_get(state['carry']), state['carry'])
  spec = jax.tree.leaves(out['2x4'][3])[0].sharding.spec
  loss_err = rel_err(out['2x4'][0], out['one'][0])
  param_err = tree_rel_err(out['2x4'][1], out['one'][1])
  carry_err = tree_rel_err(out['2x4'][2], out['one'][2])
  results['carried_state_2x4'] = {
    'ok': max(loss_err, param_err, carry_err) <= 1e-5 and spec == PartitionSpec(None, ('data', 'fsdp')),
    'detail': f'loss/param/carry rel err {loss_err:.2e}/{param_err:.2e}/{carry_err:.2e}; carry spec {spec}',
  }


def build_lm_steps(config, mesh):
  from lstm_attn.models import build_model
  from lstm_attn.training import build_steps

  return build_steps(config, lambda rngs: build_model(config, vocab_size=VOCAB, rngs=rngs), mesh=mesh)


def check_fsdp_layout(results, store):
  state, _, mesh = store['2x4']
  params = jax.tree_util.tree_flatten_with_path(state['params'])[0]
  split, whole, bad = [], [], []
  for path, x in params:
    name = jax.tree_util.keystr(path)
    spec = x.sharding.spec
    shard = x.addressable_shards[0].data.shape
    if 'fsdp' in tuple(spec):
      axis = tuple(spec).index('fsdp')
      split.append(name)
      if shard[axis] * 4 != x.shape[axis]:
        bad.append(f'{name}: shard {shard} of {x.shape}')
    else:
      whole.append(name)
      if shard != x.shape:
        bad.append(f'{name}: replicated but shard {shard} of {x.shape}')
  # Adam moments mirror the parameters' layout.
  mu_specs = [
    leaf.sharding.spec
    for leaf in jax.tree.leaves(state['opt_state'])
    if hasattr(leaf, 'sharding') and 'fsdp' in tuple(leaf.sharding.spec)
  ]
  results['fsdp_layout'] = {
    'ok': len(split) >= 2 and not bad and len(mu_specs) == 2 * len(split),
    'detail': f'split {split}; replicated {len(whole)}; moments split {len(mu_specs)}; problems {bad}',
  }


def check_attention(results):
  from lstm_attn.attention import dot_product_attention
  from lstm_attn.kernels import reference

  mesh = sharding.make_mesh(2, 4)
  rng = np.random.default_rng(1)
  b, t, h, kvh, d = 4, 19, 8, 4, 8
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, t, kvh, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, t, kvh, d)), jnp.float32)
  lengths = jnp.asarray([19, 1, 12, 7], jnp.int32)
  ct = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)

  def ref(q, k, v):
    return reference.mha_reference(q, k, v, is_causal=True, key_value_seq_lengths=lengths)

  want, ref_vjp = jax.vjp(ref, q, k, v)
  want_grads = ref_vjp(ct)
  cases = {
    # The Pallas kernel (interpret mode on CPU) per shard: batch over 'data', heads (GQA groups) over 'fsdp'.
    'pallas_batch_and_heads': dict(impl='pallas', batch_axes=('data',), head_axis='fsdp', segments=False),
    # Batch over both axes, with per-example [batch, seq] segment ids split alongside.
    'xla_batch_segments': dict(impl='xla', batch_axes=('data', 'fsdp'), head_axis=None, segments=True),
  }
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1), jnp.int32)  # [batch, seq]

  def ref_seg(q, k, v):
    return reference.mha_reference(q, k, v, is_causal=True, key_value_seq_lengths=lengths, segment_ids=seg)

  for name, case in cases.items():
    fn = shard_attention(
      lambda q, k, v, impl=case['impl'], **kw: dot_product_attention(q, k, v, implementation=impl, **kw),
      mesh,
      batch_axes=case['batch_axes'],
      head_axis=case['head_axis'],
    )
    reps = 2 if case['head_axis'] is None else 1  # 8 rows for an 8-way batch split
    qq, kk, vv, ll, cc, ss = (jnp.concatenate([x] * reps) for x in (q, k, v, lengths, ct, seg))
    extra = {'segment_ids': ss} if case['segments'] else {}

    def run(q, k, v, fn=fn, ll=ll, extra=extra):
      return fn(q, k, v, is_causal=True, key_value_seq_lengths=ll, **extra)

    got, vjp = jax.vjp(jax.jit(run), qq, kk, vv)
    grads = vjp(cc)
    if case['segments']:
      want_c, vjp_c = jax.vjp(ref_seg, q, k, v)
      want_g = vjp_c(ct)
    else:
      want_c, want_g = want, want_grads
    out_err = rel_err(got, jnp.concatenate([want_c] * reps))
    grad_errs = [rel_err(g, jnp.concatenate([w] * reps)) for g, w in zip(grads, want_g)]
    results[f'attention_{name}'] = {
      'ok': out_err <= 1e-5 and max(grad_errs) <= 1e-5,
      'out_rel_err': out_err,
      'grad_rel_errs': grad_errs,
      'detail': f'{name}: output rel err {out_err:.2e}, grads {grad_errs}',
    }
  # per_shard_attention: under jax.set_mesh, with the batch axes declared, the kernel is traced once per
  # shard ([8/8, ...] rows) inside a jitted function whose inputs are split over the mesh; without the
  # declaration it sees the whole batch.
  seen = []

  def kernel(q, k, v, **kw):
    seen.append(q.shape[0])
    return dot_product_attention(q, k, v, implementation='pallas', **kw)

  step = jax.jit(lambda q, k, v: per_shard_attention(kernel)(q, k, v, is_causal=True))
  q8, k8 = jnp.concatenate([q] * 2), jnp.concatenate([k] * 2)
  q8 = jax.device_put(q8, sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh), attention_batch_axes(sharding.MESH_AXES):
    got = step(q8, k8, k8)
  with jax.set_mesh(mesh):  # no declared batch axes: called as is (a fresh trace: another shape)
    jax.jit(lambda q, k, v: per_shard_attention(kernel)(q, k, v, is_causal=True))(q8[:4], k8[:4], k8[:4])
  ref8 = reference.mha_reference(q8, k8, k8, is_causal=True)
  err = rel_err(got, ref8)
  results['attention_per_shard_under_mesh'] = {
    'ok': err <= 1e-5 and seen == [1, 4],
    'detail': f'kernel traced with batch {seen} (want [1, 4]); rel err {err:.2e}',
  }
  # Heads that the head axis does not divide are a ValueError naming them (not a shard_map trace error).
  fn = shard_attention(dot_product_attention, mesh, batch_axes=('data',), head_axis='fsdp')
  try:
    fn(q[:, :, :6], k[:, :, :3], v[:, :, :3])
    message = 'no error'
  except ValueError as e:
    message = str(e)
  results['attention_indivisible_heads'] = {'ok': 'heads=6' in message, 'detail': message}


def check_restore(results, store):
  from lstm_attn.training import checkpointing

  state, abstract, mesh = store['2x4']
  expected = jax.device_get(state)
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = checkpointing.Checkpointer(os.path.join(tmp, 'ckpt'), keep_best=0, async_save=True)
    ckpt.save(3, state, {'step': 3})
    ckpt.wait()
    targets = {}
    mesh18 = sharding.make_mesh(1, 8)
    targets['1x8'] = sharding.state_shardings(abstract, mesh18, min_size=2**12)
    one = SingleDeviceSharding(jax.devices()[0])
    targets['one_device'] = jax.tree.map(lambda _: one, abstract)
    for name, shardings in targets.items():
      target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
      )
      restored, meta = ckpt.restore(3, target)
      got = jax.device_get(restored)
      same = all(
        np.array_equal(
          np.asarray(jax.random.key_data(x) if _is_key(x) else x),
          np.asarray(jax.random.key_data(y) if _is_key(y) else y),
        )
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected))
      )
      placed = all(
        x.sharding.is_equivalent_to(s, x.ndim)
        for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings))
      )
      split8 = sum(
        1
        for x in jax.tree.leaves(restored['params'])
        if isinstance(x.sharding, NamedSharding) and 'fsdp' in tuple(x.sharding.spec)
      )
      ok = same and placed and meta['step'] == 3 and (name != '1x8' or split8 >= 2)
      results[f'restore_{name}'] = {
        'ok': ok,
        'detail': f'{name}: values equal {same}, target shardings {placed}, params split 8 ways {split8}',
      }
    ckpt.close()


def _is_key(x) -> bool:
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def check_batch_helpers(results):
  mesh = sharding.make_mesh(2, 4)
  x = np.arange(24 * 3, dtype=np.int32).reshape(24, 3)
  g = sharding.make_global_batch({'x': x}, mesh)['x']
  full = sharding.global_array_from_full({'x': x}, sharding.batch_sharding(mesh))['x']
  rows = [s.data.shape for s in g.addressable_shards]
  ok = (
    np.array_equal(np.asarray(g), x)
    and np.array_equal(np.asarray(full), x)
    and rows == [(3, 3)] * 8
    and g.sharding.spec == PartitionSpec(('data', 'fsdp'))
  )
  # put_like: single-device arrays (as fine-tuning's transferred params) onto the mesh's shardings.
  target = {
    'w': jax.ShapeDtypeStruct((8, 12), np.float32, sharding=NamedSharding(mesh, PartitionSpec('fsdp')))
  }
  w = np.arange(96, dtype=np.float32).reshape(8, 12)
  placed = sharding.put_like({'w': jnp.asarray(w)}, target)['w']
  ok = ok and np.array_equal(np.asarray(placed), w) and placed.sharding.spec == PartitionSpec('fsdp')
  results['batch_helpers'] = {'ok': ok, 'detail': f'global batch shards {rows}, spec {g.sharding.spec}'}


def main(out_dir: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  results, store = {}, {}
  checks = [
    ('equivalence', lambda: check_equivalence(results, store)),
    ('fsdp_layout', lambda: check_fsdp_layout(results, store)),
    ('carried_state', lambda: check_carried_state(results)),
    ('restore', lambda: check_restore(results, store)),
    ('attention', lambda: check_attention(results)),
    ('batch_helpers', lambda: check_batch_helpers(results)),
  ]
  for name, fn in checks:
    try:
      fn()
    except Exception:  # noqa: BLE001  (reported per check; the test names the failing one)
      results[f'{name}_error'] = {'ok': False, 'detail': traceback.format_exc()[-3000:]}
  with open(os.path.join(out_dir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1, default=str)


if __name__ == '__main__':
  main(sys.argv[1])
