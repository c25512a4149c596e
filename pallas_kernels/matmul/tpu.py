"""Mosaic-TPU matmul: a 3-D grid (M blocks, N blocks, K blocks) accumulating into a VMEM f32 scratch."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _util

DEFAULT_BLOCKS = (128, 128, 128)  # (block_m, block_n, block_k): fills the 128x128 MXU, ~200 KiB of VMEM in f32


def resolve_blocks(m: int, k: int, n: int, block_m=None, block_n=None, block_k=None) -> tuple[int, int, int]:
  """(block_m, block_n, block_k) for an [m, k] @ [k, n] product, checked against Mosaic's (8, 128) tiling."""
  default_m, default_n, default_k = DEFAULT_BLOCKS
  return (_util.tpu_block("block_m", block_m, m, default=default_m, align=8),      # sublanes of x / out
          _util.tpu_block("block_n", block_n, n, default=default_n, align=128),    # lanes of w / out
          _util.tpu_block("block_k", block_k, k, default=default_k, align=128))    # lanes of x, sublanes of w


def _kernel(x_ref, w_ref, *refs, has_bias: bool):
  bias_ref = refs[0] if has_bias else None
  out_ref, acc_ref = refs[-2:]
  k_step = pl.program_id(2)

  @pl.when(k_step == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)

  # The output block stays resident in VMEM across the K axis; write it once, after the last K step.
  @pl.when(k_step == pl.num_programs(2) - 1)
  def _finish():
    acc = acc_ref[...]
    if bias_ref is not None:
      acc += bias_ref[...].astype(jnp.float32)
    out_ref[...] = acc.astype(out_ref.dtype)


def matmul_2d(x, w, bias, *, blocks=(None, None, None), out_dtype, interpret=False, cost_estimate=None):
  """`x [M, K] @ w [K, N] (+ bias [N])` -> [M, N] in `out_dtype`; ragged dims are zero-padded to whole blocks."""
  (m, k), n = x.shape, w.shape[1]
  block_m, block_n, block_k = resolve_blocks(m, k, n, *blocks)
  padded_m, padded_n, padded_k = (_util.round_up(m, block_m), _util.round_up(n, block_n),
                                  _util.round_up(k, block_k))
  operands = [_util.pad_to(x, (padded_m, padded_k)), _util.pad_to(w, (padded_k, padded_n))]
  in_specs = [pl.BlockSpec((block_m, block_k), lambda i, j, kk: (i, kk)),
              pl.BlockSpec((block_k, block_n), lambda i, j, kk: (kk, j))]
  if bias is not None:
    # A [1, N] row: its block's sublane dim (1) equals the array's, which Mosaic accepts.
    operands.append(_util.pad_to(bias.reshape(1, n), (1, padded_n)))
    in_specs.append(pl.BlockSpec((1, block_n), lambda i, j, kk: (0, j)))
  out = pl.pallas_call(
      functools.partial(_kernel, has_bias=bias is not None),
      out_shape=jax.ShapeDtypeStruct((padded_m, padded_n), out_dtype),
      grid=(padded_m // block_m, padded_n // block_n, padded_k // block_k),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
      # K carries the accumulator, so only M and N may be split across cores.
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="matmul",
  )(*operands)
  return out[:m, :n]
