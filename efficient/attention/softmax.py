"""Softmax attention with an optional sliding window: an `AttentionFn` and a window layer with a ring-buffer cache.

`softmax_attention_fn(sliding_window=w)` follows the Llama model's positional contract (key j visible to query i
iff kv_position[j] <= q_position[i], and, with a window, kv_position[j] > q_position[i] - w; segment ids must
agree). `WindowAttention` is `llama.Attention` (same q/k/v/o parameter paths, RoPE, GQA) whose decoding cache is a
ring buffer of the last `w` keys and values, so its memory stays constant in the generated length.
"""
from __future__ import annotations

import jax.numpy as jnp

from efficient.models import llama
from pallas_kernels.flash_attention import flash_attention


def window_mask(q_positions, kv_positions, sliding_window=None, q_segment_ids=None, kv_segment_ids=None):
  """[B, T, S] bool: causal by absolute position, within `sliding_window` (if given) and one segment."""
  mask = llama.attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  if sliding_window is not None:
    mask &= kv_positions[:, None, :] > q_positions[:, :, None] - sliding_window
  return mask


def _check_window(sliding_window):
  if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                     or sliding_window < 1):
    raise ValueError(f"sliding_window={sliding_window!r} must be an int >= 1 (or None).")


def softmax_attention_fn(sliding_window: int | None = None, implementation: str | None = "reference"):
  """An `AttentionFn` (see `llama.AttentionFn`): GQA softmax attention, optionally within a left window.

  implementation='reference' materializes the [T, S] logits (positional mask; works with any cache).
  Any `pallas_kernels.flash_attention` implementation ('xla', 'pallas_tpu', ...) is used when queries and keys
  are the same tokens (training / prefill without a cache, where index-causal == position-causal for packed
  segments, see `efficient.attention.flash`); with a cache the reference runs.
  """
  _check_window(sliding_window)

  def attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None):
    q_len, num_heads = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[2]
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads: q has H={num_heads} heads, not a multiple of k/v's H_kv={num_kv_heads}.")
    if implementation != "reference" and q_len == k.shape[1]:
      segment_ids = None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
      return flash_attention(q, k, v, causal=True, sliding_window=sliding_window, segment_ids=segment_ids,
                             implementation=implementation)
    mask = window_mask(q_positions, kv_positions, sliding_window, q_segment_ids, kv_segment_ids)
    return llama.attend_with_logits(llama.gqa_logits(q, k), v, mask, q.dtype)

  return attention


class WindowAttention(llama.Attention):
  """Sliding-window softmax attention: `llama.Attention`'s parameters, its own window `AttentionFn` (the model's
  `attention_fn` is ignored) and a ring-buffer cache of `sliding_window` slots (`init_window_cache`)."""

  def __init__(self, config: llama.LlamaConfig, *, rngs, sliding_window: int | None = None,
               implementation: str | None = "reference"):
    super().__init__(config, rngs=rngs)
    self.sliding_window = config.sliding_window if sliding_window is None else sliding_window
    if self.sliding_window is None:
      raise ValueError("sliding_window is required for WindowAttention (argument or LlamaConfig.sliding_window).")
    _check_window(self.sliding_window)
    self.window_fn = softmax_attention_fn(self.sliding_window, implementation)

  def __call__(self, x, *, positions, segment_ids, attention_fn=None, cache=None, cache_positions=None,
               cache_segment_ids=None, cache_index=None):
    del attention_fn, cache_positions, cache_segment_ids  # own window function; the ring keeps its positions
    q, k, v = self.q(x), self.k(x), self.v(x)
    theta = self.config.rope_theta
    q, k = llama.rope(q, positions, theta), llama.rope(k, positions, theta)
    if cache is None:
      out = self.window_fn(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segment_ids,
                           kv_segment_ids=segment_ids)
      return self.o(out), None
    dtype = self.config.compute_dtype
    keys = jnp.concatenate([cache["k"].astype(dtype), k], axis=1)
    values = jnp.concatenate([cache["v"].astype(dtype), v], axis=1)
    kv_positions = jnp.concatenate([cache["positions"], positions], axis=1)
    kv_segments = None
    if segment_ids is not None:
      if "segment_ids" not in cache:
        raise ValueError("segment_ids given but the cache was built without them (init_cache(with_segment_ids)).")
      kv_segments = jnp.concatenate([cache["segment_ids"], segment_ids], axis=1)
    out = self.window_fn(q, keys, values, q_positions=positions, kv_positions=kv_positions,
                         q_segment_ids=segment_ids, kv_segment_ids=kv_segments)
    # Keep the newest min(T, w) tokens: slot = position-in-stream mod w (distinct slots, so no scatter clash).
    ring = cache["k"].shape[1]
    length = x.shape[1]
    keep = min(length, ring)
    slots = (cache_index + length - keep + jnp.arange(keep)) % ring
    new_cache = {"k": cache["k"].at[:, slots].set(k[:, -keep:].astype(cache["k"].dtype)),
                 "v": cache["v"].at[:, slots].set(v[:, -keep:].astype(cache["v"].dtype)),
                 "positions": cache["positions"].at[:, slots].set(positions[:, -keep:])}
    if "segment_ids" in cache:
      seg = segment_ids if segment_ids is not None else jnp.zeros_like(positions)
      new_cache["segment_ids"] = cache["segment_ids"].at[:, slots].set(seg[:, -keep:])
    return self.o(out), new_cache


def init_window_cache(config: llama.LlamaConfig, batch: int, sliding_window: int, *, dtype=None,
                      with_segment_ids=False) -> dict:
  """An empty ring buffer of `sliding_window` slots: k/v [B, w, H_kv, D] and their positions (empty slots get
  `llama.EMPTY_POSITION`, which no query sees)."""
  dtype = dtype or config.compute_dtype
  shape = (batch, sliding_window, config.num_kv_heads, config.head_dim)
  cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
           "positions": jnp.full((batch, sliding_window), llama.EMPTY_POSITION, jnp.int32)}
  if with_segment_ids:
    cache["segment_ids"] = jnp.zeros((batch, sliding_window), jnp.int32)
  return cache
