"""Triton-style GPU matmul: a 2-D grid over output tiles, each program looping over K in registers."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util

DEFAULT_BLOCKS = (64, 64, 32)  # (block_m, block_n, block_k)
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


def resolve_blocks(m: int, k: int, n: int, block_m=None, block_n=None, block_k=None) -> tuple[int, int, int]:
  """(block_m, block_n, block_k) for an [m, k] @ [k, n] product: powers of two >= 16, clamped to the dims."""
  default_m, default_n, default_k = DEFAULT_BLOCKS
  return (_util.gpu_block("block_m", block_m, m, default=default_m, minimum=MIN_BLOCK),
          _util.gpu_block("block_n", block_n, n, default=default_n, minimum=MIN_BLOCK),
          _util.gpu_block("block_k", block_k, k, default=default_k, minimum=MIN_BLOCK))


def _kernel(x_ref, w_ref, *refs, block_k: int, has_bias: bool):
  # x_ref holds block_m whole rows of x and w_ref block_n whole columns of w; the loop walks K in block_k steps.
  bias_ref = refs[0] if has_bias else None
  out_ref = refs[-1]

  def accumulate(step, acc):
    k_slice = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
    return acc + jnp.dot(x_ref[:, k_slice], w_ref[k_slice, :], preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, x_ref.shape[1] // block_k, accumulate, jnp.zeros(out_ref.shape, jnp.float32))
  if bias_ref is not None:
    acc += bias_ref[...].astype(jnp.float32)[None, :]
  out_ref[...] = acc.astype(out_ref.dtype)


def matmul_2d(x, w, bias, *, blocks=(None, None, None), out_dtype, interpret=False, cost_estimate=None):
  """`x [M, K] @ w [K, N] (+ bias [N])` -> [M, N] in `out_dtype`; ragged dims are zero-padded to whole blocks."""
  (m, k), n = x.shape, w.shape[1]
  block_m, block_n, block_k = resolve_blocks(m, k, n, *blocks)
  padded_m, padded_n, padded_k = (_util.round_up(m, block_m), _util.round_up(n, block_n),
                                  _util.round_up(k, block_k))
  operands = [_util.pad_to(x, (padded_m, padded_k)), _util.pad_to(w, (padded_k, padded_n))]
  in_specs = [pl.BlockSpec((block_m, padded_k), lambda i, j: (i, 0)),
              pl.BlockSpec((padded_k, block_n), lambda i, j: (0, j))]
  if bias is not None:
    operands.append(_util.pad_to(bias, (padded_n,)))
    in_specs.append(pl.BlockSpec((block_n,), lambda i, j: (j,)))
  out = pl.pallas_call(
      functools.partial(_kernel, block_k=block_k, has_bias=bias is not None),
      out_shape=jax.ShapeDtypeStruct((padded_m, padded_n), out_dtype),
      grid=(padded_m // block_m, padded_n // block_n),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),  # selects Triton over Mosaic GPU
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="matmul",
  )(*operands)
  return out[:m, :n]
