"""MeZO: zeroth-order training with two forward passes and no stored noise (Malladi et al. 2023).

"Fine-Tuning Language Models with Just Forward Passes" estimates the gradient by SPSA along one random direction
z ~ N(0, I) per step:

    projected_grad = (L(theta + eps z) - L(theta - eps z)) / (2 eps)      (a scalar: z . grad L + O(eps^2))
    theta <- theta - lr * (projected_grad * z + weight_decay * theta)

E_z[(z . g) z] = g, so the update is an unbiased (for eps -> 0) estimate of an SGD step. The point is memory: no
backward pass (no saved activations, no gradient tree) and, with the *seed trick*, no stored z either. z is
regenerated from the step's key whenever it is needed, leaf by leaf and chunk by chunk: leaf i (its position in
`jax.tree.leaves(axes.unwrap(params))`), flattened row-major, is cut into chunks of `chunk_size` elements and chunk c
gets `jax.random.normal(fold_in(fold_in(step_key, i), c), (chunk size,), float32)`, where
`step_key = jax.random.fold_in(key, step)` (`step_key` and `perturbation` below expose exactly this, for tests
and for replaying an update from (key, step, projected_grad) alone, as the paper does).

One step, as in the paper's Algorithm 1, in place:

    theta += eps z;      l+ = L(theta)
    theta -= 2 eps z;    l- = L(theta)
    theta += eps z       (restore; fused with the update below, one regeneration of z)
    theta -= lr * (projected_grad * z + weight_decay * theta)

Functionally (JAX) "in place" is up to XLA, so the step is written to let it: the three passes are one
`fori_loop` whose carry is the parameter tree (each pass overwrites the carried buffers; the forward of a pass
reads them before the next pass starts, and the third pass skips the forward in a `lax.cond`), every pass over a
leaf is itself a loop of dynamic-update-slices over `chunk_size`-element chunks (only one chunk of noise -- not
a z tree, not even a z leaf -- is alive at a time), and `make_mezo_step` donates the params so the carry lives in
the input buffers. One loop also means the forward and each leaf's noise generation are compiled once, not
three times. Measured on XLA:CPU (chunk_size 65536): the compiled step's temp bytes are the forward's plus
~1.6 MB of noise and keys, the same for 2 MB and 9 MB of params (three unrolled passes without a data
dependency between them let XLA CSE the three noise computations into one z tree and copy the whole parameter
tree before each in-place pass; `jax.lax.optimization_barrier` did not prevent it on XLA:CPU).
Caveat: chunks are slices of a flattened leaf, so under a sharded mesh XLA may gather a leaf to perturb it
(results stay exact; the memory claim is for one device).

The restore is exact up to f32 rounding: fl(2 eps z) = 2 fl(eps z) exactly, so theta + eps z - 2 eps z + eps z
differs from theta by at most a couple of ulps of |theta| + eps |z| (~1e-7 relative). Params in a narrower
dtype (bf16) are perturbed in f32 and rounded back to their dtype after each of the three passes, so there the
restore is exact only to that dtype's rounding.

Optimizer state: none. The only state is the base key and the step counter, which the caller holds (8 bytes
for a threefry key + the step), so MeZO's optimizer-state bytes are 0 (`efficient.optim.memory.state_bytes`
of its state, the empty tuple, is 0).

Non-finite losses: if l+, l- or the projected gradient is not finite (or the scheduled learning rate), the
step raises nothing inside jit; it returns the restored params (the input up to the rounding above) with no
update applied and `metrics['finite'] = False`. The check is on those scalars only: checking every updated
element would keep the old and the new tree alive together (twice the parameter memory).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from efficient.optim.axes import is_variable, unwrap

Schedule = Callable[[Any], Any]


def _rewrap(template, plain):
  """`plain` (unwrapped leaves) put back into `template`'s nnx Variables; a plain template is returned as is."""
  return jax.tree.map(lambda t, p: t.replace(p) if is_variable(t) else p, template, plain, is_leaf=is_variable)


