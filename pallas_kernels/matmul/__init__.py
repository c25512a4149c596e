"""`matmul(x, w, bias)`: a dense product with optional fused bias, f32 accumulation, Pallas kernels for TPU and GPU.

The kernel files (tpu.py, gpu.py) hold only the forward 2-D product; this file validates, flattens leading
dimensions, dispatches, and wires one `jax.custom_vjp` for both kernels: the backward pass is two more calls
of the same kernel, dx = dy @ w.T and dw = x.T @ dy (the transposes are materialised by XLA).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _dispatch, _util
from pallas_kernels.matmul import gpu, reference, tpu

IMPLEMENTATIONS = ("reference", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu")
_KERNELS = _dispatch.kernel_modules(tpu=tpu, gpu=gpu)


def matmul(x, w, bias=None, *, implementation=None, block_m=None, block_n=None, block_k=None, out_dtype=None):
  """`x @ w + bias` for x [..., K], w [K, N], bias [N] (optional) -> [..., N].

  Inputs are float32 or bfloat16 (x and w alike); products accumulate in f32; the result has `out_dtype`
  (default x.dtype). `block_m/n/k` tile the forward product (defaults: tpu.DEFAULT_BLOCKS, gpu.DEFAULT_BLOCKS);
  the two backward products use the kernel's defaults, since e.g. block_m=8 is a legal row block but not a
  legal contraction block once M becomes the contracted dimension of dw = x.T @ dy.
  `implementation`: None (the `pallas_kernels.implementation` policy, else by backend) or one of
  IMPLEMENTATIONS; see `pallas_kernels._dispatch`.
  """
  out_dtype = _check(x, w, bias, out_dtype, block_m=block_m, block_n=block_n, block_k=block_k)
  implementation = _dispatch.choose(implementation, IMPLEMENTATIONS, op="matmul")
  return _run(x, w, bias, implementation=implementation, blocks=(block_m, block_n, block_k), out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("implementation", "blocks", "out_dtype"))
def _run(x, w, bias=None, *, implementation, blocks=(None, None, None), out_dtype=None):
  """`matmul` without validation or dispatch: runs `implementation` even where it cannot execute, which is how
  the lowering tests export 'pallas_tpu'/'pallas_gpu' from a CPU host."""
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if implementation == "reference":
    return reference.matmul(x, w, bias, out_dtype=out_dtype)
  rows = x.reshape(-1, x.shape[-1])  # leading dims flattened to M
  out = _pallas_matmul(rows, w, bias, out_dtype, blocks, implementation)
  return out.reshape(*x.shape[:-1], w.shape[1])


def _kernel_call(x, w, bias, out_dtype, blocks, implementation):
  estimate = _util.cost_estimate(cost, x.shape, w.shape, dtype=x.dtype, bias=bias is not None,
                                 implementation=implementation, blocks=dict(zip(("block_m", "block_n", "block_k"),
                                                                                blocks)))
  return _KERNELS[implementation].matmul_2d(x, w, bias, blocks=blocks, out_dtype=out_dtype,
                                            interpret=_dispatch.interpret_params(implementation),
                                            cost_estimate=estimate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _pallas_matmul(x, w, bias, out_dtype, blocks, implementation):
  return _kernel_call(x, w, bias, out_dtype, blocks, implementation)


def _pallas_matmul_fwd(x, w, bias, out_dtype, blocks, implementation):
  return _kernel_call(x, w, bias, out_dtype, blocks, implementation), (x, w, bias)


def _pallas_matmul_bwd(out_dtype, blocks, implementation, residuals, dy):
  del out_dtype, blocks
  x, w, bias = residuals
  default_blocks = (None, None, None)
  # Feed the MXU the forward's operand dtype (dy may be f32 when out_dtype is); accumulation stays f32.
  dy_operand = dy.astype(x.dtype)
  dx = _kernel_call(dy_operand, w.T, None, x.dtype, default_blocks, implementation)
  dw = _kernel_call(x.T, dy_operand, None, w.dtype, default_blocks, implementation)
  dbias = None if bias is None else jnp.sum(dy.astype(jnp.float32), axis=0).astype(bias.dtype)
  return dx, dw, dbias


_pallas_matmul.defvjp(_pallas_matmul_fwd, _pallas_matmul_bwd)


def _check(x, w, bias, out_dtype, **blocks):
  """Raises one `ValueError` naming the first bad argument; returns the resolved output dtype."""
  if x.ndim < 1 or 0 in x.shape:
    raise ValueError(f"x must be a non-empty array [..., K]; got shape {tuple(x.shape)}.")
  if w.ndim != 2 or 0 in w.shape:
    raise ValueError(f"w must be a non-empty 2-D array [K, N]; got shape {tuple(w.shape)}.")
  if w.shape[0] != x.shape[-1]:
    raise ValueError(f"w.shape[0] ({w.shape[0]}) must equal x.shape[-1] (K={x.shape[-1]}); "
                     f"got x {tuple(x.shape)}, w {tuple(w.shape)}.")
  if bias is not None and tuple(bias.shape) != (w.shape[1],):
    raise ValueError(f"bias must have shape (N,) = ({w.shape[1]},); got {tuple(bias.shape)}.")
  _util.check_float_dtype("x", x.dtype)
  _util.check_float_dtype("w", w.dtype)
  if w.dtype != x.dtype:
    raise ValueError(f"w: dtype {w.dtype} must equal x's dtype {x.dtype} (cast one of them).")
  if bias is not None:
    _util.check_float_dtype("bias", bias.dtype)
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  _util.check_float_dtype("out_dtype", out_dtype)
  for name, value in blocks.items():
    _util.check_block_arg(name, value)
  return out_dtype


def cost(x_shape, w_shape, *, dtype, bias=False, block_m=None, block_n=None, block_k=None) -> dict:
  """Modelled cost of the TPU forward kernel for x [..., K] @ w [K, N] in `dtype` (output in `dtype`); `bias`:
  whether a bias [N] is added.

  `hbm_bytes` follows the grid (M/bm, N/bn, K/bk) with K innermost: every x tile is fetched once per N block,
  every w tile once per M block, the bias block once per (M, N) block and the output written once; padding to
  whole blocks counts, as the kernel moves it. `ideal_bytes` reads each operand and writes the output once.
  `flops` are those the kernel executes on the padded blocks.
  """
  *leading, k = x_shape
  if len(w_shape) != 2 or w_shape[0] != k:
    raise ValueError(f"w_shape must be (K, N) with K = x_shape[-1] = {k}; got {tuple(w_shape)}.")
  m, n = math.prod(leading), w_shape[1]
  block_m, block_n, block_k = tpu.resolve_blocks(m, k, n, block_m, block_n, block_k)
  padded_m, padded_n, padded_k = (_util.round_up(m, block_m), _util.round_up(n, block_n),
                                  _util.round_up(k, block_k))
  m_blocks, n_blocks = padded_m // block_m, padded_n // block_n
  itemsize = jnp.dtype(dtype).itemsize
  moved = padded_m * padded_k * n_blocks + padded_k * padded_n * m_blocks + padded_m * padded_n
  ideal = m * k + k * n + m * n
  flops = 2 * padded_m * padded_n * padded_k
  if bias:
    moved += padded_n * m_blocks
    ideal += n
    flops += padded_m * padded_n
  return {"flops": flops, "hbm_bytes": moved * itemsize, "ideal_bytes": ideal * itemsize}
