"""LoRA / rsLoRA / DoRA / QLoRA (`efficient.peft.lora`) and merging (`efficient.peft.merge`) on the TINY Llama
and on a plain NNX model (nnx.Linear + nnx.Einsum with biases), checked against NumPy re-derivations, a
dequantized float base, the exported TPU/GPU modules (the QLoRA base stays packed) and an 8-device mesh."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels
from efficient import calibration, nn, peft, sharding
from efficient.peft.lora import DoRAEinsum, LoRAConfig, LoRAEinsum, qlora
from efficient.peft.merge import merge_adapters, unmerge_adapters
from efficient.quant import QuantConfig, QuantizedEinsum, quantize_model
from efficient.quant import qarray as qa
from pallas_kernels import _dispatch
from pallas_kernels.quant_matmul import IMPLEMENTATIONS as QUANT_MATMUL_IMPLEMENTATIONS
from tests.helpers import LOWERING_TARGETS, assert_close, export_lowered, kernel_calls, rel_rms_error

TINY_RULES = [r".*attention/(q|v)", r".*mlp/.*"]
NF4 = QuantConfig(fmt="nf4", group_size=64, double_quant=True)
INT4 = QuantConfig(fmt="int4", group_size=32)
# TINY's QLoRA layers name their kernel explicitly (the CPU default is 'reference' too): an
# `implementation(...)` policy would re-key, and so recompile, every eager op of the model.
NF4_REF, INT4_REF = (dataclasses.replace(q, implementation="reference") for q in (NF4, INT4))
D, HIDDEN, HEADS, HEAD_DIM = 32, 64, 4, 8
# One token batch (and LoRA rank 4) for every TINY run: eager ops compile once per shape. Batch 4 = data x fsdp.
BATCH = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 8)), jnp.int32)


def _rules(config, patterns=TINY_RULES):
  return [(p, config) for p in patterns]


def _numpy_init(seed, std):
  """An initializer drawing with NumPy (eager jax.random compiles once per shape: seconds on a busy CPU)."""
  rng = np.random.default_rng(seed)
  return lambda key, shape, dtype=jnp.float32: jnp.asarray(std * rng.standard_normal(shape), dtype)


class Plain(nnx.Module):
  """A user's model: nnx.Linear (bias, logical names) then an nnx.Einsum head with a bias."""

  def __init__(self, seed):
    self.up = nnx.Linear(D, HIDDEN, bias_init=_numpy_init(seed + 1, 0.5), rngs=nnx.Rngs(seed),
                         kernel_init=nnx.with_partitioning(_numpy_init(seed, D ** -0.5), ("embed", "mlp"),
                                                           eager_sharding=False))
    self.head = nnx.Einsum("btf,fhk->bthk", (HIDDEN, HEADS, HEAD_DIM), (HEADS, HEAD_DIM), rngs=nnx.Rngs(seed),
                           kernel_init=_numpy_init(seed + 2, HIDDEN ** -0.5), bias_init=_numpy_init(seed + 3, 0.5))

  def __call__(self, x):
    return self.head(jax.nn.gelu(self.up(x)))


class OneLinear(nnx.Module):
  def __init__(self, k, n, seed):
    self.proj = nnx.Linear(k, n, kernel_init=_numpy_init(seed, k ** -0.5), bias_init=_numpy_init(seed + 1, 0.5),
                           rngs=nnx.Rngs(seed))

  def __call__(self, x):
    return self.proj(x)


class TwoLinear(nnx.Module):
  def __init__(self, seed):
    self.up = nnx.Linear(128, 256, kernel_init=_numpy_init(seed, 0.1), rngs=nnx.Rngs(seed))
    self.down = nnx.Linear(256, 128, kernel_init=_numpy_init(seed + 1, 0.1), rngs=nnx.Rngs(seed))

  def __call__(self, x):
    return self.down(jax.nn.relu(self.up(x)))


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _randomize(wrappers, seed=1, scale=0.2):
  """Nonzero B (and DoRA magnitudes moved off the norms) so adapters change the function and get gradients.
  NumPy draws: no per-shape compilation."""
  rng = np.random.default_rng(seed)
  for w in wrappers.values():
    w.lora_b.set_value(jnp.asarray(scale * rng.standard_normal(w.lora_b.shape), jnp.float32))
    if isinstance(w, DoRAEinsum):
      m = w.magnitude[...]
      w.magnitude.set_value(m * jnp.asarray(1 + 0.1 * rng.standard_normal(m.shape), jnp.float32))


