"""Measuring models and steps: parameter bytes, saved-residual (activation) bytes, XLA's compiled cost and
memory, the modelled kernel cost of a Llama forward, and `profile`: compiled figures + median wall time + the
roofline bound of a named accelerator (`DEVICE_PEAKS`, `roofline`).

Why residuals: XLA:CPU's `memory_analysis()` drops remat recomputation in unrolled code and counts a scan body
once, so activation memory is measured as the bytes autodiff saves for the backward pass, which is exact and
backend-independent (README, Design, fact 5).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

try:  # jax 0.10 exposes only `print_saved_residuals` publicly; the list form lives here.
  from jax.ad_checkpoint import saved_residuals as _saved_residuals
except ImportError:
  from jax._src.ad_checkpoint import saved_residuals as _saved_residuals

# `pallas_kernels.matmul` is re-exported as the op *function*; the cost models live in the op submodules.
_matmul_op = importlib.import_module("pallas_kernels.matmul")
_rms_norm_op = importlib.import_module("pallas_kernels.rms_norm")

COST_KEYS = ("flops", "hbm_bytes", "ideal_bytes")


def _array_leaves(tree) -> list:
  return [leaf for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape") and hasattr(leaf, "dtype")]


def parameter_bytes(model_or_state, *, filter=nnx.Not(nnx.RngState)) -> dict[str, Any]:
  """{'total': bytes, 'count': elements, 'by_dtype': {dtype name: bytes}} of a model's variables or any pytree.

  For an `nnx.Module`, counts the variables selected by `filter` (default: all but RNG state, so quantization
  scales and sparsity masks count). Bytes are as stored: itemsize x elements (an int4 array is 1 byte/element
  in memory; packed nibbles in a uint8 array count half a byte per value).
  """
  tree = nnx.state(model_or_state, filter) if isinstance(model_or_state, nnx.Module) else model_or_state
  by_dtype: dict[str, int] = {}
  count = 0
  for leaf in _array_leaves(tree):
    size = int(np.prod(leaf.shape))
    dtype = jnp.dtype(leaf.dtype)
    by_dtype[dtype.name] = by_dtype.get(dtype.name, 0) + size * dtype.itemsize
    count += size
  return {"total": sum(by_dtype.values()), "count": count, "by_dtype": dict(sorted(by_dtype.items()))}


def parameter_count(model_or_state, *, filter=nnx.Not(nnx.RngState)) -> int:
  """Number of elements in the arrays `parameter_bytes` counts."""
  return parameter_bytes(model_or_state, filter=filter)["count"]


def _aval_bytes(aval) -> int:
  return int(np.prod(aval.shape)) * jnp.dtype(aval.dtype).itemsize


def saved_residual_bytes(loss_fn: Callable, *args, **kwargs) -> dict[str, Any]:
  """Bytes the forward of `loss_fn(*args)` saves for its backward (`jax.ad_checkpoint.saved_residuals`).

  Returns {'total', 'arguments', 'activations', 'count', 'largest'}: 'arguments' are residuals that are inputs
  themselves (weights, tokens: resident anyway), 'activations' everything computed in the forward -- the number
  remat policies and fused kernels change. 'largest' lists the 10 biggest activations (bytes, shape, source).
  """
  residuals = _saved_residuals(loss_fn, *args, **kwargs)
  arguments, activations = [], []
  for aval, source in residuals:
    entry = (_aval_bytes(aval), f"{jnp.dtype(aval.dtype).name}{list(aval.shape)}", source)
    (arguments if source.startswith("from the argument") else activations).append(entry)
  argument_bytes = sum(e[0] for e in arguments)
  activation_bytes = sum(e[0] for e in activations)
  return {"total": argument_bytes + activation_bytes, "arguments": argument_bytes,
          "activations": activation_bytes, "count": len(residuals),
          "largest": sorted(activations, key=lambda e: -e[0])[:10]}


def _compile(fn: Callable, *args, **kwargs):
  """`fn` compiled for these arguments: a Compiled as it is, a jitted function lowered as it is (so its static
  arguments and donation count), anything else through `jax.jit`."""
  if hasattr(fn, "memory_analysis"):
    return fn
  return (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args, **kwargs).compile()


def compiled_cost(fn: Callable, *args, **kwargs) -> dict[str, float]:
  """XLA's own figures for `jax.jit(fn)(*args)`: cost analysis (flops, bytes accessed, transcendentals) and
  memory analysis (argument, output, temp, alias, generated code and peak bytes). An already jitted `fn` is
  lowered as it is, so its donation (alias bytes) counts; an already compiled one (`.lower(...).compile()`) is
  read as it is (args unused).

  Caveat (README, Design, fact 5): on CPU a scan body is counted once and remat recomputation may be removed.
  """
  return _figures(_compile(fn, *args, **kwargs))


def _figures(compiled) -> dict[str, float]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax returned one dict per computation
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  memory = compiled.memory_analysis()
  result = {
      "flops": float(analysis.get("flops", 0.0)),
      "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
      "transcendentals": float(analysis.get("transcendentals", 0.0)),
  }
  for name, attribute in (("argument_bytes", "argument_size_in_bytes"), ("output_bytes", "output_size_in_bytes"),
                          ("temp_bytes", "temp_size_in_bytes"), ("alias_bytes", "alias_size_in_bytes"),
                          ("generated_code_bytes", "generated_code_size_in_bytes"),
                          ("peak_bytes", "peak_memory_in_bytes")):
    value = getattr(memory, attribute, None) if memory is not None else None
    result[name] = float(value) if value is not None else float("nan")
  return result


# --- Rooflines of named accelerators ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DevicePeak:
  """One chip's peaks: dense bf16 matmul FLOP/s (no 2:4 sparsity) and HBM bytes/s, with where they are from."""
  name: str
  flops_per_s: float
  hbm_bytes_per_s: float
  source: str


