"""quant_decode kernels exported for TPU (Mosaic) and CUDA (Triton) from a CPU host at SmolLM2's decode shape:
B = 1, H = 9, H_kv = 3, D = 64, S = 4096 slots in groups of G = 32, bf16 queries, int8 and packed int4; and
illegal blocks / groups refused with an error naming the argument."""
import functools

import jax
import jax.numpy as jnp
import pytest

# No dispatch: `_run` forces 'pallas_tpu'/'pallas_gpu' on a CPU host.
from pallas_kernels.quant_decode import _run
from tests.helpers import LOWERING_TARGETS, export_lowered, kernel_calls

B, H, H_KV, D, S, G = 1, 9, 3, 64, 4096, 32


def _cache(bits, group_size=G):
  n = S // group_size
  u8, f32 = jnp.uint8, jnp.float32
  return [jax.ShapeDtypeStruct((B, H, D), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, n, group_size * bits // 8, H_KV, D), u8),
          jax.ShapeDtypeStruct((B, n, 1, H_KV, D), f32), jax.ShapeDtypeStruct((B, n, 1, H_KV, D), u8),
          jax.ShapeDtypeStruct((B, group_size, H_KV, D), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, S, H_KV, D * bits // 8), u8),
          jax.ShapeDtypeStruct((B, S, H_KV, 1), f32), jax.ShapeDtypeStruct((B, S, H_KV, 1), u8),
          jax.ShapeDtypeStruct((B,), jnp.int32)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("platform", LOWERING_TARGETS)
def test_quant_decode_lowers(platform, bits):
  implementation, marker = LOWERING_TARGETS[platform]
  exported = export_lowered(functools.partial(_run, implementation=implementation, bits=bits), platform,
                            *_cache(bits))
  assert exported.out_avals[0].shape == (B, H, D) and exported.out_avals[0].dtype == jnp.bfloat16
  assert kernel_calls(exported, marker) == 1


def test_illegal_shapes_are_refused():
  with pytest.raises(ValueError, match="block_groups"):  # 128 groups: 48 does not divide them
    export_lowered(functools.partial(_run, implementation="pallas_tpu", bits=8, block_groups=48), "tpu",
                   *_cache(8))
  with pytest.raises(ValueError, match="group_size"):  # int4 groups of 16: nibble planes of 8 rows
    export_lowered(functools.partial(_run, implementation="pallas_tpu", bits=4), "tpu", *_cache(4, 16))
  with pytest.raises(ValueError, match="group_size"):  # tl.dot needs 16 rows per nibble plane
    export_lowered(functools.partial(_run, implementation="pallas_gpu", bits=4), "cuda", *_cache(4, 16))
