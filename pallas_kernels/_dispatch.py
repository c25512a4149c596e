"""Implementation selection shared by every op in `pallas_kernels`.

`implementation=None` picks by `jax.default_backend()`; an explicit name is honoured or refused with a
`ValueError` that lists the choices -- never a silent fallback when a user asked for a kernel.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax

ALL_IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu")
# Implementations that need a given backend to run (the interpret modes and the jnp paths run anywhere).
_NEEDS_BACKEND = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}
# What `implementation=None` prefers on each backend, first available wins.
_DEFAULT_ORDER = {
    "tpu": ("pallas_tpu", "xla", "reference"),
    "gpu": ("pallas_gpu", "xla", "reference"),
    "cpu": ("xla", "reference"),
}


def choose(implementation: str | None, available: Sequence[str], *, op: str = "op") -> str:
  """Returns the implementation to run, or raises a `ValueError` naming the choices."""
  available = tuple(available)
  backend = jax.default_backend()
  if implementation is None:
    for name in _DEFAULT_ORDER.get(backend, ("xla", "reference")):
      if name in available:
        return name
    raise ValueError(f"{op}: no implementation runs on backend {backend!r}; it has {available}.")
  if implementation not in ALL_IMPLEMENTATIONS or implementation not in available:
    raise ValueError(f"{op}: unknown implementation={implementation!r}; choose one of {available} (or None).")
  needed = _NEEDS_BACKEND.get(implementation)
  if needed is not None and backend != needed:
    runnable = cpu_runnable(available) if backend == "cpu" else available
    raise ValueError(f"{op}: implementation={implementation!r} needs a {needed!r} backend but jax's default "
                     f"backend is {backend!r}; runnable here: {runnable}.")
  return implementation


def cpu_runnable(available: Sequence[str]) -> tuple[str, ...]:
  """The implementations of `available` that run on a CPU (what the parametrized op tests sweep)."""
  return tuple(name for name in available if name not in _NEEDS_BACKEND)


def run(impls: Mapping[str, Callable], implementation: str | None, *args, op: str = "op", **kwargs):
  """Chooses among `impls` (name -> callable) and calls the chosen one."""
  return impls[choose(implementation, tuple(impls), op=op)](*args, **kwargs)


def interpret_params(implementation: str):
  """The `interpret=` argument a Pallas call takes for `implementation` (False for the compiled kernels)."""
  if implementation == "interpret_tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams()
  if implementation == "interpret_gpu":
    return True
  return False


@functools.cache
def tpu_style(implementation: str) -> bool:
  return implementation in ("pallas_tpu", "interpret_tpu")
