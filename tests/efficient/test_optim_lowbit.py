"""Low-bit Adam (efficient.optim.lowbit) against independent references: optax.adam / optax.adamw in f32, and a
NumPy re-derivation of bitsandbytes' block-wise dynamic quantization (its create_dynamic_map written out here)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pallas_kernels
from efficient import sharding
from efficient.models import llama
from efficient.optim import axes, lowbit
from pallas_kernels.lowbit_adam import maps


# ----------------------------------------------------------------------------------------------- NumPy references

def np_dynamic_map(signed: bool, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
  """bitsandbytes' create_dynamic_map (Dettmers et al. 2022), as published, in float64 then float32."""
  data = []
  for i in range(max_exponent_bits):
    n = 2 ** (i + total_bits - 1 - max_exponent_bits) + 1 if signed else 2 ** (i + total_bits - max_exponent_bits) + 1
    bounds = np.linspace(0.1, 1.0, n)
    means = (bounds[:-1] + bounds[1:]) / 2
    data += list(10.0 ** (i - max_exponent_bits + 1) * means)
    if signed:
      data += list(-(10.0 ** (i - max_exponent_bits + 1)) * means)
  data += [0.0, 1.0]
  return np.sort(np.array(data, np.float32))


NP_MAPS = {"dynamic_signed_8": np_dynamic_map(True), "dynamic_unsigned_8": np_dynamic_map(False),
           "de_signed_4": np_dynamic_map(True, 3, 4),             # Li et al.'s DE map for m (lpmm 'nonlinear')
           "linear_unsigned_4_nozero": np.arange(1, 17) / 16.0}    # Li et al.'s v map (lpmm 'power-1')


def np_blocks(x, block):
  """Row-major flatten, zero-pad the tail, chunk: bitsandbytes' flat blocking (the same blocks as the layout)."""
  flat = np.asarray(x, np.float32).ravel()
  flat = np.concatenate([flat, np.zeros(-flat.size % block, np.float32)])
  return flat.reshape(-1, block)


def np_nearest(scaled, values, never_zero=False):
  """Nearest map value (ties to the lower code); bitsandbytes' v: a positive value never takes the zero code."""
  dist = np.abs(scaled.astype(np.float64)[..., None] - np.asarray(values, np.float64))
  codes = np.argmin(dist, axis=-1)
  if never_zero:
    codes = np.where((codes == 0) & (scaled > 0), 1, codes)
  return codes


def np_quantize(x, map_name, never_zero=False):
  """[nb, B] f32 -> (codes, absmax): absmax per block, codes = nearest(x / absmax)."""
  absmax = np.max(np.abs(x), axis=-1).astype(np.float32)
  scaled = (x / np.where(absmax > 0, absmax, 1)[:, None]).astype(np.float32)
  return np_nearest(scaled, NP_MAPS[map_name], never_zero), absmax


def np_pack(codes):
  codes = codes.astype(np.uint8)
  return codes[..., 0::2] | (codes[..., 1::2] << 4)


def np_adam(g, p, m, v, t, lr, b1, b2, eps, wd):
  f = np.float32
  m = f(b1) * m + f(1 - b1) * g
  v = f(b2) * v + f(1 - b2) * (g * g)
  # bias corrections in float32 as optax forms them (1 - b**t with b rounded to f32 first: ~1e-5 off float64's)
  c1, c2 = f(1) - np.power(f(b1), f(t)), f(1) - np.power(f(b2), f(t))
  u = (m / c1) / (np.sqrt(v / c2) + f(eps)) + f(wd) * p
  return (-f(lr) * u).astype(f), m.astype(f), v.astype(f)


def rel_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b ** 2)), 1e-30))


def test_maps_are_bitsandbytes_and_li_et_al():
  for name, values in NP_MAPS.items():
    np.testing.assert_allclose(maps.MAPS[name], values, rtol=2e-7, atol=0, err_msg=name)


# ----------------------------------------------------------------------------------------------- the quadratic

