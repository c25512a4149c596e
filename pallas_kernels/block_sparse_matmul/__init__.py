"""`block_sparse_matmul(x, w)`: x @ W for a block-sparse W (`BlockSparseMatrix`), visiting only stored blocks.

W [K, N] is stored as its non-zero (bk, bn) blocks plus block index tables (see `layout`); build it with
`from_dense(dense, block_shape)` or `from_block_mask(dense, block_mask, block_shape)` on the host.

Implementations: 'reference' densifies and multiplies; 'xla' gathers the x blocks each stored block needs
(work ~ stored blocks); the Pallas kernels (tpu.py: scalar-prefetched block tables, megablox-style; gpu.py:
Triton loops over a tile's blocks) get one `jax.custom_vjp` here: dx = dy @ W.T is the forward kernel again
with the transposed table and XLA-transposed block values, and the gradient of the stored block values
dvalues[b] = x[:, rows(b)].T @ dy[:, cols(b)] is a second kernel over the stored blocks only. Gradients never
touch the zero blocks: the cotangent of `w` is a BlockSparseMatrix-shaped pytree whose `values` is [nnz, bk, bn].
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _dispatch, _util
from pallas_kernels.block_sparse_matmul import gpu, reference, tpu, xla
from pallas_kernels.block_sparse_matmul.layout import (BlockSparseMatrix, check_matrix, from_block_mask,
                                                       from_dense)

__all__ = ["BlockSparseMatrix", "IMPLEMENTATIONS", "block_sparse_matmul", "cost", "from_block_mask",
           "from_dense"]

IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu")
_KERNELS = _dispatch.kernel_modules(tpu=tpu, gpu=gpu)


def block_sparse_matmul(x, w: BlockSparseMatrix, *, implementation=None, block_m=None, out_dtype=None):
  """`x [..., K] @ w` -> [..., N] for a `BlockSparseMatrix` w of shape (K, N).

  x and w.values are float32 or bfloat16 (alike); products accumulate in f32; the result has `out_dtype`
  (default x.dtype). `block_m` tiles the rows of x (TPU: multiple of 8; GPU: power of two >= 16). The TPU
  kernel needs bk and bn to be multiples of 128 (or the whole K / N); the GPU kernel powers of two >= 16.
  `implementation`: None (the `pallas_kernels.implementation` policy, else by backend) or one of
  IMPLEMENTATIONS; see `pallas_kernels._dispatch`.
  """
  out_dtype = _check(x, w, out_dtype, block_m)
  implementation = _dispatch.choose(implementation, IMPLEMENTATIONS, op="block_sparse_matmul")
  if implementation in _KERNELS:
    _KERNELS[implementation].check_block_shape(*((w.shape, w.block_shape) if _dispatch.tpu_style(implementation)
                                                 else (w.block_shape,)))
  return _run(x, w, implementation=implementation, block_m=block_m, out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("implementation", "block_m", "out_dtype"))
def _run(x, w, *, implementation, block_m=None, out_dtype=None):
  """`block_sparse_matmul` without validation or dispatch (the lowering tests export the compiled kernels)."""
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if implementation == "reference":
    return reference.matmul(x, w, out_dtype=out_dtype)
  rows = x.reshape(-1, x.shape[-1])
  if w.nnz_blocks == 0:  # nothing stored: the product is zero (and so are both gradients)
    out = jnp.zeros((rows.shape[0], w.shape[1]), out_dtype)
  elif implementation == "xla":
    out = xla.matmul_2d(rows, w, out_dtype=out_dtype)
  else:
    out = _pallas_bsr(rows, w, out_dtype, block_m, implementation)
  return out.reshape(*x.shape[:-1], w.shape[1])


def _product_call(x, values, counts, slots, coord, out_dtype, block_m, implementation):
  """The kernel's x @ W for W as `values` [nnz, bk, bn] listed per output column block by (counts, slots)."""
  nnz, bk, bn = values.shape
  estimate = _util.cost_estimate(cost, x.shape, (x.shape[-1], slots.shape[0] * bn), dtype=x.dtype, nnz_blocks=nnz,
                                 block_shape=(bk, bn), max_blocks_per_col=slots.shape[1],
                                 implementation=implementation, blocks={"block_m": block_m})
  return _KERNELS[implementation].bsr_matmul_2d(
      x, values, counts, slots, coord, block_m=block_m, out_dtype=out_dtype,
      interpret=_dispatch.interpret_params(implementation), cost_estimate=estimate)


