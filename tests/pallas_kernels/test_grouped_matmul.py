"""grouped_matmul / transposed_grouped_matmul: every implementation runnable here vs a float64 NumPy per-row
product, forward of both functions and the gradients of grouped_matmul w.r.t. lhs and rhs; bad inputs; cost."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.grouped_matmul import (IMPLEMENTATIONS, cost, cost_transposed, grouped_matmul,
                                           transposed_grouped_matmul)
from tests.helpers import TOLERANCE, assert_close, interpreted

# M = 160 rows, G = 4 experts. The forward kernels use 32-row tiles (5 row tiles) and split K and N in two; the
# transposed kernel (called directly) splits K and N too and uses its default rows (TPU: 128, so M pads to 256 and
# two row tiles; GPU: 64 rows, three tiles); the backward uses every default. So every pattern has groups
# straddling tile boundaries in both kernels. group_sizes are traced: patterns share one compilation.
M, K, N, G = 160, 256, 256, 4
FORWARD_TILING, TRANSPOSED_TILING = (32, 128, 128), (None, 128, 128)
GROUP_SIZES = {
    # An empty group between two straddling ones; rows 150.. belong to no group (zeros, no weight gradient).
    "empty_middle_and_short": [40, 0, 90, 20],
    # Empty first and last groups; sum 103 < 128, so whole row tiles lie past the groups (the TPU kernel's
    # "no group" visits write them as zeros).
    "empty_ends_and_short": [0, 70, 33, 0],
    # One group owns every row (sum == M).
    "one_group_all_rows": [0, 0, 160, 0],
}


def _expected(lhs, rhs, dy, sizes):
  """out, d lhs, d rhs (== the transposed product of lhs and dy) in float64, row by row."""
  lhs, rhs, dy = (np.asarray(a, np.float64) for a in (lhs, rhs, dy))
  group_of_row = np.full(M, -1)
  group_of_row[:sum(sizes)] = np.repeat(np.arange(G), sizes)
  out, dlhs, drhs = np.zeros((M, N)), np.zeros((M, K)), np.zeros((G, K, N))
  for row, group in enumerate(group_of_row):
    if group >= 0:
      out[row] = lhs[row] @ rhs[group]
      dlhs[row] = rhs[group] @ dy[row]
      drhs[group] += np.outer(lhs[row], dy[row])
  return out, dlhs, drhs


@functools.cache
def _forward_grads_and_transposed(implementation):
  """One jitted function per implementation (and dtype, by retracing), shared by every group-size pattern."""
  kernel = interpreted(implementation) in ("interpret_tpu", "interpret_gpu")

  @jax.jit
  def run(lhs, rhs, group_sizes, dy):
    op = functools.partial(grouped_matmul, group_sizes=group_sizes, implementation=implementation,
                           tiling=FORWARD_TILING if kernel else None)
    out, vjp = jax.vjp(op, lhs, rhs)
    transposed = transposed_grouped_matmul(lhs, dy, group_sizes, implementation=implementation,
                                           tiling=TRANSPOSED_TILING if kernel else None)
    return out, vjp(dy), transposed

  return run


@pytest.mark.parametrize("pattern", GROUP_SIZES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("implementation", _dispatch.runnable(IMPLEMENTATIONS))
def test_grouped_matmul_matches_per_row_product(implementation, dtype, pattern):
  sizes = GROUP_SIZES[pattern]
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.standard_normal((M, K)), dtype)
  rhs = jnp.asarray(rng.standard_normal((G, K, N)) * K ** -0.5, dtype)
  dy = jnp.asarray(rng.standard_normal((M, N)), dtype)
  out, (dlhs, drhs), transposed = _forward_grads_and_transposed(implementation)(
      lhs, rhs, jnp.asarray(sizes, jnp.int32), dy)
  expected_out, expected_dlhs, expected_drhs = _expected(lhs, rhs, dy, sizes)
  tol = TOLERANCE[jnp.dtype(dtype)]
  assert {out.dtype, dlhs.dtype, drhs.dtype, transposed.dtype} == {jnp.dtype(dtype)}
  assert_close("out", out, expected_out, tol)
  assert_close("dlhs", dlhs, expected_dlhs, tol)
  assert_close("drhs", drhs, expected_drhs, tol)
  assert_close("transposed", transposed, expected_drhs, tol)
  # Rows in no group and the weights of empty groups are exact zeros, not just small.
  assert not np.any(np.asarray(out)[sum(sizes):]) and not np.any(np.asarray(dlhs)[sum(sizes):])
  empty = [group for group, size in enumerate(sizes) if size == 0]
  assert not np.any(np.asarray(transposed)[empty]) and not np.any(np.asarray(drhs)[empty])


_LHS, _RHS, _SIZES = jnp.ones((64, 256)), jnp.ones((4, 256, 128)), jnp.asarray([16, 0, 30, 18], jnp.int32)
BAD_INPUTS = {  # name -> (function, keyword overrides, regex the ValueError must match: it names the argument)
    "lhs_1d": ("gmm", dict(lhs=jnp.ones(64)), r"^lhs must be a non-empty 2-D array"),
    "rhs_2d": ("gmm", dict(rhs=jnp.ones((256, 128))), r"^rhs must be a non-empty 3-D array"),
    "k_mismatch": ("gmm", dict(rhs=jnp.ones((4, 128, 128))), r"^rhs\.shape\[1\] \(128\) must equal lhs\.shape\[1\]"),
    "group_sizes_2d": ("gmm", dict(group_sizes=_SIZES[None]), r"^group_sizes must be a 1-D integer array of length G=4"),
    "group_sizes_float": ("gmm", dict(group_sizes=jnp.ones(4)), r"^group_sizes must be a 1-D integer array"),
    "group_sizes_length": ("gmm", dict(group_sizes=_SIZES[:3]), r"^group_sizes must be .* length G=4 \(rhs"),
    "group_sizes_negative": ("gmm", dict(group_sizes=jnp.asarray([16, -1, 30, 18])),
                             r"^group_sizes must be non-negative"),
    "group_sizes_sum_over_m": ("gmm", dict(group_sizes=jnp.asarray([16, 10, 30, 18])),
                               r"^group_sizes sums to 74, more than the 64 rows of lhs"),
    "lhs_int": ("gmm", dict(lhs=jnp.ones((64, 256), jnp.int32)), r"^lhs: dtype int32"),
    "rhs_dtype_differs": ("gmm", dict(rhs=_RHS.astype(jnp.bfloat16)), r"^rhs: dtype bfloat16 must equal"),
    "out_dtype_int": ("gmm", dict(out_dtype=jnp.int8), r"^out_dtype: dtype int8"),
    "tiling_two_entries": ("gmm", dict(tiling=(16, 128)), r"^tiling must be None or three tile sizes"),
    "tiling_zero": ("gmm", dict(tiling=(0, None, None)), r"^tiling\[0\] \(tm\)=0 must be a positive int"),
    "tpu_tm_unaligned": ("gmm", dict(tiling=(12, None, None), implementation="interpret_tpu"),
                         r"^tiling\[0\] \(tm\)=12 is illegal for the TPU kernel: it must be a multiple of 8"),
    "tpu_tk_unaligned": ("gmm", dict(tiling=(16, 64, None), implementation="interpret_tpu"),
                         r"^tiling\[1\] \(tk\)=64 is illegal for the TPU kernel: it must be a multiple of 128"),
    "gpu_tn_not_power_of_2": ("gmm", dict(tiling=(16, 32, 48), implementation="interpret_gpu"),
                              r"^tiling\[2\] \(tn\)=48 is illegal for the GPU \(Triton\) kernel"),
    "transposed_grad_rows": ("tgmm", dict(rhs=jnp.ones((32, 128))), r"^grad must be a non-empty 2-D array \[M=64"),
    "transposed_no_groups": ("tgmm", dict(group_sizes=jnp.zeros((0,), jnp.int32)),
                             r"^group_sizes must be a 1-D integer array of length G >= 1"),
    "transposed_grad_dtype": ("tgmm", dict(rhs=jnp.ones((64, 128), jnp.bfloat16)), r"^grad: dtype bfloat16"),
    # M is a lane dim of lhs.T in the TPU weight-gradient kernel: 64 < M = 128 rows is not a legal tile there.
    "transposed_tpu_tm_unaligned": ("tgmm", dict(lhs=jnp.ones((128, 256)), rhs=jnp.ones((128, 128)),
                                                 tiling=(64, None, None), implementation="interpret_tpu"),
                                    r"^tiling\[0\] \(tm\)=64 is illegal for the TPU kernel: .* multiple of 128"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_grouped_matmul_rejects_bad_input(bad):
  function, overrides, message = BAD_INPUTS[bad]
  arguments = dict(lhs=_LHS, rhs=_RHS if function == "gmm" else jnp.ones((64, 128)), group_sizes=_SIZES,
                   implementation="reference") | overrides
  op = grouped_matmul if function == "gmm" else transposed_grouped_matmul
  lhs, other, group_sizes = arguments.pop("lhs"), arguments.pop("rhs"), arguments.pop("group_sizes")
  with pytest.raises(ValueError, match=message):
    op(lhs, other, group_sizes, **arguments)


def test_cost_matches_hand_count():
  # m=256, k=128, n=256, G=2 with sizes [100, 156], 128^3 tiles, f32. Row tile 0 holds both groups (two visits),
  # tile 1 only group 1: visits (g0,t0), (g1,t0), (g1,t1), for each of the two N tiles. Per N tile the lhs tile
  # index changes twice (t0, t1), the weight tile twice (g0, g1) and the output tile twice; moving to the next N
  # tile changes all three again. Tables: offsets (G+2) + two visit lists (3 each) + the visit count, int32.
  tile = 128 * 128
  modeled = cost((256, 128), (2, 128, 256), dtype=jnp.float32, group_sizes=[100, 156], tiling=(128, 128, 128))
  assert modeled == {"flops": 2 * 3 * 128 * 128 * 256, "hbm_bytes": 4 * 3 * 4 * tile + 4 * (4 + 2 * 3 + 1),
                     "ideal_bytes": 4 * (256 * 128 + 2 * 128 * 256 + 256 * 256) + 4 * 2}
  # With K in two tiles every visit re-reads its weight tile: a weight is read once per row tile touching it.
  split_k = cost((256, 256), (2, 256, 256), dtype=jnp.float32, group_sizes=[100, 156], tiling=(128, 128, 128))
  assert split_k["hbm_bytes"] - 4 * (4 + 2 * 3 + 1) == 4 * tile * (2 * 3 * 2 + 2 * 3 * 2 + 2 * 2)


def test_cost_at_balanced_moe_shape_reads_each_weight_once():
  # 2048 routed rows, K = 576 (one whole-K tile), N = 1536 (three 512 tiles), 8 balanced experts, bf16.
  modeled = cost((2048, 576), (8, 576, 1536), dtype=jnp.bfloat16)
  lhs, weights, out = 2 * 2048 * 576, 2 * 8 * 576 * 1536, 2 * 2048 * 1536
  tables = 4 * (10 + 2 * 23 + 1)
  assert modeled["flops"] == 2 * 2048 * 576 * 1536  # no straddled tiles: no wasted work
  assert modeled["hbm_bytes"] == 3 * lhs + weights + out + tables  # lhs once per N tile, each expert once
  assert modeled["ideal_bytes"] == lhs + weights + out + 4 * 8
  transposed = cost_transposed((2048, 576), (2048, 1536), dtype=jnp.bfloat16, num_groups=8)
  assert transposed["flops"] == 2 * 2048 * 576 * 1536
  assert transposed["hbm_bytes"] == 3 * lhs + out + weights + tables  # grad once per K tile (1), lhs per N tile
  # The backward's d lhs = dy [2048, 1536] @ rhs.T [8, 1536, 576]: K = 1536 splits into three 512 tiles, so each
  # expert's weight is read once per row tile of its group (twice); the 7 padding visits move nothing.
  dlhs = cost((2048, 1536), (8, 1536, 576), dtype=jnp.bfloat16)
  assert dlhs["hbm_bytes"] == 2 * 2048 * 1536 + 2 * weights + 2 * 2048 * 576 + tables
