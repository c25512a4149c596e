"""Sparsity masks over [in, out] weight matrices (Flax layout): unstructured (per layer, per output, global),
N:M along the input dimension, and (bk x bn) blocks.

Every mask is a bool array of the weight's shape, True = kept. Masks are chosen from `scores` (|W| for
magnitude pruning, |W| * ||X_j|| for Wanda, ...); the lowest-scoring entries of each comparison group are pruned,
exactly floor(group size * sparsity) of them, ties broken by position (deterministic). The functions are pure
jnp (jit-able with static sparsity / n / m / block shape). `SparsityMask` is the nnx variable type a mask lives
in inside a module: it carries the weight's logical axis names, so it shards with its weight.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class SparsityMask(nnx.Variable):
  """A kept-weights mask (bool or 0/1) stored beside its weight; not a trainable parameter."""


def mask_variable(mask, names) -> SparsityMask:
  """`mask` as a SparsityMask carrying the logical axis `names` of the weight it masks."""
  names = tuple(names)
  if len(names) != mask.ndim:
    raise ValueError(f"names {names} must name each of the mask's {mask.ndim} axes (shape {tuple(mask.shape)}).")
  return SparsityMask(jnp.asarray(mask), out_sharding=names, eager_sharding=False)


def check_sparsity(sparsity) -> float:
  """A sparsity is the pruned fraction, a number in [0, 1) (1 would prune everything)."""
  if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating)) or not 0 <= sparsity < 1:
    raise ValueError(f"sparsity={sparsity!r} must be a number in [0, 1) (the fraction of weights pruned).")
  return float(sparsity)


def check_nm(n, m, in_features: int | None = None) -> tuple[int, int]:
  """N:M keeps n of every m consecutive inputs: 0 < n < m, and m must divide the input dimension."""
  for name, value in (("n", n), ("m", m)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive int (N:M keeps n of every m weights).")
  if not n < m:
    raise ValueError(f"n={n} must be smaller than m={m} (N:M keeps n of every m weights).")
  if in_features is not None and in_features % m:
    raise ValueError(f"m={m} must divide the input dimension ({in_features}) for N:M sparsity along it.")
  return int(n), int(m)


def _check_matrix(name: str, scores) -> None:
  if scores.ndim != 2 or 0 in scores.shape:
    raise ValueError(f"{name} must be a non-empty [in, out] matrix; got shape {tuple(scores.shape)}.")


def check_mask(mask, shape) -> None:
  """A mask must have exactly the weight's shape."""
  if tuple(np.shape(mask)) != tuple(shape):
    raise ValueError(f"mask has shape {tuple(np.shape(mask))}; the weight it masks has shape {tuple(shape)}.")


def _sortable_keys(scores):
  """float -> uint32 keys with the same order (sign-magnitude floats flipped to unsigned order)."""
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
  return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))


def _keep_top(scores, num_pruned, axis):
  """True except for the `num_pruned` lowest scores along `axis` (None: over all entries); ties pruned in order of
  position. `num_pruned` may be traced.

  Selection without sorting (XLA:CPU sorts ~1M floats in ~1.5 s): a 32-step bisection over the scores' uint32
  keys finds each group's num_pruned-th smallest key, then ties at that key are taken by position (cumsum).
  """
  if isinstance(num_pruned, int) and num_pruned == 0:
    return jnp.ones(scores.shape, bool)
  if axis is None:
    moved = scores.reshape(-1, 1)
  else:
    moved = jnp.moveaxis(scores, axis, 0)
    moved_shape = moved.shape
    moved = moved.reshape(moved.shape[0], -1)
  keys = _sortable_keys(moved)

  def bisect(_, bounds):
    low, high = bounds
    middle = low + (high - low) // 2
    enough = jnp.sum(keys <= middle[None, :], axis=0) >= num_pruned
    return jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high)

  groups = keys.shape[1]
  kth, _ = jax.lax.fori_loop(0, 32, bisect, (jnp.zeros((groups,), jnp.uint32),
                                             jnp.full((groups,), 0xFFFFFFFF, jnp.uint32)))
  below = keys < kth[None, :]
  ties = keys == kth[None, :]
  still_needed = num_pruned - jnp.sum(below, axis=0)
  pruned = below | (ties & (jnp.cumsum(ties, axis=0) <= still_needed[None, :]))
  if axis is None:
    return ~pruned.reshape(scores.shape)
  return jnp.moveaxis(~pruned.reshape(moved_shape), 0, axis)


