"""Mosaic-TPU block-sparse matmul kernels that visit only the stored blocks (scalar-prefetched block tables).

`bsr_matmul_2d`: out[:, j] = sum_t x[:, coord[id]] @ values[id] over id = slots[j, t], t < counts[j]. The grid
is (M blocks, output column blocks, Tc) with the block tables in SMEM (`PrefetchScalarGridSpec`); the index maps
read them to DMA exactly the x tile and the value block a step needs. Padding steps (t >= counts[j]) repeat the
previous block index, so the pipeline issues no copy, and `pl.when` skips their product. The same kernel gives
dx = dy @ W.T with the transposed table and XLA-transposed values.

`bsr_weight_grad`: dvalues[b] = x[:, rows of block b].T @ dy[:, columns of block b], grid (stored blocks, M
blocks) with M the reduction, so the gradient exists (and costs work) only for stored blocks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _util

DEFAULT_BLOCK_M = 128       # rows of x per output tile (forward and dx)
DEFAULT_GRAD_BLOCK_M = 512  # rows reduced per step of the weight gradient (a lane dim of x.T: 128-aligned)


def check_block_shape(shape, block_shape) -> None:
  """Mosaic tiles a block's last two dims by (8, 128): bk and bn are lane dims of the x / out tiles."""
  for axis, (dim, block) in enumerate(zip(shape, block_shape)):
    if block % 128 and block != dim:
      raise ValueError(f"block_shape[{axis}]={block} is illegal for the TPU kernel: it must be a multiple of 128 "
                       f"(Mosaic tiles blocks by (8, 128)) or the whole dimension ({dim}).")


def resolve_block_m(m: int, block_m=None) -> int:
  return _util.tpu_block("block_m", block_m, m, default=DEFAULT_BLOCK_M, align=8)


def _kernel(counts_ref, slots_ref, coord_ref, x_ref, v_ref, out_ref, acc_ref):
  del coord_ref  # read by the index maps only
  j, t = pl.program_id(1), pl.program_id(2)

  @pl.when(t == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(t < counts_ref[j])
  def _accumulate():
    acc_ref[...] += jnp.dot(x_ref[...], v_ref[...], preferred_element_type=jnp.float32)

  @pl.when(t == pl.num_programs(2) - 1)
  def _finish():  # an output column block with no stored blocks is written as zeros
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def bsr_matmul_2d(x, values, counts, slots, coord, *, block_m=None, out_dtype, interpret=False, cost_estimate=None):
  """`x [M, K] @ W` -> [M, N] for W given as `values` [nnz, bk, bn] and a per-output-column-block table.

  counts [Nb], slots [Nb, Tc] (ids into values), coord [nnz] (the K-block index of each id). Rows of x are
  zero-padded to whole `block_m` tiles.
  """
  m, k = x.shape
  _, bk, bn = values.shape
  nb, width = slots.shape
  check_block_shape((k, nb * bn), (bk, bn))
  block_m = resolve_block_m(m, block_m)
  padded_m = _util.round_up(m, block_m)
  flat_slots = slots.reshape(-1)  # 1-D: SMEM pads 2-D arrays' last dim

  def x_map(i, j, t, counts, slots, coord):
    return i, coord[slots[j * width + t]]

  def v_map(i, j, t, counts, slots, coord):
    return slots[j * width + t], 0, 0

  out = pl.pallas_call(
      _kernel,
      out_shape=jax.ShapeDtypeStruct((padded_m, nb * bn), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(padded_m // block_m, nb, width),
          in_specs=[pl.BlockSpec((block_m, bk), x_map), pl.BlockSpec((None, bk, bn), v_map)],
          out_specs=pl.BlockSpec((block_m, bn), lambda i, j, t, *_: (i, j)),
          scratch_shapes=[pltpu.VMEM((block_m, bn), jnp.float32)]),
      # The table axis carries the accumulator; M and column blocks are independent.
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="block_sparse_matmul",
  )(counts, flat_slots, coord, _util.pad_to(x, (padded_m, k)), values)
  return out[:m]


def _grad_kernel(rows_ref, cols_ref, xt_ref, dy_ref, out_ref, acc_ref):
  del rows_ref, cols_ref
  step = pl.program_id(1)

  @pl.when(step == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += jnp.dot(xt_ref[...], dy_ref[...], preferred_element_type=jnp.float32)

  @pl.when(step == pl.num_programs(1) - 1)
  def _finish():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def bsr_weight_grad(x, dy, block_row, block_col, block_shape, *, out_dtype, block_m=None, interpret=False):
  """dvalues [nnz, bk, bn] with dvalues[b] = x[:, K block row[b]].T @ dy[:, N block col[b]]."""
  (m, k), n = x.shape, dy.shape[1]
  bk, bn = block_shape
  check_block_shape((k, n), (bk, bn))
  nnz = block_row.shape[0]
  # M is a lane dim of x.T (128-aligned) and a sublane dim of dy; zero rows add nothing to the sums.
  block_m = _util.tpu_block("block_m", block_m, m, default=DEFAULT_GRAD_BLOCK_M, align=128)
  padded_m = _util.round_up(m, block_m)
  xt = _util.pad_to(x, (padded_m, k)).T  # XLA materialises the transpose, as the dense matmul's backward does
  return pl.pallas_call(
      _grad_kernel,
      out_shape=jax.ShapeDtypeStruct((nnz, bk, bn), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(nnz, padded_m // block_m),
          in_specs=[pl.BlockSpec((bk, block_m), lambda b, i, rows, cols: (rows[b], i)),
                    pl.BlockSpec((block_m, bn), lambda b, i, rows, cols: (i, cols[b]))],
          out_specs=pl.BlockSpec((None, bk, bn), lambda b, i, rows, cols: (b, 0, 0)),
          scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_matmul_weight_grad",
  )(block_row, block_col, xt, _util.pad_to(dy, (padded_m, n)))

