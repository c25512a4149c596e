"""The Llama family as SmolLM2 uses it: GQA, RoPE, SwiGLU MLP, RMSNorm, tied embeddings -- in Flax NNX.

Every parameter carries logical axis names (see `efficient.sharding`). Attention goes through a pluggable
function (`AttentionFn`) so kernels can be swapped in without touching the model. Decoding uses a functional
KV cache (a plain pytree) so a jitted step is a pure function of the split model state.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.rms_norm import rms_norm as rms_norm_op

# A cache slot that holds no key yet gets this position, so the causal test `k_pos <= q_pos` rejects it.
EMPTY_POSITION = 2**30
# Token mixers a layer may use (`LlamaConfig.attention` / `attention_schedule`); every kind but 'softmax' is
# built by `efficient.attention.mixers` (imported lazily: that package imports this module).
ATTENTION_KINDS = ("softmax", "window", "linear", "based")
# Fields added for per-layer attention; `to_dict` leaves them out at their defaults so signatures of existing
# checkpoints (and everything keyed on them) are unchanged for the plain softmax model.
_MIXER_FIELDS = {"attention": "softmax", "attention_schedule": None, "sliding_window": None,
                 "linear_attention": None, "based": None}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  max_seq_len: int = 2048
  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  norm_implementation: str | None = None  # pallas_kernels.rms_norm implementation (None: by backend)
  init_std: float = 0.02
  # Per-layer token mixer: `attention` for every layer, or `attention_schedule` ('linear,linear,softmax', one
  # kind per layer; see efficient.attention.every_kth_softmax). 'window' and 'based' layers need
  # `sliding_window`; `linear_attention` / `based` take efficient.attention.LinearAttentionConfig / BasedConfig
  # (None: their defaults).
  attention: str = "softmax"
  attention_schedule: str | None = None
  sliding_window: int | None = None
  linear_attention: Any = None
  based: Any = None

  def __post_init__(self):
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"LlamaConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads}).")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}.")
    kinds = self.layer_kinds()  # validates the names
    if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or
                                            not isinstance(self.sliding_window, int) or self.sliding_window < 1):
      raise ValueError(f"LlamaConfig.sliding_window must be an int >= 1 (or None), got {self.sliding_window!r}.")
    if self.sliding_window is None and {"window", "based"} & set(kinds):
      raise ValueError(f"LlamaConfig.sliding_window is required by 'window'/'based' layers (schedule {kinds}).")

  def layer_kinds(self) -> tuple[str, ...]:
    """The token mixer of every layer, from `attention_schedule` (comma-separated) or `attention`."""
    if self.attention_schedule is None:
      kinds = (self.attention,) * self.num_layers
      where = "attention"
    else:
      kinds = tuple(part.strip() for part in self.attention_schedule.split(","))
      where = "attention_schedule"
      if len(kinds) != self.num_layers:
        raise ValueError(f"LlamaConfig.attention_schedule={self.attention_schedule!r} names {len(kinds)} layers; "
                         f"num_layers is {self.num_layers}.")
    for kind in kinds:
      if kind not in ATTENTION_KINDS:
        raise ValueError(f"LlamaConfig.{where}: unknown attention {kind!r}; choose from {ATTENTION_KINDS}.")
    return kinds

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["param_dtype"] = jnp.dtype(self.param_dtype).name
    d["compute_dtype"] = jnp.dtype(self.compute_dtype).name
    for name, default in _MIXER_FIELDS.items():
      if d[name] == default:
        del d[name]
    return d


SMOLLM2_135M = LlamaConfig(vocab_size=49152, embed_dim=576, num_layers=30, num_heads=9, num_kv_heads=3,
                           head_dim=64, mlp_dim=1536, rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192)
# Random-init configs for tests and from-scratch training; same architecture, small enough for a CPU.
TINY = LlamaConfig(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   mlp_dim=128, rope_theta=10000.0, max_seq_len=256)
SMALL = LlamaConfig(vocab_size=512, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                    mlp_dim=384, rope_theta=10000.0, max_seq_len=512)


class AttentionFn(Protocol):
  """q [B,T,H,D], k/v [B,S,Hkv,D]; positions say what is causal, segment ids what may see what."""

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
               kv_positions: jax.Array, q_segment_ids: jax.Array | None,
               kv_segment_ids: jax.Array | None) -> jax.Array: ...


def attention_mask(q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None):
  """[B, T, S] bool: causal by absolute position, and within one segment when segment ids are given."""
  mask = kv_positions[:, None, :] <= q_positions[:, :, None]
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return mask


def softmax_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None):
  """Reference GQA softmax attention, f32 logits and softmax; the default `AttentionFn`."""
  mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids)
  return attend_with_logits(gqa_logits(q, k), v, mask, q.dtype)


def gqa_logits(q, k):
  """Scaled f32 logits [B, H_kv, H/H_kv, T, S] of q [B, T, H, D] against k [B, S, H_kv, D] (GQA groups)."""
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
  return jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5


def attend_with_logits(logits, v, mask, dtype):
  """Masked softmax of `gqa_logits` [B, H_kv, G, T, S] and its average of v [B, S, H_kv, D] -> [B, T, H, D]."""
  batch, num_kv_heads, group, q_len, _ = logits.shape
  logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  # A query whose every key is masked (padding) gets zeros rather than NaN.
  probs = jnp.where(mask[:, None, None].any(-1, keepdims=True), probs, 0.0)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, num_kv_heads * group, v.shape[-1]).astype(dtype)


def rope(x, positions, theta: float):
  """Rotate-half RoPE (Hugging Face convention) on x [B, T, H, D] at integer positions [B, T]."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def logical_param(value, names) -> nnx.Param:
  """A parameter tagged with logical axis names; `efficient.sharding.shard_model` maps them to a mesh later
  (built on one device first, so head counts that a mesh axis does not divide stay representable)."""
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def _param(rngs, shape, names, config, std=None):
  init = nnx.initializers.normal(config.init_std if std is None else std)
  return logical_param(init(rngs.params(), shape, config.param_dtype), names)


