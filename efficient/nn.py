"""The layer floor: the modules every model composes and every transform (quant, sparse, peft, calibration)
finds by type and path. Nothing here knows a model config: dims, dtypes and initializers are explicit.

- `logical_param(value, names)`: an `nnx.Param` tagged with logical axis names (`efficient.sharding`).
- `Einsum(equation, shape, names, ...)`: `einsum(equation, x, kernel) [+ bias]`, the projection of our models.
- `RMSNorm`, `LayerNorm`, `Embed` (`embed.lookup(ids, name=...)`).
- `check_ids(ids, num, name=...)` / `take_rows(table, ids, name=...)`: the one guard of every embedding lookup.
  Concrete ids outside [0, num) are a ValueError naming the argument, the bad value and the range; traced ids
  (under `jit`) that are out of range get a NaN row -- never another row, as `jnp.take` would give for -1.
- `Adapter`: the variable type of every PEFT adapter parameter (`efficient.peft`), an `nnx.Param` subclass, so a
  trainer can train adapters alone (`nnx.split(model, Adapter, ...)`; `TrainConfig.trainable='adapters'`).
- `LinearView` / `linear_view(module)`: one description (equation, kernel, bias, logical axes) of any linear
  contraction -- this project's `Einsum` and flax's own `nnx.Linear` / `nnx.Einsum` -- so transforms work on a
  user's NNX model unchanged. `is_linear(module)` tells whether a module is one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.rms_norm import rms_norm as rms_norm_op

DEFAULT_INIT_STD = 0.02


def logical_param(value, names) -> nnx.Param:
  """A parameter tagged with logical axis names; `efficient.sharding.shard_model` maps them to a mesh later
  (built on one device first, so head counts that a mesh axis does not divide stay representable)."""
  names = tuple(names)
  if len(names) != jnp.ndim(value):
    raise ValueError(f"logical_param: names {names} do not match the value's {jnp.ndim(value)} dims "
                     f"{jnp.shape(value)}.")
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class Adapter(nnx.Param):
  """A parameter of a PEFT adapter (LoRA A/B, DoRA magnitude, RoAd angles, ...): an `nnx.Param`, so optimizers
  and checkpoints see it as one, and a type of its own, so a filter selects adapters without the frozen base."""


def adapter_param(value, names) -> Adapter:
  """An `Adapter` tagged with logical axis names (as `logical_param`)."""
  names = tuple(names)
  if len(names) != jnp.ndim(value):
    raise ValueError(f"adapter_param: names {names} do not match the value's {jnp.ndim(value)} dims "
                     f"{jnp.shape(value)}.")
  return Adapter(value, out_sharding=names, eager_sharding=False)


def normal_init(std: float = DEFAULT_INIT_STD) -> Callable:
  return nnx.initializers.normal(std)


def _output_axes(equation: str) -> tuple[list[int], str]:
  """Positions of the kernel axes that appear in the output (what a bias spans), and the output letters."""
  inputs, output = equation.replace(" ", "").split("->")
  _, kernel_letters = inputs.split(",")
  return [i for i, letter in enumerate(kernel_letters) if letter in output], output


class Einsum(nnx.Module):
  """`einsum(equation, x, kernel) [+ bias]`, the kernel cast to `compute_dtype` (jnp's type promotion with x).

  shape / names   the kernel's shape and logical axis names; with `use_bias` the bias spans the kernel axes that
                  reach the output (names taken from the kernel's), added along the output's trailing axes.
  """

  def __init__(self, equation: str, shape: tuple[int, ...], names: tuple[str, ...], *, rngs: nnx.Rngs,
               use_bias: bool = False, param_dtype: Any = jnp.float32, compute_dtype: Any = jnp.float32,
               kernel_init: Callable | None = None):
    equation = equation.replace(" ", "")
    if equation.count(",") != 1 or "->" not in equation:
      raise ValueError(f"Einsum: equation {equation!r} must read 'x_letters,kernel_letters->out_letters'.")
    kernel_letters = equation.split("->")[0].split(",")[1]
    if len(kernel_letters) != len(shape) or len(names) != len(shape):
      raise ValueError(f"Einsum: equation {equation!r} names {len(kernel_letters)} kernel axes but shape={shape} "
                       f"and names={names}.")
    self.equation = equation
    self.compute_dtype = compute_dtype
    init = kernel_init or normal_init()
    self.kernel = logical_param(init(rngs.params(), tuple(shape), param_dtype), names)
    bias = None
    if use_bias:
      axes, output = _output_axes(equation)
      out_kernel_letters = [kernel_letters[i] for i in axes]
      if "".join(out_kernel_letters) != output[len(output) - len(axes):]:
        raise ValueError(f"Einsum: use_bias needs the kernel's output axes last in the output ({equation!r}).")
      bias = logical_param(jnp.zeros(tuple(shape[i] for i in axes), param_dtype), tuple(names[i] for i in axes))
    self.bias = bias  # assigned once: nnx makes an attribute first set to None static

  def __call__(self, x):
    y = jnp.einsum(self.equation, x, self.kernel[...].astype(self.compute_dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * scale over the last axis, through `pallas_kernels.rms_norm`
  (`implementation=None`: the policy's choice, see `pallas_kernels.implementation`)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: Any = jnp.float32,
               implementation: str | None = None, names: tuple[str, ...] = ("embed",)):
    self.eps = eps
    self.implementation = implementation
    self.scale = logical_param(jnp.ones((dim,), param_dtype), names)

  def __call__(self, x):
    return rms_norm_op(x, self.scale[...].astype(x.dtype), eps=self.eps, implementation=self.implementation)


class LayerNorm(nnx.Module):
  """(x - mean) * rsqrt(var + eps) * scale + bias over the last axis (BERT's), f32 statistics."""

  def __init__(self, dim: int, *, eps: float = 1e-12, param_dtype: Any = jnp.float32,
               names: tuple[str, ...] = ("embed",)):
    self.eps = eps
    self.scale = logical_param(jnp.ones((dim,), param_dtype), names)
    self.bias = logical_param(jnp.zeros((dim,), param_dtype), names)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def check_ids(ids, num: int, *, name: str = "ids", bound: str | None = None) -> None:
  """ValueError when concrete integer `ids` hold a value outside [0, num), naming `name`, the first bad value and
  where it is, and the valid range (`bound` names `num`, e.g. 'vocab_size'). Traced ids (under `jit`, `vmap`,
  `grad`) and arrays not fully addressable from this process are not checked here: `take_rows` makes their
  out-of-range rows NaN instead."""
  if isinstance(ids, jax.core.Tracer) or not getattr(ids, "is_fully_addressable", True):
    return
  values = np.asarray(ids)
  if not np.issubdtype(values.dtype, np.integer):
    raise ValueError(f"{name} must be integer ids, got dtype {values.dtype}.")
  bad = (values < 0) | (values >= num)
  if not bad.any():
    return
  where = tuple(int(i) for i in np.argwhere(bad)[0])
  limit = f"{bound}={num}" if bound else f"{num}"
  raise ValueError(f"{name}: value {int(values[where])} at index {where} is out of range; valid values are "
                   f"[0, {limit}) ({int(bad.sum())} of {values.size} out of range, min {int(values.min())}, "
                   f"max {int(values.max())}).")


def take_rows(table, ids, *, name: str = "ids", bound: str | None = None):
  """`table[ids]` along axis 0 for a float `table` [num, ...], never letting an out-of-range id pass as another
  row: concrete ids are checked by `check_ids` (ValueError); traced ids outside [0, num) -- negative ones
  included, which `jnp.take` would wrap to the last rows -- read a row of NaN, deterministically."""
  num = table.shape[0]
  check_ids(ids, num, name=name, bound=bound)
  if not jnp.issubdtype(table.dtype, jnp.inexact):
    raise TypeError(f"take_rows: the table must be floating point to mark out-of-range {name} with NaN, got "
                    f"{table.dtype}.")
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{name} must be integer ids, got dtype {ids.dtype}.")
  valid = (ids >= 0) & (ids < num)
  # Every invalid id becomes `num`, out of bounds on the high side, where mode="fill" catches it.
  ids = jnp.where(valid, jnp.where(valid, ids, 0).astype(jnp.int32), num)
  return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)


class Embed(nnx.Module):
  """A table [num, dim]: `embed(ids)` looks rows up; `embed.attend(x)` is the tied output head x @ table.T.

  Lookups go through `take_rows`: concrete ids outside [0, num) raise a ValueError naming the argument
  (`embed.lookup(ids, name='token_type_ids')`); under `jit` an out-of-range id reads a row of NaN.
  """

  def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32,
               compute_dtype: Any = jnp.float32, names: tuple[str, ...] = ("vocab", "embed"),
               init: Callable | None = None):
    self.compute_dtype = compute_dtype
    self.embedding = logical_param((init or normal_init())(rngs.params(), (num, dim), param_dtype), names)

  def __call__(self, ids):
    return self.lookup(ids)

  def lookup(self, ids, *, name: str = "ids", bound: str | None = None):
    """The rows of `ids`, in `compute_dtype`; `name` / `bound` label the argument and the table size in the
    error of an out-of-range id (see `take_rows`)."""
    return take_rows(self.embedding[...], ids, name=name, bound=bound).astype(self.compute_dtype)

  def attend(self, x):
    return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(self.compute_dtype),
                      preferred_element_type=jnp.float32)


