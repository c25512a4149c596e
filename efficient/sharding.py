"""Logical axis names, rule presets and mesh helpers.

Parameters carry logical names (`batch, length, embed, mlp, heads, kv_heads, head_dim, vocab, expert`); a rule
preset maps them to mesh axes (`data, fsdp, tensor`, + `expert`). A dimension that its mesh axis does not divide
(SmolLM2's 9 heads on `tensor: 2`) is replicated instead, and `shard_model` reports which ones were.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "expert")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

_BATCH = ("batch", ("data", "fsdp"))
PRESETS: dict[str, Rules] = {
    # Pure data parallelism: parameters replicated, the batch split over every data-like axis.
    "dp": (_BATCH,),
    # FSDP: the embed dimension of every parameter is split over `fsdp` (gathered per layer by XLA).
    "fsdp": (_BATCH, ("embed", "fsdp")),
    # Megatron-style tensor parallelism: heads, MLP hidden units and vocabulary on `tensor`.
    "tp": (_BATCH, ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor")),
    "fsdp_tp": (_BATCH, ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
                ("vocab", "tensor")),
    # Expert parallelism (efficient.sparse.moe): MoE experts split over `expert`, the batch over data axes.
    "ep": (_BATCH, ("expert", "expert")),
}


def rules_for(preset: str | Rules) -> Rules:
  if isinstance(preset, str):
    if preset not in PRESETS:
      raise ValueError(f"unknown sharding preset {preset!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[preset]
  return tuple(preset)


def parse_mesh(spec: str) -> dict[str, int]:
  """'data:2,fsdp:2,tensor:2' -> {'data': 2, 'fsdp': 2, 'tensor': 2}."""
  axes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, size = part.partition(":")
    if name not in MESH_AXES:
      raise ValueError(f"--mesh: unknown axis {name!r} in {spec!r}; axes are {MESH_AXES}.")
    if name in axes:
      raise ValueError(f"--mesh: axis {name!r} given twice in {spec!r}.")
    if not size.isdigit() or int(size) < 1:
      raise ValueError(f"--mesh: axis {name!r} needs a positive integer size ('{name}:2'), got {part!r}.")
    axes[name] = int(size)
  if not axes:
    raise ValueError(f"--mesh: no axes in {spec!r}; write e.g. 'data:2,fsdp:2,tensor:2'.")
  return axes


def make_mesh(spec: str | dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with Auto axes (so XLA may shard contracting dims) over the first prod(sizes) devices."""
  axes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
  devices = list(jax.devices() if devices is None else devices)
  needed = math.prod(axes.values())
  if needed > len(devices):
    raise ValueError(f"--mesh {axes} needs {needed} devices but {len(devices)} are available.")
  grid = np.asarray(devices[:needed], dtype=object).reshape(tuple(axes.values()))
  return Mesh(grid, tuple(axes), axis_types=(AxisType.Auto,) * len(axes))


def logical_to_spec(names: Iterable[str | None], rules: Rules, *, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, replicated: list | None = None) -> PartitionSpec:
  """Maps logical names to a PartitionSpec; mesh axes absent from `mesh`, already used, or not dividing the
  dimension are dropped (and the dropped dimension is appended to `replicated` when given)."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(names):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    for axis in axes:
      if mesh is not None and axis not in mesh.shape or axis in used:
        continue
      size = mesh.shape[axis] if mesh is not None else 1
      already = math.prod(mesh.shape[a] for a in kept) if mesh is not None else 1
      if shape is not None and shape[dim] % (already * size):
        if replicated is not None:
          replicated.append((name, shape[dim], axis))
        continue
      kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def variable_names(variable: nnx.Variable) -> tuple | None:
  return variable.get_metadata().get("out_sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules: str | Rules, replicated: list | None = None):
  """NamedShardings for every array of an nnx State, from each variable's logical names."""
  rules = rules_for(rules)

  def one(variable):
    value = variable[...] if isinstance(variable, nnx.Variable) else variable
    names = variable_names(variable) if isinstance(variable, nnx.Variable) else None
    if names is None or not hasattr(value, "shape"):
      return NamedSharding(mesh, PartitionSpec())
    if len(names) != value.ndim:
      raise ValueError(f"logical names {names} do not match an array of shape {value.shape}.")
    return NamedSharding(mesh, logical_to_spec(names, rules, shape=value.shape, mesh=mesh, replicated=replicated))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: str | Rules) -> list:
  """Moves every variable of `model` onto `mesh` by its logical names, in place. Returns the list of
  (logical name, size, mesh axis) that could not be split evenly and stayed replicated."""
  replicated: list = []
  graphdef, state = nnx.split(model)
  shardings = state_shardings(state, mesh, rules, replicated)
  state = jax.device_put(state, shardings)
  nnx.update(model, state)
  return sorted(set(replicated))


def batch_sharding(mesh: Mesh, rules: str | Rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, length, ...] input under `rules` (batch split, the rest replicated)."""
  names = ("batch", "length") + (None,) * (ndim - 2)
  return NamedSharding(mesh, logical_to_spec(names[:ndim], rules_for(rules), mesh=mesh))
