"""`QArray`: a quantized array as a pytree, with `quantize`, `dequantize`, honest byte counts and SQNR.

Storage is the canonical 2-D view of `formats`: the contraction axis first, the other axes flattened, so a
weight in Flax layout [in, out] quantized along axis 0 stores exactly what `pallas_kernels.quant_matmul` reads
(`qvalue` [packed K, N], `scale` [groups, N], ...). Array fields are pytree leaves (they shard, jit and
checkpoint as arrays; packed stays packed); the format, original shape/dtype, axis, granularity, group size
and logical axis names are static metadata.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from efficient.quant import formats
from pallas_kernels import _packing

GRANULARITIES = ("tensor", "channel", "group")


@struct.dataclass
class QArray:
  """A quantized array. `dequantize(q)` restores an array of `shape` and `dtype`.

  qvalue        codes: int8/uint8/float8 [K, R], or uint8 packed [bits*K/8, R] for sub-byte formats
  scale         [num_groups, R] ([1, 1] per-tensor): f32/bf16 step sizes, E8M0 uint8 (MX), f32 absmax or
                its int8 double-quantized codes (NF4)
  zero_point    uint8 [num_groups, R] for asymmetric int formats, else None
  scale_scale   NF4 double quantization: f32 [num_groups, ceil(R/256)] second-level scales, else None
  scale_offset  NF4 double quantization: f32 [] mean absmax added back, else None
  """
  qvalue: jax.Array
  scale: jax.Array
  zero_point: Optional[jax.Array] = None
  scale_scale: Optional[jax.Array] = None
  scale_offset: Optional[jax.Array] = None
  fmt: str = struct.field(pytree_node=False, default="int8")
  shape: tuple = struct.field(pytree_node=False, default=())
  dtype: str = struct.field(pytree_node=False, default="float32")
  axis: int = struct.field(pytree_node=False, default=0)
  granularity: str = struct.field(pytree_node=False, default="channel")
  group_size: int = struct.field(pytree_node=False, default=0)  # rows of K per scale (K for tensor/channel)
  logical_axes: Optional[tuple] = struct.field(pytree_node=False, default=None)

  @property
  def symmetric(self) -> bool:
    return self.zero_point is None

  @property
  def contraction_size(self) -> int:
    return self.shape[self.axis]

  @property
  def num_groups(self) -> int:
    return self.contraction_size // self.group_size

  @property
  def size(self) -> int:
    return math.prod(self.shape)


def _canonical(x, axis: int):
  """x -> [K, R]: the contraction axis first, the rest flattened (row-major)."""
  moved = jnp.moveaxis(x, axis, 0)
  return moved.reshape(moved.shape[0], -1)


def quantize(x, fmt, *, axis: int = 0, group_size: int | None = None, granularity: str | None = None,
             symmetric: bool = True, scale_dtype=None, double_quant: bool = True,
             logical_axes: tuple | None = None) -> QArray:
  """Quantizes `x` (float) to `fmt` (a name in `formats.FORMATS`) with round-to-nearest.

  axis          the contraction axis (0 for a Flax [in, out] kernel): groups run along it, scales are per
                slice of the other axes
  granularity   'tensor', 'channel' (one scale per slice along `axis`) or 'group' (one per `group_size` rows
                of `axis`); default: 'group' when group_size is given, else 'channel'. NF4 defaults to groups of
                64, MX is always groups of 32.
  symmetric     False: int formats with a zero point per scale (codes 0 .. 2^b-1)
  scale_dtype   int formats: default bfloat16 per group, float32 per channel/tensor
  double_quant  NF4 only: double-quantize the absmax constants (QLoRA), default True
  logical_axes  names of x's axes (kept as metadata for sharding rules)
  """
  fmt = formats.get(fmt)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x: dtype {x.dtype} is not a float dtype; only float arrays can be quantized.")
  if x.ndim < 1 or 0 in x.shape:
    raise ValueError(f"x must be a non-empty array; got shape {tuple(x.shape)}.")
  if isinstance(axis, bool) or not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
    raise ValueError(f"axis={axis!r} is out of range for x of rank {x.ndim}.")
  axis %= x.ndim
  k = x.shape[axis]
  granularity, group_size = _resolve_granularity(fmt, granularity, group_size, k)
  if not symmetric and not fmt.asymmetric_ok:
    raise ValueError(f"symmetric=False is not supported by fmt={fmt.name!r} (only int formats have zero points).")
  if fmt.packed:
    _packing.check_packable(k, fmt.bits, name=f"x.shape[{axis}]")
  if logical_axes is not None and len(logical_axes) != x.ndim:
    raise ValueError(f"logical_axes={logical_axes!r} must name all {x.ndim} axes of x.")
  if scale_dtype is None:
    scale_dtype = jnp.bfloat16 if granularity == "group" else jnp.float32
  fields = _quantize_fields(x, fmt.name, axis, group_size, granularity, symmetric, jnp.dtype(scale_dtype).name,
                            bool(double_quant))
  return QArray(**fields, fmt=fmt.name, shape=tuple(x.shape), dtype=jnp.dtype(x.dtype).name, axis=axis,
                granularity=granularity, group_size=group_size,
                logical_axes=None if logical_axes is None else tuple(logical_axes))


@functools.partial(jax.jit, static_argnums=range(1, 8))
def _quantize_fields(x, fmt_name, axis, group_size, granularity, symmetric, scale_dtype, double_quant):
  """The arrays of a QArray (one compiled program per configuration and shape)."""
  fmt = formats.get(fmt_name)
  x2 = _canonical(x, axis).astype(jnp.float32)
  per_tensor = granularity == "tensor"
  fields = {}
  if fmt.kind == "int":
    fields["qvalue"], fields["scale"], fields["zero_point"] = formats.quantize_int(
        x2, fmt, group_size, per_tensor, symmetric, scale_dtype)
  elif fmt.kind == "nf4":
    (fields["qvalue"], fields["scale"], fields["scale_scale"],
     fields["scale_offset"]) = formats.quantize_nf4(x2, group_size, double_quant)
  elif fmt.kind == "fp8":
    fields["qvalue"], fields["scale"] = formats.quantize_fp8(x2, fmt, group_size, per_tensor)
  else:
    fields["qvalue"], fields["scale"] = formats.quantize_mx(x2, fmt)
  return fields


def _resolve_granularity(fmt, granularity, group_size, k):
  if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                 or group_size <= 0):
    raise ValueError(f"group_size={group_size!r} must be a positive int (or None).")
  if granularity is None:
    granularity = "group" if group_size is not None or fmt.kind in ("nf4", "mx") else "channel"
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity={granularity!r} must be one of {GRANULARITIES}.")
  if fmt.kind == "mx":
    if granularity != "group" or group_size not in (None, formats.MX_BLOCK):
      raise ValueError(f"fmt={fmt.name!r} uses blocks of {formats.MX_BLOCK} along the contraction axis; "
                       f"got granularity={granularity!r}, group_size={group_size!r}.")
    group_size = formats.MX_BLOCK
  if fmt.kind == "nf4" and granularity != "group":
    raise ValueError(f"fmt='nf4' is block-wise (granularity='group'); got granularity={granularity!r}.")
  if granularity == "group":
    group_size = group_size or formats.NF4_BLOCK
    if k % group_size:
      raise ValueError(f"group_size={group_size} must divide the contraction dimension (x.shape[axis] = {k}).")
    return granularity, group_size
  if group_size is not None:
    raise ValueError(f"group_size={group_size} is only meaningful with granularity='group' "
                     f"(got granularity={granularity!r}).")
  return granularity, k


def dequantize(q: QArray, dtype=None):
  """The float array `q` stands for, in `dtype` (default: the quantized array's original dtype)."""
  return _dequantize(q, jnp.dtype(dtype or q.dtype).name)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q: QArray, dtype: str):
  fmt = formats.get(q.fmt)
  k, g = q.contraction_size, q.group_size
  if fmt.kind == "int":
    x2 = formats.dequantize_int(q.qvalue, q.scale, q.zero_point, fmt, k, g)
  elif fmt.kind == "nf4":
    x2 = formats.dequantize_nf4(q.qvalue, q.scale, q.scale_scale, q.scale_offset, k, g)
  elif fmt.kind == "fp8":
    x2 = formats.dequantize_fp8(q.qvalue, q.scale, k, g)
  else:
    x2 = formats.dequantize_mx(q.qvalue, q.scale, fmt, k)
  moved_shape = (k,) + tuple(d for i, d in enumerate(q.shape) if i != q.axis)
  return jnp.moveaxis(x2.reshape(moved_shape), 0, q.axis).astype(dtype)


