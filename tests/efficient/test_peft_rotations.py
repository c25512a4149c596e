"""RoAd, ETHER / ETHER+ and LoReFT (`efficient.peft.road`, `.ether`, `.reft`) against independent NumPy
re-derivations: dense rotation / reflection matrices built from the papers' element pairing and block structure
(never from the implementation's reshapes), merged = unmerged weights applied by hand, gradients against
jax.grad of the dense formulation, LoReFT's formula at the intervened positions (others bit-for-bit unchanged)
on a plain NNX model and on the TINY Llama, and the sharded TINY on 8 devices equal to one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient import calibration, nn, sharding
from efficient.models import llama
from efficient.peft import core
from efficient.peft.ether import ETHERConfig, ETHEREinsum
from efficient.peft.reft import LoReFTIntervention, ReFTConfig, add_interventions
from efficient.peft.road import RoAdConfig, RoAdEinsum

IN, OUT, GS = 16, 24, 8
rng = np.random.default_rng(0)
X = rng.standard_normal((2, 5, IN)).astype(np.float32)


def _linear(seed=0, in_features=IN, out_features=OUT):
  return nnx.Linear(in_features, out_features, bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(seed))


def _wrap(config, module, seed=0):
  return config.wrap(module, nnx.Rngs(seed), "layer")


def _numpy_linear(module):
  return np.asarray(module.kernel[...], np.float64), np.asarray(module.bias[...], np.float64)


def _set(variable, value):
  variable[...] = jnp.asarray(value, jnp.float32)


def evaluate(layer, x, weights):
  """(y, merged W', merged b', grads of sum(sin(y) * weights) w.r.t. the adapter params) in one compiled call."""
  graphdef, adapters, rest = nnx.split(layer, nn.Adapter, ...)

  @jax.jit
  def run(adapters, rest, x, weights):
    def loss(a):
      y = nnx.merge(graphdef, a, rest)(x)
      return jnp.sum(jnp.sin(y) * weights), y
    (_, y), grads = jax.value_and_grad(loss, has_aux=True)(adapters)
    w, b = nnx.merge(graphdef, adapters, rest).merged_weight_and_bias()
    return y, w, b, grads

  y, w, b, grads = run(adapters, rest, x, weights)
  return np.asarray(y), np.asarray(w, np.float64), np.asarray(b, np.float64), nnx.to_pure_dict(grads)


def _assert_identity(layer, x):
  """The wrapper's output equals its base layer's, bit for bit (both in one compiled program)."""
  base_y, y = jax.jit(lambda m, x: (m.base(x), m(x)))(layer, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(base_y))


def dense_grads(loss, params):
  return jax.jit(jax.grad(loss))({k: jnp.asarray(v, jnp.float32) for k, v in params.items()})


def _check_grads(got, want):
  assert set(got) == set(want)
  for name in want:
    g = np.asarray(got[name])
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0 and _rel(g, want[name]) < 1e-5, name


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- RoAd: the dense rotation matrix from the paper's pairing and peft's parameter layout -------------------

def road_matrix(theta, alpha, variant, group_size, out, xp=np):
  """R [out, out]: inside each group of `group_size`, element i pairs with j = i + group_size/2;
  R[i,i] = a_i, R[i,j] = -b_i, R[j,j] = a_j, R[j,i] = b_j with a = alpha cos(theta), b = alpha sin(theta):
  road_1 one (alpha, theta) per pair (index group * half + offset), road_2 one per element, road_4 per group a
  [2, group_size] block: row 0 gives the a's, row 1 the b's."""
  half = group_size // 2
  k = np.arange(out)
  group, m = k // group_size, k % group_size
  if variant == "road_1":
    idx = group * half + m % half
    a, b = alpha[idx] * xp.cos(theta[idx]), alpha[idx] * xp.sin(theta[idx])
  elif variant == "road_2":
    a, b = alpha * xp.cos(theta), alpha * xp.sin(theta)
  else:
    ia, ib = group * 2 * group_size + m, group * 2 * group_size + group_size + m
    a, b = alpha[ia] * xp.cos(theta[ia]), alpha[ib] * xp.sin(theta[ib])
  i = k[m < half]
  j = i + half
  e = xp.eye(out)
  return ((e[:, i] * a[i]) @ e[i] - (e[:, i] * b[i]) @ e[j] + (e[:, j] * a[j]) @ e[j] + (e[:, j] * b[j]) @ e[i])


@pytest.mark.parametrize("variant,count", [("road_1", OUT // 2), ("road_2", OUT), ("road_4", 2 * OUT)])
def test_road_identity_at_init_numpy_forward_merge_and_grad(variant, count):
  base = _linear()
  w, b = _numpy_linear(base)
  layer = _wrap(RoAdConfig(variant, group_size=GS), nnx.clone(base))
  assert isinstance(layer, RoAdEinsum) and layer.theta.shape == layer.alpha.shape == (count,)
  assert core.count_adapter_parameters(layer) == 2 * count
  x = jnp.asarray(X)
  _assert_identity(layer, x)  # alpha=1, theta=0: exactly the base
  theta, alpha = rng.normal(0, 0.7, count), rng.normal(1, 0.3, count)
  _set(layer.theta, theta)
  _set(layer.alpha, alpha)
  r = road_matrix(theta, alpha, variant, GS, OUT)
  weights = rng.standard_normal((2, 5, OUT)).astype(np.float32)
  got, merged_w, merged_b, grads = evaluate(layer, x, weights)
  expected = (X.astype(np.float64) @ w + b) @ r.T  # y = R (W x + b): the bias is rotated too (peft)
  assert _rel(got, expected) < 1e-6
  np.testing.assert_allclose(merged_w, w @ r.T, rtol=1e-5, atol=1e-6)
  assert _rel(X @ merged_w + merged_b, got) < 1e-6
  wj, bj = base.kernel[...], base.bias[...]

  def loss_dense(a):  # the dense formulation, differentiated by jax.grad
    rj = road_matrix(a["theta"], a["alpha"], variant, GS, OUT, xp=jnp)
    return jnp.sum(jnp.sin((x @ wj + bj) @ rj.T) * weights)

  _check_grads(grads, dense_grads(loss_dense, {"theta": theta, "alpha": alpha}))


def test_road_on_a_multi_axis_einsum_rotates_the_flattened_output_features():
  # nn.Einsum 'btd,dhk->bthk' (a q projection): out_features = h*k in kernel order; no bias.
  base = nn.Einsum("btd,dhk->bthk", (IN, 4, 6), ("embed", "heads", "head_dim"), rngs=nnx.Rngs(3))
  layer = _wrap(RoAdConfig("road_2", group_size=12), nnx.clone(base))
  assert layer.theta.get_metadata()["out_sharding"] == ("heads",)
  theta, alpha = rng.normal(0, 1, 24), rng.normal(1, 0.3, 24)
  _set(layer.theta, theta)
  _set(layer.alpha, alpha)
  w = np.asarray(base.kernel[...], np.float64).reshape(IN, 24)
  expected = (X @ w @ road_matrix(theta, alpha, "road_2", 12, 24).T).reshape(2, 5, 4, 6)
  assert _rel(jax.jit(lambda m, x: m(x))(layer, jnp.asarray(X)), expected) < 1e-6


# --- ETHER / ETHER+: dense block-diagonal reflections ------------------------------------------------------

def reflection_matrix(u, v=None, xp=np):
  """blockdiag(I - 2 û ûᵀ) (ETHER) or blockdiag(I - û ûᵀ + v̂ v̂ᵀ) (ETHER+), u/v [blocks, block]."""
  blocks, size = u.shape
  mask = np.kron(np.eye(blocks), np.ones((size, size)))

  def outer(a):
    unit = (a / xp.linalg.norm(a, axis=1, keepdims=True)).reshape(-1)
    return unit[:, None] * unit[None, :] * mask

  eye = np.eye(blocks * size)
  return eye - 2 * outer(u) if v is None else eye - outer(u) + outer(v)


def _ether_params(layer):
  names = ("u", "v", "u_in", "v_in") if layer.plus else ("u",)
  return {n: np.asarray(getattr(layer, n)[...], np.float64) for n in names}


@pytest.mark.parametrize("plus", [False, True])
def test_ether_init_numpy_forward_merge_orthogonality_and_grad(plus):
  base = _linear(1)
  w, b = _numpy_linear(base)
  layer = _wrap(ETHERConfig(num_blocks=4, plus=plus), nnx.clone(base), seed=5)
  assert isinstance(layer, ETHEREinsum) and core.count_adapter_parameters(layer) == (2 * (OUT + IN) if plus else OUT)
  x = jnp.asarray(X)
  if plus:  # v = -u at init: H+ = I on both sides, the base output exactly
    _assert_identity(layer, x)
    for name in ("u", "v", "u_in", "v_in"):
      _set(getattr(layer, name), rng.standard_normal(getattr(layer, name).shape))
  else:  # a reflection is never the identity: ETHER starts from the reflected base (the paper's init)
    assert layer.u.shape == (4, OUT // 4) and np.abs(np.asarray(layer.u[...])).max() <= 1 / np.sqrt(OUT // 4)
  p = _ether_params(layer)
  h_out = reflection_matrix(p["u"], p.get("v"))
  h_in = reflection_matrix(p["u_in"], p["v_in"]) if plus else np.eye(IN)
  weights = rng.standard_normal((2, 5, OUT)).astype(np.float32)
  got, merged_w, merged_b, grads = evaluate(layer, x, weights)
  expected = X.astype(np.float64) @ h_in @ w @ h_out + b  # the weight is transformed, the bias is not
  assert _rel(got, expected) < 1e-6
  if not plus:
    assert _rel(got, X @ w + b) > 1e-2
  np.testing.assert_array_equal(merged_b, b)
  assert _rel(merged_w, h_in @ w @ h_out) < 1e-6
  assert _rel(X @ merged_w + merged_b, got) < 1e-6
  if not plus:  # H is orthogonal: ‖Hz‖ = ‖z‖ (matrix-free application on random z)
    z = rng.standard_normal((50, OUT)).astype(np.float32)
    hz = np.asarray(jax.jit(lambda z: z + layer.output_delta(z))(z), np.float64)
    np.testing.assert_allclose(np.linalg.norm(hz, axis=1), np.linalg.norm(z, axis=1), rtol=1e-5)
    np.testing.assert_allclose(hz, z @ h_out, rtol=1e-5, atol=1e-5)
  wj, bj = base.kernel[...], base.bias[...]

  def loss_dense(a):
    ho = reflection_matrix(a["u"], a.get("v"), xp=jnp)
    hi = reflection_matrix(a["u_in"], a["v_in"], xp=jnp) if plus else jnp.eye(IN)
    return jnp.sum(jnp.sin(x @ hi @ wj @ ho + bj) * weights)

  _check_grads(grads, dense_grads(loss_dense, p))


def test_ether_plus_on_a_multi_axis_input_einsum():
  # 'bthk,hkd->btd' (an attention output projection): the input reflection acts on the flattened (h, k) axes.
  base = nn.Einsum("bthk,hkd->btd", (4, 4, OUT), ("heads", "head_dim", "embed"), rngs=nnx.Rngs(4), use_bias=True)
  _set(base.bias, rng.standard_normal(OUT))
  layer = _wrap(ETHERConfig(num_blocks=4, plus=True), nnx.clone(base))
  for name in ("u", "v", "u_in", "v_in"):
    _set(getattr(layer, name), rng.standard_normal(getattr(layer, name).shape))
  p = _ether_params(layer)
  x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
  w = np.asarray(base.kernel[...], np.float64).reshape(16, OUT)
  expected = (x.reshape(2, 3, 16) @ reflection_matrix(p["u_in"], p["v_in"]) @ w
              @ reflection_matrix(p["u"], p["v"]) + np.asarray(base.bias[...]))
  assert _rel(jax.jit(lambda m, x: m(x))(layer, jnp.asarray(x)), expected) < 1e-6


# --- LoReFT -------------------------------------------------------------------------------------------------

D, HIDDEN = 8, 32


class Plain(nnx.Module):
  """A user's model: residual MLP of nnx.Linear on [B, T, D]."""

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(D, HIDDEN, rngs=rngs), nnx.Linear(HIDDEN, D, rngs=rngs)])

  def __call__(self, x):
    return x + self.layers[1](jnp.tanh(self.layers[0](x)))


