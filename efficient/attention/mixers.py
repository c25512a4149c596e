"""Per-layer token mixers of the Llama model: build a mixer (and its decoding cache) from a layer kind.

Kinds (`llama.ATTENTION_KINDS`): 'softmax' (llama.Attention, built by llama itself), 'window' (WindowAttention),
'linear' (LinearAttention with `LlamaConfig.linear_attention`), 'based' (Based with `LlamaConfig.based`).
"""
from __future__ import annotations

from efficient.attention.based import Based, based_state_bytes, init_based_cache
from efficient.attention.linear import LinearAttention, init_linear_cache, state_bytes
from efficient.attention.softmax import WindowAttention, init_window_cache
from efficient.models import llama


def every_kth_softmax(num_layers: int, k: int, other: str = "linear") -> str:
  """An `attention_schedule` with softmax on every k-th layer (layers k-1, 2k-1, ...) and `other` elsewhere."""
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be an int >= 1, got {k!r}.")
  if other not in llama.ATTENTION_KINDS:
    raise ValueError(f"other={other!r} is unknown; choose from {llama.ATTENTION_KINDS}.")
  return ",".join("softmax" if (i + 1) % k == 0 else other for i in range(num_layers))


def make_mixer(kind: str, config: llama.LlamaConfig, *, rngs):
  if kind == "softmax":
    return llama.Attention(config, rngs=rngs)
  if kind == "window":
    return WindowAttention(config, rngs=rngs)
  if kind == "linear":
    return LinearAttention(config, config.linear_attention, rngs=rngs)
  if kind == "based":
    return Based(config, config.based, rngs=rngs)
  raise ValueError(f"attention kind {kind!r} is unknown; choose from {llama.ATTENTION_KINDS}.")


def init_mixer_cache(kind: str, config: llama.LlamaConfig, batch: int, max_len: int, *, dtype=None,
                     with_segment_ids=False) -> dict:
  """The empty decoding cache of one layer of `kind` (softmax: k/v of `max_len` slots)."""
  dtype = dtype or config.compute_dtype
  if kind == "softmax":
    return llama.init_cache(config.replace(attention="softmax", attention_schedule=None, num_layers=1), batch,
                            max_len, dtype=dtype)["layers"][0]
  if kind == "window":
    return init_window_cache(config, batch, config.sliding_window, dtype=dtype, with_segment_ids=with_segment_ids)
  if kind == "linear":
    return init_linear_cache(config, config.linear_attention, batch)
  if kind == "based":
    return init_based_cache(config, config.based, batch, dtype=dtype, with_segment_ids=with_segment_ids)
  raise ValueError(f"attention kind {kind!r} is unknown; choose from {llama.ATTENTION_KINDS}.")


def layer_state_bytes(kind: str, config: llama.LlamaConfig, seq_len: int, batch: int = 1) -> int:
  """Bytes of one layer's decoding state after `seq_len` tokens (f32 caches): a softmax layer's KV grows with
  seq_len; window, linear and Based states are constant."""
  kv = 2 * batch * config.num_kv_heads * config.head_dim * 4
  if kind == "softmax":
    return kv * seq_len
  if kind == "window":
    return kv * min(seq_len, config.sliding_window)
  if kind == "linear":
    return state_bytes(config, config.linear_attention, batch)
  if kind == "based":
    return based_state_bytes(config, config.based, batch)["total"]
  raise ValueError(f"attention kind {kind!r} is unknown; choose from {llama.ATTENTION_KINDS}.")
