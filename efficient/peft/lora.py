"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023), DoRA (Liu et al. 2024) and QLoRA (Dettmers et al. 2023)
on any linear layer found by path rules (`efficient.peft.add_adapters`).

In the [in, out] matrix view (`efficient.peft.core`), with x the input rows:

  LoRA   y = base(x) + s * dropout(x) A B          A [in, r], B [r, out], s = alpha / r (rsLoRA: alpha / sqrt(r))
  DoRA   W' = W + s A B,  y = m / ||W'||_c * (x W') + b     m [out], ||.||_c the column norm over in_features

Initialization is peft's default (`init_lora_weights=True`): A ~ kaiming_uniform(a=sqrt(5)) -- torch's
`kaiming_uniform_` on lora_A.weight [r, in] has fan_in = in, gain sqrt(2 / (1 + a^2)) = sqrt(1/3) and bound
gain * sqrt(3 / fan_in), i.e. A ~ U(-1/sqrt(in), 1/sqrt(in)) -- and B = 0, so at init the adapted layer computes
the base exactly (y = base(x) + 0, bit for bit). `init='gaussian'` is peft's A ~ N(0, 1/r^2). DoRA's magnitude
starts at the column norms of W, and its forward is written as peft writes it,
y = base(x) + (m/||W'|| - 1)(base(x) - b) + (m/||W'||) s x A B, so at init it also reproduces the base (to
rounding of the recomputed norm). ||W'|| is detached (stop_gradient), as the DoRA paper (sec. 4.3) and peft do.

QLoRA: when the base is an `efficient.quant.QuantizedEinsum` (packed int4 / NF4, weight-only), base(x) runs
through `pallas_kernels.quant_matmul` -- its forward kernel and its custom_vjp for dx -- so the base weight
stays packed and gets no gradient; `qlora(model, rules)` quantizes and adds LoRA in one call.

Adapter parameters are `efficient.nn.Adapter` variables in f32 (A named (in_name, 'lora_rank'), B
('lora_rank', out_name), DoRA's m (out_name,)); the adapter product runs in the layer's compute dtype with f32
accumulation. Dropout (only when dropout > 0) is an `nnx.Dropout` with its own rng stream; `model.eval()` turns
it off (`model.train()` back on).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from efficient import nn
from efficient.peft import core
from efficient.quant import QuantConfig, quantize_model
from pallas_kernels.quant_matmul import FORMATS as KERNEL_FORMATS

INITS = ("kaiming", "gaussian")


@core.register_config
@dataclasses.dataclass(frozen=True)
class LoRAConfig(core.AdapterConfig):
  """LoRA on one linear layer.

  rank        r, an int in [1, min(in_features, out_features)] (checked per layer, naming its path)
  alpha       scaling numerator: s = alpha / rank, or alpha / sqrt(rank) with `use_rslora`
  dropout     dropout rate on the adapter's input, in [0, 1) (0: no dropout module at all)
  init        'kaiming' (peft's default: A ~ U(-1/sqrt(in), 1/sqrt(in))) or 'gaussian' (A ~ N(0, 1/rank^2))
  use_rslora  rank-stabilized scaling alpha / sqrt(rank)
  dora        weight-decomposed LoRA (DoRA): `DoRAEinsum` instead of `LoRAEinsum`
  """
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  init: str = "kaiming"
  use_rslora: bool = False
  dora: bool = False

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoRAConfig.rank={self.rank!r} must be a positive int.")
    if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
        math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f"LoRAConfig.alpha={self.alpha!r} must be a finite number > 0.")
    if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRAConfig.dropout={self.dropout!r} must be a number in [0, 1).")
    if self.init not in INITS:
      raise ValueError(f"LoRAConfig.init={self.init!r} must be one of {INITS}.")
    for name in ("use_rslora", "dora"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"LoRAConfig.{name}={getattr(self, name)!r} must be a bool.")

  @property
  def scaling(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  def wrap(self, module, rngs: nnx.Rngs, path: str) -> "LoRAEinsum":
    return (DoRAEinsum if self.dora else LoRAEinsum)(module, self, rngs=rngs, path=path)


def _init_a(config: LoRAConfig, key, in_features: int):
  shape = (in_features, config.rank)
  if config.init == "gaussian":
    return jax.random.normal(key, shape, jnp.float32) / config.rank
  bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) with fan_in = in_features
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class LoRAEinsum(core.AdaptedLinear):
  """y = base(x) + s * dropout(x) A B (see the module docstring); `lora_a` [in, r], `lora_b` [r, out]."""

  def __init__(self, base, config: LoRAConfig, *, rngs: nnx.Rngs, path: str = ""):
    super().__init__(base, path=path)
    g = self.geometry
    self.config = config  # frozen, hashable: static (adapter checkpoints record it)
    self.rank = core.check_rank(config.rank, g, path=path or type(base).__name__)
    self.scaling = float(config.scaling)
    self.lora_a = nn.adapter_param(_init_a(config, rngs.params(), g.in_features), (g.in_name, "lora_rank"))
    self.lora_b = nn.adapter_param(jnp.zeros((self.rank, g.out_features), jnp.float32), ("lora_rank", g.out_name))
    dropout = None
    if config.dropout > 0:
      dropout = nnx.Dropout(config.dropout, rngs=nnx.Rngs(dropout=rngs.dropout()))
    self.dropout = dropout  # assigned once (an attribute first set to None would become static)

  def dropout_active(self) -> bool:
    return self.dropout is not None and not self.dropout.deterministic

  def adapter_input(self, x):
    """dropout(x) (x unchanged without dropout or in eval mode)."""
    return self.dropout(x) if self.dropout_active() else x

  def lora_rows(self, x):
    """s * x A B as [tokens..., out_features], f32 (x already through dropout): compute dtype, f32 accumulation."""
    rows = self.rows(x)
    dtype = rows.dtype
    h = jnp.matmul(rows, self.lora_a[...].astype(dtype), preferred_element_type=jnp.float32)
    y = jnp.matmul(h.astype(dtype), self.lora_b[...].astype(dtype), preferred_element_type=jnp.float32)
    return y * self.scaling

  def delta_weight(self):
    """s A B [in, out] f32."""
    return jnp.matmul(self.lora_a[...], self.lora_b[...], precision=jax.lax.Precision.HIGHEST) * self.scaling

  def __call__(self, x):
    y = self.base(x)
    delta = self.lora_rows(self.adapter_input(x)).astype(y.dtype)
    return y + self.output_layout(delta, x)

  def merged_weight_and_bias(self):
    return self.base_weight() + self.delta_weight(), self.base_bias()


class DoRAEinsum(LoRAEinsum):
  """DoRA: LoRA's A, B plus `magnitude` m [out] (init: the column norms of W), y = m/||W'|| (x W') + b."""

  def __init__(self, base, config: LoRAConfig, *, rngs: nnx.Rngs, path: str = ""):
    super().__init__(base, config, rngs=rngs, path=path)
    self.magnitude = nn.adapter_param(self._column_norm(self.base_weight()), (self.geometry.out_name,))

  @staticmethod
  def _column_norm(w):
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=0))

  def weight_norm(self):
    """||W + s A B|| per output feature [out] f32, detached (no gradient flows through it)."""
    return jax.lax.stop_gradient(self._column_norm(self.base_weight() + self.delta_weight()))

  def __call__(self, x):
    y = self.base(x)
    x_in = self.adapter_input(x)
    # peft: the base result is reused unless dropout is active, then x W is recomputed on the dropped input.
    base_out = self.base(x_in) if self.dropout_active() else y
    base_rows = self.output_rows(base_out, x).astype(jnp.float32) - self.base_bias()
    ratio = self.magnitude[...] / self.weight_norm()
    delta = (ratio - 1.0) * base_rows + ratio * self.lora_rows(x_in)
    return y + self.output_layout(delta.astype(y.dtype), x)

  def merged_weight_and_bias(self):
    w = self.base_weight() + self.delta_weight()
    ratio = self.magnitude[...] / self._column_norm(w)
    return w * ratio[None, :], self.base_bias()


