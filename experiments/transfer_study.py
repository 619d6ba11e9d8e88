r"""Pre-train every model family on the stdlib corpus, fine-tune it on the stdlib package task, and train
the same classifier from scratch with the same fine-tuning budget; print the README's transfer table.

    python experiments/transfer_study.py --workdir=/tmp/lstm_attn/transfer

Per family, three runs in `<workdir>/<family>/{pretrain,finetune,scratch}`:
    pretrain   its pre-training config (default.py for gpt, bert_mlm.py, lstm_stdlib.py:<family>)
    finetune   finetune_cls.py:<family> with init_from=<pretrain>
    scratch    finetune_cls.py:<family> without init_from (the from-scratch twin, same recipe and steps)
Each run resumes (or notices it has finished) like experiments/train.py, so the study can be stopped and
started again; wall times are those measured when a run trained, kept in `<workdir>/study.json`.
`--pretrain_steps` / `--finetune_steps` shorten every run (smoke tests); `--finetune=field=value,...`
overrides fine-tuning fields (`optim.learning_rate=1e-4`) for both the fine-tuned run and its twin.
"""

import collections
import importlib.util
import json
import math
import os
import time

import ml_collections
import numpy as np
from absl import app, flags

from lstm_attn import cli
from lstm_attn.data.classification import stdlib_classification_task
from lstm_attn.data.tokenizers import ByteTokenizer
from lstm_attn.models import MODEL_SPECS
from lstm_attn.training import check_config, train_and_evaluate

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')
PRETRAIN = {  # family -> (config file, its argument)
  'lstm_lm': ('lstm_stdlib.py', 'lstm_lm'),
  'lstm_attn': ('lstm_stdlib.py', 'lstm_attn'),
  'gpt': ('default.py', None),
  'bert': ('bert_mlm.py', None),
}

