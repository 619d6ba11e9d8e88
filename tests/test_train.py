"""lstm_attn.training: losses vs a float64 reference, gradient accumulation, exact resume, every objective."""

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close
from jax.flatten_util import ravel_pytree
from train_tiny import compilation_cache, final_params, tiny_config, train_losses

from lstm_attn import training as train
from lstm_attn.data import batching
from lstm_attn.models import build_model
from lstm_attn.training import checkpointing
from lstm_attn.training import inputs as train_inputs
from lstm_attn.training import metrics as lu
from lstm_attn.training import steps as steps_lib


@pytest.fixture(scope='module', autouse=True)
def _compile_cache(tmp_path_factory):
  with compilation_cache(tmp_path_factory.mktemp('jax_cache')):
    yield


def _ce_reference(logits, labels, weights):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  picked = np.take_along_axis(logits, np.asarray(labels)[..., None], -1)[..., 0]
  w = np.asarray(weights, np.float64)
  return ((logz - picked) * w).sum(), w.sum(), ((logits.argmax(-1) == labels) * w).sum()


@pytest.mark.parametrize('shape', [(1, 1, 7), (3, 7, 333)])
def test_next_token_loss_matches_float64_reference(shape):
  k1, k2, k3 = jax.random.split(jax.random.key(shape[-1]), 3)
  logits = 4.0 * jax.random.normal(k1, shape, jnp.float32)
  targets = jax.random.randint(k2, shape[:-1], 0, shape[-1])
  weights = (jax.random.uniform(k3, shape[:-1]) > 0.3).astype(jnp.float32).at[0, 0].set(1.0)
  mean, sums = steps_lib.next_token_loss(logits, targets, weights)
  ref_sum, ref_n, ref_correct = _ce_reference(logits, targets, weights)
  assert_close(sums['loss'], ref_sum, what='loss sum')
  assert_close(mean, ref_sum / ref_n, what='mean loss')
  assert float(sums['count']) == ref_n and float(sums['correct']) == ref_correct
  # bf16 logits: the loss is still computed in fp32 from them.
  mean16, _ = steps_lib.next_token_loss(logits.astype(jnp.bfloat16), targets, weights)
  assert_close(mean16, ref_sum / ref_n, dtype=jnp.bfloat16, what='bf16 mean loss')


def test_mlm_nsp_and_classification_losses():
  k = jax.random.split(jax.random.key(1), 6)
  mlm = jax.random.normal(k[0], (2, 7, 11))
  tgt = jax.random.randint(k[1], (2, 7), 0, 11)
  w = jnp.zeros((2, 7)).at[0, 2].set(1).at[1, 5].set(1).at[1, 6].set(1)
  nsp = jax.random.normal(k[2], (2, 2))
  lab = jnp.array([0, 1])
  mean, sums = steps_lib.mlm_nsp_loss(mlm, tgt, w, nsp, lab)
  m_sum, m_n, _ = _ce_reference(mlm, tgt, w)
  n_sum, n_n, _ = _ce_reference(nsp, lab, np.ones(2))
  assert_close(mean, m_sum / m_n + n_sum / n_n, what='mlm+nsp')
  logits = jax.random.normal(k[3], (5, 3))
  labels = jax.random.randint(k[4], (5,), 0, 3)
  rw = jnp.array([1, 1, 1, 0, 0], jnp.float32)  # padding rows of the last eval batch
  mean, sums = steps_lib.classification_loss(logits, labels, rw)
  ref = _ce_reference(logits, labels, rw)
  assert_close(mean, ref[0] / ref[1], what='classification')
  assert float(sums['count']) == 3 and float(sums['correct']) == ref[2]
  assert float(sums['loss']) == pytest.approx(ref[0], rel=1e-5)


def test_grad_accumulation_equals_one_big_batch():
  """Plain SGD (lr 1) makes the update the gradient itself: accumulated over 3 micro-batches == one batch."""
  c = tiny_config('gpt', **{'model.dropout': 0.0, 'batch_size': 6})
  steps = train.build_steps(c, lambda r: build_model(c, vocab_size=261, rngs=r))
  batch = {
    'inputs': jax.random.randint(jax.random.key(2), (6, 16), 0, 261),
    'targets': jax.random.randint(jax.random.key(3), (6, 16), 0, 261),
  }
  state0 = steps.init()
  results = []
  for accum in (1, 3):
    s = dataclasses.replace(steps.pure, tx=optax.sgd(1.0), grad_accum_steps=accum)
    state = {**state0, 'opt_state': s.tx.init(state0['params'])}
    new, metrics = jax.jit(s.train_step)(state, batch)
    update = jax.tree.map(jnp.subtract, new['params'], state0['params'])
    results.append((jnp.concatenate([x.ravel() for x in jax.tree.leaves(update)]), metrics))
  (u1, m1), (u3, m3) = results
  assert_close(u3, u1, what='gradient accumulated over 3 micro-batches')
  assert_close(m3['loss'], m1['loss'], what='loss')


