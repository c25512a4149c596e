"""`LinearAttention`: a token mixer running `pallas_kernels.linear_attention`, with a recurrent-state cache.

Variants (`LinearAttentionConfig`): the feature map (identity, elu+1, relu, Based's Taylor map) on q/k projected to
`feature_dim` per head; a fixed per-head decay (RetNet's gamma_h = 1 - 2^(-5-h)); GLA's data-dependent gates from a
low-rank projection (x -> rank -> H x K', log_sigmoid / 16 as in GLA); Based/TransNormer normalization.

Packed sequences: the state is reset where the segment id changes, as a log gate of `RESET_LOG_GATE` on the first
token of each segment (exp(-30) ~ 1e-13: a reset to f32 precision, and finite in the chunk kernels, whose
sub-chunk factoring bounds exponents by a few gates). Without segment ids the cheaper ungated path runs.

Decoding: the cache is {'state': [B, H, K', V'] f32}; a one-token step uses `recurrent_step`, a longer prefill the
chunk form with `initial_state` -- both continue the same recurrence exactly.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient import nn
from efficient.attention.core import MixerSpec
from pallas_kernels.linear_attention import FEATURE_MAPS, linear_attention, recurrent_step

RESET_LOG_GATE = -30.0
DECAYS = ("none", "fixed", "gla")


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig:
  """feature_map: one of FEATURE_MAPS; feature_dim: q/k width per head before the map (None: head_dim);
  num_heads: None = the model's; decay: 'none', 'fixed' (RetNet per-head decay) or 'gla' (data-dependent
  gates of rank `gate_rank`); normalize: divide by phi(q).z; chunk_size / implementation go to the op."""
  feature_map: str = "elu1"
  feature_dim: int | None = None
  num_heads: int | None = None
  decay: str = "none"
  gate_rank: int = 16
  gate_normalizer: float = 16.0
  normalize: bool = True
  chunk_size: int | None = None
  implementation: str | None = None

  def __post_init__(self):
    if self.feature_map not in FEATURE_MAPS:
      raise ValueError(f"LinearAttentionConfig.feature_map={self.feature_map!r} is unknown; choose one of "
                       f"{FEATURE_MAPS}.")
    if self.decay not in DECAYS:
      raise ValueError(f"LinearAttentionConfig.decay={self.decay!r} is unknown; choose one of {DECAYS}.")
    for name in ("feature_dim", "num_heads"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"LinearAttentionConfig.{name} must be a positive int or None, got {value!r}.")
    if self.gate_rank < 1:
      raise ValueError(f"LinearAttentionConfig.gate_rank must be >= 1, got {self.gate_rank}.")


def expanded_dim(feature_map: str, dim: int) -> int:
  """K': the width after the feature map (Taylor: 1 + d + d^2)."""
  return 1 + dim + dim * dim if feature_map == "taylor" else dim


def segment_starts(segment_ids, previous=None):
  """[B, T] bool: where the segment id differs from the token before (`previous` [B] for the first token)."""
  before = segment_ids[:, :1] if previous is None else previous[:, None]
  return segment_ids != jnp.concatenate([before, segment_ids[:, :-1]], axis=1)


