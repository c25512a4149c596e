"""Mosaic-TPU fused block-wise quantized Adam step, and the kernel body the GPU kernel shares.

Grid over row tiles of the [n_blocks, B] arrays ("parallel"): each program holds `tile` whole quantization blocks,
so the per-block absmax is a row reduction inside the program and nothing crosses programs. Blocks are
(tile, B) for the float32 arrays and the codes ([tile, B // 2] when packed) and (tile, 1) for the absmax columns;
the three step scalars live in SMEM. `tile` is a multiple of 32 (Mosaic tiles uint8 by (32, 128)) unless one tile
spans all blocks; the ragged last tile is clipped by Pallas (rows are independent, so its padding rows are
computed and dropped).

Lookup-free body (bit-exact to the tables; see the package docstring): decode = select tree over the code bits,
encode = binary search over the thresholds (the count of thresholds below x), 4-bit (un)interleave = 0/1/16
matmuls on small integers in bf16.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _util
from pallas_kernels.lowbit_adam import maps, reference

TILE_ELEMENTS = 32768  # default elements per program: 128 KiB per float32 tile, ~2 MiB of VMEM with buffers
UINT8_SUBLANES = 32    # Mosaic tiles uint8 arrays by (32, 128)


def resolve_tile(n_blocks: int, block: int, requested=None, *, four_bit: bool = False) -> int:
  """Blocks per program: the requested (or default) count, a multiple of 32 unless it spans all n_blocks."""
  del four_bit
  default = _util.round_up(max(1, TILE_ELEMENTS // block), UINT8_SUBLANES)
  return _util.tpu_block("blocks_per_tile", requested, n_blocks, default=default, align=UINT8_SUBLANES)


# ---- the kernel body (shared with gpu.py) -------------------------------------------------------------------------

def _select_tree(masks, leaf):
  """A depth-first binary select tree: bit k of the index chooses (masks[k]); `leaf(index)` gives the Python float at
  each index. 2**len(masks) - 1 selects at most (equal neighbours fold), at most len(masks) temporaries live."""

  def tree(base: int, bit: int):
    if bit < 0:
      return leaf(base)
    low, high = tree(base, bit - 1), tree(base + (1 << bit), bit - 1)
    if isinstance(low, float) and isinstance(high, float) and low == high:
      return low
    return jnp.where(masks[bit], high, low)

  return tree(0, len(masks) - 1)


def decode(codes, map_name: str):
  """int32 codes -> float32 map values: a select tree over the code's bits whose leaves are the table."""
  values = [float(value) for value in maps.MAPS[map_name]]
  out = _select_tree([(codes & (1 << bit)) != 0 for bit in range(maps.BITS[map_name])], values.__getitem__)
  return jnp.full(codes.shape, out, jnp.float32) if isinstance(out, float) else out.astype(jnp.float32)


def encode(x, map_name: str):
  """float32 normalized values -> int32 codes = the number of the map's (sorted) thresholds below x, by a binary
  search: bit k (from the top) is `x > threshold[prefix + 2**k - 1]`, the threshold picked by a select tree over the
  bits decided so far (2**bits - bits - 1 selects and `bits` compares in all, instead of 2**bits - 1 compares and
  adds for a plain count)."""
  thresholds = [float(t) for t in maps.THRESHOLDS[map_name]]
  bits = maps.BITS[map_name]
  decided = []   # masks of the bits already decided, most significant first
  code = jnp.zeros(x.shape, jnp.int32)
  for k in reversed(range(bits)):
    # index of the threshold = (decided bits as a number) << (k + 1) + 2**k - 1; the tree's bit j is decided[-1 - j]
    masks = decided[::-1]
    threshold = _select_tree(masks, lambda prefix, k=k: thresholds[(prefix << (k + 1)) + (1 << k) - 1])
    bit = x > threshold
    decided.append(bit)
    code = code | jnp.where(bit, 1 << k, 0).astype(jnp.int32)
  return code


def _interleave_matrices(half: int):
  """even [half, 2 half] (1 at (j, 2j)), odd (1 at (j, 2j+1)) and pack [2 half, half] (1 at (2j, j), 16 at
  (2j+1, j)), in bf16: every product and sum they make with codes 0..15 is an exact small integer."""
  row = lax.broadcasted_iota(jnp.int32, (half, 2 * half), 0)
  col = lax.broadcasted_iota(jnp.int32, (half, 2 * half), 1)
  even = jnp.where(col == 2 * row, 1.0, 0.0).astype(jnp.bfloat16)
  odd = jnp.where(col == 2 * row + 1, 1.0, 0.0).astype(jnp.bfloat16)
  prow = lax.broadcasted_iota(jnp.int32, (2 * half, half), 0)
  pcol = lax.broadcasted_iota(jnp.int32, (2 * half, half), 1)
  pack = jnp.where(prow == 2 * pcol, 1.0, jnp.where(prow == 2 * pcol + 1, 16.0, 0.0)).astype(jnp.bfloat16)
  return even, odd, pack


def _small_ints_to_bf16(x):
  return x.astype(jnp.float32).astype(jnp.bfloat16)


