"""ETHER: finetuning with hyperplane reflections (Bini et al. 2024, arXiv 2405.20271), after the authors' code
(github.com/mwbini/ether).

ETHER multiplies the frozen weight by a block-diagonal Householder reflection, H = diag(H_1..H_n),
H_k = I - 2 u_k u_kᵀ / ‖u_k‖², here on the output features: in the [in, out] matrix view W' = W H, so
y = H(x W) + b -- the weight is transformed, the bias is not (as the authors' code, which rebuilds the weight and
keeps `linear.bias`). H is orthogonal (‖Hz‖ = ‖z‖) and at distance ‖H - I‖ = 2 from the identity whatever u is.

ETHER+ (`plus=True`): the relaxed H⁺ = I - û ûᵀ + v̂ v̂ᵀ (û = u/‖u‖, v̂ = v/‖v‖, per block), applied on both
sides as the paper's two-sided ETHER+ (the authors' 'etherplusHH'): W' = H⁺_in W H⁺_out, y = H⁺_out((x H⁺_in) W) + b.
Both sides use `num_blocks` blocks, so num_blocks must divide in_features and out_features.

Init (the authors'): u ~ kaiming-uniform(a=√5) per block row, i.e. U(-1/√b, 1/√b) with b the block size, so
plain ETHER is NOT the identity at init (a reflection never is: ETHER starts from a reflected base, at the
fixed distance from it that the paper credits for its robustness to the learning rate). ETHER+ sets v = -u at
init, so v̂v̂ᵀ = ûûᵀ and H⁺ = I: the ETHER+ output equals the base output exactly (see `reflection_delta`).

The reflections are applied matrix-free, z - 2 û (ûᵀ z) per block, in f32; `merged_weight_and_bias` reflects
the weight's rows and columns the same way.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient import calibration, nn
from efficient.peft import core

_NAMES = ("adapter_blocks", "adapter_block_features")  # replicated: a block is not a mesh shard of the features


@core.register_config
@dataclasses.dataclass(frozen=True)
class ETHERConfig(core.AdapterConfig):
  """num_blocks: diagonal blocks of H (must divide out_features, and in_features with plus); plus: ETHER+."""
  num_blocks: int = 1
  plus: bool = False

  def __post_init__(self):
    nb = self.num_blocks
    if isinstance(nb, bool) or not isinstance(nb, int) or nb < 1:
      raise ValueError(f"ETHERConfig: num_blocks={nb!r} must be an int >= 1.")
    if not isinstance(self.plus, bool):
      raise ValueError(f"ETHERConfig: plus={self.plus!r} must be a bool.")

  def wrap(self, module: nnx.Module, rngs: nnx.Rngs, path: str) -> "ETHEREinsum":
    return ETHEREinsum(module, self, rngs=rngs, path=path)


def _kaiming_uniform(rng, shape):
  """torch's kaiming_uniform_(a=√5) on a [blocks, block] tensor: U(-1/√block, 1/√block)."""
  bound = 1.0 / math.sqrt(shape[-1])
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def _unit(u):
  u = u.astype(jnp.float32)
  return u / jnp.sqrt(jnp.sum(u * u, axis=-1, keepdims=True))


def _project(z, a, b):
  """a (bᵀ z) per block for z [..., blocks * block] and a, b [blocks, block]."""
  blocks = z.reshape(*z.shape[:-1], *b.shape)
  return (jnp.sum(blocks * b, axis=-1, keepdims=True) * a).reshape(z.shape)


def reflection_delta(z, u, v=None):
  """H z - z along z's last axis: -2 û(ûᵀz) (ETHER), or v̂(v̂ᵀz) - û(ûᵀz) (ETHER+, v given).

  ETHER+ blocks with v = ±u (the init) have H⁺ = I exactly, but a compiled v̂(v̂ᵀz) - û(ûᵀz) (contracted into
  FMAs, or two norms reduced in different orders) can leave a rounding residue there: its value is removed
  (exactly: a - a = 0) while the gradient stays the formula's, so ETHER+ at init is the base bit for bit."""
  if v is None:
    unit = _unit(u)
    return -2.0 * _project(z, unit, unit)
  v_unit, u_unit = _unit(v), _unit(u)
  delta = _project(z, v_unit, v_unit) - _project(z, u_unit, u_unit)
  identity = jnp.all(v == -u, axis=-1) | jnp.all(v == u, axis=-1)  # [blocks]
  blocks = delta.reshape(*z.shape[:-1], *u.shape)
  residue = jnp.where(identity[:, None], blocks, 0.0).reshape(z.shape)
  return delta - jax.lax.stop_gradient(residue)


class ETHEREinsum(core.AdaptedLinear):
  """W' = W H (ETHER) or H⁺_in W H⁺_out (ETHER+), bias unchanged. Adapter params [num_blocks, block]: `u`
  (output side), and with plus `v` (output side), `u_in`, `v_in` (input side)."""

  def __init__(self, base: nnx.Module, config: ETHERConfig, *, rngs: nnx.Rngs, path: str = ""):
    super().__init__(base, path=path)
    g, nb = self.geometry, config.num_blocks
    sides = {"out_features": g.out_features} | ({"in_features": g.in_features} if config.plus else {})
    for what, size in sides.items():
      if size % nb:
        raise ValueError(f"{path}: num_blocks={nb} must divide the layer's {what}={size} "
                         f"(ETHERConfig(num_blocks=...){', plus=True reflects both sides' if config.plus else ''}).")
    self.num_blocks = nb
    self.plus = config.plus
    self.config = config  # what an adapter checkpoint records (efficient.peft.checkpoint)
    u = _kaiming_uniform(rngs.params(), (nb, g.out_features // nb))
    self.u = nn.adapter_param(u, _NAMES)
    if config.plus:
      self.v = nn.adapter_param(-u, _NAMES)  # v = -u: H⁺ = I at init (the authors' init)
      u_in = _kaiming_uniform(rngs.params(), (nb, g.in_features // nb))
      self.u_in = nn.adapter_param(u_in, _NAMES)
      self.v_in = nn.adapter_param(-u_in, _NAMES)

  def output_delta(self, z):
    """H z - z for z [..., out_features] (f32)."""
    return reflection_delta(z, self.u[...], self.v[...] if self.plus else None)

  def input_delta(self, z):
    """H⁺_in z - z for z [..., in_features] (f32; ETHER+ only)."""
    return reflection_delta(z, self.u_in[...], self.v_in[...])

  def __call__(self, x):
    equation = self.geometry.equation
    if self.plus:  # x H⁺_in (H symmetric), back in x's layout and dtype so the base computes as it would on x
      rows, _ = calibration.inputs_as_rows(equation, x)
      rows32 = rows.astype(jnp.float32)
      x = calibration.inputs_from_rows(equation, (rows32 + self.input_delta(rows32)).astype(x.dtype), x.shape)
    y = self.base(x)
    rows = self.output_rows(y, x).astype(jnp.float32)
    z = rows - self.base_bias() if self.has_bias() else rows  # x W without the bias, which H leaves alone
    return self.output_layout((rows + self.output_delta(z)).astype(y.dtype), x)

  def merged_weight_and_bias(self):
    w = self.base_weight(jnp.float32)
    if self.plus:
      w = (w.T + self.input_delta(w.T)).T  # H⁺_in W: reflect every column
    return w + self.output_delta(w), self.base_bias()
