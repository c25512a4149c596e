"""Quantization formats: the registry and the round-to-nearest math of each, on a canonical 2-D view.

Every format works on `x2` [K, R] -- the contraction axis moved first and the other axes flattened -- cut into
`num_groups` groups of `group_size` consecutive rows of K (per-tensor and per-channel are one group spanning K;
per-tensor also shares one scale across R). Scales are [num_groups, R] ([1, 1] per-tensor). Sub-byte codes are
packed along K with the planar layout of `pallas_kernels._packing`, the layout the quant_matmul kernels read.

  int8, int4, int3, int2   uniform RTN. Symmetric: q in [-(2^(b-1)-1), 2^(b-1)-1], scale = absmax / qmax; int8 is
                           stored as int8, narrower widths as offset-binary codes q + 2^(b-1), packed.
                           Asymmetric: the range [min(x, 0), max(x, 0)] -> codes 0 .. 2^b-1 with a zero point
                           (uint8, one per scale); int8 is then stored as uint8.
  nf4                      QLoRA: per-block absmax (block 64 along K) and the 16 NormalFloat levels; with
                           `double_quant` (default) the absmax constants are themselves quantized (below).
  fp8_e4m3, fp8_e5m2       x / scale cast to jnp.float8_e4m3fn / float8_e5m2 (round to nearest even, saturated
                           at the format's max), scale = absmax / max per tensor, channel or group; f32 scales.
  mxfp8, mxfp4             OCP MX v1.0: blocks of 32 along K share an E8M0 scale 2^e (uint8, e + 127) with
                           e = floor(log2(absmax)) - emax(element); elements are E4M3 (1 byte) or E2M1 (FP4,
                           4 bits: sign + 3-bit magnitude code, packed two per byte), saturating conversion.

NF4 double quantization (QLoRA section 3): the f32 absmax constants c2 (one per 64 weights) minus their mean
are quantized to 8 bits in blocks of 256 constants, each block with one f32 scale. A block is 256 consecutive
constants of one group row, i.e. 256 neighbouring output columns, so a kernel's N tile (a multiple of 256 or
a divisor of it) meets whole blocks. We use int8 codes (absmax-scaled) for the 8-bit constants where
bitsandbytes uses its dynamic 8-bit float map: int8 converts cheaply inside a TPU kernel; the recovered
absmax differs from the f32 one by < 0.4% of the block's spread either way. Cost: 8/64 + 32/(64*256) bits.

Per-group int scales default to bfloat16 (half the bytes of f32 scales: int4-g128 costs 0.516 bytes/param),
rounded *up* to bf16 so that no value is clipped and RTN's |x - dequant(q)| <= scale/2 still holds.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from pallas_kernels import _packing

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


def groups(x2, group_size: int):
  """[K, R] -> [K / group_size, group_size, R]."""
  return x2.reshape(x2.shape[0] // group_size, group_size, x2.shape[1])


def _reduce(values, per_tensor: bool, op):
  """Reduces [G, g, R] over each group (and over R per-tensor) -> [G, R] (or [1, 1])."""
  out = op(values, axis=1)
  return op(out, axis=(0, 1), keepdims=True) if per_tensor else out


def round_up_to(scale, dtype):
  """`scale` in `dtype`, rounded towards +inf so that x / scale never exceeds the code range."""
  dtype = jnp.dtype(dtype)
  rounded = scale.astype(dtype)
  if dtype == jnp.float32:
    return rounded
  return jnp.where(rounded.astype(jnp.float32) < scale, jnp.nextafter(rounded, jnp.asarray(jnp.inf, dtype)),
                   rounded)


def _expand(per_group, group_size: int, k: int, r: int):
  """[G, R] or [1, 1] -> [K, R] by repeating each group's row."""
  return jnp.broadcast_to(jnp.repeat(per_group, group_size, axis=0), (k, r)) if per_group.shape[0] > 1 \
      else jnp.broadcast_to(per_group, (k, r))


# --- uniform integer ------------------------------------------------------------------------------------------

