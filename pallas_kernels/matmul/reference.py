"""Plain-jnp matmul: the ground truth the kernels are tested against (f32 accumulation)."""
from __future__ import annotations

import jax.numpy as jnp


def matmul(x, w, bias=None, *, out_dtype=None):
  """`x @ w (+ bias)` for x [..., K], w [K, N], bias [N]; accumulates in f32, returns `out_dtype` (default x.dtype)."""
  out = jnp.matmul(x, w, preferred_element_type=jnp.float32)
  if bias is not None:
    out = out + bias.astype(jnp.float32)
  return out.astype(out_dtype or x.dtype)
