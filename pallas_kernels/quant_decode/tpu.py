"""Mosaic-TPU quant_decode: lengths are scalar-prefetched into SMEM and drive the BlockSpec index maps, so each
grid step DMAs one block of `block_groups` complete groups -- K codes/scales/zeros and V codes/scales/zeros --
and dequantizes it in VMEM; the open group is merged outside (`_common.residual_partial`).

Layout (all free reshapes of the cache's arrays, every kv head in one block, as in `flash_decode`):
  K codes [B, n, G*bits/8, H_kv*D]  block (bg, G*bits/8, H_kv*D): int4 bytes split into their two nibble
        planes, slots i and i + G/2 of each group (`packing`'s planar layout); dequantized with the per-channel
        scales/zeros [bg, 1, H_kv*D] (lane-aligned already) and rejoined in slot order along sublanes.
  V codes [B, S, H_kv*Dp]           block (bg*G, H_kv*Dp): int4 bytes hold dims d and d + D/2 of a head, so the
        two nibble planes are two half-width heads (never moved across lanes): q.k is whole, p @ v is computed
        per plane and the planes' outputs are written side by side. Per-token scales/zeros [bg*G, H_kv] are
        broadcast over each head's lanes with H_kv selects.
q is block-diagonal, q_bd [H, H_kv*D] with row h non-zero only in kv head h // group's lanes: q_bd @ keys.T gives
every query head its logits, p @ v_plane gives [H, H_kv*w] whose diagonal blocks are the outputs (GQA without
repeating K/V, H_kv-fold redundant FLOPs; decode is bound by reading the cache).

Grid (B, splits, steps): split s covers blocks [s * steps, (s + 1) * steps). Index maps clamp the block to the
sequence's last block holding a complete group: steps past it map to the block already resident, so the
pipeline fetches nothing for them (and `pl.when` skips their compute).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import _common as flash_common
from pallas_kernels.quant_decode import _common

LANES = flash_common.LANES
TOKENS_PER_STEP = 512  # default block: about this many slots per grid step
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def check_shapes(head_dim: int, group_size: int, bits: int) -> None:
  """Blocks span whole minor dimensions, so any D works; int4 keys rejoin nibble planes of G/2 rows along sublanes
  and a block of V codes (bg * G uint8 rows) must fill Mosaic's 32-row byte tile."""
  del head_dim
  if group_size % 32:
    raise ValueError(f"group_size={group_size} (k_residual.shape[1]) does not fit the TPU kernel: it must be a "
                     f"multiple of 32 (Mosaic tiles uint8 rows by 32; int4 nibble planes hold G/2 rows).")


def _kernel(lengths_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, *refs, bits, scale, group_size,
            blocks_per_split, num_blocks, block_groups):
  planes = 2 if bits == 4 else 1
  acc_outs, m_out, l_out = refs[:planes], refs[planes], refs[planes + 1]
  acc_refs, m_ref, l_ref = refs[planes + 2:2 * planes + 2], refs[2 * planes + 2], refs[2 * planes + 3]
  b, split, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  block = split * blocks_per_split + t
  rows = block_groups * group_size
  start = block * rows
  complete = lax.div(lengths_ref[b], group_size) * group_size  # slots of complete groups

  @pl.when(t == 0)
  def _init():
    m_ref[...] = jnp.full_like(m_ref, _common.MASK_VALUE)
    l_ref[...] = jnp.zeros_like(l_ref)
    for acc in acc_refs:
      acc[...] = jnp.zeros_like(acc)

  @pl.when((start < complete) & (block < num_blocks))
  def _compute():
    dtype = q_ref.dtype
    k_scale, k_zero = ks_ref[...], kz_ref[...].astype(jnp.int32)  # [bg, 1, lanes]
    keys = [((p - k_zero).astype(jnp.float32) * k_scale) for p in _common.code_planes(kc_ref[...], bits)]
    keys = jnp.concatenate(keys, axis=1) if planes == 2 else keys[0]  # [bg, G, lanes] in slot order
    keys = keys.reshape(rows, keys.shape[-1]).astype(dtype)
    s = lax.dot_general(q_ref[...], keys, _NT, preferred_element_type=jnp.float32) * scale  # [H, rows]
    s = jnp.where(start + lax.broadcasted_iota(jnp.int32, s.shape, 1) < complete, s, -jnp.inf)
    p, alpha = flash_common.online_softmax_update(s, m_ref, l_ref)
    codes = vc_ref[...]
    width = codes.shape[1] // vs_ref.shape[1]
    v_scale, v_zero = flash_common.over_lanes(vs_ref[...], width), flash_common.over_lanes(vz_ref[...], width)
    row_ok = start + lax.broadcasted_iota(jnp.int32, (rows, codes.shape[1]), 0) < complete
    for acc, plane in zip(acc_refs, _common.code_planes(codes, bits)):
      # Slots past the last complete group may hold anything (stale cache): zero them, as 0 * NaN = NaN.
      v = jnp.where(row_ok, (plane.astype(jnp.float32) - v_zero) * v_scale, 0.0).astype(dtype)
      acc[...] = acc[...] * alpha[:, :1] + jnp.dot(p.astype(dtype), v, preferred_element_type=jnp.float32)

  @pl.when(t == pl.num_programs(2) - 1)
  def _finish():
    for out, acc in zip(acc_outs, acc_refs):
      out[...] = acc[...]
    m_out[...], l_out[...] = m_ref[...], l_ref[...]


