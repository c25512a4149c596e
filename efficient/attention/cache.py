"""The KV cache of a softmax layer: one interface, storage codecs behind it.

A layer cache is a pytree object with

    update_and_attend(q, k, v, *, index, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                      kv_lengths, attention_fn) -> (out [B, T, H, D], new layer cache)

which writes the new k/v [B, T, H_kv, D] at slot `index`, then attends q over its slots; `kv_positions` [B, S]
(and `kv_segment_ids`) describe every slot after the write. `kv_lengths` [B] is given when slots [0, length)
are exactly the keys each sequence sees (plain left-to-right decoding, no segments): a one-token step can then
read the cache through `pallas_kernels.flash_decode` instead of masking all S slots.

Storage is a codec, chosen when the cache is made (`make_layer_cache(kv_format, ...)`): by name, 'float'
(`FloatKVCache`, here) and whatever else registers itself with `register_kv_format` (`efficient.quant.kv_cache`
registers 'int8' and 'int4'); or by a `KVFormat` object, a frozen (hashable, so it can be a static jit
argument) description with its own options whose `create(batch, max_len, num_kv_heads, head_dim, *, dtype,
group_size)` returns the layer cache (paged and budgeted caches are made this way). A model calls the interface
and never looks at the storage.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct

from efficient.attention import core, flash

# Logical axis names of a float cache's k and v.
KV_AXES = ("batch", "length", "kv_heads", "head_dim")


@struct.dataclass
class FloatKVCache:
  """k, v [B, S, H_kv, D] in the cache dtype."""
  k: jax.Array
  v: jax.Array
  # Moving the model cache's index back is a complete rollback (speculative decoding): slots past it are
  # overwritten before any query reads them. Caches without this attribute must be re-fed instead.
  rollback_safe = True

  @classmethod
  def create(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, dtype=jnp.float32,
             **unused) -> "FloatKVCache":
    if unused.get("group_size") is not None:
      raise ValueError("kv_group_size applies to quantized caches only (kv_format='int8'/'int4').")
    shape = (batch, max_len, num_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  def logical_axes(self) -> "FloatKVCache":
    return FloatKVCache(k=KV_AXES, v=KV_AXES)

  def update_and_attend(self, q, k, v, *, index, q_positions, kv_positions, q_segment_ids=None,
                        kv_segment_ids=None, kv_lengths=None, attention_fn=None):
    keys = jax.lax.dynamic_update_slice_in_dim(self.k, k.astype(self.k.dtype), index, axis=1)
    values = jax.lax.dynamic_update_slice_in_dim(self.v, v.astype(self.v.dtype), index, axis=1)
    new = FloatKVCache(k=keys, v=values)
    keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    if q.shape[1] == 1 and kv_lengths is not None and kv_segment_ids is None:
      return flash.decode(q[:, 0], keys, values, kv_lengths)[:, None], new
    attend = attention_fn or core.softmax_attention
    return attend(q, keys, values, q_positions=q_positions, kv_positions=kv_positions,
                  q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids), new


@runtime_checkable
class KVFormat(Protocol):
  """A KV-cache storage described by an object (e.g. a paged or budgeted cache with its options): frozen and
  hashable; `name` says what it is in results and errors."""
  name: str

  def create(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, dtype, group_size): ...


_KV_FORMATS: dict[str, Callable] = {"float": FloatKVCache.create}


def register_kv_format(name: str, create: Callable) -> None:
  """Registers a storage codec: `create(batch, max_len, num_kv_heads, head_dim, *, dtype, group_size)` returns a
  layer cache with `update_and_attend` (see the module docstring)."""
  _KV_FORMATS[name] = create


def kv_formats() -> tuple[str, ...]:
  return tuple(_KV_FORMATS)


def make_layer_cache(kv_format: "str | KVFormat | None", batch: int, max_len: int, num_kv_heads: int,
                     head_dim: int, *, dtype=jnp.float32, group_size: int | None = None):
  """An empty layer cache of `kv_format` (None: 'float'; a registered name; or a `KVFormat` object)."""
  if kv_format is not None and not isinstance(kv_format, str):
    if not isinstance(kv_format, KVFormat):
      raise ValueError(f"kv_format={kv_format!r} must be None, a registered name {kv_formats()} or a KVFormat "
                       f"object (with .name and .create(...)).")
    return kv_format.create(batch, max_len, num_kv_heads, head_dim, dtype=dtype, group_size=group_size)
  name = "float" if kv_format is None else kv_format
  if name not in _KV_FORMATS:
    raise ValueError(f"kv_format={kv_format!r} is not a registered KV-cache format; choose None or one of "
                     f"{kv_formats()} (quantized formats register when efficient.quant.kv_cache is imported).")
  return _KV_FORMATS[name](batch, max_len, num_kv_heads, head_dim, dtype=dtype, group_size=group_size)


# --- per-token storage: what caches that move or drop single slots (paged, budgeted) store ---------------------
# A token format encodes k, v [..., Hkv, D] into a dict of arrays that all share every leading axis of k
# ([..., Hkv]) and differ only in the last one, so gathering, scattering or paging slots is one `jax.tree.map`
# over the leading axes whatever the format. 'float' keeps k/v as they are (in the cache dtype); the quantized
# formats ('int8', 'int4': asymmetric RTN per token and kv head for both K and V, codes packed along head_dim)
# register from `efficient.quant.kv_cache`. Per-channel K (KIVI) needs groups of consecutive slots, which a slot
# that can be evicted or paged on its own does not have: that scheme stays in the contiguous quantized cache.


class TokenFormat(Protocol):
  """encode(k, v, dtype) -> dict of arrays; decode(stored, dtype) -> (k, v); `bits` (None for float)."""
  name: str
  bits: int | None

  def encode(self, k, v, dtype) -> dict: ...

  def decode(self, stored: dict, dtype) -> tuple: ...


@struct.dataclass
class FloatTokens:
  name: str = struct.field(pytree_node=False, default="float")
  bits: int | None = struct.field(pytree_node=False, default=None)

  def encode(self, k, v, dtype):
    return {"k": k.astype(dtype), "v": v.astype(dtype)}

  def decode(self, stored, dtype):
    return stored["k"].astype(dtype), stored["v"].astype(dtype)


_TOKEN_FORMATS: dict[str, TokenFormat] = {"float": FloatTokens()}


def register_token_format(fmt: TokenFormat) -> None:
  _TOKEN_FORMATS[fmt.name] = fmt


def token_format(name: str | None, *, argument: str = "storage") -> TokenFormat:
  """The per-token storage format `name` (None: 'float'); a ValueError naming `argument` if unknown."""
  name = "float" if name is None else name
  if name not in _TOKEN_FORMATS:
    raise ValueError(f"{argument}={name!r} is not a per-token KV storage format; choose one of "
                     f"{tuple(_TOKEN_FORMATS)} (quantized formats register when efficient.quant.kv_cache is "
                     f"imported).")
  return _TOKEN_FORMATS[name]


def empty_tokens(fmt: TokenFormat, shape, dtype) -> dict:
  """Zeroed storage of `fmt` for k/v of `shape` [..., Hkv, D], laid out as `fmt.encode` lays them out."""
  abstract = jax.eval_shape(lambda x: fmt.encode(x, x, dtype), jax.ShapeDtypeStruct(tuple(shape), dtype))
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