def _np(a):
  return np.asarray(a, np.float64)


def _cotangent(shape):
  return jnp.asarray(np.random.default_rng(7).standard_normal(shape), jnp.float32)


def _loss_fn(graphdef, rest, x):
  def loss(adapters):
    out = nnx.merge(graphdef, adapters, rest)(x)
    return jnp.sum(out * _cotangent(out.shape)), out
  return loss


def _forward_and_grads(model, x):
  """(output, adapter gradients of sum(output * G) as a list of arrays), G a fixed random cotangent; jitted."""
  graphdef, adapters, rest = nnx.split(model, nn.Adapter, ...)

  @jax.jit
  def run(adapters, rest, x):
    (_, out), grads = jax.value_and_grad(_loss_fn(graphdef, rest, x), has_aux=True)(adapters)
    return out, grads

  out, grads = run(adapters, rest, x)
  return out, jax.tree.leaves(grads)


# --- LoRA on a float base -----------------------------------------------------------------------------------

def test_lora_at_init_is_the_base_bit_exactly(tiny):
  assert LoRAConfig() == LoRAConfig(rank=8, alpha=16.0, dropout=0.0, init="kaiming", use_rslora=False, dora=False)
  assert LoRAConfig().scaling == 2.0
  expected = tiny(BATCH)
  lora = nnx.clone(tiny)
  wrapped = peft.add_adapters(lora, _rules(LoRAConfig(rank=4)))
  assert len(wrapped) == 10 and all(type(w) is LoRAEinsum for w in wrapped.values())
  assert bool(jnp.all(lora(BATCH) == expected))
  # peft's kaiming_uniform(a=sqrt(5)) on A [in, r]: U(-1/sqrt(in), 1/sqrt(in)); B = 0; logical names.
  a = _np(wrapped["blocks/0/mlp/down"].lora_a[...])
  assert a.shape == (128, 4) and np.abs(a).max() <= 1 / np.sqrt(128) and np.abs(a).max() > 0.8 / np.sqrt(128)
  assert not np.any(_np(wrapped["blocks/0/mlp/down"].lora_b[...]))
  assert wrapped["blocks/0/attention/q"].lora_a.get_metadata()["out_sharding"] == ("embed", "lora_rank")
  assert wrapped["blocks/0/attention/q"].lora_b.get_metadata()["out_sharding"] == ("lora_rank", "heads")
  assert peft.count_adapter_parameters(lora) == 2 * 4 * (128 + 96 + 3 * 192)  # q, v, gate/up/down
  gaussian = LoRAConfig(rank=4, init="gaussian").wrap(Plain(0).head, nnx.Rngs(0), "head")  # peft: N(0, 1/r^2)
  assert abs(np.std(_np(gaussian.lora_a[...])) - 0.25) < 0.05


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_forward_matches_numpy_on_tiny_and_plain_layers(tiny, rslora):
  config = LoRAConfig(rank=4, alpha=8.0, use_rslora=rslora)
  s = 8.0 / (2.0 if rslora else 4.0)
  assert config.scaling == s
  rngs = nnx.Rngs(0)
  # Two TINY layers wrapped directly (the wrapper keeps the base unchanged) and the plain model's two layers.
  wrapped = {p: config.wrap(calibration.get_module(tiny, p), rngs, p)
             for p in ["blocks/0/attention/q", "blocks/1/mlp/down"]}
  plain = Plain(0)
  wrapped |= {f"plain/{p}": w for p, w in peft.add_adapters(plain, [(r"up|head", config)]).items()}
  _randomize(wrapped)
  for path, in_f in [("blocks/0/attention/q", 64), ("blocks/1/mlp/down", 128), ("plain/up", D),
                     ("plain/head", HIDDEN)]:
    w = wrapped[path]
    x = _x((2, 5, in_f))
    base = w.base
    kernel = _np(base.kernel[...])
    weight = kernel.reshape(kernel.shape[0], -1)
    bias = 0.0 if getattr(base, "bias", None) is None else _np(base.bias[...]).reshape(-1)
    xs = _np(x).reshape(-1, in_f)
    expected = xs @ weight + bias + s * (xs @ _np(w.lora_a[...])) @ _np(w.lora_b[...])
    got = jax.jit(lambda w, x: w(x))(w, x)
    assert got.shape == (2, 5) + kernel.shape[1:]
    np.testing.assert_allclose(_np(got).reshape(10, -1), expected, rtol=1e-5, atol=1e-5, err_msg=path)