def _patterns(rules) -> list[str]:
  if isinstance(rules, str):
    return [rules]
  patterns = list(rules)
  if not patterns or not all(isinstance(p, str) for p in patterns):
    raise ValueError(f"rules={rules!r} must be a path regex or a non-empty sequence of them (full match).")
  return patterns


def qlora(model: nnx.Module, rules: str | Sequence[str], *,
          quant: QuantConfig = QuantConfig(fmt="nf4", group_size=64, double_quant=True),
          lora: LoRAConfig = LoRAConfig(), rngs: nnx.Rngs | None = None, seed: int = 0) -> dict[str, nnx.Module]:
  """QLoRA: quantizes the linear layers whose paths match `rules` (a regex or a sequence of them, full match) with
  `quant` (weight-only int8/int4/nf4, so base(x) runs through the quant_matmul kernel and stays packed), then
  wraps those same layers with `lora` (in place). Returns {path: wrapper}."""
  patterns = _patterns(rules)
  if quant.mode != "weight_only" or quant.fmt not in KERNEL_FORMATS:
    raise ValueError(f"quant={quant!r}: QLoRA needs mode='weight_only' and fmt in {KERNEL_FORMATS} (a frozen "
                     f"packed base the quant_matmul kernel differentiates through).")
  quantize_model(model, [(p, quant) for p in patterns])
  return core.add_adapters(model, [(p, lora) for p in patterns], rngs=rngs, seed=seed)


__all__ = ["DoRAEinsum", "INITS", "LoRAConfig", "LoRAEinsum", "qlora"]