class RMSNorm(nnx.Module):

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    del rngs
    self.eps = config.norm_eps
    self.implementation = config.norm_implementation
    self.scale = logical_param(jnp.ones((config.embed_dim,), config.param_dtype), ("embed",))

  def __call__(self, x):
    return rms_norm_op(x, self.scale[...].astype(x.dtype), eps=self.eps, implementation=self.implementation)


class Einsum(nnx.Module):
  """`einsum(equation, x, kernel)`: every projection of the model is one of these, so rules that match module
  paths (quantize, sparsify, capture calibration inputs) can swap it without editing the model."""

  def __init__(self, equation: str, shape: tuple[int, ...], names: tuple[str, ...], config: LlamaConfig, *,
               rngs: nnx.Rngs):
    self.equation = equation
    self.compute_dtype = config.compute_dtype
    self.kernel = _param(rngs, shape, names, config)

  def __call__(self, x):
    return jnp.einsum(self.equation, x, self.kernel[...].astype(self.compute_dtype))


class Attention(nnx.Module):

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = config
    kv_shape, kv_names = (c.embed_dim, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim")
    self.q = Einsum("btd,dhk->bthk", (c.embed_dim, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), c,
                    rngs=rngs)
    self.k = Einsum("btd,dhk->bthk", kv_shape, kv_names, c, rngs=rngs)
    self.v = Einsum("btd,dhk->bthk", kv_shape, kv_names, c, rngs=rngs)
    self.o = Einsum("bthk,hkd->btd", (c.num_heads, c.head_dim, c.embed_dim), ("heads", "head_dim", "embed"), c,
                    rngs=rngs)

  def __call__(self, x, *, positions, segment_ids, attention_fn, cache=None, cache_positions=None,
               cache_segment_ids=None, cache_index=None):
    q, k, v = self.q(x), self.k(x), self.v(x)
    q, k = rope(q, positions, self.config.rope_theta), rope(k, positions, self.config.rope_theta)
    kv_positions, kv_segment_ids = positions, segment_ids
    if cache is not None and "k_codes" in cache:  # a quantized KV cache (init_cache's kv_format)
      from efficient.quant import kv_cache
      out, cache = kv_cache.update_and_attend(cache, q, k, v, index=cache_index, q_positions=positions,
                                              kv_positions=cache_positions, q_segment_ids=segment_ids,
                                              kv_segment_ids=cache_segment_ids)
      return self.o(out), cache
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
      cache = {"k": k, "v": v}
      kv_positions, kv_segment_ids = cache_positions, cache_segment_ids
      k, v = k.astype(self.config.compute_dtype), v.astype(self.config.compute_dtype)
    out = attention_fn(q, k, v, q_positions=positions, kv_positions=kv_positions, q_segment_ids=segment_ids,
                       kv_segment_ids=kv_segment_ids)
    return self.o(out), cache


class MLP(nnx.Module):

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    self.gate = Einsum("btd,df->btf", (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c, rngs=rngs)
    self.up = Einsum("btd,df->btf", (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c, rngs=rngs)
    self.down = Einsum("btf,fd->btd", (c.mlp_dim, c.embed_dim), ("mlp", "embed"), c, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, layer: int = 0):
    self.attention_norm = RMSNorm(config, rngs=rngs)
    kind = config.layer_kinds()[layer]
    if kind == "softmax":
      self.attention = Attention(config, rngs=rngs)
    else:  # same call signature as Attention: (x, *, positions, segment_ids, attention_fn, cache, ...)
      from efficient.attention import mixers
      self.attention = mixers.make_mixer(kind, config, rngs=rngs)
    self.mlp_norm = RMSNorm(config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, **attention_kwargs):
    attended, cache = self.attention(self.attention_norm(x), **attention_kwargs)
    x = x + attended
    return x + self.mlp(self.mlp_norm(x)), cache


class Llama(nnx.Module):
  """`model(tokens[B,T] int32) -> logits[B,T,V] f32`; with `cache=` it returns `(logits, new_cache)`."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, attention_fn: AttentionFn = softmax_attention):
    self.config = config
    self.attention_fn = attention_fn
    self.embedding = _param(rngs, (config.vocab_size, config.embed_dim), ("vocab", "embed"), config)
    self.blocks = nnx.List([Block(config, rngs=rngs, layer=i) for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config, rngs=rngs)
    if not config.tie_embeddings:
      self.lm_head = _param(rngs, (config.embed_dim, config.vocab_size), ("embed", "vocab"), config)

  def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None):
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an integer array [batch, length], got {tokens.dtype}{tokens.shape}.")
    batch, length = tokens.shape
    if positions is None:
      start = 0 if cache is None else cache["index"]
      positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is not None and segment_ids.shape != tokens.shape:
      raise ValueError(f"segment_ids must have the shape of tokens {tokens.shape}, got {segment_ids.shape}.")
    dtype = self.config.compute_dtype
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)
    kwargs = dict(positions=positions, segment_ids=segment_ids, attention_fn=self.attention_fn)
    new_layers = []
    if cache is not None:
      index = cache["index"]
      cache_positions = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, index, axis=1)
      cache_segment_ids = None
      if segment_ids is not None:
        cache_segment_ids = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, index, axis=1)
      kwargs.update(cache_positions=cache_positions, cache_segment_ids=cache_segment_ids, cache_index=index)
    for i, block in enumerate(self.blocks):
      x, layer_cache = block(x, cache=None if cache is None else cache["layers"][i], **kwargs)
      new_layers.append(layer_cache)
    x = self.final_norm(x)
    head = self.embedding[...].T if self.config.tie_embeddings else self.lm_head[...]
    logits = jnp.einsum("btd,dv->btv", x, head.astype(dtype), preferred_element_type=jnp.float32)
    if cache is None:
      return logits
    new_cache = {"index": index + length, "positions": cache_positions, "layers": new_layers}
    if segment_ids is not None:
      new_cache["segment_ids"] = cache_segment_ids
    return logits, new_cache


def init_cache(config: LlamaConfig, batch: int, max_len: int, *, dtype=None, with_segment_ids=False,
               kv_format: str | None = None, kv_group_size: int | None = None) -> dict:
  """An empty KV cache pytree for `max_len` positions (k/v in `dtype`, default the compute dtype).

  Softmax layers hold k/v; other mixers hold what `efficient.attention.mixers.init_mixer_cache` gives them
  (recurrent states, window ring buffers, conv tails). `kv_format='int8'|'int4'` stores softmax layers' k/v
  quantized (`efficient.quant.kv_cache`: per-channel K over groups of `kv_group_size` slots, per-token V)."""
  if max_len > config.max_seq_len:
    raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={config.max_seq_len}.")
  dtype = dtype or config.compute_dtype
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  softmax_cache = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  if kv_format is not None or kv_group_size is not None:
    softmax_cache = _quantized_cache_factory(config, batch, max_len, dtype, kv_format, kv_group_size)
  cache = {
      "index": jnp.zeros((), jnp.int32),
      "positions": jnp.full((batch, max_len), EMPTY_POSITION, jnp.int32),
      "layers": [softmax_cache() if kind == "softmax" else
                 _mixer_cache(kind, config, batch, max_len, dtype, with_segment_ids)
                 for kind in config.layer_kinds()],
  }
  if with_segment_ids:
    cache["segment_ids"] = jnp.zeros((batch, max_len), jnp.int32)
  return cache


def _quantized_cache_factory(config, batch, max_len, dtype, kv_format, kv_group_size):
  from efficient.quant import kv_cache
  if set(config.layer_kinds()) != {"softmax"}:
    raise ValueError(f"kv_format={kv_format!r} quantizes softmax layers' k/v only; this model has "
                     f"{sorted(set(config.layer_kinds()))} layers.")
  group_size = kv_cache.DEFAULT_GROUP_SIZE if kv_group_size is None else kv_group_size
  kv_cache.check_format(kv_format, config.head_dim, group_size)
  return lambda: kv_cache.init_layer_cache(batch, max_len, config.num_kv_heads, config.head_dim,
                                           kv_format=kv_format, group_size=group_size, dtype=dtype)


def _mixer_cache(kind, config, batch, max_len, dtype, with_segment_ids):
  from efficient.attention import mixers
  return mixers.init_mixer_cache(kind, config, batch, max_len, dtype=dtype, with_segment_ids=with_segment_ids)


def sample_token(logits, rng, *, temperature: float, top_k: int | None):
  """Greedy when temperature == 0, else temperature sampling restricted to the top_k logits."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "eos_id",
                                             "kv_format", "kv_group_size"))
def _generate(graphdef, state, prompt, rng, *, max_new_tokens, temperature, top_k, eos_id, kv_format=None,
              kv_group_size=None):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt.shape
  cache = init_cache(model.config, batch, prompt_len + max_new_tokens, kv_format=kv_format,
                     kv_group_size=kv_group_size)
  logits, cache = model(prompt, cache=cache)
  rngs = jax.random.split(rng, max_new_tokens)
  first = sample_token(logits[:, -1], rngs[0], temperature=temperature, top_k=top_k)

  def step(carry, step_rng):
    token, cache, done = carry
    logits, cache = model(token[:, None], cache=cache)
    next_token = sample_token(logits[:, -1], step_rng, temperature=temperature, top_k=top_k)
    if eos_id is not None:
      done = done | (token == eos_id)
      next_token = jnp.where(done, eos_id, next_token)
    return (next_token, cache, done), token

  done = jnp.zeros((batch,), bool)
  (last, _, _), tokens = jax.lax.scan(step, (first, cache, done), rngs[1:])
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def generate(model: Llama, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
             rng: jax.Array | None = None, eos_id: int | None = None, kv_format: str | None = None,
             kv_group_size: int | None = None) -> jax.Array:
  """Returns [B, max_new_tokens] continuation tokens of equal-length prompts [B, T] (KV-cache decoding).

  After `eos_id` a row keeps emitting `eos_id`. Sampling needs `rng` when temperature > 0. `kv_format` /
  `kv_group_size`: a quantized KV cache (see `init_cache`).
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {prompt.shape}.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}.")
  if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
    raise ValueError(f"top_k must be in [1, vocab_size={model.config.vocab_size}], got {top_k}.")
  if temperature > 0 and rng is None:
    raise ValueError("rng is required when temperature > 0.")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt, rng, max_new_tokens=max_new_tokens, temperature=float(temperature),
                   top_k=top_k, eos_id=eos_id, kv_format=kv_format, kv_group_size=kv_group_size)