class _Capture(nnx.Module):
  """Keeps the hidden state its inner module returns (array or tuple element 0) in a variable."""

  def __init__(self, inner, shape):
    self.inner = inner
    self.seen = nnx.Variable(jnp.zeros(shape, jnp.float32))

  def __call__(self, *args, **kwargs):
    out = self.inner(*args, **kwargs)
    self.seen[...] = out[0] if isinstance(out, tuple) else out
    return out


def _capture_around(model, path, shape=(3, 7, HIDDEN)):
  """Records the intervention's input h (its inner module's output) and its output, in one compiled forward:
  model.<path>.seen is the output, model.<path>.inner.inner.seen the input."""
  intervention = calibration.get_module(model, path)
  intervention.inner = _Capture(intervention.inner, shape)
  calibration.set_module(model, path, _Capture(intervention, shape))


def loreft_numpy(h, r, w, b, mask):
  h = np.asarray(h, np.float64)
  phi = h + (h @ w.T + b - h @ r.T) @ r
  return np.where(mask[:, None], phi, h)


def _reft_params(wrapper):
  return (np.asarray(wrapper.rotation_matrix(), np.float64), np.asarray(wrapper.weight[...], np.float64),
          np.asarray(wrapper.bias[...], np.float64))


@pytest.mark.parametrize("positions,mask", [
    (("first", 2), np.arange(7) < 2),
    (("last", 3), np.arange(7) >= 4),
    (("first_last", 5, 4), np.ones(7, bool)),  # overlapping: each position once ("all" runs in the sharded test)
])
def test_loreft_on_a_plain_model_matches_numpy_and_leaves_other_positions_unchanged(positions, mask):
  model = Plain(nnx.Rngs(0))
  x = rng.standard_normal((3, 7, D)).astype(np.float32)
  w0, b0 = _numpy_linear(model.layers[0])
  w1, b1 = _numpy_linear(model.layers[1])
  wrapped = add_interventions(model, [(r"layers/0", ReFTConfig(rank=4, positions=positions))], seed=1)
  intervention = wrapped["layers/0"]
  assert list(wrapped) == ["layers/0"] and model.layers[0] is intervention
  assert intervention.dim == HIDDEN  # inferred from the linear layer's out_features
  r, w, b = _reft_params(intervention)
  np.testing.assert_allclose(r @ r.T, np.eye(4), atol=1e-5)
  # Record the wrapped layer's output h (inside the intervention) and the intervened state (outside it).
  _capture_around(model, "layers/0")
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))
  h, out = np.asarray(intervention.inner.seen[...]), np.asarray(model.layers[0].seen[...])
  np.testing.assert_array_equal(out[:, ~mask], h[:, ~mask])  # untouched positions: bit for bit
  phi = loreft_numpy(h, r, w, b, mask)
  assert _rel(out[:, mask], phi[:, mask]) < 1e-5 and _rel(out[:, mask], h[:, mask]) > 1e-3  # pyreft's init
  h_numpy = x.astype(np.float64) @ w0 + b0
  expected = x + np.tanh(loreft_numpy(h_numpy, r, w, b, mask)) @ w1 + b1
  assert _rel(got, expected) < 1e-5


