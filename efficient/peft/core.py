"""What every adapter shares: the geometry of the layer it wraps (float or quantized), the matrix view of its
inputs and outputs, the base weight as a float [in, out] matrix, and `add_adapters(model, rules)`.

An adapter wraps one linear layer -- `efficient.nn.Einsum`, `nnx.Linear`, `nnx.Einsum`, or a quantized
replacement (`efficient.quant.QuantizedEinsum`, the QLoRA base that stays packed) -- found by path rules
(`efficient.calibration.match_rules`: full match, first rule wins, a rule matching nothing is an error). The
wrapper keeps the base module unchanged as `self.base` (so its parameters keep their paths under
'<layer>/base/...') and adds `efficient.nn.Adapter` parameters named with logical axes. Every adapter works on
the matrix view the literature uses: x as rows [tokens..., in_features], the weight as W [in_features,
out_features] (`calibration.kernel_as_matrix`), y as rows [tokens..., out_features].

Subclasses implement `__call__` and `merged_weight_and_bias()` (the float [in, out] weight and [out] bias that
compute what the adapted layer computes), which `merge_adapters` uses for export.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient import calibration, nn
from efficient.quant import layers as quant_layers
from efficient.quant import qarray as qa

# Layers an adapter can wrap: every float linear layer and the weight-only quantized replacement.
ADAPTABLE_TYPES = nn.LINEAR_TYPES + (quant_layers.QuantizedEinsum,)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Base class of adapter configs; a subclass builds its wrapper with `wrap(module, rngs, path)`."""

  def wrap(self, module: nnx.Module, rngs: nnx.Rngs, path: str) -> nnx.Module:
    raise NotImplementedError


# Config classes by name, for adapter checkpoints (`efficient.peft.checkpoint`): filled by `register_config`.
CONFIGS: dict[str, type] = {}


def register_config(cls: type) -> type:
  """Class decorator: makes an `AdapterConfig` subclass loadable from an adapter checkpoint by its name."""
  CONFIGS[cls.__name__] = cls
  return cls


@dataclasses.dataclass(frozen=True)
class Geometry:
  """The shape facts of a linear layer an adapter needs (static: lives in the graphdef)."""
  equation: str
  kernel_shape: tuple[int, ...]
  in_features: int
  out_features: int
  in_name: str | None     # logical name of the [in, out] view's rows (the kernel's leading contracted axis)
  out_name: str | None    # ... and of its columns (the leading output axis)
  compute_dtype: Any      # None: the input's dtype
  quantized: bool


def is_quantized(module) -> bool:
  return isinstance(module, quant_layers.QuantizedEinsum)


def geometry(module) -> Geometry:
  """The `Geometry` of a float linear layer or a `QuantizedEinsum`; TypeError for anything else."""
  if is_quantized(module):
    meta = dict(module.meta)
    in_f, out_f = meta["shape"]
    in_name, out_name = meta["logical_axes"]
    return Geometry(module.equation, tuple(module.kernel_shape), int(in_f), int(out_f), in_name, out_name,
                    module.compute_dtype, True)
  if not nn.is_linear(module):
    raise TypeError(f"an adapter wraps a linear layer ({[t.__name__ for t in ADAPTABLE_TYPES]}); got "
                    f"{type(module).__name__}.")
  view = nn.linear_view(module)
  in_f, out_f = calibration.matrix_shape(module)
  in_name, out_name = calibration.matrix_axis_names(module)
  return Geometry(view.equation, tuple(view.kernel.shape), in_f, out_f, in_name, out_name, view.compute_dtype,
                  False)


def check_rank(rank, geo: Geometry, *, path: str, what: str = "rank") -> int:
  """rank must be an int in [1, min(in_features, out_features)]; ValueError naming the layer otherwise."""
  limit = min(geo.in_features, geo.out_features)
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= limit:
    raise ValueError(f"{path}: {what}={rank!r} must be an int in [1, min(in_features, out_features) = {limit}] "
                     f"for this [{geo.in_features}, {geo.out_features}] layer.")
  return int(rank)


