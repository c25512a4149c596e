"""bench_kernels: a tiny two-op run on CPU (rows, errors vs the references, the FLOP/s and bytes/s arithmetic
re-derived from the samples and the ops' cost()), the per-backend implementation lists, peaks, bad --ops."""
import importlib
import json
import os
import statistics
import subprocess
import sys

import jax.numpy as jnp
import pytest

from efficient import measure
from experiments import bench_kernels, kernel_cases

matmul_op = importlib.import_module("pallas_kernels.matmul")
flash_op = importlib.import_module("pallas_kernels.flash_attention")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("bench_kernels")
  config = bench_kernels.default_config()
  config.size = "tiny"
  return bench_kernels.run(config, str(workdir), ops="matmul,flash_attention"), workdir


def test_tiny_run_times_every_cpu_implementation_and_peer(tiny_run):
  out, workdir = tiny_run
  rows = {(r["op"], r["implementation"]): r for r in out["rows"]}
  assert set(rows) == {("matmul", "reference"), ("flash_attention", "reference"), ("flash_attention", "xla"),
                       ("flash_attention", "jax.nn.dot_product_attention[xla]"),
                       ("flash_attention", "tokamax.dot_product_attention")}
  tokamax = rows[("flash_attention", "tokamax.dot_product_attention")]
  if tokamax["status"] != "ok":  # without the optional extra the row says how to get it
    assert tokamax["status"] == "not installed: pip install -e '.[peers]'"
  for key, row in rows.items():
    if row["status"] == "ok":
      assert len(row["samples_s"]) == 5 and row["error_vs_reference"] <= 1e-5, key
  assert rows[("flash_attention", "xla")]["default"] == "xla"  # what implementation=None runs on CPU
  payload = json.load(open(os.path.join(workdir, "results.json")))
  assert [c["verdict"] for c in payload["claims"]][0] == "reproduced"
  text = open(os.path.join(workdir, "results.md")).read()
  assert "CPU: no published peak" in text and "| flash_attention | tiny | xla (default) |" in text
  assert os.path.getsize(os.path.join(workdir, "roofline.png")) > 0


def test_rates_are_the_cost_model_over_the_median_time(tiny_run):
  rows = {(r["op"], r["implementation"]): r for r in tiny_run[0]["rows"]}
  expected_costs = {"matmul": matmul_op.cost((8, 64), (64, 128), dtype=jnp.float32, bias=True),
                    "flash_attention": flash_op.cost((1, 128, 2, 64), (1, 128, 1, 64), dtype=jnp.float32)}
  for (op, name), row in rows.items():
    if row["status"] != "ok":
      continue
    cost, median = expected_costs[op], statistics.median(row["samples_s"])
    assert row["median_s"] == median and row["flops"] == cost["flops"], (op, name)
    assert row["gflops_per_s"] == pytest.approx(cost["flops"] / median / 1e9, rel=1e-12)
    assert row["hbm_gb_per_s"] == pytest.approx(cost["hbm_bytes"] / median / 1e9, rel=1e-12)
    assert row["intensity"] == pytest.approx(cost["flops"] / cost["hbm_bytes"], rel=1e-12)
    assert "pct_peak_flops" not in row  # a CPU has no published peak
  assert expected_costs["matmul"]["flops"] >= 2 * 8 * 64 * 128  # at least the product's multiply-adds


def test_rates_against_a_named_device_peak():
  peak = measure.device_peak("h200")
  cost = {"flops": 4e12, "hbm_bytes": 1e12, "ideal_bytes": 5e11}
  got = bench_kernels.rates(cost, 2.0, "h200")
  assert got["gflops_per_s"] == pytest.approx(2e3) and got["hbm_gb_per_s"] == pytest.approx(5e2)
  assert got["pct_peak_flops"] == pytest.approx(100 * 2e12 / peak.flops_per_s)
  assert got["pct_peak_bytes"] == pytest.approx(100 * 0.5e12 / peak.hbm_bytes_per_s)
  bound = max(4e12 / peak.flops_per_s, 1e12 / peak.hbm_bytes_per_s)
  assert got["pct_of_roofline"] == pytest.approx(100 * bound / 2.0)


def test_timed_implementations_follow_the_backend():
  assert kernel_cases.timed_implementations(flash_op.IMPLEMENTATIONS, "cpu") == ("reference", "xla")
  assert kernel_cases.timed_implementations(flash_op.IMPLEMENTATIONS, "gpu") == ("reference", "xla", "pallas_gpu")
  assert kernel_cases.timed_implementations(matmul_op.IMPLEMENTATIONS, "tpu") == ("reference", "pallas_tpu")


def test_unknown_op_is_refused_naming_ops_and_the_choices(tmp_path):
  with pytest.raises(ValueError, match=r"^--ops='matmul,warp': unknown op\(s\) \['warp'\]; choose from "
                                       r"\('matmul', 'rms_norm', "):
    bench_kernels.run(bench_kernels.default_config(), str(tmp_path), ops="matmul,warp")
  assert bench_kernels.select_ops("") == kernel_cases.OPS


def test_ops_flag_reaches_the_run():
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run([sys.executable, "-m", "experiments.bench_kernels", "--ops=warp", "--workdir=unused"],
                          cwd=repo, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0 and "--ops='warp': unknown op(s) ['warp']" in result.stderr


def test_a_failing_implementation_gets_a_row_and_the_others_still_run():
  x = jnp.arange(6.0).reshape(2, 3)

  def broken(x):
    raise NotImplementedError("no kernel for this shape\nsecond line")

  case = kernel_cases.Case(op="toy", name="tiny", shape="2x3", functions={"reference": (jnp.sin, (x,)),
                                                                           "pallas_gpu": (broken, (x,))},
                           cost={"flops": 6, "hbm_bytes": 48, "ideal_bytes": 48}, default="reference")
  rows = {r["implementation"]: r for r in bench_kernels.bench_case(case, repeats=5, device=None)}
  assert rows["pallas_gpu"]["status"] == "failed: NotImplementedError: no kernel for this shape"
  assert rows["reference"]["status"] == "ok" and rows["reference"]["error_vs_reference"] == 0.0
  assert rows["reference"]["gflops_per_s"] == pytest.approx(6 / rows["reference"]["median_s"] / 1e9)