# --- one view of every linear contraction -------------------------------------------------------------------

LINEAR_TYPES = (Einsum, nnx.Linear, nnx.Einsum)


@dataclasses.dataclass(frozen=True)
class LinearView:
  """What a transform needs of a linear layer, whatever its class.

  equation       'x,kernel->out' einsum (nnx.Linear: '...i,io->...o')
  kernel / bias  the module's parameter arrays (bias None when absent); kernel axis 0 is always contracted for
                 nnx.Linear, and is whatever `contraction_axes` says for an einsum
  kernel_names   logical axis names of the kernel (from its sharding metadata; None per unnamed axis)
  bias_names     the same for the bias
  compute_dtype  the dtype the layer computes in (None: the input's)
  """
  equation: str
  kernel: jax.Array
  bias: jax.Array | None
  kernel_names: tuple
  bias_names: tuple | None
  compute_dtype: Any

  @property
  def contraction_axes(self) -> tuple[int, ...]:
    """Kernel axes summed over (their letters are absent from the output)."""
    inputs, output = self.equation.split("->")
    kernel_letters = inputs.split(",")[1]
    return tuple(i for i, letter in enumerate(kernel_letters) if letter not in output)


def is_linear(module) -> bool:
  return isinstance(module, LINEAR_TYPES)


