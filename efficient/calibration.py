"""Finding a model's linear layers by path, their matrix view, and calibration statistics of their inputs --
shared by PTQ (GPTQ, SmoothQuant), QAT and pruning (Wanda, SparseGPT).

A linear layer is any module of `efficient.nn.LINEAR_TYPES` (this project's `Einsum`, flax's `nnx.Linear` and
`nnx.Einsum`), described by an `efficient.nn.LinearView` (`linear_view`: equation, kernel, bias, logical axes,
compute dtype), so a user's own NNX model works unchanged. This module finds them by path (`einsum_modules`: full-match regex on paths like
'blocks/3/mlp/gate'), matches rule lists against them (`match_rules`: first full match wins, a rule matching
no layer is an error), views a kernel as the matrix the literature talks about (`kernel_as_matrix`: the
contracted axes flattened as `in_features`, the rest as `out_features`) and collects, per layer, the second
moment of its input over calibration rows (`capture_hessians`). Equations may carry an ellipsis for batch dims
(nnx.Linear's '...i,io->...o').

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
import string
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient import nn

LINEAR_TYPES = nn.LINEAR_TYPES
_TYPE_NAMES = "efficient.nn.Einsum, nnx.Linear, nnx.Einsum"


def path_str(path) -> str:
  """('blocks', 3, 'mlp', 'gate') -> 'blocks/3/mlp/gate'."""
  return "/".join(str(p) for p in path)


def _compile(pattern, what: str):
  try:
    return re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ValueError(f"{what}: {pattern!r} is not a valid regular expression: {e}") from e


def einsum_modules(model: nnx.Module, pattern: str = ".*", *, types=LINEAR_TYPES) -> dict[str, nnx.Module]:
  """{path: module} of every module of `types` (default: the linear layers) whose path ('blocks/3/mlp/gate')
  matches `pattern` in full (`re.fullmatch`, as qwix's rules), in a deterministic (natural path) order."""
  regex = _compile(pattern, "pattern")
  found = {path_str(p): m for p, m in nnx.iter_graph(model) if isinstance(m, types)}
  return {p: found[p] for p in sorted(found, key=natural_key) if regex.fullmatch(p)}


linear_modules = einsum_modules


def natural_key(path: str):
  """Sort key of a module path with numeric parts compared as numbers ('blocks/2' before 'blocks/10')."""
  return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in path.split("/")]


def compile_rules(rules, *, config_type: type) -> list[tuple[str, re.Pattern, object]]:
  """`rules` -- (path regex, config | None) pairs or a {regex: config} mapping -- as (pattern, compiled regex,
  config) triples; ValueError for an empty list, a malformed pair, a config not of `config_type` or a bad regex
  (each naming the rule)."""
  rules = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
  if not rules:
    raise ValueError(f"rules must hold at least one (path regex, {config_type.__name__} | None) pair.")
  compiled = []
  for i, rule in enumerate(rules):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ValueError(f"rules[{i}] must be a (path regex, {config_type.__name__} | None) pair; got {rule!r}.")
    pattern, config = rule
    if config is not None and not isinstance(config, config_type):
      raise ValueError(f"rules[{i}] ({pattern!r}): the config must be a {config_type.__name__} or None; "
                       f"got {type(config).__name__}.")
    compiled.append((pattern, _compile(pattern, f"rules[{i}]"), config))
  return compiled


def match_paths(compiled, paths: Sequence[str], *, kind: str = "linear layer") -> dict[str, tuple[int, object]]:
  """{path: (index of the first rule matching it in full, that rule's config -- None included)} over `paths`
  (rules from `compile_rules`); paths no rule matches are left out. A rule matching no path is a ValueError
  naming it (`kind` says what the paths are, e.g. 'parameter')."""
  paths = list(paths)
  for i, (pattern, regex, _) in enumerate(compiled):
    if not any(regex.fullmatch(p) for p in paths):
      raise ValueError(f"rules[{i}] {pattern!r} matches no {kind} path in full (re.fullmatch); the model's "
                       f"paths look like {paths[:3]}.")
  matched = {}
  for path in paths:
    for i, (_, regex, config) in enumerate(compiled):
      if regex.fullmatch(path):
        matched[path] = (i, config)
        break
  return matched


