"""experiments.moe end to end at a toy size: results written, routing statistics sane, expert-parallel check run."""
import json

import numpy as np
import pytest

from experiments import moe as moe_experiment


def test_moe_experiment_on_toy_config(tmp_path):
  config = moe_experiment.default_config()
  config.update(embed_dim=32, num_layers=1, num_heads=2, mlp_dim=32, num_experts=4, steps=4, warmup_steps=1,
                log_every=2, batch_size=2, seq_len=16, eval_batches=1, dense_total=False,
                ablate_load_balance=False)
  out = moe_experiment.run(config, str(tmp_path))
  for name in ("results.json", "results.md", "moe.png"):
    assert (tmp_path / name).exists(), name
  models = out["models"]
  assert sorted(models) == ["dense", "moe"]
  # Equal active MLP parameters: top-2 of 4 experts of width 16 = one dense MLP of width 32 (+ the router).
  assert models["moe"]["mlp_parameters_per_layer"]["active"] == models["dense"]["mlp_parameters_per_layer"][
      "active"] + 32 * 4
  for r in models.values():
    assert np.log(256) - 1.0 < r["validation_loss"] < np.log(256) + 0.5  # near-uniform after 4 steps
  routing = models["moe"]["validation_routing"]
  # 2 x 16 tokens x top-2 = 64 pairs over 4 experts; capacity ceil(1.25 * 64 / 4) = 20 each.
  assert sum(routing["tokens_per_expert"]) == pytest.approx(64 * (1 - routing["dropped_fraction"]))
  assert max(routing["tokens_per_expert"]) <= 20 and routing["load_balance_loss"] >= 1.0 - 1e-6
  ep = out["expert_parallel"]
  assert ep["devices"] == 8 and ep["expert_shard_shape"][0] == 1
  assert ep["max_abs_logits"] < 1e-4 and ep["max_abs_grad"] < 1e-5
  markdown = (tmp_path / "results.md").read_text()
  assert "| seed claim | measured | verdict |" in markdown and "equal active parameters" in markdown
  assert json.loads((tmp_path / "results.json").read_text())["results"]["expert_parallel"]["mesh"] == "data:2,expert:4"


def test_indivisible_expert_width_is_refused():
  config = moe_experiment.default_config()
  config.update(mlp_dim=33)
  with pytest.raises(ValueError, match="mlp_dim=33"):
    moe_experiment.configs(config)
