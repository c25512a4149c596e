"""Logical axis names for optimizer state, for any optax transformation over an nnx param tree.

Parameters of an NNX model are `nnx.Param` variables whose metadata carries logical names
(`efficient.nn.logical_param`). Optax transformations know nothing of that: `optax.adam` copies the param
variables (names happen to fit), `optax.adafactor` keeps the param's names on factored rows of another rank
(which `efficient.sharding.state_shardings` refuses), and a low-bit state of codes and per-block scales has
shapes no param has. `named(tx)` fixes all of these in one place:

- the inner transformation sees plain arrays (params, grads and its own state with every `nnx.Variable`
  unwrapped), so any optax code runs unchanged (variable metadata would otherwise make trees mismatch);
- every array leaf of the state that belongs to a parameter (its path contains the param's path) is returned
  as an `OptimizerState` variable with names derived from that parameter's by `state_leaf_names`;
- updates come back in the grads' own variables, so `optax.apply_updates(params, updates)` works as before.

Leaves that belong to no parameter (step counters, PRNG keys) stay plain arrays and are replicated.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import optax
from flax import nnx


class OptimizerState(nnx.Variable):
  """An optimizer-state array tagged with logical axis names (`out_sharding` metadata) like a parameter."""


def is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def unwrap(tree):
  """The tree with every `nnx.Variable` replaced by its value (what plain optax code expects)."""
  return jax.tree.map(lambda v: v.get_value() if is_variable(v) else v, tree, is_leaf=is_variable)


def param_names(tree) -> dict[tuple, tuple[tuple[int, ...], tuple | None]]:
  """{path of the param in the unwrapped tree: (shape, logical names or None)} for every array leaf."""
  found = {}
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
  for path, leaf in leaves:
    names = leaf.get_metadata().get("out_sharding") if is_variable(leaf) else None
    value = leaf.get_value() if is_variable(leaf) else leaf
    if hasattr(value, "shape"):
      found[tuple(path)] = (tuple(value.shape), None if names is None else tuple(names))
  return found


def state_leaf_names(shape: Sequence[int], param_shape: Sequence[int], names: Sequence) -> tuple:
  """Logical names of a state array of `shape` that belongs to a param of `param_shape` named `names`.

  - the same rank: the param's names dim by dim (a moment, a block-scale array [*lead, n_blocks] whose last
    dim counts blocks of the param's last axis, a factored row kept with a size-1 dim); a dim that a mesh
    axis does not divide is replicated by `efficient.sharding.logical_to_spec` anyway;
  - one more dim with the leading dims equal: the blocked layout [*lead, n_blocks, block] of a param split
    along its last axis, named (*lead names, last name, None) so blocks shard with the param's last axis;
  - one fewer dim that equals the param's shape with one dim removed: that dim's name removed (Adafactor's
    row/column statistics, a rank-1 normalizer);
  - anything else (a projection [m, rank], a scalar): dims equal in size to the param's, left to right, keep
    their names, others get None.
  """
  shape, param_shape, names = tuple(shape), tuple(param_shape), tuple(names)
  if len(shape) == len(param_shape):
    return names
  if len(shape) == len(param_shape) + 1 and shape[:-2] == param_shape[:-1] and len(param_shape) >= 1:
    return names[:-1] + (names[-1], None)
  if len(shape) == len(param_shape) - 1:
    for dim in range(len(param_shape)):
      if param_shape[:dim] + param_shape[dim + 1:] == shape:
        return names[:dim] + names[dim + 1:]
  out, next_dim = [], 0
  for size in shape:
    match = next((d for d in range(next_dim, len(param_shape)) if param_shape[d] == size), None)
    out.append(None if match is None else names[match])
    next_dim = next_dim if match is None else match + 1
  return tuple(out)


def _owner(path: tuple, params: dict) -> tuple | None:
  """The longest param path that occurs as a contiguous run inside a state leaf's `path`."""
  best = None
  for start in range(len(path)):
    for stop in range(len(path), start, -1):
      if best is not None and stop - start <= len(best):
        break
      if path[start:stop] in params:
        best = path[start:stop]
        break
  return best


def name_state(state, params_info: dict):
  """Wraps every state array that belongs to a named param in an `OptimizerState` with derived names."""
  def one(path, leaf):
    if not hasattr(leaf, "shape"):
      return leaf
    owner = _owner(tuple(path), params_info)
    if owner is None:
      return leaf
    param_shape, names = params_info[owner]
    if names is None:
      return leaf
    return OptimizerState(leaf, out_sharding=state_leaf_names(leaf.shape, param_shape, names),
                          eager_sharding=False)
  return jax.tree_util.tree_map_with_path(one, state)


def _rewrap_like(template, plain):
  """`plain` (an unwrapped tree) put back into `template`'s variables (same structure once unwrapped)."""
  return jax.tree.map(lambda t, p: t.replace(p) if is_variable(t) else p, template, plain, is_leaf=is_variable)


class NamedState(NamedTuple):
  inner: Any


def named(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` running on unwrapped arrays, its state named after the params (see the module docstring)."""

  def init(params):
    info = param_names(params)
    return NamedState(name_state(tx.init(unwrap(params)), info))

  def update(updates, state, params=None):
    info = param_names(params if params is not None else updates)
    plain_params = None if params is None else unwrap(params)
    new_updates, inner = tx.update(unwrap(updates), unwrap(state.inner), plain_params)
    return _rewrap_like(updates, new_updates), NamedState(name_state(inner, info))

  return optax.GradientTransformation(init, update)
