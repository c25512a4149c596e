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
channel whose values sit on one side of zero. The math is `efficient.quant.formats.quantize_int` /
`dequantize_int` (the QArray formats, f32 scales, uint8 zero points); int4 codes are packed two per byte with
`pallas_kernels._packing` (planar): K along the tokens of a group, V along head_dim, each along the axis its
scale spans, so a group or a token is written without touching its neighbours.

Attention semantics (the same in the cache and in `simulated_attention_fn`): a query at slot t sees a key at slot s
as stored quantized when the key's group is complete at t ((s // G + 1) * G <= t + 1), and as its float value
otherwise (only keys of t's own, still open group). So token-by-token decoding, a chunked prefill and the
simulated full forward (for perplexity) compute the same function.

Cache layout of one softmax layer (a dict of arrays: a pytree that jit/scan carry); `LOGICAL_AXES` names the axes
(`efficient.sharding` names; `layer_cache_shardings` places a cache on a mesh):
  k_codes     uint8 [B, S/G, G*bits/8, Hkv, D]   (batch, length groups, group tokens (packed), kv_heads, head_dim)
  k_scale     f32   [B, S/G, Hkv, D]             (batch, length groups, kv_heads, head_dim)
  k_zero      uint8 [B, S/G, Hkv, D]             (batch, length groups, kv_heads, head_dim)
  k_residual  float [B, G, Hkv, D]               (batch, open-group tokens, kv_heads, head_dim)
  v_codes     uint8 [B, S, Hkv, D*bits/8]        (batch, length, kv_heads, head_dim (packed))
  v_scale     f32   [B, S, Hkv]                  (batch, length, kv_heads)
  v_zero      uint8 [B, S, Hkv]                  (batch, length, kv_heads)
S/G is rounded up. The format is recovered from the shapes (bits = 8 * packed group rows / G).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from efficient import sharding
from efficient.quant import formats
from pallas_kernels import _packing

KV_FORMATS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32  # KIVI's group size for per-channel keys
# Logical axis names of each array of a layer cache (None: an axis no rule splits, e.g. packed tokens/channels).
_GROUPED = ("batch", "length", "kv_heads", "head_dim")
_PER_TOKEN = ("batch", "length", "kv_heads")
LOGICAL_AXES = {
    "k_codes": ("batch", "length", None, "kv_heads", "head_dim"), "k_scale": _GROUPED, "k_zero": _GROUPED,
    "k_residual": ("batch", None, "kv_heads", "head_dim"),
    "v_codes": ("batch", "length", "kv_heads", None), "v_scale": _PER_TOKEN, "v_zero": _PER_TOKEN,
}
_LAYER_KEYS = tuple(LOGICAL_AXES)


def check_format(kv_format, head_dim: int, group_size) -> None:
  """ValueError naming the argument unless (kv_format, head_dim, kv_group_size) describe a storable cache."""
  if kv_format not in KV_FORMATS:
    raise ValueError(f"kv_format={kv_format!r} is not a KV-cache format; choose None or one of {KV_FORMATS}.")
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"kv_group_size={group_size!r} must be a positive int.")
  bits = formats.get(kv_format).bits
  _packing.check_packable(head_dim, bits, name="head_dim")
  _packing.check_packable(group_size, bits, name="kv_group_size")


def is_quantized(layer_cache) -> bool:
  return isinstance(layer_cache, dict) and "k_codes" in layer_cache


