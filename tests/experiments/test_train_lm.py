"""experiments.train_lm end to end at a toy size: outputs written, and a second run resumes where the first stopped."""
import json

import pytest

from experiments import train_lm


def _config(steps):
  config = train_lm.default_config()
  config.update(steps=steps, batch_size=2, seq_len=32, warmup_steps=2, checkpoint_every=3, eval_batches=1,
                num_layers=1)
  return config


def test_train_lm_writes_results_and_resumes(tmp_path):
  first = train_lm.run(_config(6), str(tmp_path))
  assert first["steps"] == 6
  for name in ("results.json", "results.md", "loss.png", "metrics.jsonl"):
    assert (tmp_path / name).exists(), name
  assert "| seed claim | measured | verdict |" in (tmp_path / "results.md").read_text()
  second = train_lm.run(_config(9), str(tmp_path))  # continues from the step-6 checkpoint
  assert second["steps"] == 9
  steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(set(steps)) and steps[-1] == 9  # one log, no step repeated after the resume
  assert json.loads((tmp_path / "results.json").read_text())["results"]["steps"] == 9


def test_unknown_model_is_refused():
  config = _config(1)
  config.model = "huge"
  with pytest.raises(ValueError, match="config.model='huge' is unknown"):
    train_lm.model_config(config)
