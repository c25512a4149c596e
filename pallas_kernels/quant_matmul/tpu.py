"""Mosaic-TPU weight-only quantized matmul: packed weights are unpacked and decoded inside the VMEM tile.

Grid (N blocks, M blocks), N outermost: a weight tile's block index depends only on the N step, so the pipeline
fetches every packed weight byte exactly once (at decode, M is one block and x is fetched once too). For prefill,
when re-reading the weights once per M block moves fewer bytes than re-reading x once per N block, the grid is
(M blocks, N blocks) instead (`weights_outer`). Each tile
spans the whole K: the planar layout (see `packing`) puts rows i and i + K/2 in one byte, so a K-block of
packed rows is not a contiguous K range -- whole-K tiles keep the unpack to two shift/mask ops and one aligned
sublane concatenation.

When groups are whole 128-lane runs of K (per channel, g128), group scales are applied to partial sums
(MixPE): x is cut into groups x_g [G, bm, K/G] by aligned lane slices, the decoded tile is viewed as
[G, K/G, bn] (a sublane split); one batched dot gives p_g = x_g . q_g in f32 and out = sum_g s_g * p_g --
exact, because the scale is constant within a group -- or, with zero points,
out = sum_g s_g * (p_g - z_g * rowsum(x_g)), also exact. So the per-element work on the [K, bn] tile is only
the unpack/decode and a cast; scales touch [G, bm, bn] values instead of [K, bn].
Narrower groups (g64 at K = 576 or 1536) would need x split inside a 128-lane vreg or copied to group-major
order by XLA (an extra read + write of x in HBM, 18% over the ideal bytes at decode with K = 1536); instead the
decoded tile itself is scaled per group in VMEM ([G, K/G, bn] sublane view, (q - z) * s) and x [bm, K] meets
it in one dot: one more multiply per weight element on the VPU, no HBM traffic beyond the ideal.

VMEM: the decode temporaries are ~14 bytes per weight element of the tile (int32 codes, f32 values, the operand
cast), e.g. ~8 MiB at K = 576, bn = 512 and ~12 MiB at K = 1536, bn = 576 (the down projection's whole-N
tile). `jax.export` cannot check VMEM use; pass a smaller block_n for wider K.
NF4 with double quantization rebuilds the tile's absmax in-kernel from int8 codes and the per-256-column
second-level scales (a select chain over the few 256-column blocks picks each tile's scales: no gather, no
lane-dynamic indexing), so HBM only ever carries the 8-bit constants.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _util
from pallas_kernels.quant_matmul import reference

DEFAULT_BLOCK_M = 256   # rows of x per tile; decode batches (M <= 256) are one block, so weights stream once
DEFAULT_BLOCK_N = 512   # wide N tiles: fewer grid steps; a [576, 512] int4 tile is 144 KiB packed, 1.2 MiB decoded
_N_CANDIDATES = (512, 384, 256, 128)  # default block_n: the widest of these that divides N (no weight padding)
_MAX_WHOLE_N = 1024


def resolve_blocks(m: int, k: int, n: int, fmt: str, *, groups: int = 1, double_quant: bool = False,
                   block_m=None, block_n=None) -> tuple[int, int]:
  """(block_m, block_n) for x [m, k] @ w [k, n], checked against Mosaic's (8, 128) tiling and the layout."""
  if reference.BITS[fmt] < 8 and (k // 2) % 8:
    raise ValueError(f"x.shape[-1]={k} is illegal for the TPU kernel with fmt={fmt!r}: K/2 must be a multiple "
                     f"of 8 (the two nibble planes are joined along sublanes).")
  if groups > 1 and (k // groups) % 8:
    raise ValueError(f"group size {k // groups} (K={k} / {groups} scale rows) is illegal for the TPU kernel: "
                     f"it must be a multiple of 8 (a group is a run of sublanes).")
  block_m = _util.tpu_block("block_m", block_m, m, default=DEFAULT_BLOCK_M, align=8)
  if block_n is None:
    fits = [c for c in _N_CANDIDATES if n % c == 0 and (not double_quant or c % 256 == 0 or 256 % c == 0)]
    # No candidate divides N (e.g. 576): one whole-N tile, if it stays VMEM-sized, rather than padding weights.
    block_n = fits[0] if fits else (n if n <= _MAX_WHOLE_N else DEFAULT_BLOCK_N)
  block_n = _util.tpu_block("block_n", block_n, n, default=DEFAULT_BLOCK_N, align=128)
  if double_quant and block_n < n and block_n % 256 and 256 % block_n:
    raise ValueError(f"block_n={block_n} is illegal for the TPU kernel with double-quantized NF4 scales: it must "
                     f"be a multiple or a divisor of 256 (the columns per second-level scale), or cover N={n}.")
  return block_m, block_n


def weights_outer(m_blocks: int, n_blocks: int, weight_bytes: int, x_bytes: int) -> bool:
  """Whether N is the outer grid axis: weights fetched once and x once per N block (once if one M block), or
  the reverse -- whichever moves fewer bytes (N outer on ties, e.g. every decode shape)."""
  n_outer = weight_bytes + x_bytes * (n_blocks if m_blocks > 1 else 1)
  m_outer = x_bytes + weight_bytes * (m_blocks if n_blocks > 1 else 1)
  return n_outer <= m_outer


def _tile_absmax(codes, dq_ref, offset_ref, *, block_n: int, n_axis: int):
  """f32 absmax [G, bn] of this N tile from int8 codes, second-level scales [G, NB] (all NB) and the offset."""
  first = pl.program_id(n_axis) * block_n
  num_blocks = dq_ref.shape[1]
  segments, start = [], 0
  while start < block_n:  # the tile's 256-column segments (one when bn divides 256)
    width = min(block_n - start, reference.DOUBLE_QUANT_BLOCK - start % reference.DOUBLE_QUANT_BLOCK)
    index = lax.div(first + start, reference.DOUBLE_QUANT_BLOCK)  # non-negative: no floor_divide sign fix-up
    column = dq_ref[:, 0:1]
    for b in range(1, num_blocks):  # select, not gather: Mosaic has no lane-dynamic indexing
      column = jnp.where(index == b, dq_ref[:, b:b + 1], column)
    segments.append(jnp.broadcast_to(column, (column.shape[0], width)))
    start += width
  dq = segments[0] if len(segments) == 1 else jnp.concatenate(segments, axis=1)
  return codes.astype(jnp.float32) * dq + offset_ref[...]


def _kernel(x_ref, w_ref, scale_ref, *refs, fmt: str, has_zero: bool, double_quant: bool, block_n: int,
            n_axis: int):
  zero_ref = refs[0] if has_zero else None
  dq_ref, offset_ref = refs[has_zero:has_zero + 2] if double_quant else (None, None)
  out_ref = refs[-1]
  groups = scale_ref.shape[0]
  k = x_ref.shape[1]
  group = k // groups
  if double_quant:
    scale = _tile_absmax(scale_ref[...], dq_ref, offset_ref, block_n=block_n, n_axis=n_axis)
  else:
    scale = scale_ref[...].astype(jnp.float32)                                          # [G, bn]
  zero = None if zero_ref is None else zero_ref[...].astype(jnp.float32)[:, None, :]    # [G, 1, bn]
  # Decode the whole-K tile: unpack (shifts/masks), offset or look up; f32 sublane split (group % 8 == 0).
  values = reference.weight_values(w_ref[...], fmt, zero_ref)
  values = values.reshape(groups, group, values.shape[-1])
  if not scales_partial_sums(k, groups):  # groups inside a vreg's 128 lanes: scale the tile, one dot
    values = (values if zero is None else values - zero) * scale[:, None, :]
    out_ref[...] = jnp.dot(x_ref[...], values.reshape(k, -1).astype(x_ref.dtype),
                           preferred_element_type=jnp.float32).astype(out_ref.dtype)
    return
  x = jnp.stack([x_ref[:, g * group:(g + 1) * group] for g in range(groups)])  # aligned lane slices
  partial = jnp.einsum("gmk,gkn->gmn", x, values.astype(x.dtype), preferred_element_type=jnp.float32)
  if zero is not None:
    partial = partial - zero * jnp.sum(x.astype(jnp.float32), axis=2, keepdims=True)  # z_g * rowsum(x_g)
  out_ref[...] = jnp.sum(partial * scale[:, None, :], axis=0).astype(out_ref.dtype)


def scales_partial_sums(k: int, groups: int) -> bool:
  """Whether the kernel scales partial sums per group (groups are whole 128-lane runs, or one group) rather
  than the decoded weight tile."""
  return groups == 1 or (k // groups) % 128 == 0


def quant_matmul_2d(x, w, scale, zero_point=None, scale_scale=None, scale_offset=None, *, fmt: str,
                    blocks=(None, None), out_dtype, interpret=False, cost_estimate=None):
  """x [M, K] @ dequant(w) -> [M, N] in `out_dtype`; M and N are zero-padded to whole blocks."""
  (m, k), n = x.shape, w.shape[1]
  groups = scale.shape[0]
  double_quant = scale_scale is not None
  block_m, block_n = resolve_blocks(m, k, n, fmt, groups=groups, double_quant=double_quant,
                                    block_m=blocks[0], block_n=blocks[1])
  padded_m, padded_n = _util.round_up(m, block_m), _util.round_up(n, block_n)
  m_blocks, n_blocks = padded_m // block_m, padded_n // block_n
  weight_bytes = sum(a.dtype.itemsize * a.shape[0] * padded_n for a in (w, scale, zero_point) if a is not None)
  n_outer = weights_outer(m_blocks, n_blocks, weight_bytes, padded_m * k * x.dtype.itemsize)
  tile = (lambda a, b: (b, a)) if n_outer else (lambda a, b: (a, b))  # grid step -> (M tile i, N tile j)
  column = lambda rows: pl.BlockSpec((rows, block_n), lambda a, b: (0, tile(a, b)[1]))  # whole rows, N tile
  operands = [_util.pad_to(x, (padded_m, k)), _util.pad_to(w, (w.shape[0], padded_n)), _util.pad_to(scale, (groups, padded_n))]
  in_specs = [pl.BlockSpec((block_m, k), lambda a, b: (tile(a, b)[0], 0)), column(w.shape[0]), column(groups)]
  if zero_point is not None:
    operands.append(_util.pad_to(zero_point, (groups, padded_n)))
    in_specs.append(column(groups))
  if double_quant:
    # Tiny arrays, whole-array blocks with a constant index: fetched once for the whole grid.
    operands += [scale_scale.astype(jnp.float32), jnp.reshape(scale_offset, (1, 1)).astype(jnp.float32)]
    in_specs += [pl.BlockSpec(scale_scale.shape, lambda a, b: (0, 0)), pl.BlockSpec((1, 1), lambda a, b: (0, 0))]
  out = pl.pallas_call(
      functools.partial(_kernel, fmt=fmt, has_zero=zero_point is not None, double_quant=double_quant,
                        block_n=block_n, n_axis=0 if n_outer else 1),
      out_shape=jax.ShapeDtypeStruct((padded_m, padded_n), out_dtype),
      grid=(n_blocks, m_blocks) if n_outer else (m_blocks, n_blocks),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((block_m, block_n), tile),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name=f"quant_matmul_{fmt}",
  )(*operands)
  return out[:m, :n]
