"""experiments.optimizers end to end at toy size: files, rows, and state bytes re-counted by hand from the layout."""
import json
import math

import pytest

from experiments import common, optimizers


def _toy_config(**overrides):
  config = optimizers.default_config()
  config.update(dict(dict(optimizers="adamw,adam8bit,mezo", steps=4, warmup_steps=1, batch_size=2, seq_len=32,
                          embed_dim=32, num_layers=1, eval_batches=1, rank=4, update_proj_gap=2, adamw_seeds=1,
                          smollm2_optimizers="none"), **overrides))
  return config


def _expected_8bit_bytes(shapes, *, block=256, min_size=4096):
  """bitsandbytes' layout: params of >= min_size elements hold uint8 m and v codes over whole blocks (the
  row-major param cut into blocks of `block`, the tail padded) and one f32 absmax per block each; smaller ones
  f32 m and v. Plus the int32 step and skipped-step counters."""
  total = 8
  for shape in shapes:
    size = math.prod(shape)
    if size < min_size:
      total += 8 * size
    else:
      blocks = -(-size // block)
      total += 2 * (blocks * block) + 2 * 4 * blocks
  return total


def test_toy_run_writes_results_and_measures_real_state_bytes(tmp_path):
  out = optimizers.run(_toy_config(), str(tmp_path))
  for name in ("results.json", "results.md", "loss_curves.png"):
    assert (tmp_path / name).exists(), name
  saved = json.loads((tmp_path / "results.json").read_text())["results"]["part1"]["rows"]
  assert list(saved) == ["adamw", "adam8bit", "mezo"]
  architecture = common.small_llama(_toy_config())
  d, h, kv, hd, f, v = (architecture.embed_dim, architecture.num_heads, architecture.num_kv_heads,
                        architecture.head_dim, architecture.mlp_dim, architecture.vocab_size)
  # Llama, one layer, tied embedding: embedding, attention q/k/v/o, MLP gate/up/down, two block norms, final norm
  shapes = [(v, d), (d, h, hd), (d, kv, hd), (d, kv, hd), (h, hd, d), (d, f), (d, f), (f, d), (d,), (d,), (d,)]
  parameters = sum(math.prod(s) for s in shapes)
  assert saved["adamw"]["parameters"] == parameters
  # AdamW: f32 m and v per element + Adam's step count + the learning-rate schedule's count
  assert saved["adamw"]["state_bytes"] == 8 * parameters + 8
  assert saved["adam8bit"]["state_bytes"] == _expected_8bit_bytes(shapes)
  assert saved["mezo"]["state_bytes"] == 4  # the step counter: MeZO keeps no optimizer state
  # MeZO's step holds no gradients or moments: its compiled step needs less memory than AdamW's
  assert saved["mezo"]["step_memory"]["peak_bytes"] < saved["adamw"]["step_memory"]["peak_bytes"]
  for name, row in saved.items():
    assert math.isfinite(row["validation"]["loss"]) and row["step_seconds"] > 0, name
    assert [r["step"] for r in row["history"]][-1] == 4, name
  md = (tmp_path / "results.md").read_text()
  assert "| seed claim | measured | verdict |" in md and "8-bit Adam" in md
  assert out["part2"] is None


@pytest.mark.parametrize("field, value, message", [
    ("optimizers", "adamw,sgd", r"unknown optimizers \['sgd'\]"),
    ("learning_rates", "mezo:1e-3", r"'optimizer=learning_rate'"),
    ("learning_rates", "mezo=-1", r"positive finite"),
    ("steps", 0, r"--config.steps must be >= 1"),
])
def test_bad_config_is_refused_naming_the_flag(tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    optimizers.run(_toy_config(**{field: value}), str(tmp_path))