def load_codes(codes_ref, map_name: str):
  """The stored codes of a tile as int32 [tile, B] (4-bit: the nibbles interleaved by two exact matmuls)."""
  stored = codes_ref[...].astype(jnp.int32)
  if maps.BITS[map_name] == 8:
    return stored
  even, odd, _ = _interleave_matrices(stored.shape[1])
  low = jnp.dot(_small_ints_to_bf16(stored & 15), even, preferred_element_type=jnp.float32)
  high = jnp.dot(_small_ints_to_bf16(stored >> 4), odd, preferred_element_type=jnp.float32)
  return (low + high).astype(jnp.int32)


def store_codes(codes_ref, codes, map_name: str):
  """int32 codes [tile, B] -> the tile's stored uint8 codes (4-bit: packed by one exact matmul)."""
  if maps.BITS[map_name] == 4:
    _, _, pack = _interleave_matrices(codes.shape[1] // 2)
    codes = jnp.dot(_small_ints_to_bf16(codes), pack, preferred_element_type=jnp.float32).astype(jnp.int32)
  codes_ref[...] = codes.astype(jnp.uint8)


def body(inv_correction1, inv_correction2, neg_lr, g_ref, p_ref, mc_ref, ma_ref, vc_ref, va_ref, u_ref, mco_ref,
         mao_ref, vco_ref, vao_ref, *, b1, b2, eps, weight_decay, m_map, v_map):
  """One tile: dequantize, the reference's Adam math (the same function: same float32 ops, same order),
  requantize."""
  c = reference.constants(b1, b2, eps, weight_decay)
  m = decode(load_codes(mc_ref, m_map), m_map) * ma_ref[...]
  v = decode(load_codes(vc_ref, v_map), v_map) * va_ref[...]
  update, m, v = reference.adam_math(g_ref[...], lambda: p_ref[...], m, v, inv_correction1, inv_correction2, neg_lr, c,
                                     weight_decay)
  u_ref[...] = update
  for x, map_name, codes_ref, absmax_ref in ((m, m_map, mco_ref, mao_ref), (v, v_map, vco_ref, vao_ref)):
    absmax = jnp.max(jnp.abs(x), axis=1, keepdims=True)
    absmax_ref[...] = absmax
    store_codes(codes_ref, encode(x * reference.block_reciprocal(absmax), map_name), map_name)


def _kernel(s_ref, *refs, **hyper):
  body(s_ref[0], s_ref[1], s_ref[2], *refs, **hyper)


def fused_call(grad, param, m_codes, m_absmax, v_codes, v_absmax, scalars, *, tile, scalar_spec, compiler_params,
               interpret, cost_estimate=None, **hyper):
  """The one pallas_call both platforms run: a grid over row tiles of `tile` blocks; the absmax travel as
  [n_blocks, 1] columns. `scalar_spec` / `compiler_params` are what differ between TPU and GPU."""
  n_blocks, block = grad.shape
  m_width, v_width = m_codes.shape[1], v_codes.shape[1]
  rows = lambda width: pl.BlockSpec((tile, width), lambda i: (i, 0))
  outs = pl.pallas_call(
      functools.partial(_kernel, **hyper),
      out_shape=(jax.ShapeDtypeStruct((n_blocks, block), jnp.float32),
                 jax.ShapeDtypeStruct((n_blocks, m_width), jnp.uint8),
                 jax.ShapeDtypeStruct((n_blocks, 1), jnp.float32),
                 jax.ShapeDtypeStruct((n_blocks, v_width), jnp.uint8),
                 jax.ShapeDtypeStruct((n_blocks, 1), jnp.float32)),
      grid=(pl.cdiv(n_blocks, tile),),
      in_specs=[scalar_spec, rows(block), rows(block), rows(m_width), rows(1), rows(v_width), rows(1)],
      out_specs=(rows(block), rows(m_width), rows(1), rows(v_width), rows(1)),
      compiler_params=compiler_params,
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="lowbit_adam",
  )(scalars, grad, param, m_codes, m_absmax.reshape(n_blocks, 1), v_codes, v_absmax.reshape(n_blocks, 1))
  update, m_codes, m_absmax, v_codes, v_absmax = outs
  return update, m_codes, m_absmax.reshape(n_blocks), v_codes, v_absmax.reshape(n_blocks)


def blockwise_adam_update(grad, param, m_codes, m_absmax, v_codes, v_absmax, scalars, *, b1, b2, eps, weight_decay,
                          m_map, v_map, blocks_per_tile=None, interpret=False, cost_estimate=None):
  """[n_blocks, B] arrays -> (update, m_codes, m_absmax, v_codes, v_absmax), as `reference.blockwise_adam_update`."""
  n_blocks, block = grad.shape
  return fused_call(grad, param, m_codes, m_absmax, v_codes, v_absmax, scalars,
                    tile=resolve_tile(n_blocks, block, blocks_per_tile),
                    scalar_spec=pl.BlockSpec(memory_space=pltpu.SMEM),
                    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)), interpret=interpret,
                    cost_estimate=cost_estimate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, m_map=m_map,
                    v_map=v_map)
