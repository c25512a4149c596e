"""Sparse training: an optax wrapper that keeps pruned weights at exactly zero, optionally with RigL drop/grow.

`sparse_updates(inner, masks, rigl_every=None, drop_fraction=0.3)` wraps any optax optimizer. `masks` is a pytree
with the structure of the parameters holding a 0/1 (or bool) array for every sparse leaf and None for dense ones
(`masks_for(params, {'blocks/0/mlp/gate': mask, ...})` builds it for an nnx Param state). The state keeps the
current masks, so they are checkpointed and sharded with the optimizer state (same shapes as the parameters).
Each step:
- RigL (Evci et al. 2020), every `rigl_every` steps: per sparse matrix, drop the k active weights of smallest
  magnitude and grow the k inactive ones of largest dense-gradient magnitude, k = drop_fraction(step) * active
  (cosine-decayed to 0 at `rigl_end_step`); grown weights start at zero. The active count never changes.
- The inner optimizer sees the gradient with inactive entries zeroed; its update is kept on active entries,
  and inactive entries get `-param` (zero when already pruned; resets weights dropped this step to exactly 0).
So weight decay, momentum or Adam moments can never move a pruned weight. For RigL the model's forward must be
the plain weights (an `Einsum`, zeros where pruned), not `SparseEinsum`'s kernel * mask, whose zero gradient at
inactive entries would leave nothing to grow by.

`sparse_update(inner, trainable)` is the other kind of sparsity (On-Device Training Under 256KB, PockEngine): train
only chosen parameters, or chosen channels of them, and keep the rest frozen. The inner optimizer's state holds
moments only for what trains: trainable channels are gathered into a smaller array, updated there and scattered
back (optax.masked / multi_transform would still allocate full-size moments for a partly trained matrix).
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient import calibration

_is_none = lambda x: x is None


class SparseUpdatesState(NamedTuple):
  inner: Any
  masks: Any
  step: jax.Array


# 'blocks/0/mlp/gate/kernel' of a jax key path (the one spelling every path rule uses).
_path_string = calibration.tree_path_str


def masks_for(params, masks_by_path: Mapping[str, Any]):
  """The masks pytree for `params` (e.g. an nnx Param state): module path 'blocks/0/mlp/gate' -> the mask of its
  'kernel' leaf; None for every other leaf. Raises if a path names no kernel or a mask has the wrong shape."""
  found = set()

  def one(path, leaf):
    name = _path_string(path)
    module = name[:-len("/kernel")] if name.endswith("/kernel") else None
    if module in masks_by_path:
      mask = masks_by_path[module]
      if tuple(mask.shape) != tuple(leaf.shape):
        raise ValueError(f"masks[{module!r}] has shape {tuple(mask.shape)}; its kernel has {tuple(leaf.shape)}.")
      found.add(module)
      return jnp.asarray(mask, leaf.dtype)
    return None

  tree = jax.tree_util.tree_map_with_path(one, params)
  missing = sorted(set(masks_by_path) - found)
  if missing:
    raise ValueError(f"masks_by_path: no parameter 'kernel' at {missing[:3]}.")
  return tree


def rigl_mask(param, grad, mask, drop_fraction):
  """One RigL drop/grow of a 0/1 `mask`: the same number of active entries before and after."""
  active = mask > 0
  count = jnp.sum(active)
  k = jnp.floor(drop_fraction * count).astype(jnp.int32)
  flat = lambda a: a.reshape(-1)
  # Drop: the k active entries of smallest |param| (inactive ones are pushed past every active one).
  drop_score = jnp.where(active, jnp.abs(param), jnp.inf)
  drop_rank = jnp.zeros(param.size, jnp.int32).at[jnp.argsort(flat(drop_score), stable=True)].set(
      jnp.arange(param.size, dtype=jnp.int32))
  keep = active & (drop_rank.reshape(param.shape) >= k)
  # Grow: the k entries inactive before this step with the largest |grad| (dropped ones cannot regrow at once).
  grow_score = jnp.where(active, -jnp.inf, jnp.abs(grad))
  grow_rank = jnp.zeros(param.size, jnp.int32).at[jnp.argsort(-flat(grow_score), stable=True)].set(
      jnp.arange(param.size, dtype=jnp.int32))
  grow = ~active & (grow_rank.reshape(param.shape) < k)
  return (keep | grow).astype(mask.dtype)


def cosine_drop_fraction(drop_fraction: float, end_step: int):
  """RigL's schedule: drop_fraction * (1 + cos(pi * step / end_step)) / 2, then 0."""
  def schedule(step):
    t = jnp.minimum(step / max(end_step, 1), 1.0)
    return jnp.where(step < end_step, drop_fraction * 0.5 * (1 + jnp.cos(jnp.pi * t)), 0.0)
  return schedule


