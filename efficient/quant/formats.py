"""Quantization formats: the registry and the round-to-nearest math of each, on N-d arrays.

Layout (shared by every format, and by `QArray`): codes keep the array's own N-d shape, except that sub-byte
codes are packed along one axis (`axis`, the first contraction axis) with the planar layout of
`pallas_kernels.packing`, the layout the quant_matmul kernels read. Scales (and zero points) are N-d arrays of
the same rank, broadcast by *tiles* (qwix's "generic broadcast"): `scale.shape[i]` divides `shape[i]`, and
scale element j of axis i covers the values [j * t_i, (j + 1) * t_i) of that axis, t_i = shape[i] / scale.shape[i]
(`broadcast_tiles`). So size 1 on an axis means one scale along all of it, the full size one per index, and
anything between groups of consecutive indices. `scale_shape` derives the shape from a granularity:

  tensor    all ones                                       [1, 1]       for a [K, N] weight
  channel   1 on the contraction axes, full elsewhere      [1, N]
  group     shape[axis] / group_size on the (single) contraction axis, full elsewhere   [K/g, N]

For a 2-D [K, N] weight along axis 0 that is exactly what the kernels take (codes [bits*K/8, N], scales [G, N]).

  int8, int4, int3, int2   uniform RTN. Symmetric: q in [-(2^(b-1)-1), 2^(b-1)-1], scale = absmax / qmax; int8 is
                           stored as int8, narrower widths as offset-binary codes q + 2^(b-1), packed.
                           Asymmetric: the range [min(x, 0), max(x, 0)] -> codes 0 .. 2^b-1 with a zero point
                           (uint8, one per scale); int8 is then stored as uint8. The steps are separate functions
                           (`int_params` scales, `int_codes` rounding, `encode_int` storage, and back), so GPTQ
                           rounds its rows with the very code RTN uses.
  nf4                      QLoRA: per-block absmax (block 64 along the axis) and the 16 NormalFloat levels; with
                           `double_quant` (default) the absmax constants are themselves quantized (below).
  fp8_e4m3, fp8_e5m2       x / scale cast to jnp.float8_e4m3fn / float8_e5m2 (round to nearest even, saturated
                           at the format's max), scale = absmax / max per tensor, channel or group; f32 scales.
  mxfp8, mxfp4             OCP MX v1.0: blocks of 32 along the axis share an E8M0 scale 2^e (uint8, e + 127) with
                           e = floor(log2(absmax)) - emax(element); elements are E4M3 (1 byte) or E2M1 (FP4,
                           4 bits: sign + 3-bit magnitude code, packed two per byte), saturating conversion.

An all-zero (or tiny) group dequantizes to exactly (or nearly) zero in every format: int and fp8 scales and the
NF4 divisor fall back to 1.0 where the absmax is 0, NF4 stores the true absmax 0, and MX multiplies by the normal
2^-e rather than dividing by the subnormal 2^e of e = -127. Non-finite input is refused (`qarray.check_finite`).

NF4 double quantization (QLoRA section 3): the f32 absmax constants c2 (one per 64 weights) minus their mean
are quantized to 8 bits in blocks of 256 constants, each block with one f32 scale. A block is 256 consecutive
constants along the *block axis*: the last axis that is not a contraction axis (the last axis if all are), i.e.
for a [K, N] weight 256 neighbouring output columns of one group row, so a kernel's N tile (a multiple of 256 or
a divisor of it) meets whole blocks. `scale_scale` has the scale's rank, ceil(size / 256) on the block axis. We
use int8 codes (absmax-scaled) for the 8-bit constants where bitsandbytes uses its dynamic 8-bit float map: int8
converts cheaply inside a TPU kernel; the recovered absmax differs from the f32 one by < 0.4% of the block's
spread either way. Cost: 8/64 + 32/(64*256) bits.

Per-group int scales default to bfloat16 (half the bytes of f32 scales: int4-g128 costs 0.516 bytes/param),
rounded *up* to bf16 so that no value is clipped and RTN's |x - dequant(q)| <= scale/2 still holds.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import packing

DOUBLE_QUANT_BLOCK = 256  # QLoRA: absmax constants are double-quantized in blocks of 256
NF4_BLOCK = 64            # QLoRA's default block size for the first-level absmax
MX_BLOCK = 32             # OCP MX: elements per shared scale


@dataclasses.dataclass(frozen=True)
class Format:
  """A quantization format's static description."""
  name: str
  kind: str            # 'int' | 'nf4' | 'fp8' | 'mx'
  bits: int            # bits per stored value
  element_dtype: object = None  # jnp float8 dtype of 'fp8' and 'mxfp8' elements
  fixed_group: int | None = None  # 'mx' blocks are always 32; None: the caller's granularity
  asymmetric_ok: bool = False

  @property
  def packed(self) -> bool:
    return self.bits < 8