class _Interrupt(Exception):
  pass


def _interrupt_after(monkeypatch, n):
  """Makes the next run's train batcher raise after `n` batches (a crash mid-training)."""
  real = train_inputs.make_inputs

  def make(config, workdir):
    inputs = real(config, workdir)
    batcher, calls = inputs.train, [0]
    orig_next = batcher.next

    def next_():
      calls[0] += 1
      if calls[0] > n:
        raise _Interrupt()
      return orig_next()

    batcher.next = next_
    return inputs

  monkeypatch.setattr(train_inputs, 'make_inputs', make)


def assert_resume_is_exact(config, tmp_path, monkeypatch, stop_after):
  """Runs `config` through in tmp_path/full, and in tmp_path/resumed stopped after `stop_after` batches
  and resumed; asserts the two agree bit for bit (every train loss, the final params, the val loss).
  Returns their summaries."""
  full = train.train_and_evaluate(config, str(tmp_path / 'full'))
  _interrupt_after(monkeypatch, stop_after)
  with pytest.raises(_Interrupt):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  monkeypatch.undo()
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert train_losses(tmp_path / 'full') == train_losses(tmp_path / 'resumed')
  (_, pa), (_, pb) = final_params(tmp_path / 'full'), final_params(tmp_path / 'resumed')
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
  assert full['val_loss'] == resumed['val_loss']
  return full, resumed


def test_stop_and_resume_gives_identical_losses_and_params(tmp_path, monkeypatch):
  c = tiny_config('gpt', steps=7)  # dropout 0.1: the RNG state must be restored too
  full = train.train_and_evaluate(c, str(tmp_path / 'full'))
  _interrupt_after(monkeypatch, 5)  # checkpoints at 2 and 4 (and eval 3), crash while fetching batch 6
  with pytest.raises(_Interrupt):
    train.train_and_evaluate(c, str(tmp_path / 'resumed'))
  monkeypatch.undo()
  resumed = train.train_and_evaluate(c, str(tmp_path / 'resumed'))
  assert resumed['step'] == full['step'] == 7
  a, b = train_losses(tmp_path / 'full'), train_losses(tmp_path / 'resumed')
  assert sorted(a) == sorted(b) == list(range(1, 8))
  assert a == b  # bit-identical at every step, including those after the resume
  (sa, pa), (sb, pb) = final_params(tmp_path / 'full'), final_params(tmp_path / 'resumed')
  assert sa == sb == 7 and pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
  assert full['val_loss'] == resumed['val_loss']
  # Running a finished workdir again changes nothing: same summary, no second set of final records.
  with open(tmp_path / 'full' / 'metrics.jsonl', encoding='utf-8') as f:
    records = f.read()
  assert train.train_and_evaluate(c, str(tmp_path / 'full')) == full
  with open(tmp_path / 'full' / 'metrics.jsonl', encoding='utf-8') as f:
    assert f.read() == records


@pytest.mark.parametrize('name', ['lstm_lm', 'lstm_attn'])
def test_lstm_models_train_evaluate_and_sample(tmp_path, name):
  c = tiny_config(name, steps=3, sample_tokens=12, tensorboard=name == 'lstm_lm')
  s = train.train_and_evaluate(c, str(tmp_path))
  assert math.isfinite(s['val_loss']) and s['val_loss'] < math.log(261) + 1.0
  assert s['val_bits_per_byte'] == pytest.approx(s['val_loss'] / math.log(2), rel=1e-12)  # byte tokenizer
  assert isinstance(s['sample'], str)
  names = os.listdir(tmp_path)
  assert {'metrics.jsonl', 'checkpoints', 'tokenizer.json', 'summary.json'} <= set(names)
  if c.tensorboard:
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tensorboard'))


