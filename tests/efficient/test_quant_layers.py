"""efficient.quant layers and rules on llama.TINY: quantized Einsums against dequantized-weight references,
rule matching, SmoothQuant's exact folding, LLM.int8()'s decomposition, orbax round trips."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from efficient import calibration, nn, quant
from efficient.models import llama
from efficient.quant import QuantConfig, layers, rules


def _dequantized_float_model(float_model, quantized):
  """The float model with every quantized projection's kernel replaced by its dequantized weight."""
  model = nnx.clone(float_model)
  for path, module in calibration.einsum_modules(quantized, types=(layers._QuantizedProjection,)).items():
    target = calibration.get_module(model, path)
    target.kernel[...] = calibration.matrix_to_kernel(target, module.weight_matrix())
  return model


WEIGHT_ONLY = [QuantConfig(fmt="int8"), QuantConfig(fmt="int4", group_size=16),
               QuantConfig(fmt="int4", group_size=32, symmetric=False), QuantConfig(fmt="nf4"),
               QuantConfig(fmt="int3", group_size=16), QuantConfig(fmt="fp8_e4m3"), QuantConfig(fmt="mxfp4")]


@pytest.mark.parametrize("config", WEIGHT_ONLY, ids=lambda c: f"{c.fmt}-g{c.group_size}-sym{c.symmetric}")
def test_weight_only_matches_dequantized_weights(tiny, tokens, config):
  quantized = quant.quantize_model(nnx.clone(tiny), [(r".*", config)])
  assert all(isinstance(m, layers.QuantizedEinsum) for m in calibration.einsum_modules(
      quantized, types=(nn.Einsum, layers.QuantizedEinsum)).values())
  expected = _dequantized_float_model(tiny, quantized)(tokens)
  np.testing.assert_allclose(quantized(tokens), expected, rtol=1e-4, atol=1e-4)


def test_activation_quantized_modes_track_float(tiny, tokens):
  reference = tiny(tokens)
  for config, min_sqnr in ((QuantConfig(mode="w8a8"), 30.0), (QuantConfig(fmt="fp8_e4m3", mode="fp8"), 20.0)):
    out = quant.quantize_model(nnx.clone(tiny), [(r".*", config)])(tokens)
    assert float(quant.sqnr_db(reference, out)) > min_sqnr, config


def test_w8a8_module_is_per_token_int8_product(tiny):
  module = tiny.blocks[0].mlp.down
  q = quant.quantize(calibration.kernel_as_matrix(module), "int8", axis=0)
  layer = layers.QuantizedEinsum(module, q, mode="w8a8")
  x = jax.random.normal(jax.random.key(2), (2, 5, llama.TINY.mlp_dim))
  scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
  x_hat = jnp.clip(jnp.round(x / scale), -127, 127) * scale
  np.testing.assert_allclose(layer(x), x_hat @ quant.dequantize(q), rtol=1e-4, atol=1e-5)


def test_llm_int8_decomposition(tiny):
  module = tiny.blocks[0].mlp.gate
  q = quant.quantize(calibration.kernel_as_matrix(module), "int8", axis=0)
  x = jax.random.normal(jax.random.key(3), (2, 5, llama.TINY.embed_dim)).at[:, :, 3].mul(40.0)
  w8a8 = layers.QuantizedEinsum(module, q, mode="w8a8")
  never = layers.LLMInt8Einsum(module, q, threshold=1e9)   # no outliers: plain vector-wise int8
  np.testing.assert_allclose(never(x), w8a8(x), rtol=1e-6, atol=1e-6)
  always = layers.LLMInt8Einsum(module, q, threshold=1e-9)  # every feature an outlier: float product
  np.testing.assert_allclose(always(x), x @ quant.dequantize(q), rtol=1e-5, atol=1e-5)
  llm = layers.LLMInt8Einsum(module, q)  # threshold 6: feature 3 in float, the rest int8 without its range
  assert np.asarray(llm.outlier_features(x.reshape(-1, x.shape[-1]))).nonzero()[0].tolist() == [3]
  exact = x @ quant.dequantize(q)
  assert float(quant.sqnr_db(exact, llm(x))) > float(quant.sqnr_db(exact, w8a8(x))) + 10


