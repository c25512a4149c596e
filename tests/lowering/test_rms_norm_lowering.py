"""rms_norm kernels exported for TPU (Mosaic) and CUDA (Triton) from a CPU host at the canonical shape."""
import functools
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.rms_norm import _run  # no dispatch: forces 'pallas_tpu'/'pallas_gpu' on a CPU host
from tests.helpers import export_lowered

# SmolLM2-135M: 2048 tokens of width 576 (not a multiple of 128: the TPU block spans the whole row).
ROWS, D = 2048, 576
ARGS = [jax.ShapeDtypeStruct((ROWS, D), jnp.bfloat16), jax.ShapeDtypeStruct((D,), jnp.float32)]
TARGETS = {"tpu": ("pallas_tpu", "@tpu_custom_call"), "cuda": ("pallas_gpu", "@__gpu$xla.gpu.triton")}


def _kernel_calls(exported, marker):
  return len(re.findall(re.escape(marker), exported.mlir_module()))


@pytest.mark.parametrize("platform", TARGETS)
def test_rms_norm_forward_and_gradients_lower(platform):
  implementation, marker = TARGETS[platform]
  op = functools.partial(_run, eps=1e-5, implementation=implementation)
  forward = export_lowered(op, platform, *ARGS)
  assert forward.out_avals[0].shape == (ROWS, D) and _kernel_calls(forward, marker) == 1

  def forward_and_grads(x, weight, dy):
    out, vjp = jax.vjp(op, x, weight)
    return out, vjp(dy)

  backward = export_lowered(forward_and_grads, platform, *ARGS, ARGS[0])
  assert [(aval.shape, aval.dtype) for aval in backward.out_avals] == [
      ((ROWS, D), jnp.bfloat16), ((ROWS, D), jnp.bfloat16), ((D,), jnp.float32)]
  assert _kernel_calls(backward, marker) == 2  # the fused forward and the fused backward


@pytest.mark.parametrize("platform, block_rows, message", [
    ("tpu", 100, r"block_rows=100 is illegal for the TPU kernel: it must be a multiple of 8"),
    ("cuda", 24, r"block_rows=24 is illegal for the GPU \(Triton\) kernel: it must be a power of two"),
])
def test_rms_norm_illegal_blocks_are_refused_before_lowering(platform, block_rows, message):
  op = functools.partial(_run, implementation=TARGETS[platform][0], block_rows=block_rows)
  with pytest.raises(ValueError, match=message):
    export_lowered(op, platform, *ARGS)
