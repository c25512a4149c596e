"""`grouped_matmul(lhs, rhs, group_sizes)`: the MoE expert product, and `transposed_grouped_matmul`, its weight grad.

lhs [M, K] holds rows sorted by group (expert): group g owns rows [sum(group_sizes[:g]), sum(group_sizes[:g+1]));
rows past sum(group_sizes) belong to no group. `grouped_matmul` gives out [M, N] with out[r] = lhs[r] @ rhs[g]
(zeros for rows in no group); `transposed_grouped_matmul(lhs, grad, group_sizes)` gives [G, K, N] with
out[g] = lhs[rows of g].T @ grad[rows of g] (megablox's gmm / tgmm).

Implementations: 'reference' (a masked dense product per group), 'xla' (`jax.lax.ragged_dot` and
`ragged_dot_general`), the Pallas kernels (tpu.py: megablox-style visits of (row tile, group) pairs with
scalar-prefetched group metadata; gpu.py: Triton programs looping over their groups / row tiles). Every
implementation but the reference gets one `jax.custom_vjp` here that reuses the same implementation backward:
d lhs = grouped_matmul(dy, rhs transposed to [G, N, K]) and d rhs = transposed_grouped_matmul(lhs, dy);
group_sizes (integer) gets no gradient. The reference is differentiated by plain autodiff (an independent check).
`transposed_grouped_matmul` itself is not differentiable through the kernels (nothing needs its gradient).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _dispatch, _util
from pallas_kernels.grouped_matmul import gpu, reference, tpu, xla

__all__ = ["IMPLEMENTATIONS", "cost", "cost_transposed", "grouped_matmul", "transposed_grouped_matmul"]

IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu")
_KERNELS = _dispatch.kernel_modules(tpu=tpu, gpu=gpu)


def grouped_matmul(lhs, rhs, group_sizes, *, implementation=None, tiling=None, out_dtype=None):
  """lhs [M, K] (rows sorted by group) x rhs [G, K, N] -> [M, N]: row r of group g gets lhs[r] @ rhs[g].

  group_sizes: [G] int, non-negative, sum <= M (checked when concrete); rows past the sum come out zero.
  lhs and rhs are float32 or bfloat16 (alike); products accumulate in f32; the result has `out_dtype` (default
  lhs.dtype). `tiling` = (tm, tk, tn) tiles the forward product (None, or None entries: the kernel's defaults;
  TPU: tm a multiple of 8, tk / tn of 128, or the whole dimension; GPU: powers of two >= 16); the backward
  products use the defaults. `implementation`: None (the `pallas_kernels.implementation` policy, else by
  backend) or one of IMPLEMENTATIONS.
  """
  out_dtype, tiling = _check(lhs, rhs, group_sizes, tiling, out_dtype, second="rhs")
  implementation = _dispatch.choose(implementation, IMPLEMENTATIONS, op="grouped_matmul")
  _check_tiling(implementation, (lhs.shape[0], lhs.shape[1], rhs.shape[2]), tiling, transposed=False)
  return _run(lhs, rhs, jnp.asarray(group_sizes), implementation=implementation, tiling=tiling,
              out_dtype=out_dtype)


def transposed_grouped_matmul(lhs, grad, group_sizes, *, implementation=None, tiling=None, out_dtype=None):
  """lhs [M, K], grad [M, N] (rows sorted by group) -> [G, K, N]: out[g] = lhs[rows of g].T @ grad[rows of g].

  An empty group gets zeros; rows past sum(group_sizes) are ignored. Dtypes, `tiling` = (tm, tk, tn) and
  `implementation` as in `grouped_matmul`, except that on TPU tm is a lane dim of lhs.T (a multiple of 128).
  """
  out_dtype, tiling = _check(lhs, grad, group_sizes, tiling, out_dtype, second="grad")
  implementation = _dispatch.choose(implementation, IMPLEMENTATIONS, op="transposed_grouped_matmul")
  _check_tiling(implementation, (lhs.shape[0], lhs.shape[1], grad.shape[1]), tiling, transposed=True)
  return _run_transposed(lhs, grad, jnp.asarray(group_sizes), implementation=implementation, tiling=tiling,
                         out_dtype=out_dtype)


def _product(kind: str, operands, implementation: str, tiling, out_dtype):
  """`kind` ('grouped_matmul' or 'transposed_grouped_matmul') by `implementation`, without checks."""
  if implementation == "reference":
    return getattr(reference, kind)(*operands, out_dtype=out_dtype)
  if implementation == "xla":
    return getattr(xla, kind)(*operands, out_dtype=out_dtype)
  lhs, other, group_sizes = operands
  # The group sizes are traced here: the estimate is the model's at balanced groups.
  model, extra = (cost, {}) if kind == "grouped_matmul" else (cost_transposed, {"num_groups": group_sizes.shape[0]})
  estimate = _util.cost_estimate(model, lhs.shape, other.shape, dtype=lhs.dtype, **extra,
                                 implementation=implementation, blocks={"tiling": tiling})
  return getattr(_KERNELS[implementation], f"{kind}_2d")(
      *operands, tiling=tiling, out_dtype=out_dtype, interpret=_dispatch.interpret_params(implementation),
      cost_estimate=estimate)


@functools.partial(jax.jit, static_argnames=("implementation", "tiling", "out_dtype"))
def _run(lhs, rhs, group_sizes, *, implementation, tiling=None, out_dtype=None):
  """`grouped_matmul` without validation or dispatch (the lowering tests export the compiled kernels)."""
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  if implementation == "reference":
    return reference.grouped_matmul(lhs, rhs, group_sizes, out_dtype=out_dtype)
  return _differentiable(lhs, rhs, group_sizes, implementation, tiling, out_dtype)


@functools.partial(jax.jit, static_argnames=("implementation", "tiling", "out_dtype"))
def _run_transposed(lhs, grad, group_sizes, *, implementation, tiling=None, out_dtype=None):
  """`transposed_grouped_matmul` without validation or dispatch."""
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  return _product("transposed_grouped_matmul", (lhs, grad, group_sizes), implementation, tiling, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _differentiable(lhs, rhs, group_sizes, implementation, tiling, out_dtype):
  return _product("grouped_matmul", (lhs, rhs, group_sizes), implementation, tiling, out_dtype)


def _differentiable_fwd(lhs, rhs, group_sizes, implementation, tiling, out_dtype):
  out = _product("grouped_matmul", (lhs, rhs, group_sizes), implementation, tiling, out_dtype)
  return out, (lhs, rhs, group_sizes)


def _differentiable_bwd(implementation, tiling, out_dtype, residuals, dy):
  del tiling, out_dtype  # the forward's tiling need not be legal for the backward shapes: use the defaults
  lhs, rhs, group_sizes = residuals
  dy = dy.astype(lhs.dtype)  # the forward's operand dtype for the MXU; accumulation stays f32
  dlhs = _product("grouped_matmul", (dy, rhs.swapaxes(1, 2), group_sizes), implementation, None, lhs.dtype)
  drhs = _product("transposed_grouped_matmul", (lhs, dy, group_sizes), implementation, None, rhs.dtype)
  return dlhs, drhs, None  # group_sizes is integer: no cotangent


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)


def _check(lhs, other, group_sizes, tiling, out_dtype, *, second: str):
  """Raises one `ValueError` naming the first bad argument; returns (out_dtype, tiling as a tuple or None).

  `second` is 'rhs' ([G, K, N], grouped_matmul) or 'grad' ([M, N], transposed_grouped_matmul).
  """
  if lhs.ndim != 2 or 0 in lhs.shape:
    raise ValueError(f"lhs must be a non-empty 2-D array [M, K]; got shape {tuple(lhs.shape)}.")
  m, k = lhs.shape
  group_sizes = jnp.asarray(group_sizes)
  if second == "rhs":
    if other.ndim != 3 or 0 in other.shape:
      raise ValueError(f"rhs must be a non-empty 3-D array [G, K, N]; got shape {tuple(other.shape)}.")
    if other.shape[1] != k:
      raise ValueError(f"rhs.shape[1] ({other.shape[1]}) must equal lhs.shape[1] (K={k}); "
                       f"got lhs {tuple(lhs.shape)}, rhs {tuple(other.shape)}.")
    num_groups = other.shape[0]
  else:
    if other.ndim != 2 or other.shape[0] != m or other.shape[1] == 0:
      raise ValueError(f"grad must be a non-empty 2-D array [M={m}, N]; got shape {tuple(other.shape)}.")
    num_groups = None  # any G >= 1
  if (group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer) or group_sizes.shape[0] == 0
      or num_groups not in (None, group_sizes.shape[0])):
    expected = "G >= 1" if num_groups is None else f"G={num_groups} (rhs.shape[0])"
    raise ValueError(f"group_sizes must be a 1-D integer array of length {expected}; got shape "
                     f"{tuple(group_sizes.shape)} and dtype {group_sizes.dtype}.")
  if not isinstance(group_sizes, jax.core.Tracer):  # values are only checkable outside jit
    sizes = np.asarray(group_sizes)
    if sizes.min() < 0:
      raise ValueError(f"group_sizes must be non-negative; got {sizes.tolist()}.")
    if sizes.sum() > m:
      raise ValueError(f"group_sizes sums to {int(sizes.sum())}, more than the {m} rows of lhs (M).")
  _util.check_float_dtype("lhs", lhs.dtype)
  _util.check_float_dtype(second, other.dtype)
  if other.dtype != lhs.dtype:
    raise ValueError(f"{second}: dtype {other.dtype} must equal lhs's dtype {lhs.dtype} (cast one of them).")
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  _util.check_float_dtype("out_dtype", out_dtype)
  if tiling is not None:
    if not isinstance(tiling, (tuple, list)) or len(tiling) != 3:
      raise ValueError(f"tiling must be None or three tile sizes (tm, tk, tn); got {tiling!r}.")
    for axis, (name, block) in enumerate(zip(("tm", "tk", "tn"), tiling)):
      _util.check_block_arg(f"tiling[{axis}] ({name})", block)
    tiling = tuple(tiling)
  return out_dtype, tiling


def _check_tiling(implementation: str, mkn, tiling, *, transposed: bool) -> None:
  """Raises a `ValueError` naming the tile when `tiling` breaks the chosen kernel's rules."""
  if implementation in ("pallas_tpu", "interpret_tpu"):
    tpu.resolve_tiling(*mkn, tiling, transposed=transposed)
  elif implementation in ("pallas_gpu", "interpret_gpu"):
    gpu.resolve_tiling(*mkn, tiling)


