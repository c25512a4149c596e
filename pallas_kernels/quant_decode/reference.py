"""The quant_decode ground truth, written to be read: dequantize the whole cache, put the open group's float keys
in their slots, one masked softmax (f32) per query head."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quant_decode import _common


def quant_decode(q, k_codes, k_scale, k_zero, k_residual, v_codes, v_scale, v_zero, lengths, *, bits, scale,
                 return_key_logits=False):
  """q [B, H, D] over the first lengths[b] slots -> out [B, H, D] (and logits [B, H, S], lse [B, H])."""
  batch, num_heads, head_dim = q.shape
  max_len, num_kv_heads = v_codes.shape[1], v_codes.shape[2]
  group_size = k_residual.shape[1]
  slots = jnp.arange(max_len)
  complete = (lengths // group_size) * group_size  # slots below this are in complete (quantized) groups
  keys = _common.key_values(k_codes, k_scale, k_zero, bits)[:, :max_len]
  open_row = jnp.clip(slots[None, :] - complete[:, None], 0, group_size - 1)  # [B, S] residual row of a slot
  residual_keys = jnp.take_along_axis(k_residual.astype(jnp.float32), open_row[:, :, None, None], axis=1)
  keys = jnp.where((slots[None, :] >= complete[:, None])[:, :, None, None], residual_keys, keys)
  values = _common.value_values(v_codes, v_scale, v_zero, bits)
  valid = slots[None, :] < lengths[:, None]  # [B, S]
  values = jnp.where(valid[:, :, None, None], values, 0.0)  # stale slots may hold anything (0 * NaN)
  qg = _common.grouped(q.astype(jnp.float32), num_kv_heads)
  logits = jnp.einsum("bkgd,bskd->bkgs", qg, keys) * scale
  logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf).reshape(batch, num_heads, max_len)
  any_key = valid.any(axis=1)[:, None, None]
  probs = jnp.where(any_key, jax.nn.softmax(jnp.where(any_key, logits, 0.0), axis=-1), 0.0)
  probs = jnp.where(valid[:, None, :], probs, 0.0)  # a length-0 row gives zeros, not NaN
  out = jnp.einsum("bkgs,bskd->bkgd", probs.reshape(batch, num_kv_heads, -1, max_len), values)
  out = out.reshape(batch, num_heads, head_dim).astype(q.dtype)
  if not return_key_logits:
    return out
  lse = jax.nn.logsumexp(logits, axis=-1)
  lse = jnp.where(any_key[:, :, 0], lse, jnp.inf)
  return out, logits, lse
