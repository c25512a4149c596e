"""`QArray`: an N-d quantized array as a pytree, with `quantize`, `dequantize`, honest byte counts and SQNR.

One type for every quantized tensor: a weight of any rank and the KV cache's keys and values are QArrays, made by
the one `quantize` and read by the one `dequantize`. Layout (`efficient.quant.formats` has the details):

  qvalue        the codes in the array's own N-d `shape`; sub-byte formats are packed along `pack_axis` (the
                first contraction axis) with `pallas_kernels.packing`'s planar layout, so that axis is
                bits * size / 8 long. A Flax [K, N] weight along axis 0 is [bits*K/8, N]: exactly what
                `pallas_kernels.quant_matmul` reads, with zero copies.
  scale         same rank as `shape`, broadcast by tiles: scale.shape[i] divides shape[i] and scale element j of
                axis i covers values [j * t_i, (j + 1) * t_i), t_i = shape[i] / scale.shape[i] (size 1: one scale
                along the whole axis). Per tensor all ones; per channel 1 on the contraction axes and full
                elsewhere; per group shape[axis] / group_size on the contraction axis. E.g. a [embed, heads,
                head_dim] kernel per channel over embed: scale [1, heads, head_dim]; group-wise: [embed/g, heads,
                head_dim]; a KV-cache value [B, S, H, D] per token over head_dim: scale [B, S, H, 1].
  zero_point    uint8, the scale's shape, for asymmetric int formats; else None
  scale_scale   NF4 double quantization: f32 second-level scales, the scale's shape with ceil(size / 256) on the
                block axis (`formats.block_axis`: the last non-contraction axis), else None
  scale_offset  NF4 double quantization: f32 [] mean absmax added back, else None

Array fields are pytree leaves (they shard, jit and checkpoint as arrays; packed stays packed); the format,
original shape/dtype, contraction axis (an int, or a sorted tuple for several), granularity, group size (elements
of the contraction axes per scale) and logical axis names are static metadata.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import checkify

from efficient.quant import formats
from pallas_kernels import packing
from pallas_kernels.quant_matmul import FORMATS as KERNEL_FORMATS, quant_matmul

GRANULARITIES = ("tensor", "channel", "group")
ARRAY_FIELDS = ("qvalue", "scale", "zero_point", "scale_scale", "scale_offset")


@struct.dataclass
class QArray:
  """A quantized N-d array (layout in the module docstring). `dequantize(q)` restores `shape` and `dtype`."""
  qvalue: jax.Array
  scale: jax.Array
  zero_point: Optional[jax.Array] = None
  scale_scale: Optional[jax.Array] = None
  scale_offset: Optional[jax.Array] = None
  fmt: str = struct.field(pytree_node=False, default="int8")
  shape: tuple = struct.field(pytree_node=False, default=())
  dtype: str = struct.field(pytree_node=False, default="float32")
  axis: int | tuple = struct.field(pytree_node=False, default=0)
  granularity: str = struct.field(pytree_node=False, default="channel")
  group_size: int = struct.field(pytree_node=False, default=0)
  logical_axes: Optional[tuple] = struct.field(pytree_node=False, default=None)

  @property
  def symmetric(self) -> bool:
    return self.zero_point is None

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def axes(self) -> tuple:
    """The contraction axes, sorted."""
    return formats.contraction_axes(self.axis, self.ndim)

  @property
  def pack_axis(self) -> int:
    """The axis sub-byte codes are packed along (the first contraction axis)."""
    return self.axes[0]

  @property
  def contraction_size(self) -> int:
    return math.prod(self.shape[a] for a in self.axes)

  @property
  def num_groups(self) -> int:
    return self.contraction_size // self.group_size

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def tile_shape(self) -> tuple:
    """How many values of each axis one scale covers (shape[i] / scale.shape[i])."""
    return tuple(d // s for d, s in zip(self.shape, self.scale.shape))

  def array_logical_axes(self) -> dict:
    """Logical axis names of each stored array (for sharding rules): the value's names, with None on an axis
    that is packed (a split would cut the planar planes apart) or that the array does not vary along (size 1),
    and on NF4's double-quantization block axis; `scale_offset` is a scalar (())."""
    names = self.logical_axes or (None,) * self.ndim
    out = {}
    for field in ARRAY_FIELDS:
      value = getattr(self, field)
      if value is None:
        continue
      if field == "scale_offset":
        out[field] = ()
        continue
      field_names = [n if value.shape[i] > 1 else None for i, n in enumerate(names)]
      if field == "qvalue" and formats.get(self.fmt).packed:
        field_names[self.pack_axis] = None
      if field == "scale_scale":
        field_names[formats.block_axis(self.ndim, self.axis)] = None
      out[field] = tuple(field_names)
    return out


