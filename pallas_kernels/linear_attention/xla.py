"""Chunkwise-parallel linear attention in plain jnp: the kernels' per-chunk math (`common.chunk_forward`, intra-chunk
masked matmuls) vmapped over batch*heads, with the state passed between chunks by a lax.scan. Gradients come from
jax's autodiff of the scan (it saves each chunk's intermediates: O(T * chunk) extra memory per head)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.linear_attention import common


def chunk(q, k, v, log_gates, initial_state, *, chunk_size: int):
  """q, k [BH, T', K], v [BH, T', V'], log gates [BH, T', Kg] (f32) or None, initial state [BH, K, V'] (f32),
  with T' a multiple of chunk_size -> (o [BH, T', V'] f32, final state [BH, K, V'] f32)."""
  bh, padded_t, _ = q.shape
  num_chunks = padded_t // chunk_size

  def by_chunk(x):  # [BH, T', D] -> [N, BH, C, D], f32
    if x is None:
      return None
    return jnp.moveaxis(x.astype(jnp.float32).reshape(bh, num_chunks, chunk_size, x.shape[-1]), 1, 0)

  step = jax.vmap(functools.partial(common.chunk_forward, dtype=q.dtype))  # bf16 inputs: bf16 matmul operands

  def body(state, inputs):
    out, state = step(*inputs, state)
    return state, out

  final, out = lax.scan(body, initial_state.astype(jnp.float32),
                        (by_chunk(q), by_chunk(k), by_chunk(v), by_chunk(log_gates)))
  return jnp.moveaxis(out, 0, 1).reshape(bh, padded_t, out.shape[-1]), final