def quadratic():
  k = jax.random.split(jax.random.key(0), 4)
  params = {"w": jax.random.normal(k[0], (64, 128)), "b": jax.random.normal(k[1], (32,))}
  curv = {"w": jax.random.uniform(k[2], (64, 128), minval=0.2, maxval=2.0),
          "b": jax.random.uniform(k[3], (32,), minval=0.2, maxval=2.0)}
  loss = lambda p: sum(0.5 * jnp.sum(curv[n] * p[n] ** 2) for n in p)
  return params, loss


def tracked(tx, ref, *, b1=0.9, b2=0.999, eps=1e-8, lr=0.05, wd=0.0, steps=200):
  """Runs tx on the quadratic; at every step also optax's scale_by_adam from tx's dequantized (m, v) state (the
  one-step reference), and ref (optax fp32) on its own trajectory. Returns per-step errors and both loss curves."""
  params, loss = quadratic()
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  @jax.jit
  def run(params):
    def body(carry, _):
      p, s, q, s_own = carry
      g = jax.grad(loss)(p)
      mu, nu = lowbit.dequantized_moments(s, p)
      u_adam, _ = adam.update(g, optax.ScaleByAdamState(count=s.count, mu=mu, nu=nu))
      u_one = jax.tree.map(lambda a, w: -lr * (a + wd * w), u_adam, p)
      u, s = tx.update(g, s, p)
      uq, s_own = ref.update(jax.grad(loss)(q), s_own, q)
      errs = [jnp.max(jnp.abs(u[n] - u_one[n])) / jnp.max(jnp.abs(u_one[n])) for n in ("w", "b")]
      return (optax.apply_updates(p, u), s, optax.apply_updates(q, uq), s_own), (*errs, loss(p), loss(q))
    (p, _, q, _), out = jax.lax.scan(body, (params, tx.init(params), params, ref.init(params)), None, length=steps)
    return out + (loss(p), loss(q))
  return [np.asarray(o) for o in run(params)]


@pytest.mark.parametrize("name, make, ref, wd, loss_tol", [
    ("adamw_8bit", lambda: lowbit.adamw_8bit(0.05, weight_decay=0.1), optax.adamw(0.05, weight_decay=0.1), 0.1,
     1e-5),
    ("adam_4bit", lambda: lowbit.adam_4bit(0.05), optax.adam(0.05), 0.0, 1e-3),
])
def test_quadratic_tracks_fp32(name, make, ref, wd, loss_tol):
  w_err, b_err, losses, ref_losses, final, ref_final = tracked(make(), ref, wd=wd)
  # every step is Adam's update from the dequantized state (the quantization only enters through the state)
  assert w_err.max() <= 1e-5 and b_err.max() <= 1e-6, (name, w_err.max(), b_err.max())
  # and the run ends where fp32 Adam's does: final loss within loss_tol of the initial loss
  assert final <= ref_final + loss_tol * losses[0], (name, final, ref_final, losses[0])
  if "8bit" in name:  # 8-bit follows the fp32 curve step by step; 4-bit's coarse m lags on the way
    assert np.all(losses[100:] <= ref_losses[100:] + 3 * loss_tol * losses[0])


def test_naive_4bit_diverges_on_the_quadratic_where_li_4bit_converges():
  """The zero-point problem end to end: v of small-gradient elements rounds to 0 and their updates explode."""
  *_, losses, _, final, _ = tracked(lowbit.adam_4bit_naive(0.05), optax.adam(0.05), steps=30)
  assert final > 10 * losses[0], (final, losses[0])


# ----------------------------------------------------------------------------------------------- one step, NumPy

def _np_dequant(codes, absmax, map_name):
  return (np.asarray(NP_MAPS[map_name], np.float32)[codes] * absmax[:, None]).astype(np.float32)


