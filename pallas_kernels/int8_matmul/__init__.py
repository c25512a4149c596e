"""`int8_matmul(x_q, x_scale, w_q, w_scale)`: W8A8 -- int8 activations (per-token scales) times int8 weights
(per-channel scales), int32 accumulation, f32/bf16 output; Pallas kernels for TPU and GPU.

`dynamic_int8_matmul(x, w_q, w_scale)` is the float entry point: it quantizes x per token on the fly
(`quantize_activations`) and runs the same product. Its gradient w.r.t. x is the straight-through estimate
dx = dy @ (w_q * w_scale).T (the rounding of x is treated as the identity; computed by XLA); the int8 weight and
its scales get no gradient. `int8_matmul` itself takes integers only and is not differentiable.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _dispatch, _util
from pallas_kernels.int8_matmul import gpu, reference, tpu

IMPLEMENTATIONS = ("reference", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu")
_KERNELS = _dispatch.kernel_modules(tpu=tpu, gpu=gpu)
quantize_activations = reference.quantize_activations


def int8_matmul(x_q, x_scale, w_q, w_scale, *, out_dtype=jnp.float32, implementation=None, block_m=None,
                block_n=None, block_k=None):
  """(x_q [..., K] @ w_q [K, N]) * x_scale [..., 1] * w_scale [N] (or [1, N]) -> [..., N] in `out_dtype`.

  x_q and w_q are int8; products accumulate exactly in int32; the scales (f32 or bf16) are applied in f32 once.
  `block_m/n/k` tile the product (defaults: tpu.DEFAULT_BLOCKS, gpu.DEFAULT_BLOCKS).
  `implementation`: None (the `pallas_kernels.implementation` policy, else by backend) or one of
  IMPLEMENTATIONS; see `pallas_kernels._dispatch`.
  """
  out_dtype = _check(x_q, x_scale, w_q, w_scale, out_dtype, block_m=block_m, block_n=block_n, block_k=block_k)
  implementation = _dispatch.choose(implementation, IMPLEMENTATIONS, op="int8_matmul")
  return _run(x_q, x_scale, w_q, w_scale, implementation=implementation, blocks=(block_m, block_n, block_k),
              out_dtype=out_dtype)


def dynamic_int8_matmul(x, w_q, w_scale, *, out_dtype=None, implementation=None, block_m=None, block_n=None,
                        block_k=None):
  """x [..., K] (f32/bf16) quantized per token to int8, times int8 w_q [K, N] with scales w_scale -> [..., N]
  in `out_dtype` (default x.dtype). Differentiable w.r.t. x (straight-through)."""
  if x.ndim < 1 or 0 in x.shape:
    raise ValueError(f"x must be a non-empty array [..., K]; got shape {tuple(x.shape)}.")
  _util.check_float_dtype("x", x.dtype)
  x_scale = jax.ShapeDtypeStruct((*x.shape[:-1], 1), jnp.float32)
  out_dtype = _check(jax.ShapeDtypeStruct(x.shape, jnp.int8), x_scale, w_q, w_scale, out_dtype or x.dtype,
                     block_m=block_m, block_n=block_n, block_k=block_k)
  implementation = _dispatch.choose(implementation, IMPLEMENTATIONS, op="int8_matmul")
  return _run_dynamic(x, w_q, w_scale, implementation=implementation, blocks=(block_m, block_n, block_k),
                      out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("implementation", "blocks", "out_dtype"))
def _run(x_q, x_scale, w_q, w_scale, *, implementation, blocks=(None, None, None), out_dtype=jnp.float32):
  """`int8_matmul` without validation or dispatch (how the lowering tests export the kernels from a CPU)."""
  out_dtype = jnp.dtype(out_dtype)
  w_scale = w_scale.reshape(1, -1)
  if implementation == "reference":
    return reference.int8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=out_dtype)
  k, n = w_q.shape
  estimate = _util.cost_estimate(cost, x_q.shape, w_q.shape, out_dtype=out_dtype, implementation=implementation,
                                 blocks=dict(zip(("block_m", "block_n", "block_k"), blocks)))
  out = _KERNELS[implementation].int8_matmul_2d(
      x_q.reshape(-1, k), x_scale.reshape(-1, 1), w_q, w_scale, blocks=blocks, out_dtype=out_dtype,
      interpret=_dispatch.interpret_params(implementation), cost_estimate=estimate)
  return out.reshape(*x_q.shape[:-1], n)


@functools.partial(jax.jit, static_argnames=("implementation", "blocks", "out_dtype"))
def _run_dynamic(x, w_q, w_scale, *, implementation, blocks=(None, None, None), out_dtype=None):
  return _dynamic(x, w_q, w_scale, jnp.dtype(out_dtype or x.dtype), blocks, implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _dynamic(x, w_q, w_scale, out_dtype, blocks, implementation):
  x_q, x_scale = reference.quantize_activations(x)
  return _run(x_q, x_scale, w_q, w_scale, implementation=implementation, blocks=blocks, out_dtype=out_dtype)


def _dynamic_fwd(x, w_q, w_scale, out_dtype, blocks, implementation):
  return _dynamic(x, w_q, w_scale, out_dtype, blocks, implementation), (w_q, w_scale, x[..., :0])


def _dynamic_bwd(out_dtype, blocks, implementation, residuals, dy):
  del out_dtype, blocks, implementation
  w_q, w_scale, x_empty = residuals
  weight = w_q.astype(jnp.float32) * w_scale.astype(jnp.float32).reshape(1, -1)
  dx = jnp.matmul(dy.astype(jnp.float32), weight.T, preferred_element_type=jnp.float32)
  return dx.astype(x_empty.dtype), None, None  # straight-through for x; the int8 weight is frozen


_dynamic.defvjp(_dynamic_fwd, _dynamic_bwd)


def _check(x_q, x_scale, w_q, w_scale, out_dtype, **blocks):
  """Raises one `ValueError` naming the first bad argument; returns the resolved output dtype."""
  if x_q.ndim < 1 or 0 in x_q.shape:
    raise ValueError(f"x_q must be a non-empty array [..., K]; got shape {tuple(x_q.shape)}.")
  if x_q.dtype != jnp.int8:
    raise ValueError(f"x_q: dtype {jnp.dtype(x_q.dtype).name} must be int8 (quantize_activations makes it).")
  if tuple(x_scale.shape) != (*x_q.shape[:-1], 1):
    raise ValueError(f"x_scale must have shape {(*x_q.shape[:-1], 1)} (one scale per token); "
                     f"got {tuple(x_scale.shape)}.")
  _util.check_float_dtype("x_scale", x_scale.dtype)
  if w_q.ndim != 2 or 0 in w_q.shape:
    raise ValueError(f"w_q must be a non-empty 2-D array [K, N]; got shape {tuple(w_q.shape)}.")
  if w_q.dtype != jnp.int8:
    raise ValueError(f"w_q: dtype {jnp.dtype(w_q.dtype).name} must be int8.")
  if w_q.shape[0] != x_q.shape[-1]:
    raise ValueError(f"w_q.shape[0] ({w_q.shape[0]}) must equal the activations' K ({x_q.shape[-1]}).")
  if tuple(w_scale.shape) not in ((w_q.shape[1],), (1, w_q.shape[1])):
    raise ValueError(f"w_scale must have shape (N,) or (1, N) with N={w_q.shape[1]} (one scale per output "
                     f"channel); got {tuple(w_scale.shape)}.")
  _util.check_float_dtype("w_scale", w_scale.dtype)
  out_dtype = jnp.dtype(out_dtype)
  _util.check_float_dtype("out_dtype", out_dtype)
  for name, value in blocks.items():
    _util.check_block_arg(name, value)
  return out_dtype


def cost(x_q_shape, w_q_shape, *, out_dtype=jnp.float32, block_m=None, block_n=None, block_k=None) -> dict:
  """Modelled cost of the TPU kernel for int8 x_q [..., K] @ int8 w_q [K, N] with f32 scales (the operand
  dtypes are fixed, so there is no `dtype`; the output is in `out_dtype`).

  Grid (M/bm, N/bn, K/bk), K innermost: x tiles are fetched once per N block, w tiles once per M block, the
  per-token scales once per (M, N) block (their index ignores K), the per-channel scales once per M block, the
  output written once; padding counts. `ideal_bytes` reads each operand once and writes the output once.
  """
  *leading, k = x_q_shape
  if len(w_q_shape) != 2 or w_q_shape[0] != k:
    raise ValueError(f"w_q_shape must be (K, N) with K = x_q_shape[-1] = {k}; got {tuple(w_q_shape)}.")
  m, n = math.prod(leading), w_q_shape[1]
  block_m, block_n, block_k = tpu.resolve_blocks(m, k, n, block_m, block_n, block_k)
  padded_m, padded_n, padded_k = (_util.round_up(m, block_m), _util.round_up(n, block_n),
                                  _util.round_up(k, block_k))
  m_blocks, n_blocks = padded_m // block_m, padded_n // block_n
  out_item = jnp.dtype(out_dtype).itemsize
  moved = (padded_m * padded_k * n_blocks + padded_k * padded_n * m_blocks + 4 * padded_m * n_blocks
           + 4 * padded_n * m_blocks + padded_m * padded_n * out_item)
  ideal = m * k + k * n + 4 * m + 4 * n + m * n * out_item
  return {"flops": 2 * padded_m * padded_n * padded_k + 2 * padded_m * padded_n, "hbm_bytes": moved,
          "ideal_bytes": ideal}