def _as_key(key):
  """A typed PRNG key from a typed key, a raw uint32[2] key, or an integer seed."""
  if isinstance(key, bool) or key is None:
    raise ValueError(f"key must be a jax PRNG key or an integer seed, got {key!r}.")
  if isinstance(key, numbers.Integral):
    return jax.random.key(int(key))
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key must be a single PRNG key (shape ()), got shape {key.shape}.")
    return key
  if dtype is not None and jnp.issubdtype(dtype, jnp.integer):
    if key.shape == ():
      return jax.random.key(key)
    if key.shape == (2,) and jnp.dtype(dtype) == jnp.uint32:
      return jax.random.wrap_key_data(key)
  raise ValueError(f"key must be a jax PRNG key, a raw uint32[2] key or an integer seed, got "
                   f"{getattr(key, 'dtype', type(key).__name__)}{getattr(key, 'shape', '')}.")


def step_key(key, step):
  """The key of step `step`: `jax.random.fold_in(key, step)` (key: a PRNG key or an integer seed)."""
  return jax.random.fold_in(_as_key(key), step)


CHUNK = 1 << 16  # default chunk_size: elements of a leaf perturbed per loop iteration


def _chunk_counts(leaves, chunk_size: int) -> list[int]:
  return [max(1, -(-int(np.prod(jnp.shape(leaf))) // chunk_size)) for leaf in leaves]


def _chunk_keys(key, leaves, chunk_size: int):
  """Keys of every chunk of every leaf in order (chunk c of leaf i: fold_in(fold_in(key, i), c)) and the offset of
  each leaf's first chunk. One vmapped derivation for the whole tree: a separate fold_in per leaf and chunk
  compiles to its own threefry loop on XLA:CPU (seconds of compile time even for a small model)."""
  counts = _chunk_counts(leaves, chunk_size)
  leaf_index = np.repeat(np.arange(len(leaves)), counts).astype(np.uint32)
  chunk_index = np.concatenate([np.arange(n) for n in counts]).astype(np.uint32)
  keys = jax.vmap(lambda i, c: jax.random.fold_in(jax.random.fold_in(key, i), c))(leaf_index, chunk_index)
  return keys, np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int), counts


def _noise(chunk_key, size: int):
  return jax.random.normal(chunk_key, (size,), jnp.float32)


def perturbation(key, params, *, chunk_size: int = CHUNK):
  """The direction z of a step: a tree like `params` (unwrapped) of f32 N(0, 1) arrays. Leaf i (its position in
  `jax.tree.leaves`) is split flat (row-major) into chunks of `chunk_size` elements (the last one shorter),
  chunk c drawn as `jax.random.normal(fold_in(fold_in(key, i), c), (its size,), float32)`. `key` is the step's
  key (`step_key(base_key, step)`). For tests and replay only: the step never materializes this tree."""
  chunk_size = _check_chunk_size(chunk_size)
  leaves, treedef = jax.tree.flatten(unwrap(params))
  out = []
  for i, leaf in enumerate(leaves):
    size = int(np.prod(jnp.shape(leaf)))
    chunks = [_noise(jax.random.fold_in(jax.random.fold_in(key, i), c), min(chunk_size, size - c * chunk_size))
              for c in range(_chunk_counts([leaf], chunk_size)[0])]
    out.append(jnp.concatenate(chunks).reshape(jnp.shape(leaf)))
  return treedef.unflatten(out)


def _map_chunks(leaf, keys, fn, chunk_size: int):
  """`fn(x_f32, z) -> new x_f32` applied in place to the leaf's flat chunks, chunk c with noise from keys[c]: a
  loop of dynamic-update-slices, so XLA writes each chunk back into the loop-carried buffer and only one chunk
  of noise is alive at a time. The result is rounded to the leaf's dtype."""
  flat = leaf.reshape(-1)
  size = flat.shape[0]
  if size <= chunk_size:
    return fn(flat.astype(jnp.float32), _noise(keys[0], size)).astype(flat.dtype).reshape(leaf.shape)

  def one(flat, c, start, length):
    x = jax.lax.dynamic_slice(flat, (start,), (length,)).astype(jnp.float32)
    return jax.lax.dynamic_update_slice(flat, fn(x, _noise(keys[c], length)).astype(flat.dtype), (start,))

  full, tail = divmod(size, chunk_size)
  flat = jax.lax.fori_loop(0, full, lambda c, flat: one(flat, c, c * chunk_size, chunk_size), flat)
  if tail:
    flat = one(flat, full, full * chunk_size, tail)
  return flat.reshape(leaf.shape)


def _map_leaves(leaves, chunk_keys, fn_of_leaf, chunk_size: int):
  """Every leaf through `_map_chunks` with its chunks' keys (`_chunk_keys`); fn_of_leaf(i, leaf) -> the chunk fn."""
  keys, offsets, counts = chunk_keys
  return [_map_chunks(leaf, keys[offsets[i]:offsets[i] + counts[i]], fn_of_leaf(i, leaf), chunk_size)
          for i, leaf in enumerate(leaves)]


def _check_chunk_size(chunk_size) -> int:
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
  return int(chunk_size)


def _check_params(leaves, paths) -> None:
  if not leaves:
    raise ValueError("params holds no arrays: MeZO needs at least one floating-point parameter.")
  for path, leaf in zip(paths, leaves):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"params{jax.tree_util.keystr(path)} has dtype {dtype}: MeZO perturbs real floating-point "
                       f"parameters only (integer and complex leaves are refused).")


def _check_positive(name: str, value, *, allow_zero: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}.")
  if value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}.")
  return float(value)


