"""experiments.sparse_iso_flop at a toy size: outputs written, equal FLOPs across configs, masks keep their density
through training (RigL moves entries but never the active count), pruned weights stay zero."""
import json

import numpy as np
import pytest

from experiments import common, sparse_iso_flop


def _config():
  config = sparse_iso_flop.default_config()
  config.update(embed_dim=32, num_layers=1, num_heads=2, mlp_dim=32, widths="1,4", methods="rigl", seeds="0,1", steps=4,
                batch_size=2, seq_len=16, warmup_steps=1, rigl_every=2, rigl_end_fraction=1.0, eval_batches=1)
  return config


def test_sparse_iso_flop_small(tmp_path):
  results = sparse_iso_flop.run(_config(), str(tmp_path))
  for name in ("results.json", "results.md", "loss_vs_sparsity.png"):
    assert (tmp_path / name).exists(), name
  assert "| seed claim | measured | verdict |" in (tmp_path / "results.md").read_text()
  assert json.loads((tmp_path / "results.json").read_text())["results"]["flops_equal"] is True
  summary = results["summary"]
  assert set(summary) == {"dense", "4x wide, 75% sparse, rigl"}  # static masks: tests/efficient/test_sparse_layers
  # Independent count of the sparsified part: gate/up/down of one block, d=32, h=32 dense = 4h at density 1/4.
  for s in summary.values():
    assert s["sparsified_mlp_flops_per_token"] == 2 * 3 * 32 * 32
    assert s["forward_flops_per_token"] == summary["dense"]["forward_flops_per_token"]
    assert s["seeds"] == 2 and np.isfinite(s["validation_loss_mean"]) and 0 < s["validation_loss_mean"] < 10
  for label in ("4x wide, 75% sparse, rigl",):
    for run in results["runs"][label]:
      assert set(run["mask_checks"]) == {"blocks/0/mlp/gate", "blocks/0/mlp/up", "blocks/0/mlp/down"}
      for check in run["mask_checks"].values():
        assert check["active_before"] == check["active_after"] == 32 * 128 // 4
        assert check["nonzero_outside_mask"] == 0
        assert check["changed"] > 0  # RigL's step-2 drop/grow moved entries
      assert all(d == 0.25 for d in run["densities"].values())
  update = results["sparse_update_smollm2"]
  assert update["sparse_update_state_bytes"] == 2 * update["trainable_bytes"] + 8  # + two int32 step counters


def test_bad_widths_are_refused(tmp_path):
  config = _config()
  config.widths = "2,4"
  with pytest.raises(ValueError, match=r"--config.widths='2,4' must be positive and include 1"):
    sparse_iso_flop.run(config, str(tmp_path))


def test_config_lists_parse_and_name_the_flag():
  config = sparse_iso_flop.default_config()
  config.update(widths=" 1, 2,,4 ", seeds="0,x")
  assert common.config_list(config, "widths", int) == [1, 2, 4]
  with pytest.raises(ValueError, match=r"--config.seeds='0,x': .* comma-separated list of int"):
    common.config_list(config, "seeds", int)
  config.seeds = " , "
  with pytest.raises(ValueError, match=r"--config.seeds is empty"):
    common.config_list(config, "seeds", int)
