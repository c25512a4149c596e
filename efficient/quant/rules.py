"""`quantize_model(model, rules, calibration_data=None)`: quantize a model's linear layers by module-path rules.

    rules = [(r".*/mlp/down", None),                                 # leave float
             (r".*", QuantConfig(fmt="int4", group_size=64, method="gptq"))]
    quantize_model(model, rules, calibration_data=batches)

Each linear layer -- this project's `efficient.nn.Einsum`, flax's `nnx.Linear` and `nnx.Einsum`, so a user's
own NNX model works unchanged -- whose path ('blocks/3/mlp/gate') matches a rule's regex in full (`re.fullmatch`,
as qwix's rules; the first matching rule wins, `None` leaves the layer float) is replaced by a
`layers.QuantizedEinsum` or `layers.LLMInt8Einsum` that keeps its bias -- the model code is not edited (qwix's
idea). A rule that matches no layer path, or a model without linear layers, is a ValueError. The model is
modified in place (and returned): `nnx.clone` it first to keep the float one.

Methods: RTN unless configured otherwise; `method='gptq'` (needs calibration_data); `smoothquant_alpha=α`
first migrates activation outliers into the weights (SmoothQuant), folded exactly into the preceding RMSNorm
scale -- q/k/v after attention_norm, gate/up after mlp_norm (the Llama family's paths); every projection reading
that norm gets the same per-channel factor, quantized or not, so the float function is unchanged.
`mode='llm_int8'` is LLM.int8().

Non-finite weights are refused before anything is changed: every selected layer's kernel is checked first
(`qarray.check_finite`), and a NaN/Inf is a ValueError naming the module path (e.g. 'blocks/0/mlp/up.kernel');
a non-finite GPTQ Hessian is one naming the path too.

GPTQ here is one-shot: every Hessian comes from the calibration inputs of the float (smoothed) model in one pass,
not re-collected block by block behind already-quantized layers as the GPTQ paper's sequential variant does.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

import jax.numpy as jnp
from flax import nnx

from efficient import calibration, nn
from efficient.quant import calibrate, formats, layers
from efficient.quant.qarray import check_finite, quantize

MODES = layers.MODES + ("llm_int8",)
METHODS = ("rtn", "gptq")
# Projection path -> the RMSNorm feeding it (SmoothQuant folds its factors there), for the Llama family.
SMOOTH_TARGETS = ((r"^(.*)/attention/(q|k|v)$", r"\1/attention_norm"), (r"^(.*)/mlp/(gate|up)$", r"\1/mlp_norm"))


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How to quantize one projection.

  fmt               a `formats.FORMATS` name (int8, int4, int3, int2, nf4, fp8_e4m3, fp8_e5m2, mxfp8, mxfp4)
  group_size        rows of in_features per scale (must divide in_features); None: per output channel
                    (NF4 defaults to 64, MX is always 32)
  symmetric         False: int formats with zero points
  mode              'weight_only', 'w8a8' (dynamic per-token int8 activations), 'fp8' (fp8 activations),
                    'llm_int8' (LLM.int8() outlier decomposition)
  method            'rtn' or 'gptq' (int formats; needs calibration data)
  act_order, damp   GPTQ options (see `calibrate.gptq_quantize`)
  smoothquant_alpha migration strength α in [0, 1] (needs calibration data), or None
  outlier_threshold LLM.int8()'s |x| threshold (6.0 in the paper)
  double_quant      NF4: double-quantize the absmax constants
  implementation    kernel implementation (None: by backend)
  """
  fmt: str = "int8"
  group_size: int | None = None
  symmetric: bool = True
  mode: str = "weight_only"
  method: str = "rtn"
  act_order: bool = False
  damp: float = 0.01
  smoothquant_alpha: float | None = None
  outlier_threshold: float = 6.0
  double_quant: bool = True
  implementation: str | None = None

  def __post_init__(self):
    fmt = formats.get(self.fmt)
    if self.mode not in MODES:
      raise ValueError(f"QuantConfig.mode={self.mode!r} must be one of {MODES}.")
    if self.method not in METHODS:
      raise ValueError(f"QuantConfig.method={self.method!r} must be one of {METHODS}.")
    if self.method == "gptq" and fmt.kind != "int":
      raise ValueError(f"QuantConfig.method='gptq' needs an int format (int8/int4/int3/int2); got fmt={self.fmt!r}.")
    if self.mode in ("w8a8", "llm_int8") and (self.fmt != "int8" or self.group_size is not None
                                               or not self.symmetric):
      raise ValueError(f"QuantConfig.mode={self.mode!r} needs fmt='int8', group_size=None, symmetric=True.")
    if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
      raise ValueError(f"QuantConfig.smoothquant_alpha={self.smoothquant_alpha!r} must be in [0, 1] or None.")

  @property
  def needs_calibration(self) -> bool:
    return self.method == "gptq" or self.smoothquant_alpha is not None


