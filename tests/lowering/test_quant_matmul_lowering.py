"""quant_matmul kernels exported for TPU (Mosaic) and CUDA (Triton) from a CPU host at SmolLM2's MLP shapes.

K = 576 is not a multiple of 128: groups of 64 (9 per column) divide it, groups of 128 do not (quantize refuses
them), so g128 is lowered on the down projection (K = 1536, N = 576). Nothing is padded along K.
"""
import functools
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.quant_matmul import _run  # no dispatch: forces 'pallas_tpu'/'pallas_gpu' on a CPU host
from tests.helpers import export_lowered

TARGETS = {"tpu": ("pallas_tpu", "@tpu_custom_call"), "cuda": ("pallas_gpu", "@__gpu$xla.gpu.triton")}
S = jax.ShapeDtypeStruct
# name -> (K, N, fmt, weight operands after x: w, scale, zero_point, scale_scale, scale_offset)
WEIGHTS = {
    "int8_channel": (576, 1536, "int8", [S((576, 1536), jnp.int8), S((1, 1536), jnp.float32), None, None, None]),
    "int4_g64": (576, 1536, "int4", [S((288, 1536), jnp.uint8), S((9, 1536), jnp.bfloat16), None, None, None]),
    "int4_g64_zeros": (576, 1536, "int4", [S((288, 1536), jnp.uint8), S((9, 1536), jnp.bfloat16),
                                           S((9, 1536), jnp.uint8), None, None]),
    "int4_g128_down": (1536, 576, "int4", [S((768, 576), jnp.uint8), S((12, 576), jnp.bfloat16), None, None, None]),
    "nf4_double_quant": (576, 1536, "nf4", [S((288, 1536), jnp.uint8), S((9, 1536), jnp.int8), None,
                                            S((9, 6), jnp.float32), S((), jnp.float32)]),
}


def _kernel_calls(exported, marker):
  return len(re.findall(re.escape(marker), exported.mlir_module()))


@pytest.mark.parametrize("m", [16, 512])
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("platform", TARGETS)
def test_quant_matmul_forward_and_activation_gradient_lower(platform, weights, m):
  implementation, marker = TARGETS[platform]
  k, n, fmt, operands = WEIGHTS[weights]
  op = functools.partial(_run, fmt=fmt, implementation=implementation)
  x = S((m, k), jnp.bfloat16)

  def forward_and_grad(x, dy, *weight_operands):
    out, vjp = jax.vjp(lambda x: op(x, *weight_operands), x)
    return out, vjp(dy)[0]

  exported = export_lowered(forward_and_grad, platform, x, S((m, n), jnp.bfloat16), *operands)
  assert [(a.shape, a.dtype) for a in exported.out_avals] == [((m, n), jnp.bfloat16), ((m, k), jnp.bfloat16)]
  assert _kernel_calls(exported, marker) == 1  # the forward kernel; dx = dy @ dequant(w).T is XLA


@pytest.mark.parametrize("platform, blocks, message", [
    ("tpu", (16, 200), r"block_n=200 is illegal for the TPU kernel: it must be a multiple of 128"),
    ("tpu", (12, 512), r"block_m=12 is illegal for the TPU kernel: it must be a multiple of 8"),
    ("cuda", (16, 96), r"block_n=96 is illegal for the GPU \(Triton\) kernel: it must be a power of two"),
])
def test_quant_matmul_illegal_blocks_are_refused_before_lowering(platform, blocks, message):
  k, n, fmt, operands = WEIGHTS["int4_g64"]
  op = functools.partial(_run, fmt=fmt, implementation=TARGETS[platform][0], blocks=blocks)
  with pytest.raises(ValueError, match=message):
    export_lowered(op, platform, S((512, k), jnp.bfloat16), *operands)
