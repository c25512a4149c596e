"""experiments.speculative end to end on the tiny random-init model (the SmolLM2 run is the experiment itself)."""
import json

import pytest

from experiments import speculative


def test_speculative_writes_results_on_tiny(tmp_path):
  config = speculative.default_config()
  # Two drafts end to end (every draft kind's exactness: tests/efficient/test_speculative.py); lookup:3 sets K.
  config.update(model="tiny", drafts="lookup:3,self-fitted", num_prompts=2, prompt_len=24, new_tokens=6, num_draft_tokens=2, self_layers=1,
                fit_batches=1, fit_batch_size=1, fit_seq_len=32, int4_group_size=32, timing_repeats=1)
  results = speculative.run(config, str(tmp_path))
  rows = results["rows"]
  assert set(rows) == {"lookup:3", "self-fitted"}
  assert rows["lookup:3"]["num_draft_tokens"] == 3 and rows["self-fitted"]["num_draft_tokens"] == 2
  for name, row in rows.items():
    assert row["all_exact"] and len(row["exact_match"]) == 2, name
    assert 0 <= row["accepted"] <= row["proposed"] == row["num_draft_tokens"] * row["verify_calls"], name
    # prefill + verifications: each verification emits accepted + 1 of the 5 tokens after the prefill's
    assert row["target_calls"] == 2 + row["verify_calls"] and row["verify_calls"] + row["accepted"] >= 2 * 5
    assert row["speedup"] > 0
  for name in ("results.json", "results.md", "speculative.png"):
    assert (tmp_path / name).exists(), name
  markdown = (tmp_path / "results.md").read_text()
  assert "| seed claim | measured | verdict |" in markdown and "self-fitted" in markdown
  assert json.loads((tmp_path / "results.json").read_text())["results"]["rows"]["lookup:3"]["all_exact"]


def test_unknown_draft_is_refused(tmp_path):
  config = speculative.default_config()
  for drafts, match in (("lookup,medusa", "medusa"), ("lookup:0", "lookup:0"), ("medusa:2", "medusa")):
    config.drafts = drafts
    with pytest.raises(ValueError, match=match):
      speculative.run(config, str(tmp_path))
