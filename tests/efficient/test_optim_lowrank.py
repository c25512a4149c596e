"""Factored and low-rank optimizers (CAME, GaLore, APOLLO, APOLLO-Mini): one step from a known state against NumPy
re-derivations of the papers' algorithms written here (CAME in the paper's sum form, GaLore's SVD projection,
APOLLO's channel / tensor scaling and norm-growth limiter given the same random projection), a quadratic against
optax's fp32 Adam / Adafactor, the tiny Llama against AdamW, measured state bytes, named state, a sharded run equal
to the single-device one, composition, non-finite steps and bad input."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efficient.optim import axes, factored as came_lib, lowrank
from efficient.optim.memory import state_bytes_per_param
from tests import helpers

B1, B2, EPS = 0.9, 0.999, 1e-6


def _inner(state):
  """The algorithm's own state inside skip_nonfinite(chain(direction, decay, lr))."""
  return state.inner[0]


def _with_inner(state, inner):
  return state._replace(inner=(inner,) + tuple(state.inner[1:]))


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _close(name, got, want, tol=2e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(np.abs(want).max(), 1e-30)
  err = np.abs(got - want).max() / scale
  assert err < tol, f"{name}: max error {err:.2e} relative to max |want| {scale:.2e}"


# --- CAME ------------------------------------------------------------------------------------------------------
def _np_came(g, p, mu, v_row, v_col, v, r_row, r_col, *, lr, wd, factored, b1=0.9, b2=0.999, b3=0.9999,
             eps1=1e-30, eps2=1e-16, clip=1.0):
  """CAME Algorithm 1 (Luo et al. 2023) in its SUM form: r_t = b2 r + (1-b2)(G^2+eps1) 1, c_t likewise over rows,
  V = r c^T / (1^T r). The stored statistics are means, so sums = means * the summed size."""
  if factored:
    n_cols, n_rows = g.shape[-1], g.shape[-2]
    sq = g * g + eps1
    r = b2 * v_row * n_cols + (1 - b2) * sq.sum(-1)
    c = b2 * v_col * n_rows + (1 - b2) * sq.sum(-2)
    vhat = r[..., :, None] * c[..., None, :] / r.sum(-1)[..., None, None]
    u = g / np.sqrt(vhat)
  else:
    v = b2 * v + (1 - b2) * (g * g + eps1)
    u = g / np.sqrt(v)
  u = u / max(np.sqrt(np.mean(u * u)) / clip, 1.0)
  mu = b1 * mu + (1 - b1) * u
  if factored:
    inst = (u - mu) ** 2 + eps2
    big_r = b3 * r_row * n_cols + (1 - b3) * inst.sum(-1)
    big_c = b3 * r_col * n_rows + (1 - b3) * inst.sum(-2)
    s = big_r[..., :, None] * big_c[..., None, :] / big_r.sum(-1)[..., None, None]
    direction = mu / np.sqrt(s)
    stats = dict(mu=mu, v_row=r / n_cols, v_col=c / n_rows, r_row=big_r / n_cols, r_col=big_c / n_rows)
  else:
    direction, stats = mu, dict(mu=mu, v=v)
  return -lr * (direction + wd * p), stats


def test_came_one_step_matches_numpy_sum_form():
  rng = np.random.default_rng(0)
  shapes = {"w": (6, 8), "b": (5,), "t": (2, 5, 6), "s": (3, 2, 8)}   # min_dim 4: w, t factored; b, s not
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  grads = {k: jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32) for k, s in shapes.items()}
  lr, wd = 0.01, 0.1
  tx = came_lib.came(lr, weight_decay=wd, min_dim_size_to_factor=4)
  state = tx.init(params)
  inner = _inner(state)
  pos = lambda x: jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32) if x.shape != (1,) else x
  inner = inner._replace(mu=jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.1, jnp.float32),
                                         inner.mu),
                         v_row=jax.tree.map(pos, inner.v_row), v_col=jax.tree.map(pos, inner.v_col),
                         v=jax.tree.map(pos, inner.v), r_row=jax.tree.map(pos, inner.r_row),
                         r_col=jax.tree.map(pos, inner.r_col), count=jnp.asarray(7, jnp.int32))
  updates, new = jax.jit(tx.update)(grads, _with_inner(state, inner), params)
  new = _inner(new)
  old = _np(inner)
  for k in shapes:
    factored = k in ("w", "t")
    want, stats = _np_came(np.float64(grads[k]), np.float64(params[k]), old.mu[k], old.v_row[k], old.v_col[k],
                           old.v[k], old.r_row[k], old.r_col[k], lr=lr, wd=wd, factored=factored)
    assert (new.v_row[k].shape == shapes[k][:-1]) == factored
    _close(f"update {k}", updates[k], want)
    for field, value in stats.items():
      _close(f"{field} {k}", getattr(new, field)[k], value)
  assert int(new.count) == 8