class AdaptedLinear(nnx.Module):
  """Base of every adapter wrapper: `self.base` (the wrapped layer, unchanged) and its `Geometry`."""

  def __init__(self, base: nnx.Module, *, path: str = ""):
    self.base = base
    self.geometry = geometry(base)
    self.path = path

  # -- matrix view of inputs and outputs ----------------------------------------------------------------------
  def dtype(self, x):
    return self.geometry.compute_dtype or x.dtype

  def rows(self, x):
    """x [tokens..., in...] -> [tokens..., in_features] in the compute dtype."""
    rows, _ = calibration.inputs_as_rows(self.geometry.equation, x)
    return rows.astype(self.dtype(x))

  def output_rows(self, y, x):
    """The layer's output y (einsum layout) -> [tokens..., out_features]."""
    return calibration.outputs_as_rows(self.geometry.equation, y, x.ndim)

  def output_layout(self, y_rows, x):
    """[tokens..., out_features] -> the einsum's output layout (no bias added)."""
    g = self.geometry
    return calibration.outputs_from_matrix(g.equation, y_rows, x.shape, g.kernel_shape)

  # -- the base layer -----------------------------------------------------------------------------------------
  def base_weight(self, dtype=jnp.float32):
    """The base weight as a float [in_features, out_features] matrix (a quantized base is dequantized)."""
    if self.geometry.quantized:
      return qa.dequantize(self.base.qarray, dtype)
    return calibration.kernel_as_matrix(self.base).astype(dtype)

  def base_bias(self):
    """The base's bias as [out_features] f32 (zeros when it has none)."""
    bias = calibration.bias_of(self.base)
    if bias is None:
      return jnp.zeros((self.geometry.out_features,), jnp.float32)
    return bias[...].astype(jnp.float32).reshape(-1)

  def has_bias(self) -> bool:
    return calibration.bias_of(self.base) is not None

  def merged_weight_and_bias(self):
    """(W' [in, out] f32, b' [out] f32) computing this adapted layer as one linear layer."""
    raise NotImplementedError(f"{type(self).__name__} does not implement merging.")


def add_adapters(model: nnx.Module, rules, *, rngs: nnx.Rngs | None = None, seed: int = 0) -> dict[str, nnx.Module]:
  """Wraps every linear layer the rules give an `AdapterConfig` (in place); returns {path: wrapper}.

  rules: (path regex, AdapterConfig | None) pairs or a {regex: config} mapping (first full match wins; None
  leaves the layer alone; a rule matching no layer is a ValueError). Float and quantized (`QuantizedEinsum`)
  layers are both matched, so quantize first for QLoRA; the base layers inside existing wrappers are skipped (a
  second call adds adapters elsewhere, never an adapter around an adapter's base). Adapter initializations draw
  from `rngs` (default `nnx.Rngs(seed)`).
  """
  rngs = rngs if rngs is not None else nnx.Rngs(seed)
  matched = calibration.match_rules(model, rules, config_type=AdapterConfig, types=ADAPTABLE_TYPES)
  # The base inside an existing wrapper ('.../q/base') is that adapter's, not a layer to adapt again.
  inside = tuple(f"{p}/" for p in adapters(model))
  wrapped = {}
  for path, (module, config) in matched.items():
    if path.startswith(inside):
      continue
    wrapper = config.wrap(module, rngs, path)
    calibration.set_module(model, path, wrapper)
    wrapped[path] = wrapper
  return wrapped


def adapters(model: nnx.Module) -> dict[str, nnx.Module]:
  """{path: wrapper} of every adapter wrapper in the model (natural path order)."""
  return calibration.einsum_modules(model, types=(AdaptedLinear,))


def adapter_state(model: nnx.Module) -> nnx.State:
  """The adapter parameters alone (what a fine-tune trains and an adapter checkpoint holds)."""
  return nnx.state(model, nn.Adapter)


def count_adapter_parameters(model: nnx.Module) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapter_state(model))))