def nbytes(q: QArray) -> int:
  """Bytes `q` occupies: codes + scales + zero points + second-level scales, as stored (nothing omitted)."""
  return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(q))


def bytes_per_param(q: QArray) -> float:
  """`nbytes(q)` per element of the original array (a bf16 array is 2.0, int8 per-channel ~1 + 4/K)."""
  return nbytes(q) / q.size


def sqnr_db(x, y) -> jax.Array:
  """Signal-to-quantization-noise ratio of `y` against the signal `x`, in dB: 20 log10(||x|| / ||x - y||)
  (torchao's `compute_error`). +inf when y == x."""
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  return 20.0 * jnp.log10(jnp.linalg.norm(x) / jnp.linalg.norm(x - y))


def matmul(x, q: QArray, *, implementation=None, block_m=None, block_n=None, out_dtype=None):
  """x [..., K] @ the weight `q` stands for -> [..., N], by `pallas_kernels.quant_matmul` (weight-only kernel;
  differentiable w.r.t. x). `q` must be a 2-D [K, N] weight quantized along axis 0 as int8, int4 or nf4."""
  from pallas_kernels.quant_matmul import FORMATS, quant_matmul  # the kernels need no Flax; import on use
  if q.fmt not in FORMATS or len(q.shape) != 2 or q.axis != 0:
    raise ValueError(f"q must be a 2-D [K, N] weight quantized along axis 0 in one of {FORMATS}; got "
                     f"fmt={q.fmt!r}, shape={q.shape}, axis={q.axis}.")
  if q.granularity == "tensor":  # the kernel takes one scale row per group: broadcast the single scale
    q = q.replace(scale=jnp.broadcast_to(q.scale, (1, q.shape[1])),
                  zero_point=None if q.zero_point is None else jnp.broadcast_to(q.zero_point, (1, q.shape[1])))
  return quant_matmul(x, q.qvalue, q.scale, q.zero_point, fmt=q.fmt, scale_scale=q.scale_scale,
                      scale_offset=q.scale_offset, implementation=implementation, block_m=block_m,
                      block_n=block_n, out_dtype=out_dtype)
