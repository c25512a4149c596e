"""FNet token mixing (Lee-Thorp et al. 2021): Re(FFT_seq(FFT_hidden(x))), parameter-free.

NOT causal: every output token mixes every input token, future ones included, so it cannot replace attention in
a causal language model (it is not offered in `LlamaConfig.attention_schedule`). Use it as an encoder mixer
(classification, MLM-style objectives) or where a task allows bidirectional context. Padding also mixes in:
mask or trim padded positions before mixing when that matters.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def fnet_mixing(x):
  """x [..., T, D] real -> Re(FFT over T of FFT over D), in x.dtype (computed in complex64)."""
  if x.ndim < 2:
    raise ValueError(f"x must have at least 2 dims [..., length, hidden]; got shape {x.shape}.")
  mixed = jnp.fft.fft2(x.astype(jnp.complex64), axes=(-2, -1))
  return jnp.real(mixed).astype(x.dtype)


class FNetMixer(nnx.Module):
  """FNet's attention replacement: `mixer(x [B, T, D]) -> [B, T, D]`; no parameters."""

  def __init__(self, *, rngs: nnx.Rngs | None = None):
    del rngs

  def __call__(self, x):
    return fnet_mixing(x)
