"""Pallas kernels, each beside its plain-jnp reference. Installed as `lstm_attn.kernels`."""
