"""Tests of lstm_attn.models: causality, cached/step decoding = full forward, overfitting one batch,
classification pooling positions, AWD dropout flavours, parameter paths shared with the classifier, configs.

Sizes are tiny and odd on purpose (vocab 13, batch 3, seq 7); every forward is jitted through a few shared
functions so each model shape compiles once.
"""

import dataclasses
import functools
import inspect
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from lstm_attn.models import (
  BERT,
  GPT,
  LSTMLM,
  MODEL_SPECS,
  BERTConfig,
  GPTConfig,
  HybridConfig,
  LSTMAttentionLM,
  LSTMLMConfig,
  SequenceClassifier,
  build_model,
  count_params,
  default_model_config,
  model_config,
)
from lstm_attn.models.common import EmbeddingDropout, LockedDropout, segment_positions
from lstm_attn.models.heads import max_pool
from tests.helpers import assert_close, rel_l2_error

V, B, T = 13, 3, 7

CAUSAL = {
  'lstm_lm': lambda rngs: LSTMLM(LSTMLMConfig(embed_dim=8, hidden_size=16), V, rngs=rngs),  # tied + out_proj
  'lstm_lm_untied_proj': lambda rngs: LSTMLM(
    LSTMLMConfig(embed_dim=8, hidden_size=16, proj_size=6, tie_embeddings=False), V, rngs=rngs
  ),
  'hybrid': lambda rngs: LSTMAttentionLM(
    HybridConfig(d_model=16, attention_layers=(0, 1), num_heads=2, boom_hidden=24), V, rngs=rngs
  ),
  'gpt_learned': lambda rngs: GPT(GPTConfig(d_model=16, num_layers=2, num_heads=2, max_len=16), V, rngs=rngs),
  'gpt_rotary_gqa': lambda rngs: GPT(
    GPTConfig(
      d_model=16,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      max_len=16,
      positions='rotary',
      tie_embeddings=False,
    ),
    V,
    rngs=rngs,
  ),
}
TINY_BERT = BERTConfig(d_model=16, num_layers=2, num_heads=2, max_len=16, dropout=0.0)


@functools.cache
def make(name):
  """One shared instance per name, in eval mode (tests only read it)."""
  model = CAUSAL[name](nnx.Rngs(0))
  model.eval()
  return model


@functools.partial(jax.jit, static_argnums=0)
def _forward_with_carry(graphdef, state, tokens):
  """(logits, final carry) for LSTMLM; (logits, None) for the others. One compile per model and shape."""
  model = nnx.merge(graphdef, state)
  return model.forward(tokens) if isinstance(model, LSTMLM) else (model(tokens), None)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, tokens, cache):
  return nnx.merge(graphdef, state).decode(tokens, cache)


def forward(model, tokens):
  return _forward_with_carry(*nnx.split(model), tokens)[0]


def tokens_like(seed, shape=(B, T)):
  return jax.random.randint(jax.random.key(seed), shape, 0, V)


# ------------------------------------------------------------------------------------------------------
# Causality and cached decoding.


@pytest.mark.parametrize('name', sorted(CAUSAL))
def test_causal_models_never_look_ahead(name):
  model = make(name)
  tokens = tokens_like(1)
  cut = jnp.array([0, 3, 5])  # row b changes every token after position cut[b]
  future = jnp.arange(T)[None, :] > cut[:, None]
  changed = jnp.where(future, (tokens + 1 + tokens_like(2) % (V - 1)) % V, tokens)
  a, b = np.asarray(forward(model, tokens)), np.asarray(forward(model, changed))
  assert np.all(np.isfinite(a)) and a.shape == (B, T, V) and a.dtype == np.float32
  for row, t in enumerate(np.asarray(cut)):
    np.testing.assert_allclose(b[row, : t + 1], a[row, : t + 1], rtol=1e-6, atol=1e-6)
    # ... and the changed tokens do matter afterwards (so the check above can fail).
    assert np.max(np.abs(b[row, t + 1 :] - a[row, t + 1 :])) > 1e-4


@functools.partial(jax.jit, static_argnums=0)
def _bert(graphdef, state, tokens, lengths, positions):
  model = nnx.merge(graphdef, state)
  mlm, _ = model(tokens, seq_lengths=lengths)
  pooled = model.backbone.pool(model.encode(tokens, seq_lengths=lengths))
  at_positions, _ = model(tokens, seq_lengths=lengths, mlm_positions=positions)
  return mlm, pooled, at_positions


