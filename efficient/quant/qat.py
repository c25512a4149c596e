"""Basic quantization-aware training: fake quantization with the straight-through estimator (STE) and LSQ
learnable step sizes (Esser et al. 2020), on the [in, out] matrix view of each projection.

    model = prepare_qat(model, [(r".*", QATConfig(bits=4, group_size=64))])   # linear -> FakeQuantEinsum
    ... train as usual (the kernel and the step sizes are nnx.Params) ...
    convert_qat(model)                                                       # -> QuantizedEinsum (packed)

Forward: ŵ = s · clip(round_ste(w / s), -qmax, qmax), with round_ste(x) = x + stop_gradient(round(x) - x), so
∂ŵ/∂w = 1 inside the clip range (STE) and 0 outside, and ∂ŵ/∂s = round(w/s) - w/s inside, ±qmax outside --
LSQ's step gradient; it is scaled by LSQ's g = 1/sqrt(numel · qmax) so steps and weights learn at similar rates.
Steps start at RTN's absmax/qmax, so step 0 of QAT is exactly the RTN model. `convert_qat` stores the codes
round(w/s) with the learned steps: the converted model computes what the fake-quantized one did. Any linear
layer (`efficient.nn.Einsum`, `nnx.Linear`, `nnx.Einsum`) is matched by path (full match); its bias stays a
float Param through both steps.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient import calibration
from efficient.quant import calibrate, formats, layers
from efficient.quant.qarray import QArray


@dataclasses.dataclass(frozen=True)
class QATConfig:
  """bits: 8/4/3/2 (symmetric int); group_size: rows of in_features per step (None: per output channel)."""
  bits: int = 4
  group_size: int | None = None

  def __post_init__(self):
    calibrate.int_format(self.bits)  # validates bits
    if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                        or self.group_size < 1):
      raise ValueError(f"QATConfig.group_size={self.group_size!r} must be a positive int or None.")


def round_ste(x):
  """round(x) forward, identity gradient."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _grad_scale(x, scale):
  """Forward x, gradient scaled by `scale` (LSQ's step-gradient scale)."""
  return jax.lax.stop_gradient(x - x * scale) + x * scale


def fake_quant(w, step, *, bits: int, group_size: int):
  """LSQ fake quantization of w [K, N] with steps [K / group_size, N]."""
  qmax = 2 ** (bits - 1) - 1
  step = _grad_scale(step, 1.0 / math.sqrt(w.size * qmax))
  step = jnp.abs(step) + 1e-12  # a step that learning pushes through 0 stays a valid (positive) step
  step = jnp.repeat(step, group_size, axis=0) if step.shape[0] > 1 else step
  # Clip before rounding (same forward value): the STE mask is then exactly |w / s| < qmax, with no ties.
  return round_ste(jnp.clip(w / step, -qmax, qmax)) * step


class FakeQuantEinsum(nnx.Module):
  """A linear layer whose (trainable) kernel passes through LSQ fake quantization on every call (+ its bias)."""

  def __init__(self, module, config: QATConfig):
    view = calibration.linear_view(module)
    self.equation = view.equation
    self.compute_dtype = view.compute_dtype
    self.kernel = module.kernel  # the same Param (names, dtype) keeps training
    self.bias = calibration.bias_of(module)
    self.bits = config.bits
    k, _ = calibration.matrix_shape(module)
    self.group_size = config.group_size or k
    if k % self.group_size:
      raise ValueError(f"group_size={config.group_size} must divide in_features={k} of {self.equation!r}.")
    matrix = calibration.kernel_as_matrix(module).astype(jnp.float32)
    names = calibration.matrix_axis_names(module)
    # RTN's steps (formats.quantize_int, same scale dtype as `quantize`): QAT starts at the RTN model.
    scale_dtype = "float32" if self.group_size == k else "bfloat16"
    _, init, _ = formats.quantize_int(matrix, calibrate.int_format(config.bits), self.group_size, False, True,
                                      scale_dtype)
    init = init.astype(jnp.float32)
    self.step = nnx.Param(init, out_sharding=(names[0] if init.shape[0] > 1 else None, names[1]),
                          eager_sharding=False)

  def quantized_matrix(self):
    matrix = calibration.kernel_as_matrix(self).astype(jnp.float32)
    return fake_quant(matrix, self.step[...], bits=self.bits, group_size=self.group_size)

  def __call__(self, x):
    kernel = calibration.matrix_to_kernel(self, self.quantized_matrix())
    dtype = self.compute_dtype or x.dtype
    y = jnp.einsum(self.equation, x, kernel.astype(dtype))
    bias = None if self.bias is None else self.bias[...]
    return calibration.add_bias(self.equation, y, bias, x.ndim, kernel.shape)


def prepare_qat(model: nnx.Module, rules) -> nnx.Module:
  """Swaps the linear layers matched by `rules` ((path regex, QATConfig | None), first full match wins; a rule
  matching no layer is a ValueError) for FakeQuantEinsum."""
  for path, (module, config) in calibration.match_rules(model, rules, config_type=QATConfig).items():
    calibration.set_module(model, path, FakeQuantEinsum(module, config))
  return model


def convert_qat(model: nnx.Module) -> nnx.Module:
  """Replaces every FakeQuantEinsum by a weight-only QuantizedEinsum holding its codes and learned steps."""
  for path, module in calibration.einsum_modules(model, types=(FakeQuantEinsum,)).items():
    fmt = calibrate.int_format(module.bits)
    matrix = calibration.kernel_as_matrix(module).astype(jnp.float32)
    step = jnp.abs(module.step[...]) + 1e-12
    qmax = 2 ** (module.bits - 1) - 1
    codes = jnp.clip(jnp.round(matrix / jnp.repeat(step, module.group_size, axis=0)), -qmax, qmax)
    k, n = matrix.shape
    grouped = module.group_size != k
    q = QArray(qvalue=calibrate.encode_codes(codes, fmt, True), scale=step, fmt=fmt.name, shape=(k, n),
               dtype=jnp.dtype(module.kernel[...].dtype).name, axis=0,
               granularity="group" if grouped else "channel", group_size=module.group_size)
    calibration.set_module(model, path, layers.QuantizedEinsum(module, q))
  return model


__all__ = ["FakeQuantEinsum", "QATConfig", "convert_qat", "fake_quant", "prepare_qat", "round_ste"]