# --- GaLore ----------------------------------------------------------------------------------------------------
def _np_svd_projector(g, rank, left):
  u, _, vt = np.linalg.svd(g, full_matrices=False)
  p = u[:, :rank] if left else vt[:rank].T              # columns are the singular vectors
  p = p * np.where(p[np.argmax(np.abs(p), axis=0), np.arange(p.shape[1])] < 0, -1.0, 1.0)
  return p if left else p.T


def _np_adam(g, m, v):
  """(m, v, m / (sqrt(v) + eps)): the authors' un-projected AdamW moments (bias correction applied by the caller)."""
  m = B1 * m + (1 - B1) * g
  v = B2 * v + (1 - B2) * g * g
  return m, v, m / (np.sqrt(v) + EPS)


def _np_galore(g, p, m, v, proj, *, t, lr, wd, scale, refresh, rank):
  """GaLore Algorithm (Zhao et al. 2024) with the authors' AdamW: project (left: U_r^T G when rows < cols, else
  G V_r), Adam in the projected space, project back, times scale."""
  if proj is None:
    m, v, d = _np_adam(g, m, v)
  else:
    left = g.shape[0] < g.shape[1]
    if refresh:
      proj = _np_svd_projector(g, rank, left)
    r = proj.T @ g if left else g @ proj.T
    m = B1 * m + (1 - B1) * r
    v = B2 * v + (1 - B2) * r * r
    n = m / (np.sqrt(v) + EPS)
    d = scale * (proj @ n if left else n @ proj)
  d = d * np.sqrt(1 - B2 ** t) / (1 - B1 ** t)
  return -lr * (d + wd * p), m, v, proj


def test_galore_one_step_matches_numpy_svd_projection():
  rng = np.random.default_rng(1)
  rank, gap, lr, wd, scale = 3, 3, 0.02, 0.1, 0.25
  shapes = {"a": (6, 10), "b": (7,), "c": (10, 6), "d": (5, 5)}     # left, plain Adam, right, square (right)
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  tx = lowrank.galore(lr, rank=rank, update_proj_gap=gap, scale=scale, weight_decay=wd)
  state = tx.init(params)
  inner = _inner(state)
  assert inner.projector["a"].shape == (6, 3) and inner.mu["a"].shape == (3, 10)
  assert inner.projector["c"].shape == (3, 6) and inner.mu["c"].shape == (10, 3)
  assert inner.projector["d"].shape == (3, 5) and inner.projector["b"].shape == (1,)

  def orthonormal(shape):   # a stored projector (rows orthonormal for [r, cols], columns for [rows, r])
    q, _ = np.linalg.qr(rng.standard_normal((max(shape), min(shape))))
    return jnp.asarray(q if shape[0] >= shape[1] else q.T, jnp.float32)

  update = jax.jit(tx.update)
  for count, refresh in ((0, True), (6, True), (7, False)):      # step 0, a later refresh, the stored projector
    inner = inner._replace(
        count=jnp.asarray(count, jnp.int32),
        mu=jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.1, jnp.float32), inner.mu),
        nu=jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.01, 0.1, x.shape), jnp.float32), inner.nu),
        projector={k: orthonormal(x.shape) if k != "b" else x for k, x in inner.projector.items()})
    updates, new = update(grads, _with_inner(state, inner), params)
    new, old = _inner(new), _np(inner)
    for k in shapes:
      proj = None if k == "b" else old.projector[k]
      want, m, v, proj = _np_galore(np.float64(grads[k]), np.float64(params[k]), old.mu[k], old.nu[k], proj,
                                    t=count + 1, lr=lr, wd=wd, scale=scale, refresh=refresh, rank=rank)
      _close(f"update {k} at count {count}", updates[k], want, 1e-4)
      _close(f"mu {k}", new.mu[k], m, 1e-4)
      _close(f"nu {k}", new.nu[k], v, 1e-4)
      if proj is not None:
        _close(f"projector {k}", new.projector[k], proj, 1e-4)


