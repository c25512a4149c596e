"""Plain-jnp weight-only quantized matmul: dequantize the whole weight in f32, then one f32-accumulating product.

This is the ground truth the kernels are tested against (besides `efficient.quant.dequantize`) and the XLA path
of the backward pass, dx = dy @ dequant(w).T.

Weight formats (the storage of `pallas_kernels.packing`, packed along K, the contraction dim):
  'int8'  w int8 [K, N] (symmetric) or uint8 [K, N] with zero points
  'int4'  w uint8 [K/2, N], planar nibbles; symmetric codes are offset-binary (q + 8), or unsigned with zeros
  'nf4'   w uint8 [K/2, N] NF4 codes; `scale` is the f32 absmax, or its int8 double-quantized codes with
          `scale_scale` [G, ceil(N/256)] (one f32 per 256 columns of a group row) and `scale_offset` []
`scale` [G, N] has one row per group of K/G consecutive rows of K (G = 1: per channel); `zero_point` uint8 [G, N].
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import packing

FORMATS = ("int8", "int4", "nf4")
BITS = {"int8": 8, "int4": 4, "nf4": 4}
DOUBLE_QUANT_BLOCK = 256  # columns per second-level NF4 scale


def unpacked_k(w, fmt: str) -> int:
  """K of the unpacked weight."""
  return w.shape[0] * 8 // BITS[fmt]


def group_scales(scale, scale_scale=None, scale_offset=None):
  """The f32 step (or NF4 absmax) per group and column [G, N], undoing NF4 double quantization if present."""
  scale = scale.astype(jnp.float32)
  if scale_scale is None:
    return scale
  columns = jnp.repeat(scale_scale.astype(jnp.float32), DOUBLE_QUANT_BLOCK, axis=1)[:, :scale.shape[1]]
  return scale * columns + jnp.reshape(scale_offset, ()).astype(jnp.float32)


def weight_values(w, fmt: str, zero_point=None):
  """Unscaled values [K, N] in f32: signed integers (zero points subtracted later) or NF4 levels."""
  codes = packing.unpack_int32(w, BITS[fmt])
  if fmt == "nf4":
    return packing.lookup(codes, packing.NF4_LEVELS)
  if fmt == "int4" and zero_point is None:
    codes = codes - 8  # offset-binary -> signed
  return codes.astype(jnp.float32)


def dequantize(w, scale, zero_point=None, *, fmt: str, scale_scale=None, scale_offset=None):
  """The f32 weight [K, N] that (w, scale, zero_point) stand for."""
  values = weight_values(w, fmt, zero_point)
  k = values.shape[0]
  group = k // scale.shape[0]
  if zero_point is not None:
    values = values - jnp.repeat(zero_point.astype(jnp.float32), group, axis=0)
  return values * jnp.repeat(group_scales(scale, scale_scale, scale_offset), group, axis=0)


def quant_matmul(x, w, scale, zero_point=None, *, fmt: str, scale_scale=None, scale_offset=None, out_dtype=None):
  """x [..., K] @ dequantize(w) [K, N] -> [..., N] in `out_dtype` (default x.dtype), f32 accumulation."""
  weight = dequantize(w, scale, zero_point, fmt=fmt, scale_scale=scale_scale, scale_offset=scale_offset)
  out = jnp.matmul(x.astype(jnp.float32), weight, preferred_element_type=jnp.float32)
  return out.astype(out_dtype or x.dtype)
