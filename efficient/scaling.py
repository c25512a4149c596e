"""Scaling studies: a sweep runner over width x learning rate x seed, and power-law fits (NumPy only).

- `sweep(run, widths=, learning_rates=, seeds=)`: calls `run(width, learning_rate, seed)` (a float loss, or a
  dict holding 'loss') at every grid point and returns one record per point: {'width', 'learning_rate', 'seed',
  'loss', ...the dict's other keys}. It knows no model: the caller's `run` builds and trains one.
- `mean_loss(records)` / `best_learning_rates(records)`: the seed-averaged loss per (width, learning rate) and
  the best grid point per width (a diverged run -- NaN or inf -- counts as +inf, never as best).
- `seed_noise(records)` / `near_optimal(records, tolerance)`: one run's noise (the seed-to-seed spread), and
  the grid learning rates within a tolerance of the best -- the set a noisy sweep cannot tell apart.
- `fit_power_law(n, y)`: y = a * n**-b + c by least squares in y (for each b, a and c are linear: solved exactly;
  b by a grid search refined by golden section) -- the "power law plus constant" of the scaling-law papers.
- `fit_log_log(x, y)`: y = a * x**b by least squares in log-log space (e.g. the best LR against width).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Sequence

import numpy as np


def _grid(values, name: str, *, integer: bool = False) -> list:
  values = list(values)
  if not values:
    raise ValueError(f"{name} is empty: a sweep needs at least one point.")
  for v in values:
    bad = isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v) or v <= 0
    if bad or (integer and int(v) != v):
      raise ValueError(f"{name}: {v!r} must be a positive finite {'integer' if integer else 'number'}.")
  if len(set(values)) != len(values):
    raise ValueError(f"{name}: {values} holds duplicates.")
  return values


def sweep(run: Callable[[int, float, int], float | dict], *, widths: Sequence[int],
          learning_rates: Sequence[float], seeds: Sequence[int] = (0,),
          progress: Callable[[dict], None] | None = None) -> list[dict]:
  """One record per (width, learning rate, seed), widths outermost (see the module docstring). `progress`, if
  given, is called with each record as it completes. An empty grid or a non-positive value is a ValueError
  naming the argument."""
  widths = _grid(widths, "widths", integer=True)
  learning_rates = _grid(learning_rates, "learning_rates")
  seeds = list(seeds)
  if not seeds:
    raise ValueError("seeds is empty: a sweep needs at least one point.")
  records = []
  for width in widths:
    for learning_rate in learning_rates:
      for seed in seeds:
        out = run(int(width), float(learning_rate), int(seed))
        out = dict(out) if isinstance(out, dict) else {"loss": out}
        if "loss" not in out:
          raise ValueError(f"run({width}, {learning_rate}, {seed}) returned a dict without 'loss': {sorted(out)}.")
        record = {"width": int(width), "learning_rate": float(learning_rate), "seed": int(seed), **out}
        record["loss"] = float(record["loss"])
        records.append(record)
        if progress is not None:
          progress(record)
  return records


def _finite_or_inf(x: float) -> float:
  return float(x) if math.isfinite(x) else math.inf


def mean_loss(records: Iterable[dict], key: str = "loss") -> dict[tuple[int, float], float]:
  """{(width, learning_rate): mean over seeds of records[key]}; any diverged seed makes the point +inf."""
  groups: dict[tuple[int, float], list[float]] = {}
  for r in records:
    groups.setdefault((r["width"], r["learning_rate"]), []).append(_finite_or_inf(r[key]))
  return {k: float(np.mean(v)) for k, v in groups.items()}


def best_learning_rates(records: Iterable[dict], key: str = "loss") -> dict[int, dict]:
  """{width: {'learning_rate', 'index' (its position in the sorted LR grid of that width), 'loss'}} of the lowest
  seed-averaged loss; 'learning_rate' is None where every run of the width diverged."""
  means = mean_loss(records, key)
  out = {}
  for width in sorted({w for w, _ in means}):
    grid = sorted(lr for w, lr in means if w == width)
    losses = [means[(width, lr)] for lr in grid]
    i = int(np.argmin(losses))
    finite = math.isfinite(losses[i])
    out[width] = {"learning_rate": grid[i] if finite else None, "index": i if finite else None,
                  "loss": losses[i]}
  return out


def seed_noise(records: Iterable[dict], key: str = "loss") -> float | None:
  """The median over (width, learning rate) points with >= 2 finite seeds of the seeds' sample std of
  records[key]: one run's noise, the yardstick for "these two losses differ"; None without such points."""
  groups: dict[tuple[int, float], list[float]] = {}
  for r in records:
    if math.isfinite(r[key]):
      groups.setdefault((r["width"], r["learning_rate"]), []).append(float(r[key]))
  spreads = [float(np.std(v, ddof=1)) for v in groups.values() if len(v) >= 2]
  return float(np.median(spreads)) if spreads else None


