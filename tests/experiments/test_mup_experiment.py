"""experiments.mup: a toy sweep end to end (2 widths x 2 LRs x SP/μP, a few steps) and its bad flags."""
import json
import math
import os

import numpy as np
import pytest

from experiments import mup as experiment


def _toy(**changes):
  config = experiment.default_config()
  config.update(dict(widths="16,32", base_width=16, log2_learning_rates="-8,-5", steps=3, warmup_steps=1,
                     batch_size=2, seq_len=16, num_layers=1, eval_batches=1))
  config.update(changes)
  return config


def test_toy_sweep_writes_results_and_mup_equals_sp_at_the_base_width(tmp_path):
  results = experiment.run(_toy(), str(tmp_path))
  for name in ("results.json", "results.md", "loss_vs_lr.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  records = results["records"]
  assert len(records) == 2 * 2 * 2 and all(math.isfinite(r["loss"]) for r in records)
  by = {(r["parametrization"], r["width"], r["learning_rate"]): r["loss"] for r in records}
  for lr in (2.0 ** -8, 2.0 ** -5):
    # the same draw, batches and (unit) multipliers at the base width: the same run
    assert by[("mup", 16, lr)] == pytest.approx(by[("sp", 16, lr)], rel=1e-6)
    assert by[("mup", 32, lr)] != pytest.approx(by[("sp", 32, lr)], rel=1e-6)
  assert all(r["loss"] < math.log(256) + 0.5 for r in records)   # 3 steps: near the uniform byte loss, finite
  # the noise yardstick: SP at the base width at 2 more seeds; the std of 3 seeds, median over the 2 LRs
  noise = results["noise_records"]
  assert sorted((r["seed"], r["learning_rate"]) for r in noise) == [(s, lr) for s in (1, 2) for lr in (2.0 ** -8,
                                                                                                    2.0 ** -5)]
  spreads = [np.std([by[("sp", 16, lr)]] + [r["loss"] for r in noise if r["learning_rate"] == lr], ddof=1)
             for lr in (2.0 ** -8, 2.0 ** -5)]
  assert results["seed_noise"] == pytest.approx(np.median(spreads), rel=1e-6)
  assert results["tolerance"] == pytest.approx(2 * math.sqrt(2) * results["seed_noise"])
  saved = json.loads((tmp_path / "results.json").read_text())
  assert [c["claim"][:8] for c in saved["claims"]] == ["Under SP", "Under μP", "Under μP"]
  assert set(saved["results"]["analysis"]) == {"sp", "mup"}
  assert "| seed claim | measured | verdict |" in (tmp_path / "results.md").read_text()


def test_records_from_reuses_runs_and_refuses_other_settings(tmp_path):
  one = dict(widths="16", log2_learning_rates="-6", parametrizations="sp", noise_seeds=1)
  first = experiment.run(_toy(**one), str(tmp_path / "a"))
  again = experiment.run(_toy(**one, records_from=str(tmp_path / "a" / "results.json")), str(tmp_path / "b"))
  assert again["records"] == first["records"] and again["noise_records"] == first["noise_records"]
  assert "2 runs (2 reused from" in (tmp_path / "b" / "results.md").read_text()
  with pytest.raises(ValueError, match=r"--config.records_from=.* was run with other \['steps'\]"):
    experiment.run(_toy(steps=4, records_from=str(tmp_path / "a" / "results.json")), str(tmp_path / "c"))


@pytest.mark.parametrize("changes, message", [
    (dict(widths=""), r"--config.widths is empty"),
    (dict(widths="16,20"), r"--config.widths / base_width: 20 must be a multiple of 8"),
    (dict(base_width=12), r"--config.widths / base_width: 12 must be a multiple of 8"),
    (dict(log2_learning_rates=" , "), r"--config.log2_learning_rates is empty"),
    (dict(log2_learning_rates="-8,x"), r"--config.log2_learning_rates="),
    (dict(parametrizations="sp,ntk"), r"--config.parametrizations: unknown \['ntk'\]"),
    (dict(steps=0), r"--config.steps must be >= 1"),
    (dict(noise_seeds=-1), r"--config.noise_seeds must be >= 0"),
    (dict(records_from="/nonexistent/results.json"), r"--config.records_from='/nonexistent/results.json'"),
])
def test_bad_flags_are_clear_errors(tmp_path, changes, message):
  with pytest.raises(ValueError, match=message):
    experiment.run(_toy(**changes), str(tmp_path))