@pytest.mark.parametrize('positions', ['learned', 'rotary'])
def test_bert_looks_both_ways(positions):
  model = BERT(dataclasses.replace(TINY_BERT, positions=positions), V, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  tokens, full = tokens_like(3), jnp.full((B,), T)
  positions = jnp.array([[0, 2], [6, 1], [3, 3]])
  mlm, pooled, at_positions = _bert(graphdef, state, tokens, full, positions)
  mlm2, pooled2, _ = _bert(graphdef, state, tokens.at[:, -1].set((tokens[:, -1] + 1) % V), full, positions)
  assert mlm.shape == (B, T, V) and pooled.shape == (B, 16)
  assert np.all(np.abs(np.asarray(mlm2[:, 0] - mlm[:, 0])).max(axis=-1) > 1e-5)  # first sees last
  assert rel_l2_error(pooled2, pooled) > 1e-4  # and so does [CLS]
  # MLM logits restricted to positions equal the gathered full logits.
  assert_close(at_positions, jnp.take_along_axis(mlm, positions[..., None], axis=1), what='mlm_positions')
  # Padding is invisible: with seq_lengths, tokens past the length change nothing before it.
  lengths = jnp.array([7, 4, 1])
  pad = jnp.arange(T)[None] >= lengths[:, None]
  m1, p1, _ = _bert(graphdef, state, tokens, lengths, positions)
  m2, p2, _ = _bert(graphdef, state, jnp.where(pad, (tokens + 5) % V, tokens), lengths, positions)
  valid = ~np.asarray(pad)
  assert_close(np.asarray(m2)[valid], np.asarray(m1)[valid], what='bert logits with padding changed')
  assert_close(p2, p1, what='bert [CLS] with padding changed')
  # Order matters (an encoder without positions is permutation-equivariant: reversed tokens would give
  # reversed logits). Sharper attention than at init (scaled queries and keys, as training makes it) so
  # that rotary positions, which act through q.k, show.
  for block in model.backbone.blocks:
    block.attn.query.kernel[...] = 30 * block.attn.query.kernel[...]
    block.attn.key.kernel[...] = 30 * block.attn.key.kernel[...]
  graphdef, state = nnx.split(model)
  mlm, _, _ = _bert(graphdef, state, tokens, full, positions)
  reversed_mlm, _, _ = _bert(graphdef, state, tokens[:, ::-1], full, positions)
  assert rel_l2_error(reversed_mlm[:, ::-1], mlm) > 1e-3  # without positions: float rounding, ~1e-7


@pytest.mark.parametrize('name', sorted(CAUSAL))
def test_cached_decoding_equals_full_forward(name):
  """Prefill 3 tokens, then 4 single cached steps: logits equal the full forward (fp32, 1e-5)."""
  model = make(name)
  tokens = tokens_like(4)
  graphdef, state = nnx.split(model)
  is_lstm = isinstance(model, LSTMLM)
  full, full_carry = _forward_with_carry(graphdef, state, tokens)
  cache = model.init_cache(B, T + 2)
  logits, cache = _decode(graphdef, state, tokens[:, :3], cache)
  pieces = [logits]
  for t in range(3, T):
    logits, cache = _decode(graphdef, state, tokens[:, t : t + 1], cache)
    pieces.append(logits)
  assert_close(jnp.concatenate(pieces, axis=1), full, tol=1e-5, what=f'{name} cached decode')
  if is_lstm:  # the carry after the steps is the carry after the full scan
    width = model.backbone.width
    assert cache.h.shape == (2, B, width) and cache.c.shape == (2, B, 16)
    assert_close(cache.h, full_carry.h, what='final h')
    assert_close(cache.c, full_carry.c, what='final c')


@functools.partial(jax.jit, static_argnums=0)
def _forward_segments(graphdef, state, tokens, segment_ids):
  return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids)


