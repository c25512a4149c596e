"""Softmax attention: the kernel-backed default `AttentionFn`, the `Attention` layer (q/k/v/o, RoPE, GQA, a KV
cache behind `efficient.attention.cache`), and `WindowAttention` with a ring-buffer cache.

`softmax_attention_fn(sliding_window=w, causal=...)` follows the positional contract of `efficient.attention.core`
(key j visible to query i iff kv_position[j] <= q_position[i] when causal, and, with a window,
kv_position[j] > q_position[i] - w; segment ids must agree). When queries and keys are the same tokens
(training, a prefill without a cache) it runs `pallas_kernels.flash_attention` (index-causal == position-causal
there, see `efficient.attention.flash`) through the implementation policy: Pallas kernels on TPU/GPU, the XLA
chunked path on CPU. Otherwise (keys are cache slots) it masks by position with the reference.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from efficient.attention import cache as cache_lib
from efficient.attention import core, flash


def softmax_attention_fn(sliding_window: int | None = None, implementation: str | None = None, *,
                         causal: bool = True, **block_kwargs):
  """An `AttentionFn`: GQA softmax attention, optionally within a left window (see the module docstring).

  implementation='reference' always materializes the [T, S] logits with the positional mask; any other value
  (None: the `pallas_kernels` policy) is `flash_attention`'s, used when queries and keys are the same tokens.
  `block_kwargs` (block_q, block_kv) go to the kernel.
  """
  core.check_window(sliding_window)
  flash._check_block_kwargs("softmax_attention_fn", block_kwargs)
  if sliding_window is not None and not causal:
    raise ValueError("sliding_window: a left window implies causal=True.")

  def attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None):
    if q.shape[2] % k.shape[2]:
      raise ValueError(f"num_heads: q has H={q.shape[2]} heads, not a multiple of k/v's H_kv={k.shape[2]}.")
    if implementation != "reference" and q.shape[1] == k.shape[1]:
      return flash.self_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal,
                                  sliding_window=sliding_window, implementation=implementation, **block_kwargs)
    return core.softmax_attention(q, k, v, q_positions=q_positions, kv_positions=kv_positions,
                                  q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal,
                                  sliding_window=sliding_window)

  return attention


def reference_attention_fn(sliding_window: int | None = None, *, causal: bool = True):
  """`softmax_attention_fn(implementation='reference')`: the positional reference everywhere."""
  return softmax_attention_fn(sliding_window, "reference", causal=causal)


class Attention(nnx.Module):
  """Multi-head GQA attention of x [B, T, embed] with RoPE; the call signature every token mixer shares:

      (x, *, positions, segment_ids, attention_fn, cache=None, cache_positions=None, cache_segment_ids=None,
       cache_index=None, cache_lengths=None) -> (y [B, T, embed], new cache or None)

  `attention_fn` None: `softmax_attention_fn(causal=spec.causal)` with the spec's implementation. `cache` is a
  layer cache of `efficient.attention.cache` (any storage codec)."""

  def __init__(self, spec: core.MixerSpec, *, rngs: nnx.Rngs, use_bias: bool = False):
    s = spec
    self.spec = spec
    kv_shape, kv_names = (s.embed_dim, s.num_kv_heads, s.head_dim), ("embed", "kv_heads", "head_dim")
    project = lambda *args: s.einsum(*args, rngs=rngs, use_bias=use_bias)
    self.q = project("btd,dhk->bthk", (s.embed_dim, s.num_heads, s.head_dim), ("embed", "heads", "head_dim"))
    self.k = project("btd,dhk->bthk", kv_shape, kv_names)
    self.v = project("btd,dhk->bthk", kv_shape, kv_names)
    self.o = s.einsum("bthk,hkd->btd", (s.num_heads, s.head_dim, s.embed_dim), ("heads", "head_dim", "embed"),
                      rngs=rngs, use_bias=use_bias)

  def default_attention_fn(self):
    return softmax_attention_fn(implementation=self.spec.attention_implementation, causal=self.spec.causal)

  def project_qkv(self, x, positions):
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.spec.rope_theta is not None:
      q, k = core.rope(q, positions, self.spec.rope_theta), core.rope(k, positions, self.spec.rope_theta)
    if self.spec.attention_multiplier != 1.0:  # the logit scale knob (MixerSpec), folded into q
      q = (q * self.spec.attention_multiplier).astype(q.dtype)
    return q, k, v

  def __call__(self, x, *, positions, segment_ids=None, attention_fn=None, cache=None, cache_positions=None,
               cache_segment_ids=None, cache_index=None, cache_lengths=None):
    attention_fn = attention_fn or self.default_attention_fn()
    q, k, v = self.project_qkv(x, positions)
    if cache is None:
      out = attention_fn(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segment_ids,
                         kv_segment_ids=segment_ids)
      return self.o(out), None
    out, cache = cache.update_and_attend(q, k, v, index=cache_index, q_positions=positions,
                                         kv_positions=cache_positions, q_segment_ids=segment_ids,
                                         kv_segment_ids=cache_segment_ids, kv_lengths=cache_lengths,
                                         attention_fn=attention_fn)
    return self.o(out), cache


def init_softmax_cache(spec: core.MixerSpec, batch: int, max_len: int, *, dtype=None, with_segment_ids=False,
                       kv_format: str | None = None, kv_group_size: int | None = None):
  del with_segment_ids  # the model keeps slot segment ids once for every layer
  return cache_lib.make_layer_cache(kv_format, batch, max_len, spec.num_kv_heads, spec.head_dim,
                                    dtype=dtype or spec.compute_dtype, group_size=kv_group_size)


class WindowAttention(Attention):
  """Sliding-window softmax attention: `Attention`'s parameters, its own window `AttentionFn` (the model's
  `attention_fn` is ignored) and a ring-buffer cache of `sliding_window` slots (`init_window_cache`)."""

  def __init__(self, spec: core.MixerSpec, *, rngs, sliding_window: int | None = None,
               implementation: str | None = None):
    super().__init__(spec, rngs=rngs)
    self.sliding_window = spec.sliding_window if sliding_window is None else sliding_window
    if self.sliding_window is None:
      raise ValueError("sliding_window is required for WindowAttention (argument or MixerSpec.sliding_window).")
    core.check_window(self.sliding_window)
    implementation = implementation or spec.attention_implementation
    self.window_fn = softmax_attention_fn(self.sliding_window, implementation)

  def __call__(self, x, *, positions, segment_ids=None, attention_fn=None, cache=None, cache_positions=None,
               cache_segment_ids=None, cache_index=None, cache_lengths=None):
    del attention_fn, cache_positions, cache_segment_ids, cache_lengths  # own window fn; the ring has positions
    q, k, v = self.project_qkv(x, positions)
    if cache is None:
      out = self.window_fn(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segment_ids,
                           kv_segment_ids=segment_ids)
      return self.o(out), None
    dtype = self.spec.compute_dtype
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


def init_window_cache(spec: core.MixerSpec, batch: int, sliding_window: int, *, dtype=None,
                      with_segment_ids=False) -> dict:
  """An empty ring buffer of `sliding_window` slots: k/v [B, w, H_kv, D] and their positions (empty slots get
  `core.EMPTY_POSITION`, which no query sees)."""
  dtype = dtype or spec.compute_dtype
  shape = (batch, sliding_window, spec.num_kv_heads, spec.head_dim)
  cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
           "positions": jnp.full((batch, sliding_window), core.EMPTY_POSITION, jnp.int32)}
  if with_segment_ids:
    cache["segment_ids"] = jnp.zeros((batch, sliding_window), jnp.int32)
  return cache
