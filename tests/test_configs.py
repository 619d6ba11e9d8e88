"""Every experiment config loads and passes check_config; the transfer study's fine-tuning configs build
exactly the trunk their pre-training configs train (so every trunk tensor transfers)."""

import glob
import os
import sys

import pytest

from lstm_attn.training import check_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import transfer_study  # noqa: E402

CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, 'experiments', 'configs', '*.py')))
FAMILIES = tuple(transfer_study.PRETRAIN)
ARGS = {'finetune_cls.py': FAMILIES, 'lstm_stdlib.py': ('lstm_lm', 'lstm_attn')}
# Fields of config.model that only the classifier reads, or that only act in training (dropout rates and
# init scales are not part of the trunk's shape).
_HEAD_OR_TRAINING = {'pooling', 'classifier_dropout', 'embed_init'}


@pytest.mark.parametrize(
  'name, arg', [(n, a) for n in CONFIGS for a in ARGS.get(n, (None,))], ids=lambda x: str(x)
)
def test_every_config_loads_and_checks(name, arg):
  config = transfer_study.load_config(name, arg)
  if config.compare_from_scratch:  # fine-tuning: init_from comes from the command line
    with pytest.raises(ValueError, match='--config.init_from=<workdir of the pretraining run>'):
      check_config(config)
    config.compare_from_scratch = False
  check_config(config)


@pytest.mark.parametrize('family', FAMILIES)
def test_fine_tuning_builds_the_pretrained_trunk(family):
  pretrain = transfer_study.load_config(*transfer_study.PRETRAIN[family])
  finetune = transfer_study.load_config('finetune_cls.py', family)
  assert pretrain.model.name == finetune.model.name == family
  differ = {
    k: (v, finetune.model[k])
    for k, v in pretrain.model.items()
    if k not in _HEAD_OR_TRAINING and finetune.model[k] != v and 'dropout' not in k
  }
  assert not differ, f'{family}: the fine-tuning trunk differs from the pre-trained one: {differ}'
  assert finetune.data.tokenizer == pretrain.data.tokenizer and finetune.num_classes


def test_bad_family_after_the_colon_is_named():
  with pytest.raises(ValueError, match='finetune_cls.py:gtp'):
    transfer_study.load_config('finetune_cls.py', 'gtp')


def test_ngram_baseline_is_far_above_chance_on_the_task():
  # The table's non-neural reference: byte trigrams tell the packages apart (0.659 on the full task).
  config = transfer_study.load_config('finetune_cls.py', 'bert')
  config.data.snippets_per_class = (64, 16, 16)
  assert 0.3 < transfer_study.ngram_naive_bayes_accuracy(config) <= 1.0
