"""μP (Maximal Update Parametrization) for Adam-type optimizers, on any NNX model by parameter-path rules.

What is implemented: Tensor Programs V (Yang et al. 2022, "μTransfer"), Table 8 -- the μP formulation "easier to
implement and compatible with input/output weight sharing" (the one the `mup` package's MuReadout /
MuSharedReadout follow) -- Adam-LR row, written relative to a base model (width_mult = fan_in / base fan_in,
so at the base shapes μP *is* the standard parametrization):

  kind        what it is                                 init std            Adam LR            forward
  embedding   input weights (finite fan_in -> width)     std                 x 1                -
  hidden      width -> width matrices (q k v o, MLP)     std / sqrt(m)       x 1 / m            -
  output      readout weights (width -> finite)          std (or 0)          x 1                logits x 1/m
  vector      norm scales, biases                        as built            x 1                -
  (m = fan_in / base fan_in of that parameter; the readout multiplier and TP5's 1/d attention are forward
  multipliers of the model, which a model exposes as config knobs: `efficient.models.parametrization`)

Table 8's init variance 1/fan_in of hidden weights is taken relative to the base, std**2 * base_fan_in / fan_in,
so `std` is the base model's init std; its output-weight variance "1" means a width-independent std. A tied
embedding (input and readout at once) is kind 'embedding' plus the model's logit multiplier -- exactly Table 8's
point (TP5's Table 3 is the same μP without multipliers -- readout init variance 1/fan_in**2 and Adam LR
1/fan_in -- which cannot share the embedding). SGD would need Table 8's other LR row and is not implemented; Adam's eps is left unscaled (negligible
unless gradients reach eps).

Pieces:
- `plan(model, base, rules)`: {param path: `MuParam`} -- each parameter's kind from path rules
  (`efficient.calibration`'s rules: (regex, kind) pairs, re.fullmatch, first match wins, a rule matching no
  parameter is an error; here every parameter must be covered, and a None kind leaves it standard) and, for
  hidden weights, its fan_in (the contracted size of the linear layer owning the kernel) in `model` and `base`.
- `initialize(model, plan, std=, seed=)`: redraws every embedding / hidden / output parameter from N(0, std_kind**2)
  in place (vectors keep their built values).
- `scale_learning_rates(plan)`: an optax transformation multiplying each parameter's update by its Adam-LR
  multiplier; put it after the Adam transformation (Adam normalizes gradient scale away, so scaling before it would
  do nothing), e.g. `optax.chain(optax.adamw(lr), scale_learning_rates(p))` or after `efficient.train.make_optimizer`.
  AdamW's decoupled decay is then scaled too, as in the `mup` package's MuAdamW (which scales each group's lr).
  Stateless: the optimizer state keeps its logical axis names (`optim.named`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient import calibration

KINDS = ("embedding", "hidden", "output", "vector")


@dataclasses.dataclass(frozen=True)
class MuParam:
  """The μP facts of one parameter: its kind and (hidden weights) fan_in and the base model's fan_in."""
  kind: str | None          # one of KINDS, or None: the standard parametrization (multipliers 1, init as built)
  fan_in: int = 1
  base_fan_in: int = 1

  @property
  def width_mult(self) -> float:
    return self.fan_in / self.base_fan_in

  @property
  def lr_multiplier(self) -> float:
    """Table 8's Adam LR relative to the base: 1/width_mult for hidden weights, 1 otherwise."""
    return 1.0 / self.width_mult if self.kind == "hidden" else 1.0

  def init_std(self, std: float, *, zero_readout: bool = False) -> float | None:
    """The initial std relative to the base std `std` (None: keep the built value)."""
    if self.kind in (None, "vector"):
      return None
    if self.kind == "hidden":
      return std / math.sqrt(self.width_mult)
    return 0.0 if self.kind == "output" and zero_readout else std


def _fan_ins(model: nnx.Module) -> dict[str, int]:
  """{kernel path: in_features} of every linear layer (the size its einsum contracts: μP's fan_in)."""
  found = {}
  for path, module in calibration.einsum_modules(model).items():
    spec = calibration.parse_equation(calibration.equation_of(module))
    sizes = dict(zip(spec["rhs"], module.kernel.get_value().shape))  # get_value: abstract (eval_shape) models too
    found[f"{path}/kernel"] = math.prod(sizes[a] for a in spec["contract"])
  return found


