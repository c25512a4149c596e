"""CAME (Luo et al. 2023, "Confidence-guided Adaptive Memory Efficient Optimization") as an optax transformation.

Adafactor keeps the second moment of a matrix as a row and a column vector, which saves memory but makes the
update noisy; CAME adds momentum and a second factored statistic, the "instability" (u_t - m_t)^2 of the clipped
update against its momentum, whose factored inverse square root rescales the momentum: directions where the
update keeps disagreeing with m get a smaller step (the "confidence").

Exactly the authors' algorithm (yangluo7/CAME, `came_pytorch/CAME.py`; the paper's Algorithm 1 with sums written
as means, which is the same v):
    u  = g^2 + eps1
    factored:   r = b2 r + (1-b2) mean_last(u);  c = b2 c + (1-b2) mean_second_last(u)
                u = g / sqrt(r / mean(r) (x) c)
    otherwise:  v = b2 v + (1-b2) u;  u = g / sqrt(v)
    u  = u / max(1, RMS(u) / clip_threshold)
    m  = b1 m + (1-b1) u
    factored:   U = (u - m)^2 + eps2;  R = b3 R + (1-b3) mean_last(U);  C = b3 C + (1-b3) mean_second_last(U)
                direction = m / sqrt(R / mean(R) (x) C)
    otherwise:  direction = m
    update = -learning_rate * (direction + weight_decay * param)
No bias correction anywhere (as the authors). Factoring is over the last two dims, like theirs; the authors factor
every param with >= 2 dims, here a param is factored only when both of its last two dims are
>= `min_dim_size_to_factor` (optax.adafactor's knob; `min_dim_size_to_factor=1` is the authors' rule).

State layout (named by `efficient.optim.axes.named`): `mu` the param's shape; factored rows `v_row`, `r_row` the
param's shape without its last dim, columns `v_col`, `r_col` without its second-last dim; `v` the param's shape
for an unfactored param. Unused slots hold a (1,) placeholder (as optax.adafactor does). All f32.

Non-finite gradients: nothing is raised inside jit; a step with any NaN/inf gradient element returns an all-zero
update and the old state, and the `skipped` int32 leaf of the outer state counts it
(`efficient.optim.lowrank.skip_nonfinite`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from efficient.optim.lowrank import check_float_params, check_positive_int, with_decay_and_lr


class CameState(NamedTuple):
  count: jax.Array   # int32, steps taken
  mu: Any            # momentum of the clipped update, the param's shape
  v_row: Any         # factored second moment: [*shape[:-1]] / placeholder
  v_col: Any         # [*shape[:-2], shape[-1]] / placeholder
  v: Any             # unfactored second moment: the param's shape / placeholder
  r_row: Any         # factored instability (confidence) statistic, as v_row / v_col
  r_col: Any


def _placeholder():
  return jnp.zeros((1,), jnp.float32)


def _approx(row, col):
  """The factored inverse square root rsqrt(row / mean(row) (x) col), as the authors' `_approx_sq_grad`."""
  r_factor = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))[..., None]
  c_factor = jax.lax.rsqrt(col)[..., None, :]
  return r_factor * c_factor


def _rms(x):
  return jnp.sqrt(jnp.mean(x * x))


