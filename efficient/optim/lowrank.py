"""Low-rank optimizers as optax transformations: GaLore and APOLLO / APOLLO-Mini.

Both keep Adam's moments in a rank-r space instead of the parameter's, so a matrix [a, b] with a < b stores
moments [r, b] (2rb floats, not 2ab). They differ in what the low-rank moments are used for:

- **GaLore** (Zhao et al. 2024, "Gradient Low-Rank Projection"): the gradient G is projected on its top-r
  singular vectors, P = U[:, :r] (left, R = P^T G) or Vh[:r] (right, R = G Vh[:r]^T), refreshed by an SVD of the
  current gradient every `update_proj_gap` steps (step 0 included); Adam runs on R and its normalized output N is
  projected back (P N or N Vh[:r]) and multiplied by `scale` (the paper's alpha = 0.25). The moments are kept
  unchanged across a refresh (as the authors' code does). The projector is stored.
- **APOLLO** (Zhu et al. 2024, "SGD-like memory, AdamW-level performance"): the projection is a random Gaussian
  P / sqrt(r), regenerated every `update_proj_gap` steps; Adam's normalized low-rank output N = m / (sqrt(v) + eps)
  is used only to estimate a per-channel scale s_j = ||N_j|| / ||R_j|| (or one tensor-wise scale), which is
  applied to the RAW full-rank gradient: update = G * s. A norm-growth limiter (Fira, gamma = 1.01) caps
  ||update_t|| at gamma * ||update_{t-1}||. APOLLO-Mini is rank 1 with a tensor-wise scale and alpha = sqrt(128):
  its state per matrix is two vectors of max(a, b) floats and one scalar, i.e. SGD-like memory.

Exactness (checked against the authors' code: jiaweizzhao/GaLore `galore_projector.py` + `adamw.py`, and
zhuhanqing/APOLLO `apollo_torch/apollo.py` + `random_projector.py`):
- projection side ("std"): rows >= cols -> right projection (the projector is [r, cols]), else left ([rows, r]),
  so the projector is on the smaller dimension and the moments are [r, larger]. (The GaLore paper states the
  rows <= cols case WLOG; its code sends a square matrix to the right projection, and so do we.)
- Adam in the projected space is the authors' (transformers-style) AdamW: N = m / (sqrt(v) + eps), the step
  multiplied by sqrt(1 - b2^t) / (1 - b1^t); eps defaults to their 1e-6. APOLLO's scale is computed from this
  uncorrected N, exactly as in their code (s_j = ||N_j|| / (||R_j|| + 1e-8)) and the limiter acts before the
  bias-correction factor, as theirs does.
- decoupled weight decay is optax's (-lr * wd * p of the OLD p, `optax.add_decayed_weights`); the authors
  decay the already-updated p, a difference of order lr^2 * wd.
- the random projection is not stored: it is regenerated every step from (seed, step // gap) with `jax.random`
  (`apollo_projections`: one draw cut into every param's projection, in leaf order), which costs no memory and
  is identical on every device and sharding. The authors store it and draw a fresh seed per refresh; the
  distribution (N(0, 1) / sqrt(r)) is theirs.
- APOLLO's `scale` is the multiplier alpha itself; the authors' `--apollo_scale s` multiplies by sqrt(s), so
  their `--apollo_scale 128` for APOLLO-Mini is our `scale=sqrt(128)` (the paper's alpha).
- the rank is clipped to min(rows, cols): a larger one stores more than Adam and (for GaLore) the SVD has no
  more vectors.

optax 0.2.8's `optax.contrib.galore` was checked against the paper and code and is NOT wrapped: it projects the
LARGER dimension (`use_left = rows >= cols`, so a [64, 128] gradient gets a right projector [128, r] and
moments [64, r]; the paper and its code use a left projector [64, r] and moments [r, 128]), which changes the
coordinates Adam normalizes in and hence the update from step 1 on (after one step the rank-r reconstruction
coincides, the normalization does not). Its other choices agree with the paper's code (SVD at step 0 and every
gap steps, moments kept across refreshes, scale on the projected-back update, only 2-D params projected), but its
default scale is 1.0 (paper: 0.25), its Adam puts eps after the bias correction, and its SVD signs are whatever
LAPACK returns (which can flip between a sharded and an unsharded run). Here singular vectors get a fixed sign
(the entry of largest magnitude of each vector is positive), so a sharded run equals the single-device one.

Which params are projected: `matrix_split(path, shape) -> k | None` views a param as the matrix
[prod(shape[:k]), prod(shape[k:])]; the default projects 2-D params only (k = 1), everything else (norm scales,
3-D attention kernels unless a split is given) runs plain AdamW; `squarest_matrix_split` projects every param
with >= 2 dims as its most square matrix view. Use `optax.multi_transform` or `optax.masked`
to exclude e.g. embeddings, as the papers do.

State layouts (named by `efficient.optim.axes.named`): moments [r, cols] / [rows, r] of a projected param (their
dims that match a param dim in size get its names) or the param's shape; the GaLore projector [rows, r] /
[r, cols]; a (1,) placeholder where a param has no projector; APOLLO's limiter norm is one f32 scalar per param.
All moments are f32 whatever the param dtype; updates come back in the gradient's dtype.

Non-finite gradients: nothing is raised inside jit; a step whose gradients contain any NaN/inf returns an all-zero
update and the OLD state unchanged (an SVD of a NaN gradient never reaches the projector), and the outer state's
`skipped` int32 leaf counts such steps (`skip_nonfinite`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

MatrixSplit = Callable[[str, tuple], "int | None"]
# The Fira / APOLLO norm-growth limiter's gamma.
NORM_GROWTH_LIMIT = 1.01
# The authors' guard in the APOLLO scale ||N_j|| / (||R_j|| + 1e-8) and in the limiter.
_TINY = 1e-8


# --- shared helpers (also used by efficient.optim.came) ---------------------------------------------------------
def check_positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  return value


def check_float_params(params, who: str) -> None:
  """ValueError naming `params` and the leaf's path for an integer / complex / bool parameter."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = jnp.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{who}: params must be real floating point; params{jax.tree_util.keystr(path)} has "
                       f"dtype {dtype}.")