def test_merge_equals_the_unmerged_forward_and_unmerge_restores_bit_exactly(tiny):
  # LoRA on attention, DoRA on the MLP: both wrapper kinds in one model (DoRA at init checked here too).
  model = nnx.clone(tiny)
  wrapped = peft.add_adapters(model, [(TINY_RULES[0], LoRAConfig(rank=4)), (TINY_RULES[1],
                                                                            LoRAConfig(rank=4, dora=True))])
  plain = Plain(1)
  wrapped_plain = peft.add_adapters(plain, [(r"up", LoRAConfig(rank=4)), (r"head", LoRAConfig(rank=4, dora=True))])
  x = _x((2, 6, D))
  expected, expected_plain = tiny(BATCH), plain.head.base(jax.nn.gelu(plain.up.base(x)))
  assert rel_rms_error(model(BATCH), expected) <= 1e-6  # DoRA at init: the base to rounding of the norm
  assert rel_rms_error(plain(x), expected_plain) <= 1e-6
  _randomize(wrapped, scale=0.02)
  _randomize(wrapped_plain, seed=5)
  before, before_plain = model(BATCH), plain(x)
  assert rel_rms_error(before, expected) > 1e-3  # the adapters do change the function
  merged, merged_plain = merge_adapters(model), merge_adapters(plain)
  assert merged == wrapped and merged_plain == wrapped_plain
  assert not peft.adapters(model) and peft.count_adapter_parameters(plain) == 0
  for path in wrapped:  # one plain layer of the base's class, its parameters' names kept
    layer = calibration.get_module(model, path)
    assert type(layer) is nn.Einsum
    assert layer.kernel.get_metadata()["out_sharding"] == wrapped[path].base.kernel.get_metadata()["out_sharding"]
  assert type(plain.up) is nnx.Linear and type(plain.head) is nnx.Einsum
  assert_close("merged TINY", model(BATCH), before, 1e-6)
  assert_close("merged plain", plain(x), before_plain, 1e-6)
  unmerge_adapters(model, merged)
  unmerge_adapters(plain, merged_plain)
  assert bool(jnp.all(model(BATCH) == before)) and bool(jnp.all(plain(x) == before_plain))


