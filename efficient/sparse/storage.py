"""Compressed storage of sparse [in, out] weights, exact both ways.

- `NMArray`: N:M along the input dimension as the kept values [in*n/m, out] plus each value's position within
  its group of m, packed into uint8 (2 bits per index for m <= 4, 4 bits for m <= 16, 8 bits above): 2:4 of an
  f32 matrix is 0.5 + 1/32 of its dense bytes (2 bits per kept value = 1 bit per entry), of bf16 0.5 + 1/16.
- `BitmaskArray`: unstructured sparsity as the kept values (row-major) plus one bit per entry (np.packbits):
  50% of an f32 matrix is 0.5 + 1/32 of its dense bytes. Host-side (the kept count sets the shapes).
- Block sparse: `pallas_kernels.block_sparse_matmul.BlockSparseMatrix` (block values + BSR index tables), which
  `block_sparse_matmul` multiplies visiting only the stored blocks; `compress_blocks` builds it from a weight and
  a block mask.
Both carry the dense weight's logical axis names (`names`) so layers can annotate what they store with them:
the kept values of an N:M array keep ('in name', 'out name') (the input axis shrinks by n/m, so a mesh axis
that divided it may no longer, and the sharding rules then replicate it).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from efficient.sparse import masks as masks_lib
from pallas_kernels.block_sparse_matmul import BlockSparseMatrix, from_block_mask


def index_bits(m: int) -> int:
  """Bits per stored position within a group of m (a power of two, so indices pack whole into bytes)."""
  return 2 if m <= 4 else 4 if m <= 16 else 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMArray:
  values: jax.Array    # [in * n / m, out], group g's kept values at rows g*n .. g*n+n-1, in position order
  indices: jax.Array   # uint8 [ceil(in * n / m / per_byte), out]: positions in [0, m), packed along rows
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  n: int = dataclasses.field(metadata=dict(static=True))
  m: int = dataclasses.field(metadata=dict(static=True))
  names: tuple | None = dataclasses.field(default=None, metadata=dict(static=True))

  def positions(self) -> jax.Array:
    """Unpacked positions [in * n / m, out] (int32, each in [0, m))."""
    bits = index_bits(self.m)
    per_byte = 8 // bits
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
    unpacked = (self.indices[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    rows = self.values.shape[0]
    return unpacked.reshape(-1, self.shape[1])[:rows].astype(jnp.int32)

  def todense(self) -> jax.Array:
    """The dense [in, out] matrix (jit-able, exact)."""
    k, n_out = self.shape
    groups = k // self.m
    positions = self.positions().reshape(groups, self.n, n_out)
    values = self.values.reshape(groups, self.n, n_out)
    one_hot = positions[:, :, None, :] == jnp.arange(self.m)[None, None, :, None]  # [G, n, m, out]
    dense = jnp.sum(jnp.where(one_hot, values[:, :, None, :], 0), axis=1)
    return dense.reshape(k, n_out).astype(self.values.dtype)

  def nbytes(self) -> int:
    return int(self.values.size * self.values.dtype.itemsize + self.indices.size)


def compress_nm(dense, n: int, m: int, *, mask=None, names=None) -> NMArray:
  """Stores an N:M-sparse [in, out] matrix: the entries `mask` keeps (default: its non-zeros), which must be at
  most n per group of m consecutive inputs; groups with fewer fill their remaining slots with stored zeros."""
  dense = jnp.asarray(dense)
  if dense.ndim != 2 or 0 in dense.shape:
    raise ValueError(f"dense must be a non-empty [in, out] matrix; got shape {tuple(dense.shape)}.")
  n, m = masks_lib.check_nm(n, m, dense.shape[0])
  if mask is None:
    mask = dense != 0
  masks_lib.check_mask(mask, dense.shape)
  mask = jnp.asarray(mask, bool)
  k, n_out = dense.shape
  grouped_mask = mask.reshape(k // m, m, n_out)
  if not isinstance(grouped_mask, jax.core.Tracer) and int(jnp.max(grouped_mask.sum(axis=1))) > n:
    raise ValueError(f"mask keeps more than n={n} of some group of m={m} inputs; it is not {n}:{m} sparse.")
  # Kept positions first (in position order), then the unused ones: a stable sort on "not kept".
  order = jnp.argsort(~grouped_mask, axis=1, stable=True)[:, :n, :]  # [G, n, out]
  values = jnp.take_along_axis(jnp.where(mask, dense, 0).reshape(k // m, m, n_out), order, axis=1)
  bits = index_bits(m)
  per_byte = 8 // bits
  rows = (k // m) * n
  flat = order.reshape(rows, n_out).astype(jnp.uint8)
  padded = jnp.pad(flat, ((0, -rows % per_byte), (0, 0))).reshape(-1, per_byte, n_out)
  packed = jnp.zeros(padded[:, 0].shape, jnp.uint8)
  for slot in range(per_byte):
    packed = packed | (padded[:, slot] << (slot * bits)).astype(jnp.uint8)
  return NMArray(values=values.reshape(rows, n_out), indices=packed, shape=(k, n_out), n=n, m=m,
                 names=None if names is None else tuple(names))


@dataclasses.dataclass(frozen=True)
class BitmaskArray:
  values: np.ndarray   # [nnz] the kept entries in row-major order
  bits: np.ndarray     # uint8 [ceil(in * out / 8)]: the kept mask, packed
  shape: tuple[int, int]
  names: tuple | None = None

  def todense(self) -> np.ndarray:
    size = int(np.prod(self.shape))
    mask = np.unpackbits(self.bits, count=size).astype(bool)
    dense = np.zeros(size, self.values.dtype)
    dense[mask] = self.values
    return dense.reshape(self.shape)

  def nbytes(self) -> int:
    return int(self.values.nbytes + self.bits.nbytes)


def compress_bitmask(dense, *, mask=None, names=None) -> BitmaskArray:
  """Stores the entries `mask` keeps (default: the non-zeros) of a matrix and the packed mask; exact."""
  dense = np.asarray(dense)
  if dense.ndim != 2 or 0 in dense.shape:
    raise ValueError(f"dense must be a non-empty [in, out] matrix; got shape {dense.shape}.")
  mask = dense != 0 if mask is None else np.asarray(mask, bool)
  masks_lib.check_mask(mask, dense.shape)
  return BitmaskArray(values=dense[mask], bits=np.packbits(mask.reshape(-1)), shape=tuple(dense.shape),
                      names=None if names is None else tuple(names))


def compress_blocks(dense, block_shape, *, block_mask=None) -> BlockSparseMatrix:
  """Block-sparse storage of [in, out] `dense`: the blocks `block_mask` [in/bk, out/bn] keeps (default: the blocks
  holding a non-zero). Host-side (the number of kept blocks sets the shapes)."""
  dense = np.asarray(dense)
  if dense.ndim != 2 or 0 in dense.shape:
    raise ValueError(f"dense must be a non-empty [in, out] matrix; got shape {dense.shape}.")
  bk, bn = masks_lib.check_block_shape(dense.shape, block_shape)
  if block_mask is None:
    block_mask = np.asarray(masks_lib.block_scores(jnp.asarray(dense != 0, jnp.float32), (bk, bn))) > 0
  return from_block_mask(dense, block_mask, (bk, bn))


def dense_nbytes(shape, dtype) -> int:
  return int(np.prod(shape)) * jnp.dtype(dtype).itemsize
