"""experiments.quant_formats and experiments.bench_quant at toy configs (no SmolLM2 load)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient import calibration, models
from experiments import bench_quant, quant_formats


def test_quant_formats_synthetic_only(tmp_path):
  config = quant_formats.default_config()
  config.update(model="none", rows=128, cols=256, student_t_nus="10,2", outlier_fractions="0.001",
                outlier_sigmas="100")
  results = quant_formats.run(config, str(tmp_path))
  assert results["weights"] is None and results["activations"] is None
  synthetic = results["synthetic"]
  assert set(synthetic) == {"gaussian", "student-t ν=10", "student-t ν=2", "0.1% outliers ≤100σ"}
  gaussian = synthetic["gaussian"]
  assert abs(gaussian["kurtosis"] - 3.0) < 0.3
  # Uniform int8 (255 levels over ±max) beats e4m3 (3 mantissa bits) on a Gaussian; theory: ~40 vs ~31 dB.
  assert 36 < gaussian["sqnr_db"]["int8 per-tensor"] < 43
  assert 29 < gaussian["sqnr_db"]["fp8 e4m3 per-tensor"] < 34
  assert gaussian["sqnr_db"]["fp8 e4m3 per-tensor"] > gaussian["sqnr_db"]["fp8 e5m2 per-tensor"]
  # Sparse 100σ outliers: the int8 step is set by the outliers, fp8's relative precision is not.
  outliers = synthetic["0.1% outliers ≤100σ"]
  assert outliers["max_over_bulk_sigma"] > 45 and outliers["kurtosis"] > 100
  assert outliers["sqnr_db"]["fp8 e4m3 per-tensor"] > outliers["sqnr_db"]["int8 per-tensor"] + 5
  for name in ("results.json", "results.md", "quant_formats.png"):
    assert (tmp_path / name).exists(), name
  claims = json.loads((tmp_path / "results.json").read_text())["claims"]
  assert claims[0]["claim"].startswith("Digest §Q") and "int8 ahead by" in claims[0]["measured"]


def test_tensor_stats_of_a_known_tensor():
  x = np.array([-2.0, -1.0, 0.0, 1.0, 2.0] * 4)  # mean 0, var 2, E[x^4] = (16 + 1) * 2 / 5 = 6.8
  stats = quant_formats.tensor_stats(x)
  assert stats["kurtosis"] == pytest.approx(6.8 / 4.0)
  assert stats["max_over_sigma"] == pytest.approx(2.0 / np.sqrt(2.0))
  assert stats["max_over_bulk_sigma"] == pytest.approx(2.0 / 1.4826)  # median |x| = 1


def test_projection_inputs_are_each_layers_distinct_inputs():
  loaded = models.load("tiny", dtype=jnp.float32)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, loaded.config.vocab_size)
  inputs = quant_formats.projection_inputs(loaded.model, tokens)
  layers = loaded.config.num_layers
  assert len(inputs) == 4 * layers  # q,k,v share one input, gate,up another; o and down their own
  assert "blocks/0/attention/q,k,v" in inputs and "blocks/0/mlp/gate,up" in inputs
  down = calibration.get_module(loaded.model, "blocks/0/mlp/down")
  assert inputs["blocks/0/mlp/down"].shape == (16, calibration.matrix_shape(down)[0])


def test_bad_quant_formats_config_is_refused(tmp_path):
  config = quant_formats.default_config()
  config.update(model="none", outlier_fractions="0.01,1.5")
  with pytest.raises(ValueError, match="outlier_fractions"):
    quant_formats.run(config, str(tmp_path))


def test_bench_quant_small(tmp_path):
  config = bench_quant.default_config()
  config.update(shapes="32x128x256", repeats=1, decode_m="1,16")
  results = bench_quant.run(config, str(tmp_path))
  stored = results["bytes_per_param"]
  assert stored["int8 per-channel"]["all 210 projections"] <= 1.02
  assert stored["int4 g128"]["down (1536x576)"] <= 0.52
  assert stored["int4 g128"]["q, o (576x576)"].startswith("n/a") and "divide" in stored["int4 g128"]["q, o (576x576)"]
  # Packed int4: half a byte per code plus one bf16 scale per 64 -> 0.5 + 2/64.
  assert stored["int4 g64"]["gate, up (576x1536)"] == pytest.approx(0.5 + 2 / 64)
  linear = results["linears"]["32x128x256"]
  assert linear["rel_error_vs_f32"]["ours W8A8"] < 0.02
  if linear["qwix_error"] is None:
    assert linear["rel_error_vs_f32"]["ours vs qwix"] < 0.02
  assert any("s32" in line and "dot(" in line for line in linear["hlo_dots"]["ours W8A8"])
  traffic = [t for t in results["decode_traffic"] if "traffic_ratio" in t]
  assert all(t["traffic_ratio"] >= 1.0 and t["bf16_bytes_over_quant"] > 1.5 for t in traffic)
  for name in ("results.json", "results.md", "bench_quant.png"):
    assert (tmp_path / name).exists(), name


def test_bad_bench_shapes_are_refused(tmp_path):
  config = bench_quant.default_config()
  config.shapes = "32x128"
  with pytest.raises(ValueError, match="--config.shapes='32x128'"):
    bench_quant.run(config, str(tmp_path))
