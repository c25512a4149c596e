"""Quantized KV cache (KIVI-style): int8 or packed int4 keys per channel, values per token, in the decode path.

Scheme (chosen after KIVI; Cache-Me-If-You-Must / C11 in the seed digest call for per-channel K, per-token V):

  K   asymmetric RTN per channel (one scale + zero point per kv head and head_dim channel) over fixed groups of
      `group_size` consecutive cache slots (default 32). Key channels carry outliers that a per-token scale would
      spread over the whole token; per-channel statistics need several tokens, so a group is quantized once its
      last token has arrived. Until then its keys stay in float in `k_residual` (KIVI's full-precision residual;
      at most `group_size - 1` tokens), and attention reads them from there.
  V   asymmetric RTN per token and kv head (one scale + zero point over head_dim), quantized as it is written.

Asymmetric (a zero point per scale, codes 0 .. 2^b-1, the range spanning [min(x, 0), max(x, 0)]) rather than
symmetric because it spends all 2^b levels (16 rather than 15 at 4 bits) and up to twice the resolution on a
channel whose values sit on one side of zero. K and V are stored as `efficient.quant.QArray`s, made by the same
`quantize` (f32 scales, uint8 zero points) and read by the same `dequantize` as a quantized weight; int4 codes are
packed two per byte (`pallas_kernels.packing`, planar) along the axis each scale spans -- K along the tokens of a
group, V along head_dim -- so a group or a token is written without touching its neighbours.

Attention semantics (the same in the cache and in `simulated_attention_fn`): a query at slot t sees a key at slot s
as stored quantized when the key's group is complete at t ((s // G + 1) * G <= t + 1), and as its float value
otherwise (only keys of t's own, still open group). So token-by-token decoding, a chunked prefill and the
simulated full forward (for perplexity) compute the same function.

Cache layout of one softmax layer: a `QuantizedKVCache` (a pytree that jit/scan carry), the storage codec that
`efficient.attention.cache` knows as kv_format 'int8' / 'int4' (registered on import). The keys are a QArray of the
grouped view [B, S/G, G, Hkv, D] quantized along axis 2 (the group's tokens), the values a QArray of [B, S, Hkv, D]
along axis 3 (head_dim). `LOGICAL_AXES` names the axes (`efficient.sharding` names),
`QuantizedKVCache.logical_axes()` those of every stored array, and `layer_cache_shardings` places a cache on a mesh:
  k           QArray  qvalue      uint8 [B, S/G, G*bits/8, Hkv, D]  (batch, length, None (packed), kv_heads, head_dim)
                      scale       f32   [B, S/G, 1, Hkv, D]         (batch, length, None, kv_heads, head_dim)
                      zero_point  uint8 [B, S/G, 1, Hkv, D]         (batch, length, None, kv_heads, head_dim)
  k_residual  float   [B, G, Hkv, D]                                (batch, None (open group), kv_heads, head_dim)
  v           QArray  qvalue      uint8 [B, S, Hkv, D*bits/8]       (batch, length, kv_heads, None (packed))
                      scale       f32   [B, S, Hkv, 1]              (batch, length, kv_heads, None)
                      zero_point  uint8 [B, S, Hkv, 1]              (batch, length, kv_heads, None)
S/G is rounded up. The format and group size are the QArrays' metadata (`layer_format`).

A model never looks at this layout: it makes a layer cache with `efficient.attention.cache.make_layer_cache(
kv_format, ...)` (or `init_layer_cache` here) and calls `layer_cache.update_and_attend(q, k, v, ...)`, the
interface every KV cache has.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from efficient import sharding
from efficient.attention import cache as cache_lib
from efficient.attention import flash
from efficient.attention.core import attend_with_logits, attention_mask, gqa_logits
from efficient.quant import formats
from efficient.quant import qarray as qa
from pallas_kernels import packing
from pallas_kernels import quant_decode as quant_decode_op

KV_FORMATS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32  # KIVI's group size for per-channel keys
# Logical axis names of each entry of a layer cache: of the QArrays' (unpacked) values and of the residual.
LOGICAL_AXES = {
    "k": ("batch", "length", None, "kv_heads", "head_dim"),
    "k_residual": ("batch", None, "kv_heads", "head_dim"),
    "v": ("batch", "length", "kv_heads", "head_dim"),
}
_KEY_AXIS, _VALUE_AXIS = 2, 3  # the axis each scale spans (and codes are packed along)
# The one storage rule of the cache: asymmetric RTN, one f32 scale + uint8 zero point per slice along the axis.
_STORAGE = dict(symmetric=False, scale_dtype=jnp.float32)


def check_format(kv_format, head_dim: int, group_size) -> None:
  """ValueError naming the argument unless (kv_format, head_dim, kv_group_size) describe a storable cache."""
  if kv_format not in KV_FORMATS:
    raise ValueError(f"kv_format={kv_format!r} is not a KV-cache format; choose None or one of {KV_FORMATS}.")
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"kv_group_size={group_size!r} must be a positive int.")
  bits = formats.get(kv_format).bits
  packing.check_packable(head_dim, bits, name="head_dim")
  packing.check_packable(group_size, bits, name="kv_group_size")


def _quantize_kv(x, axis: int, kv_format: str, logical_axes) -> qa.QArray:
  return qa.quantize(x, kv_format, axis=axis, logical_axes=logical_axes, **_STORAGE)


@struct.dataclass
class QuantizedKVCache:
  """A softmax layer's KV cache stored quantized (layout in the module docstring); `efficient.attention.cache`'s
  interface: `update_and_attend(q, k, v, ...) -> (out, new cache)`."""
  k: qa.QArray
  k_residual: jax.Array
  v: qa.QArray

  def logical_axes(self) -> "QuantizedKVCache":
    """The same structure with each stored array's logical axis names (a tuple) in its place."""
    names = lambda q: q.replace(**q.array_logical_axes())
    return QuantizedKVCache(k=names(self.k), k_residual=LOGICAL_AXES["k_residual"], v=names(self.v))

  def update_and_attend(self, q, k, v, *, index, q_positions, kv_positions, q_segment_ids=None,
                        kv_segment_ids=None, kv_lengths=None, attention_fn=None):
    """`update_and_attend(self, ...)`: this cache attends with its own two-view softmax (quantized complete
    groups, float open group), so the model's `attention_fn` is unused. A one-token step with `kv_lengths` (slots
    [0, length) are exactly what each row sees, no segments) reads the cache in place through
    `pallas_kernels.quant_decode` (`decode`); anything else takes the masked path over every slot."""
    del attention_fn
    if q.shape[1] == 1 and kv_lengths is not None and kv_segment_ids is None:
      new_cache = write(self, k, v, index=index)
      return decode(new_cache, q[:, 0], kv_lengths)[:, None], new_cache
    return update_and_attend(self, q, k, v, index=index, q_positions=q_positions, kv_positions=kv_positions,
                             q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)


