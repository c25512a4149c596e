"""Packed low-bit storage: the public contract between `efficient.quant.QArray` and the quantized kernels.

A QArray's sub-byte codes are stored exactly as this module packs them, and `pallas_kernels.quant_matmul` (and
any other kernel that reads packed weights) unpacks exactly this layout, so a quantized weight reaches a kernel
with zero copies. Change the layout here and both sides change together.

Codes are *unsigned* (0 .. 2**bits - 1) and packed along one axis: by default axis 0, the contraction (input, K)
dimension of a weight in Flax layout [K, N]; `pack(..., axis=a)` packs along any axis a of an N-d array with
the same layout (a KV cache packs keys along the tokens of a group and values along head_dim). The layout is
**planar**: the packed axis (size K) is cut into `values_per_word` equal segments and one packed word holds the
same row of every segment,

  int4 (2 per byte):    byte[i]  = q[i] | q[i + K/2] << 4                                 -> [K/2, N]   uint8
  int2 (4 per byte):    byte[i]  = sum_s q[i + s*K/4] << 2s                               -> [K/4, N]   uint8
  int3 (8 in 3 bytes):  word[i]  = sum_s q[i + s*K/8] << 3s  (24 bits), stored as three
                        byte planes, plane j = (word >> 8j) & 255, stacked along the axis  -> [3K/8, N]  uint8

Why planar rather than interleaved (low nibble = row 2i, high = row 2i+1): unpacking a [K/2, bn] tile is then
two full-tile shift/mask ops producing two *contiguous* row slabs, joined by one concatenation along sublanes
at an aligned offset (K/2 is a multiple of 8/16 for any K the kernels take) -- an interleaved layout would need
a strided sublane shuffle on TPU (or an x split into even/odd lanes). Both planes of one N column live in the
same lanes, so no lane movement happens at all. The price is that a packed *row block* is not a contiguous
K block, so the kernels read whole-K tiles (every decode/prefill linear in the models here fits VMEM).

Also here: the 16 NF4 levels (QLoRA; bitsandbytes' table, float32), the 8 E2M1 (FP4) magnitudes of OCP MX, and
`lookup`, a select chain that decodes codes through such a table with elementwise ops only (no gather), which
is how the kernels decode NF4 inside a VMEM tile.
"""
from __future__ import annotations

import jax.numpy as jnp

# QLoRA's NormalFloat4 levels, as published in bitsandbytes (`create_normal_map`), index = 4-bit code.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
# OCP MX FP4 (E2M1) magnitudes for codes 0..7; bit 3 is the sign (codes 8..15 are the negatives).
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_LEVELS = E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES)

PACKED_BITS = (2, 3, 4, 8)  # 8 is the identity layout (one byte per value)
# bits -> (values per packed word, bytes per packed word)
_WORD = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}


def values_per_word(bits: int) -> int:
  """How many rows of K one packed word holds: K must be a multiple of this to pack."""
  _check_bits(bits)
  return _WORD[bits][0]


def check_packable(k: int, bits: int, *, name: str = "K") -> None:
  """Raises a `ValueError` naming `name` unless K rows can be packed at `bits` bits per value."""
  per_word = values_per_word(bits)
  if k % per_word:
    raise ValueError(f"{name}={k} must be a multiple of {per_word} to pack {bits}-bit values "
                     f"({per_word} per {_WORD[bits][1]}-byte word along the packed axis).")


def _check_bits(bits):
  if bits not in _WORD:
    raise ValueError(f"bits={bits!r} is not a packed width; choose one of {PACKED_BITS}.")


def _check_axis(axis, ndim: int) -> int:
  if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
    raise ValueError(f"axis={axis!r} is out of range for an array of rank {ndim}.")
  return axis % ndim


def pack(codes, bits: int, *, axis: int = 0):
  """Packs unsigned codes (each < 2**bits) along `axis` into uint8 with that axis bits*K/8 long (planar layout);
  axis 0: [K, ...] -> [bits*K/8, ...]."""
  _check_bits(bits)
  per_word, word_bytes = _WORD[bits]
  axis = _check_axis(axis, codes.ndim)
  check_packable(codes.shape[axis], bits, name=f"codes.shape[{axis}]" if axis else "K")
  codes = codes.astype(jnp.uint32)
  if bits == 8:
    return codes.astype(jnp.uint8)
  segments = jnp.split(codes, per_word, axis=axis)
  word = segments[0]
  for s, segment in enumerate(segments[1:], start=1):
    word = word | (segment << (bits * s))
  planes = [((word >> (8 * j)) & 0xFF).astype(jnp.uint8) for j in range(word_bytes)]
  return planes[0] if word_bytes == 1 else jnp.concatenate(planes, axis=axis)


def unpack(packed, bits: int, *, axis: int = 0):
  """Inverse of `pack`: uint8 with `axis` bits*K/8 long -> uint8 codes with `axis` K long. Elementwise
  shifts/masks + one concat."""
  return unpack_int32(packed, bits, axis=axis).astype(jnp.uint8)


def unpack_int32(packed, bits: int, *, axis: int = 0):
  """`unpack` returning int32 codes: what a kernel computes with next (no round trip through uint8)."""
  _check_bits(bits)
  per_word, word_bytes = _WORD[bits]
  axis = _check_axis(axis, packed.ndim)
  if bits == 8:
    return packed.astype(jnp.int32)
  if packed.shape[axis] % word_bytes:
    raise ValueError(f"packed.shape[{axis}]={packed.shape[axis]} must be a multiple of {word_bytes} for "
                     f"{bits}-bit codes.")
  # int32 arithmetic: what a TPU vector unit shifts natively (uint8 lanes would be repacked per op anyway).
  planes = jnp.split(packed.astype(jnp.int32), word_bytes, axis=axis)
  word = planes[0]
  for j, plane in enumerate(planes[1:], start=1):
    word = word | (plane << (8 * j))
  mask = (1 << bits) - 1
  segments = [(word >> (bits * s)) & mask for s in range(per_word)]
  return jnp.concatenate(segments, axis=axis)


def lookup(codes, levels, dtype=jnp.float32):
  """levels[codes] as a chain of `where`s over the (static) table: elementwise, so it lowers inside kernels."""
  codes = codes.astype(jnp.int32)
  out = jnp.full(codes.shape, levels[0], dtype)
  for code, level in enumerate(levels[1:], start=1):
    out = jnp.where(codes == code, jnp.asarray(level, dtype), out)
  return out
