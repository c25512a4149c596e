"""linear_attention kernels exported for TPU (Mosaic) and CUDA (Triton) from a CPU host at canonical shapes:
forward alone (one kernel) and forward + VJP (the forward kernel saving per-chunk states, and the backward
kernel); illegal chunks refused with a readable message before lowering."""
import functools
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.linear_attention import _run  # no dispatch: forces 'pallas_tpu'/'pallas_gpu' on a CPU host
from tests.helpers import export_lowered

# A 1B-class layer: B 2, T 2048, H 8, K = V = 128, chunk 64 (32 chunks); Based: Taylor map on K = 16 (K' = 273).
B, T, H = 2, 2048, 8
TARGETS = {"tpu": ("pallas_tpu", "@tpu_custom_call"), "cuda": ("pallas_gpu", "@__gpu$xla.gpu.triton")}
# name -> (feature_map, K, V, gating, normalize)
VARIANTS = {
    "plain": ("identity", 128, 128, None, False),
    "retnet_decay": ("identity", 128, 128, "decay", False),
    "gla": ("identity", 128, 128, "gates", False),
    "based": ("taylor", 16, 64, None, True),
}


def _args(variant, dtype):
  feature_map, k_dim, v_dim, gating, _ = VARIANTS[variant]
  key_dim = 1 + k_dim + k_dim * k_dim if feature_map == "taylor" else k_dim
  spec = jax.ShapeDtypeStruct
  return [spec((B, T, H, k_dim), dtype), spec((B, T, H, k_dim), dtype), spec((B, T, H, v_dim), dtype),
          spec((H,), jnp.float32) if gating == "decay" else None,
          spec((B, T, H, key_dim), jnp.float32) if gating == "gates" else None, None]


def _op(variant, implementation, chunk_size=64):
  feature_map, k_dim, _, _, normalize = VARIANTS[variant]
  scale = 1.0 if feature_map == "taylor" else k_dim ** -0.5
  return functools.partial(_run, feature_map=feature_map, scale=scale, normalize=normalize, eps=1e-6,
                           chunk_size=chunk_size, form="chunk", implementation=implementation)


def _kernel_calls(exported, marker):
  return len(re.findall(re.escape(marker), exported.mlir_module()))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("platform", TARGETS)
def test_linear_attention_forward_and_gradients_lower(platform, dtype, variant):
  implementation, marker = TARGETS[platform]
  op = _op(variant, implementation)
  args = _args(variant, dtype)
  forward = export_lowered(op, platform, *args)
  v_dim = VARIANTS[variant][2]
  assert forward.out_avals[0].shape == (B, T, H, v_dim) and _kernel_calls(forward, marker) == 1

  def forward_and_grads(q, k, v, log_decay, log_gates, initial_state, d_out, d_final):
    outputs, vjp = jax.vjp(op, q, k, v, log_decay, log_gates, initial_state)
    return outputs, vjp((d_out, d_final))

  final_shape = forward.out_avals[1].shape
  backward = export_lowered(forward_and_grads, platform, *args, jax.ShapeDtypeStruct((B, T, H, v_dim), dtype),
                            jax.ShapeDtypeStruct(final_shape, jnp.float32))
  grad_shapes = [aval.shape for aval in backward.out_avals[2:]]
  assert grad_shapes == [arg.shape for arg in args if arg is not None]
  assert _kernel_calls(backward, marker) == 2  # forward (saving chunk states) and the reverse-chunk backward


@pytest.mark.parametrize("platform, chunk_size, message", [
    ("tpu", 12, r"chunk_size=12 is illegal for the TPU kernel: it must be a multiple of 8"),
    ("cuda", 48, r"chunk_size=48 is illegal for the GPU \(Triton\) kernel: it must be a power of two"),
    ("cuda", 8, r"chunk_size=8 is illegal for the GPU \(Triton\) kernel: it must be a power of two and at least 16"),
])
def test_linear_attention_illegal_chunk_is_refused_before_lowering(platform, chunk_size, message):
  op = _op("gla", TARGETS[platform][0], chunk_size=chunk_size)
  with pytest.raises(ValueError, match=message):
    export_lowered(op, platform, *_args("gla", jnp.bfloat16))