def test_loreft_rotation_stays_orthonormal_through_gradient_steps_and_identity_init():
  model = Plain(nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((3, 7, D)), jnp.float32)
  identity = nnx.clone(model)
  add_interventions(identity, [(r"layers/1", ReFTConfig(rank=4, identity_init=True))])
  _capture_around(identity, "layers/1", (3, 7, D))
  nnx.jit(lambda m, x: m(x))(identity, x)
  seen_in, seen_out = identity.layers[1].inner.inner.seen[...], identity.layers[1].seen[...]
  np.testing.assert_array_equal(np.asarray(seen_out), np.asarray(seen_in))  # pyreft's identity init: exactly h
  add_interventions(model, {r"layers/1": ReFTConfig(rank=4, positions=("last", 2))})
  graphdef, adapters, rest = nnx.split(model, nn.Adapter, ...)
  target = jnp.asarray(rng.standard_normal((3, 7, D)), jnp.float32)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda a: jnp.mean((nnx.merge(graphdef, a, rest)(x) - target) ** 2)))
  before, grads = value_and_grad(adapters)
  flat = nnx.to_pure_dict(grads)["layers"][1]
  for name in ("rotation", "weight", "bias"):
    g = np.asarray(flat[name])
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, name
  # The rotation's gradient flows through the QR parametrization: central difference along a random direction.
  direction = rng.standard_normal((4, D)).astype(np.float32)
  values = {}
  for sign in (1, -1):
    shifted = jax.tree.map(lambda a: a, adapters)
    shifted["layers"][1]["rotation"][...] = adapters["layers"][1]["rotation"][...] + sign * 1e-2 * direction
    values[sign] = float(value_and_grad(shifted)[0])
  numeric = (values[1] - values[-1]) / 2e-2
  analytic = float(np.sum(np.asarray(flat["rotation"]) * direction))
  assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-5, (numeric, analytic)
  for _ in range(3):  # plain SGD on the free matrix: R = its orthonormalized rows stays orthonormal
    loss, grads = value_and_grad(adapters)
    adapters = jax.tree.map(lambda p, g: p - 0.5 * g, adapters, grads)
    nnx.update(model, adapters)
    r = np.asarray(model.layers[1].rotation_matrix(), np.float64)
    np.testing.assert_allclose(r @ r.T, np.eye(4), atol=1e-5)
  assert float(value_and_grad(adapters)[0]) < float(before)


