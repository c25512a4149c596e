"""Triton-style GPU quant_decode: a program per (sequence, kv head, split) walks its share of the sequence's
complete groups in a `fori_loop` whose bound stops at the last complete one (later groups are never read), for
the whole query-head group at once (rows padded to 16 for tl.dot).

Per group the program loads the kv head's K codes [G*bits/8, D] with their per-channel scales/zeros [1, D] and
the group's V codes with per-token scales/zeros, dequantizing in registers. int4 keys stay in their two nibble
planes (slots i and i + G/2 of the group, `packing`'s planar layout): each plane is its own q.k product and its
own slice of V rows. int4 values' nibble planes are dims d and d + D/2: two half-width accumulators, joined in
XLA. Every group the loop visits is complete, so nothing inside it is masked. The splits' partial (acc, max, sum)
are merged in XLA with the open group's.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util
from pallas_kernels.quant_decode import _common

MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
MAX_HEAD_DIM = 256


def check_shapes(head_dim: int, group_size: int, bits: int) -> None:
  planes = 2 if bits == 4 else 1
  for name, size in (("head_dim", head_dim), ("group_size (k_residual.shape[1])", group_size)):
    part = size // planes
    if part < MIN_BLOCK or part & (part - 1) or size > MAX_HEAD_DIM:
      raise ValueError(f"{name}={size} is not supported by the GPU (Triton) quant_decode kernel: {name} / {planes} "
                       f"(one nibble plane, a tl.dot operand) must be a power of two >= {MIN_BLOCK} and {name} <= "
                       f"{MAX_HEAD_DIM}.")


def _kernel(lengths_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, *outs, bits, scale, group_size,
            groups_per_split):
  planes = 2 if bits == 4 else 1
  acc_outs, m_out, l_out = outs[:planes], outs[planes], outs[planes + 1]
  split = pl.program_id(2)
  q = q_ref[...]
  dtype = q.dtype
  plane_rows = group_size // planes

  def step(j, carry):
    m, l, accs = carry
    k_scale, k_zero = ks_ref[j], kz_ref[j].astype(jnp.int32)  # [1, D]
    keys = [((p - k_zero).astype(jnp.float32) * k_scale).astype(dtype) for p in _common.code_planes(kc_ref[j], bits)]
    s = [jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale for k in keys]  # [rows, G / planes] each
    m_next = m
    for s_plane in s:
      m_next = jnp.maximum(m_next, jnp.max(s_plane, axis=1))
    alpha = jnp.exp(m - m_next)
    l_next = alpha * l
    accs = [acc * alpha[:, None] for acc in accs]
    for i, s_plane in enumerate(s):  # key plane i: slots j * G + i * G / planes + [0, G / planes)
      p = jnp.exp(s_plane - m_next[:, None])
      l_next = l_next + jnp.sum(p, axis=1)
      rows = pl.ds(j * group_size + i * plane_rows, plane_rows)
      v_scale, v_zero = vs_ref[rows, :], vz_ref[rows, :].astype(jnp.int32)  # [G / planes, 1]
      # value plane a: dims a * D / planes + [0, D / planes)
      for a, plane in enumerate(_common.code_planes(vc_ref[rows, :], bits)):
        v = ((plane - v_zero).astype(jnp.float32) * v_scale).astype(dtype)
        accs[a] = accs[a] + jnp.dot(p.astype(dtype), v, preferred_element_type=jnp.float32)
    return m_next, l_next, accs

  first = split * groups_per_split
  stop = jnp.minimum(first + groups_per_split, lax.div(lengths_ref[()], group_size))
  rows = q.shape[0]
  init = (jnp.full((rows,), _common.MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
          [jnp.zeros(out.shape, jnp.float32) for out in acc_outs])
  m, l, accs = lax.fori_loop(first, stop, step, init)
  for out, acc in zip(acc_outs, accs):
    out[...] = acc
  m_out[...], l_out[...] = m, l


def decode(q, k_codes, k_scale, k_zero, k_residual, v_codes, v_scale, v_zero, lengths, *, bits, scale, block_groups,
           num_splits, interpret=False, cost_estimate=None):
  """Complete groups' partials -> (acc [B, splits, H, D] unnormalised f32, m, l [B, splits, H])."""
  del k_residual, block_groups  # the open group is merged by the caller; one group per loop step
  batch, num_heads, head_dim = q.shape
  max_len, num_kv_heads = v_codes.shape[1], v_codes.shape[2]
  num_groups, packed_group = k_codes.shape[1], k_codes.shape[2]
  group_size = packed_group * 8 // bits
  group = num_heads // num_kv_heads
  planes = 2 if bits == 4 else 1
  width = head_dim // planes
  rows = max(MIN_BLOCK, _util.next_power_of_2(group))
  groups_per_split = -(-(max_len // group_size) // num_splits)
  q_op = _util.pad_to(q.reshape(batch, num_kv_heads, group, head_dim), (batch, num_kv_heads, rows, head_dim))
  head = lambda *shape: pl.BlockSpec((None, *shape[:-1], None, shape[-1]),
                                     lambda b, hk, s: (b,) + (0,) * (len(shape) - 1) + (hk, 0))
  part = lambda *shape: pl.BlockSpec((None, None, None, *shape), lambda b, hk, s: (b, hk, s) + (0,) * len(shape))
  stats = jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, rows), jnp.float32)
  outs = pl.pallas_call(
      functools.partial(_kernel, bits=bits, scale=scale, group_size=group_size, groups_per_split=groups_per_split),
      out_shape=(*[jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, rows, width), jnp.float32)] * planes,
                 stats, stats),
      grid=(batch, num_kv_heads, num_splits),
      in_specs=[pl.BlockSpec((None,), lambda b, hk, s: (b,)),
                pl.BlockSpec((None, None, rows, head_dim), lambda b, hk, s: (b, hk, 0, 0)),
                head(num_groups, packed_group, head_dim), head(num_groups, 1, head_dim), head(num_groups, 1, head_dim),
                head(max_len, v_codes.shape[3]), head(max_len, 1), head(max_len, 1)],
      out_specs=(*[part(rows, width)] * planes, part(rows), part(rows)),
      compiler_params=pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="quant_decode",
  )(lengths, q_op, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
  accs, m, l = outs[:planes], outs[planes], outs[planes + 1]
  acc = jnp.concatenate(accs, axis=-1)[:, :, :, :group]  # [B, H_kv, splits, group, D]
  acc = acc.transpose(0, 2, 1, 3, 4).reshape(batch, num_splits, num_heads, head_dim)
  stat = lambda x: x[:, :, :, :group].transpose(0, 2, 1, 3).reshape(batch, num_splits, num_heads)
  return acc, stat(m), stat(l)
