"""Mosaic-TPU W8A8 matmul: a 3-D grid (M, N, K blocks), int8 MXU products accumulated in a VMEM int32 scratch;
the per-token and per-channel scales are applied once, after the last K step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _util

DEFAULT_BLOCKS = (256, 256, 2048)  # (block_m, block_n, block_k): int8 tiles are a quarter of f32's VMEM bytes
_K_CANDIDATES = (2048, 1536, 1024, 512, 256, 128)  # default block_k for K > 2048: the widest dividing K
INT8_SUBLANES = 32  # Mosaic tiles int8 arrays by (32, 128): four int8 rows share a 32-bit sublane


def resolve_blocks(m: int, k: int, n: int, block_m=None, block_n=None, block_k=None) -> tuple[int, int, int]:
  """(block_m, block_n, block_k) for int8 x [m, k] @ int8 w [k, n], checked against Mosaic's int8 tiling."""
  default_m, default_n, default_k = DEFAULT_BLOCKS
  if block_k is None and k > default_k:  # avoid padding K (and moving the padding) when a block divides it
    default_k = next((c for c in _K_CANDIDATES if k % c == 0), 512)
  return (_util.tpu_block("block_m", block_m, m, default=default_m, align=INT8_SUBLANES),  # sublanes of x
          _util.tpu_block("block_n", block_n, n, default=default_n, align=128),            # lanes of w / out
          _util.tpu_block("block_k", block_k, k, default=default_k, align=128))            # lanes of x


def _kernel(x_ref, x_scale_ref, w_ref, w_scale_ref, out_ref, acc_ref):
  k_step = pl.program_id(2)

  @pl.when(k_step == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.int32)

  @pl.when(k_step == pl.num_programs(2) - 1)
  def _finish():
    out = acc_ref[...].astype(jnp.float32) * x_scale_ref[...] * w_scale_ref[...]
    out_ref[...] = out.astype(out_ref.dtype)


def int8_matmul_2d(x_q, x_scale, w_q, w_scale, *, blocks=(None, None, None), out_dtype, interpret=False,
                   cost_estimate=None):
  """x_q [M, K] int8, x_scale [M, 1] f32, w_q [K, N] int8, w_scale [1, N] f32 -> [M, N] in `out_dtype`."""
  (m, k), n = x_q.shape, w_q.shape[1]
  block_m, block_n, block_k = resolve_blocks(m, k, n, *blocks)
  padded_m, padded_n, padded_k = (_util.round_up(m, block_m), _util.round_up(n, block_n),
                                  _util.round_up(k, block_k))
  out = pl.pallas_call(
      _kernel,
      out_shape=jax.ShapeDtypeStruct((padded_m, padded_n), out_dtype),
      grid=(padded_m // block_m, padded_n // block_n, padded_k // block_k),
      in_specs=[pl.BlockSpec((block_m, block_k), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((block_m, 1), lambda i, j, kk: (i, 0)),    # [M, 1]: the lane dim spans the array
                pl.BlockSpec((block_k, block_n), lambda i, j, kk: (kk, j)),
                pl.BlockSpec((1, block_n), lambda i, j, kk: (0, j))],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.int32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="int8_matmul",
  )(_util.pad_to(x_q, (padded_m, padded_k)), _util.pad_to(x_scale.astype(jnp.float32), (padded_m, 1)),
    _util.pad_to(w_q, (padded_k, padded_n)), _util.pad_to(w_scale.astype(jnp.float32), (1, padded_n)))
  return out[:m, :n]
