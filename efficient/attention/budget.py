"""Budgeted KV caches: a fixed number of slots per (batch row, kv head), reduced by an eviction or merging policy.

`BudgetedKV(policy, budget, sinks=0, recent=None, storage='float', seed=0)` is a `KVFormat` (frozen, hashable:
a static jit argument) whose `create` gives a `BudgetedKVCache` with `budget` slots. Every (batch row, kv head)
keeps its own slots, positions, accumulated attention mass and merge counts (as H2O does), so heads keep
different tokens. Slots are stored through a per-token `TokenFormat` ('float', or 'int8'/'int4' registered by
`efficient.quant.kv_cache`), so every policy composes with quantized storage.

`update_and_attend`: the T new tokens (written through the storage, i.e. read back as the cache would hold them)
attend to the kept slots and to themselves, causally by position, with its own per-head-position attention
(the model's `attention_fn`, `kv_positions` and `kv_lengths` are not used: the slots carry their own positions).
A merged slot standing for c tokens adds log(c) to its logits (proportional attention), so it weighs as the c
tokens would if their keys were equal. Then the budget + T candidates are reduced back to `budget` slots by the
policy. A sequence that never exceeds the budget therefore gives exactly the full cache's attention.

Policies (`register_policy(name, fn)`; `fn(candidates, *, budget, sinks, recent, key) -> Plan`):
  window    the `budget` most recent tokens
  sinks     the first `sinks` tokens (positions < sinks) + the most recent ones (StreamingLLM)
  h2o       sinks + the `recent` most recent + the heaviest accumulated attention mass (H2O / Scissorhands)
  kvmerger  h2o's kept set; every evicted token merged into its most similar kept key (cosine), keys and
            values averaged with their counts as weights (KVMerger-style similarity merging, without its
            Gaussian-kernel weights or its consecutive-set constraint)
  elastic   h2o's kept set as anchors; every evicted token merged into the nearest anchor by position
            (Elastic-Cache-style anchor merging)
  random    uniform random eviction (seeded; only sinks/recent given explicitly are protected)
`recent` None means the policy default: window -> budget, sinks -> budget - sinks, h2o/kvmerger/elastic ->
(budget - sinks) // 2, random -> 0. Packed segments are not supported (a ValueError).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from efficient.attention import cache as cache_lib
from efficient.attention.core import EMPTY_POSITION

_STORAGES = ("float", "int8", "int4")  # int8/int4 token formats register from efficient.quant.kv_cache


class Candidates(NamedTuple):
  """What a policy sees, per (batch row, kv head), laid out [B, H_kv, N] (N = budget + new tokens)."""
  positions: jax.Array  # int32, EMPTY_POSITION where the candidate holds nothing
  scores: jax.Array     # f32 accumulated attention mass received (summed over queries and grouped heads)
  counts: jax.Array     # f32 tokens each candidate stands for (0 empty, 1 a single token, more when merged)
  keys: jax.Array       # [B, H_kv, N, D] f32 keys as stored (RoPE'd), for similarity

  @property
  def valid(self):
    return self.positions != EMPTY_POSITION


class Plan(NamedTuple):
  """keep [B, H_kv, budget]: candidate indices that become the slots. merge_into [B, H_kv, N] or None: the slot
  (0..budget-1) each candidate is averaged into, -1 to drop it; a kept candidate must map to its own slot."""
  keep: jax.Array
  merge_into: jax.Array | None = None


Policy = Callable[..., Plan]
_POLICIES: dict[str, Policy] = {}
_DEFAULT_RECENT: dict[str, Callable[[int, int], int]] = {}


def register_policy(name: str, policy: Policy, *, default_recent: Callable[[int, int], int] | None = None):
  """Adds a policy `policy(candidates, *, budget, sinks, recent, key) -> Plan`; `default_recent(budget, sinks)`
  is the `recent` it gets when BudgetedKV.recent is None (default: 0)."""
  _POLICIES[name] = policy
  _DEFAULT_RECENT[name] = default_recent or (lambda budget, sinks: 0)


def policies() -> tuple[str, ...]:
  return tuple(_POLICIES)


def get_policy(name: str) -> Policy:
  """The registered policy function `name` (a ValueError naming `policy` when there is none)."""
  if name not in _POLICIES:
    raise ValueError(f"policy={name!r} is not a registered KV policy; choose one of {policies()}.")
  return _POLICIES[name]


def own_slots(keep, num_candidates: int):
  """merge_into [B, H_kv, num_candidates] that keeps `keep` [B, H_kv, budget] as they are and drops the rest (-1):
  the merge plan equivalent to plain eviction."""
  budget = keep.shape[-1]
  own = jnp.broadcast_to(jnp.arange(budget, dtype=jnp.int32), keep.shape)
  rows = jnp.full(keep.shape[:-1] + (num_candidates,), -1, jnp.int32)
  return jax.vmap(jax.vmap(lambda r, k, o: r.at[k].set(o)))(rows, keep, own)


# --- the policies ---------------------------------------------------------------------------------------------

_PROTECTED = 2.0 ** 40  # above any attention mass or position: protected candidates always win top_k


def _protected(c: Candidates, sinks: int, recent: int):
  """Sinks (position < sinks) and the `recent` most recent valid candidates of each (row, head)."""
  protected = c.valid & (c.positions < sinks)
  if recent > 0:
    recency = jnp.where(c.valid, c.positions, -1)
    threshold = jax.lax.top_k(recency, recent)[0][..., -1:]  # positions are distinct within a (row, head)
    protected |= c.valid & (recency >= threshold)
  return protected


def _keep_by(priority, c: Candidates, budget: int, protected):
  """The `budget` candidates of highest priority; protected ones first (newest first), empty ones last."""
  priority = jnp.where(protected, _PROTECTED + c.positions.astype(jnp.float32), priority)
  priority = jnp.where(c.valid, priority, -jnp.inf)
  return jax.lax.top_k(priority, budget)[1].astype(jnp.int32)


def window_policy(c, *, budget, sinks, recent, key):
  del sinks, recent, key
  return Plan(_keep_by(c.positions.astype(jnp.float32), c, budget, jnp.zeros_like(c.valid)))


def sinks_policy(c, *, budget, sinks, recent, key):
  del key
  return Plan(_keep_by(c.positions.astype(jnp.float32), c, budget, _protected(c, sinks, recent)))


def h2o_policy(c, *, budget, sinks, recent, key):
  del key
  return Plan(_keep_by(c.scores, c, budget, _protected(c, sinks, recent)))


def random_policy(c, *, budget, sinks, recent, key):
  return Plan(_keep_by(jax.random.uniform(key, c.scores.shape), c, budget, _protected(c, sinks, recent)))


def _assign_evicted(c: Candidates, keep, affinity):
  """merge_into: kept candidates to their own slot, evicted valid ones to the kept slot of highest
  `affinity` [B, H_kv, N, budget] among valid kept slots, empty ones dropped (-1)."""
  kept_valid = jnp.take_along_axis(c.valid, keep, axis=-1)  # [B, Hk, budget]
  target = jnp.argmax(jnp.where(kept_valid[:, :, None, :], affinity, -jnp.inf), axis=-1).astype(jnp.int32)
  merge_into = jnp.where(c.valid, target, -1)
  own_slot = own_slots(keep, c.positions.shape[-1])  # -1 unless kept
  return jnp.where(own_slot >= 0, own_slot, merge_into)


def kvmerger_policy(c, *, budget, sinks, recent, key):
  keep = h2o_policy(c, budget=budget, sinks=sinks, recent=recent, key=key).keep
  unit = c.keys / jnp.maximum(jnp.linalg.norm(c.keys, axis=-1, keepdims=True), 1e-12)
  kept_unit = jnp.take_along_axis(unit, keep[..., None], axis=2)
  cosine = jnp.einsum("bhnd,bhkd->bhnk", unit, kept_unit)
  return Plan(keep, _assign_evicted(c, keep, cosine))


def elastic_policy(c, *, budget, sinks, recent, key):
  keep = h2o_policy(c, budget=budget, sinks=sinks, recent=recent, key=key).keep
  anchor_positions = jnp.take_along_axis(c.positions, keep, axis=-1).astype(jnp.float32)
  distance = jnp.abs(c.positions.astype(jnp.float32)[..., None] - anchor_positions[:, :, None, :])
  return Plan(keep, _assign_evicted(c, keep, -distance))  # argmax takes the first (older) anchor on ties


_half_rest = lambda budget, sinks: (budget - sinks) // 2
register_policy("window", window_policy, default_recent=lambda budget, sinks: budget)
register_policy("sinks", sinks_policy, default_recent=lambda budget, sinks: budget - sinks)
register_policy("h2o", h2o_policy, default_recent=_half_rest)
register_policy("kvmerger", kvmerger_policy, default_recent=_half_rest)
register_policy("elastic", elastic_policy, default_recent=_half_rest)
register_policy("random", random_policy)


# --- the format and the cache ---------------------------------------------------------------------------------


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class BudgetedKV:
  """A KV format with `budget` slots per (row, kv head) reduced by `policy` (see the module docstring)."""
  policy: str
  budget: int
  sinks: int = 0
  recent: int | None = None
  storage: str = "float"
  seed: int = 0

  def __post_init__(self):
    if self.policy not in _POLICIES:
      raise ValueError(f"policy={self.policy!r} is not a registered KV policy; choose one of {policies()}.")
    if not _is_count(self.budget) or self.budget < 1:
      raise ValueError(f"budget={self.budget!r} must be an int >= 1.")
    if not _is_count(self.sinks) or self.sinks < 0:
      raise ValueError(f"sinks={self.sinks!r} must be an int >= 0.")
    if self.budget < self.sinks + 1:
      raise ValueError(f"budget={self.budget} must exceed sinks={self.sinks} (at least one non-sink slot).")
    if self.recent is not None and (not _is_count(self.recent) or not 0 <= self.recent <= self.budget):
      raise ValueError(f"recent={self.recent!r} must be an int in [0, budget={self.budget}].")
    if self.recent is not None and self.sinks + self.recent > self.budget:
      raise ValueError(f"recent={self.recent} + sinks={self.sinks} exceeds budget={self.budget}.")
    if self.storage not in _STORAGES:
      cache_lib.token_format(self.storage, argument="storage")  # a registered custom format, or the error

  @property
  def name(self) -> str:
    return f"budget({self.policy},{self.budget},sinks={self.sinks},recent={self.resolved_recent},{self.storage})"

  @property
  def resolved_recent(self) -> int:
    if self.recent is not None:
      return self.recent
    return min(_DEFAULT_RECENT[self.policy](self.budget, self.sinks), self.budget - self.sinks)

  def create(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, dtype=jnp.float32,
             group_size=None) -> "BudgetedKVCache":
    """Empty slots; `max_len` (the model's positions bookkeeping) does not size this cache: `budget` does."""
    del max_len
    if group_size is not None:
      raise ValueError("kv_group_size applies to per-channel quantized caches, not BudgetedKV (per-token storage).")
    fmt = cache_lib.token_format(self.storage, argument="storage")
    shape = (batch, self.budget, num_kv_heads)
    return BudgetedKVCache(
        stored=cache_lib.empty_tokens(fmt, (*shape, head_dim), dtype),
        positions=jnp.full(shape, EMPTY_POSITION, jnp.int32), scores=jnp.zeros(shape, jnp.float32),
        counts=jnp.zeros(shape, jnp.float32), spec=self, dtype=jnp.dtype(dtype).name)


@struct.dataclass
class BudgetedKVCache:
  """stored: the token format's dict, arrays [B, budget, H_kv, ...]; positions int32 / scores f32 / counts f32
  [B, budget, H_kv]."""
  stored: dict
  positions: jax.Array
  scores: jax.Array
  counts: jax.Array
  spec: BudgetedKV = struct.field(pytree_node=False)
  dtype: str = struct.field(pytree_node=False, default="float32")

  @property
  def token_format(self) -> cache_lib.TokenFormat:
    return cache_lib.token_format(self.spec.storage, argument="storage")

  def keys_values(self, dtype=jnp.float32):
    """The stored k, v [B, budget, H_kv, D] decoded to `dtype` (empty slots hold zeros)."""
    return self.token_format.decode(self.stored, dtype)

  def replace_slots(self, **changes) -> "BudgetedKVCache":
    return dataclasses.replace(self, **changes)

  def update_and_attend(self, q, k, v, *, index=None, q_positions, kv_positions=None, q_segment_ids=None,
                        kv_segment_ids=None, kv_lengths=None, attention_fn=None):
    del index, kv_positions, kv_lengths, attention_fn  # own slots, own positions, own attention
    if q_segment_ids is not None or kv_segment_ids is not None:
      raise ValueError("segment_ids: budgeted KV caches do not support packed segments.")
    fmt = self.token_format
    new_stored = fmt.encode(k, v, jnp.dtype(self.dtype))
    stored = jax.tree.map(lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], axis=1), self.stored, new_stored)
    keys, values = fmt.decode(stored, jnp.float32)  # [B, N, Hk, D]
    new_positions = jnp.broadcast_to(q_positions[:, :, None], k.shape[:3]).astype(jnp.int32)
    positions = jnp.concatenate([self.positions, new_positions], axis=1)
    counts = jnp.concatenate([self.counts, jnp.ones(k.shape[:3], jnp.float32)], axis=1)
    out, mass = _attend(q, keys, values, positions, counts, q_positions)
    scores = jnp.concatenate([self.scores, jnp.zeros(k.shape[:3], jnp.float32)], axis=1) + mass
    return out.astype(q.dtype), self._reduce(stored, keys, values, positions, scores, counts, q_positions)

  def _reduce(self, stored, keys, values, positions, scores, counts, q_positions):
    spec = self.spec
    head_major = lambda x: jnp.swapaxes(x, 1, 2)  # [B, N, Hk, ...] -> [B, Hk, N, ...]
    candidates = Candidates(head_major(positions), head_major(scores), head_major(counts), head_major(keys))
    key = jax.random.fold_in(jax.random.key(spec.seed), jnp.max(q_positions))
    plan = _POLICIES[spec.policy](candidates, budget=spec.budget, sinks=spec.sinks,
                                  recent=spec.resolved_recent, key=key)
    keep = jnp.swapaxes(plan.keep, 1, 2)  # [B, budget, Hk]
    gather = lambda x: jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 3)), axis=1)
    kept = jax.tree.map(gather, stored)
    kept_positions, kept_scores, kept_counts = gather(positions), gather(scores), gather(counts)
    if plan.merge_into is None:
      return self.replace_slots(stored=kept, positions=kept_positions, scores=kept_scores, counts=kept_counts)
    merge_into = jnp.swapaxes(plan.merge_into, 1, 2)  # [B, N, Hk]
    budget = spec.budget
    target = jnp.where(merge_into >= 0, merge_into, budget)  # out of range: dropped by the scatter

    def segment_sum(x):  # x [B, N, Hk, ...] -> [B, budget, Hk, ...] summed per target slot
      def one(xs, ts):  # per (row, head): xs [N, ...], ts [N]
        return jnp.zeros((budget,) + xs.shape[1:], xs.dtype).at[ts].add(xs, mode="drop")
      per_head = jax.vmap(jax.vmap(one, in_axes=(1, 1), out_axes=1), in_axes=(0, 0))
      return per_head(x, target)

    weights = jnp.where(merge_into >= 0, counts, 0.0)
    total = segment_sum(weights)
    members = segment_sum((merge_into >= 0).astype(jnp.float32))
    merged = members > 1  # a slot that absorbed evicted tokens: re-encode its average; others keep their codes
    safe = jnp.maximum(total, 1e-30)[..., None]
    merged_k = segment_sum(keys * weights[..., None]) / safe
    merged_v = segment_sum(values * weights[..., None]) / safe
    encoded = self.token_format.encode(merged_k, merged_v, jnp.dtype(self.dtype))
    pick = lambda a, b: jnp.where(merged.reshape(merged.shape + (1,) * (a.ndim - 3)), a.astype(b.dtype), b)
    return self.replace_slots(stored=jax.tree.map(pick, encoded, kept), positions=kept_positions,
                              scores=segment_sum(jnp.where(merge_into >= 0, scores, 0.0)),
                              counts=jnp.where(kept_counts > 0, total, 0.0))


