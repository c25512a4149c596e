"""RoAd: 2-D rotary adaptation (Liu et al. 2024, arXiv 2409.00119), as peft's `tuners/road` implements it.

The layer's output features are split into groups of `group_size`; inside each group element i is paired with
element i + group_size/2, and each pair (z_i, z_j) is mapped by a scaled 2-D rotation

    y_i = a_i z_i - b_i z_j,        y_j = b_j z_i + a_j z_j,        a = alpha cos(theta), b = alpha sin(theta).

The variants differ only in how many (alpha, theta) values there are (peft's counts, per vector):
  road_1  out_features / 2   one (alpha, theta) per pair (a_i = a_j, b_i = b_j: a true scaled rotation);
  road_2  out_features       one per output element;
  road_4  2 * out_features   separate (alpha, theta) for the a's and the b's (per group: [2, group_size]).
The vectors are stored flat in peft's order (group-major), so the parameter counts and layouts match peft's.

The rotation R acts on the base layer's whole output, bias included -- peft's forward rotates
`base_layer(x)` and its merge writes R W and R b -- so y = R (x W + b). In the [in, out] matrix view the merged
layer is W' = W Rᵀ, b' = R b (`merged_weight_and_bias`). Init alpha = 1, theta = 0 (peft's default): a = 1, b = 0,
so the output equals the base output exactly. The rotation is applied elementwise (no [out, out] matrix), in f32.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from efficient import nn
from efficient.peft import core

VARIANTS = ("road_1", "road_2", "road_4")


@core.register_config
@dataclasses.dataclass(frozen=True)
class RoAdConfig(core.AdapterConfig):
  """variant: 'road_1' | 'road_2' | 'road_4' (see the module docstring); group_size: even, divides out_features."""
  variant: str = "road_1"
  group_size: int = 64

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"RoAdConfig: variant={self.variant!r} must be one of {VARIANTS}.")
    gs = self.group_size
    if isinstance(gs, bool) or not isinstance(gs, int) or gs < 2 or gs % 2:
      raise ValueError(f"RoAdConfig: group_size={gs!r} must be an even int >= 2 (element i pairs with "
                       f"i + group_size/2 inside each group).")

  def wrap(self, module: nnx.Module, rngs: nnx.Rngs, path: str) -> "RoAdEinsum":
    del rngs  # deterministic init
    return RoAdEinsum(module, self, path=path)


def num_parameters(variant: str, out_features: int) -> int:
  """Length of each of the theta and alpha vectors (peft's counts)."""
  return {"road_1": out_features // 2, "road_2": out_features, "road_4": 2 * out_features}[variant]


class RoAdEinsum(core.AdaptedLinear):
  """y = R(base(x)): scaled 2-D rotations of output-feature pairs (bias included, as peft). Adapter params
  `theta` and `alpha`, flat vectors named by the output features' logical axis (group-major, as the features)."""

  def __init__(self, base: nnx.Module, config: RoAdConfig, *, path: str = ""):
    super().__init__(base, path=path)
    out = self.geometry.out_features
    if out % config.group_size:
      raise ValueError(f"{path}: group_size={config.group_size} must divide the layer's out_features={out} "
                       f"(RoAdConfig(group_size=...)).")
    self.config = config  # what an adapter checkpoint records (efficient.peft.checkpoint)
    self.variant = config.variant
    self.group_size = config.group_size
    size = num_parameters(config.variant, out)
    names = (self.geometry.out_name,)
    self.theta = nn.adapter_param(jnp.zeros((size,), jnp.float32), names)
    self.alpha = nn.adapter_param(jnp.ones((size,), jnp.float32), names)

  def coefficients(self):
    """(a, b), each [out_features] f32: y = a * z + b * rotate_half(z) (peft's first and second columns)."""
    out, gs = self.geometry.out_features, self.group_size
    groups, half = out // gs, gs // 2
    theta, alpha = self.theta[...].astype(jnp.float32), self.alpha[...].astype(jnp.float32)
    if self.variant == "road_1":  # one value per pair, shared by both halves of the group
      theta = jnp.broadcast_to(theta.reshape(groups, 1, half), (groups, 2, half)).reshape(out)
      alpha = jnp.broadcast_to(alpha.reshape(groups, 1, half), (groups, 2, half)).reshape(out)
      return alpha * jnp.cos(theta), alpha * jnp.sin(theta)
    if self.variant == "road_2":
      return alpha * jnp.cos(theta), alpha * jnp.sin(theta)
    theta, alpha = theta.reshape(groups, 2, gs), alpha.reshape(groups, 2, gs)  # road_4
    return (alpha[:, 0] * jnp.cos(theta[:, 0])).reshape(out), (alpha[:, 1] * jnp.sin(theta[:, 1])).reshape(out)

  def rotate(self, z):
    """R applied to z [..., out_features] (f32): pairs (i, i + group_size/2) inside each group."""
    a, b = self.coefficients()
    half = self.group_size // 2
    grouped = z.reshape(*z.shape[:-1], -1, 2, half)
    rotated_half = jnp.stack([-grouped[..., 1, :], grouped[..., 0, :]], axis=-2).reshape(z.shape)
    return z * a + rotated_half * b

  def __call__(self, x):
    y = self.base(x)
    rows = self.output_rows(y, x)
    return self.output_layout(self.rotate(rows.astype(jnp.float32)).astype(y.dtype), x)

  def merged_weight_and_bias(self):
    """W' = W Rᵀ (every row of the [in, out] weight rotated) and b' = R b."""
    return self.rotate(self.base_weight(jnp.float32)), self.rotate(self.base_bias())
