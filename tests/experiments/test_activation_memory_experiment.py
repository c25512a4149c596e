"""experiments.activation_memory end to end at toy size: files, rows, and reported numbers re-derived by hand."""
import json
import math

import pytest

from experiments import activation_memory, common


def _toy_config(**overrides):
  config = activation_memory.default_config()
  config.update(dict(dict(rows="none,block,frozen_half", loss_rows="none", embed_dim=32, num_layers=2, seq_len=32,
                          batch_size=2, steps=3, warmup_steps=1, timing_repeats=1, eval_batches=1), **overrides))
  return config


def test_toy_run_writes_results_and_rederives_numbers(tmp_path):
  activation_memory.run(_toy_config(), str(tmp_path))
  for name in ("results.json", "results.md", "activation_memory.png"):
    assert (tmp_path / name).exists(), name
  results = json.loads((tmp_path / "results.json").read_text())["results"]
  rows = results["rows"]
  assert list(rows) == ["none", "block", "frozen_half"]
  a = common.small_llama(_toy_config())
  d, h, kv, hd, f, v = a.embed_dim, a.num_heads, a.num_kv_heads, a.head_dim, a.mlp_dim, a.vocab_size
  block = h * d * hd + 2 * kv * d * hd + h * hd * d + 3 * d * f + 2 * d  # q, k, v, o, gate/up/down, two norms
  # tied embedding + blocks + final norm; the frozen row trains neither the embedding nor block 0
  assert rows["none"]["trained_parameters"] == v * d + 2 * block + d
  assert rows["frozen_half"]["trained_parameters"] == block + d
  assert rows["frozen_half"]["freeze"] == "embedding|blocks/(0)/.*"
  none, remat, frozen = (rows[n]["saved_residuals"]["activations"] for n in rows)
  assert remat < 0.5 * none and frozen < 0.75 * none
  # remat changes only the backward schedule: the same loss after the same timed steps
  assert results["remat_loss_check"]["block"] <= 1e-6
  # int8-saved SiLU over [B, T, F]: 1 byte per element + one f32 scale per row + a dtype-carrying scalar
  silu = results["silu_residuals"]
  assert silu["elements"] == 2 * 32 * f
  assert silu["int8"] == silu["elements"] + 4 * 2 * 32 + 4
  assert silu["float"] >= 4 * silu["elements"]
  md = (tmp_path / "results.md").read_text()
  assert "| seed claim | measured | verdict |" in md and "re-materialization" in md
  assert f"| {remat / 2**20:.2f} | {remat / none:.2f} |" in md  # the table's ratio column, from the JSON
  trained = results["trained"]["none"]
  assert [r["step"] for r in trained["history"]][-1] == 3 and math.isfinite(trained["validation"]["loss"])
  assert "= none" in md  # the block row reports none's loss


@pytest.mark.parametrize("field, value, message", [
    ("rows", "none,full", r"unknown rows \['full'\]"),
    ("loss_rows", "int8", r"not in --config.rows"),
    ("frozen_blocks", 2, r"--config.frozen_blocks=2"),
    ("steps", 0, r"--config.steps must be >= 1"),
])
def test_bad_config_is_refused_naming_the_flag(tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    activation_memory.run(_toy_config(**{field: value}), str(tmp_path))