def test_optax_contrib_galore_projects_the_larger_side_which_is_why_it_is_not_wrapped():
  """The finding in lowrank's docstring: optax 0.2.8 keeps a [cols, r] projector for a rows < cols gradient (the
  larger side) and moments [rows, r]; GaLore's paper and code (and ours) keep [rows, r] and moments [r, cols]."""
  params = {"w": jnp.zeros((6, 10))}
  theirs = optax.contrib.scale_by_galore(rank=3).init(params)
  assert theirs.projector["w"].shape == (10, 3)
  ours = _inner(lowrank.galore(1e-3, rank=3).init(params))
  assert ours.projector["w"].shape == (6, 3) and ours.mu["w"].shape == (3, 10)


# --- APOLLO ----------------------------------------------------------------------------------------------------
def _np_apollo(g, p, m, v, last, proj, *, t, lr, wd, alpha, scale_type, first, gamma=1.01):
  """APOLLO (Zhu et al. 2024) as the authors' apollo.py: low-rank Adam on R = P^T G / G P^T, channel scale
  s_j = ||N_j|| / ||R_j|| along the unprojected dim (or one tensor scale), G * s, Fira's norm-growth limiter."""
  if proj is None:
    m, v, d = _np_adam(g, m, v)
  else:
    left = g.shape[0] < g.shape[1]
    r = proj.T @ g if left else g @ proj.T
    m = B1 * m + (1 - B1) * r
    v = B2 * v + (1 - B2) * r * r
    n = m / (np.sqrt(v) + EPS)
    if scale_type == "tensor":
      s = np.linalg.norm(n) / (np.linalg.norm(r) + 1e-8)
    elif left:   # r is [rank, cols]: one scale per column of G
      s = (np.linalg.norm(n, axis=0) / (np.linalg.norm(r, axis=0) + 1e-8))[None, :]
    else:        # r is [rows, rank]: one scale per row of G
      s = (np.linalg.norm(n, axis=1) / (np.linalg.norm(r, axis=1) + 1e-8))[:, None]
    d = alpha * g * s
    norm = np.linalg.norm(d)
    if first:
      last = norm
    else:
      limiter = max(norm / (last + 1e-8), gamma) / gamma
      d, last = d / limiter, norm / limiter
  d = d * np.sqrt(1 - B2 ** t) / (1 - B1 ** t)
  return -lr * (d + wd * p), m, v, last


