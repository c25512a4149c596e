"""The fused low-bit Adam kernels exported for TPU (Mosaic) and CUDA (Triton) from a CPU host at a SmolLM2 MLP
weight's size (576 * 1536 elements): 8-bit maps with B = 256 and 4-bit maps with B = 128, one kernel call each."""
import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.lowbit_adam import _run  # no dispatch: forces 'pallas_tpu'/'pallas_gpu' on a CPU host
from tests.helpers import LOWERING_TARGETS, export_lowered, kernel_calls

ELEMENTS = 576 * 1536
CASES = {"8bit": ("dynamic_signed_8", "dynamic_unsigned_8", 256, 1),
         "4bit": ("de_signed_4", "linear_unsigned_4", 128, 2)}


def _args(block, m_pack, v_pack):
  n_blocks = ELEMENTS // block
  f32 = jax.ShapeDtypeStruct((n_blocks, block), jnp.float32)
  return [f32, f32, jax.ShapeDtypeStruct((n_blocks, block // m_pack), jnp.uint8),
          jax.ShapeDtypeStruct((n_blocks,), jnp.float32), jax.ShapeDtypeStruct((n_blocks, block // v_pack), jnp.uint8),
          jax.ShapeDtypeStruct((n_blocks,), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32),
          jax.ShapeDtypeStruct((), jnp.float32)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("platform", LOWERING_TARGETS)
def test_lowbit_adam_lowers(platform, case):
  implementation, marker = LOWERING_TARGETS[platform]
  m_map, v_map, block, pack = CASES[case]
  op = functools.partial(_run, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, m_map=m_map, v_map=v_map,
                         implementation=implementation)
  exported = export_lowered(op, platform, *_args(block, pack, pack))
  n_blocks = ELEMENTS // block
  assert [(a.shape, a.dtype) for a in exported.out_avals] == [
      ((n_blocks, block), jnp.dtype(jnp.float32)), ((n_blocks, block // pack), jnp.dtype(jnp.uint8)),
      ((n_blocks,), jnp.dtype(jnp.float32)), ((n_blocks, block // pack), jnp.dtype(jnp.uint8)),
      ((n_blocks,), jnp.dtype(jnp.float32))]
  assert kernel_calls(exported, marker) == 1


@pytest.mark.parametrize("platform, tile, message", [
    ("tpu", 48, r"blocks_per_tile=48 is illegal for the TPU kernel: it must be a multiple of 32"),
    ("cuda", 24, r"blocks_per_tile=24 is illegal for the GPU \(Triton\) kernel: it must be a power of two"),
])
def test_lowbit_adam_illegal_tiles_are_refused_before_lowering(platform, tile, message):
  op = functools.partial(_run, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, m_map="dynamic_signed_8",
                         v_map="dynamic_unsigned_8", implementation=LOWERING_TARGETS[platform][0],
                         blocks_per_tile=tile)
  with pytest.raises(ValueError, match=message):
    export_lowered(op, platform, *_args(256, 1, 1))
