"""efficient.scaling: the sweep runner's records and best points, and power-law fits recovering known laws."""
import math

import numpy as np
import pytest

from efficient import scaling


def test_fit_power_law_recovers_a_b_c_from_noise_free_and_noisy_data():
  n = np.geomspace(1e3, 1e8, 12)
  a, b, c = 41.0, 0.34, 1.69          # Chinchilla-like: loss = a N^-b + c
  fit = scaling.fit_power_law(n, a * n ** -b + c)
  assert fit.a == pytest.approx(a, rel=1e-6) and fit.b == pytest.approx(b, rel=1e-7)
  assert fit.c == pytest.approx(c, rel=1e-7) and fit.r2 == pytest.approx(1.0, abs=1e-12)
  np.testing.assert_allclose(fit(n), a * n ** -b + c, rtol=1e-8)
  noisy = (a * n ** -b + c) * (1 + 1e-3 * np.random.default_rng(0).standard_normal(n.size))
  fit = scaling.fit_power_law(n, noisy)
  assert fit.b == pytest.approx(b, rel=0.05) and fit.c == pytest.approx(c, rel=0.01) and fit.r2 > 0.999
  # a steep law over a short range (the μP experiment's 4 widths): b near 1
  w = np.array([64.0, 128, 256, 512])
  fit = scaling.fit_power_law(w, 3.0 * w ** -1.1 + 0.9)
  assert (fit.a, fit.b, fit.c) == pytest.approx((3.0, 1.1, 0.9), rel=1e-6)


def test_fit_log_log_recovers_a_pure_power_law():
  x = np.array([64, 128, 256, 512])
  a, b, r2 = scaling.fit_log_log(x, 0.5 * x ** -0.75)
  assert (a, b, r2) == pytest.approx((0.5, -0.75, 1.0), rel=1e-9)


def test_fits_reject_bad_points():
  with pytest.raises(ValueError, match="at least 3 distinct n"):
    scaling.fit_power_law([1, 2, 2], [3, 2, 1])
  with pytest.raises(ValueError, match="as many points"):
    scaling.fit_power_law([1, 2, 3], [1, 2])
  with pytest.raises(ValueError, match="positive finite"):
    scaling.fit_log_log([1, 2], [1, -2])
  with pytest.raises(ValueError, match=r"x \(n\) must be positive"):
    scaling.fit_power_law([0, 2, 3], [1, 2, 3])


def test_sweep_records_every_point_and_finds_the_best_learning_rate():
  calls = []

  def run(width, lr, seed):  # a bowl in log2(lr) whose minimum drifts with width; width 32's largest LR diverges
    calls.append((width, lr, seed))
    if width == 32 and lr == 2.0 ** -4:
      return {"loss": math.nan, "extra": 1}
    return (math.log2(lr) + 8 + math.log2(width / 16)) ** 2 + seed * 0.01

  seen = []
  records = scaling.sweep(run, widths=[16, 32], learning_rates=[2.0 ** e for e in range(-10, -3)], seeds=[0, 1],
                          progress=seen.append)
  assert len(records) == len(calls) == len(seen) == 2 * 7 * 2
  assert calls[:3] == [(16, 2.0 ** -10, 0), (16, 2.0 ** -10, 1), (16, 2.0 ** -9, 0)]
  assert records[0] == {"width": 16, "learning_rate": 2.0 ** -10, "seed": 0, "loss": 4.0}
  means = scaling.mean_loss(records)
  assert means[(16, 2.0 ** -8)] == pytest.approx(0.005) and means[(32, 2.0 ** -4)] == math.inf
  best = scaling.best_learning_rates(records)
  assert best[16] == {"learning_rate": 2.0 ** -8, "index": 2, "loss": pytest.approx(0.005)}
  assert best[32]["learning_rate"] == 2.0 ** -9 and best[32]["index"] == 1
  everything_diverged = scaling.best_learning_rates([{"width": 8, "learning_rate": 1.0, "loss": math.inf}])
  assert everything_diverged[8]["learning_rate"] is None


def test_seed_noise_and_near_optimal_band():
  records = [{"width": 8, "learning_rate": lr, "seed": s, "loss": loss + 0.1 * s}
             for lr, loss in ((0.1, 3.0), (0.2, 2.5), (0.4, 2.55), (0.8, math.nan)) for s in (0, 1)]
  # every finite point's two seeds differ by 0.1: sample std 0.1 / sqrt(2)
  assert scaling.seed_noise(records) == pytest.approx(0.1 / math.sqrt(2))
  assert scaling.seed_noise(records[::2]) is None   # one seed per point: no estimate
  assert scaling.near_optimal(records, 0.06) == {8: [1, 2]}   # 2.55 is within 0.06 of 2.5; NaN never is
  assert scaling.near_optimal(records, 0.0) == {8: [1]}
  with pytest.raises(ValueError, match="tolerance"):
    scaling.near_optimal(records, -1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(widths=[], learning_rates=[1e-3]), "widths is empty"),
    (dict(widths=[64], learning_rates=[]), "learning_rates is empty"),
    (dict(widths=[64], learning_rates=[1e-3], seeds=[]), "seeds is empty"),
    (dict(widths=[64.5], learning_rates=[1e-3]), "widths: 64.5 must be a positive finite integer"),
    (dict(widths=[64], learning_rates=[-1e-3]), "learning_rates: -0.001 must be a positive"),
    (dict(widths=[64, 64], learning_rates=[1e-3]), "duplicates"),
])
def test_sweep_rejects_a_bad_grid(kwargs, message):
  with pytest.raises(ValueError, match=message):
    scaling.sweep(lambda w, lr, s: 1.0, **kwargs)


def test_sweep_rejects_a_result_without_loss():
  with pytest.raises(ValueError, match="without 'loss'"):
    scaling.sweep(lambda w, lr, s: {"acc": 1.0}, widths=[8], learning_rates=[1.0])
