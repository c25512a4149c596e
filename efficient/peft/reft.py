"""LoReFT: low-rank linear subspace representation finetuning (Wu et al. 2024, "ReFT", arXiv 2404.03592), after
the authors' pyreft `LoreftIntervention`.

An intervention edits a hidden state h [..., T, d] -- the output of any submodule, found by path rules -- at
chosen token positions:

    Φ(h) = h + Rᵀ (W h + b - R h),      R [r, d] with orthonormal rows, W [r, d], b [r].

R is parametrized: a free matrix `rotation` [r, d] is orthonormalized by a QR decomposition of its transpose
(signs fixed so R's diagonal factor is positive; R = the free matrix when its rows are already orthonormal), so
R Rᵀ = I holds after every gradient step and gradients flow through the QR.

Init (pyreft's): the free matrix is random orthogonal (torch's orthogonal_), W and b are torch.nn.Linear(d, r)'s
default, U(-1/√d, 1/√d): the intervention is NOT the identity at init. `identity_init=True` is pyreft's
`LoreftIntervention_IdentityInit` (W = R, b = 0: Φ(h) = h exactly at init).

Positions (along the hidden state's axis -2, T the length of each call's input):
  "all"                      every position;
  ("first", n) / ("last", n) the first / last n positions (clamped to T);
  ("first_last", f, l)       the paper's f + l scheme: the first f and the last l positions (a position in both
                             is intervened once).
Positions not chosen are returned bit-for-bit unchanged. The hidden size d is `ReFTConfig.dim`, or inferred at
wrap time: a linear layer's out_features, else the model's `config.embed_dim` (a Llama block, attention or MLP
output); a hidden state whose last axis is not d is a ValueError at call time.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efficient import calibration, nn
from efficient.peft import core

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_count(value, what: str, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"ReFTConfig: positions={what}: counts must be ints >= {minimum}, got {value!r}.")


def _normalize_positions(positions):
  """'all' | ('first', n) | ('last', n) | ('first_last', f, l) as a tuple; ValueError naming `positions`."""
  if positions == "all":
    return "all"
  spec = tuple(positions) if isinstance(positions, (tuple, list)) else None
  kinds = {"first": 2, "last": 2, "first_last": 3}
  if not spec or not isinstance(spec[0], str) or spec[0] not in kinds or len(spec) != kinds[spec[0]]:
    raise ValueError(f"ReFTConfig: positions={positions!r} must be 'all', ('first', n), ('last', n) or "
                     f"('first_last', f, l).")
  for count in spec[1:]:
    _check_count(count, repr(positions), 0 if spec[0] == "first_last" else 1)
  if spec[0] == "first_last" and spec[1] + spec[2] < 1:
    raise ValueError(f"ReFTConfig: positions={positions!r} intervenes on no position (f + l must be >= 1).")
  return spec


@core.register_config
@dataclasses.dataclass(frozen=True)
class ReFTConfig(core.AdapterConfig):
  """rank r of the intervention (1 <= r <= d), positions (see the module docstring), dim d (None: inferred),
  identity_init (pyreft's identity-init variant)."""
  rank: int = 4
  positions: Any = "all"
  dim: int | None = None
  identity_init: bool = False

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"ReFTConfig: rank={self.rank!r} must be an int >= 1 (and <= the hidden size).")
    if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1):
      raise ValueError(f"ReFTConfig: dim={self.dim!r} must be an int >= 1 or None (inferred).")
    object.__setattr__(self, "positions", _normalize_positions(self.positions))

  def wrap(self, module: nnx.Module, rngs: nnx.Rngs, path: str, *, default_dim: int | None = None):
    return LoReFTIntervention(module, self, dim=_hidden_dim(module, self, path, default_dim), rngs=rngs, path=path)


def _hidden_dim(module, config: ReFTConfig, path: str, default_dim: int | None) -> int:
  if config.dim is not None:
    return config.dim
  if isinstance(module, core.ADAPTABLE_TYPES):
    geo = core.geometry(module)
    if len(calibration.parse_equation(geo.equation)["outputs"]) == 1:
      return geo.out_features
  if default_dim is not None:
    return default_dim
  raise ValueError(f"{path}: cannot infer the hidden size of {type(module).__name__}'s output; pass "
                   f"ReFTConfig(dim=...).")


def orthonormal_rows(free):
  """R [r, d] with orthonormal rows spanning the rows of `free` [r, d] (QR of freeᵀ, positive diagonal)."""
  q, upper = jnp.linalg.qr(free.astype(jnp.float32).T)
  signs = jnp.where(jnp.diagonal(upper) < 0, -1.0, 1.0)
  return (q * signs).T


def position_mask(spec, length: int):
  """[length] bool of the positions `spec` intervenes on (None for 'all')."""
  if spec == "all":
    return None
  index = jnp.arange(length)
  if spec[0] == "first":
    return index < spec[1]
  if spec[0] == "last":
    return index >= length - spec[1]
  return (index < spec[1]) | (index >= length - spec[2])