class SkipState(NamedTuple):
  """State of `skip_nonfinite`: the wrapped transformation's state and the count of skipped steps."""
  inner: Any
  skipped: jax.Array


def skip_nonfinite(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx`, except that a step with any non-finite gradient element returns zeros and the old state."""

  def init(params):
    return SkipState(tx.init(params), jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    finite = jnp.asarray(True)
    for g in jax.tree.leaves(updates):
      finite = finite & jnp.all(jnp.isfinite(g))

    def skip(updates, inner, params):
      shapes = jax.eval_shape(tx.update, updates, inner, params)[0]   # zeros of the update's own dtypes
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), inner

    # A cond, not a select: the update is neither computed nor compiled twice, and a bad step costs nothing.
    new_updates, inner = jax.lax.cond(finite, tx.update, skip, updates, state.inner, params)
    return new_updates, SkipState(inner, state.skipped + (~finite).astype(jnp.int32))

  return optax.GradientTransformation(init, update)


def with_decay_and_lr(direction: optax.GradientTransformation, learning_rate, weight_decay: float,
                      mask) -> optax.GradientTransformation:
  """direction -> optax's decoupled weight decay -> -learning_rate (float or schedule), non-finite steps skipped.
  With weight_decay == 0 the decay stage is the identity, so `update` needs no params (as optax.adam)."""
  decay = optax.add_decayed_weights(weight_decay, mask) if weight_decay != 0 else optax.identity()
  return skip_nonfinite(optax.chain(direction, decay, optax.scale_by_learning_rate(learning_rate)))


# --- matrix views --------------------------------------------------------------------------------------------------
def default_matrix_split(path: str, shape: tuple) -> int | None:
  """Project 2-D params (as the matrix they are); leave every other param to plain AdamW."""
  del path
  return 1 if len(shape) == 2 else None


def squarest_matrix_split(path: str, shape: tuple) -> int | None:
  """Project every param with >= 2 dims, viewed as the most square matrix [prod(shape[:k]), prod(shape[k:])]
  (ties: the smallest k): a 3-D attention kernel [embed, heads, head_dim] -> [embed, heads*head_dim], an output
  kernel [heads, head_dim, embed] -> [heads*head_dim, embed]. 1-D params are left to plain AdamW."""
  del path
  if len(shape) < 2 or 0 in shape:
    return None
  return min(range(1, len(shape)), key=lambda k: abs(math.log(math.prod(shape[:k]) / math.prod(shape[k:]))))


class MatrixView(NamedTuple):
  rows: int
  cols: int
  left: bool   # left projection P^T G (P [rows, r]) when rows < cols, else right G P^T (P [r, cols])
  rank: int    # min(rank, rows, cols)

  @property
  def projector_shape(self) -> tuple[int, int]:
    return (self.rows, self.rank) if self.left else (self.rank, self.cols)

  @property
  def low_rank_shape(self) -> tuple[int, int]:
    return (self.rank, self.cols) if self.left else (self.rows, self.rank)

  def project(self, g2, p):
    return p.T @ g2 if self.left else g2 @ p.T

  def project_back(self, n, p):
    return p @ n if self.left else n @ p


def matrix_view(shape: tuple, split: int | None, rank: int) -> MatrixView | None:
  if split is None:
    return None
  if not 1 <= split < len(shape):
    raise ValueError(f"matrix_split returned {split} for a param of shape {shape}; it must be in [1, ndim).")
  rows, cols = math.prod(shape[:split]), math.prod(shape[split:])
  return MatrixView(rows, cols, rows < cols, min(rank, rows, cols))


def _views(tree, matrix_split: MatrixSplit, rank: int) -> list:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [matrix_view(tuple(leaf.shape), matrix_split(jax.tree_util.keystr(path), tuple(leaf.shape)), rank)
          for path, leaf in leaves]


def _zero_moments(params, split: MatrixSplit, rank: int):
  """(views, leaves, treedef, make) where make() builds f32 zero moments: low-rank for projected params."""
  views = _views(params, split, rank)
  leaves, treedef = jax.tree.flatten(params)

  def make():
    return treedef.unflatten([jnp.zeros(v.low_rank_shape if v else p.shape, jnp.float32)
                              for p, v in zip(leaves, views)])
  return views, leaves, treedef, make


def _per_leaf_state(updates, split: MatrixSplit, rank: int, *trees):
  """(leaves, treedef, views, [each tree flattened up to the updates' leaves]) for a per-leaf update loop."""
  leaves, treedef = jax.tree.flatten(updates)
  return leaves, treedef, _views(updates, split, rank), [treedef.flatten_up_to(t) for t in trees]


def _unzip_trees(treedef, per_leaf: list[tuple]) -> list:
  """[(a, b, ...) per leaf] -> [tree of a's, tree of b's, ...] (each unflattened with `treedef`)."""
  if not per_leaf:
    return [treedef.unflatten([])] * 4
  return [treedef.unflatten(list(column)) for column in zip(*per_leaf)]


def _bias_correction(count_inc, b1: float, b2: float):
  """The authors' step-size factor sqrt(1 - b2^t) / (1 - b1^t) at t = count_inc."""
  t = count_inc.astype(jnp.float32)
  return jnp.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)


def _adam_moments(r, m, v, b1: float, b2: float, eps: float):
  m = b1 * m + (1.0 - b1) * r
  v = b2 * v + (1.0 - b2) * r * r
  return m, v, m / (jnp.sqrt(v) + eps)


def _check_common(rank: int, update_proj_gap: int, b1: float, b2: float, eps: float) -> None:
  check_positive_int("rank", rank)
  check_positive_int("update_proj_gap", update_proj_gap)
  for name, beta in (("b1", b1), ("b2", b2)):
    if not 0.0 <= beta < 1.0:
      raise ValueError(f"{name} must lie in [0, 1), got {beta!r}.")
  if not eps >= 0.0:
    raise ValueError(f"eps must be >= 0, got {eps!r}.")


# --- GaLore --------------------------------------------------------------------------------------------------------
class GaLoreState(NamedTuple):
  count: jax.Array      # int32, steps taken
  mu: Any               # per param: [r, cols] / [rows, r] (projected) or the param's shape; f32
  nu: Any
  projector: Any        # per param: U[:, :r] [rows, r] / Vh[:r] [r, cols] (f32), or a (1,) placeholder


def svd_projector(g2, view: MatrixView):
  """Top-`view.rank` singular vectors of g2 (f32) with a fixed sign: each vector's largest-|.| entry positive."""
  u, _, vh = jnp.linalg.svd(g2.astype(jnp.float32), full_matrices=False)
  if view.left:
    p = u[:, :view.rank]
    pivot = jnp.take_along_axis(p, jnp.argmax(jnp.abs(p), axis=0)[None, :], axis=0)
    return p * jnp.where(pivot < 0, -1.0, 1.0)
  p = vh[:view.rank, :]
  pivot = jnp.take_along_axis(p, jnp.argmax(jnp.abs(p), axis=1)[:, None], axis=1)
  return p * jnp.where(pivot < 0, -1.0, 1.0)


def scale_by_galore(*, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, b1: float = 0.9,
                    b2: float = 0.999, eps: float = 1e-6,
                    matrix_split: MatrixSplit | None = None) -> optax.GradientTransformation:
  """GaLore's update direction (no learning rate, no decay); see the module docstring."""
  _check_common(rank, update_proj_gap, b1, b2, eps)
  split = default_matrix_split if matrix_split is None else matrix_split

  def init(params):
    check_float_params(params, "galore")
    views, leaves, treedef, moments = _zero_moments(params, split, rank)
    proj = [jnp.zeros(v.projector_shape if v else (1,), jnp.float32) for v in views]
    return GaLoreState(jnp.zeros([], jnp.int32), moments(), moments(), treedef.unflatten(proj))

  def update(updates, state, params=None):
    del params
    leaves, treedef, views, (mus, nus, projs) = _per_leaf_state(updates, split, rank, state.mu, state.nu,
                                                                state.projector)
    count_inc = optax.safe_increment(state.count)
    refresh = state.count % update_proj_gap == 0
    step = _bias_correction(count_inc, b1, b2)
    per_leaf = []  # (direction, mu, nu, projector) of each leaf
    for g, m, v, p, view in zip(leaves, mus, nus, projs, views):
      g32 = g.astype(jnp.float32)
      if view is None:
        m, v, n = _adam_moments(g32, m, v, b1, b2, eps)
        direction = step * n
      else:
        g2 = g32.reshape(view.rows, view.cols)
        p = jax.lax.cond(refresh, lambda g2=g2, view=view: svd_projector(g2, view), lambda p=p: p)
        m, v, n = _adam_moments(view.project(g2, p), m, v, b1, b2, eps)
        direction = (step * scale) * view.project_back(n, p).reshape(g.shape)
      per_leaf.append((direction.astype(g.dtype), m, v, p))
    out, new_mu, new_nu, new_proj = _unzip_trees(treedef, per_leaf)
    return out, GaLoreState(count_inc, new_mu, new_nu, new_proj)

  return optax.GradientTransformation(init, update)


def galore(learning_rate, *, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, b1: float = 0.9,
           b2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0, mask=None,
           matrix_split: MatrixSplit | None = None) -> optax.GradientTransformation:
  """GaLore-AdamW (Zhao et al. 2024) as an optax transformation: low-rank Adam on SVD-projected gradients of the
  params `matrix_split` selects (2-D by default), plain AdamW elsewhere. Our own implementation, not a wrapper of
  `optax.contrib.galore`, which projects the other side (see the module docstring for what was checked).

  learning_rate: float or optax schedule; rank, update_proj_gap: integers >= 1; scale: the paper's alpha;
  weight_decay / mask: decoupled decay as `optax.adamw`. Non-finite gradients skip the step (module docstring).
  """
  return with_decay_and_lr(scale_by_galore(rank=rank, update_proj_gap=update_proj_gap, scale=scale, b1=b1, b2=b2,
                                           eps=eps, matrix_split=matrix_split), learning_rate, weight_decay, mask)


# --- APOLLO --------------------------------------------------------------------------------------------------------
class ApolloState(NamedTuple):
  count: jax.Array      # int32, steps taken
  mu: Any               # per param: [r, cols] / [rows, r] (projected) or the param's shape; f32
  nu: Any
  last_norm: Any        # per param: f32 scalar, ||update|| of the previous step (the norm-growth limiter)


def apollo_projections(seed: int, refresh: Any, views: list) -> list:
  """The random projections APOLLO uses in refresh window `refresh` (= step // update_proj_gap): for each
  projected view (None entries give None) N(0, 1) / sqrt(r) of `view.projector_shape`. All are cut, in leaf
  order, from ONE normal draw of key(seed) folded with `refresh` (one PRNG computation per step, not one per
  param, which also keeps compile time down)."""
  sizes = [math.prod(v.projector_shape) if v is not None else 0 for v in views]
  if not any(sizes):
    return [None] * len(views)
  flat = jax.random.normal(jax.random.fold_in(jax.random.key(seed), refresh), (sum(sizes),), jnp.float32)
  out, offset = [], 0
  for view, size in zip(views, sizes):
    out.append(None if view is None else flat[offset:offset + size].reshape(view.projector_shape)
               / math.sqrt(view.rank))
    offset += size
  return out


def scale_by_apollo(*, rank: int = 256, update_proj_gap: int = 200, scale: float = 1.0, proj: str = "random",
                    scale_type: str = "channel", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                    seed: int = 0, norm_growth_limit: float | None = NORM_GROWTH_LIMIT,
                    matrix_split: MatrixSplit | None = None) -> optax.GradientTransformation:
  """APOLLO's update direction (no learning rate, no decay); see the module docstring."""
  _check_common(rank, update_proj_gap, b1, b2, eps)
  if proj != "random":
    raise ValueError(f"proj must be 'random' (APOLLO's projection; for SVD projections use galore), got {proj!r}.")
  if scale_type not in ("channel", "tensor"):
    raise ValueError(f"scale_type must be 'channel' or 'tensor', got {scale_type!r}.")
  if norm_growth_limit is not None and not norm_growth_limit >= 1.0:
    raise ValueError(f"norm_growth_limit must be >= 1 or None, got {norm_growth_limit!r}.")
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"seed must be an integer, got {seed!r}.")
  split = default_matrix_split if matrix_split is None else matrix_split

  def init(params):
    check_float_params(params, "apollo")
    views, leaves, treedef, moments = _zero_moments(params, split, rank)
    return ApolloState(jnp.zeros([], jnp.int32), moments(), moments(),
                       treedef.unflatten([jnp.zeros([], jnp.float32) for _ in leaves]))

  def channel_scale(n, r, view: MatrixView):
    if scale_type == "tensor":
      return jnp.linalg.norm(n) / (jnp.linalg.norm(r) + _TINY)
    axis = 0 if view.left else 1           # the projected (rank) dim; channels are the other one
    s = jnp.linalg.norm(n, axis=axis) / (jnp.linalg.norm(r, axis=axis) + _TINY)
    return s[None, :] if view.left else s[:, None]

  def update(updates, state, params=None):
    del params
    leaves, treedef, views, (mus, nus, norms) = _per_leaf_state(updates, split, rank, state.mu, state.nu,
                                                                state.last_norm)
    count_inc = optax.safe_increment(state.count)
    step = _bias_correction(count_inc, b1, b2)
    projections = apollo_projections(seed, state.count // update_proj_gap, views)
    per_leaf = []  # (direction, mu, nu, last norm) of each leaf
    for g, m, v, last, view, p in zip(leaves, mus, nus, norms, views, projections):
      g32 = g.astype(jnp.float32)
      if view is None:
        m, v, n = _adam_moments(g32, m, v, b1, b2, eps)
        direction = step * n
      else:
        g2 = g32.reshape(view.rows, view.cols)
        r = view.project(g2, p)
        m, v, n = _adam_moments(r, m, v, b1, b2, eps)
        scaled = (scale * g2) * channel_scale(n, r, view)
        norm = jnp.linalg.norm(scaled)
        if norm_growth_limit is not None:
          limiter = jnp.maximum(norm / (last + _TINY), norm_growth_limit) / norm_growth_limit
          limiter = jnp.where(state.count == 0, 1.0, limiter)
          scaled, last = scaled / limiter, norm / limiter
        direction = (step * scaled).reshape(g.shape)
      per_leaf.append((direction.astype(g.dtype), m, v, last))
    out, new_mu, new_nu, new_norm = _unzip_trees(treedef, per_leaf)
    return out, ApolloState(count_inc, new_mu, new_nu, new_norm)

  return optax.GradientTransformation(init, update)


def apollo(learning_rate, *, rank: int = 256, update_proj_gap: int = 200, scale: float = 1.0, proj: str = "random",
           scale_type: str = "channel", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
           weight_decay: float = 0.0, seed: int = 0, norm_growth_limit: float | None = NORM_GROWTH_LIMIT,
           mask=None, matrix_split: MatrixSplit | None = None) -> optax.GradientTransformation:
  """APOLLO-AdamW (Zhu et al. 2024): the raw gradient of each projected param scaled channel-wise (or tensor-wise)
  by low-rank Adam statistics of a random projection, with the norm-growth limiter; plain AdamW elsewhere.

  learning_rate: float or optax schedule; rank, update_proj_gap: integers >= 1; scale: alpha (multiplies the
  update); seed: the projection's PRNG seed (regenerated, never stored); norm_growth_limit: gamma or None to
  disable. Non-finite gradients skip the step (module docstring).
  """
  direction = scale_by_apollo(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj=proj,
                              scale_type=scale_type, b1=b1, b2=b2, eps=eps, seed=seed,
                              norm_growth_limit=norm_growth_limit, matrix_split=matrix_split)
  return with_decay_and_lr(direction, learning_rate, weight_decay, mask)


def apollo_mini(learning_rate, *, update_proj_gap: int = 200, scale: float = math.sqrt(128.0), b1: float = 0.9,
                b2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0, seed: int = 0,
                norm_growth_limit: float | None = NORM_GROWTH_LIMIT, mask=None,
                matrix_split: MatrixSplit | None = None) -> optax.GradientTransformation:
  """APOLLO-Mini: APOLLO with rank 1 and one tensor-wise scale per matrix, alpha = sqrt(128) as in the paper
  (the authors' `--apollo_scale 128`); state per projected matrix is two vectors and a scalar (SGD-like)."""
  return apollo(learning_rate, rank=1, update_proj_gap=update_proj_gap, scale=scale, scale_type="tensor", b1=b1,
                b2=b2, eps=eps, weight_decay=weight_decay, seed=seed, norm_growth_limit=norm_growth_limit,
                mask=mask, matrix_split=matrix_split)