def _forward_call(x, w, out_dtype, block_m, implementation):
  return _product_call(x, w.values.astype(x.dtype), w.col_counts, w.col_slots, w.block_row, out_dtype, block_m,
                       implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _pallas_bsr(x, w, out_dtype, block_m, implementation):
  return _forward_call(x, w, out_dtype, block_m, implementation)


def _pallas_bsr_fwd(x, w, out_dtype, block_m, implementation):
  return _forward_call(x, w, out_dtype, block_m, implementation), (x, w)


def _pallas_bsr_bwd(out_dtype, block_m, implementation, residuals, dy):
  del out_dtype
  x, w = residuals
  kernels, interpret = _KERNELS[implementation], _dispatch.interpret_params(implementation)
  dy = dy.astype(x.dtype)  # the forward's operand dtype for the MXU; accumulation stays f32
  # dx = dy @ W.T: W.T's blocks are the stored blocks transposed, listed per K block by the row table.
  values_t = w.values.astype(x.dtype).transpose(0, 2, 1)
  dx = _product_call(dy, values_t, w.row_counts, w.row_slots, w.block_col, x.dtype, block_m, implementation)
  dvalues = kernels.bsr_weight_grad(x, dy, w.block_row, w.block_col, w.block_shape, out_dtype=w.values.dtype,
                                    interpret=interpret)
  return dx, _cotangent(w, dvalues)


_pallas_bsr.defvjp(_pallas_bsr_fwd, _pallas_bsr_bwd)


def _cotangent(w: BlockSparseMatrix, dvalues) -> BlockSparseMatrix:
  """w's cotangent: `dvalues` for the values, float0 zeros for the integer tables."""
  zero = lambda leaf: np.zeros(leaf.shape, jax.dtypes.float0)
  return BlockSparseMatrix(values=dvalues, block_row=zero(w.block_row), block_col=zero(w.block_col),
                           col_counts=zero(w.col_counts), col_slots=zero(w.col_slots),
                           row_counts=zero(w.row_counts), row_slots=zero(w.row_slots), shape=w.shape,
                           block_shape=w.block_shape)


def _check(x, w, out_dtype, block_m):
  """Raises one `ValueError` naming the first bad argument; returns the resolved output dtype."""
  if x.ndim < 1 or 0 in x.shape:
    raise ValueError(f"x must be a non-empty array [..., K]; got shape {tuple(x.shape)}.")
  check_matrix(w)
  if w.shape[0] != x.shape[-1]:
    raise ValueError(f"w.shape[0] ({w.shape[0]}) must equal x.shape[-1] (K={x.shape[-1]}); "
                     f"got x {tuple(x.shape)}, w {w.shape}.")
  _util.check_float_dtype("x", x.dtype)
  _util.check_float_dtype("w", w.values.dtype)
  if w.values.dtype != x.dtype:
    raise ValueError(f"w: dtype {w.values.dtype} must equal x's dtype {x.dtype} (cast one of them).")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  _util.check_float_dtype("out_dtype", out_dtype)
  _util.check_block_arg("block_m", block_m)
  return out_dtype


def cost(x_shape, w_shape, *, dtype, nnz_blocks: int, block_shape, max_blocks_per_col=None, block_m=None) -> dict:
  """Modelled cost of the TPU forward kernel for x [..., K] @ W, W of `w_shape` (K, N) with `nnz_blocks` stored
  (bk, bn) = `block_shape` blocks (a `BlockSparseMatrix` w gives w.shape, w.nnz_blocks, w.block_shape and
  max_blocks_per_col = w.col_slots.shape[1]).

  The grid (M/bm, N/bn, Tc) executes a product only for stored blocks, and every stored block's step fetches its
  x tile [bm, bk] and its value block [bk, bn] (an upper bound: consecutive steps that reuse a tile skip the
  copy), once per M block; the output is written once; the block tables (int32) are read once. So flops and the
  x / W traffic are proportional to block density. `ideal_bytes` reads x, the stored blocks and the tables once
  and writes the output once. `max_blocks_per_col` (Tc, default the balanced ceil(nnz/Nb)) sizes the table.
  """
  *leading, k = x_shape
  if len(w_shape) != 2 or w_shape[0] != k:
    raise ValueError(f"w_shape must be (K, N) with K = x_shape[-1] = {k}; got {tuple(w_shape)}.")
  m, n = math.prod(leading), w_shape[1]
  bk, bn = block_shape
  if k % bk or n % bn:
    raise ValueError(f"block_shape {tuple(block_shape)} must divide w_shape (K, N) = {(k, n)}.")
  kb, nb = k // bk, n // bn
  if not 0 <= nnz_blocks <= kb * nb:
    raise ValueError(f"nnz_blocks={nnz_blocks} must be in [0, {kb * nb}] for a {kb}x{nb} block grid.")
  block_m = tpu.resolve_block_m(m, block_m)
  padded_m = _util.round_up(m, block_m)
  m_blocks = padded_m // block_m
  width = max_blocks_per_col if max_blocks_per_col is not None else max(-(-nnz_blocks // nb), 1)
  itemsize = jnp.dtype(dtype).itemsize
  tables = 4 * (nb + nb * width + nnz_blocks)
  moved = m_blocks * nnz_blocks * (block_m * bk + bk * bn) + padded_m * n
  ideal = m * k + nnz_blocks * bk * bn + m * n
  return {"flops": 2 * padded_m * nnz_blocks * bk * bn, "hbm_bytes": moved * itemsize + tables,
          "ideal_bytes": ideal * itemsize + tables}