def sparse_updates(inner: optax.GradientTransformation, masks, *, rigl_every: int | None = None,
                   drop_fraction: float = 0.3, rigl_end_step: int | None = None) -> optax.GradientTransformation:
  """Wraps `inner` so that pruned weights stay exactly zero (and, with `rigl_every`, masks evolve by RigL)."""
  if rigl_every is not None and (isinstance(rigl_every, bool) or not isinstance(rigl_every, int) or rigl_every < 1):
    raise ValueError(f"rigl_every={rigl_every!r} must be a positive int (steps between drop/grow) or None.")
  if not 0 <= drop_fraction < 1:
    raise ValueError(f"drop_fraction={drop_fraction!r} must be in [0, 1).")
  schedule = cosine_drop_fraction(drop_fraction, rigl_end_step if rigl_end_step is not None else 2**31 - 1)

  def init(params):
    leaves = jax.tree.leaves(masks, is_leaf=_is_none)
    if not any(leaf is not None for leaf in leaves):
      raise ValueError("masks holds no mask (every leaf is None): nothing is sparse.")
    jax.tree.map(lambda m, p: None if m is None else _check_shape(m, p), masks, params, is_leaf=_is_none)
    return SparseUpdatesState(inner.init(params), masks, jnp.zeros((), jnp.int32))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("sparse_updates needs params (to zero dropped weights): call update(grads, state, params).")
    current = state.masks
    if rigl_every is not None:
      due = (state.step > 0) & (state.step % rigl_every == 0)
      fraction = schedule(state.step)
      regrown = lambda: jax.tree.map(lambda m, p, g: None if m is None else rigl_mask(p, g, m, fraction),
                                     current, params, grads, is_leaf=_is_none)
      # cond, not where: the drop/grow sorts run only on due steps (a where computes them every step).
      current = jax.lax.cond(due, regrown, lambda: current)
    masked_grads = jax.tree.map(lambda m, g: g if m is None else g * m, current, grads, is_leaf=_is_none)
    updates, inner_state = inner.update(masked_grads, state.inner, params)
    updates = jax.tree.map(lambda m, u, p: u if m is None else jnp.where(m > 0, u, -p).astype(u.dtype),
                           current, updates, params, is_leaf=_is_none)
    return updates, SparseUpdatesState(inner_state, current, state.step + 1)

  return optax.GradientTransformation(init, update)


def _check_shape(mask, param):
  if tuple(mask.shape) != tuple(param.shape):
    raise ValueError(f"masks: a mask of shape {tuple(mask.shape)} sits on a parameter of shape {tuple(param.shape)}.")


# --- sparse update: train a subset, optimizer state only for it --------------------------------------------------

class Channels(NamedTuple):
  """The channels of a parameter that train: `indices` along `axis` (default: the last, a kernel's outputs)."""
  indices: Sequence[int]
  axis: int = -1


class SparseUpdateState(NamedTuple):
  inner: Any  # the inner optimizer's state over {path: trainable slice}, nothing else


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _value(leaf):
  return leaf[...] if _is_variable(leaf) else leaf


