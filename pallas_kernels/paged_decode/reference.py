"""Plain-jnp paged decode: gather each sequence's pages into a contiguous view, dequantize, masked softmax.

The readable ground truth (f32 logits, softmax and accumulation); it reads every page of the table, valid or
not, which the kernels avoid.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import packing


def gather_tokens(array, page_table):
  """array [num_pages, page_size, H_kv, last], page_table [B, P] -> [B, P * page_size, H_kv, last]."""
  pages = jnp.take(array, jnp.clip(page_table, 0, array.shape[0] - 1), axis=0)  # [B, P, ps, H_kv, last]
  return pages.reshape(pages.shape[0], -1, *pages.shape[3:])


def decode_values(pages: dict, page_table, bits, dtype):
  """(k, v) [B, P * page_size, H_kv, D] in `dtype` from float or quantized pages."""
  gathered = {name: gather_tokens(array, page_table) for name, array in pages.items()}
  if bits is None:
    return gathered["k"].astype(dtype), gathered["v"].astype(dtype)

  def one(name):
    codes = packing.unpack_int32(gathered[name], bits, axis=3)
    values = (codes.astype(jnp.float32) - gathered[f"{name}_zero"].astype(jnp.float32)) * gathered[f"{name}_scale"]
    return values.astype(dtype)
  return one("k"), one("v")


def paged_decode(q, pages: dict, page_table, lengths, *, bits, scale):
  """q [B, H, D] over the first lengths[b] tokens of sequence b's pages -> [B, H, D] in q.dtype."""
  batch, num_heads, head_dim = q.shape
  k, v = decode_values(pages, page_table, bits, q.dtype)
  num_kv_heads = k.shape[2]
  q = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
  s = jnp.einsum("bkgd,bskd->bkgs", q, k, preferred_element_type=jnp.float32) * scale
  ok = (jnp.arange(k.shape[1])[None, :] < lengths[:, None])[:, None, None]  # [B, 1, 1, S]
  p = jnp.where(ok, jax.nn.softmax(jnp.where(ok, s, -jnp.inf), axis=-1), 0.0)  # length 0 -> zeros, not NaN
  v = jnp.where(ok[:, 0, 0, :, None, None], v.astype(jnp.float32), 0.0)  # unused slots may hold anything
  out = jnp.einsum("bkgs,bskd->bkgd", p, v)
  return out.reshape(batch, num_heads, head_dim).astype(q.dtype)