# Public spec sheets (per chip / GPU). NVIDIA quotes bf16 "with sparsity": dense is half (H100/H200 SXM: 1979 -> 989
# TFLOP/s). H100 SXM: nvidia.com/en-us/data-center/h100 (3.35 TB/s HBM3); H100 PCIe: same page (1513 sparse ->
# 756 dense, 2.0 TB/s); H200 SXM: nvidia.com/en-us/data-center/h200 (4.8 TB/s HBM3e); A100 80GB SXM: the A100
# datasheet (312 TFLOP/s dense bf16, 2,039 GB/s). TPUs: cloud.google.com/tpu/docs/<v4|v5e|v5p|v6e>, "peak compute
# per chip (bf16)" and "HBM bandwidth per chip": v4 275 TFLOP/s, 1200 GB/s; v5e 197, 819; v5p 459, 2765; v6e
# (Trillium) 918, 1640.
DEVICE_PEAKS: dict[str, DevicePeak] = {
    "h100-sxm": DevicePeak("NVIDIA H100 SXM", 989e12, 3.35e12, "NVIDIA H100 datasheet (1979 TFLOP/s bf16 sparse)"),
    "h100-pcie": DevicePeak("NVIDIA H100 PCIe", 756e12, 2.0e12, "NVIDIA H100 datasheet (1513 TFLOP/s bf16 sparse)"),
    "h200": DevicePeak("NVIDIA H200 SXM", 989e12, 4.8e12, "NVIDIA H200 datasheet (1979 TFLOP/s bf16 sparse)"),
    "a100": DevicePeak("NVIDIA A100 80GB SXM", 312e12, 2.039e12, "NVIDIA A100 datasheet"),
    "tpu-v4": DevicePeak("TPU v4", 275e12, 1.2e12, "cloud.google.com/tpu/docs/v4"),
    "tpu-v5e": DevicePeak("TPU v5e", 197e12, 0.819e12, "cloud.google.com/tpu/docs/v5e"),
    "tpu-v5p": DevicePeak("TPU v5p", 459e12, 2.765e12, "cloud.google.com/tpu/docs/v5p"),
    "tpu-v6e": DevicePeak("TPU v6e (Trillium)", 918e12, 1.64e12, "cloud.google.com/tpu/docs/v6e"),
}
# `jax.devices()[0].device_kind` of those chips -> key, so `device_peak(jax.devices()[0].device_kind)` works.
DEVICE_KINDS = {"nvidia h100 80gb hbm3": "h100-sxm", "nvidia h100 pcie": "h100-pcie", "nvidia h200": "h200",
                "nvidia a100-sxm4-80gb": "a100", "tpu v4": "tpu-v4", "tpu v5 lite": "tpu-v5e", "tpu v5e": "tpu-v5e",
                "tpu v5": "tpu-v5p", "tpu v5p": "tpu-v5p", "tpu v6 lite": "tpu-v6e", "tpu v6e": "tpu-v6e"}