# --- the TINY Llama: RoAd + LoReFT at block paths; 8 devices (fsdp_tp) = 1 device ----------------------------

LENGTH = 12
LAST_MASK = (np.arange(LENGTH) < 1) | (np.arange(LENGTH) >= LENGTH - 4)  # ("first_last", 1, 4)


def _peft_tiny(tiny):
  model = nnx.clone(tiny)
  core.add_adapters(model, [(r"blocks/\d+/mlp/(gate|up)", RoAdConfig("road_2")),
                            (r"blocks/\d+/attention/q", RoAdConfig("road_4", group_size=16))])
  wrapped = add_interventions(model, [(r"blocks/0/mlp", ReFTConfig(rank=4)),
                                      (r"blocks/(0|1)", ReFTConfig(rank=4, positions=("first_last", 1, 4)))],
                              seed=3)
  r = np.random.default_rng(7)
  for wrapper in core.adapters(model).values():
    _set(wrapper.theta, r.normal(0, 0.5, wrapper.theta.shape))
    _set(wrapper.alpha, r.normal(1, 0.2, wrapper.alpha.shape))
  return model, wrapped


def test_tiny_llama_loreft_at_block_paths_matches_numpy_and_sharded_equals_single_device(tiny):
  tokens = jax.random.randint(jax.random.key(5), (8, LENGTH), 0, llama.TINY.vocab_size, dtype=jnp.int32)
  single, wrapped = _peft_tiny(tiny)
  # Rules match any submodule path: both blocks (tuple outputs (x, cache)), and an MLP nested in a wrapped block
  # (wrapped inside out); d comes from model.config.embed_dim.
  assert list(wrapped) == ["blocks/0", "blocks/0/mlp", "blocks/1"]
  assert single.blocks[0].inner.mlp is wrapped["blocks/0/mlp"]
  assert all(isinstance(w, LoReFTIntervention) and w.dim == llama.TINY.embed_dim for w in wrapped.values())
  assert isinstance(single.blocks[0].inner.mlp.inner.gate, RoAdEinsum)
  r, w, b = _reft_params(wrapped["blocks/1"])
  model = nnx.clone(single)  # the sharded copy (taken before the capture wrappers go in)
  _capture_around(single, "blocks/1", tokens.shape + (llama.TINY.embed_dim,))
  expected = np.asarray(nnx.jit(lambda m, t: m(t))(single, tokens))
  h = np.asarray(single.blocks[1].inner.inner.seen[...])  # the last block's output hidden state
  out = np.asarray(single.blocks[1].seen[...])
  phi = loreft_numpy(h, r, w, b, LAST_MASK)
  assert _rel(out[:, LAST_MASK], phi[:, LAST_MASK]) < 1e-5
  np.testing.assert_array_equal(out[:, ~LAST_MASK], h[:, ~LAST_MASK])  # bit for bit
  scale = np.asarray(single.final_norm.scale[...], np.float64)
  normed = phi / np.sqrt((phi * phi).mean(-1, keepdims=True) + llama.TINY.norm_eps) * scale
  assert _rel(expected, normed @ np.asarray(single.embedding[...], np.float64).T) < 1e-5

  mesh = sharding.make_mesh("fsdp:2,tensor:2,data:2")
  assert sharding.shard_model(model, mesh, "fsdp_tp") == []
  theta = model.blocks[0].inner.mlp.inner.gate.theta[...]
  assert theta.sharding.shard_shape(theta.shape) == (llama.TINY.mlp_dim // 2,)  # named by the output axis
  rotation = model.blocks[1].rotation[...]
  assert rotation.sharding.shard_shape(rotation.shape) == (4, llama.TINY.embed_dim // 2)  # embed on fsdp
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda m, t: m(t))(model, jax.device_put(tokens, sharding.batch_sharding(mesh, "fsdp_tp")))
  assert len(logits.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


# --- bad input ----------------------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
  with pytest.raises(ValueError, match=r"group_size=3 must be an even int"):
    RoAdConfig(group_size=3)
  with pytest.raises(ValueError, match=r"variant='road_3'"):
    RoAdConfig(variant="road_3")
  with pytest.raises(ValueError, match=r"^layer: group_size=16 must divide the layer's out_features=24"):
    _wrap(RoAdConfig(group_size=16), _linear())
  with pytest.raises(ValueError, match=r"num_blocks=0 must be an int >= 1"):
    ETHERConfig(num_blocks=0)
  with pytest.raises(ValueError, match=r"^layer: num_blocks=5 must divide the layer's out_features=24"):
    _wrap(ETHERConfig(num_blocks=5), _linear())
  with pytest.raises(ValueError, match=r"^layer: num_blocks=3 must divide the layer's in_features=16"):
    _wrap(ETHERConfig(num_blocks=3, plus=True), _linear())
  with pytest.raises(ValueError, match=r"rank=0 must be an int >= 1"):
    ReFTConfig(rank=0)
  with pytest.raises(ValueError, match=r"positions=\('middle', 2\)"):
    ReFTConfig(positions=("middle", 2))
  with pytest.raises(ValueError, match=r"positions=\('first', 0\)"):
    ReFTConfig(positions=("first", 0))
  with pytest.raises(ValueError, match=r"positions='last'"):
    ReFTConfig(positions="last")
  with pytest.raises(ValueError, match=r"^layers/0: rank=33 must be <= the hidden size d=32"):
    add_interventions(Plain(nnx.Rngs(0)), [(r"layers/0", ReFTConfig(rank=33))])
  with pytest.raises(ValueError, match=r"^rules\[1\] 'blocks/\.\*' matches no submodule"):
    add_interventions(Plain(nnx.Rngs(0)), [(r"layers/0", ReFTConfig()), (r"blocks/.*", ReFTConfig())])
  with pytest.raises(ValueError, match=r"^rules\[0\] 'mlp' matches no linear layer path"):
    core.add_adapters(Plain(nnx.Rngs(0)), [("mlp", RoAdConfig(group_size=8))])
  with pytest.raises(ValueError, match=r"^layers: cannot infer the hidden size of List's output; pass "
                                       r"ReFTConfig\(dim=\.\.\.\)"):
    add_interventions(Plain(nnx.Rngs(0)), [(r"layers", ReFTConfig())])
