"""The token-mixer registry: `kind -> Mixer(make, init_cache, state_bytes)`.

A model asks the registry for each layer's mixer and decoding cache by kind; it never decides a kind itself, so a
new mixer (DeltaNet, Mamba-2, ...) is one `register_mixer` call, not an edit of every model. Built in:

  softmax   `Attention` (GQA + RoPE, any KV-cache codec: float, int8, int4)
  window    `WindowAttention` (sliding window, ring-buffer cache); needs `MixerSpec.sliding_window`
  linear    `LinearAttention` with `MixerSpec.linear_attention` (recurrent-state cache)
  based     `Based` with `MixerSpec.based` (conv tail + linear state + window ring); needs `sliding_window`

Every mixer has the call signature of `softmax.Attention` and takes a `core.MixerSpec`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from efficient.attention import based as based_lib
from efficient.attention import linear as linear_lib
from efficient.attention import softmax
from efficient.attention.core import MixerSpec


@dataclasses.dataclass(frozen=True)
class Mixer:
  """make(spec, *, rngs) -> module; init_cache(spec, batch, max_len, *, dtype, with_segment_ids, kv_format,
  kv_group_size) -> the layer's empty decoding cache; state_bytes(spec, seq_len, batch) -> bytes of that state
  after seq_len tokens (f32 caches). `needs_window`: the kind requires `spec.sliding_window`. `kv_formats`: whether
  init_cache takes a KV storage codec (`kv_format`)."""
  make: Callable
  init_cache: Callable
  state_bytes: Callable
  needs_window: bool = False
  kv_formats: bool = False


_MIXERS: dict[str, Mixer] = {}


def register_mixer(kind: str, mixer: Mixer) -> None:
  if not isinstance(kind, str) or not kind:
    raise ValueError(f"kind must be a non-empty string, got {kind!r}.")
  _MIXERS[kind] = mixer


def mixer_kinds() -> tuple[str, ...]:
  return tuple(_MIXERS)


def get_mixer(kind: str, *, where: str = "kind") -> Mixer:
  if kind not in _MIXERS:
    raise ValueError(f"{where}: unknown attention {kind!r}; choose from {mixer_kinds()}.")
  return _MIXERS[kind]


def make_mixer(kind: str, spec: MixerSpec, *, rngs):
  return get_mixer(kind).make(spec, rngs=rngs)


def init_mixer_cache(kind: str, spec: MixerSpec, batch: int, max_len: int, *, dtype=None, with_segment_ids=False,
                     kv_format: str | None = None, kv_group_size: int | None = None):
  """The empty decoding cache of one layer of `kind`."""
  mixer = get_mixer(kind)
  if (kv_format is not None or kv_group_size is not None) and not mixer.kv_formats:
    raise ValueError(f"kv_format={kv_format!r}: {kind!r} layers keep no KV cache to quantize (only "
                     f"{[k for k, m in _MIXERS.items() if m.kv_formats]} layers do).")
  return mixer.init_cache(spec, batch, max_len, dtype=dtype or spec.compute_dtype,
                          with_segment_ids=with_segment_ids, kv_format=kv_format, kv_group_size=kv_group_size)


def layer_state_bytes(kind: str, spec: MixerSpec, seq_len: int, batch: int = 1) -> int:
  """Bytes of one layer's decoding state after `seq_len` tokens (f32 caches): a softmax layer's KV grows with
  seq_len; window, linear and Based states are constant."""
  return get_mixer(kind).state_bytes(spec, seq_len, batch)


def every_kth_softmax(num_layers: int, k: int, other: str = "linear") -> str:
  """An `attention_schedule` with softmax on every k-th layer (layers k-1, 2k-1, ...) and `other` elsewhere."""
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be an int >= 1, got {k!r}.")
  get_mixer(other, where="other")
  return ",".join("softmax" if (i + 1) % k == 0 else other for i in range(num_layers))


def _kv_bytes(spec: MixerSpec, slots: int, batch: int) -> int:
  return 2 * batch * spec.num_kv_heads * spec.head_dim * 4 * slots


register_mixer("softmax", Mixer(
    make=lambda spec, *, rngs: softmax.Attention(spec, rngs=rngs),
    init_cache=softmax.init_softmax_cache,
    state_bytes=lambda spec, seq_len, batch: _kv_bytes(spec, seq_len, batch),
    kv_formats=True))
register_mixer("window", Mixer(
    make=lambda spec, *, rngs: softmax.WindowAttention(spec, rngs=rngs),
    init_cache=lambda spec, batch, max_len, *, dtype, with_segment_ids, **_: softmax.init_window_cache(
        spec, batch, spec.sliding_window, dtype=dtype, with_segment_ids=with_segment_ids),
    state_bytes=lambda spec, seq_len, batch: _kv_bytes(spec, min(seq_len, spec.sliding_window), batch),
    needs_window=True))
register_mixer("linear", Mixer(
    make=lambda spec, *, rngs: linear_lib.LinearAttention(spec, spec.linear_attention, rngs=rngs),
    init_cache=lambda spec, batch, max_len, **_: linear_lib.init_linear_cache(spec, spec.linear_attention, batch),
    state_bytes=lambda spec, seq_len, batch: linear_lib.state_bytes(spec, spec.linear_attention, batch)))
register_mixer("based", Mixer(
    make=lambda spec, *, rngs: based_lib.Based(spec, spec.based, rngs=rngs),
    init_cache=lambda spec, batch, max_len, *, dtype, with_segment_ids, **_: based_lib.init_based_cache(
        spec, spec.based, batch, dtype=dtype, with_segment_ids=with_segment_ids),
    state_bytes=lambda spec, seq_len, batch: based_lib.based_state_bytes(spec, spec.based, batch)["total"],
    needs_window=True))