Rules = Sequence[tuple[str, "QuantConfig | None"]]


def plan(model: nnx.Module, rules: Rules, *, config_type=None) -> dict[str, QuantConfig]:
  """{path: config} for every linear layer a rule quantizes (first full match wins; None leaves it float; a rule
  matching no layer path raises). `config_type`: the config class rules hold (QuantConfig; QATConfig for QAT)."""
  matched = calibration.match_rules(model, rules, config_type=config_type or QuantConfig)
  return {path: config for path, (_, config) in matched.items()}


def quantize_model(model: nnx.Module, rules: Rules, calibration_data: Iterable[dict] | None = None, *,
                   statistics: dict | None = None) -> nnx.Module:
  """Replaces the linear layers matched by `rules` with quantized ones (in place); returns `model`.

  calibration_data: batches (dicts with 'tokens' and optionally 'positions', 'segment_ids', 'loss_mask', or
  bare arrays: the model's one input) for GPTQ and SmoothQuant; iterated once per calibration pass (materialized into a list).
  statistics: optional `calibration.capture_hessians(model, calibration_data)` output to reuse for GPTQ (saves
  a calibration pass when several configurations quantize the same float model; ignored after SmoothQuant,
  which changes the inputs).
  """
  chosen = plan(model, rules)
  for path in chosen:  # before any change: a NaN/Inf weight would be stored as a silently wrong number
    check_finite(calibration.kernel_as_matrix(calibration.get_module(model, path)), f"{path}.kernel")
  smoothed = [p for p, c in chosen.items() if c.smoothquant_alpha is not None]
  gptq_paths = [p for p, c in chosen.items() if c.method == "gptq"]
  reuse = statistics is not None and not smoothed and all(p in statistics for p in gptq_paths)
  if any(c.needs_calibration for c in chosen.values()) and not reuse:
    if calibration_data is None:
      raise ValueError("calibration_data is required: a rule uses GPTQ or SmoothQuant.")
    calibration_data = list(calibration_data)
    if not calibration_data:
      raise ValueError("calibration_data holds no batches.")
  if smoothed:
    smooth_model(model, {p: chosen[p].smoothquant_alpha for p in smoothed}, calibration_data)
  stats = statistics if reuse else {}
  if gptq_paths and not reuse:
    stats = calibration.capture_hessians(model, calibration_data, pattern=calibration.exact_pattern(gptq_paths))
  for path, config in chosen.items():
    module = calibration.get_module(model, path)
    calibration.set_module(model, path, quantize_module(module, config, stats.get(path), path=path))
  return model


