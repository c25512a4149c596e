"""Batched inference with many LoRA adapters on one base model (S-LoRA / punica): each sequence of a batch picks
its adapter, and one forward pass serves them all.

  layers = add_multi_lora(base_model, [model_a, "ckpt/b", model_c])   # LoRA models or save_adapters directories
  set_adapter_ids(base_model, jnp.array([2, 0, -1, 1]))               # per batch row; -1: the base alone
  logits = base_model(tokens)                                          # row i == adapter ids[i]'s own model

`add_multi_lora` replaces each adapted layer of the base by a `MultiLoRAEinsum` holding the N adapters stacked:
A [N, in, r], B [N, r, out] and the per-adapter scaling [N] (adapters may differ in alpha / rsLoRA; the rank of a
layer must agree across adapters). Its forward keeps the base output and adds, per token,

  delta = (x @ A[id]) @ B[id] * scaling[id]

computed with `pallas_kernels.grouped_matmul`: the tokens are stably sorted by adapter id (each adapter's tokens
contiguous, group_sizes = tokens per adapter), the tokens of id -1 sorted last, past sum(group_sizes), where the
grouped product writes zeros; two grouped products (the shrink to r, the expand to out) give the delta rows, which
are scaled and put back in token order. `implementation=` goes to grouped_matmul (None: the policy / backend).

The ids are an `AdapterIds` variable on every MultiLoRAEinsum (`set_adapter_ids`), so the model code stays as it
is and the ids travel in the model state through `nnx.split` / `jit` (traced ids are fine; concrete ids are
checked). They index the leading axis of each layer's input rows (the batch, for our models and flax's layers);
every token of a row takes its row's adapter. A traced id outside [-1, N) gives NaN rows, never another adapter's
output. LoRA dropout does not apply (inference).

The stacked arrays are `StackedAdapter` variables, not `nn.Adapter` / `nnx.Param`: this is an inference-time
layer, so optimizers, trainers' parameter filters and `core.adapter_state` / `count_adapter_parameters` leave
them alone; they are still model state (sharded by their logical names, the adapter axis replicated).
`save_adapters` refuses a MultiLoRAEinsum (save each adapter's own model; directories load back here).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient import calibration
from efficient.peft import checkpoint, core, lora
from pallas_kernels.grouped_matmul import grouped_matmul


class StackedAdapter(nnx.Variable):
  """N adapters' parameters stacked along axis 0 (frozen: inference only, not an `nnx.Param`)."""


class AdapterIds(nnx.Variable):
  """The adapter id of each batch row ([B] int32, -1: no adapter) a `MultiLoRAEinsum` applies."""


def _stacked(value, names) -> StackedAdapter:
  return StackedAdapter(value, out_sharding=tuple(names), eager_sharding=False)