def _check_axis(axis, ndim: int):
  """`axis` normalized: an int in [0, ndim), or a sorted tuple of distinct ones (several contraction axes)."""
  entries = axis if isinstance(axis, (tuple, list)) else (axis,)
  if not entries or any(isinstance(a, bool) or not isinstance(a, int) or not -ndim <= a < ndim for a in entries):
    raise ValueError(f"axis={axis!r} is out of range for x of rank {ndim}.")
  axes = formats.contraction_axes(tuple(entries), ndim)
  if len(set(axes)) != len(axes):
    raise ValueError(f"axis={axis!r} names an axis twice.")
  return axes[0] if len(axes) == 1 else axes


def check_finite(x, name: str = "x"):
  """Returns `x` if every value is finite; else a ValueError naming `name`, how many values are NaN / Inf and
  where the first one is. Quantizing a non-finite value stores a silently wrong number (a NaN is rounded to some
  code and can reset its group's scale, an Inf makes its whole group's scale, and with NF4 double quantization
  the whole tensor, non-finite), so every quantizer refuses it.

  On a traced `x` (inside jit, scan, grad, ...) the values are unknown when this runs: it emits a
  `jax.experimental.checkify.check` instead, so the function must be functionalized --
  `err, out = checkify.checkify(jax.jit(f))(x); err.throw()` raises the same message as a `JaxRuntimeError`
  (`err.get()` is the message or None). Staged without `checkify.checkify`, JAX refuses the trace (a ValueError:
  "...a `check` without functionalizing it..."), so the check is never silently dropped. `quantize` itself
  checks only concrete inputs (a traced `x`, e.g. a KV-cache write under jit, is quantized unchecked; call
  `check_finite` on it under checkify where that matters)."""
  if isinstance(x, jax.core.Tracer):
    checkify.check(jnp.all(jnp.isfinite(x)), f"{name}: holds NaN or Inf values; refusing to quantize them.")
    return x
  x = jnp.asarray(x)
  if bool(jnp.all(jnp.isfinite(x))):
    return x
  nans, infs = int(jnp.sum(jnp.isnan(x))), int(jnp.sum(jnp.isinf(x)))
  first = tuple(int(i) for i in np.argwhere(~np.asarray(jnp.isfinite(x)))[0])
  raise ValueError(f"{name}: {nans + infs} of {x.size} values are not finite ({nans} NaN, {infs} Inf; the "
                   f"first at index {first}, shape {tuple(x.shape)}); refusing to quantize them (they would be "
                   f"stored as silently wrong numbers). Fix or mask the tensor first.")


def quantize(x, fmt, *, axis: int | tuple = 0, group_size: int | None = None, granularity: str | None = None,
             symmetric: bool = True, scale_dtype=None, double_quant: bool = True,
             logical_axes: tuple | None = None, name: str = "x") -> QArray:
  """Quantizes `x` (float, any rank) to `fmt` (a name in `formats.FORMATS`) with round-to-nearest.

  axis          the contraction axis (0 for a Flax [in, out] kernel), or a tuple of them: scales are shared
                along it (per channel: one scale per slice of the other axes), groups run along it, and sub-byte
                codes are packed along it (the first, for a tuple)
  granularity   'tensor', 'channel' or 'group' (one scale per `group_size` consecutive entries of a single
                `axis`); default: 'group' when group_size is given, else 'channel'. NF4 defaults to groups of
                64, MX is always groups of 32.
  symmetric     False: int formats with a zero point per scale (codes 0 .. 2^b-1)
  scale_dtype   int formats: default bfloat16 per group, float32 per channel/tensor
  double_quant  NF4 only: double-quantize the absmax constants (QLoRA), default True
  logical_axes  names of x's axes (kept as metadata for sharding rules, see `QArray.array_logical_axes`)
  name          what x is, for error messages (e.g. a module path): a concrete x holding NaN/Inf is a ValueError
                naming it (`check_finite`; a traced x is not checked, see there)
  """
  fmt = formats.get(fmt)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: dtype {x.dtype} is not a float dtype; only float arrays can be quantized.")
  if x.ndim < 1 or 0 in x.shape:
    raise ValueError(f"{name} must be a non-empty array; got shape {tuple(x.shape)}.")
  if not isinstance(x, jax.core.Tracer):
    check_finite(x, name)
  axis = _check_axis(axis, x.ndim)
  axes = formats.contraction_axes(axis, x.ndim)
  k = math.prod(x.shape[a] for a in axes)
  granularity, group_size = _resolve_granularity(fmt, granularity, group_size, k, axis)
  if not symmetric and not fmt.asymmetric_ok:
    raise ValueError(f"symmetric=False is not supported by fmt={fmt.name!r} (only int formats have zero points).")
  if fmt.packed:
    packing.check_packable(x.shape[axes[0]], fmt.bits, name=f"x.shape[{axes[0]}]")
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
  x = x.astype(jnp.float32)
  per_tensor = granularity == "tensor"
  fields = {}
  if fmt.kind == "int":
    fields["qvalue"], fields["scale"], fields["zero_point"] = formats.quantize_int(
        x, fmt, group_size, per_tensor, symmetric, scale_dtype, axis)
  elif fmt.kind == "nf4":
    (fields["qvalue"], fields["scale"], fields["scale_scale"],
     fields["scale_offset"]) = formats.quantize_nf4(x, group_size, double_quant, axis)
  elif fmt.kind == "fp8":
    fields["qvalue"], fields["scale"] = formats.quantize_fp8(x, fmt, group_size, per_tensor, axis)
  else:
    fields["qvalue"], fields["scale"] = formats.quantize_mx(x, fmt, axis)
  return fields


