"""experiments.prune end to end on the random-init tiny Llama: every method x pattern row, results files, claims."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import prune as prune_experiment


def test_prune_experiment_on_tiny_model(tmp_path):
  config = prune_experiment.default_config()
  config.update(model="tiny", calibration_batches=2, calibration_batch_size=2, seq_len=32, eval_batches=1,
                eval_batch_size=2, block_size=32)
  results = prune_experiment.run(config, str(tmp_path))
  methods = ("magnitude", "wanda", "sparsegpt")
  assert sorted(results["rows"]) == sorted([f"{m} {p}" for m in methods for p in ("50%", "2:4")]
                                           + [f"{m} 2:4 + int4 {q}" for m in methods for q in ("rtn", "gptq")])
  for name, row in results["rows"].items():
    # int4 rounds a few small kept values to zero too: the quantized rows are at least as sparse
    low, high = (0.5, 0.51) if row.get("quantized") else (0.4995, 0.5005)
    assert low - 1e-3 <= row["sparsity"] <= high and row["projections"] == 14, name
    assert row["nm_valid"] in (None, True)
  # int4 codes of the kept half (1/4 byte per entry) + bf16 scale per 32 kept + 2-bit positions, vs 4 bytes
  for quantizer in ("rtn", "gptq"):
    row = results["rows"][f"sparsegpt 2:4 + int4 {quantizer}"]
    assert row["bytes"]["ratio"] == pytest.approx((0.25 + 1 / 32 + 1 / 8) / 4) and row["nm_valid"] is True
  two_four = results["rows"]["sparsegpt 2:4"]["bytes"]
  assert two_four["ratio"] == pytest.approx(0.5 + 1 / 32)  # f32 halves + 2 bits per kept value, measured
  unstructured = results["rows"]["wanda 50%"]["bytes"]
  assert unstructured["ratio"] == pytest.approx(0.5 + 1 / 32)  # f32 halves + 1-bit mask, measured
  markdown = (tmp_path / "results.md").read_text()
  assert "| seed claim | measured | verdict |" in markdown and "SparseGPT <= Wanda < magnitude" in markdown
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["results"]["dense"]["perplexity"] > 1
  assert saved["plots"] == [str(tmp_path / "prune.png")] and "![prune.png](prune.png)" in markdown
  assert (tmp_path / "prune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quantized_nm_storage_keeps_the_pattern_within_half_a_step():
  rng = np.random.default_rng(0)
  dense = rng.normal(size=(128, 24)).astype(np.float32)
  keep = np.argsort(-np.abs(dense.reshape(32, 4, 24)), axis=1)[:, :2]   # the 2 largest of every 4 inputs
  mask = np.zeros((32, 4, 24), bool)
  np.put_along_axis(mask, keep, True, axis=1)
  sparse_dense = np.where(mask.reshape(128, 24), dense, 0)
  restored, nbytes = prune_experiment.quantize_nm_values(jnp.asarray(sparse_dense), 2, 4, "int4", 32)
  restored = np.asarray(restored)
  assert np.array_equal(restored != 0, sparse_dense != 0) or np.all(restored[sparse_dense == 0] == 0)
  # Symmetric int4 per group of 32 kept values (= 64 inputs): step = absmax / 7 of the group, error <= step / 2.
  kept = sparse_dense.reshape(32, 4, 24)[mask].reshape(-1)  # not in storage order; only its absmax per group is used
  groups = [np.abs(np.where(mask.reshape(128, 24), sparse_dense, 0)[64 * g:64 * (g + 1)]).max(axis=0)
            for g in range(2)]
  step = np.repeat(np.stack(groups), 64, axis=0) / 7
  assert np.all(np.abs(restored - sparse_dense) <= step / 2 * 1.01 + 1e-7)
  assert kept.size == 64 * 24 and nbytes == 64 * 24 // 2 + 2 * 24 * 2 + 64 * 24 // 4
  # With a Hessian: GPTQ under the fixed mask, stored in the same bytes, still 2:4, and a smaller layer error
  # than RTN on correlated inputs.
  x = rng.normal(size=(512, 128)) @ (np.eye(128) + rng.normal(size=(128, 128)) / 6)
  hessian = jnp.asarray(2 * x.T @ x / 512, jnp.float32)
  gptq, gptq_bytes = prune_experiment.quantize_nm_values(jnp.asarray(sparse_dense), 2, 4, "int4", 32, hessian)
  gptq = np.asarray(gptq)
  assert gptq_bytes == nbytes and np.all(gptq[sparse_dense == 0] == 0)
  error = lambda w_hat: np.sum((x @ (w_hat - sparse_dense)) ** 2)
  assert error(gptq) < 0.95 * error(restored), (error(gptq), error(restored))  # 0.87 measured


def test_bad_pattern_is_refused():
  with pytest.raises(ValueError, match=r"--config.patterns: '50' must look like"):
    prune_experiment.parse_pattern("50")
