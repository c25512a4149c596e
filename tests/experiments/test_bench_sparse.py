"""experiments.bench_sparse at a toy size: rows, modeled ratios equal to the block density, results files."""
import pytest

from experiments import bench_sparse


def test_bench_sparse_small(tmp_path):
  config = bench_sparse.default_config()
  config.update(m=16, k=256, n=256, block=64, densities="0.25,1.0", repeats=1)
  results = bench_sparse.run(config, str(tmp_path))
  quarter, full = results["rows"]["0.25"], results["rows"]["1.00"]
  assert quarter["nnz_blocks"] == 4 and full["nnz_blocks"] == 16
  assert quarter["modeled"]["flops"] * 4 == full["modeled"]["flops"]
  assert quarter["max_abs_error"] < 1e-3 and full["max_abs_error"] < 1e-3
  markdown = (tmp_path / "results.md").read_text()
  assert "| seed claim | measured | verdict |" in markdown and "![bench_sparse.png](bench_sparse.png)" in markdown
  assert (tmp_path / "bench_sparse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # the stamp: the equivalent command line of this call (the fields changed from the default config)
  assert "Command: `python -m experiments.bench_sparse --workdir=" in markdown and "--config.m=16" in markdown


def test_bad_densities_are_refused(tmp_path):
  config = bench_sparse.default_config()
  config.densities = "0,0.5"
  with pytest.raises(ValueError, match=r"--config.densities='0,0.5' must be"):
    bench_sparse.run(config, str(tmp_path))
