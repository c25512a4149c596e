"""Post-training quantization methods on the [in_features, out_features] (Flax) view of a weight: RTN, GPTQ and
SmoothQuant's migration scales. Quantized layers and the model-level driver are in `layers` and `rules`.

GPTQ (Frantar et al. 2022) in our layout: GPTQ's "columns" (input features) are the *rows* of w [K, N]. Rows are
quantized in order; each row's rounding error, scaled by the Cholesky factor of H⁻¹, is pushed onto the rows not
yet quantized, so the layer output XW moves as little as possible. Implementation notes:
  - H = 2XᵀX/n from `efficient.calibration.capture_hessians`; rows with H_jj = 0 (dead inputs) get H_jj = 1 and
    w_j = 0, as the reference code does; damping adds `damp` x mean(diag H) to the diagonal.
  - U = upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU); blocks of `block_size` rows are processed with in-block updates
    immediately and the rest of the matrix updated once per block ("lazy batch updates").
  - Per-group scales are computed on the fly, as GPTQ does: when the first row of a group is reached, from the
    group's rows as they stand then (after all earlier updates). Every step goes through the format's own code,
    the one RTN uses: scales/zero points from `formats.int_params`, each row rounded by `formats.int_codes`
    (and `formats.int_values` for the error), the codes stored by `formats.encode_int`; so with H = I GPTQ
    returns RTN's QArray bit for bit.
  - act_order: rows are processed by descending diag(H) and un-permuted at the end. Groups stay the *original*
    contiguous row groups (so the QArray keeps its plain [G, N] scale layout and the kernels need no g_idx); since
    a group's rows are then visited out of order, its scales are fixed up front from the original weights
    ("static groups", AutoGPTQ's `static_groups=True`). Per-channel scales are always fixed up front (as GPTQ).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from efficient.quant import formats
from efficient.quant.qarray import QArray, check_finite, quantize
from pallas_kernels import packing

INT_FORMATS = {8: "int8", 4: "int4", 3: "int3", 2: "int2"}


def int_format(bits: int) -> formats.Format:
  """The uniform integer format of `bits` bits, or a ValueError naming `bits`."""
  if bits not in INT_FORMATS:
    raise ValueError(f"bits={bits!r} is not supported; choose one of {tuple(INT_FORMATS)}.")
  return formats.get(INT_FORMATS[bits])


def rtn_quantize(w, *, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
                 logical_axes: tuple | None = None, name: str = "w") -> QArray:
  """Round-to-nearest of w [in, out] along axis 0 (per output channel, or per group of `group_size` rows);
  `name` (e.g. the module path) names w in errors (a non-finite w is a ValueError)."""
  return quantize(w, int_format(bits).name, axis=0, group_size=group_size, symmetric=symmetric,
                  logical_axes=logical_axes, name=name)


def _check_gptq_args(w, hessian, group_size, damp, block_size, name):
  if w.ndim != 2 or 0 in w.shape or not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"w must be a non-empty float [in_features, out_features] matrix; got {w.dtype}{w.shape}.")
  k = w.shape[0]
  if hessian.shape != (k, k):
    raise ValueError(f"hessian must be [in_features, in_features] = {(k, k)}; got {tuple(hessian.shape)}.")
  check_finite(w, f"{name}: w")
  try:
    check_finite(hessian, f"{name}: hessian")
  except ValueError as error:
    raise ValueError(f"{error} (non-finite calibration activations?)") from None
  if group_size is not None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or k % group_size:
      raise ValueError(f"group_size={group_size!r} must be a positive int dividing in_features={k}.")
    if group_size > block_size and group_size % block_size:
      raise ValueError(f"group_size={group_size} must be a multiple of block_size={block_size} when larger.")
  if not 0 <= damp < 1:
    raise ValueError(f"damp={damp!r} must be in [0, 1) (a fraction of the mean Hessian diagonal).")


def gptq_quantize(w, hessian, *, bits: int = 4, group_size: int | None = 128, symmetric: bool = True,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  logical_axes: tuple | None = None, mask=None, name: str = "gptq") -> QArray:
  """GPTQ of w [in_features, out_features] (Flax layout) given hessian [in, in] (2XᵀX/n) -> QArray (axis 0).

  bits        8, 4, 3 or 2 (uniform int formats; sub-byte ones are stored packed)
  group_size  rows of in_features sharing a scale (must divide in_features), or None for per output channel
  symmetric   False: asymmetric with a uint8 zero point per scale
  act_order   process rows by descending diag(H) (see the module docstring for how groups stay contiguous)
  damp        diagonal damping as a fraction of mean(diag(H)) (GPTQ's percdamp; 0.01 by default)
  block_size  rows per lazy-update block (128 as GPTQ)
  mask        optional bool [in, out]: entries outside it are quantized to exactly zero and their error is
              compensated like any other (SparseGPT's joint sparsify-and-quantize with a fixed mask); scales
              come from the kept entries only
  name        what is quantized (e.g. the module path), for errors: a non-finite w or hessian is a ValueError
              naming it (`qarray.check_finite`)
  """
  fmt = int_format(bits)
  w = jnp.asarray(w)
  hessian = jnp.asarray(hessian, jnp.float32)
  k, n = w.shape
  if group_size is not None and group_size >= block_size:
    block_size = group_size  # a group never straddles blocks
  elif group_size is not None:
    block_size = group_size * max(1, block_size // group_size)
  _check_gptq_args(w, hessian, group_size, damp, block_size, name)
  if fmt.packed:
    packing.check_packable(k, fmt.bits, name="w.shape[0] (in_features)")
  g = group_size or k
  scale_dtype = "bfloat16" if group_size is not None else "float32"
  if mask is None:
    mask = jnp.ones((k, n), bool)
  elif tuple(jnp.shape(mask)) != (k, n):
    raise ValueError(f"mask must have w's shape {(k, n)}, got {tuple(jnp.shape(mask))}.")
  mask = jnp.asarray(mask, bool)
  w32, perm, u = _prepare(jnp.where(mask, w, 0).astype(jnp.float32), hessian, float(damp), bool(act_order))
  if not bool(jnp.all(jnp.isfinite(u))):
    raise ValueError(f"{name}: hessian is not positive definite even after damping; use more calibration tokens "
                     f"or a larger damp.")
  static = act_order or group_size is None
  scale = zero = None
  if static:  # scales of the original contiguous groups, fixed before any update
    scale, zero = formats.int_params(w32[jnp.argsort(perm)], fmt, (k // g, n), symmetric, scale_dtype)
  codes, scale, zero = _gptq_blocks(w32, mask[perm], u, perm, scale, zero, fmt=fmt, g=g, block_size=block_size,
                                    symmetric=symmetric, scale_dtype=scale_dtype, static=static)
  codes = codes[jnp.argsort(perm)]
  return QArray(qvalue=formats.encode_int(codes, fmt, symmetric, 0), scale=scale,
                zero_point=None if symmetric else zero, fmt=fmt.name, shape=(k, n), dtype=jnp.dtype(w.dtype).name,
                axis=0, granularity="channel" if group_size is None else "group", group_size=g,
                logical_axes=None if logical_axes is None else tuple(logical_axes))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _prepare(w, hessian, damp, act_order):
  """Dead rows, act-order permutation, damping and U = chol(H⁻¹) (upper)."""
  diag = jnp.diag(hessian)
  dead = diag == 0
  hessian = hessian + jnp.diag(jnp.where(dead, 1.0, 0.0))
  w = jnp.where(dead[:, None], 0.0, w)
  perm = jnp.argsort(-jnp.diag(hessian), stable=True) if act_order else jnp.arange(w.shape[0])
  w, hessian = w[perm], hessian[perm][:, perm]
  hessian = hessian + damp * jnp.mean(jnp.diag(hessian)) * jnp.eye(w.shape[0], dtype=jnp.float32)
  lower = jnp.linalg.cholesky(hessian)
  hinv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(w.shape[0], dtype=jnp.float32))
  u = jnp.linalg.cholesky(hinv).T  # H⁻¹ = UᵀU
  return w, perm, u


@functools.partial(jax.jit, static_argnames=("fmt", "g", "block_size", "symmetric", "scale_dtype", "static"))
def _gptq_blocks(w, mask, u, perm, scale, zero, *, fmt, g, block_size, symmetric, scale_dtype, static):
  """The GPTQ loop over w [K, N] (rows and mask already in processing order). Returns codes in processing order
  and the [G, N] scales/zero points of the original groups."""
  k, n = w.shape
  num_groups = k // g
  if not static:
    scale = jnp.ones((num_groups, n), scale_dtype)
    zero = jnp.zeros((num_groups, n), jnp.uint8)
  codes = jnp.zeros((k, n), jnp.float32)
  for start in range(0, k, block_size):  # static Python loop: K / block_size blocks (12 for K = 1536)
    stop = min(start + block_size, k)
    size = stop - start
    u_block = u[start:stop, start:stop]
    row_ids = jnp.arange(size)

    mask_block = mask[start:stop]

    def body(i, carry, start=start, u_block=u_block, row_ids=row_ids, mask_block=mask_block):
      w1, q1, err1, scale, zero = carry
      row = w1[i]
      if static:
        group = perm[start + i] // g  # the original group of this row
      else:
        group = (start + i) // g

        def new_params(args):
          w1, scale, zero = args
          block = jax.lax.dynamic_slice_in_dim(w1, i, g, axis=0)  # the group's rows, updated so far
          block = jnp.where(jax.lax.dynamic_slice_in_dim(mask_block, i, g, axis=0), block, 0.0)
          s, z = formats.int_params(block, fmt, (1, n), symmetric, scale_dtype)
          scale = jax.lax.dynamic_update_slice_in_dim(scale, s.astype(scale.dtype), group, axis=0)
          if z is not None:
            zero = jax.lax.dynamic_update_slice_in_dim(zero, z, group, axis=0)
          return scale, zero

        scale, zero = jax.lax.cond((start + i) % g == 0, new_params, lambda a: (a[1], a[2]), (w1, scale, zero))
      s = scale[group].astype(jnp.float32)
      z = None if symmetric else zero[group].astype(jnp.float32)
      q = formats.int_codes(row, s, z, fmt, symmetric)  # RTN's rounding, then its dequantization
      dq = formats.int_values(q, s, z)
      kept = mask_block[i]
      q, dq = jnp.where(kept, q, 0.0 if symmetric else z), jnp.where(kept, dq, 0.0)
      err = (row - dq) / u_block[i, i]
      # Push the error onto the later rows of the block now (rows <= i are done and left alone).
      w1 = w1 - jnp.where(row_ids > i, u_block[i], 0.0)[:, None] * err[None, :]
      return w1, q1.at[i].set(q), err1.at[i].set(err), scale, zero

    carry = (w[start:stop], jnp.zeros((size, n), jnp.float32), jnp.zeros((size, n), jnp.float32), scale, zero)
    w1, q1, err1, scale, zero = jax.lax.fori_loop(0, size, body, carry)
    codes = codes.at[start:stop].set(q1)
    if stop < k:  # lazy batch update of everything after the block
      w = w.at[stop:].add(-jnp.matmul(u[start:stop, stop:].T, err1, precision=jax.lax.Precision.HIGHEST))
  return codes, scale, zero


# Integer codes [K, N] (signed if symmetric, 0..2^b-1 with zero points) -> QArray storage packed along K.
encode_codes = formats.encode_int


def layer_error(x, w, w_hat) -> float:
  """‖XW − XŴ‖² (the GPTQ layer objective), in f64 on the host."""
  x, w, w_hat = (np.asarray(a, np.float64) for a in (x, w, w_hat))
  return float(np.sum((x @ (w - w_hat)) ** 2))


# --- SmoothQuant ------------------------------------------------------------------------------------------------

def smoothquant_scales(act_absmax, weights, alpha: float = 0.5, eps: float = 1e-5):
  """SmoothQuant's per-input-channel migration scales s_j = max|X_j|^α / max|W_j|^(1−α).

  act_absmax [K]: max |x_j| over calibration tokens; weights: [K, N_i] matrices consuming the same input (their
  rows' absmax are pooled). Dividing x_j by s_j and multiplying row j of every weight by s_j leaves XW unchanged
  and moves quantization difficulty from activations to weights by strength α.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha={alpha!r} must be in [0, 1].")
  act_absmax = jnp.asarray(act_absmax, jnp.float32)
  w_absmax = jnp.max(jnp.stack([jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1) for w in weights]), axis=0)
  if w_absmax.shape != act_absmax.shape:
    raise ValueError(f"act_absmax has shape {act_absmax.shape}, the weights have {w_absmax.shape[0]} rows.")
  s = jnp.maximum(act_absmax, eps) ** alpha / jnp.maximum(w_absmax, eps) ** (1.0 - alpha)
  return jnp.where(jnp.isfinite(s) & (s > 0), s, 1.0)


__all__ = ["INT_FORMATS", "encode_codes", "gptq_quantize", "int_format", "layer_error", "rtn_quantize",
           "smoothquant_scales"]