def test_8bit_step_equals_numpy_rederivation():
  block, t, lr, b1, b2, eps, wd = 256, 5, 1e-3, 0.9, 0.999, 1e-8, 0.01
  rng = np.random.default_rng(0)
  # [4, 512]: blocks along the last axis; [1000]: flat with a padded tail; [8, 96]: the run spans both axes
  shapes = {"a": (4, 512), "b": (1000,), "c": (8, 96)}
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  grads = {k: (rng.normal(size=s) * np.exp(rng.normal(size=s) * 2)).astype(np.float32) for k, s in shapes.items()}
  tx = lowbit.adamw_8bit(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, block_size=block, min_8bit_size=256)
  state = tx.init(params)
  known, moments = {}, {}
  for k, s in shapes.items():
    m0 = np_blocks(rng.normal(size=s) * 1e-2 * np.exp(rng.normal(size=s)), block)
    v0 = np_blocks(rng.uniform(size=s) ** 4 * 1e-4, block)
    (mc, ma), (vc, va) = np_quantize(m0, "dynamic_signed_8"), np_quantize(v0, "dynamic_unsigned_8", True)
    known[k] = (mc, ma, vc, va)
    st = state.moments[k]
    moments[k] = lowbit.Dynamic8Moments(jnp.asarray(mc, jnp.uint8).reshape(st.m_codes.shape),
                                        jnp.asarray(ma).reshape(st.m_absmax.shape),
                                        jnp.asarray(vc, jnp.uint8).reshape(st.v_codes.shape),
                                        jnp.asarray(va).reshape(st.v_absmax.shape))
  state = state._replace(count=jnp.int32(t - 1), moments=moments)
  updates, new = jax.jit(tx.update)(grads, state, params)
  for k, s in shapes.items():
    mc, ma, vc, va = known[k]
    m = _np_dequant(mc, ma, "dynamic_signed_8")
    v = _np_dequant(vc, va, "dynamic_unsigned_8")
    u, m, v = np_adam(np_blocks(grads[k], block), np_blocks(params[k], block), m, v, t, lr, b1, b2, eps, wd)
    size = int(np.prod(s))
    np.testing.assert_allclose(np.asarray(updates[k]), u.ravel()[:size].reshape(s), rtol=1e-5,
                               atol=1e-6 * np.abs(u).max())
    (mc2, ma2), (vc2, va2) = np_quantize(m, "dynamic_signed_8"), np_quantize(v, "dynamic_unsigned_8", True)
    st = new.moments[k]
    np.testing.assert_array_equal(np.asarray(st.m_codes).reshape(-1, block), mc2, err_msg=k)
    np.testing.assert_array_equal(np.asarray(st.v_codes).reshape(-1, block), vc2, err_msg=k)
    np.testing.assert_allclose(np.asarray(st.m_absmax).ravel(), ma2, rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(np.asarray(st.v_absmax).ravel(), va2, rtol=1e-6, err_msg=k)
  assert int(new.count) == t and int(new.skipped) == 0


def test_4bit_rank1_step_equals_numpy_rederivation():
  block, t, lr, b1, b2, eps = 128, 3, 1e-3, 0.9, 0.999, 1e-8
  rng = np.random.default_rng(1)
  shape = (16, 256)
  p = rng.normal(size=shape).astype(np.float32)
  g = (rng.normal(size=shape) * np.exp(rng.normal(size=shape))).astype(np.float32)
  tx = lowbit.adam_4bit(lr, b1=b1, b2=b2, eps=eps, block_size=block)
  state = tx.init({"w": p})
  m0 = np_blocks(rng.normal(size=shape) * 1e-2, block)
  v0 = (rng.uniform(size=shape) ** 2 * 1e-4).astype(np.float32)

  def rank1(v):  # Li et al.: normalizer = min(row max, column max); codes of v / normalizer, (i+1)/16 map
    rows, cols = v.max(axis=1, keepdims=True), v.max(axis=0, keepdims=True)
    scaled = (v / np.minimum(rows, cols)).astype(np.float32)
    return np_nearest(np_blocks(scaled, block), NP_MAPS["linear_unsigned_4_nozero"]), rows, cols

  mc, ma = np_quantize(m0, "de_signed_4")
  vc, rows, cols = rank1(v0)
  st = state.moments["w"]
  state = state._replace(count=jnp.int32(t - 1), moments={"w": lowbit.Li4Rank1Moments(
      jnp.asarray(np_pack(mc)).reshape(st.m_codes.shape), jnp.asarray(ma).reshape(st.m_absmax.shape),
      jnp.asarray(np_pack(vc)).reshape(st.v_codes.shape), (jnp.asarray(rows), jnp.asarray(cols)))})
  updates, new = jax.jit(tx.update)({"w": g}, state, {"w": p})
  m = _np_dequant(mc, ma, "de_signed_4").reshape(shape)
  v = (NP_MAPS["linear_unsigned_4_nozero"][vc].reshape(shape) * np.minimum(rows, cols)).astype(np.float32)
  u, m, v = np_adam(g, p, m, v, t, lr, b1, b2, eps, 0.0)
  np.testing.assert_allclose(np.asarray(updates["w"]), u, rtol=1e-5, atol=1e-6 * np.abs(u).max())
  mc2, ma2 = np_quantize(np_blocks(m, block), "de_signed_4")
  vc2, rows2, cols2 = rank1(v)
  st = new.moments["w"]
  np.testing.assert_array_equal(np.asarray(st.m_codes).reshape(-1, block // 2), np_pack(mc2))
  np.testing.assert_allclose(np.asarray(st.m_absmax).ravel(), ma2, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(st.v_codes).reshape(-1, block // 2), np_pack(vc2))
  np.testing.assert_allclose(np.asarray(st.v_max[0]), rows2, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(st.v_max[1]), cols2, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- the tiny Llama

def lm_loss(graphdef, params, rest, tokens):
  logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def train(model, txs, tokens, steps):
  """Trains a clone of `model` with each optimizer of `txs` (one compiled loss/grad shared by all)."""
  graphdef, params0, rest = nnx.split(nnx.clone(model), nnx.Param, ...)
  grad_fn = jax.jit(jax.value_and_grad(lambda p: lm_loss(graphdef, p, rest, tokens)))
  runs = []
  for tx in txs:
    update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))
    params, state, losses = params0, tx.init(params0), []
    for _ in range(steps):
      loss, grads = grad_fn(params)
      updates, state = update(grads, state, params)
      params = optax.apply_updates(params, updates)
      losses.append(float(loss))
    runs.append((np.array(losses), params, state))
  return runs


def quantized_bytes_per_param(state, params):
  """Bytes of every state array of the params with quantized state / their element count (absmax and
  normalizers included), measured on the state pytree; also the list of those params' sizes."""
  inner = axes.unwrap(state).inner
  leaves, treedef = jax.tree_util.tree_flatten(axes.unwrap(params))
  n_bytes = n_params = 0
  for p, moments in zip(leaves, treedef.flatten_up_to(inner.moments)):
    if not isinstance(moments, lowbit.Fp32Moments):
      n_bytes += sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(moments))
      n_params += p.size
  return n_bytes / n_params, n_params


def test_tiny_llama_8bit_and_4bit_train_like_adamw_and_state_bytes(tiny, tokens):
  lr, wd = 3e-3, 1e-4  # optax.adamw's default decay
  txs = [optax.adamw(lr, weight_decay=wd), axes.named(lowbit.adamw_8bit(lr, weight_decay=wd)),
         axes.named(lowbit.adam_4bit(lr, weight_decay=wd))]
  (ref, _, _), (low, params, state), (four, _, _) = train(tiny, txs, tokens, 4)
  assert low[-1] < 0.95 * low[0], low
  np.testing.assert_allclose(low, ref, rtol=5e-3)
  # 4-bit m (16 levels per block) moves the first steps more than 8-bit does; the losses still track fp32
  assert four[-1] < 0.95 * four[0], four
  np.testing.assert_allclose(four, ref, rtol=2e-2)
  per_param, n = quantized_bytes_per_param(state, params)
  assert n >= 0.8 * sum(p.size for p in jax.tree.leaves(params)), n  # q, o, MLP and embedding are quantized
  assert per_param <= 2.1, per_param


def test_4bit_state_bytes(tiny):
  params = nnx.state(tiny, nnx.Param)
  tiny_bytes, _ = quantized_bytes_per_param(axes.named(lowbit.adam_4bit(3e-3)).init(params), params)
  # tiny Llama's 64-wide dims make the f32 rank-1 normalizers of v ~0.08 B/param on their own
  assert tiny_bytes <= 1.13, tiny_bytes
  small = nnx.eval_shape(lambda: llama.Llama(llama.SMALL, rngs=nnx.Rngs(0)))
  small_params = nnx.state(small, nnx.Param)
  small_state = jax.eval_shape(axes.named(lowbit.adam_4bit(3e-3)).init, small_params)
  small_bytes, _ = quantized_bytes_per_param(small_state, small_params)
  assert small_bytes <= 1.1, small_bytes


# ----------------------------------------------------------------------------------------------- stability

def max_update_over_run(tx, grad_fn, params, steps):
  @jax.jit
  def run(params):
    def body(carry, k):
      p, s = carry
      u, s = tx.update(grad_fn(k), s, p)
      big = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(u)]))
      finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(u)]))
      return (optax.apply_updates(p, u), s), (big, finite)
    (_, state), (big, finite) = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(steps))
    return big, finite, state
  return run(params)