def test_bert_pretraining_then_finetuning_with_transfer_report(tmp_path):
  pre = tiny_config('bert', steps=2, seed=1)  # another seed than the fine-tuning run's fresh init
  s = train.train_and_evaluate(pre, str(tmp_path / 'bert'))
  assert math.isfinite(s['val_loss']) and 0.0 <= s['val_nsp_accuracy'] <= 1.0
  # experiments/probe_mlm.py reads the run back: three accuracies, and a refusal of a non-MLM run.
  probe_mlm = _experiment('probe_mlm')
  _, tok, model = probe_mlm.load_mlm(str(tmp_path / 'bert'))
  batch = batching.MLMBatcher(np.arange(500) % 200, 8, 32, tokenizer=tok).batch(0)
  scores = probe_mlm.probe(model, tok, batch, np.random.default_rng(0))
  assert set(scores) == {'intact', 'shuffled', 'no_context'} and all(0 <= v <= 1 for v in scores.values())

  # A model that predicts each position's own input token: shuffling or masking the context must leave the
  # masked positions as they were, so all three scores equal the share of masked inputs kept as the target.
  def echo(tokens, token_type_ids, *, seq_lengths):
    return jax.nn.one_hot(tokens, tok.vocab_size), None

  kept = float(((batch['inputs'] == batch['targets']) * batch['weights']).sum() / batch['weights'].sum())
  echo_scores = probe_mlm.probe(echo, tok, batch, np.random.default_rng(0))
  assert 0 < kept < 1 and echo_scores == pytest.approx({'intact': kept, 'shuffled': kept, 'no_context': kept})
  ft = tiny_config(
    'bert', steps=2, num_classes=10, init_from=str(tmp_path / 'bert'), compare_from_scratch=True
  )
  out = train.train_and_evaluate(ft, str(tmp_path / 'ft'))
  report = json.load(open(tmp_path / 'ft' / 'transfer.json'))
  assert report['restored'] and all(p.startswith('backbone/') for p in report['restored'])
  assert all(p.startswith('classifier/') for p in report['fresh']) and report['fresh']
  assert 0.0 <= out['val_accuracy'] <= 1.0 and 0.0 <= out['from_scratch']['val_accuracy'] <= 1.0
  with pytest.raises(ValueError, match='not a BERT MLM pre-training run'):
    probe_mlm.load_mlm(str(tmp_path / 'ft'))
  table = json.load(open(tmp_path / 'ft' / 'transfer_comparison.json'))
  assert set(table) == {'pretrained init', 'from scratch'}
  # The pretrained backbone weights really arrived: the finetuned checkpoint's embeddings moved from them
  # only by 2 small steps, while from scratch they are unrelated.
  _, p_pre = final_params(tmp_path / 'bert')
  _, p_ft = final_params(tmp_path / 'ft')
  _, p_scr = final_params(tmp_path / 'ft' / 'from_scratch')
  key = next(k for k in p_pre if 'word_embeddings' in k)
  d_ft = np.linalg.norm(p_ft[key] - p_pre[key]) / np.linalg.norm(p_pre[key])
  d_scr = np.linalg.norm(p_scr[key] - p_pre[key]) / np.linalg.norm(p_pre[key])
  assert d_ft < 0.05 < d_scr


def test_bf16_compute_keeps_fp32_params():
  c = tiny_config('gpt')
  c.model.dtype = 'bfloat16'
  c.model.dropout = 0.0
  steps = train.build_steps(c, lambda r: build_model(c, vocab_size=261, rngs=r))
  batch = {
    'inputs': jax.random.randint(jax.random.key(2), (4, 16), 0, 261),
    'targets': jax.random.randint(jax.random.key(3), (4, 16), 0, 261),
  }
  state, m16 = steps.train_step(steps.init(), batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state['params']))
  c.model.dtype = 'float32'
  steps32 = train.build_steps(c, lambda r: build_model(c, vocab_size=261, rngs=r))
  _, m32 = steps32.train_step(steps32.init(), batch)
  assert_close(m16['loss'], m32['loss'], dtype=jnp.bfloat16, what='bf16 vs fp32 loss')


def _ynn_reduce_fusions(compiled_hlo: str) -> int:
  """How many YNNPACK fusions of a compiled XLA:CPU program contain a reduce."""
  bodies = dict(re.findall(r'^%?([\w.\-]+) [^\n]*\{\n(.*?)^\}', compiled_hlo, re.M | re.S))
  called = re.findall(r'ynn_fusion[\w.]* = [^\n]* fusion\([^\n]*calls=%?([\w.\-]+)', compiled_hlo)
  return sum(' reduce(' in bodies.get(name, '') for name in called)


def test_cpu_ynn_fusion_dots_changes_compilation_not_results():
  c = tiny_config('gpt')
  c.model.dropout = 0.0
  c.cpu_ynn_fusion = 'dots'
  if not steps_lib.compiler_options(c):  # not CPU, or an XLA that rejects the (experimental) option
    pytest.skip('the dots-only compile option is not in effect here: nothing to compare')
  assert steps_lib.compiler_options(c) == {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'
  }
  batch = {
    'inputs': jax.random.randint(jax.random.key(4), (4, 16), 0, 261),
    'targets': jax.random.randint(jax.random.key(5), (4, 16), 0, 261),
  }
  losses, params, reduce_fusions = {}, {}, {}
  for choice in ('default', 'dots'):
    c.cpu_ynn_fusion = choice
    steps = train.build_steps(c, lambda r: build_model(c, vocab_size=261, rngs=r))
    step = steps.train_step
    state = steps.init()
    reduce_fusions[choice] = _ynn_reduce_fusions(step.lower(state, batch).compile().as_text())
    for _ in range(2):
      state, m = step(state, batch)
    losses[choice], params[choice] = m['loss'], state['params']
  assert reduce_fusions['default'] > 0 and reduce_fusions['dots'] == 0, reduce_fusions
  assert_close(losses['dots'], losses['default'], tol=1e-6, what='loss')
  assert_close(ravel_pytree(params['dots'])[0], ravel_pytree(params['default'])[0], what='params')


