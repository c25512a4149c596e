"""Triton-style GPU fused block-wise quantized Adam step: the TPU module's kernel body on power-of-two tiles.

Grid over row tiles of `tile` quantization blocks (a power of two, Triton builds blocks with tl.arange; at least
16 when a map is 4-bit, because the nibble (un)interleave is a tl.dot, whose dimensions must be >= 16 -- so 4-bit
maps also need B // 2 >= 16 on the compiled kernel). The three step scalars are a 4-element block every program
loads. Out-of-range rows of the ragged last tile are masked by Pallas.
"""
from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util
from pallas_kernels.lowbit_adam import maps, tpu

TILE_ELEMENTS = 4096  # default elements per program
MIN_DOT = 16          # tl.dot needs every dimension >= 16


def resolve_tile(n_blocks: int, block: int, requested=None, *, four_bit: bool = False) -> int:
  """Blocks per program: a power of two (>= 16 with a 4-bit map), clamped to cover n_blocks."""
  minimum = MIN_DOT if four_bit else 1
  return _util.gpu_block("blocks_per_tile", requested, n_blocks, default=max(minimum, TILE_ELEMENTS // block),
                         minimum=minimum)


def blockwise_adam_update(grad, param, m_codes, m_absmax, v_codes, v_absmax, scalars, *, b1, b2, eps, weight_decay,
                          m_map, v_map, blocks_per_tile=None, interpret=False, cost_estimate=None):
  """[n_blocks, B] arrays -> (update, m_codes, m_absmax, v_codes, v_absmax), as `reference.blockwise_adam_update`."""
  n_blocks, block = grad.shape
  four_bit = 4 in (maps.BITS[m_map], maps.BITS[v_map])
  if four_bit and block // 2 < MIN_DOT and not interpret:
    raise ValueError(f"grad: block size B = {block} is too small for the GPU (Triton) kernel with a 4-bit map: "
                     f"B // 2 must be >= {MIN_DOT} (the nibble interleave is a tl.dot).")
  return tpu.fused_call(grad, param, m_codes, m_absmax, v_codes, v_absmax, _util.pad_to(scalars, (4,)),
                        tile=resolve_tile(n_blocks, block, blocks_per_tile, four_bit=four_bit),
                        scalar_spec=pl.BlockSpec((4,), lambda i: (0,)),
                        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1), interpret=interpret,
                        cost_estimate=cost_estimate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, m_map=m_map,
                        v_map=v_map)