def test_unused_embedding_rows_stay_bounded_with_8bit():
  """Rows 32.. of an embedding get gradient for 10 steps, then none for 140; row 0 mixes gradients 1e4x smaller
  than its block's largest (their v is ~1e-8 of the block's: exact nearest rounding would store v = 0)."""
  lr, shape = 1e-3, (64, 256)
  noise = jax.random.normal(jax.random.key(0), (150,) + shape)
  scale = jnp.ones(shape).at[0, :128].set(1e-4)

  def grad_fn(k):
    g = noise[k] * scale
    return {"emb": jnp.where((jnp.arange(64)[:, None] >= 32) & (k >= 10), 0.0, g)}
  params = {"emb": jnp.zeros(shape)}
  for tx in (lowbit.adam_8bit(lr), optax.adam(lr)):
    big, finite, _ = max_update_over_run(tx, grad_fn, params, 150)
    assert bool(jnp.all(finite)) and float(big.max()) <= 3 * lr, float(big.max())


def test_naive_4bit_zero_point_failure_on_a_constructed_block():
  """One block of 128: one element with gradient 1, the rest 0.003. Their v is 1e-5 of the block's absmax, below
  half of the naive map's first level (1/15): stored as 0, so m / (sqrt(v) + eps) blows up; Li et al.'s map
  without zero stays at fp32 Adam's size (~lr). (8-bit's v map reaches 3e-7: see the embedding test.)"""
  lr = 1e-3
  g = jnp.full((128,), 0.003).at[0].set(1.0)
  grad_fn = lambda k: {"x": g * jnp.where(k % 2 == 0, 1.0, 0.5)}
  params = {"x": jnp.zeros((128,))}
  sizes = {}
  for name, tx in (("naive", lowbit.adam_4bit_naive(lr, min_4bit_size=128)),
                   ("li", lowbit.adam_4bit(lr, min_4bit_size=128)), ("fp32", optax.adam(lr))):
    big, finite, _ = max_update_over_run(tx, grad_fn, params, 100)
    assert bool(jnp.all(finite))
    sizes[name] = float(big.max()) / lr
  assert sizes["naive"] > 10, sizes
  assert max(sizes["li"], sizes["fp32"]) <= 2, sizes