def match_rules(model: nnx.Module, rules, *, config_type: type, types=LINEAR_TYPES,
                kind: str = "linear") -> dict[str, tuple]:
  """{path: (module, config)} for every module of `types` the rules give a config: `rules` is a sequence of
  (path regex, config | None) pairs (or a {regex: config} mapping); the first rule whose regex matches the path
  in full wins, None leaves the module as it is. Raises ValueError for a malformed rule, for a rule whose regex
  matches no module path (naming the rule), and for a model with no module of `types`."""
  compiled = compile_rules(rules, config_type=config_type)
  modules = einsum_modules(model, types=types)
  if not modules:
    raise ValueError(f"model ({type(model).__name__}) has no {kind} layer ({_kind_names(types)}) for the rules "
                     f"to match.")
  matched = match_paths(compiled, modules, kind=f"{kind} layer")
  return {path: (modules[path], config) for path, (_, config) in matched.items() if config is not None}


def tree_path_str(key_path) -> str:
  """A jax key path (DictKey / SequenceKey / GetAttrKey entries) as 'blocks/0/mlp/gate/kernel'; the 'value'
  attribute of an `nnx.Variable` is skipped, so a param tree and its unwrapped arrays give the same string."""
  parts = []
  for key in key_path:
    name = getattr(key, "key", getattr(key, "idx", getattr(key, "name", None)))
    if name != "value":
      parts.append(str(name))
  return "/".join(parts)


