"""The Llama family as SmolLM2 uses it: GQA, RoPE, SwiGLU MLP, RMSNorm, tied embeddings -- in Flax NNX.

Composed from the layer floor (`efficient.nn`: Einsum, RMSNorm, logical_param) and the attention core
(`efficient.attention`: each layer's token mixer comes from the mixer registry by kind; softmax layers keep a KV
cache behind `efficient.attention.cache`'s interface, whatever its storage codec). Every parameter carries
logical axis names (see `efficient.sharding`). Kernels run by default through the `pallas_kernels` policy:
flash attention and the fused RMSNorm on TPU/GPU, their XLA paths on CPU, and `generate` decodes one-token steps
through `flash_decode`. Decoding uses a functional cache (a pytree) so a jitted step is a pure function of the
split model state.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efficient import activations, nn
from efficient.attention import core, mixers
from efficient.attention.core import EMPTY_POSITION, AttentionFn  # noqa: F401  (re-exported for users)
from efficient.models import config_dict
from efficient.quant import kv_cache as _kv_cache  # noqa: F401  registers the int8/int4 KV-cache codecs

# Fields added after the first checkpoints (per-layer attention, activation memory); `to_dict` leaves them out at
# their defaults so signatures of existing checkpoints (and everything keyed on them) are unchanged.
_OMIT_AT_DEFAULT = {"attention": "softmax", "attention_schedule": None, "sliding_window": None,
                    "linear_attention": None, "based": None, "attention_implementation": None,
                    "remat": "none", "saved_activations": "float", "attention_multiplier": 1.0,
                    "logits_multiplier": 1.0}
# Mixer kinds whose softmax logits `attention_multiplier` scales.
_LOGIT_MIXERS = ("softmax", "window")


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
  norm_implementation: str | None = None  # pallas_kernels.rms_norm implementation (None: the policy)
  attention_implementation: str | None = None  # flash_attention's (None: the policy; 'reference': positional)
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
  # Activation memory (efficient.activations): `remat` is the jax.checkpoint policy preset of every block in
  # training forwards ('none', 'block', 'dots_saveable', 'names'); `saved_activations='int8'` makes the MLP's
  # SiLU keep int8 codes of its input for the backward (Mesa). Neither changes the forward's numbers.
  remat: str = "none"
  saved_activations: str = "float"
  # Width-scaling knobs (1.0: the standard model; `efficient.models.parametrization.mup_config` sets both for
  # μP): softmax logits = attention_multiplier * q.k / sqrt(head_dim) (see core.MixerSpec), and the output
  # logits times logits_multiplier (μP's readout multiplier 1/width_mult, which works with tied embeddings).
  attention_multiplier: float = 1.0
  logits_multiplier: float = 1.0

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
    windowed = sorted(kind for kind in set(kinds) if mixers.get_mixer(kind).needs_window)
    if self.sliding_window is None and windowed:
      raise ValueError(f"LlamaConfig.sliding_window is required by {windowed} layers (schedule {kinds}).")
    activations.check_choice(self.remat, activations.REMAT_POLICIES, name="LlamaConfig.remat")
    activations.check_choice(self.saved_activations, activations.SAVED_ACTIVATIONS,
                             name="LlamaConfig.saved_activations")
    for name in ("attention_multiplier", "logits_multiplier"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"LlamaConfig.{name} must be a positive finite number, got {value!r}.")
    others = sorted(set(kinds) - set(_LOGIT_MIXERS))
    if self.attention_multiplier != 1.0 and others:
      raise ValueError(f"LlamaConfig.attention_multiplier={self.attention_multiplier} scales softmax logits; "
                       f"{others} layers have none ({_LOGIT_MIXERS} do).")

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
      mixers.get_mixer(kind, where=f"LlamaConfig.{where}")
    return kinds

  def mixer_spec(self) -> core.MixerSpec:
    """What the token mixers need of this config (widths, RoPE, dtypes, init, per-kind options)."""
    return core.MixerSpec(embed_dim=self.embed_dim, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                          head_dim=self.head_dim, rope_theta=self.rope_theta, param_dtype=self.param_dtype,
                          compute_dtype=self.compute_dtype, init_std=self.init_std,
                          sliding_window=self.sliding_window, linear_attention=self.linear_attention,
                          based=self.based, attention_implementation=self.attention_implementation,
                          attention_multiplier=self.attention_multiplier)

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return config_dict.to_dict(self, omit_at_default=_OMIT_AT_DEFAULT)


SMOLLM2_135M = LlamaConfig(vocab_size=49152, embed_dim=576, num_layers=30, num_heads=9, num_kv_heads=3,
                           head_dim=64, mlp_dim=1536, rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192)
# Random-init configs for tests and from-scratch training; same architecture, small enough for a CPU.
TINY = LlamaConfig(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   mlp_dim=128, rope_theta=10000.0, max_seq_len=256)
SMALL = LlamaConfig(vocab_size=512, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                    mlp_dim=384, rope_theta=10000.0, max_seq_len=512)


def _einsum(config: LlamaConfig, equation, shape, names, *, rngs) -> nn.Einsum:
  return nn.Einsum(equation, shape, names, rngs=rngs, param_dtype=config.param_dtype,
                   compute_dtype=config.compute_dtype, kernel_init=nn.normal_init(config.init_std))


def _norm(config: LlamaConfig) -> nn.RMSNorm:
  return nn.RMSNorm(config.embed_dim, eps=config.norm_eps, param_dtype=config.param_dtype,
                    implementation=config.norm_implementation)


class MLP(nnx.Module):

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    self.gate = _einsum(c, "btd,df->btf", (c.embed_dim, c.mlp_dim), ("embed", "mlp"), rngs=rngs)
    self.up = _einsum(c, "btd,df->btf", (c.embed_dim, c.mlp_dim), ("embed", "mlp"), rngs=rngs)
    self.down = _einsum(c, "btf,fd->btd", (c.mlp_dim, c.embed_dim), ("mlp", "embed"), rngs=rngs)
    self.saved_activations = c.saved_activations  # 'int8': the SiLU saves int8 codes of its input (Mesa)

  def __call__(self, x):
    silu = activations.activation("silu", self.saved_activations)
    hidden = activations.checkpoint_name(silu(self.gate(x)) * self.up(x), activations.MLP_HIDDEN)
    return self.down(hidden)


class Block(nnx.Module):

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, layer: int = 0):
    self.attention_norm = _norm(config)
    # Every mixer has softmax.Attention's call signature: (x, *, positions, segment_ids, attention_fn, cache, ...)
    self.attention = mixers.make_mixer(config.layer_kinds()[layer], config.mixer_spec(), rngs=rngs)
    self.mlp_norm = _norm(config)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, **attention_kwargs):
    attended, cache = self.attention(self.attention_norm(x), **attention_kwargs)
    x = x + activations.checkpoint_name(attended, activations.ATTENTION_OUT)
    return x + self.mlp(self.mlp_norm(x)), cache


class Llama(nnx.Module):
  """`model(tokens[B,T] int32) -> logits[B,T,V] f32`; with `cache=` it returns `(logits, new_cache)`.

  Token ids must lie in [0, vocab_size) and `positions` in [0, EMPTY_POSITION). Concrete (non-traced) inputs
  outside that are a ValueError naming the argument, the bad value and the range. Under `jit` (traced inputs)
  they cannot be checked: an out-of-range token id -- negative ones included -- embeds as a row of NaN, so the
  logits of that token and of every later position of its row are NaN (earlier positions of the row too where
  the attention kernel multiplies masked zeros by the NaN values, as the XLA and reference paths do); it never
  reads another token's embedding, and other batch rows are unaffected. Traced positions are used as given.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, attention_fn: AttentionFn | None = None):
    self.config = config
    self.attention_fn = attention_fn  # None: each mixer's kernel-backed default (see efficient.attention.softmax)
    init = nn.normal_init(config.init_std)
    self.embedding = nn.logical_param(init(rngs.params(), (config.vocab_size, config.embed_dim),
                                           config.param_dtype), ("vocab", "embed"))
    self.blocks = nnx.List([Block(config, rngs=rngs, layer=i) for i in range(config.num_layers)])
    self.final_norm = _norm(config)
    if not config.tie_embeddings:
      self.lm_head = nn.logical_param(init(rngs.params(), (config.embed_dim, config.vocab_size),
                                           config.param_dtype), ("embed", "vocab"))

  def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None):
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an integer array [batch, length], got {tokens.dtype}{tokens.shape}.")
    if positions is not None:
      nn.check_ids(positions, EMPTY_POSITION, name="positions", bound="EMPTY_POSITION")
    batch, length = tokens.shape
    # Slots [0, index + length) are exactly what each row sees when positions count up from the cache index and
    # nothing is packed: the cache may then decode through flash_decode.
    contiguous = positions is None and segment_ids is None
    if positions is None:
      start = 0 if cache is None else cache["index"]
      positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is not None and segment_ids.shape != tokens.shape:
      raise ValueError(f"segment_ids must have the shape of tokens {tokens.shape}, got {segment_ids.shape}.")
    dtype = self.config.compute_dtype
    # The raw `embedding` parameter (its path is what loaders and rules name), looked up by the layer floor's
    # guarded gather: an out-of-range id reads NaN, never another row.
    x = nn.take_rows(self.embedding[...], tokens, name="tokens", bound="vocab_size").astype(dtype)
    kwargs = dict(positions=positions, segment_ids=segment_ids, attention_fn=self.attention_fn)
    new_layers = []
    if cache is not None:
      index = cache["index"]
      cache_positions = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, index, axis=1)
      cache_segment_ids = None
      if segment_ids is not None:
        cache_segment_ids = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, index, axis=1)
      lengths = jnp.full((batch,), index + length, jnp.int32) if contiguous else None
      kwargs.update(cache_positions=cache_positions, cache_segment_ids=cache_segment_ids, cache_index=index,
                    cache_lengths=lengths)
    policy = activations.checkpoint_policy(self.config.remat)
    for i, block in enumerate(self.blocks):
      if cache is None and policy is not None:
        x, layer_cache = _remat_block(block, x, policy, kwargs)
      else:
        x, layer_cache = block(x, cache=None if cache is None else cache["layers"][i], **kwargs)
      new_layers.append(layer_cache)
    x = self.final_norm(x)
    head = self.embedding[...].T if self.config.tie_embeddings else self.lm_head[...]
    logits = jnp.einsum("btd,dv->btv", x, head.astype(dtype), preferred_element_type=jnp.float32)
    if self.config.logits_multiplier != 1.0:
      logits = logits * self.config.logits_multiplier
    if cache is None:
      return logits
    new_cache = {"index": index + length, "positions": cache_positions, "layers": new_layers}
    if segment_ids is not None:
      new_cache["segment_ids"] = cache_segment_ids
    return logits, new_cache


