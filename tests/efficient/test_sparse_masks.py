"""Sparsity masks and compressed storage: exact kept counts against NumPy re-derivations, N:M validity, exact
dense <-> compressed round trips, measured bytes, logical axes, bad inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient import sparse
from efficient.sparse import masks, storage


def _scores(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_mask_prunes_exactly_the_lowest_scores(sparsity):
  scores = jnp.abs(_scores((64, 48)))
  mask = np.asarray(sparse.unstructured_mask(scores, sparsity))
  pruned = int(64 * 48 * sparsity)
  assert (~mask).sum() == pruned
  flat = np.asarray(scores).ravel()
  if pruned:  # every pruned score is <= every kept score (NumPy's order, independently)
    assert flat[~mask.ravel()].max() <= flat[mask.ravel()].min()
  per_output = np.asarray(sparse.unstructured_mask(scores, sparsity, per_output=True))
  assert np.all((~per_output).sum(axis=0) == int(64 * sparsity))  # each output column prunes its own share
  expected = np.argsort(np.argsort(np.asarray(scores), axis=0, kind="stable"), axis=0, kind="stable") >= int(
      64 * sparsity)
  np.testing.assert_array_equal(per_output, expected)


def test_global_masks_share_one_threshold():
  scores = {"a": jnp.abs(_scores((32, 16), 1)) * 3.0, "b": jnp.abs(_scores((16, 8), 2))}
  result = sparse.global_masks(scores, 0.5)
  total = 32 * 16 + 16 * 8
  assert sum(int((~np.asarray(m)).sum()) for m in result.values()) == total // 2
  kept = np.concatenate([np.asarray(scores[k])[np.asarray(result[k])] for k in scores])
  dropped = np.concatenate([np.asarray(scores[k])[~np.asarray(result[k])] for k in scores])
  assert dropped.max() <= kept.min()
  assert sparse.sparsity_of(result["b"]) > sparse.sparsity_of(result["a"])  # the larger-scaled layer keeps more


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_the_top_n_of_each_group_along_inputs(n, m):
  scores = jnp.abs(_scores((32, 12)))
  mask = np.asarray(sparse.nm_mask(scores, n, m))
  groups = mask.reshape(32 // m, m, 12)
  assert np.all(groups.sum(axis=1) == n)
  grouped_scores = np.asarray(scores).reshape(32 // m, m, 12)
  kept_min = np.where(groups, grouped_scores, np.inf).min(axis=1)
  dropped_max = np.where(groups, -np.inf, grouped_scores).max(axis=1)
  assert np.all(dropped_max <= kept_min)
  assert sparse.is_nm_sparse(np.asarray(scores) * mask, n, m)


def test_block_mask_drops_the_weakest_blocks():
  scores = jnp.abs(_scores((64, 96)))
  scores = scores.at[:32, 32:64].multiply(0.01)  # block (0, 1) at 32x32 is by far the weakest
  mask, blocks = sparse.block_mask(scores, (32, 32), 0.2, return_blocks=True)
  assert blocks.shape == (2, 3) and int((~np.asarray(blocks)).sum()) == 1 and not bool(blocks[0, 1])
  np.testing.assert_array_equal(np.asarray(mask), np.kron(np.asarray(blocks), np.ones((32, 32))).astype(bool))


@pytest.mark.parametrize("n, m, dtype", [(2, 4, jnp.float32), (4, 8, jnp.bfloat16), (1, 4, jnp.float32),
                                         (2, 8, jnp.float32)])
def test_nm_storage_round_trip_is_exact_and_small(n, m, dtype):
  weight = _scores((64, 40), 3).astype(dtype)
  mask = sparse.nm_mask(jnp.abs(weight.astype(jnp.float32)), n, m)
  pruned = jnp.where(mask, weight, 0)
  packed = sparse.compress_nm(pruned, n, m, names=("embed", "mlp"))
  np.testing.assert_array_equal(np.asarray(packed.todense(), np.float32), np.asarray(pruned, np.float32))
  # Same result from an explicit mask, and through jit (a pytree with static n, m, names).
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: a.todense())(
      sparse.compress_nm(pruned, n, m, mask=mask)), np.float32), np.asarray(pruned, np.float32))
  bits = storage.index_bits(m)
  itemsize = jnp.dtype(dtype).itemsize
  assert packed.values.shape == (64 * n // m, 40) and packed.names == ("embed", "mlp")
  assert packed.nbytes() == 64 * n // m * 40 * itemsize + -(-64 * n // m * bits // 8) * 40
  assert packed.indices.dtype == jnp.uint8


def test_nm_storage_keeps_zeros_inside_a_group_with_fewer_non_zeros():
  dense = np.zeros((8, 2), np.float32)
  dense[1, 0], dense[6, 1], dense[7, 1] = 5.0, -2.0, 3.0  # group 0 of column 0 has one non-zero, column 1 none
  np.testing.assert_array_equal(np.asarray(sparse.compress_nm(dense, 2, 4).todense()), dense)


def test_bitmask_storage_round_trip_is_exact_and_small():
  weight = np.asarray(_scores((64, 40), 5))
  pruned = weight * np.asarray(sparse.unstructured_mask(jnp.abs(jnp.asarray(weight)), 0.5))
  stored = sparse.compress_bitmask(pruned)
  np.testing.assert_array_equal(stored.todense(), pruned)
  assert stored.nbytes() == 64 * 40 // 2 * 4 + 64 * 40 // 8  # half the f32 values + one bit per entry


def test_block_storage_round_trip_is_exact():
  weight = np.asarray(_scores((64, 96), 4))
  mask, blocks = sparse.block_mask(jnp.abs(jnp.asarray(weight)), (32, 32), 0.5, return_blocks=True)
  pruned = weight * np.asarray(mask)
  stored = sparse.compress_blocks(pruned, (32, 32))
  np.testing.assert_array_equal(np.asarray(stored.todense()), pruned)
  assert stored.nnz_blocks == 3 and stored.density == 0.5
  stored_by_mask = sparse.compress_blocks(pruned, (32, 32), block_mask=np.asarray(blocks))
  np.testing.assert_array_equal(np.asarray(stored_by_mask.values), np.asarray(stored.values))


def test_mask_variable_carries_logical_axes():
  variable = sparse.mask_variable(jnp.ones((4, 8), bool), ("embed", "mlp"))
  assert isinstance(variable, sparse.SparsityMask)
  assert variable.get_metadata()["out_sharding"] == ("embed", "mlp")
  with pytest.raises(ValueError, match=r"^names \('embed',\) must name each of the mask's 2 axes"):
    sparse.mask_variable(jnp.ones((4, 8), bool), ("embed",))


_S = jnp.ones((8, 12))
BAD = {
    "sparsity_one": (lambda: sparse.unstructured_mask(_S, 1.0), r"^sparsity=1.0 must be a number in \[0, 1\)"),
    "sparsity_negative": (lambda: sparse.block_mask(_S, (4, 4), -0.1), r"^sparsity=-0.1 must be"),
    "sparsity_string": (lambda: sparse.global_masks({"a": _S}, "half"), r"^sparsity='half' must be"),
    "nm_not_dividing": (lambda: sparse.nm_mask(jnp.ones((6, 4)), 2, 4), r"^m=4 must divide the input dimension \(6\)"),
    "n_not_below_m": (lambda: sparse.nm_mask(_S, 4, 4), r"^n=4 must be smaller than m=4"),
    "n_zero": (lambda: sparse.nm_mask(_S, 0, 4), r"^n=0 must be a positive int"),
    "block_not_dividing": (lambda: sparse.block_mask(_S, (3, 5), 0.5), r"^block_shape \(3, 5\) must divide"),
    "block_shape_bad": (lambda: sparse.block_mask(_S, (4,), 0.5), r"^block_shape must be two positive ints"),
    "scores_rank": (lambda: sparse.unstructured_mask(jnp.ones(8), 0.5), r"^scores must be a non-empty \[in, out\]"),
    "mask_shape": (lambda: sparse.compress_nm(_S, 2, 4, mask=jnp.ones((8, 4), bool)),
                   r"^mask has shape \(8, 4\); the weight it masks has shape \(8, 12\)"),
    "mask_not_nm": (lambda: sparse.compress_nm(_S, 2, 4), r"^mask keeps more than n=2 of some group of m=4"),
    "block_storage_not_dividing": (lambda: sparse.compress_blocks(np.ones((8, 12)), (3, 4)),
                                   r"^block_shape \(3, 4\) must divide"),
}


@pytest.mark.parametrize("bad", BAD)
def test_bad_input_raises_naming_the_argument(bad):
  fn, message = BAD[bad]
  with pytest.raises(ValueError, match=message):
    fn()