def test_dora_magnitude_gradient_matches_numpy():
  plain = Plain(2)
  wrapped = peft.add_adapters(plain, [(r"head", LoRAConfig(rank=4, alpha=4.0, dora=True))])
  _randomize(wrapped)
  w = wrapped["head"]
  assert isinstance(w, DoRAEinsum) and w.magnitude.get_metadata()["out_sharding"] == (None,)
  x = _x((2, 3, HIDDEN))
  graphdef, adapters, rest = nnx.split(w, nn.Adapter, ...)
  (_, out), grads = jax.jit(jax.value_and_grad(_loss_fn(graphdef, rest, x), has_aux=True))(adapters)
  out = _np(out).reshape(6, -1)
  g = _np(_cotangent((2, 3, HEADS, HEAD_DIM))).reshape(6, -1)
  weight = _np(w.base.kernel[...]).reshape(HIDDEN, -1) + _np(w.lora_a[...]) @ _np(w.lora_b[...])
  xs, m = _np(x).reshape(6, HIDDEN), _np(w.magnitude[...])
  norm = np.linalg.norm(weight, axis=0)
  np.testing.assert_allclose(out, xs @ weight * (m / norm) + _np(w.base.bias[...]).reshape(-1), rtol=1e-5,
                             atol=1e-5)
  assert_close("dm", grads["magnitude"][...], np.sum(g * (xs @ weight), axis=0) / norm, 1e-5)
  # The norm is detached: dB = s (x A)^T (g m / ||W'||), as peft's DoRA.
  expected_b = (xs @ _np(w.lora_a[...])).T @ (g * m / norm)
  assert_close("dB", grads["lora_b"][...], expected_b, 1e-5)


def test_dropout_is_on_in_train_mode_and_off_after_eval():
  model = OneLinear(32, 64, 0)
  wrapped = peft.add_adapters(model, [("proj", LoRAConfig(rank=4, dropout=0.5))], rngs=nnx.Rngs(0, dropout=1))
  _randomize(wrapped)
  x = _x((4, 32))
  train = model(x)
  model.eval()
  off = model(x)
  w = wrapped["proj"]
  expected = (_np(x) @ _np(w.base.kernel[...]) + _np(w.base.bias[...])
              + 4.0 * (_np(x) @ _np(w.lora_a[...])) @ _np(w.lora_b[...]))
  np.testing.assert_allclose(_np(off), expected, rtol=1e-5, atol=1e-5)
  assert rel_rms_error(train, off) > 1e-3


# --- QLoRA --------------------------------------------------------------------------------------------------

QLORA_CONFIG = LoRAConfig(rank=4)


@pytest.fixture(scope="module")
def qlora_pair(tiny):
  """(TINY with NF4 double-quantized q/v and int4 g32 MLP layers + LoRA with random B, its dequantized float twin:
  the float model with each quantized kernel replaced by its dequantized weight and the same adapter values),
  and the twin's output and adapter gradients on BATCH."""
  model = nnx.clone(tiny)
  quantize_model(model, [(TINY_RULES[0], NF4_REF), (TINY_RULES[1], INT4_REF)])
  wrapped = peft.add_adapters(model, _rules(QLORA_CONFIG))
  _randomize(wrapped)
  twin = nnx.clone(tiny)
  for path, w in wrapped.items():
    layer = calibration.get_module(twin, path)
    layer.kernel.set_value(calibration.matrix_to_kernel(layer, qa.dequantize(w.base.qarray, jnp.float32)))
  peft.add_adapters(twin, _rules(QLORA_CONFIG))
  nnx.update(twin, nnx.state(model, nn.Adapter))
  return model, twin, _forward_and_grads(twin, BATCH)


def test_qlora_tiny_adapter_gradients_equal_the_dequantized_float_base(qlora_pair):
  model, _, (expected_out, expected) = qlora_pair
  wrapped = peft.adapters(model)
  assert len(wrapped) == 10 and all(isinstance(w.base, QuantizedEinsum) for w in wrapped.values())
  assert dict(wrapped["blocks/0/attention/q"].base.meta)["fmt"] == "nf4"
  assert wrapped["blocks/0/attention/q"].base.scale_scale is not None  # double quantization
  assert dict(wrapped["blocks/0/mlp/up"].base.meta)["fmt"] == "int4"
  assert wrapped["blocks/0/mlp/up"].base.qvalue[...].dtype == jnp.uint8  # packed: the base stays packed
  assert wrapped["blocks/0/mlp/up"].base.implementation == "reference"
  out, grads = _forward_and_grads(model, BATCH)
  assert_close("QLoRA logits", out, expected_out, 1e-5)
  assert len(grads) == 20
  for i, (g, e) in enumerate(zip(grads, expected)):
    assert_close(f"adapter gradient {i}", g, e, 1e-5)


