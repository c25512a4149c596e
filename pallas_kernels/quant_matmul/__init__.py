"""`quant_matmul(x, w, scale, ...)`: activations (f32/bf16) times weight-only quantized weights, decoded in-kernel.

Formats and storage are described in `reference` (int8 per channel or group; packed int4 per group, symmetric or
with zero points; NF4 per block with optional QLoRA double quantization). `efficient.quant.QArray` produces
exactly these arrays: `quant_matmul(x, q.qvalue, q.scale, q.zero_point, fmt=q.fmt, scale_scale=q.scale_scale,
scale_offset=q.scale_offset)` for a weight quantized along axis 0 of a Flax [K, N] kernel.

The forward pass is the kernel (tpu.py, gpu.py); one `jax.custom_vjp` gives the gradient w.r.t. x only, so a
frozen quantized base can be fine-tuned through (LoRA/QLoRA): dx = dy @ dequant(w).T, computed by XLA from the
reference dequantization (the transposed product contracts over N, along which nothing is packed, so a
transposed kernel would be a different kernel; training batches are compute-bound there anyway). The quantized
weight and its scales get no gradient (zero cotangents).

Shapes: K (the contraction dim) must be divisible by the number of scale rows (groups); K = 576 (SmolLM2) takes
groups of 64 (9 groups) or 32, not 128 -- nothing is padded along K, since padding would change which rows
share a packed byte; `efficient.quant.quantize` refuses such a group size up front.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _dispatch, _util
from pallas_kernels.quant_matmul import gpu, reference, tpu

IMPLEMENTATIONS = ("reference", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu")
FORMATS = reference.FORMATS
BITS = reference.BITS  # bits per code: the stored w of a [K, N] weight has K * BITS[fmt] / 8 rows
_KERNELS = _dispatch.kernel_modules(tpu=tpu, gpu=gpu)
_WEIGHT_DTYPES = {"int8": (jnp.int8,), "int4": (jnp.uint8,), "nf4": (jnp.uint8,)}


def quant_matmul(x, w, scale, zero_point=None, *, fmt: str, scale_scale=None, scale_offset=None,
                 implementation=None, block_m=None, block_n=None, out_dtype=None):
  """x [..., K] @ dequantize(w) [K, N] -> [..., N], f32 accumulation, result in `out_dtype` (default x.dtype).

  w       int8 [K, N] ('int8'; uint8 with zero points) or uint8 [K/2, N] packed ('int4', 'nf4')
  scale   [G, N] f32/bf16 steps (NF4: absmax), G | K groups of K/G rows; int8 codes for double-quantized NF4
  zero_point    uint8 [G, N] (int formats, asymmetric), or None
  scale_scale, scale_offset   NF4 double quantization: f32 [G, ceil(N/256)] and f32 [] (see `reference`)
  block_m, block_n   output tile (defaults: full M up to 256 and the widest of 512/384/256/128 dividing N on
                     TPU; tpu/gpu.DEFAULT_BLOCKS); K is never blocked on TPU.
  `implementation`: None (the `pallas_kernels.implementation` policy, else by backend) or one of
  IMPLEMENTATIONS; see `pallas_kernels._dispatch`.
  """
  out_dtype = _check(x, w, scale, zero_point, scale_scale, scale_offset, fmt, out_dtype,
                     block_m=block_m, block_n=block_n)
  implementation = _dispatch.choose(implementation, IMPLEMENTATIONS, op="quant_matmul")
  return _run(x, w, scale, zero_point, scale_scale, scale_offset, fmt=fmt, implementation=implementation,
              blocks=(block_m, block_n), out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("fmt", "implementation", "blocks", "out_dtype"))
def _run(x, w, scale, zero_point=None, scale_scale=None, scale_offset=None, *, fmt, implementation,
         blocks=(None, None), out_dtype=None):
  """`quant_matmul` without validation or dispatch: runs `implementation` even where it cannot execute, which is
  how the lowering tests export 'pallas_tpu'/'pallas_gpu' from a CPU host."""
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if implementation == "reference":
    return reference.quant_matmul(x, w, scale, zero_point, fmt=fmt, scale_scale=scale_scale,
                                  scale_offset=scale_offset, out_dtype=out_dtype)
  rows = x.reshape(-1, x.shape[-1])  # leading dims flattened to M
  out = _pallas_quant_matmul(rows, w, scale, zero_point, scale_scale, scale_offset, fmt, out_dtype, blocks,
                             implementation)
  return out.reshape(*x.shape[:-1], w.shape[1])


def _kernel_call(x, weights, fmt, out_dtype, blocks, implementation):
  w, scale, zero_point, scale_scale, _ = weights
  estimate = _util.cost_estimate(cost, x.shape, w.shape, scale.shape, fmt=fmt, dtype=x.dtype,
                                 zero_point=zero_point is not None, scale_scale=scale_scale is not None,
                                 scale_dtype=scale.dtype, out_dtype=out_dtype, implementation=implementation,
                                 blocks=dict(zip(("block_m", "block_n"), blocks)))
  return _KERNELS[implementation].quant_matmul_2d(x, *weights, fmt=fmt, blocks=blocks, out_dtype=out_dtype,
                                                  interpret=_dispatch.interpret_params(implementation),
                                                  cost_estimate=estimate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _pallas_quant_matmul(x, w, scale, zero_point, scale_scale, scale_offset, fmt, out_dtype, blocks,
                         implementation):
  weights = (w, scale, zero_point, scale_scale, scale_offset)
  return _kernel_call(x, weights, fmt, out_dtype, blocks, implementation)


def _fwd(x, w, scale, zero_point, scale_scale, scale_offset, fmt, out_dtype, blocks, implementation):
  weights = (w, scale, zero_point, scale_scale, scale_offset)
  # x itself is not needed for dx; a zero-size slice carries its dtype to the backward pass.
  return _kernel_call(x, weights, fmt, out_dtype, blocks, implementation), (weights, x[:0, :0])


def _bwd(fmt, out_dtype, blocks, implementation, residuals, dy):
  del out_dtype, blocks, implementation
  (w, scale, zero_point, scale_scale, scale_offset), x_empty = residuals
  weight = reference.dequantize(w, scale, zero_point, fmt=fmt, scale_scale=scale_scale, scale_offset=scale_offset)
  dx = jnp.matmul(dy.astype(jnp.float32), weight.T, preferred_element_type=jnp.float32).astype(x_empty.dtype)
  return dx, None, None, None, None, None  # frozen weights: no gradient for codes, scales or zero points


_pallas_quant_matmul.defvjp(_fwd, _bwd)


def _check(x, w, scale, zero_point, scale_scale, scale_offset, fmt, out_dtype, **blocks):
  """Raises one `ValueError` naming the first bad argument; returns the resolved output dtype."""
  if fmt not in FORMATS:
    raise ValueError(f"fmt={fmt!r} is not supported by quant_matmul; choose one of {FORMATS}.")
  if x.ndim < 1 or 0 in x.shape:
    raise ValueError(f"x must be a non-empty array [..., K]; got shape {tuple(x.shape)}.")
  _util.check_float_dtype("x", x.dtype)
  if w.ndim != 2 or 0 in w.shape:
    raise ValueError(f"w must be a non-empty 2-D array [packed K, N]; got shape {tuple(w.shape)}.")
  allowed = _WEIGHT_DTYPES[fmt] + ((jnp.uint8,) if fmt == "int8" and zero_point is not None else ())
  if jnp.dtype(w.dtype) not in [jnp.dtype(d) for d in allowed]:
    raise ValueError(f"w: dtype {jnp.dtype(w.dtype).name} does not hold fmt={fmt!r} codes; expected "
                     f"{' or '.join(jnp.dtype(d).name for d in allowed)}.")
  k, n = reference.unpacked_k(w, fmt), w.shape[1]
  if k != x.shape[-1]:
    raise ValueError(f"w.shape[0] ({w.shape[0]}) holds K={k} rows of {reference.BITS[fmt]}-bit codes but "
                     f"x.shape[-1] is {x.shape[-1]}; got x {tuple(x.shape)}, w {tuple(w.shape)}.")
  if scale.ndim != 2 or scale.shape[1] != n or scale.shape[0] == 0 or k % scale.shape[0]:
    raise ValueError(f"scale must have shape [G, N={n}] with G dividing K={k} (groups of K/G rows); "
                     f"got {tuple(scale.shape)}.")
  if scale_scale is None:
    _util.check_float_dtype("scale", scale.dtype)
  elif scale.dtype != jnp.int8:
    raise ValueError(f"scale: dtype {scale.dtype} must be int8 (codes) when scale_scale is given.")
  if zero_point is not None:
    if fmt == "nf4":
      raise ValueError("zero_point is not supported for fmt='nf4' (NF4 is symmetric); pass None.")
    if tuple(zero_point.shape) != tuple(scale.shape) or zero_point.dtype != jnp.uint8:
      raise ValueError(f"zero_point must be uint8 with scale's shape {tuple(scale.shape)}; got "
                       f"{zero_point.dtype} {tuple(zero_point.shape)}.")
  if (scale_scale is None) != (scale_offset is None) or (scale_scale is not None and fmt != "nf4"):
    raise ValueError("scale_scale and scale_offset (NF4 double quantization) must be given together, "
                     f"and only with fmt='nf4'; got fmt={fmt!r}.")
  if scale_scale is not None:
    expected = (scale.shape[0], -(-n // reference.DOUBLE_QUANT_BLOCK))
    if tuple(scale_scale.shape) != expected or jnp.size(scale_offset) != 1:
      raise ValueError(f"scale_scale must have shape {expected} and scale_offset one element; got "
                       f"{tuple(scale_scale.shape)} and {tuple(jnp.shape(scale_offset))}.")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  _util.check_float_dtype("out_dtype", out_dtype)
  for name, value in blocks.items():
    _util.check_block_arg(name, value)
  return out_dtype


def cost(x_shape, w_shape, scale_shape, *, fmt: str, dtype, zero_point: bool = False, scale_scale: bool = False,
         scale_dtype=None, out_dtype=None, block_m=None, block_n=None) -> dict:
  """Modelled HBM traffic of the TPU path (wrapper copies included) for x [..., K] in `dtype` @ a `fmt` weight.

  The shapes are those the op takes: w_shape is the stored one ([K, N] for int8, [K/2, N] packed for int4 and
  nf4), scale_shape [G, N]. `zero_point` / `scale_scale`: whether zero points / NF4 double quantization
  (scale_scale and scale_offset) are passed. `scale_dtype` defaults to bf16 per group, f32 per channel, int8
  codes for double-quantized NF4.

  Grid (N blocks, M blocks), N outer: each packed weight tile, scale and zero tile is fetched once; x is
  fetched once when M is a single block, else once per (N, M) step -- or, when that moves fewer bytes
  (prefill), M outer: x fetched once, the weights once per M block (`tpu.weights_outer`). Counted too: the
  padding copy of x (ragged M), padding copies of the weights when N is ragged for the block, and the slice of a
  padded output. `ideal_bytes` reads the packed weight, its scales (and zeros, second-level scales), x once and
  writes the output once.
  """
  if fmt not in FORMATS:
    raise ValueError(f"fmt={fmt!r} is not supported by quant_matmul; choose one of {FORMATS}.")
  *leading, k = x_shape
  stored_k = k * BITS[fmt] // 8
  if len(w_shape) != 2 or w_shape[0] != stored_k:
    raise ValueError(f"w_shape must be ({stored_k}, N), the stored shape of a {fmt} weight [K, N] with "
                     f"K = x_shape[-1] = {k}; got {tuple(w_shape)}.")
  m, n = math.prod(leading), w_shape[1]
  if len(scale_shape) != 2 or scale_shape[1] != n or scale_shape[0] < 1 or k % scale_shape[0]:
    raise ValueError(f"scale_shape must be [G, N={n}] with G dividing K={k}; got {tuple(scale_shape)}.")
  if scale_scale and fmt != "nf4":
    raise ValueError(f"scale_scale (NF4 double quantization) goes only with fmt='nf4'; got fmt={fmt!r}.")
  groups, double_quant = scale_shape[0], bool(scale_scale)
  block_m, block_n = tpu.resolve_blocks(m, k, n, fmt, groups=groups, double_quant=double_quant,
                                        block_m=block_m, block_n=block_n)
  padded_m, padded_n = _util.round_up(m, block_m), _util.round_up(n, block_n)
  m_blocks, n_blocks = padded_m // block_m, padded_n // block_n
  x_item = jnp.dtype(dtype).itemsize
  out_item = jnp.dtype(out_dtype or dtype).itemsize
  if scale_dtype is None:
    scale_dtype = jnp.int8 if double_quant else (jnp.bfloat16 if groups > 1 else jnp.float32)
  per_column = stored_k + groups * (jnp.dtype(scale_dtype).itemsize + int(zero_point))
  second_level = groups * -(-n // reference.DOUBLE_QUANT_BLOCK) * 4 + 4 if double_quant else 0
  ideal = per_column * n + second_level + m * k * x_item + m * n * out_item
  weight_bytes, x_bytes = per_column * padded_n, padded_m * k * x_item
  if tpu.weights_outer(m_blocks, n_blocks, weight_bytes, x_bytes):
    moved = weight_bytes + x_bytes * (n_blocks if m_blocks > 1 else 1)
  else:
    moved = x_bytes + weight_bytes * (m_blocks if n_blocks > 1 else 1)
  moved += second_level + padded_m * padded_n * out_item
  if padded_m != m:
    moved += (m + padded_m) * k * x_item               # XLA: read x, write the padded copy
  if padded_n != n:
    moved += per_column * (n + padded_n)               # XLA: padding copies of w, scale, zero
  if padded_m != m or padded_n != n:
    moved += 2 * m * n * out_item                      # XLA: slice of the padded output
  if tpu.scales_partial_sums(k, groups):
    flops = 2 * padded_m * padded_n * k + 2 * groups * padded_m * padded_n
  else:  # the decoded tile is scaled (and shifted by its zero points) once per M block
    flops = 2 * padded_m * padded_n * k + (1 + int(zero_point)) * k * padded_n * (padded_m // block_m)
  return {"flops": flops, "hbm_bytes": moved, "ideal_bytes": ideal}
