"""MeZO (efficient.optim.zeroth_order) and optimizer memory (efficient.optim.memory) against NumPy references.

References are re-derived here: the quadratic's gradient and central differences in float64, the SPSA identity
E[(z . g) z] = g for z ~ N(0, I), rounding bounds from np.spacing, and Adam's state size counted by hand. The
code under test supplies only z (through its documented `perturbation`) and its own outputs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efficient.optim import axes, memory
from efficient.optim import zeroth_order as zo

# A quadratic over a two-leaf tree: f(x) = sum_leaves 0.5 * sum(a * x^2) + sum(b * x). "w" (15 elements) is
# longer than CHUNK_SIZE so its passes run the in-place chunk loop and a tail; "b" is a single chunk.
CHUNK_SIZE = 4
RNG = np.random.default_rng(0)
A = {"b": RNG.uniform(0.5, 2.0, 3), "w": RNG.uniform(0.5, 2.0, (3, 5))}
B = {"b": RNG.normal(size=3), "w": RNG.normal(size=(3, 5))}
X0 = {"b": RNG.normal(size=3).astype(np.float32), "w": RNG.normal(size=(3, 5)).astype(np.float32)}


def quadratic(params, batch=None):
  loss = sum(0.5 * jnp.sum(A[k] * params[k].astype(jnp.float32) ** 2) + jnp.sum(B[k] * params[k])
             for k in sorted(params))
  return loss if batch is None else loss + batch


def quadratic_np(x):
  return sum(0.5 * np.sum(A[k] * x[k] ** 2) + np.sum(B[k] * x[k]) for k in sorted(x))


def gradient_np(x):
  return {k: A[k] * np.asarray(x[k], np.float64) + B[k] for k in x}


def as_np(tree):
  return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def params0():
  return {k: jnp.asarray(v) for k, v in X0.items()}


# Jitted once here: eager random ops compile one by one (seconds on a loaded 2-core host).
_perturbation = jax.jit(zo.perturbation, static_argnames="chunk_size")


def perturbation(key, step, params, chunk_size=CHUNK_SIZE):
  return as_np(_perturbation(zo.step_key(key, step), params, chunk_size=chunk_size))


@functools.lru_cache(maxsize=None)
def _step_fn(settings):
  settings = dict(settings)
  if settings.get("weight_decay_mask") is not None:  # made hashable by `mezo`
    settings["weight_decay_mask"] = dict(settings["weight_decay_mask"])
  return zo.make_mezo_step(quadratic, **settings)


def mezo(params, batch, key, step, **settings):
  """One jitted MeZO step on the quadratic, chunk_size CHUNK_SIZE unless given (compiled once per settings;
  params are donated: callers pass fresh arrays)."""
  settings = dict({"chunk_size": CHUNK_SIZE}, **settings)
  if isinstance(settings.get("weight_decay_mask"), dict):
    settings["weight_decay_mask"] = tuple(sorted(settings["weight_decay_mask"].items()))
  fn = _step_fn(tuple(sorted(settings.items())))
  return fn(params, batch, key, step)


def test_projected_grad_is_the_central_difference_along_z():
  eps, key, step = 1e-2, jax.random.key(3), 7
  z = perturbation(key, step, params0())
  _, metrics = mezo(params0(), None, key, step, learning_rate=0.1, eps=eps)
  x = as_np(X0)
  plus = quadratic_np({k: x[k] + eps * z[k] for k in x})
  minus = quadratic_np({k: x[k] - eps * z[k] for k in x})
  central = (plus - minus) / (2 * eps)
  # On a quadratic the central difference is exactly the directional derivative z . grad f.
  directional = sum(np.sum(z[k] * g) for k, g in gradient_np(x).items())
  assert central == pytest.approx(directional, rel=1e-9)
  # f32 losses ~10 differ by ~2 eps |z . g|: cancellation leaves ~1e-4 relative error.
  assert float(metrics["projected_grad"]) == pytest.approx(central, rel=2e-3, abs=2e-3)
  assert float(metrics["loss_plus"]) == pytest.approx(plus, rel=1e-5)
  assert float(metrics["loss_minus"]) == pytest.approx(minus, rel=1e-5)
  assert bool(metrics["finite"])
  # z is N(0, 1)-like, differs per step and per leaf chunk, and is reproducible.
  other = perturbation(key, step + 1, params0())
  assert not np.allclose(other["w"], z["w"])
  again = perturbation(key, step, params0())
  np.testing.assert_array_equal(again["w"], z["w"])
  # An integer seed and a raw uint32[2] key name the same stream as the typed key they make.
  np.testing.assert_array_equal(jax.random.key_data(zo.step_key(5, 2)),
                                jax.random.key_data(zo.step_key(jax.random.key(5), 2)))
  np.testing.assert_array_equal(jax.random.key_data(zo.step_key(jax.random.key_data(jax.random.key(5)), 2)),
                                jax.random.key_data(zo.step_key(5, 2)))


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_full_step_is_params_minus_lr_g_z(weight_decay):
  """Perturb (+eps z), (-2 eps z), restore (+eps z) and update leave x - lr (g z + wd x): the restore is exact up
  to f32 rounding (three roundings of a value ~|x| + eps|z|, each <= half an ulp, since fl(2 eps z) is exactly
  2 fl(eps z)), so 1e-6 absolute bounds the error for |x| ~ 1 (ulp 1.2e-7)."""
  lr, eps, key, step = 0.1, 1e-3, jax.random.key(11), 4
  mask = {"b": False, "w": True}
  new, metrics = mezo(params0(), None, key, step, learning_rate=lr, eps=eps, weight_decay=weight_decay,
                      weight_decay_mask=mask)
  z = perturbation(key, step, params0())
  g = float(metrics["projected_grad"])
  x = as_np(X0)
  for k in x:
    decay = weight_decay * x[k] if mask[k] else 0.0
    expected = x[k] - lr * (g * z[k] + decay)
    np.testing.assert_allclose(np.asarray(new[k], np.float64), expected, rtol=0, atol=1e-6, err_msg=k)
    assert new[k].dtype == jnp.float32 and new[k].shape == X0[k].shape


def test_expected_update_direction_is_the_gradient():
  """E_z[(z . g) z] = g. Per component the estimator's variance is ||g||^2 + g_i^2, so the mean of N draws misses
  g by an RMS norm of ||g|| sqrt((d + 1) / N) = 0.047 ||g|| for d = 18, N = 8000: 0.2 ||g|| is > 4 sigma."""
  n = 8000
  steps = jnp.arange(n)
  run = jax.jit(jax.vmap(lambda s: zo.mezo_step(quadratic, params0(), None, key=jax.random.key(0), step=s,
                                                learning_rate=1.0, eps=1e-3)[0]))  # default chunk: no loops
  new = run(steps)
  x = as_np(X0)
  mean = {k: np.mean(x[k][None] - np.asarray(new[k], np.float64), axis=0) for k in x}  # lr = 1: x - x' = g z
  g = gradient_np(x)
  error = np.sqrt(sum(np.sum((mean[k] - g[k]) ** 2) for k in x))
  norm = np.sqrt(sum(np.sum(g[k] ** 2) for k in x))
  d = sum(v.size for v in x.values())
  assert d == 18
  assert error < 0.2 * norm, f"|E[update] - grad| = {error:.3g} vs |grad| = {norm:.3g}"


def test_loss_decreases_on_a_quadratic_with_a_schedule():
  """SPSA-SGD on f = 0.5 x'Ax + b'x, A diagonal in [0.5, 2] (mu, L), d = 18: with u = (z . g) z,
  E[u] = g and E[u'Au] = |g|^2 tr A + 2 g'Ag, so E[f(x - lr u)] - f* <= (f - f*)(1 - 2 mu lr (1 - lr (tr A + 2L) / 2))
  -- at least ~1.2% less a step at lr 0.02 (tr A <= 36, L = 2): 300 steps leave ~3% of the gap at most."""
  x_min = {k: -B[k] / A[k] for k in A}
  f_min = quadratic_np(x_min)
  schedule = optax.linear_schedule(0.02, 0.01, 300)
  step = zo.make_mezo_step(quadratic, learning_rate=schedule, eps=1e-3)
  params = params0()
  start = quadratic_np(as_np(params)) - f_min
  lrs = {}
  for s in range(300):
    params, metrics = step(params, None, jax.random.key(1), s)
    if s in (0, 150):
      lrs[s] = float(metrics["lr"])
  assert lrs[0] == pytest.approx(0.02) and lrs[150] == pytest.approx(0.015)
  end = quadratic_np(as_np(params)) - f_min
  assert end < 0.1 * start, (start, end)


def _restore_bound(x, z, eps, dtype):
  """Three roundings (perturb, perturb, restore) of values of magnitude <= |x| + 2 eps |z|."""
  return 3 * np.spacing(np.abs(x).astype(dtype) + (2 * eps * np.abs(z)).astype(dtype)).astype(np.float64)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_loss_restores_params_and_flags(bad):
  eps, key = 1e-3, jax.random.key(2)
  new, metrics = mezo(params0(), jnp.float32(bad), key, 0, learning_rate=0.1, eps=eps, weight_decay=0.1,
                      chunk_size=zo.CHUNK)
  assert not bool(metrics["finite"])
  z = perturbation(key, 0, params0(), chunk_size=zo.CHUNK)
  for k, x in X0.items():
    value = np.asarray(new[k], np.float64)
    assert np.all(np.isfinite(value))
    assert np.all(np.abs(value - x) <= _restore_bound(x, z[k], eps, np.float32)), k


def test_bf16_params_keep_dtype_and_restore_to_bf16_rounding():
  eps, key = 1e-2, jax.random.key(4)
  params = {k: jnp.asarray(v, jnp.bfloat16) for k, v in X0.items()}
  x, z = as_np(params), perturbation(key, 0, params, chunk_size=zo.CHUNK)
  new, metrics = mezo(params, jnp.float32(np.nan), key, 0, learning_rate=0.1, eps=eps, chunk_size=zo.CHUNK)
  assert not bool(metrics["finite"])
  for k in X0:
    assert new[k].dtype == jnp.bfloat16
    # three roundings to bf16 (8 significant bits: relative half-ulp 2^-8) of values <= |x| + 2 eps |z|
    bound = 3 * float(jnp.finfo(jnp.bfloat16).eps) * (np.abs(x[k]) + 2 * eps * np.abs(z[k]))
    assert np.all(np.abs(np.asarray(new[k], np.float64) - x[k]) <= bound), k


# --- the tiny Llama -----------------------------------------------------------------------------------------

def _llama_batch(tokens):
  batch, length = tokens.shape[0], tokens.shape[1] - 1
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)),
          "segment_ids": jnp.ones((batch, length), jnp.int32), "loss_mask": jnp.ones((batch, length), jnp.float32)}


def test_tiny_llama_steps_stay_finite_and_use_less_memory_than_adamw(tiny, tokens):
  from efficient.train import batch_loss
  graphdef, params, rest = nnx.split(nnx.clone(tiny), nnx.Param, ...)
  data = _llama_batch(tokens)

  def loss_fn(params, batch):
    rest, data = batch
    return batch_loss(nnx.merge(graphdef, params, rest), data)[0]

  step = zo.make_mezo_step(loss_fn, learning_rate=1e-4, eps=1e-3, weight_decay=0.01, chunk_size=4096)
  key = jax.random.key(0)
  compiled = step.lower(params, (rest, data), key, 0).compile()
  mezo_memory = memory.compiled_memory(compiled)

  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)

  def adamw_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  adamw = jax.jit(adamw_step, donate_argnums=(0, 1)).lower(params, opt_state, (rest, data)).compile()
  adamw_memory = memory.compiled_memory(adamw)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  reference_loss = float(adamw(copy(params), copy(opt_state), (rest, data))[2])  # the loss at the params
  param_bytes = 4 * 90432  # the tiny Llama's parameter count (tests/efficient/test_measure.py) in f32
  assert memory.state_bytes(params) == param_bytes
  print(f"\nparams {param_bytes} B; MeZO step {mezo_memory}; AdamW step {adamw_memory}")
  # MeZO's arguments are the params and the batch only (no optimizer state), all donated params aliased.
  assert mezo_memory["alias_bytes"] == param_bytes
  assert mezo_memory["argument_bytes"] < param_bytes + 4096
  assert adamw_memory["argument_bytes"] > 3 * param_bytes  # params + mu + nu
  assert mezo_memory["peak_bytes"] < adamw_memory["peak_bytes"]

  initial = jax.tree.map(np.asarray, axes.unwrap(params))
  for s in range(3):
    params, metrics = compiled(params, (rest, data), key, s)
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"])), s
    if s == 0:  # both passes are forwards of the same model at params +- eps z: their mean is ~ its loss
      assert float(metrics["loss"]) == pytest.approx(reference_loss, abs=1e-3)
  assert isinstance(params, nnx.State)
  assert all(isinstance(v, nnx.Param) for v in jax.tree.leaves(params, is_leaf=axes.is_variable))
  final = jax.tree.map(np.asarray, axes.unwrap(params))
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(final))]
  assert all(changed) and all(np.all(np.isfinite(v)) for v in jax.tree.leaves(final))


# --- state bytes ------------------------------------------------------------------------------------------------

def test_state_bytes_of_adam_is_two_moments_plus_a_counter():
  params = {"w": jnp.zeros((3, 4), jnp.float32), "b": jnp.zeros(5, jnp.float32)}
  state = optax.adam(1e-3).init(params)
  # mu and nu: one f32 per parameter each (2 * 17 * 4 bytes); count: one int32 scalar.
  assert memory.state_bytes(state) == 2 * 17 * 4 + 4 == 140
  assert memory.state_bytes_per_param(state, params) == pytest.approx(140 / 17)
  # nnx Variables (optax copies Param variables into mu and nu; axes.named wraps state leaves) are unwrapped.
  linear = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  variables = nnx.state(linear, nnx.Param)
  assert memory.state_bytes(optax.adam(1e-3).init(variables)) == 2 * 16 * 4 + 4
  assert memory.state_bytes(axes.named(optax.adam(1e-3)).init(variables)) == 2 * 16 * 4 + 4
  assert memory.state_bytes_per_param(optax.adam(1e-3).init(variables), variables) == pytest.approx(132 / 16)
  # MeZO keeps no optimizer state; a PRNG key leaf counts its key data, uint8 codes one byte each.
  assert memory.state_bytes(()) == 0
  assert memory.state_bytes({"key": jax.random.key(0), "codes": jnp.zeros(7, jnp.uint8)}) == 8 + 7


def test_compiled_memory_reports_donation():
  fn = lambda x: x * 2.0
  x = jnp.ones((64, 64), jnp.float32)
  plain = memory.compiled_memory(fn, x)
  donated = memory.compiled_memory(jax.jit(fn, donate_argnums=0), x)
  assert plain["argument_bytes"] == donated["argument_bytes"] == 64 * 64 * 4
  assert plain["alias_bytes"] == 0 and donated["alias_bytes"] == 64 * 64 * 4
  assert plain["peak_bytes"] == 2 * 64 * 64 * 4 + plain["temp_bytes"]
  assert donated["peak_bytes"] == 64 * 64 * 4 + donated["temp_bytes"]


# --- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"eps": 0.0}, "eps"), ({"eps": -1e-3}, "eps"), ({"eps": float("nan")}, "eps"),
    ({"learning_rate": 0.0}, "learning_rate"), ({"learning_rate": -1.0}, "learning_rate"),
    ({"learning_rate": "fast"}, "learning_rate"), ({"weight_decay": -0.1}, "weight_decay"),
    ({"chunk_size": 0}, "chunk_size"), ({"chunk_size": 2.5}, "chunk_size"), ({"has_aux": 1}, "has_aux"),
])
def test_bad_settings_name_the_argument(kwargs, name):
  settings = dict({"learning_rate": 0.1}, **kwargs)
  with pytest.raises(ValueError, match=name):
    zo.make_mezo_step(quadratic, **settings)
  with pytest.raises(ValueError, match=name):
    zo.mezo_step(quadratic, params0(), None, key=0, step=0, **settings)


def test_bad_inputs_name_the_argument():
  run = lambda params=None, **kw: zo.mezo_step(kw.pop("loss_fn", quadratic), params0() if params is None else params,
                                               kw.pop("batch", None), **dict({"key": 0, "step": 0,
                                                                              "learning_rate": 0.1}, **kw))
  with pytest.raises(ValueError, match="loss_fn"):
    zo.make_mezo_step("not a function", learning_rate=0.1)
  with pytest.raises(ValueError, match="key"):
    run(key="seed")
  with pytest.raises(ValueError, match="key"):
    run(key=jnp.zeros(3, jnp.float32))
  with pytest.raises(ValueError, match="step"):
    run(step=-1)
  with pytest.raises(ValueError, match=r"params\['n'\]"):
    run(params={"n": jnp.zeros(3, jnp.int32), "w": jnp.zeros(3)})
  with pytest.raises(ValueError, match=r"params\['c'\]"):
    run(params={"c": jnp.zeros(3, jnp.complex64)})
  with pytest.raises(ValueError, match="params"):
    run(params={})
  with pytest.raises(ValueError, match="scalar"):
    run(loss_fn=lambda p, b: p["w"])
  with pytest.raises(ValueError, match="weight_decay_mask"):
    run(weight_decay=0.1, weight_decay_mask={"w": True})
  with pytest.raises(ValueError, match="state"):
    memory.state_bytes({"m": jax.ShapeDtypeStruct((3,), jnp.float32)})
  with pytest.raises(ValueError, match="params"):
    memory.state_bytes_per_param({"m": jnp.zeros(3)}, {})
  with pytest.raises(ValueError, match="fn"):
    memory.compiled_memory("not a function")


def test_aux_of_the_plus_pass_is_returned():
  with_aux = lambda params, batch: (quadratic(params), {"double": 2.0 * quadratic(params)})
  run = jax.jit(lambda params, key: zo.mezo_step(with_aux, params, None, key=key, step=0, learning_rate=0.1,
                                                 has_aux=True))
  _, metrics = run(params0(), jax.random.key(9))
  assert float(metrics["aux"]["double"]) == pytest.approx(2.0 * float(metrics["loss_plus"]), rel=1e-6)