def init_layer_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, kv_format: str,
                     group_size: int | None = DEFAULT_GROUP_SIZE, dtype=jnp.float32) -> QuantizedKVCache:
  """An empty quantized cache of one softmax layer (layout in the module docstring); `dtype` is the float type
  of the open group's keys; group_size None: `DEFAULT_GROUP_SIZE`."""
  group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
  check_format(kv_format, head_dim, group_size)
  num_groups = -(-max_len // group_size)
  kv_kwargs = dict(_STORAGE, dtype=dtype)  # laid out as _quantize_kv lays out what is written into it
  return QuantizedKVCache(
      k=qa.zeros((batch, num_groups, group_size, num_kv_heads, head_dim), kv_format, axis=_KEY_AXIS,
                 logical_axes=LOGICAL_AXES["k"], **kv_kwargs),
      k_residual=jnp.zeros((batch, group_size, num_kv_heads, head_dim), dtype),
      v=qa.zeros((batch, max_len, num_kv_heads, head_dim), kv_format, axis=_VALUE_AXIS,
                 logical_axes=LOGICAL_AXES["v"], **kv_kwargs))


for _format in KV_FORMATS:  # kv_format='int8' / 'int4' in efficient.attention.cache.make_layer_cache
  cache_lib.register_kv_format(_format, functools.partial(init_layer_cache, kv_format=_format))


@struct.dataclass
class QuantizedTokens:
  """Per-token storage (`efficient.attention.cache.TokenFormat`) for paged and budgeted caches: K and V both
  asymmetric RTN per token and kv head over head_dim (one f32 scale + uint8 zero point), codes packed along
  head_dim -> {"k", "k_scale", "k_zero", "v", "v_scale", "v_zero"}, every array [..., Hkv, last]."""
  name: str = struct.field(pytree_node=False)
  bits: int = struct.field(pytree_node=False)

  def encode(self, k, v, dtype=None):
    del dtype  # codes and f32 scales whatever the compute dtype
    fmt = formats.get(self.name)
    packing.check_packable(k.shape[-1], fmt.bits, name="head_dim")
    stored = {}
    for name, x in (("k", k), ("v", v)):
      codes, scale, zero = formats.quantize_int(x.astype(jnp.float32), fmt, x.shape[-1], False, False,
                                                jnp.float32, x.ndim - 1)
      stored.update({name: codes, f"{name}_scale": scale, f"{name}_zero": zero})
    return stored

  def decode(self, stored, dtype):
    fmt = formats.get(self.name)
    def one(name):
      codes = stored[name]
      shape = (*codes.shape[:-1], codes.shape[-1] * 8 // fmt.bits)
      return formats.dequantize_int(codes, stored[f"{name}_scale"], stored[f"{name}_zero"], fmt, shape,
                                    len(shape) - 1).astype(dtype)
    return one("k"), one("v")


for _format in KV_FORMATS:  # storage='int8' / 'int4' of paged and budgeted caches
  cache_lib.register_token_format(QuantizedTokens(name=_format, bits=formats.get(_format).bits))


def layer_cache_shardings(layer_cache: QuantizedKVCache, mesh, rules) -> QuantizedKVCache:
  """NamedShardings of a quantized layer cache (the same pytree structure) from the logical axis names of every
  stored array under sharding `rules` (a preset name or rules); a dimension its mesh axis does not divide stays
  replicated."""
  rules = sharding.rules_for(rules)
  place = lambda names, leaf: NamedSharding(mesh, sharding.logical_to_spec(names, rules, shape=leaf.shape,
                                                                           mesh=mesh))
  return jax.tree.map(place, layer_cache.logical_axes(), layer_cache, is_leaf=lambda x: isinstance(x, tuple))


def layer_format(layer_cache: QuantizedKVCache) -> tuple[str, int]:
  """(kv_format, group_size) of a quantized layer cache."""
  return layer_cache.k.fmt, layer_cache.k.shape[_KEY_AXIS]


# --- keys per channel over groups of slots, values per token --------------------------------------------------

def quantize_keys(keys, group_size: int, kv_format: str) -> qa.QArray:
  """keys [B, n*G, Hkv, D] -> a QArray of the grouped view [B, n, G, Hkv, D], one scale per channel per group."""
  batch, length = keys.shape[:2]
  grouped = keys.reshape(batch, length // group_size, group_size, *keys.shape[2:])
  return _quantize_kv(grouped, _KEY_AXIS, kv_format, LOGICAL_AXES["k"])


def dequantize_keys(q: qa.QArray, dtype=jnp.float32):
  """Inverse of `quantize_keys` -> [B, n*G, Hkv, D]."""
  grouped = qa.dequantize(q, dtype)
  return grouped.reshape(grouped.shape[0], -1, *grouped.shape[3:])


def quantize_values(values, kv_format: str) -> qa.QArray:
  """values [B, T, Hkv, D] -> a QArray with one scale per token and kv head (scale [B, T, Hkv, 1])."""
  return _quantize_kv(values, _VALUE_AXIS, kv_format, LOGICAL_AXES["v"])


def dequantize_values(q: qa.QArray, dtype=jnp.float32):
  return qa.dequantize(q, dtype)


def _write(stored: qa.QArray, new: qa.QArray, write) -> qa.QArray:
  """`stored` with `write(stored_array, new_array)` applied to each of its arrays (codes, scales, zero points)."""
  return stored.replace(**{field: write(getattr(stored, field), getattr(new, field)) for field in qa.ARRAY_FIELDS
                           if getattr(stored, field) is not None})


# --- attention over the two views ---------------------------------------------------------------------------------

def group_complete(q_slots, kv_slots, group_size: int):
  """[T, S] bool: the key at slot s belongs to a group whose last slot is <= the query's slot."""
  return (kv_slots[None, :] // group_size + 1) * group_size <= q_slots[:, None] + 1


def attend(q, k_quantized, k_float, v, *, q_slots, group_size: int, q_positions, kv_positions, q_segment_ids=None,
           kv_segment_ids=None):
  """GQA softmax attention (f32 logits) whose key at slot s is `k_quantized[s]` for queries that see its group
  complete and `k_float[s]` otherwise; masks as `efficient.attention.core.attention_mask` (positions, segments)."""
  complete = group_complete(q_slots, jnp.arange(k_quantized.shape[1]), group_size)
  logits = jnp.where(complete, gqa_logits(q, k_quantized.astype(q.dtype)), gqa_logits(q, k_float.astype(q.dtype)))
  mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  return attend_with_logits(logits, v.astype(q.dtype), mask, q.dtype)


def _write_window(layer_cache: QuantizedKVCache, k, v, index):
  """Writes the new k/v [B, T, Hkv, D] at cache slot `index`, quantizing every group the write completes ->
  (new layer cache, the float keys of the written window, the window's first slot)."""
  kv_format, group_size = layer_format(layer_cache)
  residual = layer_cache.k_residual
  batch, new_len = k.shape[:2]
  # The float keys of slots [group_start, group_start + window_len): the open group, then the new keys. Every
  # group of the window is (re)quantized and written; groups the write leaves open are rewritten later from the
  # residual, so only complete groups' codes are ever read as quantized.
  group_start = (index // group_size) * group_size
  window_groups = -(-(new_len + group_size - 1) // group_size) + 1
  window = jnp.zeros((batch, window_groups * group_size, *residual.shape[2:]), residual.dtype)
  window = window.at[:, :group_size].set(residual)
  window = jax.lax.dynamic_update_slice_in_dim(window, k.astype(residual.dtype), index - group_start, axis=1)
  groups = group_start // group_size + jnp.arange(window_groups)
  end = index + new_len
  new_cache = QuantizedKVCache(
      k=_write(layer_cache.k, quantize_keys(window, group_size, kv_format),
               lambda stored, new: stored.at[:, groups].set(new, mode="drop")),
      k_residual=jax.lax.dynamic_slice_in_dim(window, (end // group_size) * group_size - group_start,
                                              group_size, axis=1),
      v=_write(layer_cache.v, quantize_values(v, kv_format),
               lambda stored, new: jax.lax.dynamic_update_slice_in_dim(stored, new, index, axis=1)))
  return new_cache, window, group_start


def write(layer_cache: QuantizedKVCache, k, v, *, index) -> QuantizedKVCache:
  """The layer cache with the new k/v [B, T, Hkv, D] written at slot `index` (see `update_and_attend`)."""
  return _write_window(layer_cache, k, v, index)[0]


def update_and_attend(layer_cache: QuantizedKVCache, q, k, v, *, index, q_positions, kv_positions, q_segment_ids=None,
                      kv_segment_ids=None):
  """Writes the new k/v [B, T, Hkv, D] at cache slot `index` (quantizing every group the write completes) and
  attends q over the cache -> (out [B, T, H, D], new layer cache). kv_positions [B, S] cover the S slots.
  This is the general (masked, every slot dequantized) path; one-token steps over slots [0, length) go through
  `decode`."""
  _, group_size = layer_format(layer_cache)
  new_len = k.shape[1]
  max_len = kv_positions.shape[1]
  new_cache, window, group_start = _write_window(layer_cache, k, v, index)
  k_quantized = dequantize_keys(new_cache.k, q.dtype)[:, :max_len]
  k_float = k_quantized.at[:, group_start + jnp.arange(window.shape[1])].set(window.astype(q.dtype), mode="drop")
  v_view = dequantize_values(new_cache.v, q.dtype)
  out = attend(q, k_quantized, k_float, v_view, q_slots=index + jnp.arange(new_len), group_size=group_size,
               q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
               kv_segment_ids=kv_segment_ids)
  return out, new_cache


def decode(layer_cache: QuantizedKVCache, q, lengths, *, implementation=None, return_key_logits=False):
  """One query step q [B, H, D] over slots [0, lengths[b]) of a (written) layer cache through
  `pallas_kernels.quant_decode` -> [B, H, D] (or (out, logits [B, H, S], lse [B, H]) with return_key_logits):
  complete groups read quantized in place (the kernel on TPU/GPU, the chunked XLA loop on CPU), never the whole
  cache dequantized.

  Under a mesh (`jax.set_mesh`) it runs inside `jax.shard_map` per (batch row, kv head) shard, as
  `efficient.attention.flash.decode` does (`activation_spec`: batch over the data-like axes, heads over `tensor`
  when it divides both head counts): a Pallas call is opaque to GSPMD. The cache's arrays are resharded to that
  spec if `layer_cache_shardings` placed them differently (the same placement under the shipped presets)."""
  kv_format, _ = layer_format(layer_cache)
  bits = formats.get(kv_format).bits
  arrays = quant_decode_op.cache_arrays(layer_cache)

  def local(q, lengths, *arrays):
    return quant_decode_op.quant_decode(q, *arrays, lengths, bits=bits, implementation=implementation,
                                        return_key_logits=return_key_logits)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q, lengths, *arrays)
  batch, heads, head_dim = q.shape
  spec = flash.activation_spec(mesh, (batch, 1, heads, head_dim), layer_cache.k_residual.shape)
  batch_axes, head_axes = spec[0], spec[2]
  q_spec = PartitionSpec(batch_axes, head_axes, None)
  k_spec = PartitionSpec(batch_axes, None, None, head_axes, None)   # codes, scales, zeros [B, n, *, Hkv, D]
  kv_spec = PartitionSpec(batch_axes, None, head_axes, None)        # residual and V arrays [B, *, Hkv, *]
  out_specs = (q_spec, PartitionSpec(batch_axes, head_axes, None), PartitionSpec(batch_axes, head_axes)) \
      if return_key_logits else q_spec
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, PartitionSpec(batch_axes), k_spec, k_spec, k_spec,
                                                   kv_spec, kv_spec, kv_spec, kv_spec),
                       out_specs=out_specs, check_vma=False)(q, lengths, *arrays)


def simulated_attention_fn(kv_format: str, group_size: int = DEFAULT_GROUP_SIZE, key_granularity: str = "channel"):
  """An `AttentionFn` (`efficient.attention.core.AttentionFn`) for full forwards without a cache: k/v are
  quantize->dequantized exactly as the cache stores them (slot = index along the sequence) and attended as
  `update_and_attend` does, so
  `Llama(config, attention_fn=simulated_attention_fn('int4'))` gives a quantized-KV model's perplexity in one
  forward (equal to decoding token by token with `init_cache(..., kv_format='int4')`).

  key_granularity='token' is an ablation with no cache behind it: K quantized per token (as V), every key
  quantized as soon as it is written (no float open group)."""
  check_format(kv_format, 2, group_size)  # head_dim is checked on the first call
  if key_granularity not in ("channel", "token"):
    raise ValueError(f"key_granularity={key_granularity!r} must be 'channel' or 'token'.")

  def attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None):
    check_format(kv_format, k.shape[-1], group_size)
    length = k.shape[1]
    if q.shape[1] != length:
      raise ValueError(f"q: simulated_attention_fn runs full forwards (q and k of one length); got q length "
                       f"{q.shape[1]} vs k length {length}. Decode with init_cache(..., kv_format=...).")
    v_view = dequantize_values(quantize_values(v, kv_format), q.dtype)
    if key_granularity == "token":  # groups of one slot: every key is complete, hence quantized, once written
      k_quantized, key_group = dequantize_values(quantize_values(k, kv_format), q.dtype), 1
    else:
      padded = jnp.pad(k, ((0, 0), (0, -length % group_size), (0, 0), (0, 0)))  # the open tail group is never read
      k_quantized = dequantize_keys(quantize_keys(padded, group_size, kv_format), q.dtype)[:, :length]
      key_group = group_size
    return attend(q, k_quantized, k, v_view, q_slots=jnp.arange(length), group_size=key_group,
                  q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                  kv_segment_ids=kv_segment_ids)

  return attention


def cache_nbytes(cache) -> int:
  """Bytes of the k/v storage of every layer of a model cache (positions/index excluded), as stored: every array
  of a KV cache object (float k/v; or codes, scales, zero points and open-group keys), the "k"/"v" of a mixer's
  dict state (a window's ring buffer). Works on `jax.eval_shape` output too."""
  def storage(layer):
    if isinstance(layer, dict):
      return [leaf for name in ("k", "v") if name in layer for leaf in jax.tree.leaves(layer[name])]
    return jax.tree.leaves(layer)
  return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for layer in cache["layers"] for leaf in storage(layer))
