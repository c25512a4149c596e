"""Rules on a user's own NNX model: `quantize_model`, `prune_model`, QAT and calibration capture find flax's own
`nnx.Linear` / `nnx.Einsum` layers (with biases) by full-match path rules, checked against independent NumPy
re-derivations (int8/int4 RTN weights, 2 XᵀX / n, Wanda's 2:4 choice, y = x Ŵ + b), GPTQ's layer error against
RTN's, the errors a rule or a model gets wrong, and the quantized model on 8 fake devices. Imports nothing from
efficient.models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient import calibration, quant, sharding
from efficient.quant import QuantConfig, layers, qat
from efficient.sparse import layers as sparse_layers
from efficient.sparse import prune

D, HIDDEN, HEADS, HEAD_DIM = 32, 64, 4, 8
PATHS = ["layers/0", "layers/1", "head"]


def _named(init, names):
  return nnx.with_partitioning(init, names, eager_sharding=False)


class PlainModel(nnx.Module):
  """A user's model: a 2-layer residual MLP of nnx.Linear (biases; the first with logical axis names, the second
  without any) and an nnx.Einsum head [B, T, D] -> [B, T, heads, head_dim] with a bias."""

  def __init__(self, rngs: nnx.Rngs):
    normal = nnx.initializers.normal(0.5)
    self.layers = nnx.List([
        nnx.Linear(D, HIDDEN, kernel_init=_named(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                   bias_init=_named(normal, ("mlp",)), rngs=rngs),
        nnx.Linear(HIDDEN, D, bias_init=normal, rngs=rngs)])
    self.head = nnx.Einsum("btd,dhk->bthk", (D, HEADS, HEAD_DIM), (HEADS, HEAD_DIM), bias_init=normal,
                           kernel_init=_named(nnx.initializers.lecun_normal(), ("embed", "heads", "head_dim")),
                           rngs=rngs)

  def __call__(self, x):
    h = jax.nn.gelu(self.layers[0](x))
    return self.head(x + self.layers[1](h))


class NoLinear(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(D, rngs=rngs)

  def __call__(self, x):
    return self.norm(x)


def _inputs(seed, batch=4, length=16):
  """Correlated features of different scales (the regime where GPTQ beats RTN)."""
  rng = np.random.default_rng(seed)
  mixing = np.random.default_rng(99).standard_normal((D, D)) * 0.5 + np.eye(D)
  scales = np.exp(np.random.default_rng(98).normal(0, 0.7, D))
  return ((rng.standard_normal((batch * length, D)) @ mixing) * scales).reshape(batch, length, D).astype(np.float32)


CALIBRATION = [_inputs(1), _inputs(2)]
X = _inputs(0)


@pytest.fixture(scope="module")
def plain():
  return PlainModel(nnx.Rngs(0))


# --- the NumPy side: weights as [in, out] matrices, the forward in float64 -----------------------------------

def _weights(model) -> dict:
  """{path: (W [in, out], b [out])} in float64; the head's kernel [D, H, K] flattened to [D, H*K]."""
  out = {}
  for path in PATHS:
    m = calibration.get_module(model, path)
    kernel = np.asarray(m.kernel[...], np.float64)
    out[path] = (kernel.reshape(kernel.shape[0], -1), np.asarray(m.bias[...], np.float64).reshape(-1))
  return out


def _gelu(x):  # jax.nn.gelu's default (tanh) form
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _forward(weights, x):
  """(output [B, T, H, K], {path: that layer's input rows [n, in]})."""
  shape = x.shape[:-1] + (HEADS, HEAD_DIM)
  x = np.asarray(x, np.float64).reshape(-1, D)
  inputs = {"layers/0": x}
  h = _gelu(x @ weights["layers/0"][0] + weights["layers/0"][1])
  inputs["layers/1"] = h
  r = x + h @ weights["layers/1"][0] + weights["layers/1"][1]
  inputs["head"] = r
  y = r @ weights["head"][0] + weights["head"][1]
  return y.reshape(shape), inputs


def _calibration_inputs(weights) -> dict:
  per_batch = [_forward(weights, b)[1] for b in CALIBRATION]
  return {p: np.concatenate([rows[p] for rows in per_batch]) for p in PATHS}


def _rtn(w, bits):
  """Symmetric per-output-channel RTN in float32, as the literature writes it: s = max|w| / qmax."""
  qmax = 2 ** (bits - 1) - 1
  w = w.astype(np.float32)
  s = np.max(np.abs(w), axis=0) / np.float32(qmax)
  return np.clip(np.round(w / s), -qmax, qmax) * s


def _matrix(model, path):
  return np.asarray(calibration.get_module(model, path).weight_matrix(), np.float64)


# --- (a) quantization ---------------------------------------------------------------------------------------

