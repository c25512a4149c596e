"""block_sparse_matmul: every implementation runnable here vs a dense masked f32 product, forward and both gradients
(dx and the stored block values); storage round trips; bad inputs; cost model."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.block_sparse_matmul import (IMPLEMENTATIONS, BlockSparseMatrix, block_sparse_matmul, cost,
                                                from_block_mask, from_dense)
from tests.helpers import TOLERANCE, assert_close

# name -> (x shape, K, N, (bk, bn), block mask over the (K/bk, N/bn) grid, block_m). Blocks are legal for both
# kernel styles (128 lanes for Mosaic, powers of two for Triton). Few cases, several paths each: interpret mode
# compiles ~1.5 s per distinct pallas_call, and every case runs three (forward, dx, dvalues).
CASES = {
    # M = 40 from (2, 20), ragged for block_m = 16 (3 M tiles); 3x4 blocks at 50% with an all-zero column block 1
    # (its output is zeros, its dx contribution nothing) and an all-zero row block 2 (dx rows 256.. are zeros).
    "half_empty_column_and_row": ((2, 20, 384), 384, 512, (128, 128),
                                  [[1, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]], 16),
    # Every block stored (density 1), uneven per-column counts impossible: the dense limit. Default block_m.
    "all_blocks": ((24, 256), 256, 256, (128, 128), [[1, 1], [1, 1]], None),
    # 25% density, one block per column block in different rows (the table's padding width is 1), M = 8.
    "quarter_diagonal": ((8, 512), 512, 512, (128, 128), np.eye(4, dtype=int), None),
}


def _random(rng, shape, dtype, scale=1.0):
  return jnp.asarray(scale * rng.standard_normal(shape), dtype)


def _element_mask(block_mask, block_shape):
  return np.kron(np.asarray(block_mask, np.float32), np.ones(block_shape, np.float32))


def _expected(x, w_dense, mask, dy):
  """Dense masked product and its gradients in f32 at HIGHEST precision, written independently of the op."""
  def product(x, w):
    return jnp.matmul(x, w * mask, precision=jax.lax.Precision.HIGHEST)
  out, vjp = jax.vjp(product, x.astype(jnp.float32), w_dense.astype(jnp.float32))
  dx, dw = vjp(dy.astype(jnp.float32))
  return out, dx, dw * mask


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("implementation", _dispatch.runnable(IMPLEMENTATIONS))
def test_block_sparse_matmul_matches_dense_masked(implementation, dtype, case):
  x_shape, k, n, block_shape, block_mask, block_m = CASES[case]
  rng = np.random.default_rng(0)
  x = _random(rng, x_shape, dtype)
  w_dense = _random(rng, (k, n), dtype, scale=k ** -0.5)
  w = from_block_mask(np.asarray(w_dense, np.float32), block_mask, block_shape).astype(dtype)
  mask = _element_mask(block_mask, block_shape)
  dy = _random(rng, (*x_shape[:-1], n), dtype)
  op = functools.partial(block_sparse_matmul, implementation=implementation, block_m=block_m)

  @jax.jit  # one compilation for the forward and both backward kernels
  def forward_and_grads(x, values, dy):
    out, vjp = jax.vjp(lambda x, values: op(x, w.with_values(values)), x, values)
    return out, vjp(dy)

  out, (dx, dvalues) = forward_and_grads(x, w.values, dy)
  expected_out, expected_dx, expected_dw = _expected(x, w_dense, mask, dy)
  tol = TOLERANCE[jnp.dtype(dtype)]
  assert (out.dtype, dx.dtype, dvalues.dtype) == (x.dtype, x.dtype, w.values.dtype)
  assert dvalues.shape == w.values.shape  # gradients exist for the stored blocks only
  assert_close("out", out, expected_out, tol)
  assert_close("dx", dx, expected_dx, tol)
  assert_close("dvalues", w.with_values(dvalues).todense(), expected_dw, tol)
  if not np.all(block_mask):  # the zero blocks' outputs are exact zeros, not just small
    empty_cols = ~np.asarray(block_mask, bool).any(axis=0)
    for col in np.flatnonzero(empty_cols):
      assert not np.any(np.asarray(out)[..., col * block_shape[1]:(col + 1) * block_shape[1]])


@pytest.mark.parametrize("implementation", _dispatch.runnable(IMPLEMENTATIONS))
def test_block_sparse_matmul_with_no_stored_blocks_is_zero(implementation):
  w = from_dense(np.zeros((256, 128), np.float32), (128, 128))
  assert w.nnz_blocks == 0
  x = jnp.ones((8, 256))
  out, vjp = jax.vjp(lambda x: block_sparse_matmul(x, w, implementation=implementation), x)
  assert out.shape == (8, 128) and not np.any(np.asarray(out))
  assert not np.any(np.asarray(vjp(jnp.ones_like(out))[0]))


def test_storage_round_trip_is_exact_and_tables_are_consistent():
  rng = np.random.default_rng(1)
  block_mask = rng.random((6, 5)) < 0.4
  block_mask[:, 2] = False  # an empty column block
  dense = rng.standard_normal((6 * 16, 5 * 32)).astype(np.float32) * _element_mask(block_mask, (16, 32))
  w = from_dense(dense, (16, 32))
  np.testing.assert_array_equal(np.asarray(w.todense()), dense)
  assert w.nnz_blocks == block_mask.sum() and w.density == pytest.approx(block_mask.mean())
  rows, cols = np.asarray(w.block_row), np.asarray(w.block_col)
  assert np.all(block_mask[rows, cols]) and np.all(np.diff(cols) >= 0)  # column-block-major order
  for table, counts, owner in ((w.col_slots, w.col_counts, cols), (w.row_slots, w.row_counts, rows)):
    table, counts = np.asarray(table), np.asarray(counts)
    for group, count in enumerate(counts):
      assert sorted(table[group, :count]) == sorted(np.flatnonzero(owner == group))
  assert w.nbytes() == w.values.size * 4 + 4 * (2 * w.nnz_blocks + 5 + 6 + w.col_slots.size + w.row_slots.size)
  # A pytree: it goes through jit and tree maps with its static shape kept.
  assert jax.jit(lambda w: w.todense().sum())(w) == pytest.approx(dense.sum(), rel=1e-5)


def _corrupt(w: BlockSparseMatrix, **changes) -> BlockSparseMatrix:
  fields = {name: getattr(w, name) for name in ("values", "block_row", "block_col", "col_counts", "col_slots",
                                                "row_counts", "row_slots", "shape", "block_shape")}
  return BlockSparseMatrix(**(fields | changes))


_W = from_block_mask(np.ones((256, 256), np.float32), [[1, 0], [1, 1]], (128, 128))
_X = jnp.ones((16, 256))
BAD_INPUTS = {  # name -> (keyword arguments, regex the ValueError must match: it names the argument)
    "x_scalar": (dict(x=jnp.ones(())), r"^x must"),
    "w_dense_array": (dict(w=jnp.ones((256, 256))), r"^w must be a BlockSparseMatrix"),
    "k_mismatch": (dict(x=jnp.ones((16, 128))), r"^w\.shape\[0\] \(256\) must equal x\.shape\[-1\]"),
    "x_int": (dict(x=jnp.ones((16, 256), jnp.int32)), r"^x: dtype int32"),
    "w_dtype_differs": (dict(w=_W.astype(jnp.bfloat16)), r"^w: dtype bfloat16 must equal"),
    "block_row_out_of_range": (dict(w=_corrupt(_W, block_row=jnp.asarray([0, 1, 2], jnp.int32))),
                               r"^w\.block_row holds an index out of range \[0, 2\)"),
    "col_slots_out_of_range": (dict(w=_corrupt(_W, col_slots=jnp.asarray([[0, 3], [2, 2]], jnp.int32))),
                               r"^w\.col_slots holds an index out of range \[0, 3\)"),
    "counts_do_not_sum": (dict(w=_corrupt(_W, col_counts=jnp.asarray([2, 2], jnp.int32))),
                          r"^w\.col_counts must be in \[0, 2\] and sum to the 3 stored blocks"),
    "values_block_shape": (dict(w=_corrupt(_W, values=jnp.ones((3, 64, 128)))), r"^w\.values must have shape"),
    "block_shape_not_dividing": (dict(w=_corrupt(_W, block_shape=(96, 128))), r"^block_shape \(96, 128\) must divide"),
    "block_m_zero": (dict(block_m=0), r"^block_m=0 must be a positive int"),
    "tpu_block_m_unaligned": (dict(block_m=12, implementation="interpret_tpu"), r"^block_m=12 is illegal .* TPU"),
    "gpu_block_m_below_16": (dict(block_m=8, implementation="interpret_gpu"), r"^block_m=8 is illegal .* GPU"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_block_sparse_matmul_rejects_bad_input(bad):
  overrides, message = BAD_INPUTS[bad]
  kwargs = dict(x=_X, w=_W, implementation="interpret_tpu" if "block_m" in overrides else "reference") | overrides
  with pytest.raises(ValueError, match=message):
    block_sparse_matmul(**kwargs)


def test_kernels_refuse_their_illegal_block_shapes():
  w = from_dense(np.ones((64, 96), np.float32), (32, 48))  # 48: not a power of two, not 128-aligned
  with pytest.raises(ValueError, match=r"^block_shape\[0\]=32 is illegal for the TPU kernel"):
    block_sparse_matmul(jnp.ones((8, 64)), w, implementation="interpret_tpu")
  with pytest.raises(ValueError, match=r"^block_shape\[1\]=48 is illegal for the GPU \(Triton\) kernel"):
    block_sparse_matmul(jnp.ones((8, 64)), w, implementation="interpret_gpu")


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_shape=(96, 128)), r"^block_shape \(96, 128\) must divide the matrix shape \(256, 256\)"),
    (dict(block_shape=(128,)), r"^block_shape must be two positive ints"),
    (dict(block_mask=np.ones((3, 2))), r"^block_mask must have shape \(K/bk, N/bn\) = \(2, 2\)"),
    (dict(dense=np.ones(256)), r"^dense must be a non-empty 2-D array"),
])
def test_from_block_mask_rejects_bad_input(kwargs, message):
  arguments = dict(dense=np.ones((256, 256)), block_mask=np.ones((2, 2)), block_shape=(128, 128)) | kwargs
  with pytest.raises(ValueError, match=message):
    from_block_mask(**arguments)


def test_cost_matches_hand_count_and_scales_with_density():
  # m=40 (one 40-row block), k=n=512, 128x128 blocks (4x4 grid), 8 stored blocks, f32: every stored block moves
  # its x tile [40, 128] and its value block once; the output [40, 512] is written once; tables = 4 * (4 + 4*2 + 8).
  tables = 4 * (4 + 4 * 2 + 8)
  modeled = cost((40, 512), (512, 512), dtype=jnp.float32, nnz_blocks=8, block_shape=(128, 128))
  assert modeled == {"flops": 2 * 40 * 8 * 128 * 128,
                     "hbm_bytes": 4 * (8 * (40 * 128 + 128 * 128) + 40 * 512) + tables,
                     "ideal_bytes": 4 * (40 * 512 + 8 * 128 * 128 + 40 * 512) + tables}
  full = cost((512, 1536), (1536, 1536), dtype=jnp.bfloat16, nnz_blocks=144, block_shape=(128, 128))
  quarter = cost((512, 1536), (1536, 1536), dtype=jnp.bfloat16, nnz_blocks=36, block_shape=(128, 128))
  assert quarter["flops"] * 4 == full["flops"]
  output = 2 * 512 * 1536  # written once whatever the density
  assert (quarter["hbm_bytes"] - output) / (full["hbm_bytes"] - output) == pytest.approx(0.25, rel=0.01)