# ----------------------------------------------------------------------------------------------- composition

def test_composes_with_chain_masked_multi_transform_and_schedules():
  params, loss = quadratic()
  schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, 5, 20)
  mask = {"w": True, "b": False}
  runs = {}
  for name, tx in (("low", optax.chain(optax.clip_by_global_norm(1.0), lowbit.adamw_8bit(schedule, mask=mask))),
                   ("ref", optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, mask=mask)))):
    p, s = params, tx.init(params)
    step = jax.jit(lambda p, s, tx=tx: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(20):
      u, s = step(p, s)
      p = optax.apply_updates(p, u)
    runs[name] = float(loss(p))
  # 20 steps in (not converged), the 8-bit state's drift shows as a few % of the loss
  assert abs(runs["low"] - runs["ref"]) <= 0.1 * runs["ref"], runs

  g = jax.jit(jax.grad(loss))(params)
  masked = optax.masked(lowbit.adamw_8bit(1e-2), {"w": True, "b": False})
  u_masked, _ = jax.jit(masked.update)(g, masked.init(params), params)
  np.testing.assert_array_equal(u_masked["b"], g["b"])  # optax.masked passes masked-out updates through
  multi = optax.multi_transform({"low": lowbit.adamw_8bit(1e-2), "fp32": optax.adamw(1e-2)},
                                {"w": "low", "b": "fp32"})
  u_multi, _ = jax.jit(multi.update)(g, multi.init(params), params)
  ref_b, _ = jax.jit(optax.adamw(1e-2).update)({"b": g["b"]}, optax.adamw(1e-2).init({"b": params["b"]}),
                                               {"b": params["b"]})
  np.testing.assert_allclose(u_multi["b"], ref_b["b"], rtol=1e-6)
  # first step from a zero state: m_hat = g, v_hat = g*g exactly, so w's update is -lr * (sign(g) + wd * w)
  expected_w = -1e-2 * (g["w"] / (jnp.abs(g["w"]) + 1e-8) + 1e-2 * params["w"])
  for u in (u_masked, u_multi):
    np.testing.assert_allclose(u["w"], expected_w, rtol=1e-5)


def test_named_state_and_sharded_run_equal_single_device(tiny):
  tx = axes.named(lowbit.adamw_8bit(3e-3, block_size=128))
  params = nnx.state(tiny, nnx.Param)
  # blocks along the last axis (gate [64, 128]) and a run over both axes (embedding [256, 64])
  params = {"embedding": params["embedding"], "gate": params["blocks"][0]["mlp"]["gate"]["kernel"]}
  state = tx.init(params)
  gate = state.inner.moments["gate"]
  assert isinstance(gate.m_codes, axes.OptimizerState)
  assert gate.m_codes.get_metadata()["out_sharding"] == ("embed", "mlp", None)   # [64, 1, 128] codes
  assert gate.v_absmax.get_metadata()["out_sharding"] == ("embed", "mlp")        # [64, 1] absmax
  assert not isinstance(state.inner.count, axes.OptimizerState)                  # scalars stay replicated

  grads = jax.tree.map(lambda p: jnp.stack([jnp.sin(7.0 * p + k) * (1.0 + p) for k in range(3)]), params)

  @jax.jit
  def run(params, state, grads):  # 3 steps with fixed gradients (no model: the optimizer alone)
    def body(carry, g):
      params, state = carry
      updates, state = tx.update(g, state, params)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(body, (params, state), grads)[0]

  single = run(params, state, grads)
  mesh = sharding.make_mesh("fsdp:8")
  params_s = jax.device_put(params, sharding.state_shardings(params, mesh, "fsdp"))
  state_s = jax.device_put(state, sharding.state_shardings(state, mesh, "fsdp"))
  assert gate.m_codes.get_value().shape == (64, 1, 128)
  codes = axes.unwrap(state_s).inner.moments["gate"].m_codes
  assert codes.sharding.shard_shape(codes.shape) == (8, 1, 128)  # split with the param's embed rows
  sharded = run(params_s, state_s, grads)
  # Not bit-exact: XLA CPU contracts multiply-adds into FMAs differently in the sharded program, so values differ
  # by ~1 ulp, and a code may flip where a value sits on a rounding midpoint. Params agree to ~1e-6 relative.
  for a, b in zip(jax.tree.leaves(axes.unwrap(sharded[0])), jax.tree.leaves(axes.unwrap(single[0]))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
  for a, b in zip(jax.tree.leaves(axes.unwrap(sharded[1])), jax.tree.leaves(axes.unwrap(single[1]))):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == np.uint8:
      assert np.mean(a != b) <= 1e-3, np.mean(a != b)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- kernels, errors

def test_interpret_tpu_policy_equals_default():
  params = {"w": jax.random.normal(jax.random.key(1), (2, 256))}
  grads = jax.tree.map(lambda x: jnp.sin(3 * x) + 0.1, params)
  for tx in (lowbit.adamw_8bit(1e-2, min_8bit_size=512),):
    state = tx.init(params)
    u0, s0 = jax.jit(tx.update)(grads, state, params)
    with pallas_kernels.implementation("interpret_tpu"):
      u1, s1 = jax.jit(tx.update)(grads, state, params)
    for a, b in zip(jax.tree.leaves((u0, s0)), jax.tree.leaves((u1, s1))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("make", [lambda: lowbit.adamw_8bit(1e-2, min_8bit_size=1024),   # the op's path
                                  lambda: lowbit.adam_4bit(1e-2, min_4bit_size=1024)])    # the rank-1 path
def test_nonfinite_gradient_skips_the_step(make):
  tx = make()
  update = jax.jit(tx.update)
  params = {"w": jax.random.normal(jax.random.key(2), (8, 256)), "b": jnp.ones((16,))}
  grads = jax.tree.map(lambda x: x * 0.1, params)
  _, state = update(grads, tx.init(params), params)
  for poisoned in ({"w": grads["w"], "b": grads["b"].at[3].set(jnp.nan)},
                   {"w": grads["w"].at[2, 5].set(-jnp.inf), "b": grads["b"]}):
    updates, new = update(poisoned, state, params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    assert int(new.skipped) == 1 and int(new.count) == int(state.count) == 1
    for a, b in zip(jax.tree.leaves(new.moments), jax.tree.leaves(state.moments)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, after = update(grads, new, params)  # training goes on from the kept state
  assert int(after.count) == 2 and int(after.skipped) == 1


def test_bad_input_errors_name_the_argument():
  for bad in (100, 0, 1, 3.0):
    with pytest.raises(ValueError, match="block_size"):
      lowbit.adamw_8bit(1e-3, block_size=bad)
  with pytest.raises(ValueError, match="block_size"):
    lowbit.adam_4bit(1e-3, block_size=96)
  with pytest.raises(ValueError, match=r"block_size=8192 exceeds .*\['w'\]"):
    lowbit.adam_8bit(1e-3, block_size=8192).init({"w": jnp.zeros((64, 64))})
  lowbit.adam_8bit(1e-3, block_size=8192).init({"w": jnp.zeros((10,))})  # small: f32 state, no quantization
  for dtype in (jnp.int32, jnp.complex64):
    with pytest.raises(ValueError, match=r"params: \['w'\] .*integer or complex"):
      lowbit.adam_4bit(1e-3).init({"w": jnp.zeros((64, 64), dtype)})
  with pytest.raises(ValueError, match="b2"):
    lowbit.adam_8bit(1e-3, b2=1.0)
  tx = lowbit.adamw_8bit(1e-3)
  with pytest.raises(ValueError, match="params"):
    tx.update({"w": jnp.ones((64, 64))}, tx.init({"w": jnp.ones((64, 64))}))


def test_embedding_fp32_state_keeps_embeddings_in_f32(tiny):
  params = nnx.state(tiny, nnx.Param)
  state = axes.unwrap(axes.named(lowbit.adam_8bit(1e-3, fp32_state=lowbit.embedding_fp32_state)).init(params))
  assert isinstance(state.inner.moments["embedding"], lowbit.Fp32Moments)
  assert isinstance(state.inner.moments["blocks"][0]["mlp"]["up"]["kernel"], lowbit.Dynamic8Moments)
  m, v = jax.jit(lowbit.dequantized_moments)(state, params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves((m, v)))
  # the zero state is quantize(0): absmax 0, the code of the map's 0 (nibble-packed at 4 bits)
  up = state.inner.moments["blocks"][0]["mlp"]["up"]["kernel"]
  assert np.all(np.asarray(up.m_codes) == np.flatnonzero(NP_MAPS["dynamic_signed_8"] == 0)[0])
  assert np.all(np.asarray(up.v_codes) == 0) and not np.any(np.asarray(up.m_absmax))
  naive = lowbit.adam_4bit_naive(1e-3).init({"w": jnp.zeros((64, 128))}).moments["w"]
  zero = np.flatnonzero(NP_MAPS["de_signed_4"] == 0)[0]
  assert np.all(np.asarray(naive.m_codes) == zero | (zero << 4)) and np.all(np.asarray(naive.v_codes) == 0)