def _attend(q, keys, values, positions, counts, q_positions):
  """Causal GQA attention of q [B, T, H, D] over per-head slots keys/values [B, N, Hk, D] at positions
  [B, N, Hk]; log(count) on each slot's logits. Returns (out [B, T, H, D] f32, attention mass [B, N, Hk])."""
  batch, q_len, num_heads, head_dim = q.shape
  num_kv = keys.shape[2]
  qg = q.astype(jnp.float32).reshape(batch, q_len, num_kv, num_heads // num_kv, head_dim)
  logits = jnp.einsum("btkgd,bnkd->bkgtn", qg, keys) * head_dim ** -0.5
  slot_positions = jnp.swapaxes(positions, 1, 2)  # [B, Hk, N]
  visible = ((slot_positions != EMPTY_POSITION)[:, :, None, :]
             & (slot_positions[:, :, None, :] <= q_positions[:, None, :, None]))  # [B, Hk, T, N]
  bias = jnp.log(jnp.maximum(jnp.swapaxes(counts, 1, 2), 1.0))[:, :, None, None, :]
  logits = jnp.where(visible[:, :, None], logits + bias, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(visible[:, :, None].any(-1, keepdims=True), probs, 0.0)
  out = jnp.einsum("bkgtn,bnkd->btkgd", probs, values).reshape(batch, q_len, num_heads, head_dim)
  mass = jnp.swapaxes(probs.sum(axis=(2, 3)), 1, 2)  # [B, N, Hk]
  return out, mass


def kept_positions(layer_cache: BudgetedKVCache):
  """[B, H_kv, budget] positions each (row, head) keeps, ascending (EMPTY_POSITION last)."""
  return jnp.sort(jnp.swapaxes(layer_cache.positions, 1, 2), axis=-1)