def test_rules_first_match_wins_and_none_leaves_float(tiny):
  int4 = QuantConfig(fmt="int4", group_size=16)
  chosen = rules.plan(tiny, [(r".*/mlp/down", None), (r".*/mlp/.*", int4), (r".*/attention/(q|k)", QuantConfig())])
  assert sorted(chosen) == ["blocks/0/attention/k", "blocks/0/attention/q", "blocks/0/mlp/gate",
                            "blocks/0/mlp/up", "blocks/1/attention/k", "blocks/1/attention/q",
                            "blocks/1/mlp/gate", "blocks/1/mlp/up"]
  assert chosen["blocks/1/mlp/up"] is int4
  with pytest.raises(ValueError, match=r"rules\[0\]"):
    rules.plan(tiny, [("(", None)])
  with pytest.raises(ValueError, match="calibration_data"):
    quant.quantize_model(nnx.clone(tiny), [(".*", QuantConfig(fmt="int4", group_size=16, method="gptq"))])
  with pytest.raises(ValueError, match="mode"):
    QuantConfig(mode="w8a8", fmt="int4")
  with pytest.raises(ValueError, match="fmt"):
    QuantConfig(fmt="int5")
  with pytest.raises(ValueError, match="group_size"):
    quant.quantize_model(nnx.clone(tiny), [(".*", QuantConfig(fmt="int4", group_size=48))])


def test_quantized_variables_carry_logical_axes(tiny):
  quantized = quant.quantize_model(nnx.clone(tiny), [(".*", QuantConfig(fmt="int4", group_size=16))])
  o, gate = quantized.blocks[0].attention.o, quantized.blocks[0].mlp.gate
  assert isinstance(o.qvalue, layers.QuantizedWeight) and not isinstance(o.qvalue, nnx.Param)
  assert o.qvalue.get_metadata()["out_sharding"] == ("heads", "embed")
  assert gate.qvalue.get_metadata()["out_sharding"] == ("embed", "mlp")
  assert gate.scale.get_metadata()["out_sharding"] == ("embed", "mlp")
  assert gate.qvalue[...].dtype == jnp.uint8 and gate.qvalue[...].shape == (llama.TINY.embed_dim // 2,
                                                                            llama.TINY.mlp_dim)


def test_smoothquant_folding_is_exact(tiny, tokens):
  model = nnx.clone(tiny)
  # Give the norms and activations some per-channel spread so the factors are far from 1.
  for block in model.blocks:
    block.attention_norm.scale[...] = jnp.linspace(0.2, 5.0, llama.TINY.embed_dim)
  reference = model(tokens)
  alphas = {p: 0.5 for p in calibration.einsum_modules(model, r".*/(attention/(q|k|v)|mlp/(gate|up))")}
  factors = rules.smooth_model(model, alphas, [{"tokens": tokens}])
  assert len(factors) == 2 * llama.TINY.num_layers
  assert float(jnp.max(jnp.abs(jnp.log(factors["blocks/0/attention_norm"])))) > 0.5
  np.testing.assert_allclose(model(tokens), reference, rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="RMSNorm"):
    rules.smooth_model(model, {"blocks/0/mlp/down": 0.5}, [{"tokens": tokens}])


def test_gptq_rule_beats_rtn_on_the_model(tiny, tokens):
  batches = [{"tokens": jax.random.randint(jax.random.key(s), (4, 32), 0, 256, dtype=jnp.int32)} for s in (1, 2)]
  reference = tiny(tokens)
  errors = {}
  for method in ("rtn", "gptq"):
    config = QuantConfig(fmt="int3", group_size=32, method=method)
    errors[method] = float(quant.sqnr_db(reference, quant.quantize_model(nnx.clone(tiny), [(".*", config)],
                                                                         calibration_data=batches)(tokens)))
  assert errors["gptq"] > errors["rtn"], errors


def test_orbax_round_trip_is_bit_identical(tiny, tokens, tmp_path):
  config = [(r".*/mlp/.*", QuantConfig(fmt="int4", group_size=16)), (r".*/attention/o", QuantConfig(fmt="nf4")),
            (r".*", QuantConfig(mode="w8a8"))]
  quantized = quant.quantize_model(nnx.clone(tiny), config)
  graphdef, state = nnx.split(quantized)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "q", state)
  checkpointer.wait_until_finished()
  # Restore into a skeleton quantized the same way from another float model (same structure, other values).
  skeleton = quant.quantize_model(llama.Llama(llama.TINY, rngs=nnx.Rngs(7)), config)
  target_def, target_state = nnx.split(skeleton)
  restored = checkpointer.restore(tmp_path / "q", target_state)
  gate = restored["blocks"][0]["mlp"]["gate"]["qvalue"]
  assert gate[...].dtype == jnp.uint8 and gate[...].shape[0] == llama.TINY.embed_dim // 2  # packed stays packed
  np.testing.assert_array_equal(nnx.merge(target_def, restored)(tokens), quantized(tokens))
  hash(graphdef)  # jit takes it as a static argument (train.evaluate does)