def test_gpt_segments_restart_positions_and_attention():
  """Row 0 packs documents a (4 tokens) and b (3 tokens); rows 1 and 2 hold a and b alone at the front."""
  model = make('gpt_learned')
  a, b = tokens_like(6, (4,)), tokens_like(7, (3,))
  filler = tokens_like(8, (T,))
  tokens = jnp.stack(
    [jnp.concatenate([a, b]), jnp.concatenate([a, filler[4:]]), jnp.concatenate([b, filler[3:]])]
  )
  segment_ids = jnp.array([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(segment_positions(segment_ids)[0], [0, 1, 2, 3, 0, 1, 2])
  out = _forward_segments(*nnx.split(model), tokens, segment_ids)
  assert_close(out[0, :4], out[1, :4], what='first packed document')
  assert_close(out[0, 4:], out[2, :3], what='second packed document')


# ------------------------------------------------------------------------------------------------------
# Overfitting one batch.


def _lm_loss(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _bert_loss(model, batch):
  tokens, types, masked, nsp_labels = batch
  inputs = jnp.where(masked, V - 1, tokens)  # V - 1 plays [MASK]
  mlm, nsp = model(inputs, types)
  ce = optax.softmax_cross_entropy_with_integer_labels(mlm, tokens)
  mlm_loss = jnp.sum(jnp.where(masked, ce, 0)) / jnp.sum(masked)
  return mlm_loss + optax.softmax_cross_entropy_with_integer_labels(nsp, nsp_labels).mean()


def _overfit(model, loss_fn, batch, steps, lr=1e-2):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(lr)

  def loss_of(p):
    return loss_fn(nnx.merge(graphdef, p, rest), batch)

  @jax.jit
  def train(params):
    def step(carry, _):
      p, opt_state = carry
      loss, grads = jax.value_and_grad(loss_of)(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return losses, loss_of(params)

  losses, final = train(params)
  return float(losses[0]), float(final)


@pytest.mark.parametrize('name', ['lstm_lm', 'hybrid', 'gpt_rotary_gqa'])
def test_causal_lm_overfits_one_batch(name):
  model = make(name)
  tokens = tokens_like(8, (4, 12))
  first, final = _overfit(model, _lm_loss, tokens, steps=100, lr=2e-2)
  assert np.isfinite(final) and first > 1.5, (first, final)
  assert final < 0.2 * first, f'{name}: loss {first:.3f} -> {final:.3f}'


def test_bert_overfits_one_batch():
  model = BERT(TINY_BERT, V, rngs=nnx.Rngs(0))
  model.eval()
  tokens = tokens_like(9, (4, 10))
  types = (jnp.arange(10)[None] >= 5).astype(jnp.int32).repeat(4, 0)
  masked = jax.random.bernoulli(jax.random.key(10), 0.3, tokens.shape).at[:, 1].set(True)
  batch = (tokens, types, masked, jnp.array([0, 1, 1, 0]))
  first, final = _overfit(model, _bert_loss, batch, steps=100, lr=2e-2)
  assert np.isfinite(final) and final < 0.2 * first, f'bert: loss {first:.3f} -> {final:.3f}'


# ------------------------------------------------------------------------------------------------------
# Classification heads.


def _classifier(name, **model_fields):
  cfg = ml_collections.ConfigDict({'model': default_model_config(name), 'num_classes': 5})
  cfg.model.num_layers = 2
  for k, v in model_fields.items():
    cfg.model[k] = v
  model = build_model(cfg, vocab_size=V, rngs=nnx.Rngs(0))
  model.eval()
  return model


CLASSIFIERS = {
  'lstm_lm': dict(embed_dim=8, hidden_size=16),
  'lstm_attn': dict(d_model=16, num_heads=2, attention_layers=(0, 1)),
  'gpt': dict(d_model=16, num_heads=2, max_len=16),
  'bert': dict(d_model=16, num_heads=2, max_len=16, dropout=0.0),
}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _classify(kind, graphdef, state, tokens, lengths):
  """(pooled features, logits, the features computed independently from the trunk)."""
  model = nnx.merge(graphdef, state)
  feats = model.features(tokens, seq_lengths=lengths)
  logits = model(tokens, seq_lengths=lengths)
  bb = model.backbone
  idx = jnp.arange(tokens.shape[0]), lengths - 1
  if kind == 'gpt':  # the last valid token of a causal run without lengths
    expected = bb(tokens).hidden[idx]
  elif kind == 'lstm_lm':  # the top LSTM output at the last valid step (= its final h)
    expected = bb(tokens).hidden[idx]
  elif kind == 'lstm_attn':  # the last block's LSTM output at the last valid step, block by block
    x = jnp.take(bb.embed.embedding[...], tokens, axis=0)
    for block in bb.blocks[:-1]:
      x, _, _ = block(x)
    last = bb.blocks[-1]
    expected = last.lstm(last.lstm_norm(x))[0][idx]
  else:  # bert: the pooler on position 0 ([CLS])
    expected = jnp.tanh(bb.pooler(bb(tokens, seq_lengths=lengths).hidden[:, 0]))
  return feats, logits, expected


@pytest.mark.parametrize('kind', sorted(CLASSIFIERS))
def test_classifier_pools_the_right_position(kind):
  model = _classifier(kind, **CLASSIFIERS[kind])
  assert isinstance(model, SequenceClassifier)
  tokens, lengths = tokens_like(11), jnp.array([7, 4, 1])
  graphdef, state = nnx.split(model)
  feats, logits, expected = _classify(kind, graphdef, state, tokens, lengths)
  assert_close(feats, expected, what=f'{kind} pooled features')
  assert logits.shape == (B, 5) and logits.dtype == jnp.float32
  # What lies past each row's length never matters.
  pad = jnp.arange(T)[None] >= lengths[:, None]
  feats2, logits2, _ = _classify(kind, graphdef, state, jnp.where(pad, (tokens + 3) % V, tokens), lengths)
  assert_close(feats2, feats, what='padding changed the pooled features')
  assert_close(logits2, logits, what='padding changed the logits')


@pytest.mark.parametrize('kind', ['lstm_lm', 'bert'])
def test_mean_max_pooling_concatenates_the_mean_and_max_over_valid_positions(kind):
  model = _classifier(kind, pooling='mean_max', **CLASSIFIERS[kind])
  tokens, lengths = tokens_like(12), jnp.array([7, 4, 1])
  feats = model.features(tokens, seq_lengths=lengths)
  hidden = np.asarray(model.backbone(tokens, seq_lengths=lengths).hidden, np.float64)  # [B, T, F]
  want = np.stack([np.concatenate([h[:n].mean(0), h[:n].max(0)]) for h, n in zip(hidden, lengths.tolist())])
  assert feats.shape == (B, 2 * model.backbone.features)
  assert_close(feats, want, dtype=jnp.float32, what=f'{kind} mean_max features')
  assert model(tokens, seq_lengths=lengths).shape == (B, 5)
  np.testing.assert_array_equal(max_pool(jnp.ones((2, 3, 4)), jnp.array([2, 0]))[1], np.zeros(4))  # empty row


@pytest.mark.parametrize('kind', ['lstm_attn', 'gpt'])
def test_classifier_backbone_paths_match_the_lm(kind):
  """The LM's trunk restores into the classifier's trunk at the same paths (what fine-tuning does)."""
  cls = _classifier(kind, **CLASSIFIERS[kind])
  cfg = ml_collections.ConfigDict({'model': default_model_config(kind)})
  cfg.model.num_layers = 2
  for k, v in CLASSIFIERS[kind].items():
    cfg.model[k] = v
  lm = build_model(cfg, vocab_size=V, rngs=nnx.Rngs(1))
  lm_params = nnx.state(lm, nnx.Param)
  cls_params = nnx.state(cls, nnx.Param)
  assert jax.tree.structure(lm_params['backbone']) == jax.tree.structure(cls_params['backbone'])
  assert set(cls_params.keys()) - {'backbone'} == {'classifier'}
  nnx.update(cls.backbone, lm_params['backbone'])
  for a, b in zip(
    jax.tree.leaves(nnx.state(cls.backbone, nnx.Param)), jax.tree.leaves(lm_params['backbone'])
  ):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------------
# AWD dropout flavours and train/eval.


def test_locked_dropout_shares_one_mask_across_time():
  drop = LockedDropout(0.5, rngs=nnx.Rngs(dropout=0))
  y = np.asarray(drop(jnp.ones((4, 9, 33))))
  assert np.all(y == y[:, :1]), 'mask differs across time'
  assert set(np.unique(y)) == {0.0, 2.0} and 0.3 < np.mean(y == 0) < 0.7


def test_embedding_dropout_drops_whole_word_types():
  drop = EmbeddingDropout(0.5, rngs=nnx.Rngs(dropout=0))
  table = jax.random.normal(jax.random.key(0), (333, 7)) + 3.0
  dropped = np.asarray(drop(table))
  zero_rows = np.all(dropped == 0, axis=1)
  assert 100 < zero_rows.sum() < 233
  np.testing.assert_allclose(dropped[~zero_rows], 2 * np.asarray(table)[~zero_rows], rtol=1e-6)


def test_train_mode_applies_dropout_and_eval_mode_does_not():
  cfg = LSTMLMConfig(
    embed_dim=8, hidden_size=16, embed_dropout=0.1, input_dropout=0.2, hidden_dropout=0.2, output_dropout=0.2
  )
  model = LSTMLM(cfg, V, rngs=nnx.Rngs(params=0, dropout=1))
  apply = nnx.jit(lambda m, t: m(t))  # nnx.jit carries the advanced dropout RNG back into the model
  tokens = tokens_like(12)
  model.eval()
  a, b = apply(model, tokens), apply(model, tokens)
  np.testing.assert_array_equal(a, b)
  model.train()
  c, d = apply(model, tokens), apply(model, tokens)
  assert rel_l2_error(c, a) > 1e-3 and rel_l2_error(d, c) > 1e-3


# ------------------------------------------------------------------------------------------------------
# Configs.


def _config(name, **fields):
  """A config built from a plain dict, so wrong types reach build_model (ConfigDict would refuse them)."""
  return ml_collections.ConfigDict({'model': {**default_model_config(name).to_dict(), **fields}})


@pytest.mark.parametrize(
  'name,fields,field',
  [
    ('gpt', dict(num_heads=3), 'num_heads'),  # does not divide d_model=128
    ('gpt', dict(num_kv_heads=3), 'num_kv_heads'),
    ('gpt', dict(mlp_hidden=0), 'mlp_hidden'),
    ('gpt', dict(max_len=0), 'max_len'),
    ('gpt', dict(positions='sinusoidal'), 'positions'),
    ('gpt', dict(positions='rotary', d_model=12, num_heads=4), 'positions'),  # odd head size 3
    ('gpt', dict(activation='swish'), 'activation'),
    ('gpt', dict(dropout=1.0), 'dropout'),
    ('gpt', dict(attention_impl='cuda'), 'attention_impl'),
    ('gpt', dict(classifier_dropout=-0.1), 'classifier_dropout'),
    ('lstm_lm', dict(hidden_size=0), 'hidden_size'),
    ('lstm_lm', dict(proj_size=300), 'proj_size'),
    ('lstm_lm', dict(proj_size=-1), 'proj_size'),
    ('lstm_lm', dict(hidden_dropout=1.5), 'hidden_dropout'),
    ('lstm_lm', dict(embed_dropout=float('nan')), 'embed_dropout'),
    ('lstm_attn', dict(attention_layers=(5,)), 'attention_layers'),
    ('lstm_attn', dict(num_heads=3), 'num_heads'),
    ('lstm_attn', dict(boom_hidden=-1), 'boom_hidden'),
    ('lstm_attn', dict(embed_dropout=1.0), 'embed_dropout'),
    ('bert', dict(pre_norm='yes'), 'pre_norm'),
    ('bert', dict(dtype='int8'), 'dtype'),
    ('bert', dict(type_vocab_size=0), 'type_vocab_size'),
    ('bert', dict(norm_epsilon=0.0), 'norm_epsilon'),
    ('bert', dict(num_layers=0), 'num_layers'),
    ('bert', dict(positions='alibi'), 'positions'),
    ('bert', dict(positions='rotary', d_model=12, num_heads=4), 'positions'),  # odd head size 3
    ('gpt', dict(positions='rotary', d_model=12, num_heads=4), 'positions'),
  ],
)
def test_bad_config_values_name_the_field(name, fields, field):
  """Through build_model and through the dataclass alike, the error names config.model.<field> and the
  value (the dataclass is the one place values are checked)."""
  value = repr(fields[field]) if field in fields else ''
  with pytest.raises(ValueError, match=rf'config\.model\.{field}\b.*{re.escape(value)}'):
    build_model(_config(name, **fields), vocab_size=V, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=rf'config\.model\.{field}\b'):
    MODEL_SPECS[name].config(**fields)


@pytest.mark.parametrize('name', sorted(MODEL_SPECS))
def test_lm_and_trunk_take_only_their_config(name):
  """Defaults live in the config dataclass alone: LM and trunk take (config, vocab_size, *, rngs)."""
  spec = MODEL_SPECS[name]
  lm = spec.lm(spec.config(num_layers=1), 5, rngs=nnx.Rngs(0))
  for cls in (spec.lm, type(lm.backbone)):
    params = inspect.signature(cls.__init__).parameters
    assert list(params) == ['self', 'config', 'vocab_size', 'rngs'], (cls.__name__, list(params))
    assert all(p.default is inspect.Parameter.empty for p in params.values()), cls.__name__


def test_bad_config_structure():
  cfg = _config('gpt')
  cfg.model.hiden_size = 3  # a typo is not silently ignored
  with pytest.raises(ValueError, match='hiden_size'):
    build_model(cfg, vocab_size=V, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='config.model.name'):
    build_model(ml_collections.ConfigDict({'model': {'name': 'rnn'}}), vocab_size=V, rngs=nnx.Rngs(0))
  # Fields of another family are ignored, so --config.model.name can switch family on a built config.
  cfg = default_model_config('bert')
  cfg.name = 'gpt'
  spec, gpt_cfg = model_config(cfg)
  assert spec.name == 'gpt' and isinstance(gpt_cfg, GPTConfig) and gpt_cfg.dropout == 0.1
  assert not hasattr(gpt_cfg, 'type_vocab_size')
  cfg = _config('lstm_lm')
  cfg.num_classes = 1
  with pytest.raises(ValueError, match='num_classes'):
    build_model(cfg, vocab_size=V, rngs=nnx.Rngs(0))
  cfg.num_classes = 3
  cfg.model.pooling = 'cls'
  with pytest.raises(ValueError, match='config.model.pooling'):
    build_model(cfg, vocab_size=V, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='vocab_size must be a positive integer, got 0'):
    build_model(_config('gpt'), vocab_size=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='tokens'):
    make('gpt_learned')(jnp.zeros((2, 3, 1), jnp.int32))
  with pytest.raises(ValueError, match='config.model.d_model must be an int, got 16.0'):
    GPTConfig(d_model=16.0)


@pytest.mark.parametrize('name', sorted(CAUSAL))
def test_out_of_range_ids_raise_instead_of_nan_embeddings(name):
  with pytest.raises(ValueError, match=rf'tokens must be ids in \[0, {V}\)'):
    make(name)(jnp.full((2, 3), V, jnp.int32))
  with pytest.raises(ValueError, match='tokens must be ids'):
    make(name)(jnp.full((2, 3), -1, jnp.int32))


def test_gpt_init_is_nanogpt_like():
  model = make('gpt_learned')  # 2 layers: residual projections get 0.02 / sqrt(4)
  block = model.backbone.blocks[1]
  std = lambda p: float(jnp.std(p[...]))
  assert abs(std(block.mlp.fc1.kernel) - 0.02) < 0.003  # 1024 samples: ~2% standard error
  assert abs(std(block.mlp.fc2.kernel) - 0.01) < 0.0015
  assert abs(std(model.backbone.wte.embedding) - 0.02) < 0.005
  assert float(jnp.max(jnp.abs(block.attn.query.bias[...]))) == 0.0
  assert float(jnp.max(jnp.abs(block.ln1.scale[...] - 1))) == 0.0
  # wte + wpe + 2 blocks * (2 LayerNorms + attention 4 * (16 * 16 + 16) + MLP 2 * 16 * 64 + 64 + 16) + ln_f
  assert count_params(model) == 13 * 16 + 16 * 16 + 2 * (64 + 1088 + 2128) + 32
  assert model.flops_per_token(7) == 6 * (count_params(model) - 16 * 16) + 12 * 2 * 16 * 7


def test_gpt_use_bias_false_drops_every_bias():
  # nanoGPT's bias=False: no bias in any Linear or LayerNorm. Given the bias-free model's weights (and zero
  # biases), the model with biases computes the same function; the parameter count drops by the biases.
  cfg = lambda bias: _config('gpt', d_model=16, num_layers=2, num_heads=2, max_len=16, use_bias=bias)
  with_bias = build_model(cfg(True), vocab_size=V, rngs=nnx.Rngs(0))
  no_bias = build_model(cfg(False), vocab_size=V, rngs=nnx.Rngs(0))
  paths = ['/'.join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(no_bias, nnx.Param))]
  assert paths and not [p for p in paths if p.endswith('bias')]
  # per block: 2 LayerNorm offsets + 4 attention biases (16 each) + MLP biases 64 + 16; plus ln_f's offset
  assert count_params(with_bias) - count_params(no_bias) == 2 * (2 * 16 + 4 * 16 + 64 + 16) + 16
  nnx.update(with_bias, nnx.state(no_bias, nnx.Param))  # the biases stay at their zero init
  tokens = jnp.asarray(np.random.default_rng(7).integers(0, V, (3, 7)), jnp.int32)
  assert_close(no_bias(tokens), with_bias(tokens))
  with pytest.raises(ValueError, match='config.model.use_bias'):
    build_model(_config('gpt', use_bias='no'), vocab_size=V, rngs=nnx.Rngs(0))