FORMATS = {f.name: f for f in (
    Format("int8", "int", 8, asymmetric_ok=True),
    Format("int4", "int", 4, asymmetric_ok=True),
    Format("int3", "int", 3, asymmetric_ok=True),
    Format("int2", "int", 2, asymmetric_ok=True),
    Format("nf4", "nf4", 4),
    Format("fp8_e4m3", "fp8", 8, element_dtype=jnp.float8_e4m3fn),
    Format("fp8_e5m2", "fp8", 8, element_dtype=jnp.float8_e5m2),
    Format("mxfp8", "mx", 8, element_dtype=jnp.float8_e4m3fn, fixed_group=MX_BLOCK),
    Format("mxfp4", "mx", 4, fixed_group=MX_BLOCK),
)}


def get(name) -> Format:
  """The `Format` called `name`, or a `ValueError` listing the formats."""
  if isinstance(name, Format):
    return name
  if name not in FORMATS:
    raise ValueError(f"fmt={name!r} is not a quantization format; choose one of {tuple(FORMATS)}.")
  return FORMATS[name]



# --- the N-d layout: contraction axes, scale shapes, tile broadcasting -------------------------------------------

def contraction_axes(axis, ndim: int) -> tuple:
  """`axis` (an int or a tuple of ints, negatives allowed) as a sorted tuple of non-negative axes."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted(a % ndim for a in axes))


def scale_shape(shape, axis, group_size: int, per_tensor: bool) -> tuple:
  """The scale shape of a granularity (module docstring): all ones per tensor; else 1 on the contraction axes,
  except shape[axis] / group_size on a single contraction axis (per channel: group_size = its size)."""
  if per_tensor:
    return (1,) * len(shape)
  axes = contraction_axes(axis, len(shape))
  out = [1 if i in axes else d for i, d in enumerate(shape)]
  if len(axes) == 1:
    out[axes[0]] = shape[axes[0]] // group_size
  return tuple(out)


def block_axis(ndim: int, axis) -> int:
  """NF4 double quantization's block axis: the last non-contraction axis (the last axis if there is none)."""
  axes = contraction_axes(axis, ndim)
  others = [i for i in range(ndim) if i not in axes]
  return others[-1] if others else ndim - 1


