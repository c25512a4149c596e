"""Optimizer memory, measured: bytes of a real optimizer-state pytree, and XLA's memory figures of a compiled step.

State bytes are summed from the arrays themselves (`nbytes` of every array leaf, nnx Variables such as the
`OptimizerState` of `axes.named` unwrapped), not modeled from a formula, so codes, per-block absmax, factored
rows/columns, projections and step counters all count as stored (a uint8 array of packed 4-bit codes counts one
byte per element, i.e. half a byte per code). PRNG key leaves count their key data (8 bytes for threefry).

`compiled_memory` reads `memory_analysis()` of the compiled step. A step that is already jitted (or compiled)
is used as it is, so its `donate_argnums` stay in effect and the donated (aliased) buffers are reported; a
plain function goes through `efficient.measure.compiled_cost` (which jits it without donation). Caveat of
XLA:CPU (README, Design, fact 5): a scan body is counted once and remat recomputation may be dropped.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from efficient import measure
from efficient.optim.axes import unwrap

# The memory fields `compiled_memory` returns, named as `efficient.measure.compiled_cost` names them.
MEMORY_FIELDS = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "generated_code_bytes")


def _array_leaves(tree, name: str) -> list:
  if isinstance(tree, nnx.Module):
    raise ValueError(f"{name} must be a pytree of arrays (e.g. nnx.state(model, nnx.Param)), not a Module.")
  leaves = []
  for leaf in jax.tree.leaves(unwrap(tree)):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      raise ValueError(f"{name} holds an abstract leaf {leaf}: memory is measured from real arrays only.")
    if hasattr(leaf, "nbytes") and hasattr(leaf, "shape"):
      leaves.append(leaf)
  return leaves


def state_bytes(state) -> int:
  """Bytes held by every array leaf of `state` (any pytree; nnx Variables unwrapped); 0 for a state-free one."""
  return int(sum(int(leaf.nbytes) for leaf in _array_leaves(state, "state")))


def state_bytes_per_param(state, params) -> float:
  """`state_bytes(state)` per parameter element of `params` (a pytree or nnx.State of the trained params)."""
  count = sum(int(np.prod(leaf.shape)) for leaf in _array_leaves(params, "params"))
  if count == 0:
    raise ValueError("params holds no array elements: bytes per parameter is undefined.")
  return state_bytes(state) / count


def compiled_memory(fn: Callable, *args, **kwargs) -> dict[str, Any]:
  """XLA's memory analysis of `fn(*args, **kwargs)` compiled: MEMORY_FIELDS in bytes, plus
  'peak_bytes' = argument + output + temp - alias (the buffers live at once if nothing is freed early; donated
  inputs written in place count once) and 'xla_peak_bytes' (XLA's own peak figure, NaN where not reported).

  `fn`: an already compiled step (`jitted.lower(...).compile()`, args then unused: measure and run one
  compilation), a jitted function (lowered with its own donation), or a plain function (jitted without
  donation); all read by `efficient.measure.compiled_cost`.
  """
  if not callable(fn):
    raise ValueError(f"fn must be callable, got {fn!r}.")
  cost = measure.compiled_cost(fn, *args, **kwargs)
  fields = {name: cost[name] for name in MEMORY_FIELDS}
  fields["xla_peak_bytes"] = cost["peak_bytes"]
  fields["peak_bytes"] = (fields["argument_bytes"] + fields["output_bytes"] + fields["temp_bytes"]
                          - fields["alias_bytes"])
  return fields
