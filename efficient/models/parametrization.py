"""Standard parametrization (SP) and μP for the Llama family: the path rules and config knobs `efficient.optim.mup`
needs for `efficient.models.llama`.

    model, plan = parametrization.build(wide_config, base_config, "mup", seed=0)
    tx = optim.named(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr), mup.scale_learning_rates(plan)))

μP (Tensor Programs V, Table 8, relative to `base`; see `efficient.optim.mup`): the embedding (tied: also the
readout) keeps the base init std and Adam LR; every hidden matrix (q, k, v, o, gate, up, down) gets init std
std / sqrt(m) and Adam LR x 1/m, m = its fan_in / the base's; norm scales are left as built; an untied `lm_head`
is a readout (base std, or 0 with `zero_readout`). The model's forward gets TP5's two multipliers as config knobs
(`mup_config`): logits x base.embed_dim / embed_dim, and softmax logits sqrt(base.head_dim) / head_dim instead of
1 / sqrt(head_dim) (`attention_multiplier` = sqrt(base.head_dim / head_dim); 1 when only the head count grows).

SP is this library's default Llama at every width: every matrix N(0, std**2), one Adam LR, 1/sqrt(head_dim)
attention, logits x 1 -- i.e. μP relative to the model itself (every multiplier 1). `build` draws SP and μP
parameters from the same draws, so at the base width both are the same model, and at any width they differ only
by the parametrization.
"""
from __future__ import annotations

import math

import jax
from flax import nnx

from efficient.models import llama
from efficient.optim import mup

PARAMETRIZATIONS = ("sp", "mup")
_HIDDEN = r"blocks/\d+/(attention/(q|k|v|o)|mlp/(gate|up|down))/kernel"


def mup_rules(config: llama.LlamaConfig) -> tuple[tuple[str, str], ...]:
  """`efficient.optim.mup.plan` rules for a softmax/window Llama of `config` (every parameter gets a kind)."""
  rules = [("embedding", "embedding"), (_HIDDEN, "hidden"), (r"(blocks/\d+/(attention|mlp)_norm|final_norm)/scale",
                                                               "vector")]
  if not config.tie_embeddings:
    rules.append(("lm_head", "output"))
  return tuple(rules)


def _check_base(config: llama.LlamaConfig, base: llama.LlamaConfig) -> None:
  for name in ("num_layers", "vocab_size", "tie_embeddings", "attention", "attention_schedule"):
    if getattr(config, name) != getattr(base, name):
      raise ValueError(f"base.{name}={getattr(base, name)!r} differs from the model's {getattr(config, name)!r}: "
                       f"μP transfers across width only (same depth, vocabulary and layer kinds).")


def mup_config(config: llama.LlamaConfig, base: llama.LlamaConfig) -> llama.LlamaConfig:
  """`config` with μP's forward multipliers relative to `base` (the readout's 1/width_mult, 1/d attention)."""
  _check_base(config, base)
  return config.replace(logits_multiplier=base.embed_dim / config.embed_dim,
                        attention_multiplier=math.sqrt(base.head_dim / config.head_dim))


def build(config: llama.LlamaConfig, base: llama.LlamaConfig, parametrization: str = "mup", *, seed: int = 0,
          std: float | None = None, zero_readout: bool = False) -> tuple[llama.Llama, dict[str, mup.MuParam]]:
  """(model, plan) of `config` under `parametrization` ('sp' or 'mup', relative to `base`), its matrices drawn
  by `mup.initialize(seed=seed)` with base std `std` (default: base.init_std). Train it with
  `mup.scale_learning_rates(plan)` after Adam (all multipliers 1 under SP)."""
  if parametrization not in PARAMETRIZATIONS:
    raise ValueError(f"parametrization={parametrization!r} must be one of {PARAMETRIZATIONS}.")
  _check_base(config, base)
  std = base.init_std if std is None else std
  if parametrization == "mup":
    config = mup_config(config, base)
  # SP is μP relative to the model itself: every multiplier 1, every matrix at the base std. The built draws are
  # all replaced (norm scales excepted), so the 'rbg' generator builds it: cheaper to compile than threefry.
  model = llama.Llama(config, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))
  abstract_base = model if parametrization == "sp" else nnx.eval_shape(lambda: llama.Llama(base, rngs=nnx.Rngs(0)))
  mu_plan = mup.plan(model, abstract_base, mup_rules(config))
  mup.initialize(model, mu_plan, std=std, seed=seed, zero_readout=zero_readout)
  return model, mu_plan


__all__ = ["PARAMETRIZATIONS", "build", "mup_config", "mup_rules"]