# The kernels' own schedule, compiled once per shape (eager, its dozen small ops would each dispatch).
_visit_schedule = jax.jit(tpu.visit_schedule, static_argnums=(1, 2), static_argnames=("visit_empty_groups",))


def _balanced_sizes(m: int, num_groups: int) -> np.ndarray:
  sizes = np.full(num_groups, m // num_groups, np.int64)
  sizes[:m % num_groups] += 1
  return sizes


def _block_copies(*indices) -> int:
  """How many times a BlockSpec's block is (re)fetched over the flattened grid: the pipeline copies a block only
  when its index differs from the previous step's."""
  stacked = np.stack([np.ravel(index) for index in indices], axis=-1)
  return 1 + int(np.count_nonzero(np.any(stacked[1:] != stacked[:-1], axis=-1)))


def cost(lhs_shape, rhs_shape, *, dtype, group_sizes=None, tiling=None) -> dict:
  """Modelled cost of the TPU `grouped_matmul` kernel for lhs [M, K] x rhs [G, K, N] in `dtype`.

  Walks the kernel's grid (N tiles, visits, K tiles) over the visit schedule of `group_sizes` (G ints; default
  balanced) and counts a tile's bytes each time its block index changes, as the Pallas pipeline does. So an
  expert's weight tile is read once per run of consecutive visits of that group: once per group per N tile when
  the whole K fits one tile, else once per row tile that touches the group; lhs tiles are re-read per N tile.
  `flops` are those executed (straddled tiles compute whole tiles). `ideal_bytes` reads each operand and writes
  the output once (the group sizes included in both).
  """
  _check_lhs_shape(lhs_shape)
  if len(rhs_shape) != 3 or rhs_shape[1] != lhs_shape[1]:
    raise ValueError(f"rhs_shape must be [G, K={lhs_shape[1]}, N] to match lhs_shape; got {tuple(rhs_shape)}.")
  (m, k), (num_groups, n) = lhs_shape, (rhs_shape[0], rhs_shape[2])
  return _cost(m, k, n, num_groups, dtype, group_sizes, tiling, transposed=False)


def cost_transposed(lhs_shape, grad_shape, *, dtype, num_groups=None, group_sizes=None, tiling=None) -> dict:
  """Modelled cost of the TPU `transposed_grouped_matmul` kernel (the weight gradient) for lhs [M, K] and
  grad [M, N] in `dtype` -> [G, K, N]; G = `num_groups` (default len(group_sizes)).

  As `cost`, over the grid (K tiles, N tiles, visits): lhs tiles are re-read per N tile, grad tiles per K tile,
  every output tile is written once.
  """
  _check_lhs_shape(lhs_shape)
  if len(grad_shape) != 2 or grad_shape[0] != lhs_shape[0]:
    raise ValueError(f"grad_shape must be [M={lhs_shape[0]}, N] to match lhs_shape; got {tuple(grad_shape)}.")
  if num_groups is None and group_sizes is None:
    raise ValueError("num_groups: give it (G of the [G, K, N] result) or group_sizes.")
  num_groups = len(group_sizes) if num_groups is None else num_groups
  (m, k), n = lhs_shape, grad_shape[1]
  return _cost(m, k, n, num_groups, dtype, group_sizes, tiling, transposed=True)


def _check_lhs_shape(lhs_shape):
  if len(lhs_shape) != 2:
    raise ValueError(f"lhs_shape must be [M, K]; got {tuple(lhs_shape)}.")


def _cost(m: int, k: int, n: int, num_groups: int, dtype, group_sizes, tiling, *, transposed: bool) -> dict:
  """`cost` (transposed=False) and `cost_transposed` on the problem sizes: walks the kernel's grid."""
  sizes = _balanced_sizes(m, num_groups) if group_sizes is None else np.asarray(group_sizes)
  if sizes.shape != (num_groups,) or sizes.min() < 0 or sizes.sum() > m:
    raise ValueError(f"group_sizes must be {num_groups} non-negative ints summing to <= m={m}; got {sizes}.")
  tm, tk, tn = tpu.resolve_tiling(m, k, n, tiling, transposed=transposed)
  padded_m, padded_k, padded_n = _util.round_up(m, tm), _util.round_up(k, tk), _util.round_up(n, tn)
  row_tiles, k_tiles, n_tiles = padded_m // tm, padded_k // tk, padded_n // tn
  offsets, groups, tiles, num_visits = (np.asarray(a) for a in _visit_schedule(
      jnp.asarray(sizes, jnp.int32), row_tiles, tm, visit_empty_groups=transposed))
  visits = np.arange(groups.size)
  computes = (visits < num_visits[0]) & (offsets[groups] < (tiles + 1) * tm) & (offsets[groups + 1] > tiles * tm)
  itemsize = jnp.dtype(dtype).itemsize
  tables = 4 * (offsets.size + 2 * groups.size + 1)
  if transposed:
    grid = np.meshgrid(np.arange(k_tiles), np.arange(n_tiles), visits, indexing="ij")
    indices = tpu.tgmm_block_indices(*grid, groups, tiles)
    tile_elements = (tm * tk, tm * tn, tk * tn)  # lhs, grad, out
    ideal = m * k + m * n + num_groups * k * n
  else:
    grid = np.meshgrid(np.arange(n_tiles), visits, np.arange(k_tiles), indexing="ij")
    indices = tpu.gmm_block_indices(*grid, groups, tiles, num_visits, num_groups=num_groups, k_tiles=k_tiles)
    tile_elements = (tm * tk, tk * tn, tm * tn)  # lhs, rhs, out
    ideal = m * k + num_groups * k * n + m * n
  # Every operand's tile moves once per change of its block index (the output: written once per change).
  moved = sum(_block_copies(*index) * elements for index, elements in zip(indices, tile_elements))
  flops = 2 * int(computes.sum()) * tm * padded_k * padded_n
  return {"flops": flops, "hbm_bytes": moved * itemsize + tables, "ideal_bytes": ideal * itemsize + 4 * num_groups}