def unstructured_mask(scores, sparsity: float, *, per_output: bool = False):
  """Prunes the floor(size * sparsity) lowest scores of the layer, or of each output column (`per_output`,
  Wanda's comparison group: each output's inputs compete among themselves)."""
  _check_matrix("scores", scores)
  sparsity = check_sparsity(sparsity)
  if per_output:
    return _keep_top(scores, int(scores.shape[0] * sparsity), axis=0)
  return _keep_top(scores, int(scores.size * sparsity), axis=None)


def global_masks(scores: Mapping[str, jax.Array], sparsity: float) -> dict[str, jax.Array]:
  """One threshold over every matrix of `scores` ({name: [in, out]}): floor(total * sparsity) pruned overall,
  so layers end up with different sparsities."""
  sparsity = check_sparsity(sparsity)
  if not scores:
    raise ValueError("scores must hold at least one matrix.")
  for name, s in scores.items():
    _check_matrix(f"scores[{name!r}]", s)
  flat = jnp.concatenate([jnp.asarray(s, jnp.float32).reshape(-1) for s in scores.values()])
  keep = _keep_top(flat, int(flat.size * sparsity), axis=None)
  masks, start = {}, 0
  for name, s in scores.items():
    masks[name] = keep[start:start + s.size].reshape(s.shape)
    start += s.size
  return masks


def nm_mask(scores, n: int, m: int):
  """N:M along the input dimension: in every group of m consecutive inputs of an output, keep the n highest."""
  _check_matrix("scores", scores)
  n, m = check_nm(n, m, scores.shape[0])
  grouped = scores.reshape(scores.shape[0] // m, m, scores.shape[1])
  return _keep_top(grouped, m - n, axis=1).reshape(scores.shape)


def check_block_shape(shape, block_shape) -> tuple[int, int]:
  if (not isinstance(block_shape, (tuple, list)) or len(block_shape) != 2
      or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in block_shape)):
    raise ValueError(f"block_shape must be two positive ints (bk, bn); got {block_shape!r}.")
  if shape[0] % block_shape[0] or shape[1] % block_shape[1]:
    raise ValueError(f"block_shape {tuple(block_shape)} must divide the weight shape {tuple(shape)}.")
  return int(block_shape[0]), int(block_shape[1])


def block_scores(scores, block_shape):
  """[K/bk, N/bn] sums of `scores` over each (bk, bn) block (|W| scores give each block's L1 norm)."""
  bk, bn = check_block_shape(scores.shape, block_shape)
  k, n = scores.shape
  return scores.reshape(k // bk, bk, n // bn, bn).sum(axis=(1, 3))


def block_mask(scores, block_shape, sparsity: float, *, return_blocks: bool = False):
  """Prunes the floor(#blocks * sparsity) (bk, bn) blocks of lowest total score; the mask is element-wise
  (and, with `return_blocks`, also the [K/bk, N/bn] block mask the block-sparse storage takes)."""
  _check_matrix("scores", scores)
  sparsity = check_sparsity(sparsity)
  per_block = block_scores(scores, block_shape)
  kept_blocks = _keep_top(per_block, int(per_block.size * sparsity), axis=None)
  bk, bn = block_shape
  mask = jnp.repeat(jnp.repeat(kept_blocks, bk, axis=0), bn, axis=1)
  return (mask, kept_blocks) if return_blocks else mask


def is_nm_sparse(matrix, n: int, m: int) -> bool:
  """True when every group of m consecutive inputs of every output holds at most n non-zeros."""
  n, m = check_nm(n, m, matrix.shape[0])
  nonzero = (np.asarray(matrix) != 0).reshape(matrix.shape[0] // m, m, -1).sum(axis=1)
  return bool(np.all(nonzero <= n))


def sparsity_of(matrix) -> float:
  """Fraction of exact zeros."""
  matrix = np.asarray(matrix)
  return float(np.mean(matrix == 0)) if matrix.size else 0.0


def num_pruned(size: int, sparsity: float) -> int:
  return int(math.floor(size * check_sparsity(sparsity)))


keep_top = _keep_top  # shared with SparseGPT's in-loop mask selection
