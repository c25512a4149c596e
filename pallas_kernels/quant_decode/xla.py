"""quant_decode on XLA: a `lax.while_loop` over chunks of `block_groups` complete groups with an online softmax,
each chunk dequantized on its own (never the whole cache), stopping after the longest sequence's last complete
group; then the open group from the float residual (`_common.residual_partial`).

Chunks start at c * block_groups, clamped so the last one ends at the last group that can be complete
(S // G): the cache is sliced in place, never padded, and the groups a clamped chunk shares with the previous
one are masked out (each group counts once)."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.quant_decode import _common

# Slots dequantized per loop step: f32 temporaries of about chunk * H_kv * D * 8 bytes (K and V), while each step's
# fixed cost (slicing, the online-softmax update) is amortized over many slots.
DEFAULT_CHUNK_TOKENS = 512  # measured on this CPU: faster per step than 2048 (fewer, larger temporaries)


def resolve_block_groups(num_full_groups: int, group_size: int, block_groups=None) -> int:
  block = block_groups or max(1, DEFAULT_CHUNK_TOKENS // group_size)
  return max(1, min(block, num_full_groups))


def quant_decode(q, k_codes, k_scale, k_zero, k_residual, v_codes, v_scale, v_zero, lengths, *, bits, scale,
                 block_groups=None, return_key_logits=False):
  batch, num_heads, head_dim = q.shape
  max_len, num_kv_heads = v_codes.shape[1], v_codes.shape[2]
  group_size = k_residual.shape[1]
  full_groups = max_len // group_size  # groups that can ever be complete
  residual = _common.residual_partial(q, k_residual, v_codes, v_scale, v_zero, lengths, bits=bits, scale=scale)
  key_logits = jnp.full((batch, num_heads, max_len), -jnp.inf, jnp.float32) if return_key_logits else None
  if full_groups == 0:
    return _common.with_residual(q, None, residual, return_key_logits, key_logits)
  block = resolve_block_groups(full_groups, group_size, block_groups)
  chunk_len = block * group_size
  complete_groups = lengths // group_size  # [B]
  qg = _common.grouped(q, num_kv_heads)
  group = num_heads // num_kv_heads

  def body(carry):
    c, m, l, acc, logits_buf = carry
    first = jnp.minimum(c * block, full_groups - block)  # clamped: never read past the cache
    take_groups = lambda x: lax.dynamic_slice_in_dim(x, first, block, axis=1)
    take_slots = lambda x: lax.dynamic_slice_in_dim(x, first * group_size, chunk_len, axis=1)
    group_index = first + jnp.arange(block)
    fresh = (group_index >= c * block)[None, :] & (group_index[None, :] < complete_groups[:, None])  # [B, block]
    valid = jnp.repeat(fresh, group_size, axis=1)  # [B, chunk_len]
    # int4 keys stay in their nibble planes (slots i and i + G/2 of each group) and values in theirs (dims d and
    # d + D/2): logits and outputs are computed per plane and joined, never the dequantized chunk itself.
    k_scale_c, k_zero_c = take_groups(k_scale), take_groups(k_zero).astype(jnp.int32)
    s = [jnp.einsum("bkgd,bnjkd->bkgnj", qg, ((plane - k_zero_c) * k_scale_c).astype(q.dtype),
                    preferred_element_type=jnp.float32) for plane in _common.code_planes(take_groups(k_codes), bits)]
    s = jnp.concatenate(s, axis=-1).reshape(batch, num_kv_heads, group, chunk_len) * scale
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    c_m = jnp.maximum(jnp.max(s, axis=-1), _common.MASK_VALUE)  # finite even when nothing is valid
    p = jnp.exp(s - c_m[..., None])
    # Stale slots may hold anything: a zero scale makes their values exactly 0 (codes and zeros are integers).
    v_scale_c = jnp.where(valid[:, :, None, None], take_slots(v_scale), 0.0)
    v_zero_c = take_slots(v_zero).astype(jnp.int32)
    c_acc = jnp.concatenate(
        [jnp.einsum("bkgn,bnkd->bkgd", p.astype(q.dtype), ((plane - v_zero_c) * v_scale_c).astype(q.dtype),
                    preferred_element_type=jnp.float32) for plane in _common.code_planes(take_slots(v_codes), bits)],
        axis=-1)
    c_l = jnp.sum(p, axis=-1)
    m_next = jnp.maximum(m, c_m)
    old, new = jnp.exp(m - m_next), jnp.exp(c_m - m_next)
    acc = acc * old[..., None] + c_acc * new[..., None]
    l = l * old + c_l * new
    if logits_buf is not None:
      masked = s.reshape(batch, num_heads, chunk_len)  # -inf already where not valid
      seen = lax.dynamic_slice_in_dim(logits_buf, first * group_size, chunk_len, axis=2)
      logits_buf = lax.dynamic_update_slice_in_dim(logits_buf, jnp.maximum(seen, masked), first * group_size,
                                                   axis=2)
    return c + 1, m_next, l, acc, logits_buf

  num_chunks = -(-jnp.max(complete_groups) // block)  # stop after the longest sequence's last complete group
  stats = jnp.full((batch, num_kv_heads, group), _common.MASK_VALUE, jnp.float32)
  init = (jnp.int32(0), stats, jnp.zeros_like(stats), jnp.zeros((batch, num_kv_heads, group, head_dim), jnp.float32),
          key_logits)
  _, m, l, acc, key_logits = lax.while_loop(lambda carry: carry[0] < num_chunks, body, init)
  parts = (acc.reshape(batch, 1, num_heads, head_dim), m.reshape(batch, 1, num_heads), l.reshape(batch, 1, num_heads))
  return _common.with_residual(q, parts, residual, return_key_logits, key_logits)
