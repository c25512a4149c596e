"""Quantized drop-in replacements for any linear layer (`efficient.nn.Einsum`, `nnx.Linear`, `nnx.Einsum`; same
call signature: `module(x) -> y`).

A replacement keeps the layer's equation (`efficient.nn.linear_view`; '...i,io->...o' for nnx.Linear), compute
dtype and bias (the same float `nnx.Param`: y = x Ŵ + b) and stores its weight as the [in, out] matrix view
(`efficient.calibration.kernel_as_matrix`) quantized along `in`:

  QuantizedEinsum(mode='weight_only')  any QArray format; int8/int4/nf4 run through `pallas_kernels.quant_matmul`
                                       (on CPU its reference/XLA path), the others (int3/int2, fp8, MX) are
                                       dequantized to the compute dtype first.
  QuantizedEinsum(mode='w8a8')         int8 per-channel weights x int8 per-token dynamic activations through
                                       `pallas_kernels.int8_matmul` (int32 accumulation).
  QuantizedEinsum(mode='fp8')          fp8 weights (per channel) x activations cast to fp8 per token, f32 accumulate.
  LLMInt8Einsum                        LLM.int8(): W8A8 vector-wise, except input features where any |x| >= 6 in
                                       the batch ("outlier dimensions"), which are multiplied in float.

The QArray's arrays are `QuantizedWeight` variables (not `nnx.Param`: optimizers that train params leave them
alone) carrying logical axis names: the [in, out] matrix takes the name of the kernel's leading contracted axis
and of its leading output axis (the flattened dims keep that axis major, so the same mesh rule shards them);
scale rows are named like the weight rows when there is more than one group. A kernel without names (a plain
nnx.Linear) gives None axes (replicated under every `efficient.sharding` preset). The static QArray metadata lives
on the module, so `nnx.split` yields plain arrays that orbax saves as stored (packed stays packed).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient import calibration
from efficient.quant import qarray as qa
from pallas_kernels.int8_matmul import dynamic_int8_matmul
from pallas_kernels.quant_matmul import FORMATS as KERNEL_FORMATS  # run by quant_matmul, not dequantized

MODES = ("weight_only", "w8a8", "fp8")
_FIELDS = ("qvalue", "scale", "zero_point", "scale_scale", "scale_offset")


class QuantizedWeight(nnx.Variable):
  """An array of a quantized weight (codes, scales, zero points): frozen, not an `nnx.Param`."""


matrix_axis_names = calibration.matrix_axis_names  # (in name, out name) of the kernel's [in, out] view


def _variable(value, names):
  if value is None:
    return None
  names = tuple(names)[:value.ndim] if value.ndim else ()
  return QuantizedWeight(value, out_sharding=names, eager_sharding=False)


class _QuantizedProjection(nnx.Module):
  """Shared plumbing: the equation, the [in, out] QArray as variables, and x/y reshaping."""

  def __init__(self, module, q: qa.QArray):
    view = calibration.linear_view(module)
    self.equation = view.equation
    self.compute_dtype = view.compute_dtype
    self.kernel_shape = tuple(view.kernel.shape)
    self.bias = calibration.bias_of(module)  # the float bias Param, unchanged (names and all)
    if q.shape != calibration.matrix_shape(module) or q.axis != 0:
      raise ValueError(f"q must be the module's [in, out] = {calibration.matrix_shape(module)} matrix quantized "
                       f"along axis 0; got shape {q.shape}, axis {q.axis}.")
    in_name, out_name = matrix_axis_names(module)
    # A tuple, not a dict: the metadata lands in the graphdef, which jit hashes as a static argument.
    self.meta = (("fmt", q.fmt), ("shape", q.shape), ("dtype", q.dtype), ("axis", 0),
                 ("granularity", q.granularity), ("group_size", q.group_size), ("logical_axes", (in_name, out_name)))
    scale_names = (in_name if q.scale.shape[0] > 1 else None, out_name if q.scale.shape[-1] > 1 else None)
    names = {"qvalue": (in_name, out_name), "scale": scale_names, "zero_point": scale_names,
             "scale_scale": (scale_names[0], None), "scale_offset": ()}
    for field in _FIELDS:
      setattr(self, field, _variable(getattr(q, field), names[field]))

  @property
  def qarray(self) -> qa.QArray:
    """The stored weight as a QArray (rebuilt from the variables; cheap, no copies)."""
    fields = {f: None if getattr(self, f) is None else getattr(self, f)[...] for f in _FIELDS}
    return qa.QArray(**fields, **dict(self.meta))

  def weight_matrix(self, dtype=jnp.float32):
    """The dequantized [in, out] weight."""
    return qa.dequantize(self.qarray, dtype)

  def _dtype(self, x):
    return self.compute_dtype or x.dtype

  def _rows(self, x):
    """x [tokens..., in...] -> ([tokens..., in_features], tokens shape)."""
    rows, batch_shape = calibration.inputs_as_rows(self.equation, x)
    return rows.astype(self._dtype(x)), batch_shape

  def _output(self, y, x):
    """[tokens..., out_features] (compute dtype) -> the einsum's output layout, plus the bias."""
    y = calibration.outputs_from_matrix(self.equation, y.reshape(-1, y.shape[-1]), x.shape, self.kernel_shape)
    bias = None if self.bias is None else self.bias[...]
    return calibration.add_bias(self.equation, y, bias, x.ndim, self.kernel_shape)


