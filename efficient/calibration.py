"""Calibration statistics of a model's projections, shared by PTQ (GPTQ, SmoothQuant) and pruning (Wanda, SparseGPT).

Every projection of `efficient.models.llama` is an `Einsum` module (`kernel` + `equation`). This module finds them
by path (`einsum_modules`), views a kernel as the matrix the literature talks about (`kernel_as_matrix`: the
contracted axes flattened as `in_features`, the rest as `out_features`) and collects, per projection, the second
moment of its input over calibration tokens (`capture_hessians`).

Hessian convention (GPTQ's): H = 2 XᵀX / n, X [n, in] the n non-padding input rows, accumulated in f32. GPTQ's
layer objective ‖XW − XŴ‖² has Hessian 2XᵀX w.r.t. each output column; dividing by n only rescales it (GPTQ's
reference code does the same running average), so damping "percent of the mean diagonal" is unaffected. Wanda's
input norm ‖X_j‖₂ is sqrt(H_jj · n / 2).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import re
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient.models.llama import Einsum


def path_str(path) -> str:
  """('blocks', 3, 'mlp', 'gate') -> 'blocks/3/mlp/gate'."""
  return "/".join(str(p) for p in path)


def einsum_modules(model: nnx.Module, pattern: str = ".*", *, types=(Einsum,)) -> dict[str, nnx.Module]:
  """{path: module} of every module of `types` whose path ('blocks/3/mlp/gate') matches `pattern` (re.search),
  in a deterministic (sorted-path) order."""
  try:
    regex = re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ValueError(f"pattern={pattern!r} is not a valid regular expression: {e}") from e
  found = {path_str(p): m for p, m in nnx.iter_graph(model) if isinstance(m, types)}
  return {p: found[p] for p in sorted(found, key=_natural_key) if regex.search(p)}


def _natural_key(path: str):
  return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in path.split("/")]


def get_module(model: nnx.Module, path: str) -> nnx.Module:
  """The submodule at 'a/0/b'."""
  node = model
  for key in path.split("/"):
    node = node[int(key)] if key.isdigit() else getattr(node, key)
  return node


def set_module(model: nnx.Module, path: str, module: nnx.Module) -> None:
  """Replaces the submodule at 'a/0/b' with `module` (in place)."""
  parent_path, _, key = path.rpartition("/")
  parent = get_module(model, parent_path) if parent_path else model
  if key.isdigit():
    parent[int(key)] = module
  else:
    setattr(parent, key, module)


# --- the matrix view of an einsum kernel --------------------------------------------------------------------

def parse_equation(equation: str) -> dict:
  """Splits 'lhs,rhs->out' (x, kernel -> y) into the axis letters GPTQ-style code needs.

  contract   kernel axes summed over (in kernel order) -> in_features
  outputs    the other kernel axes (in kernel order) -> out_features
  batch      the input axes that are not contracted (tokens), in input order
  """
  try:
    inputs, out = equation.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
  except ValueError as e:
    raise ValueError(f"equation={equation!r} must look like 'btd,df->btf' (two operands, explicit output).") from e
  contract = tuple(a for a in rhs if a in lhs and a not in out)
  outputs = tuple(a for a in rhs if a not in contract)
  batch = tuple(a for a in lhs if a not in contract)
  if not contract or any(a not in out for a in outputs) or any(a in rhs for a in batch):
    raise ValueError(f"equation={equation!r}: expected x[tokens..., in...] , kernel[in..., out...] -> "
                     f"y[tokens..., out...] with no axis shared by tokens and kernel.")
  return {"lhs": lhs, "rhs": rhs, "out": out, "contract": contract, "outputs": outputs, "batch": batch}


def _kernel_perm(spec) -> tuple[int, ...]:
  return tuple(spec["rhs"].index(a) for a in spec["contract"] + spec["outputs"])


def _split_sizes(spec, kernel_shape):
  sizes = dict(zip(spec["rhs"], kernel_shape))
  return [sizes[a] for a in spec["contract"]], [sizes[a] for a in spec["outputs"]]


def matrix_shape(module) -> tuple[int, int]:
  """(in_features, out_features) of an Einsum-like module (anything with `equation` and a kernel shape)."""
  spec = parse_equation(module.equation)
  ins, outs = _split_sizes(spec, kernel_shape(module))
  return int(np.prod(ins)), int(np.prod(outs))


def kernel_shape(module) -> tuple[int, ...]:
  return tuple(module.kernel_shape) if hasattr(module, "kernel_shape") else tuple(module.kernel[...].shape)


def kernel_as_matrix(module, kernel=None) -> jax.Array:
  """The kernel (or `kernel` of the module's shape) as [in_features, out_features]: contracted axes first,
  flattened in kernel order; the rest flattened in kernel order."""
  spec = parse_equation(module.equation)
  kernel = module.kernel[...] if kernel is None else kernel
  moved = jnp.transpose(kernel, _kernel_perm(spec))
  return moved.reshape(matrix_shape(module))


def matrix_to_kernel(module, matrix) -> jax.Array:
  """Inverse of `kernel_as_matrix`: [in_features, out_features] -> an array of the module's kernel shape."""
  spec = parse_equation(module.equation)
  shape = kernel_shape(module)
  if tuple(matrix.shape) != matrix_shape(module):
    raise ValueError(f"matrix has shape {tuple(matrix.shape)}; the module's kernel {shape} "
                     f"(equation {module.equation!r}) needs {matrix_shape(module)}.")
  perm = _kernel_perm(spec)
  moved = matrix.reshape(tuple(shape[i] for i in perm))
  return jnp.transpose(moved, np.argsort(perm))


def inputs_as_matrix(equation: str, x) -> jax.Array:
  """The einsum's input x [tokens..., in...] as [n_tokens, in_features], in_features ordered as the kernel's
  contracted axes (so `inputs_as_matrix(x) @ kernel_as_matrix(m)` is the einsum, flattened)."""
  spec = parse_equation(equation)
  perm = tuple(spec["lhs"].index(a) for a in spec["batch"] + spec["contract"])
  moved = jnp.transpose(x, perm)
  n_batch = len(spec["batch"])
  return moved.reshape(int(np.prod(moved.shape[:n_batch], dtype=np.int64)), -1)


def outputs_from_matrix(equation: str, y2, x_shape, kernel_shape_) -> jax.Array:
  """[n_tokens, out_features] -> the einsum's output layout (inverse of flattening tokens and outputs)."""
  spec = parse_equation(equation)
  sizes = dict(zip(spec["lhs"], x_shape)) | dict(zip(spec["rhs"], kernel_shape_))
  y = y2.reshape(tuple(sizes[a] for a in spec["batch"] + spec["outputs"]))
  order = spec["batch"] + spec["outputs"]
  return jnp.transpose(y, tuple(order.index(a) for a in spec["out"]))


# --- Hessian capture ------------------------------------------------------------------------------------------

# While a capturing forward is traced: (dict path -> (XᵀX sum, max |x|), token mask [B, T] f32 or None).
_SINK: contextvars.ContextVar = contextvars.ContextVar("efficient_calibration_sink", default=None)


class _Capturing(nnx.Module):
  """Wraps a projection: runs it unchanged and adds its flattened input's XᵀX (f32) to the active sink."""

  def __init__(self, inner: nnx.Module, path: str):
    self.inner = inner
    self.path = path

  def __call__(self, x):
    sink = _SINK.get()
    if sink is not None:
      sums, mask = sink
      x2 = inputs_as_matrix(self.inner.equation, x).astype(jnp.float32)
      if mask is not None:
        if mask.size != x2.shape[0]:
          raise ValueError(f"{self.path}: the batch mask has {mask.size} tokens, the input {x2.shape[0]} rows.")
        x2 = x2 * mask.reshape(-1, 1)  # padding rows contribute nothing
      xtx = jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
      absmax = jnp.max(jnp.abs(x2), axis=0)  # masked rows are 0, so they never set the max
      if self.path in sums:
        xtx, absmax = sums[self.path][0] + xtx, jnp.maximum(sums[self.path][1], absmax)
      sums[self.path] = (xtx, absmax)
    return self.inner(x)


@functools.partial(jax.jit, static_argnames="graphdef")
def _capture_step(state, tokens, positions, segment_ids, mask, *, graphdef):
  model = nnx.merge(graphdef, state)
  sums: dict = {}
  token = _SINK.set((sums, mask))
  try:
    kwargs = {} if positions is None else {"positions": positions}
    if segment_ids is not None:
      kwargs["segment_ids"] = segment_ids
    model(tokens, **kwargs)
  finally:
    _SINK.reset(token)
  return sums


def batch_token_mask(batch: dict):
  """f32 [B, T] mask of real (non-padding) tokens: `loss_mask` if present, else `segment_ids > 0`, else None."""
  if "loss_mask" in batch:
    return jnp.asarray(batch["loss_mask"], jnp.float32)
  if "segment_ids" in batch:
    return (jnp.asarray(batch["segment_ids"]) > 0).astype(jnp.float32)
  return None


@contextlib.contextmanager
def swapped_modules(model: nnx.Module, replacements: dict[str, nnx.Module]):
  """Temporarily replaces the submodules at the given paths; the originals come back even on exceptions."""
  originals = {path: get_module(model, path) for path in replacements}
  try:
    for path, module in replacements.items():
      set_module(model, path, module)
    yield model
  finally:
    for path, module in originals.items():
      set_module(model, path, module)


def capture_hessians(model: nnx.Module, batches: Iterable[dict], *, pattern: str = ".*") -> dict[str, dict]:
  """{path: {'hessian': f32 [in, in] = 2 XᵀX / n, 'absmax': f32 [in] = max_t |x_tj|, 'count': n}} for every
  Einsum matching `pattern` (absmax is what SmoothQuant and outlier detection need).

  `batches` are dicts with 'tokens' [B, T] (and optionally 'positions', 'segment_ids', 'loss_mask'), or bare
  token arrays. Rows are the projection's input at each token; padding tokens (loss_mask 0, else segment id 0)
  are left out. The model is unchanged afterwards (capturing wrappers are swapped in, then the originals back).
  """
  modules = einsum_modules(model, pattern)
  if not modules:
    raise ValueError(f"pattern={pattern!r} matches no Einsum module of the model.")
  sums: dict[str, jax.Array] = {}
  count = 0.0
  with swapped_modules(model, {p: _Capturing(m, p) for p, m in modules.items()}):
    graphdef, state = nnx.split(model)
    for batch in batches:
      if not isinstance(batch, dict):
        batch = {"tokens": batch}
      tokens = jnp.asarray(batch["tokens"])
      mask = batch_token_mask(batch)
      step_sums = _capture_step(state, tokens, _optional(batch, "positions"), _optional(batch, "segment_ids"),
                                mask, graphdef=graphdef)
      for path, (xtx, absmax) in step_sums.items():
        if not bool(jnp.all(jnp.isfinite(xtx))):
          raise ValueError(f"batches: the inputs of {path} hold NaN/inf; the calibration data must be finite.")
        if path in sums:
          xtx, absmax = sums[path][0] + xtx, jnp.maximum(sums[path][1], absmax)
        sums[path] = (xtx, absmax)
      count += float(tokens.size if mask is None else jnp.sum(mask))
  if count == 0:
    raise ValueError("batches held no (non-padding) tokens to calibrate on.")
  return {path: {"hessian": 2.0 * sums[path][0] / count, "absmax": sums[path][1], "count": int(count)}
          for path in modules}


def _optional(batch, key):
  return None if key not in batch else jnp.asarray(batch[key])