def quantize_module(module, config: QuantConfig, stats: dict | None = None, *, path: str = "module") -> nnx.Module:
  """The quantized replacement of one linear layer under `config` (`stats` from capture_hessians for GPTQ);
  `path` names the layer in errors (a non-finite kernel or Hessian is a ValueError)."""
  matrix = calibration.kernel_as_matrix(module)
  names = calibration.matrix_axis_names(module)
  if config.method == "gptq":
    if stats is None:
      raise ValueError("stats (the module's captured Hessian) is required for method='gptq'.")
    q = calibrate.gptq_quantize(matrix, stats["hessian"], bits=formats.get(config.fmt).bits,
                                group_size=config.group_size, symmetric=config.symmetric,
                                act_order=config.act_order, damp=config.damp, logical_axes=names, name=path)
  else:
    q = quantize(matrix, config.fmt, axis=0, group_size=config.group_size, symmetric=config.symmetric,
                 double_quant=config.double_quant, logical_axes=names, name=f"{path}.kernel")
  if config.mode == "llm_int8":
    return layers.LLMInt8Einsum(module, q, threshold=config.outlier_threshold,
                                implementation=config.implementation)
  return layers.QuantizedEinsum(module, q, mode=config.mode, implementation=config.implementation)


def norm_of(path: str) -> str | None:
  """The path of the RMSNorm whose output `path` reads, or None if SmoothQuant cannot fold into one."""
  for pattern, norm in SMOOTH_TARGETS:
    if re.search(pattern, path):
      return re.sub(pattern, norm, path)
  return None


def smooth_model(model: nnx.Module, alphas: dict[str, float], calibration_data: Sequence[dict]) -> dict:
  """SmoothQuant: for each RMSNorm feeding a path in `alphas`, s = smoothquant_scales(max|X|, consumers' W, α);
  norm.scale /= s and every consumer's rows *= s (exact in real arithmetic). Returns {norm path: s}."""
  groups: dict[str, list[str]] = {}
  for path in alphas:
    norm = norm_of(path)
    if norm is None:
      raise ValueError(f"smoothquant_alpha is set for {path!r}, which no RMSNorm feeds (SmoothQuant folds into "
                       f"q/k/v after attention_norm and gate/up after mlp_norm).")
    try:
      norm_module = calibration.get_module(model, norm)
    except (AttributeError, IndexError, KeyError):
      norm_module = None
    if not isinstance(norm_module, nn.RMSNorm):
      raise ValueError(f"smoothquant_alpha is set for {path!r}, but {norm!r} is "
                       f"{type(norm_module).__name__ if norm_module is not None else 'missing'}, not the "
                       f"efficient.nn.RMSNorm SmoothQuant folds into (pre-norm models only).")
    groups.setdefault(norm, [])
  every = calibration.einsum_modules(model)
  for path in every:
    norm = norm_of(path)
    if norm in groups:
      groups[norm].append(path)
  for norm, consumers in groups.items():
    values = {alphas[p] for p in consumers if p in alphas}
    if len(values) > 1:
      raise ValueError(f"projections reading {norm!r} ({consumers}) were given different smoothquant_alpha "
                       f"values {sorted(values)}; they share one smoothing factor.")
  stats = calibration.capture_hessians(model, calibration_data,
                                       pattern=calibration.exact_pattern([c[0] for c in groups.values()]))
  factors = {}
  for norm_path, consumers in groups.items():
    alpha = next(alphas[p] for p in consumers if p in alphas)
    modules = [every[p] for p in consumers]
    s = calibrate.smoothquant_scales(stats[consumers[0]]["absmax"],
                                     [calibration.kernel_as_matrix(m) for m in modules], alpha)
    norm = calibration.get_module(model, norm_path)
    norm.scale[...] = (norm.scale[...].astype(jnp.float32) / s).astype(norm.scale[...].dtype)
    for m in modules:
      scaled = calibration.kernel_as_matrix(m).astype(jnp.float32) * s[:, None]
      m.kernel[...] = calibration.matrix_to_kernel(m, scaled).astype(m.kernel[...].dtype)
    factors[norm_path] = s
  return factors


__all__ = ["METHODS", "MODES", "QuantConfig", "SMOOTH_TARGETS", "norm_of", "plan", "quantize_model",
           "quantize_module", "smooth_model"]