def decode(q, k_codes, k_scale, k_zero, k_residual, v_codes, v_scale, v_zero, lengths, *, bits, scale, block_groups,
           num_splits, interpret=False, cost_estimate=None):
  """Complete groups' partials -> (acc [B, splits, H, D] unnormalised f32, m, l [B, splits, H])."""
  del k_residual  # the open group is merged by the caller
  batch, num_heads, head_dim = q.shape
  max_len, num_kv_heads = v_codes.shape[1], v_codes.shape[2]
  num_groups, packed_group = k_codes.shape[1], k_codes.shape[2]
  group_size = packed_group * 8 // bits
  planes = 2 if bits == 4 else 1
  lanes = num_kv_heads * head_dim
  plane_lanes = lanes // planes
  num_blocks = (max_len // group_size) // block_groups
  blocks_per_split = -(-num_blocks // num_splits)
  rows = block_groups * group_size
  q_bd = flash_common.block_diagonal(q, num_kv_heads)

  def block_index(b, split, t, lengths_ref):
    last_group = jnp.maximum(lax.div(lengths_ref[b], group_size) - 1, 0)
    last = lax.div(last_group, block_groups)  # clamp: blocks past the last complete group are not fetched
    return jnp.minimum(jnp.minimum(split * blocks_per_split + t, last), num_blocks - 1)

  k_spec = lambda last: pl.BlockSpec((None, block_groups, last, lanes),
                                     lambda b, s, t, ref: (b, block_index(b, s, t, ref), 0, 0))
  v_spec = lambda last: pl.BlockSpec((None, rows, last), lambda b, s, t, ref: (b, block_index(b, s, t, ref), 0))
  out_shape, out_specs, scratch_shapes = flash_common.split_partials_tpu(batch, num_splits, num_heads, plane_lanes,
                                                                         planes)
  outs = pl.pallas_call(
      functools.partial(_kernel, bits=bits, scale=scale, group_size=group_size, blocks_per_split=blocks_per_split,
                        num_blocks=num_blocks, block_groups=block_groups),
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,  # lengths in SMEM, read by the index maps and the kernel
          grid=(batch, num_splits, blocks_per_split),
          in_specs=[pl.BlockSpec((None, num_heads, lanes), lambda b, s, t, ref: (b, 0, 0)),
                    k_spec(packed_group), k_spec(1), k_spec(1),
                    v_spec(v_codes.shape[2] * v_codes.shape[3]), v_spec(num_kv_heads), v_spec(num_kv_heads)],
          out_specs=out_specs, scratch_shapes=scratch_shapes),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="quant_decode",
  )(lengths, q_bd, k_codes.reshape(batch, num_groups, packed_group, lanes),
    k_scale.reshape(batch, num_groups, 1, lanes), k_zero.reshape(batch, num_groups, 1, lanes),
    v_codes.reshape(batch, max_len, -1), v_scale.reshape(batch, max_len, num_kv_heads),
    v_zero.reshape(batch, max_len, num_kv_heads))
  accs, m, l = outs[:planes], outs[planes][..., 0], outs[planes + 1][..., 0]
  diagonal = [flash_common.diagonal_blocks(acc, num_kv_heads) for acc in accs]  # [B, splits, H, w] each
  acc = jnp.concatenate(diagonal, axis=-1)
  return acc, m, l
