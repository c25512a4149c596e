"""Plain-jnp attention with the full T x S mask: the readable ground truth (f32 logits, softmax and accumulation).

Gradients come from jax's autodiff. Memory is O(T * S) per head: use `xla.py` for long sequences.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def mask(q_len, kv_len, *, causal, window, q_segment_ids=None, kv_segment_ids=None):
  """Bool [B or 1, T, S]: key j visible to query i (at absolute position i + S - T), see `_common`."""
  positions = jnp.arange(q_len)[:, None] + (kv_len - q_len)
  keys = jnp.arange(kv_len)[None, :]
  ok = jnp.ones((q_len, kv_len), bool)
  if causal:
    ok &= keys <= positions
  if window is not None:
    ok &= keys > positions - window
  ok = ok[None]
  if q_segment_ids is not None:
    ok = ok & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return ok


def flash_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, causal=True, window=None, soft_cap=None,
                    scale):
  """softmax(scale * q k^T (soft-capped), masked) v for q [B, T, H, D], k/v [B, S, H_kv, D] -> [B, T, H, D].

  GQA: query head h reads kv head h // (H // H_kv). A query that sees no key outputs zeros.
  """
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
  s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  ok = mask(q_len, kv_len, causal=causal, window=window, q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids)[:, None, None]  # [B, 1, 1, T, S]
  s = jnp.where(ok, s, -jnp.inf)
  any_visible = ok.any(-1, keepdims=True)
  p = jax.nn.softmax(jnp.where(any_visible, s, 0.0), axis=-1)
  p = jnp.where(ok, p, 0.0)
  out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
  return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


def flash_decode(q, k_cache, v_cache, lengths, *, soft_cap=None, scale):
  """One query step per sequence: q [B, H, D] attends to cache rows [0, lengths[b]) -> [B, H, D]."""
  batch, num_heads, head_dim = q.shape
  num_kv_heads = k_cache.shape[2]
  q = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
  s = jnp.einsum("bkgd,bskd->bkgs", q, k_cache, preferred_element_type=jnp.float32) * scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  ok = (jnp.arange(k_cache.shape[1])[None, :] < lengths[:, None])[:, None, None]  # [B, 1, 1, S_max]
  p = jax.nn.softmax(jnp.where(ok, s, -jnp.inf), axis=-1)
  p = jnp.where(ok, p, 0.0)  # a length-0 row gives zeros, not NaN
  # Rows past a length may hold anything (stale or uninitialised cache); 0 * NaN would be NaN.
  v = jnp.where(ok[:, 0, 0, :, None, None], v_cache.astype(jnp.float32), 0.0)
  out = jnp.einsum("bkgs,bskd->bkgd", p, v)
  return out.reshape(batch, num_heads, head_dim).astype(q.dtype)