def device_peak(device: str) -> DevicePeak:
  """The peaks of `device`: a key of DEVICE_PEAKS or a jax `device_kind` of DEVICE_KINDS (case-insensitive)."""
  key = str(device).strip().lower()
  key = DEVICE_KINDS.get(key, key)
  if key not in DEVICE_PEAKS:
    raise ValueError(f"device={device!r} is unknown; choose one of {sorted(DEVICE_PEAKS)} (or a jax device_kind: "
                     f"{sorted(DEVICE_KINDS)}).")
  return DEVICE_PEAKS[key]


def _amount(name: str, value) -> float:
  """`value` as a float, or a ValueError naming `name` unless it is a finite number >= 0."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
    raise ValueError(f"{name}={value!r} must be a finite number >= 0.")
  return float(value)


def roofline(flops, bytes_accessed, device: str) -> dict[str, Any]:
  """The roofline lower bound on one `device` for work of `flops` and `bytes_accessed` (HBM traffic).

  bound_s = max(flops / peak FLOP/s, bytes / peak bytes/s); `bound_by` names the side that binds ('compute' or
  'memory'; 'none' when both are 0); `arithmetic_intensity` = flops / byte, against the chip's
  `ridge_intensity` = peak FLOP/s / peak bytes/s (above it the work is compute-bound).
  """
  peak = device_peak(device)
  flops, bytes_accessed = _amount("flops", flops), _amount("bytes_accessed", bytes_accessed)
  compute_s, memory_s = flops / peak.flops_per_s, bytes_accessed / peak.hbm_bytes_per_s
  if bytes_accessed:
    intensity = flops / bytes_accessed
  else:
    intensity = math.inf if flops else 0.0
  bound_by = "none" if compute_s == memory_s == 0 else ("compute" if compute_s >= memory_s else "memory")
  return {"device": peak.name, "peak_flops_per_s": peak.flops_per_s, "peak_hbm_bytes_per_s": peak.hbm_bytes_per_s,
          "flops": flops, "bytes_accessed": bytes_accessed, "compute_s": compute_s, "memory_s": memory_s,
          "bound_s": max(compute_s, memory_s), "bound_by": bound_by, "arithmetic_intensity": intensity,
          "ridge_intensity": peak.flops_per_s / peak.hbm_bytes_per_s}


def _check_counts(repeats, warmup) -> None:
  for name, value, least in (("repeats", repeats, 1), ("warmup", warmup, 0)):
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ValueError(f"{name}={value!r} must be an int >= {least}.")


def wall_time(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
  """Median wall seconds of `fn()` over `repeats` runs after `warmup` runs, each result block_until_ready'd
  (the project's rule for quoting a time: median of >= 5 after warm-up)."""
  _check_counts(repeats, warmup)
  for _ in range(warmup):
    jax.block_until_ready(fn())
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    samples.append(time.perf_counter() - start)
  return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples}