def _remat_block(block: Block, x, policy, kwargs: dict):
  """`block(x, **kwargs)` under `nnx.remat(policy=)`: arrays (x, positions, segment ids) are its arguments, the
  rest (the attention function) rides in by closure. Same forward; the backward recomputes what `policy` drops."""
  arrays = {name: kwargs[name] for name in ("positions", "segment_ids")}
  static = {name: value for name, value in kwargs.items() if name not in arrays}

  def run(block, x, arrays):
    return block(x, cache=None, **arrays, **static)

  return nnx.remat(run, policy=policy)(block, x, arrays)


def init_cache(config: LlamaConfig, batch: int, max_len: int, *, dtype=None, with_segment_ids=False,
               kv_format: str | None = None, kv_group_size: int | None = None) -> dict:
  """An empty decoding cache for `max_len` positions: each layer's from the mixer registry (softmax: a KV cache
  in `dtype`, default the compute dtype; other mixers: recurrent states, window ring buffers, conv tails).
  `kv_format='int8'|'int4'` stores softmax layers' k/v quantized (`efficient.quant.kv_cache`: per-channel K over
  groups of `kv_group_size` slots, per-token V); it needs every layer to be softmax."""
  if max_len > config.max_seq_len:
    raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={config.max_seq_len}.")
  dtype = dtype or config.compute_dtype
  spec = config.mixer_spec()
  cache = {
      "index": jnp.zeros((), jnp.int32),
      "positions": jnp.full((batch, max_len), EMPTY_POSITION, jnp.int32),
      "layers": [mixers.init_mixer_cache(kind, spec, batch, max_len, dtype=dtype, with_segment_ids=with_segment_ids,
                                         kv_format=kv_format, kv_group_size=kv_group_size)
                 for kind in config.layer_kinds()],
  }
  if with_segment_ids:
    cache["segment_ids"] = jnp.zeros((batch, max_len), jnp.int32)
  return cache


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
  `kv_group_size`: a quantized KV cache (see `init_cache`). Prompt ids outside [0, vocab_size) are a ValueError
  (a traced prompt, e.g. `generate` called under `jit`, is not checked: see `Llama`'s NaN rule).
  """
  if jnp.ndim(prompt) != 2 or jnp.shape(prompt)[1] < 1:
    raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {jnp.shape(prompt)}.")
  nn.check_ids(prompt, model.config.vocab_size, name="prompt", bound="vocab_size")  # before the int32 cast
  prompt = jnp.asarray(prompt, jnp.int32)
  if eos_id is not None and not 0 <= eos_id < model.config.vocab_size:
    raise ValueError(f"eos_id must be in [0, vocab_size={model.config.vocab_size}), got {eos_id}.")
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
