"""Triton-style GPU block-sparse matmul: each program owns one output tile and loops over its stored blocks only.

Triton has no scalar prefetch: the block tables are ordinary (tiny) inputs read with scalar loads, and the loop
trip count is the tile's block count, so an empty column block costs one store of zeros. `bsr_weight_grad` runs
one program per stored block, reducing over M in `block_m` steps.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util

DEFAULT_BLOCK_M = 64
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


def check_block_shape(block_shape) -> None:
  for axis, block in enumerate(block_shape):
    if block & (block - 1) or block < MIN_BLOCK:
      raise ValueError(f"block_shape[{axis}]={block} is illegal for the GPU (Triton) kernel: it must be a power "
                       f"of two and at least {MIN_BLOCK}.")


def resolve_block_m(m: int, block_m=None) -> int:
  return _util.gpu_block("block_m", block_m, m, default=DEFAULT_BLOCK_M, minimum=MIN_BLOCK)


def _kernel(counts_ref, slots_ref, coord_ref, x_ref, v_ref, out_ref, *, width: int, block_k: int):
  j = pl.program_id(1)

  def accumulate(t, acc):
    block = slots_ref[j * width + t]
    k_slice = pl.ds(pl.multiple_of(coord_ref[block] * block_k, block_k), block_k)
    return acc + jnp.dot(x_ref[:, k_slice], v_ref[block], preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, counts_ref[j], accumulate, jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def bsr_matmul_2d(x, values, counts, slots, coord, *, block_m=None, out_dtype, interpret=False, cost_estimate=None):
  """`x [M, K] @ W` -> [M, N] (see tpu.bsr_matmul_2d for the table layout)."""
  m, k = x.shape
  nnz, bk, bn = values.shape
  nb, width = slots.shape
  check_block_shape((bk, bn))
  block_m = resolve_block_m(m, block_m)
  padded_m = _util.round_up(m, block_m)
  whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))
  out = pl.pallas_call(
      functools.partial(_kernel, width=width, block_k=bk),
      out_shape=jax.ShapeDtypeStruct((padded_m, nb * bn), out_dtype),
      grid=(padded_m // block_m, nb),
      in_specs=[whole((nb,)), whole((nb * width,)), whole((nnz,)),
                pl.BlockSpec((block_m, k), lambda i, j: (i, 0)), whole((nnz, bk, bn))],
      out_specs=pl.BlockSpec((block_m, bn), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="block_sparse_matmul",
  )(counts, slots.reshape(-1), coord, _util.pad_to(x, (padded_m, k)), values)
  return out[:m]


def _grad_kernel(rows_ref, cols_ref, x_ref, dy_ref, out_ref, *, block_m: int, block_k: int, block_n: int):
  b = pl.program_id(0)
  k_slice = pl.ds(pl.multiple_of(rows_ref[b] * block_k, block_k), block_k)
  n_slice = pl.ds(pl.multiple_of(cols_ref[b] * block_n, block_n), block_n)

  def accumulate(step, acc):
    m_slice = pl.ds(pl.multiple_of(step * block_m, block_m), block_m)
    return acc + jnp.dot(x_ref[m_slice, k_slice].T, dy_ref[m_slice, n_slice], preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, x_ref.shape[0] // block_m, accumulate, jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def bsr_weight_grad(x, dy, block_row, block_col, block_shape, *, out_dtype, block_m=None, interpret=False):
  """dvalues [nnz, bk, bn] with dvalues[b] = x[:, K block row[b]].T @ dy[:, N block col[b]]."""
  (m, k), n = x.shape, dy.shape[1]
  bk, bn = block_shape
  check_block_shape((bk, bn))
  nnz = block_row.shape[0]
  block_m = resolve_block_m(m, block_m)
  padded_m = _util.round_up(m, block_m)
  whole = lambda shape: pl.BlockSpec(shape, lambda b: (0,) * len(shape))
  return pl.pallas_call(
      functools.partial(_grad_kernel, block_m=block_m, block_k=bk, block_n=bn),
      out_shape=jax.ShapeDtypeStruct((nnz, bk, bn), out_dtype),
      grid=(nnz,),
      in_specs=[whole((nnz,)), whole((nnz,)), whole((padded_m, k)), whole((padded_m, n))],
      out_specs=pl.BlockSpec((None, bk, bn), lambda b: (b, 0, 0)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="block_sparse_matmul_weight_grad",
  )(block_row, block_col, _util.pad_to(x, (padded_m, k)), _util.pad_to(dy, (padded_m, n)))
