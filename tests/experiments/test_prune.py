"""experiments.prune end to end on the random-init tiny Llama: every method x pattern row, results files, claims."""
import json

import pytest

from experiments import prune as prune_experiment


def test_prune_experiment_on_tiny_model(tmp_path):
  config = prune_experiment.default_config()
  config.update(model="tiny", calibration_batches=2, calibration_batch_size=2, seq_len=32, eval_batches=1,
                eval_batch_size=2, block_size=32)
  results = prune_experiment.run(config, str(tmp_path))
  assert sorted(results["rows"]) == sorted(f"{m} {p}" for m in ("magnitude", "wanda", "sparsegpt")
                                           for p in ("50%", "2:4"))
  for name, row in results["rows"].items():
    assert row["sparsity"] == pytest.approx(0.5, abs=1e-3) and row["projections"] == 14, name
    assert row["nm_valid"] in (None, True)
  two_four = results["rows"]["sparsegpt 2:4"]["bytes"]
  assert two_four["ratio"] == pytest.approx(0.5 + 1 / 32)  # f32 halves + 2 bits per kept value, measured
  unstructured = results["rows"]["wanda 50%"]["bytes"]
  assert unstructured["ratio"] == pytest.approx(0.5 + 1 / 32)  # f32 halves + 1-bit mask, measured
  markdown = (tmp_path / "results.md").read_text()
  assert "| seed claim | measured | verdict |" in markdown and "SparseGPT <= Wanda < magnitude" in markdown
  assert json.loads((tmp_path / "results.json").read_text())["results"]["dense"]["perplexity"] > 1


def test_bad_pattern_is_refused():
  with pytest.raises(ValueError, match=r"--config.patterns: '50' must look like"):
    prune_experiment.parse_pattern("50")