class MultiLoRAEinsum(core.AdaptedLinear):
  """y = base(x) + the LoRA delta of each batch row's adapter (module docstring): `lora_a` [N, in, r], `lora_b`
  [N, r, out], `scaling` [N] (`StackedAdapter`s), `adapter_ids` [B] (`AdapterIds`), `num_adapters` = N."""

  def __init__(self, base: nnx.Module, a, b, scaling, *, path: str = "", implementation: str | None = None):
    super().__init__(base, path=path)
    g = self.geometry
    a, b, scaling = jnp.asarray(a), jnp.asarray(b), jnp.asarray(scaling, jnp.float32)
    n = a.shape[0] if a.ndim == 3 else 0
    rank = a.shape[-1] if a.ndim == 3 else 0
    if (a.ndim != 3 or n == 0 or a.shape[1] != g.in_features or b.shape != (n, rank, g.out_features)
        or scaling.shape != (n,)):
      raise ValueError(f"{path}: the stacked adapters must be A [N, {g.in_features}, r], B [N, r, "
                       f"{g.out_features}] and scaling [N]; got A {tuple(a.shape)}, B {tuple(b.shape)}, scaling "
                       f"{tuple(scaling.shape)}.")
    self.num_adapters = int(n)
    self.rank = int(rank)
    self.implementation = implementation
    self.lora_a = _stacked(a, ("adapters", g.in_name, "lora_rank"))
    self.lora_b = _stacked(b, ("adapters", "lora_rank", g.out_name))
    self.scaling = _stacked(scaling, ("adapters",))
    self.adapter_ids = AdapterIds(jnp.zeros((0,), jnp.int32))  # empty: not set yet

  def __call__(self, x):
    ids = self.adapter_ids[...]
    if ids.shape == (0,):
      raise ValueError(f"{self.path}: no adapter ids set; call efficient.peft.multi.set_adapter_ids(model, ids) "
                       f"with one id per batch row first.")
    y = self.base(x)
    rows = self.rows(x)                                   # [tokens..., in]
    if rows.ndim < 2 or rows.shape[0] != ids.shape[0]:
      raise ValueError(f"{self.path}: ids hold {ids.shape[0]} adapter ids but the input's batch (leading token "
                       f"axis) has {rows.shape[0] if rows.ndim > 1 else 'no'} rows (input {tuple(x.shape)}).")
    delta = self._delta(rows.reshape(-1, rows.shape[-1]), ids, rows.shape[1:-1])
    return y + self.output_layout(delta.reshape(*rows.shape[:-1], -1), x).astype(y.dtype)

  def _delta(self, flat, ids, inner_shape):
    """[M, in] token rows (batch-major) and [B] row ids -> [M, out] f32 LoRA deltas in token order."""
    n, dtype = self.num_adapters, flat.dtype
    token_ids = jnp.broadcast_to(ids.reshape((-1,) + (1,) * len(inner_shape)), ids.shape + inner_shape).reshape(-1)
    valid = (token_ids >= 0) & (token_ids < n)
    group = jnp.where(valid, token_ids, n)                 # id -1 (and a bad traced id): past every group
    order = jnp.argsort(group, stable=True)
    group_sizes = jnp.bincount(group, length=n + 1)[:n].astype(jnp.int32)
    # As LoRAEinsum: h in the compute dtype, the expanded delta accumulated and scaled in f32.
    h = grouped_matmul(flat[order], self.lora_a[...].astype(dtype), group_sizes, implementation=self.implementation)
    delta = grouped_matmul(h, self.lora_b[...].astype(dtype), group_sizes, implementation=self.implementation,
                           out_dtype=jnp.float32)
    scale = jnp.where(valid, self.scaling[...][jnp.clip(token_ids, 0, n - 1)], 0.0)
    scale = jnp.where(valid | (token_ids == -1), scale, jnp.nan)  # out-of-range traced ids: NaN, never a row
    unsorted = jnp.zeros_like(delta).at[order].set(delta)
    return unsorted * scale[:, None]

  def merged_weight_and_bias(self):
    raise ValueError(f"{self.path}: a MultiLoRAEinsum serves {self.num_adapters} adapters at once and has no single "
                     f"merged weight; merge each adapter's own model instead.")


# --- collecting the adapters --------------------------------------------------------------------------------

class StackedLoRA(NamedTuple):
  """One layer's N adapters: the base's geometry, A [N, in, r], B [N, r, out], scaling f32 [N]."""
  geometry: core.Geometry
  a: jax.Array
  b: jax.Array
  scaling: jax.Array


def _lora_layers(source, i: int) -> dict[str, nnx.Module]:
  """{path: LoRAEinsum} of a LoRA model; ValueError naming sources[i] for anything else."""
  if not isinstance(source, nnx.Module):
    raise ValueError(f"sources[{i}] must be a model with LoRA adapters or a save_adapters directory; got "
                     f"{type(source).__name__}.")
  layers = core.adapters(source)
  if not layers:
    raise ValueError(f"sources[{i}] ({type(source).__name__}) holds no LoRA adapters.")
  others = {p: type(w).__name__ for p, w in layers.items() if type(w) is not lora.LoRAEinsum}
  if others:
    raise ValueError(f"sources[{i}]: multi-adapter serving stacks plain LoRA (LoRAEinsum) only; {others} are not.")
  return layers


def _read(layers: dict[str, nnx.Module]) -> dict[str, tuple]:
  """{path: (base geometry, A [in, r], B [r, out], scaling)} of LoRA wrappers (the arrays copied out)."""
  return {p: (w.geometry, jnp.asarray(w.lora_a[...]), jnp.asarray(w.lora_b[...]), float(w.scaling))
          for p, w in layers.items()}


def _source_adapters(source, i: int, base_model) -> dict[str, tuple]:
  if isinstance(source, (str, os.PathLike)):
    if base_model is None:
      raise ValueError(f"sources[{i}] is a directory ({source!r}); give base_model to rebuild its adapters on.")
    with checkpoint.loaded_adapters(base_model, source) as layers:
      others = {p: type(w).__name__ for p, w in layers.items() if type(w) is not lora.LoRAEinsum}
      if others:
        raise ValueError(f"sources[{i}] ({source!r}): multi-adapter serving stacks plain LoRA only; {others} are not.")
      return _read(layers)
  return _read(_lora_layers(source, i))


