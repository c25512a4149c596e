"""Plain-jnp block-sparse matmul: densify, then one f32-accumulating product (the ground truth)."""
from __future__ import annotations

import jax.numpy as jnp


def matmul(x, w, *, out_dtype=None):
  """`x [..., K] @ w.todense()` accumulated in f32, returned in `out_dtype` (default x.dtype)."""
  out = jnp.matmul(x, w.todense().astype(x.dtype), preferred_element_type=jnp.float32)
  return out.astype(out_dtype or x.dtype)
