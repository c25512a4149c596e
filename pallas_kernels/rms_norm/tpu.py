"""Mosaic-TPU RMSNorm: a 1-D grid over row blocks, each holding whole rows (D is never split)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _util
from pallas_kernels.rms_norm import reference

# 256 rows x D 576 (SmolLM2) in bf16 is a 288 KiB block; x, dy and dx double-buffered stay inside the default
# scoped-VMEM limit up to D = 4096 in bf16 (12 MiB). Pass a smaller block_rows for wider rows.
DEFAULT_BLOCK_ROWS = 256
_PARALLEL = pltpu.CompilerParams(dimension_semantics=("parallel",))  # row blocks are independent


def resolve_block_rows(rows: int, block_rows=None) -> int:
  return _util.tpu_block("block_rows", block_rows, rows, default=DEFAULT_BLOCK_ROWS, align=8)


def _forward_kernel(x_ref, weight_ref, y_ref, *, eps):
  x = x_ref[...].astype(jnp.float32)
  y = reference.normalize_rows(x, weight_ref[...].astype(jnp.float32), eps=eps, feature_dim=x.shape[-1])
  y_ref[...] = y.astype(y_ref.dtype)


def _backward_kernel(x_ref, weight_ref, dy_ref, dx_ref, dweight_ref, *, eps):
  x = x_ref[...].astype(jnp.float32)
  dx, dweight = reference.backward_rows(x, weight_ref[...].astype(jnp.float32), dy_ref[...].astype(jnp.float32),
                                        eps=eps, feature_dim=x.shape[-1])
  dx_ref[...] = dx.astype(dx_ref.dtype)
  dweight_ref[...] = dweight  # this block's partial sum; the caller adds the blocks


def _row_specs(block_rows, d):
  # Whole rows per block (the lane dim equals the array's D, legal for any D); weight is one [1, D] block
  # whose index never changes, so the pipeline fetches it once.
  return pl.BlockSpec((block_rows, d), lambda i: (i, 0)), pl.BlockSpec((1, d), lambda i: (0, 0))


def forward(x, weight, *, eps, block_rows=None, interpret=False, cost_estimate=None):
  """RMSNorm of x [R, D] (rows padded to whole blocks) -> [R, D] in x.dtype."""
  rows, d = x.shape
  block_rows = resolve_block_rows(rows, block_rows)
  padded_rows = _util.round_up(rows, block_rows)
  row_spec, weight_spec = _row_specs(block_rows, d)
  y = pl.pallas_call(
      functools.partial(_forward_kernel, eps=eps),
      out_shape=jax.ShapeDtypeStruct((padded_rows, d), x.dtype),
      grid=(padded_rows // block_rows,),
      in_specs=[row_spec, weight_spec],
      out_specs=row_spec,
      compiler_params=_PARALLEL,
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="rms_norm_forward",
  )(_util.pad_to(x, (padded_rows, d)), weight.reshape(1, d))
  return y[:rows]


def backward(x, weight, dy, *, eps, block_rows=None, interpret=False):
  """(dx [R, D] in x.dtype, per-block partial dweight [blocks, D] in f32) for the RMSNorm of x [R, D]."""
  rows, d = x.shape
  block_rows = resolve_block_rows(rows, block_rows)
  padded_rows = _util.round_up(rows, block_rows)
  num_blocks = padded_rows // block_rows
  row_spec, weight_spec = _row_specs(block_rows, d)
  dx, dweight_partials = pl.pallas_call(
      functools.partial(_backward_kernel, eps=eps),
      out_shape=(jax.ShapeDtypeStruct((padded_rows, d), x.dtype),
                 # [blocks, 1, D] so each [1, D] block spans its array's last two dims, as Mosaic requires.
                 jax.ShapeDtypeStruct((num_blocks, 1, d), jnp.float32)),
      grid=(num_blocks,),
      in_specs=[row_spec, weight_spec, row_spec],
      out_specs=(row_spec, pl.BlockSpec((None, 1, d), lambda i: (i, 0, 0))),
      compiler_params=_PARALLEL,
      interpret=interpret,
      name="rms_norm_backward",
  )(_util.pad_to(x, (padded_rows, d)), weight.reshape(1, d), _util.pad_to(dy, (padded_rows, d)))
  return dx[:rows], dweight_partials.reshape(num_blocks, d)
