"""Sparse replacements for any linear layer (`efficient.nn.Einsum`, `nnx.Linear`, `nnx.Einsum`) by path, without
editing the model. Both keep the layer's bias (the same float Param): y = x (W * mask) + b.

- `SparseEinsum` (training): the dense kernel plus a `SparsityMask` with the kernel's logical axes (so it shards
  with it; a kernel without names, a plain nnx.Linear's, gives None axes); the forward uses kernel * mask, so
  masked weights get no gradient from the loss.
- `BlockSparseEinsum` (inference): the kernel's [in, out] matrix view stored block-sparse (block values as a
  Param, block tables as `BlockTable` variables); the forward flattens the input, runs
  `pallas_kernels.block_sparse_matmul` (visiting only stored blocks) and restores the einsum's output layout.
  Block values [nnz, bk, bn] carry logical names (None, in, out): bk indexes rows of the matrix view, i.e. the
  kernel's contracted axis, bn its output axis, so each block splits like the dense kernel would (fine for the
  XLA path; a Pallas kernel gets whole blocks gathered by the partitioner). The stored-block axis and a matrix
  side flattened from several kernel axes (attention/o's heads x head_dim) stay unnamed (replicated), as do the
  integer block tables.
- `apply_masks(model, masks)` / `to_block_sparse(model, pattern, block_shape)` swap modules by path (`pattern`
  matches paths in full, `re.fullmatch`).
"""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient import calibration
from efficient.sparse import masks as masks_lib
from efficient.sparse import storage
from pallas_kernels.block_sparse_matmul import BlockSparseMatrix, block_sparse_matmul


_TABLES = ("block_row", "block_col", "col_counts", "col_slots", "row_counts", "row_slots")


class BlockTable(nnx.Variable):
  """Integer block index tables of a block-sparse weight (not trainable)."""


def _names(variable: nnx.Variable):
  return variable.get_metadata().get("out_sharding")


class SparseEinsum(nnx.Module):
  """`einsum(equation, x, kernel * mask) [+ bias]`: a masked linear layer with the same `kernel` (and `bias`)
  parameters, at the same path."""

  def __init__(self, equation: str, kernel: nnx.Param, mask, compute_dtype, *, bias: nnx.Param | None = None):
    masks_lib.check_mask(mask, kernel[...].shape)
    self.equation = equation
    self.compute_dtype = compute_dtype
    self.kernel = kernel
    self.bias = bias
    names = _names(kernel) or (None,) * kernel[...].ndim
    self.mask = masks_lib.mask_variable(jnp.asarray(mask, bool), names)

  @classmethod
  def from_einsum(cls, module, mask, *, zero_masked: bool = True) -> "SparseEinsum":
    """Wraps a linear layer's kernel (zeroing the masked weights unless told not to) with `mask` [kernel shape]."""
    view = calibration.linear_view(module)
    kernel = module.kernel
    masks_lib.check_mask(mask, kernel[...].shape)
    if zero_masked:
      kernel[...] = jnp.where(jnp.asarray(mask, bool), kernel[...], 0).astype(kernel[...].dtype)
    return cls(view.equation, kernel, mask, view.compute_dtype, bias=calibration.bias_of(module))

  def __call__(self, x):
    kernel = jnp.where(self.mask[...], self.kernel[...], 0).astype(self.compute_dtype or x.dtype)
    y = jnp.einsum(self.equation, x, kernel)
    bias = None if self.bias is None else self.bias[...]
    return calibration.add_bias(self.equation, y, bias, x.ndim, kernel.shape)


