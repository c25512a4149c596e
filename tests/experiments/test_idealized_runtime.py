"""experiments.idealized_runtime: the least-squares fit against exact synthetic data, and end to end on the tiny
random-init model (the SmolLM2 run is the experiment itself)."""
import json

import numpy as np
import pytest

from experiments import idealized_runtime


def test_fit_recovers_alpha_beta_gamma_exactly():
  prompts, outputs = np.meshgrid([16, 64, 128, 256, 512], [1, 4, 16, 64], indexing="ij")
  alpha, beta, gamma = 0.05, 2e-4, 3e-2
  seconds = alpha + beta * prompts + gamma * outputs
  fit = idealized_runtime.fit_runtime(prompts.ravel(), outputs.ravel(), seconds.ravel())
  assert fit["alpha"] == pytest.approx(alpha, rel=1e-10) and fit["beta"] == pytest.approx(beta, rel=1e-10)
  assert fit["gamma"] == pytest.approx(gamma, rel=1e-10) and fit["gamma_over_beta"] == pytest.approx(150.0)
  assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
  np.testing.assert_allclose(fit["fitted"], seconds.ravel(), rtol=1e-10)


def test_fit_r2_by_hand_and_degenerate_grids():
  # y = 1 + P + O plus residuals (+1, -1, -1, +1) that are orthogonal to [1, P, O] on this 2x2 grid.
  fit = idealized_runtime.fit_runtime([0, 0, 1, 1], [0, 1, 0, 1], [2, 1, 1, 4])
  assert (fit["alpha"], fit["beta"], fit["gamma"]) == pytest.approx((1.0, 1.0, 1.0))
  # SS_res = 4, SS_tot = sum((y - 2)^2) = 0 + 1 + 1 + 4 = 6.
  assert fit["r2"] == pytest.approx(1 - 4 / 6)
  with pytest.raises(ValueError, match="distinct prompt lengths"):
    idealized_runtime.fit_runtime([16, 16, 16], [1, 4, 16], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="seconds must be finite"):
    idealized_runtime.fit_runtime([1, 2, 3], [1, 3, 2], [1.0, float("nan"), 2.0])


def test_idealized_runtime_writes_results_on_tiny(tmp_path):
  config = idealized_runtime.default_config()
  config.update(model="tiny", prompt_lens="8,24", output_lens="1,5", repeats=1)
  results = idealized_runtime.run(config, str(tmp_path))
  assert results["tokens_match_generate"]
  points = results["points"]
  assert [(p["prompt_len"], p["output_len"]) for p in points] == [(8, 1), (8, 5), (24, 1), (24, 5)]
  refit = idealized_runtime.fit_runtime([p["prompt_len"] for p in points], [p["output_len"] for p in points],
                                        [p["median_s"] for p in points])
  assert results["fit"]["r2"] == pytest.approx(refit["r2"]) and results["fit"]["gamma"] == refit["gamma"]
  np.testing.assert_allclose([p["fitted_s"] for p in points], refit["fitted"])
  for name in ("results.json", "results.md", "idealized_runtime.png"):
    assert (tmp_path / name).exists(), name
  markdown = (tmp_path / "results.md").read_text()
  assert "| seed claim | measured | verdict |" in markdown and "gamma/beta" in markdown
  assert json.loads((tmp_path / "results.json").read_text())["results"]["tokens_match_generate"]


@pytest.mark.parametrize("field, value, match", [
    ("output_lens", "4", r"--config.output_lens='4': needs >= 2 distinct lengths"),
    ("prompt_lens", "8,x", r"--config.prompt_lens='8,x'"),
    ("prompt_lens", "0,8", r"--config.prompt_lens='0,8'"),
    ("repeats", 0, r"--config.repeats=0"),
])
def test_bad_config_is_refused_by_name(tmp_path, field, value, match):
  config = idealized_runtime.default_config()
  config.update(model="tiny", **{field: value})
  with pytest.raises(ValueError, match=match):
    idealized_runtime.run(config, str(tmp_path))
