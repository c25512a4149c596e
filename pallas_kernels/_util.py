"""Helpers shared by every op: argument checks, block-size resolution and zero padding.

Block-size rules live here once, so every kernel refuses an illegal block with the same wording:
- Mosaic TPU tiles a block's last two dimensions by (8, 128): a block dimension is legal when it is a multiple
  of its alignment or spans the whole array dimension (`tpu_block`).
- Triton builds blocks with `tl.arange`, which needs powers of two (`gpu_block`).
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _dispatch

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def next_power_of_2(value: int) -> int:
  return 1 << max(value - 1, 0).bit_length()


def check_float_dtype(name: str, dtype) -> None:
  """Raises a `ValueError` naming `name` unless `dtype` is float32 or bfloat16."""
  if jnp.dtype(dtype) not in FLOAT_DTYPES:
    raise ValueError(f"{name}: dtype {jnp.dtype(dtype).name} is not supported; use float32 or bfloat16.")


def check_block_arg(name: str, value) -> None:
  """A block-size argument is None (use the kernel's default) or a positive int."""
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
    raise ValueError(f"{name}={value!r} must be a positive int (or None for the default).")


def tpu_block(name: str, requested: int | None, dim: int, *, default: int, align: int) -> int:
  """Block size along one dimension of a Mosaic-TPU BlockSpec.

  The requested (or default) size, clamped to `dim` -- one block spanning the whole dimension is always legal
  and needs no padding -- and otherwise required to be a multiple of `align` (8 for sublanes, 128 for lanes).
  """
  check_block_arg(name, requested)
  block = default if requested is None else requested
  if block >= dim:
    return dim
  if block % align:
    raise ValueError(f"{name}={block} is illegal for the TPU kernel: it must be a multiple of {align} "
                     f"(Mosaic tiles blocks by (8, 128)) or at least the dimension it blocks ({dim}).")
  return block


def gpu_block(name: str, requested: int | None, dim: int, *, default: int, minimum: int = 1) -> int:
  """Block size along one dimension of a Triton kernel: a power of two >= `minimum`, clamped to cover `dim`."""
  check_block_arg(name, requested)
  block = default if requested is None else requested
  if block & (block - 1) or block < minimum:
    raise ValueError(f"{name}={block} is illegal for the GPU (Triton) kernel: it must be a power of two "
                     f"and at least {minimum}.")
  return max(minimum, min(block, next_power_of_2(dim)))


def pad_to(x: jnp.ndarray, shape) -> jnp.ndarray:
  """Zero-pads `x` at the end of each dimension up to `shape` (a no-op when it already has that shape)."""
  if tuple(x.shape) == tuple(shape):
    return x
  return jnp.pad(x, [(0, target - size) for size, target in zip(x.shape, shape)])


def check_lengths(lengths, batch: int) -> None:
  """ValueError naming `lengths` unless it is an integer array of shape (batch,) (the decode ops' valid lengths)."""
  if not hasattr(lengths, "shape") or tuple(lengths.shape) != (batch,) or not jnp.issubdtype(lengths.dtype,
                                                                                            jnp.integer):
    raise ValueError(f"lengths must be an integer array of shape (B,) = ({batch},); got "
                     f"{getattr(lengths, 'dtype', '')}{tuple(getattr(lengths, 'shape', ()))}.")


def check_logit_scale(scale) -> None:
  """ValueError naming `scale` unless it is None or a positive number."""
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
    raise ValueError(f"scale={scale!r} must be a positive number (or None for head_dim ** -0.5).")


def cost_estimate(cost_fn: Callable[..., Mapping], *args, implementation: str, blocks: Mapping | None = None,
                  transcendentals: int = 0, **kwargs) -> pl.CostEstimate | None:
  """The `pl.CostEstimate` of a kernel from its op's cost model, `cost_fn(*args, **kwargs)` (flops, hbm_bytes):
  to XLA's cost analysis, and its scheduler, a pallas_call is otherwise free.

  `blocks` (the caller's block-size arguments) go to `cost_fn` only for the TPU kernels, whose tiling the cost
  models follow: a GPU block size need not be a legal TPU tile, so a GPU kernel gets the model at the default
  TPU tiling -- the same flops up to padding, and the TPU-tiled traffic standing in for its bytes. Where the
  model refuses a call's shapes (e.g. a GPU call the TPU tiling cannot cover), the kernel runs without an
  estimate (None) rather than fail over metadata; the kernel itself still checks its own arguments.
  """
  if blocks and _dispatch.tpu_style(implementation):
    kwargs.update(blocks)
  try:
    with jax.ensure_compile_time_eval():  # some models run small jnp schedules; under jit, keep them eager
      modelled = cost_fn(*args, **kwargs)
  except ValueError:
    return None
  return pl.CostEstimate(flops=int(modelled["flops"]), transcendentals=int(transcendentals),
                         bytes_accessed=int(modelled["hbm_bytes"]))
