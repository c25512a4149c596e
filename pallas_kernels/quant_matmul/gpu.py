"""Triton-style GPU weight-only quantized matmul: a 2-D grid over output tiles, each program walking K in chunks.

Each step loads `chunk` packed rows [chunk, bn] once and decodes every nibble plane from them (for int4/NF4
the low nibbles are rows k0.. of the first K/2, the high nibbles rows K/2 + k0..); x arrives split into the
same planes, [planes, M, K/planes] (an XLA reshape/transpose), so each plane is one tl.dot. The chunk is a power
of two dividing both K/planes and the group size, so a chunk never straddles a group and its scale is applied
to the partial sum (MixPE): acc += s_g * (x_c . q_c - z_g * rowsum(x_c)), exact.
NF4's double-quantized absmax is expanded to f32 by XLA before the call (Triton has no cheap lane-repeat);
the TPU kernel decodes it in-kernel, and the cost model describes the TPU kernel.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util, packing
from pallas_kernels.quant_matmul import reference

DEFAULT_BLOCKS = (16, 64)  # (block_m, block_n): decode-sized rows, 64 columns per program
MIN_BLOCK = 16             # tl.dot needs every dimension >= 16
MAX_CHUNK = 64


def resolve_blocks(m: int, k: int, n: int, fmt: str, *, groups: int = 1, block_m=None,
                   block_n=None) -> tuple[int, int, int]:
  """(block_m, block_n, chunk): powers of two >= 16; chunk divides both K/planes and the group size."""
  default_m, default_n = DEFAULT_BLOCKS
  block_m = _util.gpu_block("block_m", block_m, m, default=default_m, minimum=MIN_BLOCK)
  block_n = _util.gpu_block("block_n", block_n, n, default=default_n, minimum=MIN_BLOCK)
  common = math.gcd(k // planes(fmt), k // groups)
  chunk = min(common & -common, MAX_CHUNK)  # the largest power of two dividing both, capped
  if chunk < MIN_BLOCK:
    raise ValueError(f"x.shape[-1]={k} with group size {k // groups} is illegal for the GPU (Triton) kernel: "
                     f"K/{planes(fmt)} and the group size need a common power-of-two factor >= {MIN_BLOCK}.")
  return block_m, block_n, chunk


def planes(fmt: str) -> int:
  return 8 // reference.BITS[fmt]


def _decode(codes, fmt: str, has_zero: bool):
  if fmt == "nf4":
    return packing.lookup(codes, packing.NF4_LEVELS)
  if fmt == "int4" and not has_zero:
    return (codes - 8).astype(jnp.float32)
  return codes.astype(jnp.float32)


def _kernel(x_ref, w_ref, scale_ref, *refs, fmt: str, has_zero: bool, chunk: int, group: int):
  zero_ref = refs[0] if has_zero else None
  out_ref = refs[-1]
  num_planes, _, segment = x_ref.shape
  last_group = scale_ref.shape[0] - 1

  def accumulate(step, acc):
    k0 = pl.multiple_of(step * chunk, chunk)
    codes = w_ref[pl.ds(k0, chunk), :].astype(jnp.int32)  # [chunk, bn]: int8 stays signed, uint8 unsigned
    plane_codes = [codes & 0xF, (codes >> 4) & 0xF] if num_planes == 2 else [codes]
    for p, plane in enumerate(plane_codes):
      x = x_ref[p, :, pl.ds(k0, chunk)]
      part = jnp.dot(x, _decode(plane, fmt, has_zero).astype(x.dtype), preferred_element_type=jnp.float32)
      g = jnp.minimum(lax.div(p * segment + k0, group), last_group)
      if zero_ref is not None:
        rowsum = jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)
        part = part - zero_ref[pl.ds(g, 1), :].astype(jnp.float32) * rowsum
      acc = acc + part * scale_ref[pl.ds(g, 1), :].astype(jnp.float32)
    return acc

  acc = lax.fori_loop(0, segment // chunk, accumulate, jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def quant_matmul_2d(x, w, scale, zero_point=None, scale_scale=None, scale_offset=None, *, fmt: str,
                    blocks=(None, None), out_dtype, interpret=False, cost_estimate=None):
  """x [M, K] @ dequant(w) -> [M, N] in `out_dtype`; M and N are zero-padded to whole blocks."""
  (m, k), n = x.shape, w.shape[1]
  groups = scale.shape[0]
  block_m, block_n, chunk = resolve_blocks(m, k, n, fmt, groups=groups, block_m=blocks[0], block_n=blocks[1])
  padded_m, padded_n = _util.round_up(m, block_m), _util.round_up(n, block_n)
  num_planes = planes(fmt)
  x_planes = _util.pad_to(x, (padded_m, k)).reshape(padded_m, num_planes, k // num_planes).transpose(1, 0, 2)
  scale = reference.group_scales(scale, scale_scale, scale_offset) if scale_scale is not None else scale
  column = lambda rows: pl.BlockSpec((rows, block_n), lambda i, j: (0, j))
  operands = [x_planes, _util.pad_to(w, (w.shape[0], padded_n)), _util.pad_to(scale, (groups, padded_n))]
  in_specs = [pl.BlockSpec((num_planes, block_m, k // num_planes), lambda i, j: (0, i, 0)), column(w.shape[0]),
              column(groups)]
  if zero_point is not None:
    operands.append(_util.pad_to(zero_point, (groups, padded_n)))
    in_specs.append(column(groups))
  out = pl.pallas_call(
      functools.partial(_kernel, fmt=fmt, has_zero=zero_point is not None, chunk=chunk, group=k // groups),
      out_shape=jax.ShapeDtypeStruct((padded_m, padded_n), out_dtype),
      grid=(padded_m // block_m, padded_n // block_n),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),  # selects Triton over Mosaic GPU
      interpret=interpret,
      cost_estimate=cost_estimate,
      name=f"quant_matmul_{fmt}",
  )(*operands)
  return out[:m, :n]