def near_optimal(records: Iterable[dict], tolerance: float, key: str = "loss") -> dict[int, list[int]]:
  """{width: indices (in the sorted LR grid) whose seed-averaged loss is within `tolerance` of the width's
  best}: the learning rates a sweep of this noise cannot tell from the best one (empty if all diverged)."""
  if not (tolerance >= 0 and math.isfinite(tolerance)):
    raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}.")
  means = mean_loss(records, key)
  out = {}
  for width in sorted({w for w, _ in means}):
    losses = [means[(width, lr)] for lr in sorted(lr for w, lr in means if w == width)]
    best = min(losses)
    out[width] = [i for i, v in enumerate(losses) if math.isfinite(best) and v <= best + tolerance]
  return out


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """y = a * n**-b + c, and the fit's coefficient of determination (in y)."""
  a: float
  b: float
  c: float
  r2: float

  def __call__(self, n):
    return self.a * np.asarray(n, np.float64) ** -self.b + self.c


def _points(x, y, *, positive_y: bool) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
  if x.shape != y.shape:
    raise ValueError(f"x and y must have as many points; got {x.size} and {y.size}.")
  if not (np.all(np.isfinite(x)) and np.all(x > 0)):
    raise ValueError("x (n) must be positive finite numbers.")
  if not np.all(np.isfinite(y)) or (positive_y and not np.all(y > 0)):
    raise ValueError(f"y must be {'positive ' if positive_y else ''}finite numbers.")
  return x, y


def _r2(y, fitted) -> float:
  total = float(np.sum((y - y.mean()) ** 2))
  return 1.0 - float(np.sum((y - fitted) ** 2)) / total if total > 0 else 1.0


def _linear_in_a_c(n, y, b):
  """(a, c, residual sum of squares) of the least-squares y ~ a * n**-b + c at fixed b."""
  design = np.stack([n ** -b, np.ones_like(n)], axis=1)
  (a, c), *_ = np.linalg.lstsq(design, y, rcond=None)
  return a, c, float(np.sum((design @ np.array([a, c]) - y) ** 2))


def fit_power_law(n, y, *, b_range: tuple[float, float] = (1e-3, 4.0)) -> PowerLaw:
  """Least-squares y = a * n**-b + c (b within `b_range`; needs >= 3 distinct n). Noise-free data is recovered
  to ~1e-9 relative; see the module docstring for the method."""
  n, y = _points(n, y, positive_y=False)
  if len(np.unique(n)) < 3:
    raise ValueError(f"fit_power_law needs at least 3 distinct n for its 3 parameters; got {np.unique(n).tolist()}.")
  lo, hi = b_range
  if not 0 < lo < hi:
    raise ValueError(f"b_range={b_range} must be (low, high) with 0 < low < high.")
  scale = float(np.exp(np.mean(np.log(n))))  # n / its geometric mean keeps n**-b well conditioned
  m = n / scale
  grid = np.geomspace(lo, hi, 400)
  errors = [_linear_in_a_c(m, y, b)[2] for b in grid]
  i = int(np.argmin(errors))
  left, right = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
  golden = (math.sqrt(5) - 1) / 2
  for _ in range(100):  # golden section on the bracket around the best grid point
    x1, x2 = right - golden * (right - left), left + golden * (right - left)
    if _linear_in_a_c(m, y, x1)[2] <= _linear_in_a_c(m, y, x2)[2]:
      right = x2
    else:
      left = x1
  b = (left + right) / 2
  a, c, _ = _linear_in_a_c(m, y, b)
  a = a * scale ** b  # back from n / scale to n
  law = PowerLaw(float(a), float(b), float(c), 0.0)
  return dataclasses.replace(law, r2=_r2(y, law(n)))


def fit_log_log(x, y) -> tuple[float, float, float]:
  """(a, b, r2) of y = a * x**b by least squares of log y on log x (r2 in log space)."""
  x, y = _points(x, y, positive_y=True)
  if len(np.unique(x)) < 2:
    raise ValueError("fit_log_log needs at least 2 distinct x.")
  lx, ly = np.log(x), np.log(y)
  b, log_a = np.polyfit(lx, ly, 1)
  return float(np.exp(log_a)), float(b), _r2(ly, log_a + b * lx)


__all__ = ["PowerLaw", "best_learning_rates", "fit_log_log", "fit_power_law", "mean_loss", "near_optimal",
           "seed_noise", "sweep"]