def test_int8_rules_quantize_every_linear_and_keep_the_bias(plain):
  weights = _weights(plain)
  model = quant.quantize_model(nnx.clone(plain), [(r"layers/\d+", QuantConfig(fmt="int8")),
                                                  (r"head", QuantConfig(fmt="int8"))])
  for path in PATHS:
    module = calibration.get_module(model, path)
    assert isinstance(module, layers.QuantizedEinsum) and isinstance(module.bias, nnx.Param)
    np.testing.assert_array_equal(np.asarray(module.bias[...]).reshape(-1), weights[path][1])
    np.testing.assert_allclose(_matrix(model, path), _rtn(weights[path][0], 8), rtol=1e-6, atol=0)
  rtn_weights = {p: (_rtn(w, 8).astype(np.float64), b) for p, (w, b) in weights.items()}
  expected, _ = _forward(rtn_weights, X)
  got = np.asarray(model(jnp.asarray(X)))
  assert got.shape == (4, 16, HEADS, HEAD_DIM)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  floating, _ = _forward(weights, X)
  relative = np.linalg.norm(got - floating) / np.linalg.norm(floating)
  assert 1e-4 < relative < 2e-2, relative  # int8 is close to, but not, the float model
  # The logical names of the kernel reach the codes and scales; the unnamed nnx.Linear gives None axes.
  assert model.layers[0].qvalue.get_metadata()["out_sharding"] == ("embed", "mlp")
  assert model.layers[0].scale.get_metadata()["out_sharding"] == (None, "mlp")
  assert model.layers[1].qvalue.get_metadata()["out_sharding"] == (None, None)
  assert model.head.qvalue.get_metadata()["out_sharding"] == ("embed", "heads")


