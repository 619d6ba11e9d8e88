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

from lstm_attn.training import base_config, tiny_shakespeare_budget


def get_config():
  # Model defaults (GPTConfig): width 128, 4 layers, 4 heads, dropout 0, tied embeddings; the optimizer
  # defaults are nanoGPT's (lr 1e-3 -> 1e-4, 100 warmup steps, beta2 0.99, weight decay 0.1, clip 1.0).
  c = tiny_shakespeare_budget(base_config('gpt'))
  c.model.max_len = 64
  c.model.positions = 'rotary'  # nanoGPT: 'learned' (see the docstring)
  c.model.activation = 'gelu'  # nanoGPT's nn.GELU() (exact)
  c.model.use_bias = False  # nanoGPT's bias=False: no biases in Linears and LayerNorms
  c.optim.decay_embeddings = True  # nanoGPT decays every >= 2-D parameter, its tied embedding included
  c.cpu_ynn_fusion = 'dots'  # XLA:CPU: YNNPACK for matmuls only, 0.95x step time (training/steps.py)
  return c