def quantize_int(x2, fmt: Format, group_size: int, per_tensor: bool, symmetric: bool, scale_dtype):
  """RTN to `fmt.bits`-bit integers -> (qvalue, scale, zero_point or None)."""
  g = groups(x2, group_size)
  levels = 2 ** fmt.bits - 1
  if symmetric:
    qmax = 2 ** (fmt.bits - 1) - 1
    scale = _reduce(jnp.abs(g), per_tensor, jnp.max) / qmax
    scale = round_up_to(jnp.where(scale > 0, scale, 1.0), scale_dtype)
    q = jnp.clip(jnp.round(x2 / _expand(scale.astype(jnp.float32), group_size, *x2.shape)), -qmax, qmax)
    if fmt.bits == 8:
      return q.astype(jnp.int8), scale, None
    return _packing.pack((q + 2 ** (fmt.bits - 1)).astype(jnp.uint8), fmt.bits), scale, None
  low = jnp.minimum(_reduce(g, per_tensor, jnp.min), 0.0)   # the range includes 0, so 0 is exact
  high = jnp.maximum(_reduce(g, per_tensor, jnp.max), 0.0)
  scale = (high - low) / levels
  scale = round_up_to(jnp.where(scale > 0, scale, 1.0), scale_dtype)
  scale32 = scale.astype(jnp.float32)
  zero = jnp.clip(jnp.round(-low / scale32), 0, levels)
  q = jnp.round(x2 / _expand(scale32, group_size, *x2.shape)) + _expand(zero, group_size, *x2.shape)
  q = jnp.clip(q, 0, levels).astype(jnp.uint8)
  return (q if fmt.bits == 8 else _packing.pack(q, fmt.bits)), scale, zero.astype(jnp.uint8)


def dequantize_int(qvalue, scale, zero_point, fmt: Format, k: int, group_size: int):
  if fmt.bits == 8:
    q = qvalue.astype(jnp.float32)
  else:
    q = _packing.unpack(qvalue, fmt.bits).astype(jnp.float32)
    if zero_point is None:
      q = q - 2 ** (fmt.bits - 1)
  r = q.shape[1]
  if zero_point is not None:
    q = q - _expand(zero_point.astype(jnp.float32), group_size, k, r)
  return q * _expand(scale.astype(jnp.float32), group_size, k, r)


# --- NF4 -----------------------------------------------------------------------------------------------------

def nf4_codes(normalized):
  """Nearest NF4 level index of each value in [-1, 1] (ties to the lower level)."""
  levels = np.asarray(_packing.NF4_LEVELS, np.float32)
  midpoints = jnp.asarray((levels[1:] + levels[:-1]) / 2)
  return jnp.searchsorted(midpoints, normalized, side="left").astype(jnp.uint8)


