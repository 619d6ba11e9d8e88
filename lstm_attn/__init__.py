"""lstm_attn: language models built from LSTMs and attention, in JAX/Flax."""

__version__ = '0.1.0'