def init_layer_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, kv_format: str,
                     group_size: int = DEFAULT_GROUP_SIZE, dtype=jnp.float32) -> dict:
  """An empty quantized cache of one softmax layer (layout in the module docstring); `dtype` is the float type
  of the open group's keys."""
  check_format(kv_format, head_dim, group_size)
  bits = formats.get(kv_format).bits
  num_groups = -(-max_len // group_size)
  group_shape = (batch, num_groups, num_kv_heads, head_dim)
  token_shape = (batch, max_len, num_kv_heads)
  return {
      "k_codes": jnp.zeros((batch, num_groups, group_size * bits // 8, num_kv_heads, head_dim), jnp.uint8),
      "k_scale": jnp.zeros(group_shape, jnp.float32),
      "k_zero": jnp.zeros(group_shape, jnp.uint8),
      "k_residual": jnp.zeros((batch, group_size, num_kv_heads, head_dim), dtype),
      "v_codes": jnp.zeros((*token_shape, head_dim * bits // 8), jnp.uint8),
      "v_scale": jnp.zeros(token_shape, jnp.float32),
      "v_zero": jnp.zeros(token_shape, jnp.uint8),
  }


def layer_cache_shardings(layer_cache: dict, mesh, rules) -> dict:
  """NamedShardings of a quantized layer cache from `LOGICAL_AXES` under sharding `rules` (a preset name or
  rules); a dimension its mesh axis does not divide stays replicated."""
  rules = sharding.rules_for(rules)
  return {name: NamedSharding(mesh, sharding.logical_to_spec(LOGICAL_AXES[name], rules, shape=leaf.shape,
                                                             mesh=mesh))
          for name, leaf in layer_cache.items()}


def layer_format(layer_cache) -> tuple[str, int]:
  """(kv_format, group_size) of a quantized layer cache, from its shapes."""
  group_size = layer_cache["k_residual"].shape[1]
  bits = 8 * layer_cache["k_codes"].shape[2] // group_size
  return f"int{bits}", group_size


# --- quantize / dequantize along one axis (the axis a scale spans) ----------------------------------------------

def quantize_along(x, axis: int, kv_format: str):
  """Asymmetric RTN of x with one scale/zero point per slice along `axis` -> (codes with `axis` packed to
  size*bits/8, f32 scale and uint8 zero point with `axis` removed)."""
  fmt = formats.get(kv_format)
  moved = jnp.moveaxis(x, axis, 0)
  rest = moved.shape[1:]
  x2 = moved.reshape(moved.shape[0], -1).astype(jnp.float32)
  codes, scale, zero = formats.quantize_int(x2, fmt, x2.shape[0], False, False, jnp.float32)
  codes = jnp.moveaxis(codes.reshape(codes.shape[0], *rest), 0, axis)
  return codes, scale.reshape(rest), zero.reshape(rest)


def dequantize_along(codes, scale, zero, axis: int, kv_format: str, dtype=jnp.float32):
  """Inverse of `quantize_along`."""
  fmt = formats.get(kv_format)
  moved = jnp.moveaxis(codes, axis, 0)
  size = moved.shape[0] * 8 // fmt.bits
  x2 = formats.dequantize_int(moved.reshape(moved.shape[0], -1), scale.reshape(1, -1), zero.reshape(1, -1), fmt,
                              size, size)
  return jnp.moveaxis(x2.reshape(size, *moved.shape[1:]), 0, axis).astype(dtype)


def quantize_keys(keys, group_size: int, kv_format: str):
  """keys [B, n*G, Hkv, D] -> per-channel codes [B, n, G*bits/8, Hkv, D], scale and zero [B, n, Hkv, D]."""
  batch, length = keys.shape[:2]
  grouped = keys.reshape(batch, length // group_size, group_size, *keys.shape[2:])
  return quantize_along(grouped, 2, kv_format)


def dequantize_keys(codes, scale, zero, kv_format: str, dtype=jnp.float32):
  """Inverse of `quantize_keys` -> [B, n*G, Hkv, D]."""
  grouped = dequantize_along(codes, scale, zero, 2, kv_format, dtype)
  return grouped.reshape(grouped.shape[0], -1, *grouped.shape[3:])


def quantize_values(values, kv_format: str):
  """values [B, T, Hkv, D] -> per-token codes [B, T, Hkv, D*bits/8], scale and zero [B, T, Hkv]."""
  return quantize_along(values, 3, kv_format)


def dequantize_values(codes, scale, zero, kv_format: str, dtype=jnp.float32):
  return dequantize_along(codes, scale, zero, 3, kv_format, dtype)


# --- attention over the two views ---------------------------------------------------------------------------------

def group_complete(q_slots, kv_slots, group_size: int):
  """[T, S] bool: the key at slot s belongs to a group whose last slot is <= the query's slot."""
  return (kv_slots[None, :] // group_size + 1) * group_size <= q_slots[:, None] + 1


def attend(q, k_quantized, k_float, v, *, q_slots, group_size: int, q_positions, kv_positions, q_segment_ids=None,
           kv_segment_ids=None):
  """GQA softmax attention (f32 logits) whose key at slot s is `k_quantized[s]` for queries that see its group
  complete and `k_float[s]` otherwise; masks as `llama.attention_mask` (positions, segments)."""
  from efficient.models.llama import attend_with_logits, attention_mask, gqa_logits
  complete = group_complete(q_slots, jnp.arange(k_quantized.shape[1]), group_size)
  logits = jnp.where(complete, gqa_logits(q, k_quantized.astype(q.dtype)), gqa_logits(q, k_float.astype(q.dtype)))
  mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  return attend_with_logits(logits, v.astype(q.dtype), mask, q.dtype)


def update_and_attend(layer_cache: dict, q, k, v, *, index, q_positions, kv_positions, q_segment_ids=None,
                      kv_segment_ids=None):
  """Writes the new k/v [B, T, Hkv, D] at cache slot `index` (quantizing every group the write completes) and
  attends q over the cache -> (out [B, T, H, D], new layer cache). kv_positions [B, S] cover the S slots."""
  kv_format, group_size = layer_format(layer_cache)
  residual = layer_cache["k_residual"]
  batch, new_len = k.shape[:2]
  max_len = kv_positions.shape[1]
  # The float keys of slots [group_start, group_start + window_len): the open group, then the new keys. Every
  # group of the window is (re)quantized and written; groups the write leaves open are rewritten later from the
  # residual, so only complete groups' codes are ever read as quantized.
  group_start = (index // group_size) * group_size
  window_groups = -(-(new_len + group_size - 1) // group_size) + 1
  window = jnp.zeros((batch, window_groups * group_size, *residual.shape[2:]), residual.dtype)
  window = window.at[:, :group_size].set(residual)
  window = jax.lax.dynamic_update_slice_in_dim(window, k.astype(residual.dtype), index - group_start, axis=1)
  k_codes, k_scale, k_zero = quantize_keys(window, group_size, kv_format)
  groups = group_start // group_size + jnp.arange(window_groups)
  end = index + new_len
  v_codes, v_scale, v_zero = quantize_values(v, kv_format)
  new_cache = {
      "k_codes": layer_cache["k_codes"].at[:, groups].set(k_codes, mode="drop"),
      "k_scale": layer_cache["k_scale"].at[:, groups].set(k_scale, mode="drop"),
      "k_zero": layer_cache["k_zero"].at[:, groups].set(k_zero, mode="drop"),
      "k_residual": jax.lax.dynamic_slice_in_dim(window, (end // group_size) * group_size - group_start,
                                                 group_size, axis=1),
  }
  for name, new in (("v_codes", v_codes), ("v_scale", v_scale), ("v_zero", v_zero)):
    new_cache[name] = jax.lax.dynamic_update_slice_in_dim(layer_cache[name], new, index, axis=1)
  k_quantized = dequantize_keys(new_cache["k_codes"], new_cache["k_scale"], new_cache["k_zero"], kv_format,
                                q.dtype)[:, :max_len]
  k_float = k_quantized.at[:, group_start + jnp.arange(window.shape[1])].set(window.astype(q.dtype), mode="drop")
  v_view = dequantize_values(new_cache["v_codes"], new_cache["v_scale"], new_cache["v_zero"], kv_format, q.dtype)
  out = attend(q, k_quantized, k_float, v_view, q_slots=index + jnp.arange(new_len), group_size=group_size,
               q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
               kv_segment_ids=kv_segment_ids)
  return out, new_cache


def simulated_attention_fn(kv_format: str, group_size: int = DEFAULT_GROUP_SIZE, key_granularity: str = "channel"):
  """An `AttentionFn` (llama.AttentionFn) for full forwards without a cache: k/v are quantize->dequantized exactly
  as the cache stores them (slot = index along the sequence) and attended as `update_and_attend` does, so
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
    v_view = dequantize_values(*quantize_values(v, kv_format), kv_format, q.dtype)
    if key_granularity == "token":  # groups of one slot: every key is complete, hence quantized, once written
      k_quantized, key_group = dequantize_values(*quantize_values(k, kv_format), kv_format, q.dtype), 1
    else:
      padded = jnp.pad(k, ((0, 0), (0, -length % group_size), (0, 0), (0, 0)))  # the open tail group is never read
      k_quantized = dequantize_keys(*quantize_keys(padded, group_size, kv_format), kv_format, q.dtype)[:, :length]
      key_group = group_size
    return attend(q, k_quantized, k, v_view, q_slots=jnp.arange(length), group_size=key_group,
                  q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                  kv_segment_ids=kv_segment_ids)

  return attention


def cache_nbytes(cache) -> int:
  """Bytes of the k/v storage of every layer of a model cache (positions/index excluded), as stored."""
  return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for layer in cache["layers"]
             for name, leaf in layer.items() if name in _LAYER_KEYS + ("k", "v"))