def plan(model: nnx.Module, base: nnx.Module, rules) -> dict[str, MuParam]:
  """{param path: MuParam} of `model` relative to `base` (the same architecture at the base width; an
  `nnx.eval_shape`-built abstract model is enough). rules: (param path regex, kind | None) pairs, e.g.
  `efficient.models.parametrization.mup_rules(config)`; every parameter must match one (ValueError listing those
  that do not), a hidden one must be a linear layer's kernel, and `base` must have the same parameter paths."""
  params, base_params = calibration.param_paths(model), calibration.param_paths(base)
  if set(params) != set(base_params):
    differ = sorted(set(params) ^ set(base_params))
    raise ValueError(f"base: its parameter paths differ from the model's (e.g. {differ[:3]}); μP needs the same "
                     f"architecture at another width.")
  compiled = calibration.compile_rules(rules, config_type=str)
  for pattern, _, kind in compiled:
    if kind is not None and kind not in KINDS:
      raise ValueError(f"rules: kind {kind!r} (for {pattern!r}) must be one of {KINDS} or None.")
  matched = calibration.match_paths(compiled, params, kind="parameter")
  missing = [p for p in params if p not in matched]
  if missing:
    raise ValueError(f"rules: no rule matches parameters {missing[:5]}; give every parameter a kind (or None to "
                     f"keep it standard), e.g. a final ('.*', None).")
  fan_ins, base_fan_ins = _fan_ins(model), _fan_ins(base)
  out = {}
  for path, (_, kind) in matched.items():
    if kind != "hidden":
      out[path] = MuParam(kind)
      continue
    if path not in fan_ins:
      raise ValueError(f"rules: {path!r} is kind 'hidden' but not the kernel of a linear layer (efficient.nn."
                       f"Einsum, nnx.Linear, nnx.Einsum): its fan_in is unknown.")
    out[path] = MuParam(kind, fan_ins[path], base_fan_ins[path])
  return out


def initialize(model: nnx.Module, mu_plan: Mapping[str, MuParam], *, std: float, seed: int = 0,
               zero_readout: bool = False) -> nnx.Module:
  """Redraws (in place) every parameter with a `MuParam.init_std` from N(0, init_std**2); returns `model`.
  Draws come from NumPy (`default_rng((seed, i))`, i the parameter's index in sorted path order): host-side,
  so a new width compiles nothing (jax.random compiles a kernel per parameter shape). A sharded parameter keeps
  its sharding."""
  if not (isinstance(std, (int, float)) and 0 < std < float("inf")):
    raise ValueError(f"std must be a positive finite number, got {std!r}.")
  variables = calibration.param_paths(model)
  unknown = sorted(set(mu_plan) - set(variables))
  if unknown:
    raise ValueError(f"mu_plan names parameters the model does not have: {unknown[:3]}.")
  for index, path in enumerate(sorted(mu_plan)):
    target = mu_plan[path].init_std(std, zero_readout=zero_readout)
    if target is None:
      continue
    variable = variables[path]
    old = variable.get_value()
    draw = np.random.default_rng((seed, index)).standard_normal(old.shape, dtype=np.float32)
    value = jnp.asarray(target * draw, old.dtype)
    variable.set_value(jax.device_put(value, old.sharding))
  return model


def learning_rate_multipliers(mu_plan: Mapping[str, MuParam]) -> dict[str, float]:
  return {path: p.lr_multiplier for path, p in mu_plan.items()}


def scale_learning_rates(multipliers: Mapping[str, MuParam | float]) -> optax.GradientTransformation:
  """updates[path] * multiplier[path] (a `MuParam`'s `lr_multiplier`, or a number), by param path
  ('blocks/0/mlp/gate/kernel'); works on plain arrays and on `nnx.Variable`-wrapped trees alike. An update
  whose path has no multiplier is a ValueError at the first update (a silently unscaled matrix breaks μP)."""
  factors = {p: (m.lr_multiplier if isinstance(m, MuParam) else float(m)) for p, m in multipliers.items()}
  bad = {p: f for p, f in factors.items() if not (0 < f < float("inf"))}
  if bad:
    raise ValueError(f"multipliers must be positive finite numbers; got {dict(list(bad.items())[:3])}.")

  def update(updates, state, params=None):
    del params

    def one(key_path, u):
      path = calibration.tree_path_str(key_path)
      if path not in factors:
        raise ValueError(f"scale_learning_rates: no multiplier for parameter {path!r} (known: "
                         f"{sorted(factors)[:3]}...); build the multipliers from the trained model's plan.")
      return u if factors[path] == 1.0 else u * jnp.asarray(factors[path], u.dtype)

    return jax.tree_util.tree_map_with_path(one, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


__all__ = ["KINDS", "MuParam", "initialize", "learning_rate_multipliers", "plan", "scale_learning_rates"]