@pytest.mark.parametrize("implementation", _dispatch.cpu_runnable(QUANT_MATMUL_IMPLEMENTATIONS))
@pytest.mark.parametrize("quant", [NF4, INT4], ids=["nf4_double_quant", "int4_g32"])
def test_qlora_adapter_gradients_match_numpy_for_every_cpu_implementation(implementation, quant):
  model = OneLinear(64, 128, 3)
  w = qlora(model, "proj", quant=quant, lora=LoRAConfig(rank=4, alpha=4.0))["proj"]
  _randomize({"proj": w})
  x = _x((16, 64))
  with pallas_kernels.implementation(implementation):
    out, (grad_a, grad_b) = _forward_and_grads(model, x)
  weight = _np(qa.dequantize(w.base.qarray, jnp.float32))
  a, b, xs = _np(w.lora_a[...]), _np(w.lora_b[...]), _np(x)
  g = _np(_cotangent((16, 128)))
  assert_close("forward", out, xs @ weight + _np(w.base.bias[...]) + xs @ a @ b, 1e-5)
  assert_close("dA", grad_a, xs.T @ (g @ b.T), 1e-5)
  assert_close("dB", grad_b, (xs @ a).T @ g, 1e-5)


def test_dora_on_a_quantized_base_matches_numpy():
  model = OneLinear(64, 128, 4)
  w = qlora(model, "proj", lora=LoRAConfig(rank=4, alpha=4.0, dora=True))["proj"]
  assert isinstance(w, DoRAEinsum)
  weight = _np(qa.dequantize(w.base.qarray, jnp.float32))
  np.testing.assert_allclose(_np(w.magnitude[...]), np.linalg.norm(weight, axis=0), rtol=1e-6)
  _randomize({"proj": w})
  x = _x((16, 64))
  merged = weight + _np(w.lora_a[...]) @ _np(w.lora_b[...])
  ratio = _np(w.magnitude[...]) / np.linalg.norm(merged, axis=0)
  got = jax.jit(lambda m, x: m(x))(model, x)
  assert_close("DoRA on NF4", got, _np(x) @ merged * ratio + _np(w.base.bias[...]), 1e-5)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_qlora_forward_and_gradient_lower_with_the_base_packed(platform, monkeypatch):
  implementation, marker = LOWERING_TARGETS[platform]
  # The lowering tests export compiled kernels from a CPU host: let the policy pick them without their backend.
  monkeypatch.setattr(_dispatch, "_NEEDS_BACKEND", {})
  model = TwoLinear(0)
  qlora(model, ".*", quant=NF4, lora=LoRAConfig(rank=8))
  graphdef, adapters, rest = nnx.split(model, nn.Adapter, ...)

  def loss_and_grads(adapters, rest, x):
    return jax.value_and_grad(lambda a: jnp.mean(nnx.merge(graphdef, a, rest)(x) ** 2))(adapters)

  with pallas_kernels.implementation(implementation):
    exported = export_lowered(loss_and_grads, platform, adapters, rest, jax.ShapeDtypeStruct((32, 128), jnp.float32))
  assert kernel_calls(exported, marker) == 2  # one forward kernel per quantized layer; dx is XLA
  inputs = [(tuple(a.shape), a.dtype) for a in exported.in_avals]
  assert ((64, 256), jnp.uint8) in inputs and ((128, 128), jnp.uint8) in inputs  # packed NF4 codes
  assert not any(shape in [(128, 256), (256, 128)] for shape, _ in inputs)  # no dequantized weight goes in