def param_paths(model: nnx.Module) -> dict[str, nnx.Variable]:
  """{'blocks/0/mlp/gate/kernel': variable} of every `nnx.Param` of `model` (the paths parameter rules match)."""
  return {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _kind_names(types) -> str:
  return _TYPE_NAMES if tuple(types) == LINEAR_TYPES else ", ".join(t.__name__ for t in types)


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


# --- what a transform reads of a layer ------------------------------------------------------------------------

# The one description of any linear layer (or a replacement keeping a float kernel) lives on the layer floor.
linear_view = nn.linear_view


def equation_of(module) -> str:
  """The layer's einsum equation 'x,kernel->y' (nnx.Linear: '...i,io->...o')."""
  if hasattr(module, "equation"):
    return module.equation
  return linear_view(module).equation


def bias_of(module):
  """The layer's bias variable (an nnx.Param, kept as is by replacements), or None."""
  return getattr(module, "bias", None)


# --- the matrix view of an einsum kernel --------------------------------------------------------------------

def parse_equation(equation: str) -> dict:
  """Splits 'lhs,rhs->out' (x, kernel -> y) into the axis letters GPTQ-style code needs.

  contract   kernel axes summed over (in kernel order) -> in_features
  outputs    the other kernel axes (in kernel order) -> out_features
  batch      the input axes that are not contracted (tokens), in input order (an ellipsis '...' in x and y,
             as in '...i,io->...o', stands for further leading batch axes: `concrete_equation` spells it out)
  """
  try:
    inputs, out = equation.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
  except ValueError as e:
    raise ValueError(f"equation={equation!r} must look like 'btd,df->btf' (two operands, explicit output).") from e
  ellipsis = "..." in lhs
  if "..." in rhs or ellipsis != ("..." in out) or "." in lhs.replace("...", "", 1) + out.replace("...", "", 1):
    raise ValueError(f"equation={equation!r}: an ellipsis may stand only for batch axes of x and y "
                     f"('...i,io->...o').")
  lhs, out = lhs.replace("...", ""), out.replace("...", "")
  contract = tuple(a for a in rhs if a in lhs and a not in out)
  outputs = tuple(a for a in rhs if a not in contract)
  batch = tuple(a for a in lhs if a not in contract)
  if not contract or any(a not in out for a in outputs) or any(a in rhs for a in batch):
    raise ValueError(f"equation={equation!r}: expected x[tokens..., in...] , kernel[in..., out...] -> "
                     f"y[tokens..., out...] with no axis shared by tokens and kernel.")
  return {"lhs": lhs, "rhs": rhs, "out": out, "contract": contract, "outputs": outputs, "batch": batch,
          "ellipsis": ellipsis}


def concrete_equation(equation: str, x_ndim: int) -> str:
  """`equation` with its ellipsis (if any) replaced by letters for the x_ndim-dim input's extra batch axes."""
  equation = equation.replace(" ", "")
  if "..." not in equation:
    return equation
  parse_equation(equation)  # validates
  inputs, out = equation.split("->")
  lhs, rhs = inputs.split(",")
  extra = x_ndim - (len(lhs) - 3)
  if extra < 0:
    raise ValueError(f"x has {x_ndim} dims; equation={equation!r} needs at least {len(lhs) - 3}.")
  free = [c for c in string.ascii_letters if c not in equation][:extra]
  letters = "".join(free)
  return f"{lhs.replace('...', letters)},{rhs}->{out.replace('...', letters)}"


def _kernel_perm(spec) -> tuple[int, ...]:
  return tuple(spec["rhs"].index(a) for a in spec["contract"] + spec["outputs"])


def _split_sizes(spec, kernel_shape):
  sizes = dict(zip(spec["rhs"], kernel_shape))
  return [sizes[a] for a in spec["contract"]], [sizes[a] for a in spec["outputs"]]


def matrix_shape(module) -> tuple[int, int]:
  """(in_features, out_features) of a linear layer (or a replacement with `equation` and a kernel shape)."""
  spec = parse_equation(equation_of(module))
  ins, outs = _split_sizes(spec, kernel_shape(module))
  return int(np.prod(ins)), int(np.prod(outs))


def kernel_shape(module) -> tuple[int, ...]:
  if isinstance(getattr(module, "kernel", None), nnx.Variable):
    return tuple(module.kernel[...].shape)
  return tuple(module.kernel_shape)


def kernel_as_matrix(module, kernel=None) -> jax.Array:
  """The kernel (or `kernel` of the module's shape) as [in_features, out_features]: contracted axes first,
  flattened in kernel order; the rest flattened in kernel order."""
  spec = parse_equation(equation_of(module))
  kernel = module.kernel[...] if kernel is None else kernel
  moved = jnp.transpose(kernel, _kernel_perm(spec))
  return moved.reshape(matrix_shape(module))


def matrix_to_kernel(module, matrix) -> jax.Array:
  """Inverse of `kernel_as_matrix`: [in_features, out_features] -> an array of the module's kernel shape."""
  equation = equation_of(module)
  spec = parse_equation(equation)
  shape = kernel_shape(module)
  if tuple(matrix.shape) != matrix_shape(module):
    raise ValueError(f"matrix has shape {tuple(matrix.shape)}; the module's kernel {shape} "
                     f"(equation {equation!r}) needs {matrix_shape(module)}.")
  perm = _kernel_perm(spec)
  moved = matrix.reshape(tuple(shape[i] for i in perm))
  return jnp.transpose(moved, np.argsort(perm))


def matrix_axis_names(module) -> tuple:
  """Logical names of the [in, out] matrix view of the layer's kernel: the names of its leading contracted and
  leading output axes (the flattened dims keep that axis major, so the same mesh rule shards them); None where
  the kernel has none (a plain nnx.Linear)."""
  view = linear_view(module)
  spec = parse_equation(view.equation)
  by_letter = dict(zip(spec["rhs"], view.kernel_names))
  return (by_letter[spec["contract"][0]], by_letter[spec["outputs"][0]])


def inputs_as_matrix(equation: str, x) -> jax.Array:
  """The einsum's input x [tokens..., in...] as [n_tokens, in_features], in_features ordered as the kernel's
  contracted axes (so `inputs_as_matrix(x) @ kernel_as_matrix(m)` is the einsum, flattened)."""
  rows, _ = inputs_as_rows(equation, x)
  return rows.reshape(int(np.prod(rows.shape[:-1], dtype=np.int64)), rows.shape[-1])


def inputs_as_rows(equation: str, x):
  """(x as [tokens..., in_features], the tokens shape): `inputs_as_matrix` before flattening the tokens."""
  spec = parse_equation(concrete_equation(equation, x.ndim))
  perm = tuple(spec["lhs"].index(a) for a in spec["batch"] + spec["contract"])
  moved = jnp.transpose(x, perm)
  batch_shape = moved.shape[:len(spec["batch"])]
  return moved.reshape(*batch_shape, -1), batch_shape


def inputs_from_rows(equation: str, rows, x_shape) -> jax.Array:
  """Inverse of `inputs_as_rows`: [tokens..., in_features] -> the einsum's input layout of shape `x_shape`."""
  spec = parse_equation(concrete_equation(equation, len(x_shape)))
  perm = tuple(spec["lhs"].index(a) for a in spec["batch"] + spec["contract"])
  moved = rows.reshape(tuple(x_shape[i] for i in perm))
  return jnp.transpose(moved, np.argsort(perm))


def outputs_from_matrix(equation: str, y2, x_shape, kernel_shape_) -> jax.Array:
  """[n_tokens, out_features] -> the einsum's output layout (inverse of flattening tokens and outputs)."""
  spec = parse_equation(concrete_equation(equation, len(x_shape)))
  sizes = dict(zip(spec["lhs"], x_shape)) | dict(zip(spec["rhs"], kernel_shape_))
  y = y2.reshape(tuple(sizes[a] for a in spec["batch"] + spec["outputs"]))
  order = spec["batch"] + spec["outputs"]
  return jnp.transpose(y, tuple(order.index(a) for a in spec["out"]))


def outputs_as_rows(equation: str, y, x_ndim: int) -> jax.Array:
  """The einsum's output y (of an x_ndim-dim input) as [tokens..., out_features], out_features ordered as the
  kernel's output axes (inverse of `outputs_from_matrix` before flattening the tokens)."""
  spec = parse_equation(concrete_equation(equation, x_ndim))
  perm = tuple(spec["out"].index(a) for a in spec["batch"] + spec["outputs"])
  moved = jnp.transpose(y, perm)
  return moved.reshape(*moved.shape[:len(spec["batch"])], -1)


def add_bias(equation: str, y, bias, x_ndim: int, kernel_shape_):
  """y + bias (y the output of an x_ndim-dim input), the bias laid along y's kernel axes as nnx.Einsum,
  nnx.Linear and nn.Einsum add it, in f32, result in y's dtype. `bias` None: y unchanged."""
  if bias is None:
    return y
  spec = parse_equation(concrete_equation(equation, x_ndim))
  sizes = dict(zip(spec["rhs"], kernel_shape_))
  shape = tuple(sizes[a] if a in sizes else 1 for a in spec["out"])
  return (y.astype(jnp.float32) + jnp.reshape(bias.astype(jnp.float32), shape)).astype(y.dtype)


# --- Hessian capture ------------------------------------------------------------------------------------------

# While a capturing forward is traced: (dict path -> (XᵀX sum, max |x|, rows), token mask [B, T] f32 or None).
_SINK: contextvars.ContextVar = contextvars.ContextVar("efficient_calibration_sink", default=None)


class _Capturing(nnx.Module):
  """Wraps a module: runs it unchanged and adds its input's XᵀX (f32) to the active sink. Rows of X: the linear
  layer's input rows (`inputs_as_matrix`), or `as_matrix(x)` for any other module."""

  def __init__(self, inner: nnx.Module, path: str, as_matrix=None):
    self.inner = inner
    self.path = path
    self.as_matrix = as_matrix

  def __call__(self, x, *args, **kwargs):
    sink = _SINK.get()
    if sink is not None:
      sums, mask = sink
      x2 = (inputs_as_matrix(equation_of(self.inner), x) if self.as_matrix is None
            else self.as_matrix(x)).astype(jnp.float32)
      rows = jnp.asarray(x2.shape[0], jnp.float32)
      if mask is not None:
        if mask.size != x2.shape[0]:
          raise ValueError(f"{self.path}: the batch mask has {mask.size} tokens, the input {x2.shape[0]} rows.")
        x2 = x2 * mask.reshape(-1, 1)  # padding rows contribute nothing
        rows = jnp.sum(mask)
      xtx = jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
      absmax = jnp.max(jnp.abs(x2), axis=0)  # masked rows are 0, so they never set the max
      if self.path in sums:
        xtx, absmax, rows = (sums[self.path][0] + xtx, jnp.maximum(sums[self.path][1], absmax),
                             sums[self.path][2] + rows)
      sums[self.path] = (xtx, absmax, rows)
    return self.inner(x, *args, **kwargs)


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


def exact_pattern(paths: Sequence[str]) -> str:
  """A regex matching exactly `paths` (for `pattern=` arguments)."""
  return "(" + "|".join(re.escape(p) for p in paths) + ")"


def capture_hessians(model: nnx.Module, batches: Iterable, *, pattern: str = ".*") -> dict[str, dict]:
  """{path: {'hessian': f32 [in, in] = 2 XᵀX / n, 'absmax': f32 [in] = max_t |x_tj|, 'count': n}} for every
  linear layer whose path matches `pattern` in full (absmax is what SmoothQuant and outlier detection need).

  `batches` are dicts with 'tokens' [B, T] (and optionally 'positions', 'segment_ids', 'loss_mask'), or bare
  arrays: the model's one input (token ids, or features for a model of nnx.Linear layers). Rows are the layer's
  input rows (tokens); padding tokens (loss_mask 0, else segment id 0) are left out; n counts each layer's own
  rows. The model is unchanged afterwards (capturing wrappers are swapped in, then the originals back).
  """
  modules = einsum_modules(model, pattern)
  if not modules:
    if not einsum_modules(model):
      raise ValueError(f"model ({type(model).__name__}) has no linear layer ({_TYPE_NAMES}) to calibrate.")
    raise ValueError(f"pattern={pattern!r} matches no linear layer path in full (re.fullmatch).")
  grams = capture_input_grams(model, modules, batches)
  return {path: {"hessian": 2.0 * xtx / float(count), "absmax": absmax, "count": count}
          for path, (xtx, absmax, count) in grams.items()}


def capture_input_grams(model: nnx.Module, modules: dict[str, nnx.Module], batches: Iterable, *,
                        as_matrix=None) -> dict[str, tuple]:
  """{path: (XᵀX f32 [d, d], max_t |x_tj| [d], n)} of the inputs of `modules` ({path: the model's submodule at
  path}) over `batches` (as `capture_hessians`; padding tokens left out). Rows of X: a linear layer's input rows,
  or `as_matrix(x)` when given (e.g. `lambda x: x.reshape(-1, x.shape[-1])` for a norm). The model is unchanged
  afterwards. A forward that never calls a module, or batches without tokens, is a ValueError."""
  sums: dict[str, tuple] = {}
  counts = {path: 0 for path in modules}
  with swapped_modules(model, {p: _Capturing(m, p, as_matrix) for p, m in modules.items()}):
    graphdef, state = nnx.split(model)
    for batch in batches:
      if not isinstance(batch, dict):
        batch = {"tokens": batch}
      tokens = jnp.asarray(batch["tokens"])
      mask = batch_token_mask(batch)
      step_sums = _capture_step(state, tokens, _optional(batch, "positions"), _optional(batch, "segment_ids"),
                                mask, graphdef=graphdef)
      for path, (xtx, absmax, rows) in step_sums.items():
        if not bool(jnp.all(jnp.isfinite(xtx))):
          raise ValueError(f"batches: the inputs of {path} hold NaN/inf; the calibration data must be finite.")
        if path in sums:
          xtx, absmax = sums[path][0] + xtx, jnp.maximum(sums[path][1], absmax)
        sums[path] = (xtx, absmax)
        counts[path] += int(rows)
  uncalled = [p for p in modules if p not in sums]
  if uncalled and len(uncalled) < len(modules):
    raise ValueError(f"the model's forward never called {uncalled[:3]}; leave them out of the capture.")
  if uncalled or any(counts[p] == 0 for p in modules):
    raise ValueError("batches held no (non-padding) tokens to calibrate on.")
  return {path: (sums[path][0], sums[path][1], counts[path]) for path in modules}


def _optional(batch, key):
  return None if key not in batch else jnp.asarray(batch[key])
