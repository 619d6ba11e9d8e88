"""Character-level GPT on tiny Shakespeare with nanoGPT's CPU "baby GPT" settings.

    python experiments/train.py --config=experiments/configs/gpt_char.py \
      --config.data.path=../shared/data/tinyshakespeare.txt --workdir=/tmp/lstm_attn/gpt_char

nanoGPT (`config/train_shakespeare_char.py` with its README's CPU overrides): 4 layers, 4 heads, width 128,
context 64, batch 12, 2000 steps, lr 1e-3 with 100 warmup steps and cosine decay to 1e-4 at step 2000,
AdamW beta2 0.99, weight decay 0.1 on every >= 2-D parameter (embeddings included, as nanoGPT's
`configure_optimizers`), gradient clipping 1.0, dropout 0, no biases (bias=False), tied embeddings,
init N(0, 0.02) with the residual projections at 0.02 / sqrt(2 * layers), character tokenizer;
nanoGPT reports val loss ~1.88 there. `data.path` is required (no default corpus stands in for it).

One change from nanoGPT's model: rotary position embeddings (RoFormer; in every attention layer, no
position table) instead of a learned position table. Same settings, same 1.54M training characters:
whole-split val loss 1.786 (mean of seeds 0-2; 1.7882 for seed 0, as a PyTorch copy of it) vs 1.902
with learned positions, nanoGPT's model (BUILD_NOTES.md, "gpt_char: rotary positions"). For nanoGPT's
exact model add `--config.model.positions=learned`.
"""

from lstm_attn.train import base_config


def get_config():
  c = base_config('gpt')
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.max_len = 64
  c.model.positions = 'rotary'  # nanoGPT: 'learned' (see the docstring)
  c.model.dropout = 0.0
  c.model.activation = 'gelu'  # nanoGPT's nn.GELU() (exact)
  c.model.use_bias = False  # nanoGPT's bias=False: no biases in Linears and LayerNorms
  c.data.path = ''
  c.data.required = True
  c.data.tokenizer = 'char'
  c.data.seq_len = 64
  c.batch_size = 12
  c.num_train_steps = 2000
  c.optim.learning_rate = 1e-3
  c.optim.min_learning_rate = 1e-4
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.1
  c.optim.decay_embeddings = True  # nanoGPT decays every >= 2-D parameter, its tied embedding included
  c.optim.grad_clip_norm = 1.0
  c.cpu_ynn_fusion = 'dots'  # XLA:CPU: YNNPACK for matmuls only, 0.95x step time here (lstm_attn.steps)
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500
  c.eval_batch_size = 64
  c.eval_batches = 0  # the whole val split (nanoGPT estimates from 20-200 random batches)
  c.sample_tokens = 300
  return c