def test_cpu_ynn_fusion_bad_value_and_rejected_option(tmp_path, monkeypatch):
  c = tiny_config('gpt')
  c.cpu_ynn_fusion = 'fast'
  with pytest.raises(ValueError, match='config.cpu_ynn_fusion'):
    train.check_config(c)
  with pytest.raises(ValueError, match='config.cpu_ynn_fusion'):
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # refused before anything was written
  # An XLA that rejects the option (it is experimental) -> the steps compile with XLA's defaults.
  bogus = {'xla_cpu_experimental_ynn_fusion_type': 'NO_SUCH_FUSION_TYPE'}
  monkeypatch.setitem(steps_lib._CPU_YNN_FUSION, 'bogus', bogus)
  c.cpu_ynn_fusion = 'bogus'
  assert steps_lib.compiler_options(c) == {}
  steps = train.build_steps(c, lambda r: build_model(c, vocab_size=261, rngs=r))
  batch = {'inputs': jnp.zeros((4, 16), jnp.int32), 'targets': jnp.ones((4, 16), jnp.int32)}
  assert np.isfinite(float(steps.train_step(steps.init(), batch)[1]['loss']))


def test_resume_with_a_reshaped_optimizer_names_the_changed_config(tmp_path):
  c = tiny_config('gpt', steps=2, **{'optim.grad_clip_norm': 0.0})
  train.train_and_evaluate(c, str(tmp_path))
  c.num_train_steps, c.optim.grad_clip_norm = 4, 1.0  # clipping on: another optimizer-state tree
  with pytest.raises(checkpointing.CheckpointError, match=r'config\.optim\.grad_clip_norm was 0\.0'):
    train.train_and_evaluate(c, str(tmp_path))


def test_metric_writer_truncation_keeps_the_dropped_records(tmp_path):
  writer = lu.MetricWriter(str(tmp_path), tensorboard=False)
  for step in (1, 2, 3):
    writer.write(step, 'train', {'loss': float(step)})
  writer.truncate_after(1)  # resumed from the checkpoint at step 1
  assert [r['step'] for r in lu.read_metrics(str(tmp_path))] == [1]
  with open(tmp_path / lu.SUPERSEDED_FILE, encoding='utf-8') as f:
    assert [json.loads(line)['step'] for line in f] == [2, 3]


def test_bad_config_values_are_named(tmp_path):
  c = tiny_config('gpt')
  c.batch_size = 0
  with pytest.raises(ValueError, match='config.batch_size=0'):
    train.train_and_evaluate(c, str(tmp_path / 'a'))
  c = tiny_config('gpt', grad_accum_steps=3)
  with pytest.raises(ValueError, match='grad_accum_steps=3'):
    train.check_config(c)
  with pytest.raises(ValueError, match='grad_accum_steps=3'):
    train.train_and_evaluate(c, str(tmp_path / 'accum'))
  assert not (tmp_path / 'accum').exists()  # refused before anything was written
  c = tiny_config('bert')
  c.data.mask_rate = 1.5
  with pytest.raises(ValueError, match='data.mask_rate=1.5'):
    train.check_config(c)
  c = tiny_config('gpt')
  c.data.path = str(tmp_path / 'missing.txt')
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    train.train_and_evaluate(c, str(tmp_path / 'b'))


def test_mlm_mask_rate_reaches_the_training_batches_not_eval(tmp_path):
  """config.data.mask_rate sets the share of scored tokens in training; val/test stay at BERT's 15%."""
  from lstm_attn.training.inputs import make_inputs

  c = tiny_config('bert', **{'data.mask_rate': 0.5})
  c.batch_size = 32
  inputs = make_inputs(c, str(tmp_path))
  special = np.isin(inputs.train.batch(0)['targets'], list(inputs.tokenizer.special_ids))
  train_rate = inputs.train.batch(0)['weights'][~special].mean()
  val = next(iter(inputs.eval_batches('val')))
  val_rate = val['weights'][~np.isin(val['targets'], list(inputs.tokenizer.special_ids))].mean()
  assert 0.44 < train_rate < 0.56, train_rate
  assert 0.10 < val_rate < 0.20, val_rate


def _experiment(name):
  """experiments/<name>.py as a module (the scripts are not a package)."""
  import importlib.util

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.join(repo, 'experiments', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'_experiment_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
