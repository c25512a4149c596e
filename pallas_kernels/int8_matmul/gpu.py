"""Triton-style GPU W8A8 matmul: a 2-D grid over output tiles, each program looping over K with int8 tl.dot
into an int32 accumulator; scales applied once at the end."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util

DEFAULT_BLOCKS = (64, 64, 64)  # (block_m, block_n, block_k)
MIN_BLOCK = 16       # tl.dot needs every dimension >= 16
MIN_BLOCK_K = 32     # int8 MMA instructions contract 32 values


def resolve_blocks(m: int, k: int, n: int, block_m=None, block_n=None, block_k=None) -> tuple[int, int, int]:
  """(block_m, block_n, block_k): powers of two (>= 16; block_k >= 32), clamped to the dims."""
  default_m, default_n, default_k = DEFAULT_BLOCKS
  return (_util.gpu_block("block_m", block_m, m, default=default_m, minimum=MIN_BLOCK),
          _util.gpu_block("block_n", block_n, n, default=default_n, minimum=MIN_BLOCK),
          _util.gpu_block("block_k", block_k, k, default=default_k, minimum=MIN_BLOCK_K))


def _kernel(x_ref, x_scale_ref, w_ref, w_scale_ref, out_ref, *, block_k: int):
  def accumulate(step, acc):
    k_slice = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
    return acc + jnp.dot(x_ref[:, k_slice], w_ref[k_slice, :], preferred_element_type=jnp.int32)

  acc = lax.fori_loop(0, x_ref.shape[1] // block_k, accumulate, jnp.zeros(out_ref.shape, jnp.int32))
  out = acc.astype(jnp.float32) * x_scale_ref[...][:, None] * w_scale_ref[...][None, :]
  out_ref[...] = out.astype(out_ref.dtype)


def int8_matmul_2d(x_q, x_scale, w_q, w_scale, *, blocks=(None, None, None), out_dtype, interpret=False,
                   cost_estimate=None):
  """x_q [M, K] int8, x_scale [M, 1] f32, w_q [K, N] int8, w_scale [1, N] f32 -> [M, N] in `out_dtype`."""
  (m, k), n = x_q.shape, w_q.shape[1]
  block_m, block_n, block_k = resolve_blocks(m, k, n, *blocks)
  padded_m, padded_n, padded_k = (_util.round_up(m, block_m), _util.round_up(n, block_n),
                                  _util.round_up(k, block_k))
  out = pl.pallas_call(
      functools.partial(_kernel, block_k=block_k),
      out_shape=jax.ShapeDtypeStruct((padded_m, padded_n), out_dtype),
      grid=(padded_m // block_m, padded_n // block_n),
      in_specs=[pl.BlockSpec((block_m, padded_k), lambda i, j: (i, 0)),
                pl.BlockSpec((block_m,), lambda i, j: (i,)),
                pl.BlockSpec((padded_k, block_n), lambda i, j: (0, j)),
                pl.BlockSpec((block_n,), lambda i, j: (j,))],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),  # selects Triton over Mosaic GPU
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="int8_matmul",
  )(_util.pad_to(x_q, (padded_m, padded_k)), _util.pad_to(x_scale.astype(jnp.float32).reshape(m), (padded_m,)),
    _util.pad_to(w_q, (padded_k, padded_n)), _util.pad_to(w_scale.astype(jnp.float32).reshape(n), (padded_n,)))
  return out[:m, :n]
