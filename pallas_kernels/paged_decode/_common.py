"""What the paged_decode implementations share: the names of the stored arrays, per-token dequantization, and
the split of head_dim into the "planes" a packed page holds.

A page stores per-token codes packed planar along head_dim (`pallas_kernels.packing`): an int4 byte i of a token
holds dims i (low nibble) and i + D/2 (high nibble). The kernels never move those nibbles across lanes: they
treat the two nibble planes as two half-width heads, split q the same way (q[:, :D/2], q[:, D/2:]) and add the
planes' q.k products (and write the planes' halves of the output side by side). Float and int8 pages are one
plane of width D.
"""
from __future__ import annotations

import jax.numpy as jnp

FLOAT_NAMES = ("k", "v")
QUANT_NAMES = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")
BITS = (None, 8, 4)


def names(bits):
  return FLOAT_NAMES if bits is None else QUANT_NAMES


def num_planes(bits) -> int:
  return 2 if bits == 4 else 1


def code_planes(codes, bits):
  """uint8 codes [..., last] -> list of int32 planes [..., last] (int4: low then high nibbles)."""
  codes = codes.astype(jnp.int32)
  if bits == 4:
    return [codes & 0xF, codes >> 4]
  return [codes]


def dequantize(code_plane, scale, zero):
  """(code - zero) * scale in f32; scale/zero broadcast against the plane."""
  return (code_plane.astype(jnp.float32) - zero.astype(jnp.float32)) * scale.astype(jnp.float32)


def split_head_dim(x, bits):
  """[..., D] -> list of planes [..., D / planes] matching `code_planes` (int4: first and second half of D)."""
  n = num_planes(bits)
  width = x.shape[-1] // n
  return [x[..., i * width:(i + 1) * width] for i in range(n)]
