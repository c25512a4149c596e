"""`to_dict(config)`: a model config dataclass as a JSON-able dict (dtypes by name), shared by every model config."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def to_dict(config, *, omit_at_default: dict | None = None) -> dict:
  """`dataclasses.asdict(config)` with `param_dtype` / `compute_dtype` as names; fields in `omit_at_default`
  (name -> default) are left out while they hold their default (so signatures keyed on older configs hold)."""
  d = dataclasses.asdict(config)
  for name in ("param_dtype", "compute_dtype"):
    if name in d:
      d[name] = jnp.dtype(d[name]).name
  for name, default in (omit_at_default or {}).items():
    if d[name] == default:
      del d[name]
  return d
