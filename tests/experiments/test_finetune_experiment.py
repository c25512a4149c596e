"""experiments.finetune end to end at toy size (random TINY Llama on bytes): files, rows, and the trainable
parameter and optimizer-state counts re-derived by hand from the model's shapes."""
import json

import pytest

from efficient.models import llama
from experiments import finetune


def _toy_config(**overrides):
  config = finetune.default_config()
  config.update(dict(dict(model="tiny", rows="full_adamw,lora,qlora,loreft", steps=2, batch_size=2, seq_len=32,
                          eval_batches=1, lora_rank=4, reft_rank=2, road_group_size=32), **overrides))
  return config


def test_toy_run_counts_trainable_parameters_and_state(tmp_path):
  finetune.run(_toy_config(), str(tmp_path))
  for name in ("results.json", "results.md", "finetune.png"):
    assert (tmp_path / name).exists(), name
  rows = json.loads((tmp_path / "results.json").read_text())["results"]["rows"]
  assert list(rows) == ["full_adamw", "lora", "qlora", "loreft"]
  c = llama.TINY
  d, q, kv, f = c.embed_dim, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.mlp_dim
  # LoRA r on q, k, v, o, gate, up, down of every block: (in + out) * r each.
  per_block = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d)
  assert rows["lora"]["trainable_parameters"] == rows["qlora"]["trainable_parameters"] == 4 * per_block * c.num_layers
  # LoReFT rank 2 on every block output: R [2, d], W [2, d], b [2].
  assert rows["loreft"]["trainable_parameters"] == c.num_layers * (2 * 2 * d + 2)
  full = rows["full_adamw"]["trainable_parameters"]
  assert full == c.vocab_size * d + c.num_layers * (d * (2 * q + 2 * kv) + 3 * d * f + 2 * d) + d
  # AdamW state: f32 m and v of every trained parameter + two int32 counters (Adam's and the schedule's).
  for name in ("full_adamw", "lora", "loreft"):
    assert rows[name]["state_bytes"] == 8 * rows[name]["trainable_parameters"] + 8, name
  # The QLoRA base is packed NF4: fewer parameter bytes than LoRA on the f32 base.
  assert rows["qlora"]["parameter_bytes"] < 0.5 * rows["lora"]["parameter_bytes"]
  md = (tmp_path / "results.md").read_text()
  assert "| seed claim | measured | verdict |" in md and "100-1000x fewer" in md


@pytest.mark.parametrize("field, value, message", [
    ("rows", "lora,bitfit", "unknown row 'bitfit'"),
    ("steps", 0, "--config.steps must be >= 1"),
    ("learning_rates", "lora=1e-3", "no rate for rows"),
    ("learning_rates", finetune.DEFAULT_LEARNING_RATES.replace("lora=1e-3", "lora=fast"), "'fast' is not a number"),
])
def test_bad_config_is_refused(tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    finetune.run(_toy_config(**{field: value}), str(tmp_path))
