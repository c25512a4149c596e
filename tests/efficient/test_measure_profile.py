"""measure.profile / roofline / device peaks against hand-derived numbers."""
import functools
import math

import jax
import jax.numpy as jnp
import pytest

from efficient import measure

M, K, N = 64, 32, 48


def test_profile_of_a_matmul_reports_compiled_figures_time_and_roofline():
  x, w = jnp.ones((M, K)), jnp.ones((K, N))
  result = measure.profile(lambda a, b: a @ b, x, w, device="h200", repeats=5)
  flops = 2 * M * N * K                           # one multiply-add per (m, n, k)
  moved = (M * K + K * N + M * N) * 4             # f32 operands read once, output written once
  assert result["flops"] == flops and result["bytes_accessed"] == moved
  assert result["argument_bytes"] == (M * K + K * N) * 4 and result["output_bytes"] == M * N * 4
  assert result["temp_bytes"] >= 0
  assert len(result["samples_s"]) == 5 and result["median_s"] > 0
  assert result["achieved_flops_per_s"] == pytest.approx(flops / result["median_s"])
  roof = result["roofline"]
  # H200 SXM: 989 TFLOP/s dense bf16, 4.8 TB/s HBM3e.
  assert roof["compute_s"] == pytest.approx(flops / 989e12, rel=1e-12)
  assert roof["memory_s"] == pytest.approx(moved / 4.8e12, rel=1e-12)
  assert roof["bound_s"] == roof["memory_s"] and roof["bound_by"] == "memory"
  assert roof["arithmetic_intensity"] == pytest.approx(flops / moved)  # 7.4 flop/byte, far below the ridge
  assert roof["ridge_intensity"] == pytest.approx(989e12 / 4.8e12)
  assert result["roofline_fraction"] == pytest.approx(roof["bound_s"] / result["median_s"])


def test_roofline_by_hand_on_a_compute_bound_workload():
  roof = measure.roofline(4e12, 1e9, "tpu-v5e")   # 4000 flop/byte, above v5e's ridge of 197e12 / 819e9 = 240
  assert roof["compute_s"] == pytest.approx(4e12 / 197e12) and roof["memory_s"] == pytest.approx(1e9 / 819e9)
  assert roof["bound_by"] == "compute" and roof["bound_s"] == roof["compute_s"]
  assert roof["arithmetic_intensity"] == 4000.0 and roof["ridge_intensity"] == pytest.approx(240.537, rel=1e-5)
  assert measure.roofline(4e12, 1e9, "TPU v5 lite") == roof  # jax's device_kind names the same chip
  assert measure.roofline(0, 0, "a100")["bound_by"] == "none"
  assert measure.roofline(5, 0, "a100")["arithmetic_intensity"] == math.inf


def test_device_table_holds_public_peaks():
  peaks = {name: (p.flops_per_s, p.hbm_bytes_per_s) for name, p in measure.DEVICE_PEAKS.items()}
  assert peaks["h100-sxm"] == (989e12, 3.35e12) and peaks["h200"] == (989e12, 4.8e12)
  assert peaks["a100"] == (312e12, 2.039e12) and peaks["tpu-v4"] == (275e12, 1.2e12)
  assert peaks["tpu-v5p"] == (459e12, 2.765e12) and peaks["tpu-v6e"] == (918e12, 1.64e12)
  assert all(measure.device_peak(kind) is measure.DEVICE_PEAKS[key] for kind, key in measure.DEVICE_KINDS.items())


@pytest.mark.parametrize("call, match", [
    (lambda: measure.roofline(1.0, 1.0, "tpu-v9"), r"device='tpu-v9' is unknown; choose one of \[.*'h200'"),
    (lambda: measure.profile(lambda a: a, jnp.ones(2), device="v100"), r"device='v100' is unknown"),
    (lambda: measure.roofline(float("nan"), 1.0, "h200"), r"flops=nan must be a finite number >= 0"),
    (lambda: measure.roofline(1.0, -2, "h200"), r"bytes_accessed=-2 must be a finite number >= 0"),
    (lambda: measure.roofline(float("inf"), 1.0, "h200"), r"flops=inf"),
    (lambda: measure.roofline("1", 1.0, "h200"), r"flops='1'"),
    (lambda: measure.wall_time(lambda: 0, repeats=0), r"repeats=0 must be an int >= 1"),
    (lambda: measure.profile(lambda a: a, jnp.ones(2), warmup=-1), r"warmup=-1 must be an int >= 0"),
])
def test_bad_arguments_are_refused_by_name(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_profile_of_a_jitted_function_with_static_arguments():
  @functools.partial(jax.jit, static_argnames=("power",))
  def powered(x, *, power):
    return x ** power

  result = measure.profile(powered, jnp.full((16,), 3.0), power=2, repeats=5)
  assert result["flops"] == 16 and len(result["samples_s"]) == 5  # x * x: one multiply per element