class BlockSparseEinsum(nnx.Module):
  """A linear layer whose [in, out] matrix view is stored block-sparse and multiplied by the block-sparse kernel
  (+ the layer's bias)."""

  def __init__(self, equation: str, kernel_shape, matrix: BlockSparseMatrix, compute_dtype, *,
               implementation=None, value_names=(None, None, None), bias: nnx.Param | None = None):
    self.equation = equation
    self.kernel_shape = tuple(kernel_shape)
    self.compute_dtype = compute_dtype
    self.implementation = implementation
    self.bias = bias
    self.shape, self.block_shape = matrix.shape, matrix.block_shape
    if len(tuple(value_names)) != 3:
      raise ValueError(f"value_names={value_names!r} must name the 3 axes of the values [nnz, bk, bn].")
    self.values = nnx.Param(matrix.values, out_sharding=tuple(value_names), eager_sharding=False)
    for name in _TABLES:
      setattr(self, name, BlockTable(getattr(matrix, name)))

  @classmethod
  def from_einsum(cls, module, block_shape, *, block_mask=None, implementation=None) -> "BlockSparseEinsum":
    """Stores a linear layer's (or a SparseEinsum's) kernel: the blocks of its matrix view holding a non-zero, or
    those `block_mask` keeps."""
    view = calibration.linear_view(module)
    matrix = np.asarray(calibration.kernel_as_matrix(module))
    stored = storage.compress_blocks(matrix, block_shape, block_mask=block_mask)
    return cls(view.equation, view.kernel.shape, stored, view.compute_dtype, implementation=implementation,
               value_names=block_value_names(module), bias=calibration.bias_of(module))

  def matrix(self) -> BlockSparseMatrix:
    return BlockSparseMatrix(values=self.values[...], shape=self.shape, block_shape=self.block_shape,
                             **{name: getattr(self, name)[...] for name in _TABLES})

  def __call__(self, x):
    dtype = self.compute_dtype or x.dtype
    rows = calibration.inputs_as_matrix(self.equation, x).astype(dtype)
    matrix = self.matrix().astype(dtype)
    out = block_sparse_matmul(rows, matrix, implementation=self.implementation)
    y = calibration.outputs_from_matrix(self.equation, out, x.shape, self.kernel_shape)
    bias = None if self.bias is None else self.bias[...]
    return calibration.add_bias(self.equation, y, bias, x.ndim, self.kernel_shape)

  def nbytes(self) -> int:
    return self.matrix().nbytes()


def block_value_names(module) -> tuple:
  """(None, in, out): the logical names of a block-sparse copy's values [nnz, bk, bn], taken from the kernel's
  names when one kernel axis is contracted (rows) / kept (columns); None where several axes are flattened."""
  names = _names(module.kernel)
  if names is None:
    return (None, None, None)
  spec = calibration.parse_equation(calibration.equation_of(module))
  side = lambda axes: names[spec["rhs"].index(axes[0])] if len(axes) == 1 else None
  return (None, side(spec["contract"]), side(spec["outputs"]))


def apply_masks(model, masks: Mapping[str, object]) -> dict[str, SparseEinsum]:
  """Replaces each linear layer at a path of `masks` ({path: kernel-shaped mask}) by a SparseEinsum, in place."""
  modules = calibration.einsum_modules(model)
  if not modules:
    raise ValueError(f"model ({type(model).__name__}) has no linear layer (efficient.nn.Einsum, nnx.Linear, "
                     f"nnx.Einsum) to mask.")
  unknown = [path for path in masks if path not in modules]
  if unknown:
    raise ValueError(f"masks: no linear layer at {unknown[:3]} (the model's paths look like {list(modules)[:3]}).")
  swapped = {}
  for path, mask in masks.items():
    swapped[path] = SparseEinsum.from_einsum(modules[path], mask)
    calibration.set_module(model, path, swapped[path])
  return swapped


def to_block_sparse(model, pattern: str, block_shape, *, implementation=None) -> dict[str, BlockSparseEinsum]:
  """Replaces every linear layer (or SparseEinsum) whose path matches `pattern` in full by a BlockSparseEinsum
  storing the blocks of its (masked) kernel that hold a non-zero, in place. Returns {path: new module}."""
  modules = calibration.einsum_modules(model, pattern, types=calibration.LINEAR_TYPES + (SparseEinsum,))
  if not modules:
    raise ValueError(f"pattern={pattern!r} matches no linear layer path in full (re.fullmatch).")
  swapped = {}
  for path, module in modules.items():
    if isinstance(module, SparseEinsum):  # store exactly what the masked forward uses
      module.kernel[...] = jnp.where(module.mask[...], module.kernel[...], 0).astype(module.kernel[...].dtype)
    swapped[path] = BlockSparseEinsum.from_einsum(module, block_shape, implementation=implementation)
    calibration.set_module(model, path, swapped[path])
  return swapped
