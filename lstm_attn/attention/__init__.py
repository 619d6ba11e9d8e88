"""Attention: one op with several backends, rotary embeddings, a KV cache and a multi-head module.

ops.py       dot_product_attention: validates once, then calls one backend from a flat table
             ('reference', 'xla', 'chunked', 'pallas') with one `reference.MaskSpec`.
rotary.py    apply_rotary: rotary position embeddings.
kv_cache.py  KVCache: fixed-size key/value buffers for generation.
mha.py       MultiHeadAttention: the Flax NNX module around dot_product_attention.
sharded.py   shard_attention / per_shard_attention: kernels per shard of a device mesh (shard_map).
"""

from lstm_attn.attention.kv_cache import KVCache
from lstm_attn.attention.mha import MultiHeadAttention
from lstm_attn.attention.ops import IMPLEMENTATIONS, dot_product_attention
from lstm_attn.attention.ops import _auto_implementation as _auto_implementation  # used by tests
from lstm_attn.attention.rotary import apply_rotary
from lstm_attn.attention.sharded import attention_batch_axes, per_shard_attention, shard_attention

# The default-implementation thresholds (CHUNKED_MIN_ELEMENTS, PALLAS_HEAD_DIMS) live in, and are read
# from, `lstm_attn.attention.ops`; they are not copied here, where setting them would change nothing.
__all__ = [
  'IMPLEMENTATIONS',
  'KVCache',
  'MultiHeadAttention',
  'apply_rotary',
  'attention_batch_axes',
  'per_shard_attention',
  'shard_attention',
  'dot_product_attention',
]