def test_calibration_capture_on_the_plain_model(plain):
  hessians = calibration.capture_hessians(plain, CALIBRATION)
  assert list(hessians) == ["head", "layers/0", "layers/1"]  # natural path order
  for path, x2 in _calibration_inputs(_weights(plain)).items():
    expected = 2.0 * x2.T @ x2 / x2.shape[0]
    assert hessians[path]["count"] == x2.shape[0] == 128
    np.testing.assert_allclose(hessians[path]["hessian"], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(hessians[path]["absmax"], np.abs(x2).max(axis=0), rtol=1e-5)
  assert all(isinstance(calibration.get_module(plain, p), (nnx.Linear, nnx.Einsum)) for p in PATHS)  # restored


def test_int4_gptq_layer_error_below_rtn_on_the_calibration_inputs(plain):
  weights = _weights(plain)
  inputs = _calibration_inputs(weights)
  models = {method: quant.quantize_model(nnx.clone(plain), [(".*", QuantConfig(fmt="int4", method=method))],
                                         calibration_data=CALIBRATION) for method in ("rtn", "gptq")}
  for path in PATHS:
    w, x2 = weights[path][0], inputs[path]
    np.testing.assert_allclose(_matrix(models["rtn"], path), _rtn(w, 4), rtol=1e-6, atol=0)
    errors = {m: float(np.sum((x2 @ (w - _matrix(models[m], path))) ** 2)) for m in models}
    assert errors["gptq"] < 0.9 * errors["rtn"], (path, errors)
    # Per-channel GPTQ keeps RTN's scales max|w| / 7 and moves weights between those 15 levels.
    codes = _matrix(models["gptq"], path) / (np.max(np.abs(w), axis=0) / 7)
    assert np.all(np.abs(codes - np.round(codes)) < 1e-3) and np.all(np.abs(np.round(codes)) <= 7)
    assert np.mean(np.round(codes) != np.round(_matrix(models["rtn"], path) / (np.max(np.abs(w), axis=0) / 7))) > 0.05
  out = {m: np.asarray(model(jnp.asarray(X))) for m, model in models.items()}
  floating, _ = _forward(weights, X)
  assert np.linalg.norm(out["gptq"] - floating) < np.linalg.norm(out["rtn"] - floating)


def test_qat_on_the_plain_model_starts_at_rtn_and_converts(plain):
  rtn = quant.quantize_model(nnx.clone(plain), [(".*", QuantConfig(fmt="int4"))])(jnp.asarray(X))
  model = qat.prepare_qat(nnx.clone(plain), [(r"layers/\d+|head", qat.QATConfig(bits=4))])
  assert isinstance(model.layers[1], qat.FakeQuantEinsum) and model.layers[1].bias is not None
  np.testing.assert_allclose(model(jnp.asarray(X)), rtn, rtol=1e-5, atol=1e-5)
  converted = qat.convert_qat(model)
  assert isinstance(converted.head, layers.QuantizedEinsum)
  np.testing.assert_allclose(converted(jnp.asarray(X)), rtn, rtol=1e-5, atol=1e-5)


# --- (b) pruning --------------------------------------------------------------------------------------------

def test_wanda_2_4_on_the_plain_model_matches_numpy(plain):
  weights = _weights(plain)
  inputs = _calibration_inputs(weights)
  model = nnx.clone(plain)
  report = prune.prune_model(model, [(r"layers/\d+", prune.PruneConfig("wanda", nm=(2, 4))), (r"head", None)],
                             calibration_data=CALIBRATION)
  assert sorted(report) == ["layers/0", "layers/1"]
  pruned = {}
  for path in ("layers/0", "layers/1"):
    w, b = weights[path]
    scores = np.abs(w) * np.linalg.norm(inputs[path], axis=0)[:, None]  # |W_ij| * ||X_i||
    groups = scores.reshape(w.shape[0] // 4, 4, w.shape[1])
    ranks = np.argsort(np.argsort(-groups, axis=1, kind="stable"), axis=1, kind="stable")
    keep = (ranks < 2).reshape(w.shape)
    np.testing.assert_array_equal(np.asarray(report[path]["mask"]), keep)
    kernel = np.asarray(calibration.get_module(model, path).kernel[...])
    zeros = (kernel == 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(axis=1)
    assert np.all(zeros == 2)  # every 4-group along the input axis holds exactly 2 zeros
    np.testing.assert_array_equal(kernel, np.where(keep, w, 0).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(calibration.get_module(model, path).bias[...]), b)
    pruned[path] = (w * keep, b)
  pruned["head"] = weights["head"]
  expected, _ = _forward(pruned, X)  # x @ (W * mask) + b, the head dense
  np.testing.assert_allclose(model(jnp.asarray(X)), expected, rtol=1e-4, atol=1e-4)
  # The same masks as SparseEinsum layers (bias kept) compute the same function.
  masked = nnx.clone(plain)
  swapped = sparse_layers.apply_masks(masked, {p: report[p]["mask"] for p in report})
  assert swapped["layers/0"].mask.get_metadata()["out_sharding"] == ("embed", "mlp")
  assert swapped["layers/1"].mask.get_metadata()["out_sharding"] == (None, None)
  np.testing.assert_allclose(masked(jnp.asarray(X)), expected, rtol=1e-4, atol=1e-4)


# --- (c) errors ---------------------------------------------------------------------------------------------

def test_a_rule_matching_nothing_names_the_rule(plain):
  with pytest.raises(ValueError, match=r"^rules\[1\] 'blocks/\.\*' matches no linear layer path in full"):
    quant.quantize_model(nnx.clone(plain), [(r"head", None), (r"blocks/.*", QuantConfig())])
  # Full match: 'layers' is a prefix of 'layers/0', which re.search would have matched.
  with pytest.raises(ValueError, match=r"^rules\[0\] 'layers' matches no linear layer path in full"):
    prune.prune_model(nnx.clone(plain), [("layers", prune.PruneConfig())])
  with pytest.raises(ValueError, match=r"^rules\[0\] 'layer' matches no linear layer path"):
    qat.prepare_qat(nnx.clone(plain), [("layer", qat.QATConfig())])
  with pytest.raises(ValueError, match=r"^pattern='mlp' matches no linear layer path in full"):
    calibration.capture_hessians(plain, CALIBRATION, pattern="mlp")


def test_a_model_without_linear_layers_raises():
  model = NoLinear(nnx.Rngs(0))
  message = r"^model \(NoLinear\) has no linear layer \(efficient.nn.Einsum, nnx.Linear, nnx.Einsum\)"
  with pytest.raises(ValueError, match=message):
    quant.quantize_model(model, [(".*", QuantConfig())])
  with pytest.raises(ValueError, match=message):
    prune.prune_model(model, [(".*", prune.PruneConfig())])
  with pytest.raises(ValueError, match=message):
    calibration.capture_hessians(model, CALIBRATION)


# --- sharding -----------------------------------------------------------------------------------------------

def test_quantized_plain_model_on_8_devices_equals_single_device(plain):
  rules = [(r"layers/0", QuantConfig(fmt="int4", group_size=16, method="gptq")), (r".*", QuantConfig(fmt="int8"))]
  x = jnp.asarray(_inputs(3, batch=8))
  single = quant.quantize_model(nnx.clone(plain), rules, calibration_data=CALIBRATION)
  expected = np.asarray(jax.jit(lambda m, x: m(x))(single, x))
  model = quant.quantize_model(nnx.clone(plain), rules, calibration_data=CALIBRATION)
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  assert sharding.shard_model(model, mesh, "fsdp_tp") == []
  codes, scale = model.layers[0].qvalue[...], model.layers[0].scale[...]
  assert codes.sharding.shard_shape(codes.shape) == (codes.shape[0] // 2, HIDDEN // 2)  # embed/fsdp, mlp/tensor
  assert scale.sharding.shard_shape(scale.shape) == (scale.shape[0] // 2, HIDDEN // 2)
  head = model.head.qvalue[...]
  assert head.sharding.shard_shape(head.shape) == (D // 2, HEADS * HEAD_DIM // 2)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda m, x: m(x))(model, jax.device_put(x, sharding.batch_sharding(mesh, "fsdp_tp", ndim=3)))
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
