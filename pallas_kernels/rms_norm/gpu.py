"""Triton-style GPU RMSNorm: a 1-D grid over row blocks; the feature axis is loaded whole, masked up to a power
of two (Triton's `tl.arange` needs one), so D = 576 costs no padding in HBM."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util
from pallas_kernels.rms_norm import reference

DEFAULT_BLOCK_ROWS = 8  # rows per program: 8 x 1024 (D = 576 masked up) f32 values stay in registers
_TRITON = pltriton.CompilerParams(num_warps=4)  # selects Triton over Mosaic GPU


def resolve_block_rows(rows: int, block_rows=None) -> int:
  return _util.gpu_block("block_rows", block_rows, rows, default=DEFAULT_BLOCK_ROWS)


def _tile(block_rows, feature_dim):
  """(index, mask) of a [block_rows, next_power_of_2(D)] tile and (index, mask) of one weight row; the
  columns beyond D are masked off (loaded as 0, never stored)."""
  cols = jnp.arange(_util.next_power_of_2(feature_dim))
  rows = jnp.arange(block_rows)
  col_mask = cols < feature_dim
  tile_mask = jnp.broadcast_to(col_mask[None, :], (block_rows, cols.size))
  return (rows[:, None], cols[None, :]), tile_mask, cols, col_mask


def _load_f32(ref, index, mask):
  return pltriton.load(ref.at[index], mask=mask, other=0.0).astype(jnp.float32)


def _forward_kernel(x_ref, weight_ref, y_ref, *, eps, feature_dim):
  tile, tile_mask, cols, col_mask = _tile(x_ref.shape[0], feature_dim)
  x = _load_f32(x_ref, tile, tile_mask)
  weight = _load_f32(weight_ref, cols, col_mask)[None, :]
  y = reference.normalize_rows(x, weight, eps=eps, feature_dim=feature_dim)
  pltriton.store(y_ref.at[tile], y.astype(y_ref.dtype), mask=tile_mask)


def _backward_kernel(x_ref, weight_ref, dy_ref, dx_ref, dweight_ref, *, eps, feature_dim):
  tile, tile_mask, cols, col_mask = _tile(x_ref.shape[0], feature_dim)
  dx, dweight = reference.backward_rows(
      _load_f32(x_ref, tile, tile_mask), _load_f32(weight_ref, cols, col_mask)[None, :],
      _load_f32(dy_ref, tile, tile_mask), eps=eps, feature_dim=feature_dim)
  pltriton.store(dx_ref.at[tile], dx.astype(dx_ref.dtype), mask=tile_mask)
  pltriton.store(dweight_ref.at[cols], dweight[0], mask=col_mask)  # this block's partial sum


def forward(x, weight, *, eps, block_rows=None, interpret=False, cost_estimate=None):
  """RMSNorm of x [R, D] (rows padded to whole blocks) -> [R, D] in x.dtype."""
  rows, d = x.shape
  block_rows = resolve_block_rows(rows, block_rows)
  padded_rows = _util.round_up(rows, block_rows)
  y = pl.pallas_call(
      functools.partial(_forward_kernel, eps=eps, feature_dim=d),
      out_shape=jax.ShapeDtypeStruct((padded_rows, d), x.dtype),
      grid=(padded_rows // block_rows,),
      in_specs=[pl.BlockSpec((block_rows, d), lambda i: (i, 0)), pl.BlockSpec((d,), lambda i: (0,))],
      out_specs=pl.BlockSpec((block_rows, d), lambda i: (i, 0)),
      compiler_params=_TRITON,
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="rms_norm_forward",
  )(_util.pad_to(x, (padded_rows, d)), weight)
  return y[:rows]


def backward(x, weight, dy, *, eps, block_rows=None, interpret=False):
  """(dx [R, D] in x.dtype, per-block partial dweight [blocks, D] in f32) for the RMSNorm of x [R, D]."""
  rows, d = x.shape
  block_rows = resolve_block_rows(rows, block_rows)
  padded_rows = _util.round_up(rows, block_rows)
  num_blocks = padded_rows // block_rows
  row_spec = pl.BlockSpec((block_rows, d), lambda i: (i, 0))
  dx, dweight_partials = pl.pallas_call(
      functools.partial(_backward_kernel, eps=eps, feature_dim=d),
      out_shape=(jax.ShapeDtypeStruct((padded_rows, d), x.dtype),
                 jax.ShapeDtypeStruct((num_blocks, d), jnp.float32)),
      grid=(num_blocks,),
      in_specs=[row_spec, pl.BlockSpec((d,), lambda i: (0,)), row_spec],
      out_specs=(row_spec, pl.BlockSpec((None, d), lambda i: (i, 0))),
      compiler_params=_TRITON,
      interpret=interpret,
      name="rms_norm_backward",
  )(_util.pad_to(x, (padded_rows, d)), weight, _util.pad_to(dy, (padded_rows, d)))
  return dx[:rows], dweight_partials