def _check_learning_rate(learning_rate):
  if callable(learning_rate):
    return learning_rate
  return _check_positive("learning_rate", learning_rate)


def _decay_flags(weight_decay_mask, plain, count: int) -> list[bool]:
  if weight_decay_mask is None:
    return [True] * count
  mask = weight_decay_mask(plain) if callable(weight_decay_mask) else weight_decay_mask
  flags = jax.tree.leaves(mask)
  if len(flags) != count:
    raise ValueError(f"weight_decay_mask has {len(flags)} leaves but params has {count}: it must be a tree of "
                     f"Python bools shaped like params (or a function of the params returning one).")
  try:
    return [bool(np.asarray(flag)) for flag in flags]
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    raise ValueError("weight_decay_mask must hold static Python bools (e.g. p.ndim >= 2), not traced values.")


def _loss_and_aux(loss_fn, params, batch, has_aux: bool):
  out = loss_fn(params, batch)
  loss, aux = out if has_aux else (out, None)
  loss = jnp.asarray(loss)
  if loss.shape != ():
    raise ValueError(f"loss_fn must return a scalar loss{' (and aux)' if has_aux else ''}, got shape {loss.shape}.")
  return loss.astype(jnp.float32), aux


def _mezo(loss_fn, params, batch, key, step, learning_rate, eps: float, weight_decay: float, weight_decay_mask,
          has_aux: bool, chunk_size: int):
  plain = unwrap(params)
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(plain)
  paths = [path for path, _ in paths_and_leaves]
  leaves = [leaf for _, leaf in paths_and_leaves]
  _check_params(leaves, paths)
  decay = _decay_flags(weight_decay_mask, plain, len(leaves))
  as_params = lambda new_leaves: _rewrap(params, treedef.unflatten(new_leaves))
  chunk_keys = _chunk_keys(step_key(key, step), leaves, chunk_size)
  lr = jnp.asarray(learning_rate(step) if callable(learning_rate) else learning_rate, jnp.float32)
  forward = lambda leaves: _loss_and_aux(loss_fn, as_params(leaves), batch, has_aux)
  aux_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(forward, leaves)[1])
  # Pass k of 3 adds scales[k] * z; the last one also applies the update. One loop, so the forward and each
  # leaf's noise generation are compiled once, and the carried params are updated in place pass after pass.
  scales = jnp.asarray([eps, -2.0 * eps, eps], jnp.float32)

  def summary(losses):
    projected_grad = (losses[0] - losses[1]) / jnp.float32(2.0 * eps)
    finite = jnp.isfinite(losses[0]) & jnp.isfinite(losses[1]) & jnp.isfinite(projected_grad) & jnp.isfinite(lr)
    return projected_grad, finite

  def one_pass(k, carry):
    leaves, losses, aux = carry
    projected_grad, finite = summary(losses)
    apply = (k == 2) & finite  # a non-finite step only restores: both coefficients 0 (selected: no 0 * inf)
    grad_coef = jnp.where(apply, lr * projected_grad, 0.0)
    decay_coef = jnp.where(apply, lr * jnp.float32(weight_decay), 0.0)
    scale = scales[k]

    def fn_of_leaf(i, leaf):
      decays = decay[i] and weight_decay > 0
      round_trip = jnp.dtype(leaf.dtype) != jnp.float32

      def fn(x, z):
        shifted = x + scale * z
        if round_trip:  # each pass rounds to the param dtype, the restore too, as separate passes would
          shifted = shifted.astype(leaf.dtype).astype(jnp.float32)
        return shifted - (grad_coef * z + (decay_coef * shifted if decays else 0.0))
      return fn

    leaves = _map_leaves(leaves, chunk_keys, fn_of_leaf, chunk_size)
    loss, new_aux = jax.lax.cond(k == 2, lambda leaves: (jnp.float32(jnp.nan), aux_zeros), forward, leaves)
    aux = jax.tree.map(lambda new, old: jnp.where(k == 0, new, old), new_aux, aux)
    return leaves, losses.at[k].set(loss), aux

  carry = (leaves, jnp.zeros(3, jnp.float32), aux_zeros)
  leaves, losses, aux = jax.lax.fori_loop(0, 3, one_pass, carry)
  projected_grad, finite = summary(losses)
  metrics = {"loss": 0.5 * (losses[0] + losses[1]), "loss_plus": losses[0], "loss_minus": losses[1],
             "projected_grad": projected_grad, "lr": lr, "finite": finite}
  if has_aux:
    metrics["aux"] = aux
  return as_params(leaves), metrics


