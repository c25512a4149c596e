"""`BlockSparseMatrix`: a [K, N] matrix stored as its non-zero (bk, bn) blocks plus block index tables.

Storage (BSR-style, blocks ordered column-block-major so each output column block's blocks are contiguous):
- `values`      [nnz, bk, bn]   the stored blocks (the only differentiable leaf);
- `block_row`   [nnz] int32     K-block index of each stored block;
- `block_col`   [nnz] int32     N-block index of each stored block;
- `col_counts`  [Nb] int32      stored blocks per output column block;
- `col_slots`   [Nb, Tc] int32  ids (rows of `values`) of those blocks, padded to Tc = max(col_counts);
- `row_counts`  [Kb] int32, `row_slots` [Kb, Tr]: the same per K block (the transposed table, for dx = dy @ W.T).
Padding slots repeat the previous real id (the last id of the previous column when a column is empty), so a
kernel whose index maps read them asks for the block it already holds and Pallas' pipeline skips the copy.

The structure (which blocks are stored) is data: it is built on the host with NumPy (`from_dense`) and then
fixed; every shape in it is static, so the matrix is an ordinary pytree under jit, vmap of values, and grads.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSparseMatrix:
  values: jax.Array
  block_row: jax.Array
  block_col: jax.Array
  col_counts: jax.Array
  col_slots: jax.Array
  row_counts: jax.Array
  row_slots: jax.Array
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  block_shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

  @property
  def nnz_blocks(self) -> int:
    return int(self.values.shape[0])

  @property
  def grid_shape(self) -> tuple[int, int]:
    """(Kb, Nb): the number of block rows and block columns."""
    return self.shape[0] // self.block_shape[0], self.shape[1] // self.block_shape[1]

  @property
  def density(self) -> float:
    """Fraction of blocks stored."""
    kb, nb = self.grid_shape
    return self.nnz_blocks / (kb * nb)

  @property
  def dtype(self):
    return self.values.dtype

  def with_values(self, values) -> "BlockSparseMatrix":
    """The same structure holding other block values (e.g. the ones being differentiated)."""
    if tuple(values.shape) != tuple(self.values.shape):
      raise ValueError(f"values must have shape {tuple(self.values.shape)}; got {tuple(values.shape)}.")
    return dataclasses.replace(self, values=values)

  def astype(self, dtype) -> "BlockSparseMatrix":
    return dataclasses.replace(self, values=self.values.astype(dtype))

  def todense(self) -> jax.Array:
    """The dense [K, N] matrix (zeros outside the stored blocks); jit-able, exact."""
    (k, n), (bk, bn), (kb, nb) = self.shape, self.block_shape, self.grid_shape
    grid = jnp.zeros((kb, nb, bk, bn), self.values.dtype).at[self.block_row, self.block_col].set(self.values)
    return grid.transpose(0, 2, 1, 3).reshape(k, n)

  def nbytes(self) -> int:
    """Bytes of the stored values and index tables."""
    leaves = (self.values, self.block_row, self.block_col, self.col_counts, self.col_slots, self.row_counts,
              self.row_slots)
    return int(sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in leaves))


def check_block_shape(shape, block_shape) -> tuple[int, int]:
  """Validates `block_shape` (two positive ints dividing the matrix `shape`); returns it as a tuple."""
  if (not isinstance(block_shape, (tuple, list)) or len(block_shape) != 2
      or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0 for b in block_shape)):
    raise ValueError(f"block_shape must be two positive ints (bk, bn); got {block_shape!r}.")
  bk, bn = int(block_shape[0]), int(block_shape[1])
  if shape[0] % bk or shape[1] % bn:
    raise ValueError(f"block_shape {(bk, bn)} must divide the matrix shape {tuple(shape)} "
                     f"(K % bk == 0 and N % bn == 0).")
  return bk, bn


def _slots(owner: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-group counts and padded id tables for blocks whose group is `owner[id]` (ids in group order)."""
  counts = np.bincount(owner, minlength=groups).astype(np.int32)
  width = max(int(counts.max(initial=0)), 1)
  slots = np.zeros((groups, width), np.int32)
  previous = 0
  for group in range(groups):
    ids = np.flatnonzero(owner == group)
    if ids.size:
      slots[group, :ids.size] = ids
      previous = ids[-1]
    slots[group, ids.size:] = previous  # padding repeats a held block: no copy is issued for it
  return counts, slots


