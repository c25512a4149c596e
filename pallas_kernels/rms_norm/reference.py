"""RMSNorm as in Llama/SmolLM2: y = x * rsqrt(mean(x^2) + eps) * weight, in f32, cast to x.dtype.

`rms_norm` is the plain-jnp ground truth. `normalize_rows` and `backward_rows` are the same math on f32 row
blocks, written once and called inside both kernels (which only add tiling and loads/stores around them).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def rms_norm(x, weight, *, eps=1e-6):
  """RMS-normalises x [..., D] over its last axis and scales by weight [D]; statistics in f32."""
  x32 = x.astype(jnp.float32)
  inv_rms = lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (x32 * inv_rms * weight.astype(jnp.float32)).astype(x.dtype)


def _inv_rms(x, eps, feature_dim):
  # Divide by the true feature count: a kernel may carry zero-padded (masked) columns.
  return lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) / feature_dim + eps)


def normalize_rows(x, weight, *, eps, feature_dim):
  """Forward on an f32 block x [rows, D'] with weight [1, D'] (D' >= feature_dim, extra columns zero)."""
  return x * _inv_rms(x, eps, feature_dim) * weight


def backward_rows(x, weight, dy, *, eps, feature_dim):
  """Returns (dx [rows, D'], this block's dweight [1, D']) for f32 blocks; zero rows contribute nothing.

  With x_hat = x * r, r = rsqrt(mean(x^2) + eps):  dx = r * (g - x_hat * mean(g * x_hat)), g = dy * weight,
  and dweight = sum over rows of dy * x_hat.
  """
  inv_rms = _inv_rms(x, eps, feature_dim)
  x_hat = x * inv_rms
  grad_x_hat = dy * weight
  mean_projection = jnp.sum(grad_x_hat * x_hat, axis=-1, keepdims=True) / feature_dim
  dx = inv_rms * (grad_x_hat - x_hat * mean_projection)
  return dx, jnp.sum(dy * x_hat, axis=0, keepdims=True)