def scale_by_came(*, b1: float = 0.9, b2: float = 0.999, b3: float = 0.9999, eps=(1e-30, 1e-16),
                  clip_threshold: float = 1.0, min_dim_size_to_factor: int = 128) -> optax.GradientTransformation:
  """CAME's update direction (no learning rate, no weight decay); see the module docstring."""
  for name, beta in (("b1", b1), ("b2", b2), ("b3", b3)):
    if not 0.0 <= beta <= 1.0:
      raise ValueError(f"{name} must lie in [0, 1], got {beta!r}.")
  if not (isinstance(eps, (tuple, list)) and len(eps) == 2 and all(e >= 0 for e in eps)):
    raise ValueError(f"eps must be a pair (eps1, eps2) of non-negative floats, got {eps!r}.")
  if not clip_threshold > 0:
    raise ValueError(f"clip_threshold must be > 0, got {clip_threshold!r}.")
  check_positive_int("min_dim_size_to_factor", min_dim_size_to_factor)
  eps1, eps2 = float(eps[0]), float(eps[1])

  def factored(shape) -> bool:
    return len(shape) >= 2 and min(shape[-2], shape[-1]) >= min_dim_size_to_factor

  def init(params):
    check_float_params(params, "came")

    def slots(p):
      shape = tuple(p.shape)
      if factored(shape):
        row = lambda: jnp.zeros(shape[:-1], jnp.float32)
        col = lambda: jnp.zeros(shape[:-2] + shape[-1:], jnp.float32)
        return row(), col(), _placeholder(), row(), col()
      return _placeholder(), _placeholder(), jnp.zeros(shape, jnp.float32), _placeholder(), _placeholder()

    leaves, treedef = jax.tree.flatten(params)
    columns = list(zip(*[slots(p) for p in leaves])) if leaves else [[]] * 5
    mu = [jnp.zeros(p.shape, jnp.float32) for p in leaves]
    return CameState(jnp.zeros([], jnp.int32), treedef.unflatten(mu), *(treedef.unflatten(list(c)) for c in columns))

  def update(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    old = [treedef.flatten_up_to(x) for x in state[1:]]
    new = [[] for _ in old]
    out = []
    for g, mu, v_row, v_col, v, r_row, r_col in zip(leaves, *old):
      g32 = g.astype(jnp.float32)
      sq = g32 * g32 + eps1
      if factored(g.shape):
        v_row = b2 * v_row + (1.0 - b2) * jnp.mean(sq, axis=-1)
        v_col = b2 * v_col + (1.0 - b2) * jnp.mean(sq, axis=-2)
        u = _approx(v_row, v_col) * g32
      else:
        v = b2 * v + (1.0 - b2) * sq
        u = jax.lax.rsqrt(v) * g32
      u = u / jnp.maximum(_rms(u) / clip_threshold, 1.0)
      mu = b1 * mu + (1.0 - b1) * u
      if factored(g.shape):
        res = (u - mu) ** 2 + eps2
        r_row = b3 * r_row + (1.0 - b3) * jnp.mean(res, axis=-1)
        r_col = b3 * r_col + (1.0 - b3) * jnp.mean(res, axis=-2)
        direction = _approx(r_row, r_col) * mu
      else:
        direction = mu
      out.append(direction.astype(g.dtype))
      for slot, value in zip(new, (mu, v_row, v_col, v, r_row, r_col)):
        slot.append(value)
    count = optax.safe_increment(state.count)
    return treedef.unflatten(out), CameState(count, *(treedef.unflatten(s) for s in new))

  return optax.GradientTransformation(init, update)


def came(learning_rate, *, b1: float = 0.9, b2: float = 0.999, b3: float = 0.9999, eps=(1e-30, 1e-16),
         clip_threshold: float = 1.0, weight_decay: float = 0.0, min_dim_size_to_factor: int = 128,
         mask=None) -> optax.GradientTransformation:
  """CAME (Luo et al. 2023) as an optax transformation; see the module docstring for the exact algorithm.

  learning_rate: float or optax schedule; b1, b2, b3: momentum, second-moment and instability decays; eps:
  (eps1 for g^2, eps2 for the instability); clip_threshold: RMS cap of the preconditioned update; weight_decay /
  mask: decoupled decay as `optax.adamw`; min_dim_size_to_factor: see the module docstring.
  """
  direction = scale_by_came(b1=b1, b2=b2, b3=b3, eps=eps, clip_threshold=clip_threshold,
                            min_dim_size_to_factor=min_dim_size_to_factor)
  return with_decay_and_lr(direction, learning_rate, weight_decay, mask)
