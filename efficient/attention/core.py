"""The attention core: the `AttentionFn` contract, masks, GQA logits, RoPE, softmax attention, and
`MixerSpec` (what a token mixer needs of its model).

Every model and mixer of this project builds on these; nothing here knows a model.

Positional contract: q [B, T, H, D], k/v [B, S, H_kv, D] (H a multiple of H_kv: grouped-query attention without
repeating k/v). With `causal`, key j is visible to query i iff kv_positions[j] <= q_positions[i]; with a
`sliding_window` w also kv_positions[j] > q_positions[i] - w; with segment ids only where they agree (packed
documents, or a padding mask: real tokens segment 1, padding 0). A cache slot that holds no key yet sits at
`EMPTY_POSITION`, which no causal query sees.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from efficient import nn

EMPTY_POSITION = 2**30


class AttentionFn(Protocol):
  """q [B,T,H,D], k/v [B,S,Hkv,D]; positions say what is causal, segment ids what may see what."""

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
               kv_positions: jax.Array, q_segment_ids: jax.Array | None,
               kv_segment_ids: jax.Array | None) -> jax.Array: ...


def check_window(sliding_window) -> None:
  if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                     or sliding_window < 1):
    raise ValueError(f"sliding_window={sliding_window!r} must be an int >= 1 (or None).")


def attention_mask(q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None, *, causal: bool = True,
                   sliding_window: int | None = None):
  """[B, T, S] bool: what each query may see (see the module docstring)."""
  batch, q_len = q_positions.shape
  mask = jnp.ones((batch, q_len, kv_positions.shape[1]), bool)
  if causal:
    mask &= kv_positions[:, None, :] <= q_positions[:, :, None]
  if sliding_window is not None:
    mask &= kv_positions[:, None, :] > q_positions[:, :, None] - sliding_window
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return mask


def gqa_logits(q, k):
  """Scaled f32 logits [B, H_kv, H/H_kv, T, S] of q [B, T, H, D] against k [B, S, H_kv, D] (GQA groups)."""
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads: q has H={num_heads} heads, not a multiple of k/v's H_kv={num_kv_heads}.")
  q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
  return jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5


def attend_with_logits(logits, v, mask, dtype):
  """Masked softmax of `gqa_logits` [B, H_kv, G, T, S] and its average of v [B, S, H_kv, D] -> [B, T, H, D]."""
  batch, num_kv_heads, group, q_len, _ = logits.shape
  logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  # A query whose every key is masked (padding) gets zeros rather than NaN.
  probs = jnp.where(mask[:, None, None].any(-1, keepdims=True), probs, 0.0)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, num_kv_heads * group, v.shape[-1]).astype(dtype)


def softmax_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                      causal: bool = True, sliding_window: int | None = None):
  """Reference GQA softmax attention (f32 logits and softmax), materializing the [T, S] logits."""
  mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=causal,
                        sliding_window=sliding_window)
  return attend_with_logits(gqa_logits(q, k), v, mask, q.dtype)


def rope(x, positions, theta: float):
  """Rotate-half RoPE (Hugging Face convention) on x [B, T, H, D] at integer positions [B, T]."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  """What a token mixer needs of the model around it (no model config): widths, RoPE, dtypes, init, and the
  per-kind options. A model converts its own config to one (`LlamaConfig.mixer_spec()`)."""
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  init_std: float = 0.02
  causal: bool = True
  sliding_window: int | None = None        # 'window' and 'based' layers
  linear_attention: Any = None             # efficient.attention.LinearAttentionConfig ('linear'; None: defaults)
  based: Any = None                        # efficient.attention.BasedConfig ('based'; None: defaults)
  attention_implementation: str | None = None  # flash_attention's; None: the pallas_kernels policy
  # Softmax/window layers: logits = multiplier * q.k / sqrt(head_dim), applied to q (exact: logits are linear in
  # q; RoPE is linear too), so every kernel and KV cache keeps its 1/sqrt(head_dim). μP's 1/d attention is
  # multiplier sqrt(base_head_dim / head_dim).
  attention_multiplier: float = 1.0

  def __post_init__(self):
    for name in ("embed_dim", "num_heads", "num_kv_heads", "head_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"MixerSpec.{name} must be >= 1, got {getattr(self, name)}.")
    if not (isinstance(self.attention_multiplier, (int, float)) and 0 < self.attention_multiplier < float("inf")):
      raise ValueError(f"MixerSpec.attention_multiplier must be a positive finite number, got "
                       f"{self.attention_multiplier!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"MixerSpec.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads}).")
    check_window(self.sliding_window)

  def einsum(self, equation, shape, names, *, rngs, use_bias=False) -> nn.Einsum:
    """A projection in this spec's dtypes and init."""
    return nn.Einsum(equation, shape, names, rngs=rngs, use_bias=use_bias, param_dtype=self.param_dtype,
                     compute_dtype=self.compute_dtype, kernel_init=nn.normal_init(self.init_std))
