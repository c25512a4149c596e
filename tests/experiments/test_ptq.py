"""experiments.ptq end to end on the tiny random-init model (the SmolLM2 run is the experiment itself)."""
import json

import jax
import numpy as np
import pytest

from experiments import ptq


def test_ptq_writes_results_on_tiny(tmp_path):
  config = ptq.default_config()
  config.update(model="tiny", rows="float32,w8,w4-rtn,w4-gptq,kv-int4", group_size=32, calib_batches=1,
                eval_batches=1, calib_seq_len=32, eval_seq_len=32, prefill_len=32, timing_repeats=1, kv_group_size=8,
                decode_tokens=0, weight_decode_tokens=2, weight_decode_prompt_len=8,
                minilm_rows="")  # the MiniLM rows: test_quant_experiments (toy encoder)
  results = ptq.run(config, str(tmp_path))
  rows = results["rows"]
  assert rows["float32"]["bytes_per_param"] == 4.0
  assert rows["w8"]["bytes_per_param"] < 1.1 and rows["w4-gptq"]["bytes_per_param"] < 0.6
  assert rows["w4-gptq"]["projections"] == 14
  # Float weights, packed int4 KV: ~1/4 of the f32 cache's bytes (head_dim 16: scales weigh more than at 64).
  assert rows["kv-int4"]["bytes_per_param"] == 4.0 and 0.2 < rows["kv-int4"]["kv_ratio"] < 0.3
  assert rows["float32"]["kv_ratio"] == 1.0
  # Weight rows are decoded beside the float model (M = 1 timing table).
  assert "weight_decode" in rows["w8"] and "weight_decode" not in rows["float32"]
  assert all(v > 0 for v in rows["w4-rtn"]["weight_decode"]["tokens_per_s"].values())
  assert abs(rows["kv-int4"]["validation"]["perplexity"] / rows["float32"]["validation"]["perplexity"] - 1) < 0.05
  for name in ("results.json", "results.md", "ptq.png"):
    assert (tmp_path / name).exists(), name
  markdown = (tmp_path / "results.md").read_text()
  assert "| seed claim | measured | verdict |" in markdown and "w4-gptq" in markdown
  assert "Weight-only decode, M = 1" in markdown
  assert json.loads((tmp_path / "results.json").read_text())["results"]["rows"]["w8"]["validation"]["perplexity"] > 1


def test_unknown_row_is_refused(tmp_path):
  config = ptq.default_config()
  config.rows = "float32,w9"
  with pytest.raises(ValueError, match="w9"):
    ptq.run(config, str(tmp_path))


def test_decode_timing_decodes_like_generate():
  """The timed decode loop (prefill once, then greedy steps) continues exactly as `llama.generate` does; the
  fused and dequantize-all paths read the same quantized cache, so their greedy tokens agree."""
  import jax.numpy as jnp
  from efficient import models
  from efficient.models import llama
  model = models.load("tiny", dtype=jnp.float32).model
  config = ptq.default_config()
  config.update(decode_prompt_len=24, decode_tokens=6, timing_repeats=1, kv_group_size=8)
  result = ptq.decode_speed(model, "int8", config)
  prompt = jax.random.randint(jax.random.key(1), (1, 24), 0, model.config.vocab_size, dtype=jnp.int32)
  expected = np.asarray(llama.generate(model, prompt, 7))[0].tolist()
  assert result["tokens"]["float"] == expected
  assert result["tokens"]["fused"] == result["tokens"]["dequantize_all"]
  assert set(result["tokens_per_s"]) == {"float", "fused", "dequantize_all"}
  assert all(np.isfinite(v) and v > 0 for v in result["tokens_per_s"].values())
