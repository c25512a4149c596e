"""Optimizers by name, as `efficient.train` builds them from its config (`--config.optimizer=...`).

`make(name, learning_rate, options)` returns the optax transformation of `name` (plain arrays; the trainer wraps
it in `axes.named` and global-norm clipping). Weight decay is decoupled (AdamW's, scaled by the schedule's
learning rate, inside each method's transformation) and applied where `options.decay_mask` says (matrices only
in the trainer). 'mezo' is a training
step, not a transformation: `make` refuses it and `efficient.train` builds `zeroth_order.make_mezo_step`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from efficient.optim.factored import came as came_transformation
from efficient.optim import lowbit, lowrank

OPTIMIZERS = ("adamw", "adam8bit", "adam4bit", "adam4bit_naive", "adafactor", "came", "galore", "apollo",
              "apollo_mini", "mezo")
# What `OptimizerOptions` fields each optimizer reads (the rest are ignored by it; see train.TrainConfig).
READS = {
    "adamw": ("b1", "b2", "eps", "weight_decay"),
    "adam8bit": ("b1", "b2", "eps", "weight_decay", "block_size", "min_quantized_size", "stable_embedding"),
    "adam4bit": ("b1", "b2", "eps", "weight_decay", "block_size", "min_quantized_size", "stable_embedding"),
    "adam4bit_naive": ("b1", "b2", "eps", "weight_decay", "block_size", "min_quantized_size", "stable_embedding"),
    "adafactor": ("weight_decay",),
    "came": ("b1", "b2", "weight_decay"),
    "galore": ("b1", "b2", "eps", "weight_decay", "rank", "update_proj_gap", "projection_scale"),
    "apollo": ("b1", "b2", "eps", "weight_decay", "rank", "update_proj_gap", "projection_scale", "seed"),
    "apollo_mini": ("b1", "b2", "eps", "weight_decay", "update_proj_gap", "projection_scale", "seed"),
    "mezo": ("weight_decay", "mezo_eps", "seed"),
}


@dataclasses.dataclass(frozen=True)
class OptimizerOptions:
  """Hyperparameters an optimizer may read; 0 for block_size / rank / projection_scale: the method's default."""
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  decay_mask: Callable | None = None
  block_size: int = 0           # low-bit: 0 -> 256 (8-bit, bitsandbytes) / 128 (4-bit, Li et al.)
  min_quantized_size: int = 4096  # low-bit: params with fewer elements keep f32 state
  stable_embedding: bool = False  # low-bit: embedding state stays f32 (bitsandbytes' StableEmbedding idea)
  rank: int = 0                 # galore -> 128, apollo -> 256
  update_proj_gap: int = 200
  projection_scale: float = 0.0  # galore -> 0.25, apollo -> 1.0, apollo_mini -> sqrt(128)
  seed: int = 0
  mezo_eps: float = 1e-3


class DecayState(NamedTuple):
  count: jax.Array


def decoupled_weight_decay(learning_rate, weight_decay: float, mask=None) -> optax.GradientTransformation:
  """updates - lr(t) * weight_decay * params (AdamW's decay, after a transformation that already applied lr)."""
  schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

  def init(params):
    del params
    return DecayState(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("decoupled_weight_decay needs params (pass them to update).")
    rate = schedule(state.count) * weight_decay
    updates = jax.tree.map(lambda u, p: u - (rate * p).astype(u.dtype), updates, params)
    return updates, DecayState(optax.safe_increment(state.count))

  tx = optax.GradientTransformation(init, update)
  return tx if mask is None else optax.masked(tx, mask)


def make(name: str, learning_rate: float | optax.Schedule, options: OptimizerOptions = OptimizerOptions()
         ) -> optax.GradientTransformation:
  """The transformation `name` (one of OPTIMIZERS except 'mezo') with `options`; see the module docstring."""
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer={name!r} is unknown; choose one of {OPTIMIZERS}.")
  o = options
  if name == "mezo":
    raise ValueError("optimizer='mezo' is a zeroth-order training step, not a gradient transformation: build "
                     "it with efficient.optim.make_mezo_step (efficient.train does so for optimizer='mezo').")
  if name == "adamw":
    return optax.adamw(learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=o.decay_mask)
  decay = dict(weight_decay=o.weight_decay, mask=o.decay_mask)
  fp32_state = lowbit.embedding_fp32_state if o.stable_embedding else None
  if name == "adam8bit":
    return lowbit.adamw_8bit(learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, block_size=o.block_size or 256,
                             min_8bit_size=o.min_quantized_size, fp32_state=fp32_state, **decay)
  if name in ("adam4bit", "adam4bit_naive"):
    make_4bit = lowbit.adam_4bit if name == "adam4bit" else lowbit.adam_4bit_naive
    return make_4bit(learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, block_size=o.block_size or 128,
                     min_4bit_size=o.min_quantized_size, fp32_state=fp32_state, **decay)
  if name == "adafactor":
    # optax's Adafactor as it is; its own weight_decay_rate is not scaled by the learning rate, so the
    # trainer's decoupled (AdamW) decay is chained after it instead.
    tx = optax.adafactor(learning_rate)
    if not o.weight_decay:
      return tx
    return optax.chain(tx, decoupled_weight_decay(learning_rate, o.weight_decay, o.decay_mask))
  if name == "came":
    return came_transformation(learning_rate, b1=o.b1, b2=o.b2, **decay)
  # GaLore / APOLLO project matrices; a >2-D kernel (attention's [embed, heads, head_dim]) is viewed as its
  # squarest 2-D split rather than left to plain Adam.
  projected = dict(decay, matrix_split=lowrank.squarest_matrix_split)
  if name == "galore":
    return lowrank.galore(learning_rate, rank=o.rank or 128, update_proj_gap=o.update_proj_gap,
                          scale=o.projection_scale or 0.25, b1=o.b1, b2=o.b2, eps=o.eps, **projected)
  if name == "apollo":
    return lowrank.apollo(learning_rate, rank=o.rank or 256, update_proj_gap=o.update_proj_gap,
                          scale=o.projection_scale or 1.0, b1=o.b1, b2=o.b2, eps=o.eps, seed=o.seed,
                          **projected)
  scale = {"scale": o.projection_scale} if o.projection_scale else {}
  return lowrank.apollo_mini(learning_rate, update_proj_gap=o.update_proj_gap, b1=o.b1, b2=o.b2, eps=o.eps,
                             seed=o.seed, **projected, **scale)
