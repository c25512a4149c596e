"""Plain-jnp linear attention: the `naive` quadratic form (the ground truth), the `recurrent` step form (a
lax.scan over time, the definition written as a loop) and the public `recurrent_step` for decoding. f32 math.

Both take what `common.prepare` produces: feature-mapped, scaled q/k [B, T, H, K], v [B, T, H, V'] (V' = V + 1
with the normalizer's ones column for `recurrent`; `naive` takes the plain v and builds the normalizer itself),
log gates [B, T, H, Kg] in f32 or None, and the initial state [B, H, K, V'] in f32.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.linear_attention import common

_HIGHEST = lax.Precision.HIGHEST


def _einsum(spec, *operands):
  return jnp.einsum(spec, *operands, precision=_HIGHEST, preferred_element_type=jnp.float32)


def naive(q, k, v, log_gates, initial_state, *, normalize: bool):
  """Quadratic masked form: o_t = sum_{s<=t} (q_t . (e^(B_t - B_s) * k_s)) v_s + (q_t * e^(B_t)) S_0 with B the
  cumulative log gate. Returns (o [B, T, H, V'] with the normalizer q_t . z_t as its last column when
  `normalize`, final state [B, H, K, V']). Memory is O(T^2 K): for checking, not for long sequences."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  batch, seq_len, heads, k_dim = q.shape
  v_dim = v.shape[-1]
  if log_gates is None:
    log_gates = jnp.zeros((batch, seq_len, heads, 1), jnp.float32)
  log_gates = log_gates.astype(jnp.float32)
  cum = jnp.cumsum(log_gates, axis=1)  # B_t, [B, T, H, Kg]
  causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))
  decay = jnp.where(causal, jnp.exp(_segment_sums(log_gates)), 0.0)  # e^(B_t - B_s), [B, H, Kg, T(t), T(s)]
  decay = jnp.broadcast_to(decay, (batch, heads, k_dim, seq_len, seq_len))
  scores = _einsum("bthd,bshd,bhdts->bhts", q, k, decay)
  q_from_start = q * jnp.exp(cum)
  s0 = initial_state.astype(jnp.float32)
  out = _einsum("bhts,bshv->bthv", scores, v) + _einsum("bthk,bhkv->bthv", q_from_start, s0[..., :v_dim])
  if normalize:
    normalizer = jnp.transpose(jnp.sum(scores, axis=-1), (0, 2, 1))[..., None]  # sum_s of the decayed q . k
    normalizer = normalizer + _einsum("bthk,bhk->bth", q_from_start, s0[..., v_dim])[..., None]
    out = jnp.concatenate([out, normalizer], axis=-1)
    v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
  # B_T - B_s = sum_{u > s} g_u: suffix sums, again not a difference of long cumulative sums.
  to_end = jnp.flip(jnp.cumsum(jnp.flip(log_gates[:, 1:], axis=1), axis=1), axis=1)
  to_end = jnp.concatenate([to_end, jnp.zeros_like(log_gates[:, :1])], axis=1)
  final = (jnp.exp(cum[:, -1])[..., None] * s0 + _einsum("bshk,bshv->bhkv", k * jnp.exp(to_end), v))
  return out, final


def _segment_sums(log_gates):
  """[B, H, Kg, T(t), T(s)] sums of g_u over s < u <= t (0 where t <= s), as one cumsum of masked gates.

  Mamba-2's `segsum`: B_t - B_s computed as a difference of two long cumulative sums cancels catastrophically
  for strong gates (|B| ~ 200 leaves ~1e-5 relative error in e^(B_t - B_s)); summing only the segment does not."""
  gates = jnp.moveaxis(log_gates, 1, -1)  # [B, H, Kg, T]
  seq_len = gates.shape[-1]
  after = jnp.tril(jnp.ones((seq_len, seq_len), bool), -1)  # [u, s]: u > s
  return jnp.cumsum(jnp.where(after, gates[..., :, None], 0.0), axis=-2)


def step(state, q_t, k_t, v_t, log_gate_t=None):
  """One step of the core: state [B, H, K, V'], q_t/k_t [B, H, K], v_t [B, H, V'], log gate [B, H, Kg] or None
  -> (o_t = q_t S_t [B, H, V'], S_t), f32."""
  state = state.astype(jnp.float32)
  if log_gate_t is not None:
    state = jnp.exp(log_gate_t.astype(jnp.float32))[..., None] * state
  state = state + k_t.astype(jnp.float32)[..., :, None] * v_t.astype(jnp.float32)[..., None, :]
  return _einsum("bhk,bhkv->bhv", q_t.astype(jnp.float32), state), state


def recurrent(q, k, v, log_gates, initial_state):
  """The step form over a whole sequence: lax.scan of `step` over time -> (o [B, T, H, V'], final state)."""
  time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)

  def body(state, inputs):
    out, state = step(state, *inputs)
    return state, out

  final, out = lax.scan(body, initial_state.astype(jnp.float32),
                        (time_major(q), time_major(k), time_major(v), time_major(log_gates)))
  return jnp.moveaxis(out, 0, 1), final


def recurrent_step(state, q_t, k_t, v_t, *, feature_map="identity", log_decay=None, log_gates=None, scale=None,
                   normalize=False, eps=1e-6):
  """One decoding step of `linear_attention` with the same arguments, for q_t/k_t [B, H, K], v_t [B, H, V],
  log_gates [B, H, K] (this step's) or log_decay [H], and state [B, H, K', V'] (K' = feature dim, V' = V + 1 when
  normalizing; zeros to start) -> (o_t [B, H, V] in q_t.dtype, new state f32). Feeding the final state of
  `linear_attention(..., return_final_state=True)` continues that sequence exactly."""
  scale = common.default_scale(feature_map, q_t.shape[-1]) if scale is None else scale
  q_t, k_t, v_t = common.prepare(q_t, k_t, v_t, feature_map=feature_map, scale=scale, normalize=normalize)
  gate = log_gates
  if log_decay is not None:
    gate = jnp.broadcast_to(log_decay.astype(jnp.float32)[None, :, None], (q_t.shape[0], q_t.shape[1], 1))
  out, state = step(state, q_t, k_t, v_t, gate)
  return common.finish(out, normalize=normalize, eps=eps, dtype=q_t.dtype), state
