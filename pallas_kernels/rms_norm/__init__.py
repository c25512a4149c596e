"""`rms_norm(x, weight)`: Llama/SmolLM2 RMSNorm with fused Pallas forward and backward kernels for TPU and GPU.

The kernel files (tpu.py, gpu.py) each hold a forward kernel and a backward kernel (dx plus one partial
dweight per row block); this file validates, flattens leading dimensions, dispatches and wires both kernels
with one `jax.custom_vjp`. The backward recomputes rsqrt(mean(x^2)) from x rather than saving it: one fused
pass over x it already reads, instead of an extra residual.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from pallas_kernels import _dispatch, _util
from pallas_kernels.rms_norm import gpu, reference, tpu

IMPLEMENTATIONS = ("reference", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu")
_KERNELS = _dispatch.kernel_modules(tpu=tpu, gpu=gpu)


def rms_norm(x, weight, *, eps=1e-6, implementation=None, block_rows=None):
  """y = x * rsqrt(mean(x^2, -1) + eps) * weight for x [..., D], weight [D]; f32 math, result in x.dtype.

  x and weight are float32 or bfloat16 (independently). `block_rows` rows of x per grid step (defaults:
  tpu.DEFAULT_BLOCK_ROWS, gpu.DEFAULT_BLOCK_ROWS); ragged row counts are zero-padded.
  `implementation`: None (the `pallas_kernels.implementation` policy, else by backend) or one of
  IMPLEMENTATIONS; see `pallas_kernels._dispatch`.
  """
  _check(x, weight, eps, block_rows)
  implementation = _dispatch.choose(implementation, IMPLEMENTATIONS, op="rms_norm")
  return _run(x, weight, eps=float(eps), implementation=implementation, block_rows=block_rows)


@functools.partial(jax.jit, static_argnames=("eps", "implementation", "block_rows"))
def _run(x, weight, *, eps=1e-6, implementation, block_rows=None):
  """`rms_norm` without validation or dispatch: runs `implementation` even where it cannot execute, which is
  how the lowering tests export 'pallas_tpu'/'pallas_gpu' from a CPU host."""
  if implementation == "reference":
    return reference.rms_norm(x, weight, eps=eps)
  rows = x.reshape(-1, x.shape[-1])  # leading dims flattened to rows
  return _pallas_rms_norm(rows, weight, eps, block_rows, implementation).reshape(x.shape)


def _kernel_args(eps, block_rows, implementation):
  return dict(eps=eps, block_rows=block_rows, interpret=_dispatch.interpret_params(implementation))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _pallas_rms_norm(x, weight, eps, block_rows, implementation):
  estimate = _util.cost_estimate(cost, x.shape, dtype=x.dtype, implementation=implementation,
                                 blocks={"block_rows": block_rows}, transcendentals=x.shape[0])  # rsqrt per row
  return _KERNELS[implementation].forward(x, weight, **_kernel_args(eps, block_rows, implementation),
                                          cost_estimate=estimate)


def _pallas_rms_norm_fwd(x, weight, eps, block_rows, implementation):
  return _pallas_rms_norm(x, weight, eps, block_rows, implementation), (x, weight)


def _pallas_rms_norm_bwd(eps, block_rows, implementation, residuals, dy):
  x, weight = residuals
  dx, dweight_partials = _KERNELS[implementation].backward(
      x, weight, dy, **_kernel_args(eps, block_rows, implementation))
  return dx, jnp.sum(dweight_partials, axis=0).astype(weight.dtype)


_pallas_rms_norm.defvjp(_pallas_rms_norm_fwd, _pallas_rms_norm_bwd)


def _check(x, weight, eps, block_rows):
  """Raises one `ValueError` naming the first bad argument."""
  if x.ndim < 1 or 0 in x.shape:
    raise ValueError(f"x must be a non-empty array [..., D]; got shape {tuple(x.shape)}.")
  if tuple(weight.shape) != (x.shape[-1],):
    raise ValueError(f"weight must have shape (D,) = ({x.shape[-1]},) to match x.shape[-1]; "
                     f"got {tuple(weight.shape)}.")
  _util.check_float_dtype("x", x.dtype)
  _util.check_float_dtype("weight", weight.dtype)
  # eps > 0 also keeps the zero rows that pad ragged blocks finite (0 * rsqrt(0) would be NaN in dweight).
  if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:
    raise ValueError(f"eps={eps!r} must be a positive number.")
  _util.check_block_arg("block_rows", block_rows)


def cost(x_shape, *, dtype, block_rows=None) -> dict:
  """Modelled cost of the TPU forward kernel for x of `x_shape` [..., D] and weight [D], both in `dtype`.

  `hbm_bytes` follows the row-block grid: x read and y written once per (padded) row, the weight block
  fetched once (its block index never changes). `ideal_bytes` counts the unpadded arrays. `flops` count
  x*x, the row sum, the two scalings per padded element (rsqrt per row not included).
  """
  *leading, d = x_shape
  rows = 1
  for size in leading:
    rows *= size
  padded_rows = _util.round_up(rows, tpu.resolve_block_rows(rows, block_rows))
  itemsize = jnp.dtype(dtype).itemsize
  return {"flops": 4 * padded_rows * d,
          "hbm_bytes": (2 * padded_rows * d + d) * itemsize,
          "ideal_bytes": (2 * rows * d + d) * itemsize}
