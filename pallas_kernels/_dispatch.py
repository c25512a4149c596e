"""Implementation selection shared by every op in `pallas_kernels`.

Every op takes `implementation=None` or one of `ALL_IMPLEMENTATIONS` (those it has are its `IMPLEMENTATIONS`):
- an explicit name is honoured or refused with a `ValueError` that lists the op's choices;
- `None` means "best for this backend" (`jax.default_backend()`: the Pallas kernel on TPU / GPU, the XLA path or
  the reference on CPU), unless a policy is active:

    with pallas_kernels.implementation("interpret_tpu"):
      y = model(x)          # every op called with implementation=None runs its TPU kernel in interpret mode

A policy names one implementation for every op called inside it (an explicit `implementation=` argument still
wins). An op that lacks the named kernel ('pallas_*', 'interpret_*') raises -- never a silent fallback when a
kernel was asked for. A policy of 'xla' runs the 'reference' of ops without a separate XLA path: for those ops
the reference IS their plain-jnp XLA path ('xla' is only listed where an op has an optimized one, see
the README, "Design"). 'pallas_tpu' / 'pallas_gpu' need their backend, from a policy as from an argument.

The policy is a `jax.make_user_context`: thread-local, nestable, and part of jax's jit cache key, so a function
jitted outside a policy is traced again inside one instead of silently keeping the implementations it was traced
with (ops choose at trace time).
"""
from __future__ import annotations

import contextlib
import functools
from types import ModuleType
from typing import Iterator, Sequence

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
_POLICY = jax.make_user_context(default_value=None)


@contextlib.contextmanager
def implementation(name: str | None) -> Iterator[None]:
  """Within the block, ops called with `implementation=None` run `name` (None: best for the backend again).

  Nestable; the previous policy is restored on exit. Raises a `ValueError` for a name outside
  `ALL_IMPLEMENTATIONS`; see the module docstring for ops that lack the named implementation.
  """
  if name is not None and name not in ALL_IMPLEMENTATIONS:
    raise ValueError(f"implementation={name!r} is unknown; choose one of {ALL_IMPLEMENTATIONS} (or None).")
  with _POLICY(name):
    yield


def current_implementation() -> str | None:
  """The name of the active `implementation(...)` policy, or None when ops pick by backend."""
  return _POLICY.value


def choose(implementation: str | None, available: Sequence[str], *, op: str = "op") -> str:
  """Returns the implementation to run, or raises a `ValueError` naming the choices.

  `implementation` (the op's argument) wins; when it is None the active policy decides, else the backend.
  """
  available = tuple(available)
  backend = jax.default_backend()
  if implementation is not None:
    if implementation not in ALL_IMPLEMENTATIONS or implementation not in available:
      raise ValueError(f"{op}: unknown implementation={implementation!r}; choose one of {available} (or None).")
    return _check_backend(implementation, available, backend, op=op, source=f"implementation={implementation!r}")
  policy = current_implementation()
  if policy is None:
    for name in _DEFAULT_ORDER.get(backend, ("xla", "reference")):
      if name in available:
        return name
    raise ValueError(f"{op}: no implementation runs on backend {backend!r}; it has {available}.")
  source = f"the policy pallas_kernels.implementation({policy!r})"
  if policy == "xla" and policy not in available:
    return "reference"  # this op has no separate XLA path: its reference is the plain-jnp one
  if policy not in available:
    raise ValueError(f"{op}: {source} names a kernel this op does not have; it has {available}. Pass "
                     f"implementation= to this op explicitly, or use another policy.")
  return _check_backend(policy, available, backend, op=op, source=source)


def _check_backend(name: str, available: tuple[str, ...], backend: str, *, op: str, source: str) -> str:
  needed = _NEEDS_BACKEND.get(name)
  if needed is not None and backend != needed:
    runnable = cpu_runnable(available) if backend == "cpu" else available
    raise ValueError(f"{op}: {source} needs a {needed!r} backend but jax's default backend is {backend!r}; "
                     f"runnable here: {runnable}.")
  return name


def runnable(available: Sequence[str], backend: str | None = None) -> tuple[str, ...]:
  """The implementations of `available` that run on `backend` (default: jax's default backend), in their order:
  the jnp paths and interpret modes run anywhere, 'pallas_tpu' / 'pallas_gpu' only on their own backend.

  This is what the parametrized op tests sweep, so on a GPU (TPU) they also check the compiled kernel against
  the reference; on a CPU it equals `cpu_runnable(available)`.
  """
  backend = jax.default_backend() if backend is None else backend
  return tuple(name for name in available if _NEEDS_BACKEND.get(name, backend) == backend)


def cpu_runnable(available: Sequence[str]) -> tuple[str, ...]:
  """The implementations of `available` that run on a CPU."""
  return runnable(available, "cpu")


def kernel_modules(*, tpu: ModuleType, gpu: ModuleType) -> dict[str, ModuleType]:
  """An op's implementation -> kernel module table: the compiled and interpreted modes of a platform run the
  same kernel module (only `interpret_params` differs)."""
  return {"pallas_tpu": tpu, "interpret_tpu": tpu, "pallas_gpu": gpu, "interpret_gpu": gpu}


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