@pytest.mark.parametrize("variant", ["apollo", "mini"])
def test_apollo_one_step_matches_numpy_channel_scaling(variant):
  rng = np.random.default_rng(2)
  gap, lr, wd, seed = 4, 0.01, 0.1, 5
  shapes = {"a": (6, 10), "b": (7,), "c": (10, 6)}
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  if variant == "mini":
    rank, alpha, scale_type = 1, math.sqrt(128), "tensor"
    tx = lowrank.apollo_mini(lr, update_proj_gap=gap, weight_decay=wd, seed=seed)
  else:
    rank, alpha, scale_type = 3, 0.5, "channel"
    tx = lowrank.apollo(lr, rank=rank, update_proj_gap=gap, scale=alpha, weight_decay=wd, seed=seed)
  state = tx.init(params)
  inner = _inner(state)
  views = [lowrank.matrix_view(shapes[k], None if k == "b" else 1, rank) for k in sorted(shapes)]  # leaf order
  update = jax.jit(tx.update)
  draw = jax.jit(lambda refresh: lowrank.apollo_projections(seed, refresh, views))
  # (count, previous norm): the first step (no limiter), a limited step, an unlimited one.
  for count, last_norm in ((0, 0.0), (9, 1e-3), (9, 1e3)):
    inner = inner._replace(
        count=jnp.asarray(count, jnp.int32),
        mu=jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.1, jnp.float32), inner.mu),
        nu=jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.01, 0.1, x.shape), jnp.float32), inner.nu),
        last_norm=jax.tree.map(lambda x: jnp.asarray(last_norm, jnp.float32), inner.last_norm))
    updates, new = update(grads, _with_inner(state, inner), params)
    new, old = _inner(new), _np(inner)
    projections = draw(jnp.asarray(count // gap, jnp.int32))
    limited = 0
    for k, proj in zip(sorted(shapes), projections):
      proj = None if proj is None else np.asarray(proj, np.float64)
      want, m, v, last = _np_apollo(np.float64(grads[k]), np.float64(params[k]), old.mu[k], old.nu[k],
                                    old.last_norm[k], proj, t=count + 1, lr=lr, wd=wd, alpha=alpha,
                                    scale_type=scale_type, first=count == 0)
      _close(f"update {k} at count {count}", updates[k], want, 1e-4)
      _close(f"mu {k}", new.mu[k], m, 1e-4)
      if proj is not None:
        _close(f"last_norm {k}", new.last_norm[k], last, 1e-4)
        limited += last < 1.0
    assert limited == (2 if last_norm == 1e-3 else 0)   # the limiter acted exactly where it should


def test_apollo_projection_is_gaussian_over_sqrt_rank_and_regenerated_per_window():
  views = [lowrank.matrix_view((64, 4096), 1, 64), None, lowrank.matrix_view((300, 20), 1, 4)]
  p0 = lowrank.apollo_projections(0, 0, views)
  assert p0[0].shape == (64, 64) and p0[1] is None and p0[2].shape == (4, 20)
  flat = np.asarray(p0[0]).ravel() * 8.0      # 4096 draws: mean +- 0.016, std +- 0.011 (1 sigma)
  assert abs(flat.mean()) < 0.07 and abs(flat.std() - 1) < 0.05
  p1 = lowrank.apollo_projections(0, 1, views)
  assert np.abs(np.asarray(p0[0]) - np.asarray(p1[0])).max() > 0.5
  assert np.array_equal(np.asarray(p0[2]), np.asarray(lowrank.apollo_projections(0, 0, views)[2]))
  # Inside the update, steps 0..gap-1 share one projection and step gap draws the next: updates at counts 0, 1, 2
  # from the same zero moments differ, within a window, only by the bias-correction factor.
  params = {"w": jnp.ones((4, 12))}
  g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((4, 12)), jnp.float32)}
  tx = lowrank.apollo(1.0, rank=2, update_proj_gap=2, norm_growth_limit=None)
  state = tx.init(params)
  update = jax.jit(tx.update)
  outs = [update(g, _with_inner(state, _inner(state)._replace(count=jnp.asarray(c, jnp.int32))))[0]["w"]
          for c in (0, 1, 2)]
  ratio = lambda c: math.sqrt(1 - B2 ** (c + 1)) / (1 - B1 ** (c + 1))
  _close("same window", np.asarray(outs[1]) / ratio(1), np.asarray(outs[0]) / ratio(0), 1e-5)
  assert np.abs(np.asarray(outs[2]) / ratio(2) - np.asarray(outs[0]) / ratio(0)).max() > 1e-3