def _resolve_granularity(fmt, granularity, group_size, k, axis):
  if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                 or group_size <= 0):
    raise ValueError(f"group_size={group_size!r} must be a positive int (or None).")
  if granularity is None:
    granularity = "group" if group_size is not None or fmt.kind in ("nf4", "mx") else "channel"
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity={granularity!r} must be one of {GRANULARITIES}.")
  if granularity == "group" and not isinstance(axis, int):
    raise ValueError(f"axis={axis!r}: granularity='group' (and fmt {fmt.name!r} if block-wise) needs a single "
                     f"contraction axis.")
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


def zeros(shape, fmt, *, dtype=jnp.float32, **kwargs) -> QArray:
  """A QArray of `shape` whose arrays are all zeros, laid out exactly as `quantize(x, fmt, **kwargs)` lays out an
  x of that shape and dtype (storage to write quantized slices into, e.g. a KV cache)."""
  abstract = jax.eval_shape(lambda x: quantize(x, fmt, **kwargs), jax.ShapeDtypeStruct(tuple(shape), dtype))
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)


def dequantize(q: QArray, dtype=None):
  """The float array `q` stands for, in `dtype` (default: the quantized array's original dtype)."""
  return _dequantize(q, jnp.dtype(dtype or q.dtype).name)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q: QArray, dtype: str):
  fmt = formats.get(q.fmt)
  if fmt.kind == "int":
    x = formats.dequantize_int(q.qvalue, q.scale, q.zero_point, fmt, q.shape, q.axis)
  elif fmt.kind == "nf4":
    x = formats.dequantize_nf4(q.qvalue, q.scale, q.scale_scale, q.scale_offset, q.shape, q.axis)
  elif fmt.kind == "fp8":
    x = formats.dequantize_fp8(q.qvalue, q.scale, q.shape)
  else:
    x = formats.dequantize_mx(q.qvalue, q.scale, fmt, q.shape, q.axis)
  return x.astype(dtype)


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
  differentiable w.r.t. x). `q` must be a 2-D [K, N] weight quantized along axis 0 as int8, int4 or nf4: its
  arrays are passed to the kernel as they are stored."""
  if q.fmt not in KERNEL_FORMATS or len(q.shape) != 2 or q.axis != 0:
    raise ValueError(f"q must be a 2-D [K, N] weight quantized along axis 0 in one of {KERNEL_FORMATS}; got "
                     f"fmt={q.fmt!r}, shape={q.shape}, axis={q.axis}.")
  if q.granularity == "tensor":  # the kernel takes one scale row per group: broadcast the single scale
    q = q.replace(scale=jnp.broadcast_to(q.scale, (1, q.shape[1])),
                  zero_point=None if q.zero_point is None else jnp.broadcast_to(q.zero_point, (1, q.shape[1])))
  return quant_matmul(x, q.qvalue, q.scale, q.zero_point, fmt=q.fmt, scale_scale=q.scale_scale,
                      scale_offset=q.scale_offset, implementation=implementation, block_m=block_m,
                      block_n=block_n, out_dtype=out_dtype)