class QuantizedEinsum(_QuantizedProjection):
  """A linear layer whose weight is a QArray; `mode` in MODES picks the product (see the module docstring)."""

  def __init__(self, module, q: qa.QArray, *, mode: str = "weight_only", implementation: str | None = None):
    if mode not in MODES:
      raise ValueError(f"mode={mode!r} must be one of {MODES}.")
    if mode == "w8a8" and (q.fmt != "int8" or not q.symmetric or q.granularity == "group"):
      raise ValueError(f"mode='w8a8' needs a symmetric per-channel/tensor int8 weight; got fmt={q.fmt!r}, "
                       f"symmetric={q.symmetric}, granularity={q.granularity!r}.")
    if mode == "fp8" and not q.fmt.startswith("fp8"):
      raise ValueError(f"mode='fp8' needs an fp8 weight (fmt 'fp8_e4m3'/'fp8_e5m2'); got fmt={q.fmt!r}.")
    super().__init__(module, q)
    self.mode = mode
    self.implementation = implementation

  def __call__(self, x):
    rows, _ = self._rows(x)
    q = self.qarray
    if self.mode == "w8a8":
      y = dynamic_int8_matmul(rows, q.qvalue, jnp.broadcast_to(q.scale, (1, q.shape[1])),
                              implementation=self.implementation)
    elif self.mode == "fp8":
      y = _fp8_matmul(rows, q)
    elif q.fmt in KERNEL_FORMATS:
      y = qa.matmul(rows, q, implementation=self.implementation)
    else:
      y = jnp.matmul(rows, qa.dequantize(q, rows.dtype), preferred_element_type=jnp.float32)
    return self._output(y.astype(rows.dtype), x)


def _fp8_matmul(rows, q: qa.QArray):
  """Per-token fp8 activations (same element type as the weight) x fp8 weight codes, f32 accumulation."""
  dtype = q.qvalue.dtype
  fmax = float(jnp.finfo(dtype).max)
  x = rows.astype(jnp.float32)
  x_scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / fmax
  x_scale = jnp.where(x_scale > 0, x_scale, 1.0)
  x_q = jnp.clip(x / x_scale, -fmax, fmax).astype(dtype)
  if q.granularity == "group":
    raise ValueError("mode='fp8' needs a per-channel or per-tensor fp8 weight (one scale per output column).")
  acc = jnp.matmul(x_q, q.qvalue, preferred_element_type=jnp.float32)
  return acc * x_scale * q.scale.astype(jnp.float32).reshape(1, -1)


class LLMInt8Einsum(_QuantizedProjection):
  """LLM.int8() (Dettmers et al. 2022): vector-wise int8 (per-token x scales, per-output-channel w scales) with
  mixed-precision decomposition: input features holding any |x| >= `threshold` in this batch are taken out of the
  int8 product and multiplied in float. As in bitsandbytes, the float part uses the int8 weight dequantized
  (rows of W for the outlier features), so storage stays int8. On a CPU this is a simulation: the float part is
  a masked full-width product; a real kernel gathers the few outlier columns."""

  def __init__(self, module, q: qa.QArray, *, threshold: float = 6.0, implementation: str | None = None):
    if q.fmt != "int8" or not q.symmetric or q.granularity != "channel":
      raise ValueError(f"LLM.int8() needs a symmetric per-channel int8 weight; got fmt={q.fmt!r}, "
                       f"granularity={q.granularity!r}.")
    if not threshold > 0:
      raise ValueError(f"threshold={threshold!r} must be > 0.")
    super().__init__(module, q)
    self.threshold = float(threshold)
    self.implementation = implementation

  def outlier_features(self, rows):
    """bool [in_features]: features where some token has |x| >= threshold."""
    return jnp.any(jnp.abs(rows.reshape(-1, rows.shape[-1])) >= self.threshold, axis=0)

  def __call__(self, x):
    rows, _ = self._rows(x)
    q = self.qarray
    outliers = self.outlier_features(rows)
    regular = jnp.where(outliers, 0.0, rows).astype(rows.dtype)
    y = dynamic_int8_matmul(regular, q.qvalue, q.scale.reshape(1, -1), implementation=self.implementation,
                            out_dtype=jnp.float32)
    w_float = jnp.where(outliers[:, None], qa.dequantize(q, jnp.float32), 0.0)
    y = y + jnp.matmul(jnp.where(outliers, rows, 0.0).astype(jnp.float32), w_float,
                       preferred_element_type=jnp.float32)
    return self._output(y.astype(rows.dtype), x)


__all__ = ["LLMInt8Einsum", "MODES", "QuantizedEinsum", "QuantizedWeight", "matrix_axis_names"]
