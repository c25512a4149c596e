"""Triton-style GPU grouped matmul: each program owns an output tile and loops over the groups it needs.

`grouped_matmul_2d`: grid (row tiles, N tiles). A program loops over the groups whose rows intersect its row
tile (a range computed by XLA from the group offsets; rows are sorted by group, so it is contiguous), multiplies
its lhs tile by that group's weight tile in `tk` steps and keeps the rows of that group. An empty group inside
the range gets a zero trip count; rows past sum(group_sizes) stay zero.

`transposed_grouped_matmul_2d`: grid (G, K tiles, N tiles). A program loops over the row tiles its group spans
(zero of them for an empty group, which then writes zeros), masking rows of neighbouring groups to zero.

Triton has no scalar prefetch: the group offsets are ordinary (tiny) inputs read with scalar loads. Tiles are
powers of two (`tl.arange`) and at least 16 (`tl.dot`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util

DEFAULT_TILING = (64, 64, 128)  # (tm, tk, tn)
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


def resolve_tiling(m: int, k: int, n: int, tiling=None) -> tuple[int, int, int]:
  """(tm, tk, tn): powers of two >= 16, clamped to cover their dimension. None entries take the defaults."""
  requested = (None, None, None) if tiling is None else tiling
  return tuple(_util.gpu_block(f"tiling[{axis}] ({name})", block, dim, default=default, minimum=MIN_BLOCK)
               for axis, (name, block, dim, default) in enumerate(zip(("tm", "tk", "tn"), requested, (m, k, n),
                                                                      DEFAULT_TILING)))


def _row_mask(first_row, start, end, shape):
  rows = first_row + lax.broadcasted_iota(jnp.int32, shape, 0)
  return jnp.logical_and(rows >= start, rows < end)


def _gmm_kernel(offsets_ref, first_group_ref, stop_group_ref, lhs_ref, rhs_ref, out_ref, *, block_k: int):
  i = pl.program_id(0)
  first_row = i * out_ref.shape[0]
  k_steps = lhs_ref.shape[1] // block_k

  def over_groups(group, out):
    start, end = offsets_ref[group], offsets_ref[group + 1]

    def over_k(step, acc):
      k_slice = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
      return acc + jnp.dot(lhs_ref[:, k_slice], rhs_ref[group, k_slice, :], preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, jnp.where(end > start, k_steps, 0), over_k, jnp.zeros(out.shape, jnp.float32))
    return jnp.where(_row_mask(first_row, start, end, out.shape), acc, out)

  out = lax.fori_loop(first_group_ref[i], stop_group_ref[i], over_groups, jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = out.astype(out_ref.dtype)


def grouped_matmul_2d(lhs, rhs, group_sizes, *, tiling=None, out_dtype, interpret=False,
                      cost_estimate=None):
  """out [M, N]: row r of group g is lhs[r] @ rhs[g]; rows past sum(group_sizes) are zeros."""
  (m, k), (num_groups, _, n) = lhs.shape, rhs.shape
  tm, tk, tn = resolve_tiling(m, k, n, tiling)
  padded_m, padded_k, padded_n = _util.round_up(m, tm), _util.round_up(k, tk), _util.round_up(n, tn)
  row_tiles = padded_m // tm
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
  tile_starts = jnp.arange(row_tiles, dtype=jnp.int32) * tm
  # Groups intersecting tile i: those ending after its first row and starting before its end.
  first_group = jnp.searchsorted(ends, tile_starts, side="right").astype(jnp.int32)
  stop_group = jnp.searchsorted(offsets[:-1], tile_starts + tm, side="left").astype(jnp.int32)
  whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))
  out = pl.pallas_call(
      functools.partial(_gmm_kernel, block_k=tk),
      out_shape=jax.ShapeDtypeStruct((padded_m, padded_n), out_dtype),
      grid=(row_tiles, padded_n // tn),
      in_specs=[whole((num_groups + 1,)), whole((row_tiles,)), whole((row_tiles,)),
                pl.BlockSpec((tm, padded_k), lambda i, j: (i, 0)),
                pl.BlockSpec((num_groups, padded_k, tn), lambda i, j: (0, 0, j))],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="grouped_matmul",
  )(offsets, first_group, stop_group, _util.pad_to(lhs, (padded_m, padded_k)),
    _util.pad_to(rhs, (num_groups, padded_k, padded_n)))
  return out[:m, :n]


def _tgmm_kernel(offsets_ref, lhs_ref, grad_ref, out_ref, *, block_m: int):
  group = pl.program_id(0)
  start, end = offsets_ref[group], offsets_ref[group + 1]

  def over_row_tiles(tile, acc):
    first_row = pl.multiple_of(tile * block_m, block_m)
    rows = pl.ds(first_row, block_m)
    lhs, grad = lhs_ref[rows, :], grad_ref[rows, :]
    lhs = jnp.where(_row_mask(first_row, start, end, lhs.shape), lhs, jnp.zeros_like(lhs))
    grad = jnp.where(_row_mask(first_row, start, end, grad.shape), grad, jnp.zeros_like(grad))
    return acc + jnp.dot(lhs.T, grad, preferred_element_type=jnp.float32)

  stop_tile = jnp.where(end > start, (end + block_m - 1) // block_m, 0)
  acc = lax.fori_loop(start // block_m, stop_tile, over_row_tiles, jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def transposed_grouped_matmul_2d(lhs, grad, group_sizes, *, tiling=None, out_dtype, interpret=False,
                                 cost_estimate=None):
  """out [G, K, N] with out[g] = lhs[rows of g].T @ grad[rows of g] (zeros for an empty group)."""
  (m, k), n, num_groups = lhs.shape, grad.shape[1], group_sizes.shape[0]
  tm, tk, tn = resolve_tiling(m, k, n, tiling)
  padded_m, padded_k, padded_n = _util.round_up(m, tm), _util.round_up(k, tk), _util.round_up(n, tn)
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes.astype(jnp.int32))])
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, block_m=tm),
      out_shape=jax.ShapeDtypeStruct((num_groups, padded_k, padded_n), out_dtype),
      grid=(num_groups, padded_k // tk, padded_n // tn),
      in_specs=[pl.BlockSpec((num_groups + 1,), lambda g, kk, j: (0,)),
                pl.BlockSpec((padded_m, tk), lambda g, kk, j: (0, kk)),
                pl.BlockSpec((padded_m, tn), lambda g, kk, j: (0, j))],
      out_specs=pl.BlockSpec((None, tk, tn), lambda g, kk, j: (g, kk, j)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="transposed_grouped_matmul",
  )(offsets, _util.pad_to(lhs, (padded_m, padded_k)), _util.pad_to(grad, (padded_m, padded_n)))
  return out[:, :k, :n]