def _with_value(leaf, value):
  """`value` in `leaf`'s wrapper (an nnx Variable keeps its logical axis names, so sliced moments shard too)."""
  return leaf.replace(value) if _is_variable(leaf) else value


def _trainable_slices(params, trainable: Mapping[str, Any]) -> dict[str, tuple[int, tuple | None]]:
  """{key of `trainable`: (index of its leaf in the flattened params, (axis, int32 indices) or None = whole)}."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)
  names = {_path_string(path): i for i, (path, _) in enumerate(flat)}
  found = {}
  for key, channels in trainable.items():
    position = names.get(key, names.get(f"{key}/kernel"))
    if position is None:
      raise ValueError(f"trainable: no parameter at {key!r} (give a module path like 'blocks/0/mlp/up', meaning "
                       f"its kernel, or a parameter path like 'blocks/0/mlp_norm/scale').")
    if channels is None:
      found[key] = (position, None)
      continue
    if not isinstance(channels, Channels):
      channels = Channels(channels)
    shape = np.shape(_value(flat[position][1]))
    axis = channels.axis
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -len(shape) <= axis < len(shape):
      raise ValueError(f"trainable[{key!r}]: axis={axis!r} is not an axis of a parameter of shape {shape}.")
    axis = int(axis) % len(shape)
    indices = np.asarray(channels.indices)
    if (indices.ndim != 1 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer)
        or indices.min() < 0 or indices.max() >= shape[axis] or len(np.unique(indices)) != indices.size):
      raise ValueError(f"trainable[{key!r}]: channel indices must be distinct ints in [0, {shape[axis]}) "
                       f"(axis {axis} of shape {shape}); got {channels.indices!r}.")
    found[key] = (position, (axis, indices.astype(np.int32)))
  return found


def _gather(leaf, channels):
  return leaf if channels is None else jnp.take(leaf, channels[1], axis=channels[0])


def _scatter(full_like, part, channels):
  """`part` written into zeros shaped like `full_like` (whole, or at the channels)."""
  if channels is None:
    return part.astype(full_like.dtype)
  axis, indices = channels
  where = (slice(None),) * axis + (indices,)
  return jnp.zeros_like(full_like).at[where].set(part.astype(full_like.dtype))


def trainable_subset(params, trainable: Mapping[str, Any]) -> dict:
  """{key: the trainable slice of its parameter} (nnx Variables keep their metadata): what the inner optimizer
  sees, and what training the subset alone would optimize."""
  flat = jax.tree.leaves(params, is_leaf=_is_variable)
  return {key: _with_value(flat[i], _gather(_value(flat[i]), channels))
          for key, (i, channels) in _trainable_slices(params, trainable).items()}


def sparse_update(inner: optax.GradientTransformation, trainable: Mapping[str, Any]) -> optax.GradientTransformation:
  """Trains only `trainable` ({path: None for the whole parameter, or channel indices / `Channels(indices, axis)`});
  every other parameter gets a zero update. The state is `inner`'s over the trainable slices only."""
  if not trainable:
    raise ValueError("trainable is empty: name at least one parameter (path -> None or channel indices).")

  def init(params):
    return SparseUpdateState(inner.init(trainable_subset(params, trainable)))

  def update(grads, state, params=None):
    slices = _trainable_slices(grads, trainable)
    flat, treedef = jax.tree.flatten(grads, is_leaf=_is_variable)
    sub_grads = {key: _with_value(flat[i], _gather(_value(flat[i]), channels)) for key, (i, channels) in slices.items()}
    sub_params = None if params is None else trainable_subset(params, trainable)
    sub_updates, inner_state = inner.update(sub_grads, state.inner, sub_params)
    updates = [_with_value(leaf, jnp.zeros_like(_value(leaf))) for leaf in flat]
    for key, (i, channels) in slices.items():
      updates[i] = _with_value(flat[i], _scatter(_value(flat[i]), _value(sub_updates[key]), channels))
    return jax.tree.unflatten(treedef, updates), SparseUpdateState(inner_state)

  return optax.GradientTransformation(init, update)

