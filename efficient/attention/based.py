"""`Based` (Arora et al. 2024): Taylor linear attention on a small feature dimension + sliding-window softmax
attention + a short depthwise causal convolution, as one token mixer.

    u = causal_depthwise_conv(x)                     (kernel `conv_size`, initialized to the identity)
    out = LinearAttention_taylor(u) + WindowAttention(u)

The linear branch (feature dim d_f, state [H, 1 + d_f + d_f^2, V + 1]) recalls globally at a fixed state size;
the window branch (RoPE softmax over the last w tokens, a w-slot ring buffer when decoding) is exact locally.
Decoding memory is constant in the generated length: conv tail + linear state + window ring.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from efficient.attention.linear import LinearAttention, LinearAttentionConfig, init_linear_cache, state_bytes
from efficient.attention.softmax import WindowAttention, init_window_cache
from efficient import nn
from efficient.attention.core import MixerSpec


def _taylor16() -> LinearAttentionConfig:
  return LinearAttentionConfig(feature_map="taylor", feature_dim=16, normalize=True)


@dataclasses.dataclass(frozen=True)
class BasedConfig:
  """linear: the linear branch (Based: Taylor map, feature dim 16, normalized); conv_size: the short causal
  convolution's taps (0 or 1 disables mixing across tokens); window_implementation: see softmax_attention_fn."""
  linear: LinearAttentionConfig = dataclasses.field(default_factory=_taylor16)
  conv_size: int = 3
  window_implementation: str | None = None

  def __post_init__(self):
    if not isinstance(self.conv_size, int) or self.conv_size < 1:
      raise ValueError(f"BasedConfig.conv_size must be an int >= 1, got {self.conv_size!r}.")


def causal_depthwise_conv(x, kernel, segment_ids=None, *, tail=None, tail_segment_ids=None):
  """y_t = sum_j kernel[j] * x_{t-j} per channel (x [B, T, C], kernel [J, C]); taps that cross a segment boundary
  or reach before the sequence contribute nothing. `tail` [B, J-1, C] holds the inputs before x (decoding)."""
  taps = kernel.shape[0]
  batch, length, channels = x.shape
  if tail is None:
    tail = jnp.zeros((batch, taps - 1, channels), x.dtype)
  full = jnp.concatenate([tail.astype(x.dtype), x], axis=1)
  full_seg = None
  if segment_ids is not None:
    if tail_segment_ids is None:
      tail_segment_ids = jnp.broadcast_to(segment_ids[:, :1], (batch, taps - 1))  # tail is zeros anyway
    full_seg = jnp.concatenate([tail_segment_ids, segment_ids], axis=1)
  out = jnp.zeros(x.shape, jnp.float32)
  for j in range(taps):
    shifted = jax.lax.dynamic_slice_in_dim(full, taps - 1 - j, length, axis=1).astype(jnp.float32)
    if full_seg is not None:
      same = jax.lax.dynamic_slice_in_dim(full_seg, taps - 1 - j, length, axis=1) == segment_ids
      shifted = jnp.where(same[..., None], shifted, 0.0)
    out = out + shifted * kernel[j].astype(jnp.float32)
  return out.astype(x.dtype)


class Based(nnx.Module):
  """Based token mixer with `softmax.Attention`'s call signature; needs `MixerSpec.sliding_window`."""

  def __init__(self, config: MixerSpec, variant: BasedConfig | None = None, *, rngs: nnx.Rngs):
    variant = BasedConfig() if variant is None else variant
    self.config, self.variant = config, variant
    kernel = jnp.zeros((variant.conv_size, config.embed_dim), config.param_dtype).at[0].set(1.0)
    noise = nnx.initializers.normal(config.init_std)(rngs.params(), kernel.shape, config.param_dtype)
    self.conv = nn.logical_param(kernel + noise.at[0].set(0.0), (None, "embed"))
    self.linear = LinearAttention(config, variant.linear, rngs=rngs)
    self.window = WindowAttention(config, rngs=rngs, implementation=variant.window_implementation)

  def __call__(self, x, *, positions, segment_ids=None, attention_fn=None, cache=None, cache_positions=None,
               cache_segment_ids=None, cache_index=None, cache_lengths=None):
    del attention_fn, cache_lengths
    taps = self.variant.conv_size
    if cache is None:
      u = causal_depthwise_conv(x, self.conv[...], segment_ids)
    else:
      u = causal_depthwise_conv(x, self.conv[...], segment_ids, tail=cache["conv"],
                                tail_segment_ids=cache.get("conv_segment_ids"))
    kwargs = dict(positions=positions, segment_ids=segment_ids, cache_positions=cache_positions,
                  cache_segment_ids=cache_segment_ids, cache_index=cache_index)
    linear_out, linear_cache = self.linear(u, cache=None if cache is None else cache["linear"], **kwargs)
    window_out, window_cache = self.window(u, cache=None if cache is None else cache["window"], **kwargs)
    out = linear_out + window_out
    if cache is None:
      return out, None
    full = jnp.concatenate([cache["conv"], x.astype(cache["conv"].dtype)], axis=1)
    new_cache = {"conv": full[:, full.shape[1] - (taps - 1):], "linear": linear_cache, "window": window_cache}
    if "conv_segment_ids" in cache:
      seg = segment_ids if segment_ids is not None else jnp.zeros(x.shape[:2], jnp.int32)
      full_seg = jnp.concatenate([cache["conv_segment_ids"], seg], axis=1)
      new_cache["conv_segment_ids"] = full_seg[:, full_seg.shape[1] - (taps - 1):]
    return out, new_cache


def init_based_cache(config: MixerSpec, variant: BasedConfig | None, batch: int, *, dtype=None,
                     with_segment_ids=False) -> dict:
  variant = BasedConfig() if variant is None else variant
  dtype = dtype or config.compute_dtype
  cache = {"conv": jnp.zeros((batch, variant.conv_size - 1, config.embed_dim), dtype),
           "linear": init_linear_cache(config, variant.linear, batch),
           "window": init_window_cache(config, batch, config.sliding_window, dtype=dtype,
                                       with_segment_ids=with_segment_ids)}
  if with_segment_ids:
    cache["conv_segment_ids"] = jnp.zeros((batch, variant.conv_size - 1), jnp.int32)
  return cache


def based_state_bytes(config: MixerSpec, variant: BasedConfig | None, batch: int = 1,
                      kv_itemsize: int = 4) -> dict:
  """Decoding state of one Based layer in bytes: {'linear', 'window', 'conv', 'total'}."""
  variant = BasedConfig() if variant is None else variant
  linear = state_bytes(config, variant.linear, batch)
  window = 2 * batch * config.sliding_window * config.num_kv_heads * config.head_dim * kv_itemsize
  conv = batch * (variant.conv_size - 1) * config.embed_dim * kv_itemsize
  return {"linear": linear, "window": window, "conv": conv, "total": linear + window + conv}
