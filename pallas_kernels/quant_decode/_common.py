"""What the quant_decode implementations share: jnp dequantization of cache slices, the open (residual) group's
partial softmax, and the merge of partial results (flash_decode's `combine_splits`).

Every implementation splits a query's keys in two: slots of complete groups, s < (length // G) * G, whose keys
are read from the per-channel codes (the loop / kernel part), and the <= G - 1 slots of the open group, whose
keys are float in k_residual (this file, plain jnp: at most G keys). Each part yields the online-softmax
partials (acc unnormalised, running max m, sum l), merged with one log-sum-exp combine.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import packing
from pallas_kernels.flash_attention import _common as flash_common

MASK_VALUE = flash_common.MASK_VALUE


def code_planes(codes, bits: int):
  """uint8 codes -> int32 planes along the packed axis: int4 low then high nibbles (`packing`'s planar layout:
  byte i holds rows i and i + K/2), int8 one plane. What every implementation dequantizes, plane by plane."""
  codes = codes.astype(jnp.int32)
  return [codes & 0xF, codes >> 4] if bits == 4 else [codes]


def key_values(codes, scale, zero, bits: int):
  """codes [B, n, G*bits/8, H_kv, D] (planar along the group's slots), scale/zero [B, n, 1, H_kv, D] -> f32
  keys [B, n * G, H_kv, D]."""
  values = (packing.unpack_int32(codes, bits, axis=2) - zero.astype(jnp.int32)) * scale.astype(jnp.float32)
  return values.reshape(values.shape[0], -1, *values.shape[3:])


def value_values(codes, scale, zero, bits: int):
  """codes [B, r, H_kv, D*bits/8] (planar along head_dim), scale/zero [B, r, H_kv, 1] -> f32 [B, r, H_kv, D]."""
  return (packing.unpack_int32(codes, bits, axis=3) - zero.astype(jnp.int32)) * scale.astype(jnp.float32)


def grouped(q, num_kv_heads):
  """q [B, H, D] -> [B, H_kv, H / H_kv, D] (query heads under the kv head they read; no K/V repeat)."""
  return q.reshape(q.shape[0], num_kv_heads, q.shape[1] // num_kv_heads, q.shape[2])


def partial_softmax(s, valid, v):
  """Online-softmax partials of logits s [B, H_kv, g, n] (f32) over values v [B, n, H_kv, D] where `valid`
  [B, n]: (acc [B, H_kv, g, D] unnormalised f32, m and l [B, H_kv, g])."""
  s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
  m = jnp.maximum(jnp.max(s, axis=-1), MASK_VALUE)  # finite even when nothing is valid
  p = jnp.exp(s - m[..., None])
  v = jnp.where(valid[:, :, None, None], v, jnp.zeros((), v.dtype))  # stale rows may hold anything (0 * NaN)
  acc = jnp.einsum("bkgn,bnkd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return acc, m, jnp.sum(p, axis=-1)


def residual_partial(q, k_residual, v_codes, v_scale, v_zero, lengths, *, bits: int, scale: float):
  """The open group's part: keys k_residual[b, :r] at slots [C, C + r), C = (length // G) * G, r = length - C,
  values from the codes at those slots. -> (acc [B, H, D], m [B, H], l [B, H], logits [B, H, G] (-inf where
  masked), slots [B, G])."""
  batch, num_heads, head_dim = q.shape
  group_size, num_kv_heads = k_residual.shape[1], k_residual.shape[2]
  max_len = v_codes.shape[1]
  complete = (lengths // group_size) * group_size
  slots = complete[:, None] + jnp.arange(group_size)[None, :]
  valid = slots < lengths[:, None]
  rows = jnp.clip(slots, 0, max_len - 1)[:, :, None, None]  # a gather of G rows, never a copy of the cache
  take = lambda x: jnp.take_along_axis(x, rows, axis=1)
  v = value_values(take(v_codes), take(v_scale), take(v_zero), bits).astype(q.dtype)
  s = jnp.einsum("bkgd,bnkd->bkgn", grouped(q, num_kv_heads), k_residual.astype(q.dtype),
                 preferred_element_type=jnp.float32) * scale
  acc, m, l = partial_softmax(s, valid, v)
  logits = jnp.where(valid[:, None, None, :], s, -jnp.inf).reshape(batch, num_heads, group_size)
  return acc.reshape(batch, num_heads, head_dim), m.reshape(batch, num_heads), l.reshape(batch, num_heads), \
      logits, slots


def merge(acc, m, l):
  """Partials acc [B, P, H, D], m and l [B, P, H] -> (out [B, H, D] f32, lse [B, H]; +inf where no key)."""
  out = flash_common.combine_splits(acc, m[..., None], l[..., None], axis=1)
  m_all = jnp.max(m, axis=1)
  l_all = jnp.sum(jnp.exp(m - m_all[:, None]) * l, axis=1)
  lse = jnp.where(l_all == 0.0, jnp.inf, m_all + jnp.log(jnp.where(l_all == 0.0, 1.0, l_all)))
  return out, lse


def with_residual(q, parts, residual, return_key_logits, key_logits=None):
  """Merges the complete-group partials `parts` = (acc [B, P, H, D], m, l [B, P, H]) with the open group's
  (`residual_partial` output) -> out [B, H, D] in q.dtype, or (out, logits [B, H, S], lse [B, H]) where
  `key_logits` [B, H, S] holds the complete groups' logits (-inf elsewhere)."""
  r_acc, r_m, r_l, r_logits, slots = residual
  if parts is None:
    acc, m, l = r_acc[:, None], r_m[:, None], r_l[:, None]
  else:
    acc = jnp.concatenate([parts[0], r_acc[:, None]], axis=1)
    m = jnp.concatenate([parts[1], r_m[:, None]], axis=1)
    l = jnp.concatenate([parts[2], r_l[:, None]], axis=1)
  out, lse = merge(acc, m, l)
  out = out.astype(q.dtype)
  if not return_key_logits:
    return out
  batch, num_heads = q.shape[:2]
  b = jnp.arange(batch)[:, None, None]
  h = jnp.arange(num_heads)[None, :, None]
  logits = key_logits.at[b, h, slots[:, None, :]].max(r_logits, mode="drop")  # residual slots are -inf so far
  return out, logits, lse