# --- a quadratic -----------------------------------------------------------------------------------------------
def _quadratic():
  rng = np.random.default_rng(3)
  target = {"w": jnp.asarray(rng.standard_normal((32, 48)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((48,)), jnp.float32)}
  curv = {"w": jnp.asarray(rng.uniform(0.5, 2.0, (32, 48)), jnp.float32),
          "b": jnp.asarray(rng.uniform(0.5, 2.0, (48,)), jnp.float32)}
  loss = lambda p: sum(0.5 * jnp.sum(curv[k] * (p[k] - target[k]) ** 2) for k in p)
  return loss, jax.tree.map(jnp.zeros_like, target)


@functools.lru_cache(maxsize=None)
def _reference_final(name):
  loss, params = _quadratic()
  return _run(QUADRATIC[name][1](), loss, params, 200)


def _run(tx, loss, params, steps):
  def body(carry, _):
    p, s = carry
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None
  (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
  return float(loss(p))


# name -> (ours, its fp32 optax counterpart, fraction of the initial loss (921.3) both must reach in 200 steps).
# Measured: CAME 7e-8 (Adafactor without parameter scaling 0.07), GaLore 7.7 (rank 8 of a 32 x 48 matrix: only the
# current subspace moves), APOLLO 4e-3, APOLLO-Mini 2e-8, Adam 1e-6.
_adam = lambda: optax.adam(0.05)
QUADRATIC = {
    "came": (lambda: came_lib.came(0.05, min_dim_size_to_factor=8),
             lambda: optax.adafactor(0.05, multiply_by_parameter_scale=False), 1e-3),
    "galore": (lambda: lowrank.galore(0.05, rank=8, update_proj_gap=20, scale=1.0), _adam, 2e-2),
    "apollo": (lambda: lowrank.apollo(0.05, rank=8, update_proj_gap=20), _adam, 1e-4),
    "apollo_mini": (lambda: lowrank.apollo_mini(0.05, update_proj_gap=20), _adam, 1e-6),
}


@pytest.mark.parametrize("name", QUADRATIC)
def test_quadratic_200_steps_against_fp32_optax(name):
  ours, _, level = QUADRATIC[name]
  loss, params = _quadratic()
  initial = float(loss(params))
  final = _run(ours(), loss, params, 200)
  reference = _reference_final("came" if name == "came" else "galore")   # Adafactor, or Adam (run once)
  assert final < level * initial, (name, final, initial, reference)
  assert reference < level * initial, (name, final, initial, reference)
  if name == "came":
    assert final < reference     # CAME's confidence-scaled momentum beats plain Adafactor here


# --- the tiny Llama --------------------------------------------------------------------------------------------
def _llama_loss(graphdef, rest, tokens):
  def loss(params):
    logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  return loss


LLAMA = {
    "adamw": lambda: optax.adamw(3e-3, weight_decay=0.0),
    "came": lambda: came_lib.came(3e-3, min_dim_size_to_factor=2),
    "galore": lambda: lowrank.galore(3e-3, rank=8, update_proj_gap=50, scale=1.0,
                                     matrix_split=lowrank.squarest_matrix_split),
    "apollo": lambda: lowrank.apollo(3e-3, rank=8, matrix_split=lowrank.squarest_matrix_split),
    "apollo_mini": lambda: lowrank.apollo_mini(1e-3, matrix_split=lowrank.squarest_matrix_split),
}


@pytest.fixture(scope="module")
def llama_runs(tiny, tokens):
  graphdef, params, rest = nnx.split(nnx.clone(tiny), nnx.Param, ...)
  loss_and_grad = jax.jit(jax.value_and_grad(_llama_loss(graphdef, rest, tokens)))
  runs = {}
  for name, make in LLAMA.items():
    tx = axes.named(make())
    p, state = params, tx.init(params)
    step = jax.jit(tx.update)
    losses = []
    for _ in range(8):
      loss, grads = loss_and_grad(p)
      updates, state = step(grads, state, p)
      p = optax.apply_updates(p, updates)
      losses.append(float(loss))
    losses.append(float(loss_and_grad(p)[0]))
    runs[name] = dict(losses=losses, state=state, params=params)
  return runs


@pytest.mark.parametrize("name", [n for n in LLAMA if n != "adamw"])
def test_tiny_llama_loss_decreases_like_adamw(llama_runs, name):
  ours, adamw = llama_runs[name]["losses"], llama_runs["adamw"]["losses"]
  assert ours[0] == adamw[0]
  drop, adamw_drop = ours[0] - ours[-1], adamw[0] - adamw[-1]
  print(f"{name}: loss {ours[0]:.3f} -> {ours[-1]:.3f} in 8 steps (AdamW fp32 -> {adamw[-1]:.3f})")
  assert adamw_drop > 0.1
  assert drop > 0.4 * adamw_drop, (name, ours, adamw)


# Measured bytes of the real state per parameter of the tiny Llama (90,432 params; every >= 2-D kernel projected
# or factored; the 5 norm scales keep full Adam state). fp32 AdamW: 8 B/param. APOLLO-Mini stores two vectors of
# max(rows, cols) per matrix, i.e. SGD-like (SGD with momentum: 4 B/param).
STATE_BYTES_MAX = {"adamw": 8.01, "came": 5.0, "galore": 3.0, "apollo": 2.0, "apollo_mini": 0.25}


@pytest.mark.parametrize("name", LLAMA)
def test_state_bytes_per_param_measured(llama_runs, name):
  run = llama_runs[name]
  measured = state_bytes_per_param(run["state"], run["params"])
  by_hand = sum(int(x.nbytes) for x in jax.tree.leaves(axes.unwrap(run["state"])))
  count = sum(int(x.size) for x in jax.tree.leaves(axes.unwrap(run["params"])))
  assert measured == pytest.approx(by_hand / count)
  print(f"{name}: {measured:.3f} bytes/param")
  assert measured <= STATE_BYTES_MAX[name]
  if name == "apollo_mini":
    assert measured < 0.05 * state_bytes_per_param(llama_runs["adamw"]["state"], run["params"])


# --- named state -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in LLAMA if n != "adamw"])
def test_every_state_leaf_of_a_param_is_named(llama_runs, name):
  state = llama_runs[name]["state"]
  leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=axes.is_variable)[0]
  plain = []
  for path, leaf in leaves:
    if isinstance(leaf, axes.OptimizerState):
      names = leaf.get_metadata()["out_sharding"]
      assert len(names) == leaf.get_value().ndim, (path, names)
    else:
      plain.append(jax.tree_util.keystr(path))
  assert all(p.endswith((".count", ".skipped")) for p in plain), plain
  assert len(plain) == 2
  inner = state.inner.inner[0]
  mlp = lambda tree: tree["blocks"][0]["mlp"]["gate"]["kernel"].get_metadata()["out_sharding"]   # [64, 128]
  if name == "came":
    assert mlp(inner.v_row) == ("embed",) and mlp(inner.v_col) == ("mlp",) and mlp(inner.mu) == ("embed", "mlp")
  else:   # [64, 128] projected on the left: moments [r, 128]
    assert mlp(inner.mu)[1] == "mlp"


# --- sharded == single device ----------------------------------------------------------------------------------
SHARDED = {
    "came": lambda: came_lib.came(1e-2, min_dim_size_to_factor=2, weight_decay=0.1),
    "galore": lambda: lowrank.galore(1e-2, rank=4, update_proj_gap=2, weight_decay=0.1,
                                     matrix_split=lowrank.squarest_matrix_split),
    "apollo": lambda: lowrank.apollo(1e-2, rank=4, update_proj_gap=2, matrix_split=lowrank.squarest_matrix_split),
    "apollo_mini": lambda: lowrank.apollo_mini(1e-3, update_proj_gap=2),
}


@pytest.mark.parametrize("name", SHARDED)
def test_sharded_fsdp_tp_equals_single_device(tiny, name):
  _, params = nnx.split(nnx.clone(tiny), nnx.Param, ...)[:2]
  # A representative subset keeps compile time small: [vocab, embed] (right projection), the 3-D output kernel
  # [heads, head_dim, embed] (viewed as [64, 64] by squarest_matrix_split where projected) and a 1-D scale.
  block = params["blocks"][0]
  params = nnx.State({"embedding": params["embedding"], "o": block["attention"]["o"]["kernel"],
                      "norm": block["mlp_norm"]["scale"]})
  rng = np.random.default_rng(4)
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params) for _ in range(3)]

  single, sharded = helpers.single_and_sharded_steps(lambda: axes.named(SHARDED[name]()), params, grads)
  spec = jax.tree.leaves(sharded, is_leaf=axes.is_variable)
  assert any(len(leaf.get_value().sharding.device_set) > 1 for leaf in spec)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(single)[0], jax.tree.leaves(sharded)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-6, err_msg=jax.tree_util.keystr(path))


