"""grouped_matmul kernels exported for TPU (Mosaic) and CUDA (Triton) from a CPU host at a canonical MoE shape."""
import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.grouped_matmul import _run, _run_transposed  # no dispatch: forces the compiled kernels
from tests.helpers import LOWERING_TARGETS as TARGETS, export_lowered, kernel_calls

# M = 2048 routed rows (1024 tokens x top-2), SmolLM2-135M's d = 576 and MLP width 1536, G = 8 experts, bf16.
# group_sizes is a traced input, as in an MoE layer.
M, K, N, G = 2048, 576, 1536, 8
LHS, RHS = jax.ShapeDtypeStruct((M, K), jnp.bfloat16), jax.ShapeDtypeStruct((G, K, N), jnp.bfloat16)
DY, SIZES = jax.ShapeDtypeStruct((M, N), jnp.bfloat16), jax.ShapeDtypeStruct((G,), jnp.int32)


@pytest.mark.parametrize("platform", TARGETS)
def test_grouped_matmul_forward_gradients_and_transposed_lower(platform):
  implementation, marker = TARGETS[platform]
  op = functools.partial(_run, implementation=implementation)
  forward = export_lowered(op, platform, LHS, RHS, SIZES)
  assert forward.out_avals[0].shape == (M, N) and kernel_calls(forward, marker) == 1

  def forward_and_grads(lhs, rhs, group_sizes, dy):
    out, vjp = jax.vjp(lambda lhs, rhs: op(lhs, rhs, group_sizes), lhs, rhs)
    return (out, *vjp(dy))

  backward = export_lowered(forward_and_grads, platform, LHS, RHS, SIZES, DY)
  assert [aval.shape for aval in backward.out_avals] == [(M, N), (M, K), (G, K, N)]
  assert kernel_calls(backward, marker) == 3  # forward, d lhs (the same kernel), d rhs (the transposed kernel)

  transposed = export_lowered(functools.partial(_run_transposed, implementation=implementation), platform,
                              LHS, DY, SIZES)
  assert transposed.out_avals[0].shape == (G, K, N) and kernel_calls(transposed, marker) == 1


@pytest.mark.parametrize("platform, tiling, message", [
    ("tpu", (128, 192, None), r"tiling\[1\] \(tk\)=192 is illegal for the TPU kernel"),  # < K, not 128-aligned
    ("cuda", (128, 96, None), r"tiling\[1\] \(tk\)=96 is illegal for the GPU \(Triton\) kernel"),
])
def test_grouped_matmul_illegal_tiles_are_refused_before_lowering(platform, tiling, message):
  op = functools.partial(_run, implementation=TARGETS[platform][0], tiling=tiling)
  with pytest.raises(ValueError, match=message):
    export_lowered(op, platform, LHS, RHS, SIZES)