def from_block_mask(dense, block_mask, block_shape) -> BlockSparseMatrix:
  """Stores the blocks of `dense` [K, N] where `block_mask` [Kb, Nb] is True (entries elsewhere are dropped).

  Host-side (NumPy): the number of stored blocks decides the shapes, so call it outside jit.
  """
  dense = np.asarray(dense)
  if dense.ndim != 2 or 0 in dense.shape:
    raise ValueError(f"dense must be a non-empty 2-D array [K, N]; got shape {dense.shape}.")
  bk, bn = check_block_shape(dense.shape, block_shape)
  kb, nb = dense.shape[0] // bk, dense.shape[1] // bn
  block_mask = np.asarray(block_mask)
  if block_mask.shape != (kb, nb):
    raise ValueError(f"block_mask must have shape (K/bk, N/bn) = {(kb, nb)}; got {block_mask.shape}.")
  # Column-block-major order: transpose the block grid before listing the kept blocks.
  cols, rows = np.nonzero(block_mask.astype(bool).T)
  grid = dense.reshape(kb, bk, nb, bn).transpose(0, 2, 1, 3)
  values = grid[rows, cols]  # [nnz, bk, bn]
  col_counts, col_slots = _slots(cols, nb)
  # The transposed table lists, per K block, the ids of its blocks in increasing column order.
  order = np.lexsort((cols, rows))
  row_counts, row_slots_sorted = _slots(rows[order], kb)
  row_slots = order.astype(np.int32)[row_slots_sorted] if rows.size else row_slots_sorted
  return BlockSparseMatrix(
      values=jnp.asarray(values), block_row=jnp.asarray(rows.astype(np.int32)),
      block_col=jnp.asarray(cols.astype(np.int32)), col_counts=jnp.asarray(col_counts),
      col_slots=jnp.asarray(col_slots), row_counts=jnp.asarray(row_counts), row_slots=jnp.asarray(row_slots),
      shape=(int(dense.shape[0]), int(dense.shape[1])), block_shape=(bk, bn))


def from_dense(dense, block_shape) -> BlockSparseMatrix:
  """Stores every (bk, bn) block of `dense` that holds a non-zero; `todense()` gives `dense` back exactly."""
  dense = np.asarray(dense)
  if dense.ndim != 2 or 0 in dense.shape:
    raise ValueError(f"dense must be a non-empty 2-D array [K, N]; got shape {dense.shape}.")
  bk, bn = check_block_shape(dense.shape, block_shape)
  kb, nb = dense.shape[0] // bk, dense.shape[1] // bn
  block_mask = (dense.reshape(kb, bk, nb, bn) != 0).any(axis=(1, 3))
  return from_block_mask(dense, block_mask, (bk, bn))


def check_matrix(w: BlockSparseMatrix) -> None:
  """Raises a `ValueError` naming the field when a `BlockSparseMatrix` is internally inconsistent.

  Checks shapes always and index ranges when the tables are concrete (not under jit).
  """
  if not isinstance(w, BlockSparseMatrix):
    raise ValueError(f"w must be a BlockSparseMatrix (see block_sparse_matmul.from_dense); got {type(w).__name__}.")
  bk, bn = check_block_shape(w.shape, w.block_shape)
  kb, nb = w.grid_shape
  if w.values.ndim != 3 or tuple(w.values.shape[1:]) != (bk, bn):
    raise ValueError(f"w.values must have shape [nnz, {bk}, {bn}]; got {tuple(w.values.shape)}.")
  nnz = w.values.shape[0]
  expected = {"block_row": (nnz,), "block_col": (nnz,), "col_counts": (nb,), "row_counts": (kb,)}
  for name, shape in expected.items():
    if tuple(getattr(w, name).shape) != shape:
      raise ValueError(f"w.{name} must have shape {shape}; got {tuple(getattr(w, name).shape)}.")
  for name, groups in (("col_slots", nb), ("row_slots", kb)):
    table = getattr(w, name)
    if table.ndim != 2 or table.shape[0] != groups:
      raise ValueError(f"w.{name} must have shape [{groups}, max blocks per group]; got {tuple(table.shape)}.")
  for name in ("block_row", "block_col", "col_counts", "col_slots", "row_counts", "row_slots"):
    if getattr(w, name).dtype != jnp.int32:
      raise ValueError(f"w.{name} must be int32; got {getattr(w, name).dtype}.")
  if isinstance(w.block_row, jax.core.Tracer) or isinstance(w.col_slots, jax.core.Tracer):
    return
  ranges = {"block_row": kb, "block_col": nb, "col_slots": max(nnz, 1), "row_slots": max(nnz, 1)}
  for name, limit in ranges.items():
    table = np.asarray(getattr(w, name))
    if table.size and (table.min() < 0 or table.max() >= limit):
      raise ValueError(f"w.{name} holds an index out of range [0, {limit}): min {table.min()}, max {table.max()}.")
  for name, limit in (("col_counts", w.col_slots.shape[1]), ("row_counts", w.row_slots.shape[1])):
    counts = np.asarray(getattr(w, name))
    if counts.min(initial=0) < 0 or counts.max(initial=0) > limit or counts.sum() != nnz:
      raise ValueError(f"w.{name} must be in [0, {limit}] and sum to the {nnz} stored blocks; got {counts}.")
