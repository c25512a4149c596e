"""block_sparse_matmul kernels exported for TPU (Mosaic) and CUDA (Triton) from a CPU host at the canonical shape."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_matmul import _run, from_block_mask  # _run: no dispatch, forces the kernels
from tests.helpers import export_lowered

# SmolLM2-135M's MLP down-projection transposed (K = N = 1536 here so both are whole 128-blocks) with a batch of
# 512 tokens, 128x128 blocks at 50% block density (72 of 144 blocks, 6 per column block, one column block empty
# so a zero-count column is lowered too).
M, K, N, BLOCK = 512, 1536, 1536, (128, 128)
_MASK = np.zeros((12, 12), bool)
for _col in range(1, 12):
  _MASK[np.random.default_rng(_col).permutation(12)[:6 + (_col % 2)], _col] = True
W = from_block_mask(np.ones((K, N), np.float32), _MASK, BLOCK).astype(jnp.bfloat16)
W_SPEC = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), W)
X, DY = jax.ShapeDtypeStruct((M, K), jnp.bfloat16), jax.ShapeDtypeStruct((M, N), jnp.bfloat16)
TARGETS = {"tpu": ("pallas_tpu", "@tpu_custom_call"), "cuda": ("pallas_gpu", "@__gpu$xla.gpu.triton")}


def _kernel_calls(exported, marker):
  return len(re.findall(re.escape(marker), exported.mlir_module()))


@pytest.mark.parametrize("platform", TARGETS)
def test_block_sparse_matmul_forward_and_gradients_lower(platform):
  implementation, marker = TARGETS[platform]
  op = functools.partial(_run, implementation=implementation)
  forward = export_lowered(op, platform, X, W_SPEC)
  assert forward.out_avals[0].shape == (M, N) and _kernel_calls(forward, marker) == 1

  def forward_and_grads(x, w, dy):
    out, vjp = jax.vjp(op, x, w)
    dx, dw = vjp(dy)
    return out, dx, dw.values

  backward = export_lowered(forward_and_grads, platform, X, W_SPEC, DY)
  assert [aval.shape for aval in backward.out_avals] == [(M, N), (M, K), (W.nnz_blocks, *BLOCK)]
  assert _kernel_calls(backward, marker) == 3  # forward, dx (same kernel, transposed table), dvalues


@pytest.mark.parametrize("platform, block_m, message", [
    ("tpu", 12, r"block_m=12 is illegal for the TPU kernel: it must be a multiple of 8"),
    ("cuda", 48, r"block_m=48 is illegal for the GPU \(Triton\) kernel: it must be a power of two"),
])
def test_block_sparse_matmul_illegal_blocks_are_refused_before_lowering(platform, block_m, message):
  op = functools.partial(_run, implementation=TARGETS[platform][0], block_m=block_m)
  with pytest.raises(ValueError, match=message):
    export_lowered(op, platform, X, W_SPEC)
