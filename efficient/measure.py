"""Measuring models and steps without timing them: parameter bytes, saved-residual (activation) bytes, XLA's
compiled cost and memory, and the modelled kernel cost of a Llama forward.

Why residuals: XLA:CPU's `memory_analysis()` drops remat recomputation in unrolled code and counts a scan body
once, so activation memory is measured as the bytes autodiff saves for the backward pass, which is exact and
backend-independent (README, Design, fact 5).
"""
from __future__ import annotations

import importlib
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


def compiled_cost(fn: Callable, *args, **kwargs) -> dict[str, float]:
  """XLA's own figures for `jax.jit(fn)(*args)`: cost analysis (flops, bytes accessed, transcendentals) and
  memory analysis (argument, output, temp, alias, generated code and peak bytes). An already jitted `fn` is
  lowered as it is, so its donation (alias bytes) counts; an already compiled one (`.lower(...).compile()`) is
  read as it is (args unused).

  Caveat (README, Design, fact 5): on CPU a scan body is counted once and remat recomputation may be removed.
  """
  if hasattr(fn, "memory_analysis"):
    compiled = fn
  else:
    compiled = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args, **kwargs).compile()
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
