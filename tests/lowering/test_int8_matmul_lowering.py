"""int8_matmul (W8A8) kernels exported for TPU (Mosaic) and CUDA (Triton) from a CPU host at SmolLM2's MLP
shapes: decode (M = 16) and prefill (M = 512), K = 576 (one whole-K block on TPU), N = 1536."""
import functools
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.int8_matmul import _run  # no dispatch: forces 'pallas_tpu'/'pallas_gpu' on a CPU host
from tests.helpers import export_lowered

K, N = 576, 1536
TARGETS = {"tpu": ("pallas_tpu", "@tpu_custom_call"), "cuda": ("pallas_gpu", "@__gpu$xla.gpu.triton")}


def _args(m):
  return [jax.ShapeDtypeStruct((m, K), jnp.int8), jax.ShapeDtypeStruct((m, 1), jnp.float32),
          jax.ShapeDtypeStruct((K, N), jnp.int8), jax.ShapeDtypeStruct((N,), jnp.float32)]


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m", [16, 512])
@pytest.mark.parametrize("platform", TARGETS)
def test_int8_matmul_lowers(platform, m, out_dtype):
  implementation, marker = TARGETS[platform]
  exported = export_lowered(functools.partial(_run, implementation=implementation, out_dtype=out_dtype),
                            platform, *_args(m))
  assert [(a.shape, a.dtype) for a in exported.out_avals] == [((m, N), jnp.dtype(out_dtype))]
  assert len(re.findall(re.escape(marker), exported.mlir_module())) == 1


@pytest.mark.parametrize("platform, blocks, message", [
    ("tpu", (16, 256, 576), r"block_m=16 is illegal for the TPU kernel: it must be a multiple of 32"),
    ("tpu", (256, 256, 200), r"block_k=200 is illegal for the TPU kernel: it must be a multiple of 128"),
    ("cuda", (64, 64, 16), r"block_k=16 is illegal for the GPU \(Triton\) kernel: it must be a power of two "
                           r"and at least 32"),
])
def test_int8_matmul_illegal_blocks_are_refused_before_lowering(platform, blocks, message):
  op = functools.partial(_run, implementation=TARGETS[platform][0], blocks=blocks)
  with pytest.raises(ValueError, match=message):
    export_lowered(op, platform, *_args(512))
