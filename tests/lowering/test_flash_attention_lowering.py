"""flash_attention / flash_decode kernels exported for TPU (Mosaic) and CUDA (Triton) from a CPU host at the
canonical shapes: B = 1, T = S = 2048, H = 8, H_kv = 2, D = 64 and 128, bf16, causal."""
import functools
import re

import jax
import jax.numpy as jnp
import pytest

# No dispatch: `_run`/`_run_decode` force 'pallas_tpu'/'pallas_gpu' on a CPU host.
from pallas_kernels.flash_attention import _run, _run_decode
from tests.helpers import export_lowered

B, T, S, H, H_KV = 1, 2048, 2048, 8, 2
TARGETS = {"tpu": ("pallas_tpu", "@tpu_custom_call"), "cuda": ("pallas_gpu", "@__gpu$xla.gpu.triton")}


def _kernel_calls(exported, marker):
  return len(re.findall(re.escape(marker), exported.mlir_module()))


def _qkv(head_dim):
  return [jax.ShapeDtypeStruct((B, T, H, head_dim), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, S, H_KV, head_dim), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, S, H_KV, head_dim), jnp.bfloat16)]


def _forward_and_grads(op):
  def run(q, k, v, do):
    out, vjp = jax.vjp(op, q, k, v)
    return out, vjp(do)
  return run


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("platform", TARGETS)
def test_flash_attention_forward_and_gradients_lower(platform, head_dim):
  implementation, marker = TARGETS[platform]
  op = functools.partial(_run, implementation=implementation)
  args = _qkv(head_dim)
  forward = export_lowered(op, platform, *args)
  assert forward.out_avals[0].shape == (B, T, H, head_dim) and _kernel_calls(forward, marker) == 1
  backward = export_lowered(_forward_and_grads(op), platform, *args, args[0])
  assert [aval.shape for aval in backward.out_avals] == [(B, T, H, head_dim), (B, T, H, head_dim),
                                                         (B, S, H_KV, head_dim), (B, S, H_KV, head_dim)]
  assert _kernel_calls(backward, marker) == 3  # forward, dq, dk/dv


@pytest.mark.parametrize("platform", TARGETS)
def test_flash_attention_with_segments_window_and_soft_cap_lowers(platform):
  implementation, marker = TARGETS[platform]

  def op(q, k, v, segment_ids):
    return _run(q, k, v, segment_ids, segment_ids, implementation=implementation, sliding_window=512,
                logit_soft_cap=30.0)

  args = [*_qkv(128), jax.ShapeDtypeStruct((B, T), jnp.int32)]
  backward = export_lowered(lambda q, k, v, seg, do: _forward_and_grads(
      lambda q, k, v: op(q, k, v, seg))(q, k, v, do), platform, *args, args[0])
  assert _kernel_calls(backward, marker) == 3


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("platform", TARGETS)
def test_flash_decode_lowers(platform, head_dim):
  implementation, marker = TARGETS[platform]
  batch = 4
  args = [jax.ShapeDtypeStruct((batch, H, head_dim), jnp.bfloat16),
          jax.ShapeDtypeStruct((batch, S, H_KV, head_dim), jnp.bfloat16),
          jax.ShapeDtypeStruct((batch, S, H_KV, head_dim), jnp.bfloat16),
          jax.ShapeDtypeStruct((batch,), jnp.int32)]
  exported = export_lowered(functools.partial(_run_decode, implementation=implementation), platform, *args)
  assert exported.out_avals[0].shape == (batch, H, head_dim) and _kernel_calls(exported, marker) == 1


@pytest.mark.parametrize("platform, blocks, message", [
    ("tpu", (128, 100), r"block_kv=100 is illegal for the TPU kernel: it must be a multiple of 128"),
    ("tpu", (12, 128), r"block_q=12 is illegal for the TPU kernel: it must be a multiple of 8"),
    ("cuda", (48, 64), r"block_q=48 is illegal for the GPU \(Triton\) kernel: it must be a power of two"),
])
def test_flash_attention_illegal_blocks_are_refused_before_lowering(platform, blocks, message):
  op = functools.partial(_run, implementation=TARGETS[platform][0], blocks=blocks)
  with pytest.raises(ValueError, match=message):
    export_lowered(op, platform, *_qkv(128))


@pytest.mark.parametrize("platform, block_kv, message", [
    ("tpu", 1000, r"block_kv=1000 must divide the cache length S_max=2048"),
    ("cuda", 96, r"block_kv=96 must divide the cache length S_max=2048"),
    ("cuda", 8, r"block_kv=8 is illegal for the GPU \(Triton\) decode kernel"),
])
def test_flash_decode_illegal_blocks_are_refused_before_lowering(platform, block_kv, message):
  args = [jax.ShapeDtypeStruct((2, H, 128), jnp.bfloat16), jax.ShapeDtypeStruct((2, S, H_KV, 128), jnp.bfloat16),
          jax.ShapeDtypeStruct((2, S, H_KV, 128), jnp.bfloat16), jax.ShapeDtypeStruct((2,), jnp.int32)]
  op = functools.partial(_run_decode, implementation=TARGETS[platform][0], block_kv=block_kv)
  with pytest.raises(ValueError, match=message):
    export_lowered(op, platform, *args)