def profile(fn: Callable, *args, device: str | None = None, repeats: int = 5, warmup: int = 1,
            **kwargs) -> dict[str, Any]:
  """Everything about one jitted call `fn(*args, **kwargs)`, compiled once: `compiled_cost`'s figures (flops,
  bytes_accessed, temp_bytes, ...), `wall_time`'s median of `repeats` runs after `warmup`, the achieved FLOP/s
  and bytes/s, and with `device` (see `device_peak`) its `roofline` of XLA's flops and bytes plus
  `roofline_fraction` = bound_s / median_s -- meaningful when this process runs on that device.

  The compiled executable is what runs (no second compilation; its first call is one of the warm-up runs),
  except for a jitted `fn` called with static keyword arguments, which the executable does not take: then `fn`
  itself runs (jit's cache compiles it once more on warm-up). Pallas kernels count in XLA's figures through the
  `pl.CostEstimate`s they pass.
  """
  _check_counts(repeats, warmup)
  if device is not None:
    device_peak(device)  # an unknown name fails before anything compiles
  compiled = _compile(fn, *args, **kwargs)
  result = _figures(compiled)
  call = lambda: compiled(*args, **kwargs)
  try:
    jax.block_until_ready(call())
    warmup = max(warmup - 1, 0)
  except TypeError:  # the executable's signature lacks fn's static arguments (a pytree mismatch, before running)
    call = lambda: fn(*args, **kwargs)
  result.update(wall_time(call, repeats=repeats, warmup=warmup))
  median = result["median_s"]
  result["achieved_flops_per_s"] = result["flops"] / median if median > 0 else math.nan
  result["achieved_bytes_per_s"] = result["bytes_accessed"] / median if median > 0 else math.nan
  if device is not None:
    result["roofline"] = roofline(result["flops"], result["bytes_accessed"], device)
    result["roofline_fraction"] = result["roofline"]["bound_s"] / median if median > 0 else math.nan
  return result


def _add(total: dict, cost: dict, times: int = 1) -> None:
  for key in COST_KEYS:
    total[key] = total.get(key, 0) + times * cost[key]


def kernel_cost_of_forward(config, batch: int, seq_len: int, *, dtype=None) -> dict[str, Any]:
  """Modelled cost of one Llama forward on [batch, seq_len] tokens from the kernels' own cost models.

  Every projection is `pallas_kernels.matmul.cost((m, k), (k, n), dtype=)` with m = batch * seq_len (q, k, v, o, gate,
  up, down per layer, and the LM head), every RMSNorm `pallas_kernels.rms_norm.cost` (two per layer + final).
  Attention is a closed formula: logits and values are each 2 * B * H * T^2 * head_dim flops (the full T x T
  square, as the reference attention computes it), with q, k, v read and the output written once as bytes.
  Not counted: the embedding gather, RoPE, SiLU, residual adds, softmax. Returns totals of `flops, hbm_bytes,
  ideal_bytes` and `by_kernel` (each kernel's cost summed over layers).
  """
  for name, value in (("batch", batch), ("seq_len", seq_len)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  c = config
  dtype = jnp.dtype(c.compute_dtype if dtype is None else dtype)
  tokens = batch * seq_len
  layers = c.num_layers
  projections = {  # name -> (k, n) of an [tokens, k] @ [k, n] product
      "q": (c.embed_dim, c.num_heads * c.head_dim),
      "k": (c.embed_dim, c.num_kv_heads * c.head_dim),
      "v": (c.embed_dim, c.num_kv_heads * c.head_dim),
      "o": (c.num_heads * c.head_dim, c.embed_dim),
      "gate": (c.embed_dim, c.mlp_dim),
      "up": (c.embed_dim, c.mlp_dim),
      "down": (c.mlp_dim, c.embed_dim),
  }
  by_kernel: dict[str, dict] = {}
  for name, (k, n) in projections.items():
    by_kernel[name] = {}
    _add(by_kernel[name], _matmul_op.cost((tokens, k), (k, n), dtype=dtype), layers)
  by_kernel["lm_head"] = dict(_matmul_op.cost((tokens, c.embed_dim), (c.embed_dim, c.vocab_size), dtype=dtype))
  by_kernel["rms_norm"] = {}
  _add(by_kernel["rms_norm"], _rms_norm_op.cost((batch, seq_len, c.embed_dim), dtype=dtype), 2 * layers + 1)
  attention_flops = 2 * 2 * batch * c.num_heads * seq_len * seq_len * c.head_dim
  qkvo_elements = tokens * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  attention_bytes = qkvo_elements * dtype.itemsize
  by_kernel["attention"] = {"flops": layers * attention_flops, "hbm_bytes": layers * attention_bytes,
                            "ideal_bytes": layers * attention_bytes}
  total: dict[str, Any] = {}
  for cost in by_kernel.values():
    _add(total, cost)
  total["by_kernel"] = by_kernel
  return total
