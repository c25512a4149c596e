"""Quantization maps of the low-bit Adam states, as float32 NumPy arrays sorted ascending (code i -> MAPS[name][i]).

Where each comes from (re-derived here from the published algorithms; every value is the float32 the source
computes, so a map equals the source's tensor exactly):

- "dynamic_signed_8" / "dynamic_unsigned_8": bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7,
  total_bits=8)` (bitsandbytes/functional.py; Dettmers et al., "8-bit Optimizers via Block-wise Quantization").
  For exponent group i = 0..6 it takes `torch.linspace(0.1, 1, n_i)` in float32 (n_i = 2**i + 1 signed,
  2**(i+1) + 1 unsigned), the float32 means of neighbouring boundaries, times the Python float 10**(i - 6)
  (rounded to float32 by torch before the float32 multiply); signed maps add the negations; then 0 and 1.0, sorted.
  Signed: 127 negative values, 0, 127 positive, 1.0. Unsigned: 0, 254 positive values, 1.0.
  torch.linspace (ATen's linspace kernel) computes `start + step*k` for the first half and `end - step*(n-1-k)`
  for the second with float32 `step = (end - start) / (n - 1)`; `_torch_linspace_f32` follows that scalar
  definition. (ATen's SIMD loop builds runs of 8 or 16 values as `base + j*step` from a run base, which can move
  some of the 65- and 129-value groups by one float32 ulp depending on the CPU's vector width: bitsandbytes' map
  is itself not bit-identical across machines. The scalar formula is the definition every machine shares for the
  short groups and the one torch documents.)
- "de_signed_4": Li et al. 2023 ("Memory Efficient Optimizers with 4-bit States"), code thu-ml/low-bit-optimizers,
  lpmm/functional.py: the first moment's 'nonlinear' quant type at b=4, signed -> lpmm's own
  `create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)`: groups i = 0..2 with linspace sizes 2, 3, 5
  (no extra linear items), scales 10**(i - 2), their negations, 0 and 1.0 -> 16 values.
- "linear_unsigned_4_nozero": lpmm's second-moment quant type 'power-1' unsigned at b=4 (`create_pow_map`):
  `torch.linspace(0, 1, 17)[1:]` = (i + 1) / 16, which excludes zero (the paper's fix of the zero-point problem).
- "linear_unsigned_4": the naive 4-bit linear map with zero, i / 15 (float32-rounded), i = 0..15.
- "linear_signed_4": lpmm's 'linear' quant type, signed b=4 (`prepare_quant_boundary`: levels k/7, k = -7..7,
  zero included); 15 levels in 16 codes, the last code repeats 1.0 and is never produced by quantization (its
  threshold is +inf: a tie goes to the lower code).

Quantization is "nearest map value, ties to the lower code", computed as the number of `THRESHOLDS[name]` below x:
threshold j is the exact midpoint of values j and j+1 (exact in float64) rounded DOWN to float32, so for every
float32 x, `x > threshold_j` exactly when x lies above the real midpoint. "dynamic_unsigned_8" alone sets its first
threshold to 0: a positive value never takes the zero code (see reference.py for why and what bitsandbytes does).
"""
from __future__ import annotations

import numpy as np

_F32 = np.float32


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace(start, end, steps, dtype=torch.float32) by ATen's scalar formula (see the module docstring)."""
  start, end = _F32(start), _F32(end)
  step = _F32((end - start) / _F32(steps - 1))
  halfway = steps // 2
  out = np.empty(steps, _F32)
  for k in range(steps):
    out[k] = start + step * _F32(k) if k < halfway else end - step * _F32(steps - k - 1)
  return out


def dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int, *, extra_linear: bool) -> np.ndarray:
  """The dynamic (exponent + linear fraction) map of bitsandbytes (`extra_linear=True`: its handling of the
  all-zero-exponent items) / lpmm (`extra_linear=False`, as Li et al.'s code calls it at 4 bits, where the two agree
  because no extra items exist). Returns the sorted float32 values (zero-padded to 2**total_bits like bitsandbytes)."""
  non_sign_bits = total_bits - 1
  data: list[float] = []
  for i in range(max_exponent_bits):
    fraction_bits = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)  # unsigned: the sign bit too
    items = 2 ** fraction_bits + 1
    boundaries = _torch_linspace_f32(0.1, 1.0, items)
    means = (boundaries[:-1] + boundaries[1:]) / _F32(2.0)
    scale = _F32(10.0 ** (-(max_exponent_bits - 1) + i))
    data += list(scale * means)
    if signed:
      data += list(_F32(-scale) * means)
  extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
  if extra_linear and extra > 0:  # never taken by the maps below; kept so the function is the whole algorithm
    boundaries = _torch_linspace_f32(0.1, 1.0, extra + 1)
    means = (boundaries[:-1] + boundaries[1:]) / _F32(2.0)
    scale = _F32(10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1))
    data += list(scale * means)
    if signed:
      data += list(_F32(-scale) * means)
  data += [0.0, 1.0]
  data += [0.0] * (2 ** total_bits - len(data))
  return np.array(sorted(data), dtype=_F32)


def _thresholds(values: np.ndarray, *, never_zero: bool) -> np.ndarray:
  mid = (values[:-1].astype(np.float64) + values[1:].astype(np.float64)) / 2.0  # exact in float64
  down = mid.astype(_F32)
  down = np.where(down.astype(np.float64) > mid, np.nextafter(down, _F32(-np.inf)), down).astype(_F32)
  repeated = np.flatnonzero(values[:-1] == values[1:])
  assert all(j == len(values) - 2 for j in repeated), "only a repeated last value is supported"
  down[repeated] = _F32(np.inf)  # a repeated last value: the lower code wins, even for an x above it
  if never_zero:
    down[0] = _F32(0.0)
  return down


MAPS: dict[str, np.ndarray] = {
    "dynamic_signed_8": dynamic_map(True, 7, 8, extra_linear=True),
    "dynamic_unsigned_8": dynamic_map(False, 7, 8, extra_linear=True),
    "de_signed_4": dynamic_map(True, 3, 4, extra_linear=False),
    "linear_unsigned_4_nozero": (np.arange(1, 17, dtype=np.float64) / 16).astype(_F32),
    "linear_unsigned_4": (np.arange(16, dtype=np.float64) / 15).astype(_F32),
    "linear_signed_4": (np.array(list(range(-7, 8)) + [7], dtype=np.float64) / 7).astype(_F32),
}
for _values in MAPS.values():
  _values.setflags(write=False)

BITS = {name: 8 if len(values) == 256 else 4 for name, values in MAPS.items()}
SIGNED = {name: bool(values[0] < 0) for name, values in MAPS.items()}
# Maps whose positive inputs never take the zero code (bitsandbytes' v map in this project; see reference.py).
NEVER_ZERO = frozenset({"dynamic_unsigned_8"})
THRESHOLDS: dict[str, np.ndarray] = {name: _thresholds(values, never_zero=name in NEVER_ZERO)
                                     for name, values in MAPS.items()}
for _values in THRESHOLDS.values():
  _values.setflags(write=False)
# The code a block of zeros takes: the map's zero (or, without one, its smallest value, code 0).
ZERO_CODE = {name: int(np.sum(THRESHOLDS[name] < 0)) for name in MAPS}


def check_map(name) -> str:
  """Returns `name` or raises a ValueError naming the maps."""
  if not isinstance(name, str) or name not in MAPS:
    raise ValueError(f"map name {name!r} is unknown; choose one of {tuple(MAPS)}.")
  return name