class LoReFTIntervention(nnx.Module):
  """Calls `self.inner` with every argument and applies Φ to its hidden state output (the array, or element 0
  of a tuple/list output) at the configured positions. Adapter params: `rotation` (free, R = its orthonormal
  rows) and `weight` ("reft_rank", "embed"), `bias` ("reft_rank",)."""

  def __init__(self, inner: nnx.Module, config: ReFTConfig, *, dim: int, rngs: nnx.Rngs, path: str = ""):
    if config.rank > dim:
      raise ValueError(f"{path}: rank={config.rank} must be <= the hidden size d={dim} (ReFTConfig(rank=...)).")
    self.inner = inner
    self.path = path
    self.dim = dim
    self.config = dataclasses.replace(config, dim=dim)  # with the resolved d: a checkpoint rebuilds it as is
    self.rank = config.rank
    self.positions = config.positions
    gaussian = jax.random.normal(rngs.params(), (dim, config.rank), jnp.float32)
    rotation = orthonormal_rows(gaussian.T)  # a random orthogonal [r, d], as torch.nn.init.orthogonal_
    self.rotation = nn.adapter_param(rotation, ("reft_rank", "embed"))
    if config.identity_init:  # W = R as the forward computes it (bit-equal), b = 0
      weight, bias = orthonormal_rows(rotation), jnp.zeros((config.rank,), jnp.float32)
    else:
      bound = 1.0 / math.sqrt(dim)
      weight = jax.random.uniform(rngs.params(), (config.rank, dim), jnp.float32, -bound, bound)
      bias = jax.random.uniform(rngs.params(), (config.rank,), jnp.float32, -bound, bound)
    self.weight = nn.adapter_param(weight, ("reft_rank", "embed"))
    self.bias = nn.adapter_param(bias, ("reft_rank",))

  def rotation_matrix(self):
    """R [r, d], orthonormal rows."""
    return orthonormal_rows(self.rotation[...])

  def intervene(self, h):
    """Φ(h) at the chosen positions of h [..., T, d]; the other positions unchanged."""
    if h.shape[-1] != self.dim:
      raise ValueError(f"{self.path}: the hidden state has last axis {h.shape[-1]}, the intervention d={self.dim} "
                       f"(ReFTConfig(dim=...)).")
    mask = None
    if self.positions != "all":
      if h.ndim < 2:
        raise ValueError(f"{self.path}: positions={self.positions!r} needs a hidden state [..., T, d]; got shape "
                         f"{h.shape}.")
      mask = position_mask(self.positions, h.shape[-2])[:, None]
    r = self.rotation_matrix()
    h32 = h.astype(jnp.float32)
    # W h + b - R h as (W - R) h + b: one projection, and exactly b when W = R (the identity init).
    edit = jnp.matmul(h32, (self.weight[...].astype(jnp.float32) - r).T, precision=_HIGHEST) + self.bias[...]
    out = (h32 + jnp.matmul(edit, r, precision=_HIGHEST)).astype(h.dtype)
    return out if mask is None else jnp.where(mask, out, h)

  def __call__(self, *args, **kwargs):
    out = self.inner(*args, **kwargs)
    if isinstance(out, (tuple, list)):
      return type(out)([self.intervene(out[0]), *out[1:]])
    return self.intervene(out)


def _model_dim(model) -> int | None:
  dim = getattr(getattr(model, "config", None), "embed_dim", None)
  return dim if isinstance(dim, int) else None


def add_interventions(model: nnx.Module, rules, *, rngs: nnx.Rngs | None = None,
                      seed: int = 0) -> dict[str, LoReFTIntervention]:
  """Wraps every submodule the rules give a `ReFTConfig` in a `LoReFTIntervention` (in place); returns
  {path: wrapper}. rules: (path regex, ReFTConfig | None) pairs or a {regex: config} mapping, matched in full
  against every submodule path ('blocks/1', 'blocks/0/mlp', ...; the first matching rule wins, None leaves
  the module alone); a rule matching no submodule is a ValueError. Nested matches are wrapped inside out."""
  rngs = rngs if rngs is not None else nnx.Rngs(seed)
  matched = calibration.match_rules(model, rules, config_type=ReFTConfig, types=(nnx.Module,), kind="submodule")
  matched.pop("", None)  # the root is not a submodule
  default_dim = _model_dim(model)
  wrapped = {}
  for path in sorted(matched, key=lambda p: (-p.count("/"), p)):  # deepest first: parents still hold children
    module, config = matched[path]
    wrapper = config.wrap(module, rngs, path, default_dim=default_dim)
    calibration.set_module(model, path, wrapper)
    wrapped[path] = wrapper
  return {p: wrapped[p] for p in sorted(wrapped, key=calibration.natural_key)}


def interventions(model: nnx.Module) -> dict[str, LoReFTIntervention]:
  """{path: intervention} of every LoReFT intervention in the model."""
  return calibration.einsum_modules(model, types=(LoReFTIntervention,))