_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder of the study: one sub-folder per family and run.')
_FAMILIES = flags.DEFINE_list('families', list(PRETRAIN), f'Model families, of {list(PRETRAIN)}.')
_PRETRAIN_STEPS = flags.DEFINE_integer('pretrain_steps', None, 'Override every pre-training run.', 1)
_FINETUNE_STEPS = flags.DEFINE_integer('finetune_steps', None, 'Override every fine-tuning run.', 1)
_FINETUNE = flags.DEFINE_list('finetune', [], 'Fine-tuning config overrides, field=value (dotted fields).')
flags.mark_flag_as_required('workdir')


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """experiments/configs/<name>'s get_config(arg), as `--config=<file>:<arg>` loads it."""
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(_CONFIGS, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def _override(config: ml_collections.ConfigDict, assignments) -> None:
  for item in assignments:
    field, sep, text = item.partition('=')
    if not sep:
      raise app.UsageError(f'--finetune={item!r}: expected field=value, e.g. optim.learning_rate=1e-4.')
    *parents, leaf = field.split('.')
    try:
      node = config
      for p in parents:
        node = node[p]
      old = node[leaf]
      node[leaf] = type(old)(text) if old is not None and not isinstance(old, bool) else json.loads(text)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
      raise app.UsageError(
        f'--finetune={item!r}: {field!r} is not a field of finetune_cls.py, or {text!r} is not a value '
        f'for it ({type(e).__name__}); e.g. --finetune=optim.learning_rate=1e-4,num_train_steps=600.'
      ) from None


def study_configs(family: str, workdir: str) -> dict[str, ml_collections.ConfigDict]:
  """The three runs' configs of one family, in the order they run."""
  pretrain = load_config(*PRETRAIN[family])
  finetune = load_config('finetune_cls.py', family)
  _override(finetune, _FINETUNE.value)
  finetune.compare_from_scratch = False  # the twin is its own run here, timed on its own
  if _PRETRAIN_STEPS.value:
    pretrain.num_train_steps = _PRETRAIN_STEPS.value
  if _FINETUNE_STEPS.value:
    finetune.num_train_steps = _FINETUNE_STEPS.value
  finetune.optim.warmup_steps = min(finetune.optim.warmup_steps, finetune.num_train_steps)
  pretrain.optim.warmup_steps = min(pretrain.optim.warmup_steps, pretrain.num_train_steps)
  scratch = ml_collections.ConfigDict(finetune.to_dict())
  finetune.init_from = os.path.join(workdir, 'pretrain')
  return {'pretrain': pretrain, 'finetune': finetune, 'scratch': scratch}


def ngram_naive_bayes_accuracy(config, n: int = 3) -> float:
  """Test accuracy of a multinomial naive Bayes on byte n-grams (add-0.1 smoothing) over the fine-tuning
  task's own splits: a non-neural reference for the table."""
  task = stdlib_classification_task(
    ByteTokenizer(), config.data.seq_len, snippets_per_class=tuple(config.data.snippets_per_class)
  )

  def grams(split):
    for row, length in zip(task[split]['tokens'], task[split]['seq_lengths']):
      ids = tuple(int(t) for t in row[:length])
      yield collections.Counter(ids[i : i + n] for i in range(len(ids) - n + 1))

  num_classes = len(task['class_names'])
  counts = [collections.Counter() for _ in range(num_classes)]
  for c, label in zip(grams('train'), task['train']['labels']):
    counts[label].update(c)
  vocab = len(set().union(*counts))
  totals = [sum(c.values()) + 0.1 * vocab for c in counts]
  predictions = [
    int(np.argmax([sum(k * math.log((counts[y][g] + 0.1) / totals[y]) for g, k in c.items()) for y in
                   range(num_classes)]))
    for c in grams('test')
  ]  # fmt: skip
  return float(np.mean(np.asarray(predictions) == task['test']['labels']))


def _table(rows) -> str:
  lines = [
    '| family | pre-training val loss | fine-tuned test acc | from scratch test acc | gain | '
    'fine-tuned val acc | from scratch val acc | wall: pre-train / fine-tune / scratch |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for family, r in rows.items():
    ft, sc, pt = r['finetune'], r['scratch'], r['pretrain']
    lines.append(
      f'| {family} | {pt["val_loss"]:.4f} | {ft["test_accuracy"]:.3f} | {sc["test_accuracy"]:.3f} | '
      f'{ft["test_accuracy"] - sc["test_accuracy"]:+.3f} | {ft["val_accuracy"]:.3f} | '
      f'{sc["val_accuracy"]:.3f} | {pt["wall_s"]:.0f} s / {ft["wall_s"]:.0f} s / {sc["wall_s"]:.0f} s |'
    )
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  unknown = [f for f in _FAMILIES.value if f not in PRETRAIN]
  if unknown:
    raise app.UsageError(f'--families: {unknown} are not model families; choose from {list(MODEL_SPECS)}.')
  root = os.path.abspath(_WORKDIR.value)
  cli.check_output_dir(root, '--workdir')
  record_path = os.path.join(root, 'study.json')
  record = {}
  if os.path.exists(record_path):
    with open(record_path, encoding='utf-8') as f:
      record = json.load(f)
  plans = {f: study_configs(f, os.path.join(root, f)) for f in _FAMILIES.value}
  for runs in plans.values():  # every config checked before anything trains (init_from: once it exists)
    for config in runs.values():
      check_config(ml_collections.ConfigDict({**config.to_dict(), 'init_from': ''}))
  for family, runs in plans.items():
    for run, config in runs.items():
      workdir = os.path.join(root, family, run)
      start = time.perf_counter()
      summary = train_and_evaluate(config, workdir)
      wall = time.perf_counter() - start
      keep = {k: summary.get(k) for k in ('step', 'val_loss', 'test_loss', 'val_accuracy', 'test_accuracy')}
      previous = record.get(family, {}).get(run)
      same_run = previous is not None and previous.get('step') == keep['step']
      keep['wall_s'] = previous['wall_s'] if same_run and wall < previous['wall_s'] / 2 else wall
      record.setdefault(family, {})[run] = keep
      with open(record_path, 'w', encoding='utf-8') as f:
        json.dump(record, f, indent=1)
  table = _table({f: record[f] for f in plans})
  reference = plans[next(iter(plans))]['finetune']
  table += (
    f'\n\nByte-trigram naive Bayes on the same splits (no neural network): test accuracy '
    f'{ngram_naive_bayes_accuracy(reference):.3f}.'
  )
  with open(os.path.join(root, 'table.md'), 'w', encoding='utf-8') as f:
    f.write(table + '\n')
  print(table)


if __name__ == '__main__':
  cli.run_main(main)