def _names(variable) -> tuple:
  """Logical axis names from a variable's `out_sharding` metadata, None per axis where it has none."""
  names = variable.get_metadata().get("out_sharding") if isinstance(variable, nnx.Variable) else None
  return tuple(names) if names else (None,) * jnp.ndim(variable[...])


def linear_view(module) -> LinearView:
  """The `LinearView` of an `Einsum`, `nnx.Linear` or `nnx.Einsum` -- or of a transform's replacement that keeps
  a float kernel (`equation`, `kernel`, optional `bias` and `compute_dtype` attributes, e.g. a fake-quantized or
  masked layer); TypeError for anything else."""
  if isinstance(module, nnx.Linear):
    equation, dtype = "...i,io->...o", module.dtype
  elif isinstance(module, nnx.Einsum):
    if module.einsum_str is None:
      raise TypeError("linear_view: an nnx.Einsum without a constructor einsum_str cannot be described by path "
                      "rules (its equation is given per call).")
    equation, dtype = module.einsum_str.replace(" ", ""), module.dtype
  elif isinstance(module, Einsum) or (hasattr(module, "equation")
                                      and isinstance(getattr(module, "kernel", None), nnx.Variable)):
    equation, dtype = module.equation, getattr(module, "compute_dtype", None)
  else:
    raise TypeError(f"linear_view: {type(module).__name__} is not a linear layer "
                    f"({[t.__name__ for t in LINEAR_TYPES]}) nor a replacement with an equation and a kernel.")
  bias = getattr(module, "bias", None)
  return LinearView(equation=equation, kernel=module.kernel[...], bias=None if bias is None else bias[...],
                    kernel_names=_names(module.kernel), bias_names=None if bias is None else _names(bias),
                    compute_dtype=dtype)
