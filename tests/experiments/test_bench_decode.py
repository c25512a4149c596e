"""bench_decode smoke run: every row is checked against its reference and recorded; bad config is refused."""
import json
import os

import pytest

from experiments import bench_decode


def test_bench_decode_rows_match_references(tmp_path):
  config = bench_decode.default_config()
  config.cache_lens = "128"
  config.repeats = 1
  config.model_layers = 0
  out = bench_decode.run(config, str(tmp_path))
  rows = {r["row"]: r for r in out["rows"]}
  assert set(rows) == {"float", "int8", "int8 dequantize-all", "int4", "int4 dequantize-all", "paged float",
                       "paged int8", "paged int4"}
  for name, row in rows.items():
    assert row["error_vs_reference"] < 1e-5, name
  payload = json.load(open(os.path.join(tmp_path, "results.json")))
  assert len(payload["claims"]) == 5
  plot = tmp_path / "bench_decode.png"
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and payload["plots"] == [str(plot)]


def test_bench_decode_refuses_unaligned_cache_length(tmp_path):
  config = bench_decode.default_config()
  config.cache_lens = "100"
  with pytest.raises(ValueError, match="cache_lens"):
    bench_decode.run(config, str(tmp_path))