class LinearAttention(nnx.Module):
  """Causal linear attention of x [B, T, embed] -> [B, T, embed]; the `softmax.Attention` call signature."""

  def __init__(self, config: MixerSpec, variant: LinearAttentionConfig | None = None, *, rngs: nnx.Rngs):
    variant = LinearAttentionConfig() if variant is None else variant
    c = config
    self.config, self.variant = config, variant
    self.num_heads = variant.num_heads or c.num_heads
    self.key_dim = variant.feature_dim or c.head_dim
    self.value_dim = c.head_dim
    self.expanded = expanded_dim(variant.feature_map, self.key_dim)
    qk_shape, names = (c.embed_dim, self.num_heads, self.key_dim), ("embed", "heads", "head_dim")
    self.q = c.einsum("btd,dhk->bthk", qk_shape, names, rngs=rngs)
    self.k = c.einsum("btd,dhk->bthk", qk_shape, names, rngs=rngs)
    self.v = c.einsum("btd,dhk->bthk", (c.embed_dim, self.num_heads, self.value_dim), names, rngs=rngs)
    self.o = c.einsum("bthk,hkd->btd", (self.num_heads, self.value_dim, c.embed_dim),
                      ("heads", "head_dim", "embed"), rngs=rngs)
    if variant.decay == "gla":
      self.gate_down = c.einsum("btd,dr->btr", (c.embed_dim, variant.gate_rank), ("embed", None), rngs=rngs)
      self.gate_up = c.einsum("btr,rhk->bthk", (variant.gate_rank, self.num_heads, self.expanded),
                              (None, "heads", "head_dim"), rngs=rngs)
      self.gate_bias = nn.logical_param(jnp.zeros((self.num_heads, self.expanded), c.param_dtype),
                                           ("heads", "head_dim"))

  def log_decay(self):
    """RetNet's fixed per-head log decay log(1 - 2^(-5 - h)) [H] (None unless decay == 'fixed')."""
    if self.variant.decay != "fixed":
      return None
    return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(self.num_heads, dtype=jnp.float32))))

  def log_gates(self, x):
    """GLA gates log_sigmoid(up(down(x)) + b) / normalizer, [B, T, H, K'] f32 (None unless decay == 'gla')."""
    if self.variant.decay != "gla":
      return None
    logits = self.gate_up(self.gate_down(x)).astype(jnp.float32) + self.gate_bias[...].astype(jnp.float32)
    return jax.nn.log_sigmoid(logits) / self.variant.gate_normalizer

  def _gates(self, x, segment_ids, previous_segment):
    """(log_decay, log_gates) for the op; segment starts add RESET_LOG_GATE (forcing the gated form)."""
    log_decay, log_gates = self.log_decay(), self.log_gates(x)
    if segment_ids is None:
      return log_decay, log_gates
    batch, length = segment_ids.shape
    reset = jnp.where(segment_starts(segment_ids, previous_segment), RESET_LOG_GATE, 0.0)
    reset = jnp.broadcast_to(reset[:, :, None, None], (batch, length, self.num_heads, self.expanded))
    if log_decay is not None:
      return None, reset + log_decay[None, None, :, None]
    return None, reset if log_gates is None else reset + log_gates

  def __call__(self, x, *, positions=None, segment_ids=None, attention_fn=None, cache=None, cache_positions=None,
               cache_segment_ids=None, cache_index=None, cache_lengths=None):
    del positions, attention_fn, cache_positions, cache_lengths  # no RoPE: order enters through the causal recurrence
    v_cfg = self.variant
    dtype = self.config.compute_dtype
    q, k, v = self.q(x).astype(dtype), self.k(x).astype(dtype), self.v(x).astype(dtype)
    previous = None
    if cache is not None and segment_ids is not None:  # the segment of the token before this call's first
      if cache_segment_ids is None:
        raise ValueError("segment_ids given but the cache was built without them (init_cache(with_segment_ids)).")
      before = jax.lax.dynamic_index_in_dim(cache_segment_ids, jnp.maximum(cache_index - 1, 0), axis=1,
                                            keepdims=False)
      previous = jnp.where(cache_index > 0, before, segment_ids[:, 0])
    log_decay, log_gates = self._gates(x, segment_ids, previous)
    kwargs = dict(feature_map=v_cfg.feature_map, normalize=v_cfg.normalize, log_decay=log_decay)
    if cache is not None and x.shape[1] == 1:
      out, state = recurrent_step(cache["state"], q[:, 0], k[:, 0], v[:, 0],
                                  log_gates=None if log_gates is None else log_gates[:, 0], **kwargs)
      return self.o(out[:, None]), {"state": state}
    out = linear_attention(q, k, v, log_gates=log_gates, initial_state=None if cache is None else cache["state"],
                           return_final_state=cache is not None, chunk_size=v_cfg.chunk_size,
                           implementation=v_cfg.implementation, **kwargs)
    if cache is None:
      return self.o(out), None
    out, state = out
    return self.o(out), {"state": state}

  def state_shape(self, batch: int) -> tuple[int, ...]:
    """[B, H, K', V'] of the recurrent state (V' = V + 1 with normalization)."""
    return (batch, self.num_heads, self.expanded, self.value_dim + (1 if self.variant.normalize else 0))


def state_shape(config: MixerSpec, variant: LinearAttentionConfig | None, batch: int) -> tuple[int, ...]:
  """`LinearAttention.state_shape` without building the module."""
  variant = LinearAttentionConfig() if variant is None else variant
  key_dim = variant.feature_dim or config.head_dim
  return (batch, variant.num_heads or config.num_heads, expanded_dim(variant.feature_map, key_dim),
          config.head_dim + (1 if variant.normalize else 0))


def init_linear_cache(config: MixerSpec, variant: LinearAttentionConfig | None, batch: int) -> dict:
  """The zero recurrent state (f32, whatever the compute dtype: it accumulates over the whole sequence)."""
  return {"state": jnp.zeros(state_shape(config, variant, batch), jnp.float32)}


def state_bytes(config: MixerSpec, variant: LinearAttentionConfig | None, batch: int = 1) -> int:
  return 4 * math.prod(state_shape(config, variant, batch))