def reduce_tiles(x, scale_shape_, op):
  """`op` (jnp.max, jnp.min, ...) over each tile of x -> an array of `scale_shape_` (each dim divides x's)."""
  split = []
  for d, s in zip(x.shape, scale_shape_):
    split += [s, d // s]
  return op(x.reshape(split), axis=tuple(range(1, 2 * x.ndim, 2)))


def broadcast_tiles(s, shape):
  """A scale-like array s -> `shape`: element j of axis i covers values [j * t_i, (j + 1) * t_i) of that axis,
  t_i = shape[i] / s.shape[i]."""
  shape = tuple(shape)
  if s.shape == shape:
    return s
  tiled, full = [], []
  for d, n in zip(shape, s.shape):
    tiled += [n, 1]
    full += [n, d // n]
  return jnp.broadcast_to(s.reshape(tiled), full).reshape(shape)


def round_up_to(scale, dtype):
  """`scale` in `dtype`, rounded towards +inf so that x / scale never exceeds the code range."""
  dtype = jnp.dtype(dtype)
  rounded = scale.astype(dtype)
  if dtype == jnp.float32:
    return rounded
  return jnp.where(rounded.astype(jnp.float32) < scale, jnp.nextafter(rounded, jnp.asarray(jnp.inf, dtype)),
                   rounded)


# --- uniform integer ------------------------------------------------------------------------------------------

def int_params(x, fmt: Format, scale_shape_, symmetric: bool, scale_dtype):
  """RTN's scale (in `scale_dtype`) and uint8 zero point (None if symmetric) per tile of x (f32)."""
  if symmetric:
    scale = reduce_tiles(jnp.abs(x), scale_shape_, jnp.max) / (2 ** (fmt.bits - 1) - 1)
    return round_up_to(jnp.where(scale > 0, scale, 1.0), scale_dtype), None
  levels = 2 ** fmt.bits - 1
  low = jnp.minimum(reduce_tiles(x, scale_shape_, jnp.min), 0.0)   # the range includes 0, so 0 is exact
  high = jnp.maximum(reduce_tiles(x, scale_shape_, jnp.max), 0.0)
  scale = (high - low) / levels
  scale = round_up_to(jnp.where(scale > 0, scale, 1.0), scale_dtype)
  zero = jnp.clip(jnp.round(-low / scale.astype(jnp.float32)), 0, levels)
  return scale, zero.astype(jnp.uint8)


def int_codes(x, scale, zero_point, fmt: Format, symmetric: bool):
  """RTN codes of x, scale/zero_point already broadcast against x: integer-valued f32, signed in [-qmax, qmax]
  when symmetric, else 0 .. 2^b-1 (zero point added)."""
  q = jnp.round(x / scale.astype(jnp.float32))
  if symmetric:
    qmax = 2 ** (fmt.bits - 1) - 1
    return jnp.clip(q, -qmax, qmax)
  return jnp.clip(q + zero_point.astype(jnp.float32), 0, 2 ** fmt.bits - 1)


def int_values(codes, scale, zero_point=None):
  """The f32 values that integer codes stand for: (codes - zero_point) * scale (broadcast against codes)."""
  codes = codes.astype(jnp.float32)
  if zero_point is not None:
    codes = codes - zero_point.astype(jnp.float32)
  return codes * scale.astype(jnp.float32)


def encode_int(codes, fmt: Format, symmetric: bool, axis: int = 0):
  """Integer codes (as `int_codes` returns them) -> storage: int8 (symmetric) or uint8 (asymmetric) at 8 bits;
  sub-byte codes offset-binary (q + 2^(b-1), symmetric) or as they are, packed along `axis`."""
  if fmt.bits == 8:
    return codes.astype(jnp.int8 if symmetric else jnp.uint8)
  if symmetric:
    codes = codes + 2 ** (fmt.bits - 1)
  return packing.pack(codes.astype(jnp.uint8), fmt.bits, axis=axis)


def decode_int(qvalue, fmt: Format, symmetric: bool, axis: int = 0):
  """Inverse of `encode_int`: storage -> integer-valued f32 codes."""
  if fmt.bits == 8:
    return qvalue.astype(jnp.float32)
  codes = packing.unpack(qvalue, fmt.bits, axis=axis).astype(jnp.float32)
  return codes - 2 ** (fmt.bits - 1) if symmetric else codes


def quantize_int(x, fmt: Format, group_size: int, per_tensor: bool, symmetric: bool, scale_dtype, axis=0):
  """RTN of x (f32) to `fmt.bits`-bit integers along `axis` -> (qvalue, scale, zero_point or None)."""
  shape = scale_shape(x.shape, axis, group_size, per_tensor)
  scale, zero = int_params(x, fmt, shape, symmetric, scale_dtype)
  codes = int_codes(x, broadcast_tiles(scale, x.shape), None if zero is None else broadcast_tiles(zero, x.shape),
                    fmt, symmetric)
  return encode_int(codes, fmt, symmetric, contraction_axes(axis, x.ndim)[0]), scale, zero


def dequantize_int(qvalue, scale, zero_point, fmt: Format, shape, axis=0):
  codes = decode_int(qvalue, fmt, zero_point is None, contraction_axes(axis, len(shape))[0])
  zero = None if zero_point is None else broadcast_tiles(zero_point, shape)
  return int_values(codes, broadcast_tiles(scale, shape), zero)


# --- NF4 -----------------------------------------------------------------------------------------------------

def nf4_codes(normalized):
  """Nearest NF4 level index of each value in [-1, 1] (ties to the lower level)."""
  levels = np.asarray(packing.NF4_LEVELS, np.float32)
  midpoints = jnp.asarray((levels[1:] + levels[:-1]) / 2)
  return jnp.searchsorted(midpoints, normalized, side="left").astype(jnp.uint8)


def double_quantize(absmax, axis: int):
  """QLoRA double quantization of f32 absmax constants in blocks of 256 along `axis` -> (int8 codes of absmax's
  shape, f32 block scales with ceil(size / 256) on `axis`, f32 mean)."""
  offset = jnp.mean(absmax)
  centred = jnp.moveaxis(absmax - offset, axis, -1)
  r = centred.shape[-1]
  blocks = -(-r // DOUBLE_QUANT_BLOCK)
  padded = jnp.pad(centred, [(0, 0)] * (centred.ndim - 1) + [(0, blocks * DOUBLE_QUANT_BLOCK - r)])
  block_scale = jnp.max(jnp.abs(padded.reshape(*centred.shape[:-1], blocks, DOUBLE_QUANT_BLOCK)), axis=-1) / 127.0
  block_scale = jnp.moveaxis(jnp.where(block_scale > 0, block_scale, 1.0), -1, axis)
  codes = jnp.round(jnp.moveaxis(centred, -1, axis) / expand_blocks(block_scale, r, axis))
  return jnp.clip(codes, -127, 127).astype(jnp.int8), block_scale, offset


def expand_blocks(block_scale, size: int, axis: int):
  """Block scales -> one per constant: each repeated over its 256 constants along `axis`, cut to `size`."""
  repeated = jnp.repeat(block_scale, DOUBLE_QUANT_BLOCK, axis=axis)
  return jax.lax.slice_in_dim(repeated, 0, size, axis=axis)


def nf4_absmax(scale, scale_scale, scale_offset, axis: int):
  """The first-level absmax in f32: `scale` itself, or its double-quantized reconstruction (blocks on `axis`)."""
  if scale_scale is None:
    return scale.astype(jnp.float32)
  return scale.astype(jnp.float32) * expand_blocks(scale_scale, scale.shape[axis], axis) + scale_offset


def quantize_nf4(x, group_size: int, double_quant: bool, axis: int = 0):
  """NF4 of x (f32) in blocks of `group_size` along `axis` -> (packed codes, absmax or its int8 codes,
  f32 block scales or None, f32 mean or None)."""
  absmax = reduce_tiles(jnp.abs(x), scale_shape(x.shape, axis, group_size, False), jnp.max)
  # An all-zero block keeps absmax 0 (its codes are NF4's exact 0 level, so any reconstructed absmax gives 0):
  # a placeholder 1.0 would widen the double-quantization block it falls in for its neighbours.
  divisor = jnp.where(absmax > 0, absmax, 1.0)
  packed = packing.pack(nf4_codes(x / broadcast_tiles(divisor, x.shape)), 4, axis=axis)
  if not double_quant:
    return packed, absmax, None, None
  return (packed, *double_quantize(absmax, block_axis(x.ndim, axis)))


def dequantize_nf4(qvalue, scale, scale_scale, scale_offset, shape, axis: int = 0):
  values = packing.lookup(packing.unpack(qvalue, 4, axis=axis), packing.NF4_LEVELS)
  absmax = nf4_absmax(scale, scale_scale, scale_offset, block_axis(len(shape), axis))
  return values * broadcast_tiles(absmax, shape)


# --- fp8 -----------------------------------------------------------------------------------------------------

def quantize_fp8(x, fmt: Format, group_size: int, per_tensor: bool, axis=0):
  fmax = float(jnp.finfo(fmt.element_dtype).max)
  scale = reduce_tiles(jnp.abs(x), scale_shape(x.shape, axis, group_size, per_tensor), jnp.max) / fmax
  scale = jnp.where(scale > 0, scale, 1.0).astype(jnp.float32)
  scaled = jnp.clip(x / broadcast_tiles(scale, x.shape), -fmax, fmax)  # e4m3fn has no inf: saturate
  return scaled.astype(fmt.element_dtype), scale


def dequantize_fp8(qvalue, scale, shape):
  return qvalue.astype(jnp.float32) * broadcast_tiles(scale, shape)


# --- OCP MX --------------------------------------------------------------------------------------------------

_MX_EMAX = {8: 8, 4: 2}  # exponent of the element format's largest normal: E4M3 448 = 1.75 * 2^8, E2M1 6 = 1.5 * 2^2


def e2m1_codes(values):
  """Round-to-nearest-even E2M1 codes (bit 3 = sign) of values already within [-6, 6]."""
  magnitudes = jnp.asarray(packing.E2M1_MAGNITUDES, jnp.float32)
  distance = jnp.abs(jnp.abs(values)[..., None] - magnitudes)
  # Ties go to the even code (mantissa bit 0), as IEEE round-to-nearest-even does.
  distance = distance + jnp.asarray([0.0, 1e-6] * 4, jnp.float32)
  code = jnp.argmin(distance, axis=-1).astype(jnp.uint8)
  return jnp.where(values < 0, code | 8, code)


def quantize_mx(x, fmt: Format, axis: int = 0):
  absmax = reduce_tiles(jnp.abs(x), scale_shape(x.shape, axis, MX_BLOCK, False), jnp.max)
  exponent = jnp.floor(jnp.log2(jnp.where(absmax > 0, absmax, 1.0))) - _MX_EMAX[fmt.bits]
  exponent = jnp.clip(jnp.where(absmax > 0, exponent, -127), -127, 127)
  # x * 2^-e, not x / 2^e: an all-zero or tiny block has e = -127, whose 2^e is subnormal (flushed to 0 on CPU
  # and TPU, so x / 2^e would be 0 / 0 = NaN); 2^-e (<= 2^127, and >= 2^-125 since |x| < 2^128) is a normal
  # float, so the product is exact and a zero block stays zero (its scale 2^-127 dequantizes it to 0 or ~0).
  elements = x * broadcast_tiles(_pow2(-exponent), x.shape)
  scale = (exponent + 127).astype(jnp.uint8)  # E8M0: a biased exponent, no sign, no mantissa
  if fmt.bits == 8:
    fmax = float(jnp.finfo(fmt.element_dtype).max)
    return jnp.clip(elements, -fmax, fmax).astype(fmt.element_dtype), scale
  return packing.pack(e2m1_codes(jnp.clip(elements, -6.0, 6.0)), 4, axis=axis), scale


def mx_scale_values(scale):
  """E8M0 codes -> the f32 powers of two they encode."""
  return _pow2(scale.astype(jnp.int32) - 127)


def _pow2(exponent):
  """2.0 ** exponent, exactly (ldexp; exp2 may be off by an ulp on some backends)."""
  return jnp.ldexp(jnp.ones(exponent.shape, jnp.float32), exponent.astype(jnp.int32))


def dequantize_mx(qvalue, scale, fmt: Format, shape, axis: int = 0):
  if fmt.bits == 8:
    elements = qvalue.astype(jnp.float32)
  else:
    elements = packing.lookup(packing.unpack(qvalue, 4, axis=axis), packing.E2M1_LEVELS)
  return elements * broadcast_tiles(mx_scale_values(scale), shape)
