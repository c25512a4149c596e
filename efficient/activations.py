"""Activation memory: remat policy presets and Mesa-style 8-bit-saved activations (layer floor: jax/flax only).

Remat (`checkpoint_policy(name)`), the `jax.checkpoint` policy a model applies to each of its blocks:

  'none'           no remat: autodiff saves whatever the backward needs (returns None: do not wrap).
  'block'          save nothing inside a block (`nothing_saveable`): only the block's inputs are kept and the
                   whole block is recomputed in the backward -- GPipe / Chen et al.'s per-layer checkpointing.
  'dots_saveable'  `dots_with_no_batch_dims_saveable`: keep the outputs of matmuls without batch dimensions
                   (every projection `btd,df->btf`: the expensive FLOPs) and recompute the cheap elementwise
                   work and the attention's batched (b, h) dots, whose T x T logits are the memory that grows
                   quadratically. (Plain `dots_saveable` would also keep those logits: less recompute, far more
                   memory at long context, so it is the wrong preset for a memory tool.)
  'names'          `save_only_these_names(*SAVE_NAMES)`: keep only the tensors a model tags with
                   `jax.ad_checkpoint.checkpoint_name(x, name)` -- ATTENTION_OUT (a block's attention output,
                   after its o projection) and MLP_HIDDEN (the MLP's gated hidden state, input of `down`).

Mesa (Pan et al. 2021, "Mesa: A Memory-saving Training Framework for Transformers"): the forward is computed in
full precision, but the tensor kept for the backward is stored in 8 bits and dequantized when the backward runs.
`int8_saved_silu`, `int8_saved_gelu` and `int8_saved_softmax` are `jax.custom_vjp` functions whose forward is
exactly the float function and whose only residual is 8-bit codes + one f32 scale per row:

  - silu / gelu save their INPUT as int8 codes, symmetric, scale = absmax / 127 per row over the last axis. Mesa
    learns a clipping range per head group (EMA-updated, asymmetric with a shift); per-row absmax needs no extra
    state or warm-up, is exact at the row maximum and costs 4 bytes per row (1/F of the codes for F features).
  - softmax saves its OUTPUT probabilities: its gradient dx = y * (g - sum(g * y)) needs y only. Mesa's released
    `softmax` autograd function stores both the input and the output in 8 bits, but its backward
    (`softmax_backward_data(grad, y, dim, x)`) reads only the output's values (the input for its dtype), so the
    input codes are dropped here. Probabilities lie in [0, 1]: stored as uint8 codes with scale = rowmax / 255
    (twice the resolution of signed codes, still 1 byte).

The backward evaluates the float function's own VJP at the dequantized residual, so its gradient is the exact
gradient of the float function at a point within half a quantization step of the input.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name  # noqa: F401  re-exported: the tagging function models use

REMAT_POLICIES = ("none", "block", "dots_saveable", "names")
SAVED_ACTIVATIONS = ("float", "int8")

ATTENTION_OUT = "attention_out"
MLP_HIDDEN = "mlp_hidden"
SAVE_NAMES = (ATTENTION_OUT, MLP_HIDDEN)


def check_choice(value, choices, *, name: str) -> None:
  """A ValueError naming `name` unless `value` is one of `choices`."""
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name}={value!r} is unknown; choose one of {tuple(choices)}.")


def checkpoint_policy(name: str) -> Callable | None:
  """The `jax.checkpoint` policy of preset `name` (one of REMAT_POLICIES); None for 'none' (no remat)."""
  check_choice(name, REMAT_POLICIES, name="remat")
  policies = jax.checkpoint_policies
  return {"none": None, "block": policies.nothing_saveable,
          "dots_saveable": policies.dots_with_no_batch_dims_saveable,
          "names": policies.save_only_these_names(*SAVE_NAMES)}[name]


# --- 8-bit codes of one tensor --------------------------------------------------------------------------------

def quantize_rows(x, *, signed: bool = True):
  """(codes, scale): int8 codes in [-127, 127] (signed) or uint8 in [0, 255] (non-negative x), with one f32
  scale per row of the last axis (absmax / levels; an all-zero row gets scale 1 and zero codes)."""
  levels = 127.0 if signed else 255.0
  x32 = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / levels, 1.0)
  low = -levels if signed else 0.0
  codes = jnp.clip(jnp.round(x32 / scale), low, levels).astype(jnp.int8 if signed else jnp.uint8)
  return codes, scale


def dequantize_rows(codes, scale, dtype=jnp.float32):
  """codes * scale, in `dtype`."""
  return (codes.astype(jnp.float32) * scale).astype(dtype)


# --- int8-saved elementwise activations -----------------------------------------------------------------------

def _gelu(x, approximate: bool):
  return jax.nn.gelu(x, approximate=approximate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _int8_saved_gelu(x, approximate):
  return _gelu(x, approximate)


def _gelu_fwd(x, approximate):
  codes, scale = quantize_rows(x)
  return _gelu(x, approximate), (codes, scale, jnp.zeros((), x.dtype))


def _gelu_bwd(approximate, residual, g):
  codes, scale, like = residual
  _, vjp = jax.vjp(lambda v: _gelu(v, approximate), dequantize_rows(codes, scale, like.dtype))
  return vjp(g)


_int8_saved_gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def int8_saved_silu(x):
  """`jax.nn.silu(x)` exactly; the backward keeps only int8 codes of `x` + a per-row scale (Mesa)."""
  return jax.nn.silu(x)


def _silu_fwd(x):
  codes, scale = quantize_rows(x)
  return jax.nn.silu(x), (codes, scale, jnp.zeros((), x.dtype))


def _silu_bwd(residual, g):
  codes, scale, like = residual
  _, vjp = jax.vjp(jax.nn.silu, dequantize_rows(codes, scale, like.dtype))
  return vjp(g)


int8_saved_silu.defvjp(_silu_fwd, _silu_bwd)


def int8_saved_gelu(x, approximate: bool = False):
  """`jax.nn.gelu(x, approximate=approximate)` exactly (default: the erf form, BERT's); the backward keeps only
  int8 codes of `x` + a per-row scale (Mesa)."""
  return _int8_saved_gelu(x, bool(approximate))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _int8_saved_softmax(x, axis):
  return jax.nn.softmax(x, axis=axis)


def _softmax_fwd(x, axis):
  y = jax.nn.softmax(x, axis=axis)
  codes, scale = quantize_rows(jnp.moveaxis(y, axis, -1), signed=False)
  return y, (codes, scale, jnp.zeros((), x.dtype))


def _softmax_bwd(axis, residual, g):
  codes, scale, like = residual
  y = jnp.moveaxis(dequantize_rows(codes, scale), -1, axis)
  g32 = g.astype(jnp.float32)
  dx = y * (g32 - jnp.sum(g32 * y, axis=axis, keepdims=True))
  return (dx.astype(like.dtype),)


_int8_saved_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def int8_saved_softmax(x, axis: int = -1):
  """`jax.nn.softmax(x, axis)` exactly; the backward keeps only uint8 codes of the output probabilities + one
  scale per row along `axis` (Mesa saves softmax's output: its gradient needs nothing else)."""
  if not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
    raise ValueError(f"axis must be an int in [-{x.ndim}, {x.ndim}), got {axis!r}.")
  return _int8_saved_softmax(x, axis % x.ndim)


def activation(name: str, saved: str = "float") -> Callable:
  """'silu' | 'gelu' | 'gelu_tanh' with float-saved (autodiff's own) or 'int8'-saved residuals."""
  check_choice(saved, SAVED_ACTIVATIONS, name="saved_activations")
  table = {"float": {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
                     "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)},
           "int8": {"silu": int8_saved_silu, "gelu": int8_saved_gelu,
                    "gelu_tanh": functools.partial(int8_saved_gelu, approximate=True)}}[saved]
  check_choice(name, tuple(table), name="activation")
  return table[name]
