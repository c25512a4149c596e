"""Merging adapters into their base layers for export, and putting them back.

`merge_adapters(model)` replaces every adapter wrapper (`efficient.peft.core.AdaptedLinear`: LoRA, DoRA, RoAd,
ETHER, ...) by ONE plain layer computing its `merged_weight_and_bias()` (W' [in, out], b' [out]):

  float base        an `nnx.clone` of the base module (same class, names, dtypes) with kernel W' (cast to the
                    kernel's dtype) and bias b'; a base without a bias cannot take a nonzero b' (ValueError)
  quantized base    `quantized_base='dequantize'`: a float `efficient.nn.Einsum` (the base's equation and kernel
                    shape; in_name on the leading contracted axis, out_name on the leading output axis);
                    `'requantize'`: a `QuantizedEinsum` of W' quantized as the base was (format, granularity,
                    group size, symmetry, double quantization, mode); None is refused (a merged QLoRA layer
                    cannot stay exactly packed: choose a float export or a requantized one)

The wrappers themselves are not modified: `unmerge_adapters(model, merged)` puts them back bit-exactly.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from efficient import calibration, nn
from efficient.peft import core
from efficient.quant import layers as quant_layers
from efficient.quant import qarray as qa

QUANTIZED_BASE = (None, "dequantize", "requantize")


def _kernel_names(geo: core.Geometry) -> tuple:
  """Logical names per kernel axis of a layer known only by its geometry (a quantized base)."""
  spec = calibration.parse_equation(geo.equation)
  first_in, first_out = spec["contract"][0], spec["outputs"][0]
  by_letter = {first_in: geo.in_name, first_out: geo.out_name}
  return tuple(by_letter.get(letter) for letter in spec["rhs"])


def _float_einsum(wrapper, w, b) -> nn.Einsum:
  """An `nn.Einsum` computing x W' + b' with a quantized base's equation, kernel shape, dtypes and bias names."""
  base, geo = wrapper.base, wrapper.geometry
  meta = dict(base.meta)
  dtype = jnp.dtype(meta["dtype"])
  kernel = calibration.matrix_to_kernel(base, w).astype(dtype)
  einsum = nn.Einsum(geo.equation, geo.kernel_shape, _kernel_names(geo), rngs=nnx.Rngs(0),
                     use_bias=wrapper.has_bias(), param_dtype=dtype,
                     compute_dtype=geo.compute_dtype or dtype, kernel_init=lambda *_: kernel)
  if wrapper.has_bias():
    einsum.bias = base.bias.replace(b.reshape(base.bias[...].shape).astype(base.bias[...].dtype))
  return einsum


def _requantized(wrapper, w, b) -> quant_layers.QuantizedEinsum:
  """W' quantized as the base's QArray was (same fmt, granularity, group size, symmetry, double quant)."""
  base = wrapper.base
  q = base.qarray
  double_quant = q.scale_scale is not None
  new_q = qa.quantize(w.astype(jnp.dtype(q.dtype)), q.fmt, axis=0,
                      group_size=q.group_size if q.granularity == "group" else None, granularity=q.granularity,
                      symmetric=q.symmetric, scale_dtype=None if double_quant else q.scale.dtype,
                      double_quant=double_quant, logical_axes=q.logical_axes, name=f"{wrapper.path}.merged_kernel")
  return quant_layers.QuantizedEinsum(_float_einsum(wrapper, w, b), new_q, mode=base.mode,
                                      implementation=base.implementation)


def _float_clone(wrapper, w, b, path: str) -> nnx.Module:
  base = wrapper.base
  clone = nnx.clone(base)
  kernel = calibration.matrix_to_kernel(base, w)
  clone.kernel.set_value(kernel.astype(clone.kernel[...].dtype))
  bias = calibration.bias_of(clone)
  if bias is None:
    if bool(jnp.any(b != 0)):
      raise ValueError(f"{path}: the adapter's merged bias is nonzero but the base layer "
                       f"({type(base).__name__}) has no bias to hold it; merge into a layer with a bias.")
  else:
    bias.set_value(b.reshape(bias[...].shape).astype(bias[...].dtype))
  return clone


def merged_layer(wrapper, *, quantized_base: str | None = None, path: str = "") -> nnx.Module:
  """The one plain layer computing `wrapper` (see the module docstring)."""
  path = path or wrapper.path
  w, b = wrapper.merged_weight_and_bias()
  w, b = jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)
  if not wrapper.geometry.quantized:
    return _float_clone(wrapper, w, b, path)
  if quantized_base == "dequantize":
    return _float_einsum(wrapper, w, b)
  if quantized_base == "requantize":
    return _requantized(wrapper, w, b)
  raise ValueError(f"{path}: the base is quantized ({type(wrapper.base).__name__}); pass "
                   f"quantized_base='dequantize' (a float layer) or 'requantize' (quantized as the base was).")


def merge_adapters(model: nnx.Module, *, quantized_base: str | None = None) -> dict[str, nnx.Module]:
  """Replaces every adapter wrapper by one plain layer (in place); returns {path: wrapper} for
  `unmerge_adapters`. `quantized_base`: None, 'dequantize' or 'requantize' (needed when a base is quantized).
  Every check runs before the model is changed."""
  if quantized_base not in QUANTIZED_BASE:
    raise ValueError(f"quantized_base={quantized_base!r} must be one of {QUANTIZED_BASE}.")
  wrappers = core.adapters(model)
  if not wrappers:
    raise ValueError(f"model ({type(model).__name__}) has no adapter to merge (efficient.peft.add_adapters).")
  for path, wrapper in wrappers.items():
    if wrapper.geometry.quantized and quantized_base is None:
      raise ValueError(f"quantized_base=None, but the base of {path} is quantized "
                       f"({type(wrapper.base).__name__}); pass quantized_base='dequantize' (a float layer) or "
                       f"'requantize' (quantized as the base was).")
  replacements = {path: merged_layer(w, quantized_base=quantized_base, path=path) for path, w in wrappers.items()}
  for path, layer in replacements.items():
    calibration.set_module(model, path, layer)
  return wrappers


def unmerge_adapters(model: nnx.Module, merged: dict[str, nnx.Module]) -> nnx.Module:
  """Puts back the wrappers `merge_adapters` returned (in place; they were never modified). Returns `model`."""
  for path, wrapper in merged.items():
    if not isinstance(wrapper, core.AdaptedLinear):
      raise ValueError(f"merged[{path!r}] is a {type(wrapper).__name__}, not an adapter wrapper; pass what "
                       f"merge_adapters returned.")
    calibration.get_module(model, path)  # the path must exist (a KeyError/AttributeError names it otherwise)
    calibration.set_module(model, path, wrapper)
  return model


__all__ = ["QUANTIZED_BASE", "merge_adapters", "merged_layer", "unmerge_adapters"]
