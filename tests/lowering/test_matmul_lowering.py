"""matmul kernels exported for TPU (Mosaic) and CUDA (Triton) from a CPU host at the canonical shape."""
import functools
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.matmul import _run  # no dispatch: forces 'pallas_tpu'/'pallas_gpu' on a CPU host
from tests.helpers import export_lowered

# SmolLM2-135M MLP up-projection with a batch of 512 tokens: K = 576 is ragged for 128-wide blocks.
M, K, N = 512, 576, 1536
ARGS = [jax.ShapeDtypeStruct((M, K), jnp.bfloat16), jax.ShapeDtypeStruct((K, N), jnp.bfloat16),
        jax.ShapeDtypeStruct((N,), jnp.bfloat16)]
TARGETS = {"tpu": ("pallas_tpu", "@tpu_custom_call"), "cuda": ("pallas_gpu", "@__gpu$xla.gpu.triton")}


def _kernel_calls(exported, marker):
  return len(re.findall(re.escape(marker), exported.mlir_module()))


@pytest.mark.parametrize("platform", TARGETS)
def test_matmul_forward_and_gradients_lower(platform):
  implementation, marker = TARGETS[platform]
  op = functools.partial(_run, implementation=implementation)
  forward = export_lowered(op, platform, *ARGS)
  assert forward.out_avals[0].shape == (M, N) and _kernel_calls(forward, marker) == 1

  def forward_and_grads(x, w, bias, dy):
    out, vjp = jax.vjp(op, x, w, bias)
    return out, vjp(dy)

  backward = export_lowered(forward_and_grads, platform, *ARGS, jax.ShapeDtypeStruct((M, N), jnp.bfloat16))
  assert [aval.shape for aval in backward.out_avals] == [(M, N), (M, K), (K, N), (N,)]
  assert _kernel_calls(backward, marker) == 3  # forward, dx = dy @ w.T, dw = x.T @ dy: one kernel, three calls


@pytest.mark.parametrize("platform, blocks, message", [
    ("tpu", (128, 100, 128), r"block_n=100 is illegal for the TPU kernel: it must be a multiple of 128"),
    ("tpu", (12, 128, 128), r"block_m=12 is illegal for the TPU kernel: it must be a multiple of 8"),
    ("cuda", (64, 48, 32), r"block_n=48 is illegal for the GPU \(Triton\) kernel: it must be a power of two"),
])
def test_matmul_illegal_blocks_are_refused_before_lowering(platform, blocks, message):
  op = functools.partial(_run, implementation=TARGETS[platform][0], blocks=blocks)
  with pytest.raises(ValueError, match=message):
    export_lowered(op, platform, *ARGS)