def test_merge_with_a_quantized_base(tiny, qlora_pair):
  model = nnx.clone(qlora_pair[0])
  wrapped = peft.adapters(model)
  before = model(BATCH)
  with pytest.raises(ValueError, match=r"quantized_base=None.*blocks/0/attention/q"):
    merge_adapters(model)
  assert peft.adapters(model) == wrapped  # nothing changed
  merged = merge_adapters(model, quantized_base="dequantize")
  layer = calibration.get_module(model, "blocks/0/attention/q")
  assert type(layer) is nn.Einsum and layer.kernel.shape == (64, 4, 16)
  assert layer.kernel.get_metadata()["out_sharding"] == ("embed", "heads", None)
  assert_close("dequantize-merged", model(BATCH), before, 1e-5)
  unmerge_adapters(model, merged)
  assert bool(jnp.all(model(BATCH) == before))
  merge_adapters(model, quantized_base="requantize")
  for path, w in wrapped.items():
    layer = calibration.get_module(model, path)
    assert isinstance(layer, QuantizedEinsum) and layer.meta == w.base.meta  # same fmt, group size, axes
    assert (layer.scale_scale is None) == (w.base.scale_scale is None)
    assert layer.qvalue[...].shape == w.base.qvalue[...].shape
  # Requantizing costs about one more rounding: the order of the base's own quantization error.
  quantization_error = rel_rms_error(qlora_pair[1](BATCH), tiny(BATCH))  # dequantized twin vs float weights
  assert 0 < rel_rms_error(model(BATCH), before) < 2 * quantization_error
  with pytest.raises(ValueError, match="quantized_base='keep'"):
    merge_adapters(model, quantized_base="keep")


# --- bad input ------------------------------------------------------------------------------------------------

def test_bad_configs_and_rules_are_one_clear_value_error(tiny):
  with pytest.raises(ValueError, match=r"LoRAConfig.rank=0"):
    LoRAConfig(rank=0)
  with pytest.raises(ValueError, match=r"blocks/0/attention/v: rank=65 .*min\(in_features, out_features\) = 32"):
    peft.add_adapters(nnx.clone(tiny), [(r".*attention/v", LoRAConfig(rank=65))])
  with pytest.raises(ValueError, match=r"up: rank=33"):
    peft.add_adapters(Plain(0), [("up", LoRAConfig(rank=33))])
  with pytest.raises(ValueError, match=r"rules\[1\] '.*attention/qq'"):
    peft.add_adapters(nnx.clone(tiny), [(r".*mlp/up", LoRAConfig()), (r".*attention/qq", LoRAConfig())])
  for bad in [dict(alpha=0.0), dict(alpha=float("inf")), dict(dropout=1.0), dict(dropout=-0.1), dict(init="x")]:
    with pytest.raises(ValueError, match=f"LoRAConfig.{next(iter(bad))}"):
      LoRAConfig(**bad)
  with pytest.raises(ValueError, match="weight_only"):
    qlora(nnx.clone(tiny), ".*", quant=QuantConfig(fmt="fp8_e4m3"))
  with pytest.raises(ValueError, match="no adapter to merge"):
    merge_adapters(Plain(0))


# --- sharded ------------------------------------------------------------------------------------------------

def test_lora_on_8_devices_equals_single_device(qlora_pair):
  _, twin, (expected_out, expected) = qlora_pair
  model = nnx.clone(twin)  # float TINY + LoRA (random B)
  mesh = sharding.make_mesh("fsdp:2,tensor:2,data:2")
  sharding.shard_model(model, mesh, "fsdp_tp")
  a = peft.adapters(model)["blocks/0/attention/q"].lora_a[...]
  assert a.sharding.shard_shape(a.shape) == (32, 4)  # embed on fsdp, rank replicated
  b = peft.adapters(model)["blocks/0/mlp/up"].lora_b[...]
  assert b.sharding.shard_shape(b.shape) == (4, 64)  # mlp on tensor
  with jax.set_mesh(mesh):
    out, grads = _forward_and_grads(model, jax.device_put(BATCH, sharding.batch_sharding(mesh, "fsdp_tp")))
  assert len(out.sharding.device_set) == 8
  assert_close("sharded logits", out, expected_out, 1e-5)
  for i, (g, e) in enumerate(zip(grads, expected)):
    assert_close(f"sharded adapter gradient {i}", g, e, 1e-5)
