"""Mosaic-TPU grouped matmul (megablox-style): a grid over *visits* of (row tile, group) pairs.

Rows of lhs are sorted by group, so group g owns the row range [offsets[g], offsets[g+1]). A row tile that
straddles a group boundary is visited once per group it touches, consecutively, and each visit writes only its
group's rows (a row mask at the store). The visit list is computed on device from `group_sizes` (`visit_schedule`)
and scalar-prefetched into SMEM, where the BlockSpec index maps read it to DMA the right lhs tile, the right
expert's weight tile and the right output tile. Its length is static: at most `row_tiles + G - 1` visits are
ever needed (each group boundary inside a tile adds one); unused trailing steps repeat the last real visit, so
the pipeline issues no copy for them, and `pl.when` skips their work.

`grouped_matmul_2d`: out [M, N], grid (N tiles, visits, K tiles). Row tiles past sum(group_sizes) are visited
once by a "no group" sentinel that writes zeros. Consecutive visits of one row tile keep its output block in VMEM.

`transposed_grouped_matmul_2d`: out [G, K, N] with out[g] = lhs[rows of g].T @ grad[rows of g], grid (K tiles,
N tiles, visits); M is the reduction. Every group is visited at least once (an empty group once, to write
zeros); rows outside the group are masked to zero in both operands before the product.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _util

DEFAULT_BLOCK_M = 128    # rows per tile: fills the MXU; for the transposed kernel M is a lane dim of lhs.T
WHOLE_LANE_LIMIT = 1024  # default K / N tiles: the whole dimension up to this size (K = 576 needs no padding) ...
DEFAULT_LANE_BLOCK = 512  # ... else the widest multiple of 128 up to this that divides it (else this, padded)


def _default_lane_block(dim: int) -> int:
  if dim <= WHOLE_LANE_LIMIT:
    return dim
  for block in range(DEFAULT_LANE_BLOCK, 127, -128):
    if dim % block == 0:
      return block
  return DEFAULT_LANE_BLOCK


def resolve_tiling(m: int, k: int, n: int, tiling=None, *, transposed: bool = False) -> tuple[int, int, int]:
  """(tm, tk, tn) for lhs [m, k] with a k x n weight per group, checked against Mosaic's (8, 128) tiling.

  tm is a sublane dim of the lhs / out tiles (multiple of 8) -- but a lane dim of lhs.T in the transposed
  kernel (multiple of 128); tk and tn are lane dims (multiples of 128). Any of them may instead span the whole
  dimension. None entries take the defaults.
  """
  tm, tk, tn = (None, None, None) if tiling is None else tiling
  return (_util.tpu_block("tiling[0] (tm)", tm, m, default=DEFAULT_BLOCK_M, align=128 if transposed else 8),
          _util.tpu_block("tiling[1] (tk)", tk, k, default=_default_lane_block(k), align=128),
          _util.tpu_block("tiling[2] (tn)", tn, n, default=_default_lane_block(n), align=128))


def num_visit_slots(row_tiles: int, num_groups: int) -> int:
  """The static length of the visit list: enough for any `group_sizes`."""
  return row_tiles + num_groups - 1


def visit_schedule(group_sizes, row_tiles: int, block_m: int, *, visit_empty_groups: bool):
  """The (group, row tile) visits in execution order, for the scalar-prefetched index maps.

  Returns (offsets [G+2], visit_group [V], visit_tile [V], num_visits [1]) with V = row_tiles + G - 1.
  offsets[g]..offsets[g+1] are group g's rows; group id G is the "no group" sentinel (an empty range at the
  end) that owns the row tiles past sum(group_sizes) when `visit_empty_groups` is False (the forward must write
  zeros there). With `visit_empty_groups` (the transposed kernel: every group's output must be written) an
  empty group gets one visit that computes nothing. Visits past num_visits repeat the last real one.
  """
  num_groups = group_sizes.shape[0]
  group_sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  total = ends[-1]
  covered_tiles = (total + block_m - 1) // block_m
  first_tile = starts // block_m
  spans = jnp.where(group_sizes > 0, (ends - 1) // block_m - first_tile + 1, int(visit_empty_groups))
  tail_tiles = 0 if visit_empty_groups else row_tiles - covered_tiles
  spans = jnp.concatenate([spans, jnp.reshape(tail_tiles, (1,)).astype(jnp.int32)])
  first_tile = jnp.concatenate([first_tile, covered_tiles[None]])
  visits_through = jnp.cumsum(spans)  # visits of groups 0..g (the sentinel last)
  num_visits = visits_through[-1]
  visit = jnp.minimum(jnp.arange(num_visit_slots(row_tiles, num_groups), dtype=jnp.int32), num_visits - 1)
  visit_group = jnp.searchsorted(visits_through, visit, side="right").astype(jnp.int32)
  within_group = visit - (visits_through[visit_group] - spans[visit_group])
  # An empty group sitting at the very end starts at row tile `row_tiles`: clamp (it computes nothing).
  visit_tile = jnp.minimum(first_tile[visit_group] + within_group, row_tiles - 1).astype(jnp.int32)
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends, total[None]])
  return offsets, visit_group, visit_tile, num_visits.reshape(1).astype(jnp.int32)


def gmm_block_indices(j, v, kk, groups, tiles, num_visits, *, num_groups: int, k_tiles: int):
  """Block indices of (lhs, rhs, out) at forward grid step (j, v, kk): the BlockSpec index maps (cost() walks
  them too). Padding visits hold the last K tile, so their indices equal the last real step's: no copies."""
  kk = jnp.where(v < num_visits[0], kk, k_tiles - 1)
  # The "no group" sentinel reuses a real group's weight block (it computes nothing).
  return (tiles[v], kk), (jnp.minimum(groups[v], num_groups - 1), kk, j), (tiles[v], j)


def tgmm_block_indices(kk, j, v, groups, tiles):
  """Block indices of (lhs, grad, out) at transposed grid step (kk, j, v); padding visits repeat the last."""
  return (tiles[v], kk), (tiles[v], j), (groups[v], kk, j)


def _group_rows(offsets_ref, group, tile, shape):
  """Row range of `group`, whether it touches this row tile, and the in-group row mask of a `shape` tile."""
  start, end = offsets_ref[group], offsets_ref[group + 1]
  first_row = tile * shape[0]
  touches = jnp.logical_and(start < first_row + shape[0], end > first_row)
  rows = first_row + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  return touches, jnp.logical_and(rows >= start, rows < end)


def _gmm_kernel(offsets_ref, groups_ref, tiles_ref, num_visits_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
  visit, k_step = pl.program_id(1), pl.program_id(2)
  group, tile = groups_ref[visit], tiles_ref[visit]
  active = visit < num_visits_ref[0]
  touches, in_group = _group_rows(offsets_ref, group, tile, out_ref.shape)

  @pl.when(k_step == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(jnp.logical_and(active, touches))
  def _accumulate():
    acc_ref[...] += jnp.dot(lhs_ref[...], rhs_ref[...], preferred_element_type=jnp.float32)

  @pl.when(jnp.logical_and(active, k_step == pl.num_programs(2) - 1))
  def _store():
    # The first visit of a row tile finds uninitialised VMEM: everything outside its group becomes zero; later
    # visits of the same tile keep what the earlier groups stored.
    first_visit = jnp.logical_or(visit == 0, tiles_ref[jnp.maximum(visit - 1, 0)] != tile)
    kept = jnp.where(first_visit, 0.0, out_ref[...].astype(jnp.float32))
    out_ref[...] = jnp.where(in_group, acc_ref[...], kept).astype(out_ref.dtype)


def grouped_matmul_2d(lhs, rhs, group_sizes, *, tiling=None, out_dtype, interpret=False,
                      cost_estimate=None):
  """out [M, N]: row r of group g is lhs[r] @ rhs[g]; rows past sum(group_sizes) are zeros."""
  (m, k), (num_groups, _, n) = lhs.shape, rhs.shape
  tm, tk, tn = resolve_tiling(m, k, n, tiling)
  padded_m, padded_k, padded_n = _util.round_up(m, tm), _util.round_up(k, tk), _util.round_up(n, tn)
  row_tiles = padded_m // tm
  schedule = visit_schedule(group_sizes, row_tiles, tm, visit_empty_groups=False)
  indices = lambda operand: lambda j, v, kk, offsets, *visits: gmm_block_indices(
      j, v, kk, *visits, num_groups=num_groups, k_tiles=padded_k // tk)[operand]

  out = pl.pallas_call(
      _gmm_kernel,
      out_shape=jax.ShapeDtypeStruct((padded_m, padded_n), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(padded_n // tn, num_visit_slots(row_tiles, num_groups), padded_k // tk),
          in_specs=[pl.BlockSpec((tm, tk), indices(0)), pl.BlockSpec((None, tk, tn), indices(1))],
          out_specs=pl.BlockSpec((tm, tn), indices(2)),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
      # Visits revisit output blocks (straddled tiles), so only the N axis is independent.
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="grouped_matmul",
  )(*schedule, _util.pad_to(lhs, (padded_m, padded_k)), _util.pad_to(rhs, (num_groups, padded_k, padded_n)))
  return out[:m, :n]


def _tgmm_kernel(offsets_ref, groups_ref, tiles_ref, num_visits_ref, lhs_ref, grad_ref, out_ref, acc_ref):
  visit, last_slot = pl.program_id(2), pl.num_programs(2) - 1
  group, tile = groups_ref[visit], tiles_ref[visit]
  num_visits = num_visits_ref[0]
  active = visit < num_visits
  touches, lhs_in_group = _group_rows(offsets_ref, group, tile, lhs_ref.shape)
  _, grad_in_group = _group_rows(offsets_ref, group, tile, grad_ref.shape)

  @pl.when(jnp.logical_or(visit == 0, groups_ref[jnp.maximum(visit - 1, 0)] != group))
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(jnp.logical_and(active, touches))
  def _accumulate():
    # Both operands masked: a row of another group must add nothing, even an inf (0 * inf would be NaN).
    lhs = jnp.where(lhs_in_group, lhs_ref[...], jnp.zeros_like(lhs_ref))
    grad = jnp.where(grad_in_group, grad_ref[...], jnp.zeros_like(grad_ref))
    acc_ref[...] += jnp.dot(lhs.T, grad, preferred_element_type=jnp.float32)

  group_ends = jnp.logical_or(visit == num_visits - 1,
                              groups_ref[jnp.minimum(visit + 1, last_slot)] != group)

  @pl.when(jnp.logical_and(active, group_ends))
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def transposed_grouped_matmul_2d(lhs, grad, group_sizes, *, tiling=None, out_dtype, interpret=False,
                                 cost_estimate=None):
  """out [G, K, N] with out[g] = lhs[rows of g].T @ grad[rows of g] (zeros for an empty group)."""
  (m, k), n, num_groups = lhs.shape, grad.shape[1], group_sizes.shape[0]
  tm, tk, tn = resolve_tiling(m, k, n, tiling, transposed=True)
  padded_m, padded_k, padded_n = _util.round_up(m, tm), _util.round_up(k, tk), _util.round_up(n, tn)
  row_tiles = padded_m // tm
  schedule = visit_schedule(group_sizes, row_tiles, tm, visit_empty_groups=True)
  indices = lambda operand: lambda kk, j, v, offsets, groups, tiles, num_visits: tgmm_block_indices(
      kk, j, v, groups, tiles)[operand]

  out = pl.pallas_call(
      _tgmm_kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, padded_k, padded_n), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(padded_k // tk, padded_n // tn, num_visit_slots(row_tiles, num_groups)),
          in_specs=[pl.BlockSpec((tm, tk), indices(0)), pl.BlockSpec((tm, tn), indices(1))],
          out_specs=pl.BlockSpec((None, tk, tn), indices(2)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="transposed_grouped_matmul",
  )(*schedule, _util.pad_to(lhs, (padded_m, padded_k)), _util.pad_to(grad, (padded_m, padded_n)))
  return out[:, :k, :n]

