"""`blockwise_adam_update(...)`: one fused pass of Adam/AdamW over block-wise quantized (8-bit or 4-bit) moments --
dequantize, update in float32, requantize -- with Pallas kernels for TPU and GPU.

Why one pass: an optimizer step is pure memory traffic. Unfused, dequantize -> Adam -> requantize reads and writes
float32 moments in HBM several times (~40 bytes per parameter); the kernel reads grad, param, the codes and the
per-block absmax once and writes the update, the codes and the absmax once (~16 bytes per parameter at 8 bits,
`cost()` models it). The maps are `maps.MAPS`; the exact semantics (rounding, the never-zero rule of the unsigned
8-bit map, zero blocks, nibble layout, the float32 operation order) are in `reference`'s docstring, and every
kernel matches the reference bit-for-bit in its interpret mode.

Lookups: Mosaic and Triton gather poorly from a table, so the kernels decode a code by a binary select tree over its
bits whose leaves are the map's float32 values (2**bits - 1 selects, exactly the table), and encode by a binary
search for the number of the map's midpoint thresholds below x, each step's threshold picked by a select tree over
the bits found so far (exactly nearest-with-ties-down; both checked against the tables in the tests). 4-bit codes
are (un)interleaved between the [n, B // 2] byte layout and the [n, B] element layout by tiny 0/1 (and 16) matmuls
on small integers, which are exact in bf16 with f32 accumulation on every backend.

The update is not differentiable (an optimizer step is not differentiated).
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from pallas_kernels import _dispatch, _util
from pallas_kernels.lowbit_adam import gpu, maps, reference, tpu
from pallas_kernels.lowbit_adam.maps import MAPS

IMPLEMENTATIONS = ("reference", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu")
_KERNELS = _dispatch.kernel_modules(tpu=tpu, gpu=gpu)

__all__ = ["IMPLEMENTATIONS", "MAPS", "blockwise_adam_update", "cost", "dequantize_blocks", "quantize_blocks"]


def blockwise_adam_update(grad, param, m_codes, m_absmax, v_codes, v_absmax, *, count, learning_rate, b1, b2, eps,
                          weight_decay, m_map, v_map, implementation=None, blocks_per_tile=None):
  """One Adam(W) step on block-quantized moments; returns (update, m_codes, m_absmax, v_codes, v_absmax).

  grad, param: float32 [n_blocks, B] (B a power of two; padding elements have grad 0 and param 0).
  m_codes / v_codes: uint8 [n_blocks, B] for 8-bit maps, [n_blocks, B // 2] for 4-bit maps (element 2j in the low
  nibble, 2j+1 in the high one); m_absmax / v_absmax: float32 [n_blocks].
  count: int32 scalar, the step t >= 1 after increment; learning_rate: float32 scalar (may be traced);
  b1, b2, eps, weight_decay: Python floats; m_map / v_map: names in `MAPS`.
  The update is `-learning_rate * (m_hat / (sqrt(v_hat) + eps) + weight_decay * param)` (optax.adamw's order; the
  decay term is skipped when weight_decay == 0, as optax.adam), to be added to param by the caller.
  `implementation`: None (the `pallas_kernels.implementation` policy, else by backend) or one of IMPLEMENTATIONS.
  `blocks_per_tile`: quantization blocks per kernel program (default: tpu/gpu `resolve_tile`).
  """
  _check(grad, param, m_codes, m_absmax, v_codes, v_absmax, m_map=m_map, v_map=v_map, b1=b1, b2=b2, eps=eps,
         weight_decay=weight_decay, count=count, learning_rate=learning_rate)
  _util.check_block_arg("blocks_per_tile", blocks_per_tile)
  implementation = _dispatch.choose(implementation, IMPLEMENTATIONS, op="blockwise_adam_update")
  return _run(grad, param, m_codes, m_absmax, v_codes, v_absmax, count, learning_rate, b1=float(b1), b2=float(b2),
              eps=float(eps), weight_decay=float(weight_decay), m_map=m_map, v_map=v_map,
              implementation=implementation, blocks_per_tile=blocks_per_tile)


@functools.partial(jax.jit, static_argnames=("b1", "b2", "eps", "weight_decay", "m_map", "v_map", "implementation",
                                             "blocks_per_tile"))
def _run(grad, param, m_codes, m_absmax, v_codes, v_absmax, count, learning_rate, *, b1, b2, eps, weight_decay,
         m_map, v_map, implementation, blocks_per_tile=None):
  """`blockwise_adam_update` without validation or dispatch (how the lowering tests export the kernels)."""
  scalars = reference.step_scalars(count, learning_rate, b1, b2)
  hyper = dict(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, m_map=m_map, v_map=v_map)
  if implementation == "reference":
    return reference.blockwise_adam_update(grad, param, m_codes, m_absmax, v_codes, v_absmax, scalars, **hyper)
  estimate = _util.cost_estimate(cost, grad.shape, m_map=m_map, v_map=v_map, implementation=implementation,
                                 blocks={"blocks_per_tile": blocks_per_tile}, transcendentals=grad.size)  # sqrt
  return _KERNELS[implementation].blockwise_adam_update(
      grad, param, m_codes, m_absmax, v_codes, v_absmax, scalars, **hyper, blocks_per_tile=blocks_per_tile,
      interpret=_dispatch.interpret_params(implementation), cost_estimate=estimate)


def quantize_blocks(x, absmax=None, map_name=None):
  """x float32 [n_blocks, B] -> (codes, absmax): absmax = max |x| per block unless given ([n_blocks], or a per-element
  normalizer [n_blocks, B] such as Li et al.'s rank-1 one), codes = nearest map value of x / absmax (uint8;
  [n_blocks, B // 2] packed for 4-bit maps). The reference jnp path (init, inspection, non-fused callers).
  `map_name` is required (a name in MAPS)."""
  maps.check_map(map_name)
  x = _check_blocks("x", x, maps.BITS[map_name])
  if absmax is None:
    absmax = reference.block_absmax(x)
  else:
    absmax = _check_normalizer(absmax, x.shape)
  return reference.quantize(x, absmax, map_name), absmax


def dequantize_blocks(codes, absmax, map_name):
  """Codes (as `quantize_blocks` makes them) and absmax ([n_blocks] or [n_blocks, B]) -> float32 [n_blocks, B]."""
  maps.check_map(map_name)
  codes = jnp.asarray(codes)
  if codes.ndim != 2 or 0 in codes.shape or codes.dtype != jnp.uint8:
    raise ValueError(f"codes must be a non-empty uint8 [n_blocks, width] array; got {codes.dtype} "
                     f"{tuple(codes.shape)}.")
  block = codes.shape[1] * (2 if maps.BITS[map_name] == 4 else 1)
  absmax = _check_normalizer(absmax, (codes.shape[0], block))
  return reference.dequantize(codes, absmax, map_name)


def cost(grad_shape, *, m_map, v_map, blocks_per_tile=None) -> dict:
  """Modelled cost of the TPU kernel for grad [n_blocks, B] (the moments' maps fix the code widths).

  Grid over row tiles of `blocks_per_tile` blocks: every program reads its grad, param, two code and two absmax
  tiles once and writes its update, code and absmax tiles once (the ragged last tile's DMAs are clipped to the
  array, so nothing is padded in HBM). `ideal_bytes` is the one-pass minimum: each input read once, each output
  written once; `hbm_bytes` adds the three step scalars every program reads (12 bytes per program).
  `flops` counts the VPU work per element: the Adam math (~16) and, per moment, the lookup-free (de)coding:
  2**bits - 1 selects to decode, 2**bits - bits - 1 selects + 3 * bits compares / ors to encode (bit-exact to the
  tables, see the package docstring), plus the 4-bit (un)packing matmuls. At 8 bits that is ~1000 VPU operations
  per element: on a TPU the step is VPU-bound rather than HBM-bound (the HBM bytes above are still one pass).
  """
  maps.check_map(m_map)
  maps.check_map(v_map)
  if len(grad_shape) != 2 or 0 in grad_shape:
    raise ValueError(f"grad_shape must be (n_blocks, B); got {tuple(grad_shape)}.")
  n_blocks, block = grad_shape
  tile = tpu.resolve_tile(n_blocks, block, blocks_per_tile, four_bit=4 in (maps.BITS[m_map], maps.BITS[v_map]))
  programs = -(-n_blocks // tile)
  elements = n_blocks * block
  code_bytes = sum(elements // (2 if maps.BITS[name] == 4 else 1) for name in (m_map, v_map))
  ideal = 2 * 4 * elements + code_bytes + 2 * 4 * n_blocks      # reads: grad, param, codes, absmax
  ideal += 4 * elements + code_bytes + 2 * 4 * n_blocks         # writes: update, codes, absmax
  flops = 16 * elements
  for name in (m_map, v_map):
    bits = maps.BITS[name]
    flops += ((2 ** bits - 1) + (2 ** bits - bits - 1) + 3 * bits) * elements
    if maps.BITS[name] == 4:
      flops += 2 * 2 * elements * (block // 2) + 2 * elements * block  # unpack (lo, hi) and pack matmuls
  return {"flops": flops, "hbm_bytes": ideal + 12 * programs, "ideal_bytes": ideal,
          "blocks_per_tile": tile, "programs": programs}


def _check(grad, param, m_codes, m_absmax, v_codes, v_absmax, *, m_map, v_map, b1, b2, eps, weight_decay, count,
           learning_rate):
  """Raises one `ValueError` naming the first bad argument."""
  maps.check_map(m_map)
  maps.check_map(v_map)
  if getattr(grad, "ndim", None) != 2 or 0 in grad.shape:
    raise ValueError(f"grad must be a non-empty float32 [n_blocks, B] array; got shape "
                     f"{tuple(getattr(grad, 'shape', ()))}.")
  n_blocks, block = grad.shape
  if block < 2 or block & (block - 1):
    raise ValueError(f"grad: the block size B = grad.shape[1] = {block} must be a power of two >= 2.")
  for name, x in (("grad", grad), ("param", param)):
    if jnp.dtype(x.dtype) != jnp.float32:
      raise ValueError(f"{name}: dtype {jnp.dtype(x.dtype).name} must be float32.")
  if tuple(param.shape) != tuple(grad.shape):
    raise ValueError(f"param must have grad's shape {tuple(grad.shape)}; got {tuple(param.shape)}.")
  for name, codes, absmax, map_name in (("m", m_codes, m_absmax, m_map), ("v", v_codes, v_absmax, v_map)):
    width = block // 2 if maps.BITS[map_name] == 4 else block
    if jnp.dtype(codes.dtype) != jnp.uint8 or tuple(codes.shape) != (n_blocks, width):
      raise ValueError(f"{name}_codes must be uint8 {(n_blocks, width)} for the {maps.BITS[map_name]}-bit map "
                       f"{map_name!r}; got {jnp.dtype(codes.dtype).name} {tuple(codes.shape)}.")
    if jnp.dtype(absmax.dtype) != jnp.float32 or tuple(absmax.shape) != (n_blocks,):
      raise ValueError(f"{name}_absmax must be float32 ({n_blocks},); got {jnp.dtype(absmax.dtype).name} "
                       f"{tuple(absmax.shape)}.")
  for name, value in (("b1", b1), ("b2", b2)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
      raise ValueError(f"{name}={value!r} must be a Python float in [0, 1) (a static hyperparameter).")
  for name, value in (("eps", eps), ("weight_decay", weight_decay)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0.0:
      raise ValueError(f"{name}={value!r} must be a Python float >= 0 (a static hyperparameter).")
  if jnp.ndim(count) != 0 or not jnp.issubdtype(jnp.result_type(count), jnp.integer):
    raise ValueError(f"count must be an integer scalar (the step t >= 1); got {count!r}.")
  if jnp.ndim(learning_rate) != 0:
    raise ValueError(f"learning_rate must be a scalar; got shape {jnp.shape(learning_rate)}.")


def _check_blocks(name, x, bits):
  x = jnp.asarray(x)
  if x.ndim != 2 or 0 in x.shape or jnp.dtype(x.dtype) != jnp.float32:
    raise ValueError(f"{name} must be a non-empty float32 [n_blocks, B] array; got {jnp.dtype(x.dtype).name} "
                     f"{tuple(x.shape)}.")
  block = x.shape[1]
  if block < 2 or block & (block - 1):
    raise ValueError(f"{name}: the block size B = {name}.shape[1] = {block} must be a power of two >= 2.")
  return x


def _check_normalizer(absmax, shape):
  absmax = jnp.asarray(absmax)
  if jnp.dtype(absmax.dtype) != jnp.float32 or tuple(absmax.shape) not in ((shape[0],), tuple(shape)):
    raise ValueError(f"absmax must be float32 of shape {(shape[0],)} (per block) or {tuple(shape)} (per element); "
                     f"got {jnp.dtype(absmax.dtype).name} {tuple(absmax.shape)}.")
  return absmax