# --- composition, non-finite, bad input ------------------------------------------------------------------------
def test_composes_with_multi_transform_masked_and_schedules():
  rng = np.random.default_rng(5)
  makers = {"galore": lambda lr: lowrank.galore(lr, rank=2), "apollo": lambda lr: lowrank.apollo(lr, rank=2),
            "apollo_mini": lambda lr: lowrank.apollo_mini(lr),
            "came": lambda lr: came_lib.came(lr, min_dim_size_to_factor=2)}
  params = {k: jnp.asarray(rng.standard_normal((6, 10)), jnp.float32) for k in makers}
  params["b"] = jnp.asarray(rng.standard_normal((10,)), jnp.float32)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
  schedule = optax.linear_schedule(0.1, 0.01, 10)
  transforms = {k: make(schedule) for k, make in makers.items()} | {"b": optax.adam(0.1)}
  tx = optax.multi_transform(transforms, {k: k for k in params})
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(2):   # the second step reads the schedule at count 1
    u, state = update(grads, state, params)
  for k, make in makers.items():
    alone = make(schedule)
    alone_state, alone_update = alone.init({k: params[k]}), jax.jit(alone.update)
    for _ in range(2):
      u_alone, alone_state = alone_update({k: grads[k]}, alone_state, {k: params[k]})
    _close(f"multi_transform part {k}", u[k], u_alone[k], 1e-6)
  masked = optax.masked(makers["apollo"](0.1), {k: k == "apollo" for k in params})
  u, _ = jax.jit(masked.update)(grads, masked.init(params), params)
  for k in params:   # masked-out leaves pass through unchanged
    assert np.array_equal(np.asarray(u[k]), np.asarray(grads[k])) == (k != "apollo"), k
  chained = optax.chain(optax.clip_by_global_norm(1.0), makers["came"](0.1))
  u, _ = jax.jit(chained.update)(grads, chained.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


@pytest.mark.parametrize("make", [lambda: came_lib.came(0.1, min_dim_size_to_factor=2),
                                  lambda: lowrank.galore(0.1, rank=2, update_proj_gap=1),
                                  lambda: lowrank.apollo(0.1, rank=2), lambda: lowrank.apollo_mini(0.1)],
                         ids=["came", "galore", "apollo", "apollo_mini"])
def test_non_finite_gradient_skips_the_step(make):
  params = {"w": jnp.ones((6, 10)), "b": jnp.ones((10,))}
  good = {"w": jnp.full((6, 10), 0.5).at[0, 0].set(1.0), "b": jnp.full((10,), 0.5)}
  tx = make()
  update = jax.jit(tx.update)
  _, state = update(good, tx.init(params), params)
  bad = {"w": good["w"].at[2, 3].set(jnp.nan), "b": good["b"]}
  u, new = update(bad, state, params)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
  assert int(new.skipped) == 1
  for a, b in zip(jax.tree.leaves(new.inner), jax.tree.leaves(state.inner)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_input_names_the_argument():
  for make in (lambda **k: lowrank.galore(0.1, **k), lambda **k: lowrank.apollo(0.1, **k)):
    with pytest.raises(ValueError, match="rank"):
      make(rank=0)
    with pytest.raises(ValueError, match="update_proj_gap"):
      make(update_proj_gap=0)
  with pytest.raises(ValueError, match="update_proj_gap"):
    lowrank.apollo_mini(0.1, update_proj_gap=0)
  with pytest.raises(ValueError, match="scale_type"):
    lowrank.apollo(0.1, scale_type="row")
  with pytest.raises(ValueError, match="proj"):
    lowrank.apollo(0.1, proj="svd")
  with pytest.raises(ValueError, match="eps"):
    came_lib.came(0.1, eps=1e-30)
  with pytest.raises(ValueError, match="min_dim_size_to_factor"):
    came_lib.came(0.1, min_dim_size_to_factor=0)
  for tx in (came_lib.came(0.1), lowrank.galore(0.1), lowrank.apollo(0.1), lowrank.apollo_mini(0.1)):
    for dtype in (jnp.int32, jnp.complex64):
      with pytest.raises(ValueError, match=r"params\['w'\]"):
        tx.init({"w": jnp.zeros((4, 4), dtype), "b": jnp.zeros((4,))})
