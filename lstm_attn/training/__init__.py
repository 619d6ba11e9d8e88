"""Training: configs, the jitted steps, the loop, checkpoints, transfer, sampling, metrics, device meshes.

config.py         base_config(model_name) (every field's default), check_config; stdlib_budget and
                  tiny_shakespeare_budget (the experiments' shared data and token budgets)
steps.py          losses per objective, build_steps -> Steps (jitted init/train/eval), evaluate
loop.py           train_and_evaluate(config, workdir): resume, train, evaluate, sample, summary
inputs.py         corpus -> tokenizer -> batchers, per objective
checkpointing.py  the one module that owns Orbax (Checkpointer, peek_meta, load_params)
transfer.py       init_from: pretrained params into the matching subtree
sampling.py       sample_text(model, tokenizer, ...)
optimizer.py      AdamW + warmup/cosine + clipping + the weight-decay mask
sharding.py       the ('data', 'fsdp') mesh, FSDP shardings, multi-host batches
metrics.py        progress lines, metrics.jsonl, TensorBoard
"""

from lstm_attn.training.checkpointing import CheckpointError
from lstm_attn.training.config import base_config, check_config, stdlib_budget, tiny_shakespeare_budget
from lstm_attn.training.loop import TrainingDiverged, train_and_evaluate
from lstm_attn.training.sampling import sample_text
from lstm_attn.training.steps import Steps, build_steps, evaluate
from lstm_attn.training.transfer import transfer_params

__all__ = [
  'CheckpointError',
  'Steps',
  'TrainingDiverged',
  'base_config',
  'build_steps',
  'check_config',
  'evaluate',
  'sample_text',
  'stdlib_budget',
  'tiny_shakespeare_budget',
  'train_and_evaluate',
  'transfer_params',
]