def stack_lora(sources: Sequence, *, base_model: nnx.Module | None = None) -> dict[str, StackedLoRA]:
  """{path: StackedLoRA} of N LoRA adapters (adapter i is sources[i]), per adapted layer.

  sources: models carrying `LoRAEinsum` layers, or directories written by `save_adapters` (rebuilt on
  `base_model`, which is left unchanged). Every source must adapt the same paths, over bases of the same
  geometry, with the same rank per path; scalings may differ. ValueError naming the source otherwise.
  """
  sources = list(sources)
  if not sources:
    raise ValueError("sources must hold at least one LoRA model or adapter directory.")
  read = [_source_adapters(s, i, base_model) for i, s in enumerate(sources)]
  paths = list(read[0])
  for i, layers in enumerate(read[1:], 1):
    if set(layers) != set(paths):
      missing, extra = sorted(set(paths) - set(layers)), sorted(set(layers) - set(paths))
      raise ValueError(f"sources[{i}] adapts other paths than sources[0]: missing {missing}, extra {extra}.")
    for p in paths:
      geo0, a0, _, _ = read[0][p]
      geo, a, _, _ = layers[p]
      if a.shape != a0.shape:
        raise ValueError(f"sources[{i}]: {p} has rank {a.shape[-1]} (A {tuple(a.shape)}); sources[0] has rank "
                         f"{a0.shape[-1]} (A {tuple(a0.shape)}); stacked adapters need one rank per layer.")
      if geo != geo0:
        raise ValueError(f"sources[{i}]: the base layer at {p} differs from sources[0]'s ({geo} vs {geo0}).")
  stacked = {}
  for p in paths:
    per = [layers[p] for layers in read]
    stacked[p] = StackedLoRA(per[0][0], jnp.stack([r[1] for r in per]), jnp.stack([r[2] for r in per]),
                             jnp.asarray([r[3] for r in per], jnp.float32))
  return stacked


def add_multi_lora(base_model: nnx.Module, sources: Sequence, *,
                   implementation: str | None = None) -> dict[str, MultiLoRAEinsum]:
  """Wraps the base model's layers at the adapted paths in `MultiLoRAEinsum`s serving the N adapters of
  `sources` (see `stack_lora`; adapter id i is sources[i]); returns {path: layer}. The base model must hold the
  same base layers (geometry checked; the weights should be those the adapters were trained on) and no adapters
  there. `implementation` goes to grouped_matmul. Set the ids with `set_adapter_ids` before calling the model."""
  stacked = stack_lora(sources, base_model=base_model)
  layers = {}
  for path, (geo, a, b, scaling) in stacked.items():
    try:
      module = calibration.get_module(base_model, path)
    except (AttributeError, IndexError, KeyError, TypeError):
      raise ValueError(f"base_model has no layer at {path}, which the adapters adapt.") from None
    if isinstance(module, core.AdaptedLinear):
      raise ValueError(f"base_model already holds an adapter at {path} ({type(module).__name__}); pass the model "
                       f"without adapters.")
    try:
      base_geo = core.geometry(module)
    except TypeError as e:
      raise ValueError(f"base_model: {path} is not the linear layer the adapters adapt ({e}).") from None
    if base_geo != geo:
      raise ValueError(f"base_model: the layer at {path} differs from the adapters' base ({base_geo} vs {geo}).")
    layers[path] = MultiLoRAEinsum(module, a, b, scaling, path=path, implementation=implementation)
  for path, layer in layers.items():  # every check passed: only now is the model changed
    calibration.set_module(base_model, path, layer)
  return layers


def multi_lora_layers(model: nnx.Module) -> dict[str, MultiLoRAEinsum]:
  return calibration.einsum_modules(model, types=(MultiLoRAEinsum,))


def set_adapter_ids(model: nnx.Module, ids) -> None:
  """Sets the adapter id of every batch row ([B] ints in [-1, N); -1: the base alone) on every MultiLoRAEinsum.
  Concrete ids outside that range are a ValueError naming `ids`; traced ids (inside jit) are not checked."""
  layers = multi_lora_layers(model)
  if not layers:
    raise ValueError(f"model ({type(model).__name__}) holds no MultiLoRAEinsum; call add_multi_lora first.")
  ids = jnp.asarray(ids)
  if ids.ndim != 1 or ids.shape[0] == 0 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"ids must be a non-empty 1-D integer array (one adapter id per batch row); got "
                     f"{ids.dtype}{tuple(ids.shape)}.")
  n = min(layer.num_adapters for layer in layers.values())
  if not isinstance(ids, jax.core.Tracer):
    values = np.asarray(ids)
    bad = (values < -1) | (values >= n)
    if bad.any():
      raise ValueError(f"ids: {values[bad].tolist()} (at rows {np.flatnonzero(bad).tolist()}) are out of range; "
                       f"valid ids are [-1, {n}) (-1: no adapter, else an index into the {n} stacked adapters).")
  for layer in layers.values():
    layer.adapter_ids.set_value(ids.astype(jnp.int32))


__all__ = ["AdapterIds", "MultiLoRAEinsum", "StackedAdapter", "StackedLoRA", "add_multi_lora", "multi_lora_layers",
           "set_adapter_ids", "stack_lora"]
