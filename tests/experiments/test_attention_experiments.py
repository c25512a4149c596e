"""experiments.mqar and experiments.attention_scaling end to end at toy sizes, plus their pure helpers."""
import json

import numpy as np

from efficient import data
from experiments import attention_scaling, mqar


def test_mqar_toy_run(tmp_path, monkeypatch):
  seen = []  # (logits, batch) of every accuracy the experiment computes, in call order
  real_accuracy = data.recall_accuracy

  def recording(logits, batch):
    seen.append((np.asarray(logits), batch))
    return real_accuracy(logits, batch)

  monkeypatch.setattr(data, "recall_accuracy", recording)
  config = mqar.default_config()
  config.update(vocab_size=16, num_kv_pairs=2, seq_len=16, batch_size=4, steps=2, warmup_steps=1, eval_batches=1,
                embed_dim=16, num_layers=1, num_heads=2, window=4, linear_feature_dim=2, based_feature_dims="2",
                models="softmax,linear,Based")
  results = mqar.run(config, str(tmp_path))
  assert len(results) == 3
  for name in ("results.json", "results.md", "recall_vs_state.png"):
    assert (tmp_path / name).exists(), name
  saved = json.loads((tmp_path / "results.json").read_text())["results"]["models"]
  # state bytes (one layer, to keep compiles short): softmax KV = 2 (k, v) * 16 tokens * 2 heads * 8 dims * 4 B
  assert saved["softmax"]["state_bytes"] == 2 * 16 * 2 * 8 * 4
  # linear: [2 heads, 1 + 2 + 4, 8 + 1] f32
  assert saved["linear (Taylor, d_f=2)"]["state_bytes"] == 2 * 7 * 9 * 4
  # Per model: the learning-curve point, then the one eval batch. Each reported accuracy is re-derived here
  # from the logits: argmax == target over the query positions (loss_mask) of the held-out batch.
  assert len(seen) == 2 * len(saved)
  for (name, r), (logits, batch) in zip(saved.items(), seen[1::2]):
    mask = np.asarray(batch["loss_mask"]) == 1
    expected = np.mean(logits.argmax(-1)[mask] == np.asarray(batch["targets"])[mask])
    assert r["accuracy"] == expected, name
  # eval_every=50 > steps: the learning curve holds the final step only, and it is the held-out batch 0
  assert all([step for step, _ in r["accuracy_curve"]] == [2] for r in saved.values())


def test_window_coverage_counts_pairs_in_window():
  dataset = data.MQARDataset(vocab_size=32, num_kv_pairs=4, seq_len=32, batch_size=8)
  assert mqar.window_coverage(dataset, 10**6, batches=1) == 1.0
  assert mqar.window_coverage(dataset, 1, batches=1) == 0.0
  assert 0.0 <= mqar.window_coverage(dataset, 12, batches=1) <= 1.0


def test_attention_scaling_toy_run(tmp_path):
  config = attention_scaling.default_config()
  config.update(seq_lens="64,128", max_quadratic_len=128, heads=2, head_dim=16, chunk_size=32, flash_block=32,
                repeats=1, fit_from=64, backward_memory=False, packing_check=False)
  out = attention_scaling.run(config, str(tmp_path))
  assert "| seed claim | measured | verdict |" in (tmp_path / "results.md").read_text()
  assert set(out["table"]["naive softmax"]) == {64, 128}
  # the naive forward holds the [H, N, N] f32 logits: temp bytes grow ~4x from N=64 to N=128
  naive = out["table"]["naive softmax"]
  assert naive[128]["temp_bytes"] >= 3 * naive[64]["temp_bytes"]


def test_slope_of_power_law():
  ns = np.array([256, 512, 1024])
  assert abs(attention_scaling.slope(ns, 3.0 * ns ** 2) - 2.0) < 1e-9


def test_mqar_verdicts_need_a_trained_softmax():
  config = mqar.default_config()
  config.num_kv_pairs = 8  # the plateau case below: 12% = 1/K
  make = lambda acc, state: {"accuracy": acc, "state_bytes": state}
  trained = {"softmax": make(0.99, 10), "window (w=8)": make(0.2, 1), "linear (Taylor, d_f=16)": make(0.4, 5),
             "Based (d_f=4, w=8)": make(0.8, 2), "Based (d_f=16, w=8)": make(0.9, 6)}
  verdicts = [c.verdict for c in mqar.claims_for(trained, 0.25, config)]
  assert verdicts == ["reproduced"] * 4
  assert "85% of the gap closed" in mqar.claims_for(trained, 0.25, config)[2].measured  # (0.9-0.4)/(0.99-0.4)
  under = dict(trained, softmax=make(0.12, 10))
  verdicts = [c.verdict for c in mqar.claims_for(under, 0.25, config)]
  assert verdicts[0].startswith("not reproduced") and all("inconclusive" in v for v in verdicts[1:])
  assert "1/K plateau" in verdicts[0]  # 12% with K = 8 pairs: guessing among the in-context values
  off_plateau = dict(trained, softmax=make(0.30, 10))
  assert "plateau" not in mqar.claims_for(off_plateau, 0.25, config)[0].verdict
