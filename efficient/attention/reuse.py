"""KV reuse under position shifts (PIE): re-rotate cached RoPE keys instead of recomputing them.

Rotate-half RoPE (`core.rope`) rotates each (x_i, x_{i+D/2}) pair by angle p * f_i, and rotations compose:
RoPE(x, p + delta) = R(delta) RoPE(x, p). So a cached key whose token moved by `delta` positions (tokens were
inserted or deleted before it) is fixed by one rotation R(delta), with no access to the layer's weights.
Values carry no position and stay as they are. (The key is exact; what is NOT repaired is that the moved token's
hidden states were computed with the old context: see `efficient.models.kv_reuse`.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from efficient.attention import budget as budget_lib
from efficient.attention import cache as cache_lib
from efficient.attention import core
from efficient.attention.core import EMPTY_POSITION


def _is_concrete(*values) -> bool:
  return not any(isinstance(v, jax.core.Tracer) for v in values)


def _check_delta(positions, delta, valid=None):
  if _is_concrete(positions, delta):
    positions = np.asarray(positions)
    moved = positions + np.asarray(delta)
    valid = np.ones(positions.shape, bool) if valid is None else np.asarray(valid)
    if valid.any() and moved[valid].min() < 0:
      raise ValueError(f"delta={np.asarray(delta).tolist()} moves position {int(positions[valid].min())} below "
                       f"zero.")


def rerotate_keys(keys, positions, delta, *, rope_theta: float):
  """Keys [B, T, H, D] RoPE'd at `positions` [B, T] -> the same keys RoPE'd at positions + delta.

  delta: an int or an int array broadcastable to positions. Concrete inputs that move a position below zero are
  a ValueError naming `delta` (traced ones cannot be checked)."""
  if keys.ndim != 4 or keys.shape[-1] % 2:
    raise ValueError(f"keys must be [B, T, H, D] with even D, got {keys.shape}.")
  if positions.shape != keys.shape[:2]:
    raise ValueError(f"positions must be [B, T] = {keys.shape[:2]}, got {positions.shape}.")
  _check_delta(positions, delta)
  shift = jnp.broadcast_to(jnp.asarray(delta, jnp.int32), positions.shape)
  return core.rope(keys, shift, rope_theta)  # R(delta): RoPE at the offset itself


def _rotate_where(keys, move, delta, rope_theta):
  """keys [B, S, Hk, D]; rotate by delta where move [B, S] or [B, S, Hk]."""
  batch, slots, heads, dim = keys.shape
  rotated = core.rope(keys.astype(jnp.float32),
                      jnp.full((batch, slots), delta, jnp.int32), rope_theta).astype(keys.dtype)
  move = move if move.ndim == 3 else move[:, :, None]
  return jnp.where(move[..., None], rotated, keys)


def rerotate_cache(cache: dict, delta: int, *, rope_theta: float, start: int, rotate: bool = True) -> dict:
  """A model cache ({"index", "positions", "layers"}) in which every token at position >= `start` has moved by
  `delta` positions, its key re-rotated by R(delta).

  Contiguous float caches (`FloatKVCache`, slot == position): those slots also move by delta slots, so the cache
  stays contiguous; delta > 0 leaves the slots [start, start + delta) empty (EMPTY_POSITION) for the inserted
  tokens, delta < 0 overwrites the deleted tokens' slots [start + delta, start); `index` moves by delta.
  Budgeted caches (per-head positions): positions shift in place, tokens at [start + delta, start) are deleted
  (delta < 0), keys are decoded, rotated and re-encoded (int8/int4 storage re-quantizes the moved keys).
  Per-channel quantized caches (kv_format 'int8'/'int4', keys quantized over groups of slots) are refused: a
  rotation mixes channel pairs, and a moved slot changes group."""
  if not isinstance(delta, (int, np.integer)) or isinstance(delta, bool):
    raise ValueError(f"delta={delta!r} must be a Python int (the shift moves slots).")
  if not isinstance(start, (int, np.integer)) or start < 0:
    raise ValueError(f"start={start!r} must be an int >= 0.")
  delta, start = int(delta), int(start)
  positions = cache["positions"]
  valid = positions != EMPTY_POSITION
  if _is_concrete(positions):
    moved = np.asarray(valid) & (np.asarray(positions) >= start)
    _check_delta(np.asarray(positions), delta, moved)
  if delta == 0:
    return cache
  kinds = {type(layer) for layer in cache["layers"]}
  if kinds <= {budget_lib.BudgetedKVCache}:
    return _rerotate_budgeted(cache, delta, rope_theta=rope_theta, start=start, rotate=rotate)
  if not kinds <= {cache_lib.FloatKVCache}:
    names = sorted(kind.__name__ for kind in kinds - {cache_lib.FloatKVCache, budget_lib.BudgetedKVCache})
    raise ValueError(f"cache: rerotate_cache handles FloatKVCache and BudgetedKVCache layers, not {names} "
                     f"(per-channel quantized keys cannot be rotated slot by slot; re-encode the prompt).")
  max_len = positions.shape[1]
  slots = jnp.arange(max_len)
  moving = valid & (positions >= start)  # [B, S]
  if _is_concrete(positions) and np.asarray(moving).any():
    last = int(np.asarray(jnp.where(moving, slots, -1)).max())
    if last + delta >= max_len:
      raise ValueError(f"delta={delta} moves slot {last} past the cache's {max_len} slots.")
  # Destination slot of each moved slot: slot + delta; kept slots stay (deleted ones are overwritten / emptied).
  source = slots - delta  # the slot whose content lands in each slot
  in_range = (source >= 0) & (source < max_len)
  src = jnp.clip(source, 0, max_len - 1)
  lands = in_range[None, :] & jnp.take(moving, src, axis=1)  # [B, S]: slot receives a moved token
  stays = valid & ~moving & (positions < start + min(delta, 0))  # untouched tokens (not deleted)
  new_positions = jnp.where(lands, jnp.take(positions, src, axis=1) + delta,
                            jnp.where(stays, positions, EMPTY_POSITION))
  layers = []
  for layer in cache["layers"]:
    moved_k = jnp.take(layer.k, src, axis=1)
    if rotate:
      moved_k = _rotate_where(moved_k, lands, delta, rope_theta)
    k = jnp.where(lands[..., None, None], moved_k, jnp.where(stays[..., None, None], layer.k, 0))
    v = jnp.where(lands[..., None, None], jnp.take(layer.v, src, axis=1),
                  jnp.where(stays[..., None, None], layer.v, 0))
    layers.append(cache_lib.FloatKVCache(k=k.astype(layer.k.dtype), v=v.astype(layer.v.dtype)))
  return {**cache, "index": cache["index"] + delta, "positions": new_positions, "layers": layers}


def _rerotate_budgeted(cache, delta, *, rope_theta, start, rotate):
  layers = []
  for layer in cache["layers"]:
    valid = layer.positions != EMPTY_POSITION
    moving = valid & (layer.positions >= start)
    deleted = valid & ~moving & (layer.positions >= start + min(delta, 0))
    keys, values = layer.keys_values(jnp.float32)
    keys = _rotate_where(keys, moving & rotate, delta, rope_theta)
    stored = layer.token_format.encode(keys, values, jnp.dtype(layer.dtype))
    keep_codes = ~moving  # unmoved slots keep their exact codes
    pick = lambda new, old: jnp.where(keep_codes.reshape(keep_codes.shape + (1,) * (old.ndim - 3)), old,
                                      new.astype(old.dtype))
    stored = jax.tree.map(pick, stored, layer.stored)
    for name in [n for n in stored if n.startswith("v")]:
      stored[name] = layer.stored[name]  # values carry no position: their codes stay as they were
    positions = jnp.where(deleted, EMPTY_POSITION, jnp.where(moving, layer.positions + delta, layer.positions))
    layers.append(layer.replace_slots(
        stored=stored, positions=positions, scores=jnp.where(deleted, 0.0, layer.scores),
        counts=jnp.where(deleted, 0.0, layer.counts)))
  positions = cache["positions"]
  shifted = jnp.where((positions != EMPTY_POSITION) & (positions >= start), positions + delta, positions)
  return {**cache, "index": cache["index"] + delta, "positions": shifted, "layers": layers}