def double_quantize(absmax):
  """QLoRA double quantization of f32 absmax [G, R] -> (int8 codes [G, R], f32 scales [G, ceil(R/256)], f32 mean)."""
  offset = jnp.mean(absmax)
  centred = absmax - offset
  r = absmax.shape[1]
  blocks = -(-r // DOUBLE_QUANT_BLOCK)
  padded = jnp.pad(centred, ((0, 0), (0, blocks * DOUBLE_QUANT_BLOCK - r)))
  block_scale = jnp.max(jnp.abs(padded.reshape(absmax.shape[0], blocks, DOUBLE_QUANT_BLOCK)), axis=2) / 127.0
  block_scale = jnp.where(block_scale > 0, block_scale, 1.0)
  codes = jnp.clip(jnp.round(centred / expand_columns(block_scale, r)), -127, 127).astype(jnp.int8)
  return codes, block_scale, offset


def expand_columns(block_scale, r: int):
  """[G, ceil(R/256)] -> [G, R]: each double-quantization block's scale repeated over its 256 columns."""
  return jnp.repeat(block_scale, DOUBLE_QUANT_BLOCK, axis=1)[:, :r]


def nf4_absmax(scale, scale_scale, scale_offset):
  """The first-level absmax [G, R] in f32: `scale` itself, or its double-quantized reconstruction."""
  if scale_scale is None:
    return scale.astype(jnp.float32)
  return scale.astype(jnp.float32) * expand_columns(scale_scale, scale.shape[1]) + scale_offset


def quantize_nf4(x2, group_size: int, double_quant: bool):
  absmax = jnp.max(jnp.abs(groups(x2, group_size)), axis=1)
  absmax = jnp.where(absmax > 0, absmax, 1.0)
  codes = nf4_codes(x2 / _expand(absmax, group_size, *x2.shape))
  packed = _packing.pack(codes, 4)
  if not double_quant:
    return packed, absmax, None, None
  return (packed, *double_quantize(absmax))


def dequantize_nf4(qvalue, scale, scale_scale, scale_offset, k: int, group_size: int):
  values = _packing.lookup(_packing.unpack(qvalue, 4), _packing.NF4_LEVELS)
  return values * _expand(nf4_absmax(scale, scale_scale, scale_offset), group_size, k, values.shape[1])


# --- fp8 -----------------------------------------------------------------------------------------------------

def quantize_fp8(x2, fmt: Format, group_size: int, per_tensor: bool):
  fmax = float(jnp.finfo(fmt.element_dtype).max)
  scale = _reduce(jnp.abs(groups(x2, group_size)), per_tensor, jnp.max) / fmax
  scale = jnp.where(scale > 0, scale, 1.0).astype(jnp.float32)
  scaled = jnp.clip(x2 / _expand(scale, group_size, *x2.shape), -fmax, fmax)  # e4m3fn has no inf: saturate
  return scaled.astype(fmt.element_dtype), scale


def dequantize_fp8(qvalue, scale, k: int, group_size: int):
  return qvalue.astype(jnp.float32) * _expand(scale, group_size, k, qvalue.shape[1])


# --- OCP MX --------------------------------------------------------------------------------------------------

_MX_EMAX = {8: 8, 4: 2}  # exponent of the element format's largest normal: E4M3 448 = 1.75 * 2^8, E2M1 6 = 1.5 * 2^2


def e2m1_codes(values):
  """Round-to-nearest-even E2M1 codes (bit 3 = sign) of values already within [-6, 6]."""
  magnitudes = jnp.asarray(_packing.E2M1_MAGNITUDES, jnp.float32)
  distance = jnp.abs(jnp.abs(values)[..., None] - magnitudes)
  # Ties go to the even code (mantissa bit 0), as IEEE round-to-nearest-even does.
  distance = distance + jnp.asarray([0.0, 1e-6] * 4, jnp.float32)
  code = jnp.argmin(distance, axis=-1).astype(jnp.uint8)
  return jnp.where(values < 0, code | 8, code)


def quantize_mx(x2, fmt: Format):
  absmax = jnp.max(jnp.abs(groups(x2, MX_BLOCK)), axis=1)
  exponent = jnp.floor(jnp.log2(jnp.where(absmax > 0, absmax, 1.0))) - _MX_EMAX[fmt.bits]
  exponent = jnp.clip(jnp.where(absmax > 0, exponent, -127), -127, 127)
  elements = x2 / _expand(_pow2(exponent), MX_BLOCK, *x2.shape)
  scale = (exponent + 127).astype(jnp.uint8)  # E8M0: a biased exponent, no sign, no mantissa
  if fmt.bits == 8:
    fmax = float(jnp.finfo(fmt.element_dtype).max)
    return jnp.clip(elements, -fmax, fmax).astype(fmt.element_dtype), scale
  return _packing.pack(e2m1_codes(jnp.clip(elements, -6.0, 6.0)), 4), scale


def mx_scale_values(scale):
  """E8M0 codes -> the f32 powers of two they encode."""
  return _pow2(scale.astype(jnp.int32) - 127)


def _pow2(exponent):
  """2.0 ** exponent, exactly (ldexp; exp2 may be off by an ulp on some backends)."""
  return jnp.ldexp(jnp.ones(exponent.shape, jnp.float32), exponent.astype(jnp.int32))


def dequantize_mx(qvalue, scale, fmt: Format, k: int):
  if fmt.bits == 8:
    elements = qvalue.astype(jnp.float32)
  else:
    elements = _packing.lookup(_packing.unpack(qvalue, 4), _packing.E2M1_LEVELS)
  return elements * _expand(mx_scale_values(scale), MX_BLOCK, k, elements.shape[1])