def _check_settings(loss_fn, learning_rate, eps, weight_decay, chunk_size, has_aux):
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be callable, got {loss_fn!r}.")
  if not isinstance(has_aux, bool):
    raise ValueError(f"has_aux must be a bool, got {has_aux!r}.")
  return (_check_learning_rate(learning_rate), _check_positive("eps", eps),
          _check_positive("weight_decay", weight_decay, allow_zero=True), _check_chunk_size(chunk_size))


def mezo_step(loss_fn: Callable, params, batch, *, key, step, learning_rate: float | Schedule, eps: float = 1e-3,
              weight_decay: float = 0.0, weight_decay_mask=None, has_aux: bool = False, chunk_size: int = CHUNK):
  """One MeZO step (see the module docstring) -> (new params, metrics).

  loss_fn(params, batch) -> scalar loss (or (loss, aux) with has_aux); params: a pytree of floating arrays or an
  nnx.State of Variables (the new params come back in the same Variables). key: the base PRNG key or an integer
  seed; step: int (Python or traced) -- z of this step is `perturbation(step_key(key, step), params,
  chunk_size=chunk_size)`. learning_rate: a float or an optax schedule of `step`. weight_decay_mask: optional
  tree of Python bools like params, or a function of the (unwrapped) params returning one; decay where True.
  chunk_size: elements per in-place pass over a leaf (bounds the noise temporaries; part of z's definition).
  metrics: 'loss' (mean of the two), 'loss_plus', 'loss_minus', 'projected_grad', 'lr', 'finite' (+ 'aux', that
  of the +eps pass). Works under jit; `make_mezo_step` builds the jitted, donating version.
  """
  learning_rate, eps, weight_decay, chunk_size = _check_settings(loss_fn, learning_rate, eps, weight_decay,
                                                                 chunk_size, has_aux)
  if isinstance(step, bool) or not (isinstance(step, numbers.Integral) or hasattr(step, "dtype")):
    raise ValueError(f"step must be an integer, got {step!r}.")
  if isinstance(step, numbers.Integral) and step < 0:
    raise ValueError(f"step must be >= 0, got {step}.")
  return _mezo(loss_fn, params, batch, key, step, learning_rate, eps, weight_decay, weight_decay_mask, has_aux,
               chunk_size)


def make_mezo_step(loss_fn: Callable, *, learning_rate: float | Schedule, eps: float = 1e-3,
                   weight_decay: float = 0.0, weight_decay_mask=None, has_aux: bool = False,
                   chunk_size: int = CHUNK) -> Callable:
  """jit(params, batch, key, step) -> (params, metrics): `mezo_step` with these settings, params donated.

  Arguments are checked here (ValueError naming the argument). The caller must use the returned params: the
  input buffers are reused for them, so the step runs at inference-level memory (params + one forward + one
  chunk of noise; see the module docstring).
  """
  learning_rate, eps, weight_decay, chunk_size = _check_settings(loss_fn, learning_rate, eps, weight_decay,
                                                                 chunk_size, has_aux)

  def step_fn(params, batch, key, step):
    return mezo_step(loss_fn, params, batch, key=key, step=step, learning_rate=learning_rate, eps=eps,
                     weight_decay=weight_decay, weight_decay_mask=weight_decay_mask, has_aux=has_aux,
                     chunk_size=chunk_size)

  return jax.jit(step_fn, donate_argnums=0)
