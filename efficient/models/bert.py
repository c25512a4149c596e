"""The BERT encoder (all-MiniLM-L6-v2's architecture) in Flax NNX, built from the layer floor `efficient.nn`.

    model = Bert(BertConfig(...), rngs=nnx.Rngs(0))
    hidden = model(ids, attention_mask)                     # [B, T, embed_dim] f32: the last hidden state
    vectors = mean_pool_normalize(hidden, attention_mask)   # sentence-transformers' mean pooling + L2 norm

Post-LayerNorm blocks (x = LN(x + attention(x)); x = LN(x + down(gelu(up(x))))), learned absolute position and
token-type embeddings, exact (erf) GELU, biases on every projection. Projection paths follow the Llama model's
where the role is the same (`blocks/N/attention/q|k|v|o`, `blocks/N/mlp/up|down`), so path rules written for one
(`.*mlp/down`, `.*attention/(q|k|v)`) select the same projections in the other; every projection is an
`efficient.nn.Einsum` with logical axes (`embed`, `heads`, `head_dim`, `mlp`; embeddings `vocab`), which is what
quantization, pruning and sharding transforms look for. The LayerNorms are `post_attention_norm` /
`post_mlp_norm`: they follow their sublayer, so nothing that folds into "the norm before q/k/v" matches them.

Attention is the project's `efficient.attention.softmax.Attention` (q/k/v/o, here with biases, no RoPE) with a
non-causal `MixerSpec`: its `AttentionFn` is `softmax_attention_fn(causal=False)`, the padding mask travelling as
segment ids (real tokens 1, padding 0), so `pallas_kernels.flash_attention` (causal=False) runs when queries and
keys are the same tokens, under the implementation policy (`BertConfig.attention_implementation`). One
difference from Hugging Face's `BertModel`, which masks keys only: our padding queries see only padding keys.
Real tokens get identical results; padding outputs differ (and are never pooled).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efficient import activations, nn
from efficient.attention import core, softmax
from efficient.attention.core import AttentionFn
from efficient.models import config_dict
from pallas_kernels.flash_attention import IMPLEMENTATIONS as FLASH_IMPLEMENTATIONS

ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False),  # Hugging Face's 'gelu' is the erf form
               "gelu_new": lambda x: jax.nn.gelu(x, approximate=True), "relu": jax.nn.relu}
# The same activations keeping int8 codes of their input for the backward (efficient.activations, Mesa).
INT8_SAVED_ACTIVATIONS = {"gelu": activations.int8_saved_gelu,
                          "gelu_new": functools.partial(activations.int8_saved_gelu, approximate=True)}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """A BERT encoder. Defaults are all-MiniLM-L6-v2's (sentence-transformers, from nreimers/MiniLM-L6-H384)."""
  vocab_size: int = 30522
  embed_dim: int = 384
  num_layers: int = 6
  num_heads: int = 12
  mlp_dim: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  norm_eps: float = 1e-12
  activation: str = "gelu"
  pad_id: int = 0
  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  # `pallas_kernels.flash_attention`'s implementation for the self-attention (None: the policy -- Pallas kernels
  # on TPU/GPU, the XLA chunked path on CPU; 'reference': the materialized [T, T] softmax).
  attention_implementation: str | None = None
  init_std: float = 0.02
  # 'int8': the MLP's GELU saves int8 codes of its input for the backward (Mesa); the forward is unchanged.
  saved_activations: str = "float"

  def __post_init__(self):
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "mlp_dim", "max_positions",
                 "type_vocab_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"BertConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"BertConfig.embed_dim ({self.embed_dim}) must be a multiple of num_heads "
                       f"({self.num_heads}).")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"BertConfig.activation={self.activation!r}; choose from {sorted(ACTIVATIONS)}.")
    if self.attention_implementation not in (None, *FLASH_IMPLEMENTATIONS):
      raise ValueError(f"BertConfig.attention_implementation={self.attention_implementation!r}; choose None "
                       f"(the policy) or one of {FLASH_IMPLEMENTATIONS}.")
    activations.check_choice(self.saved_activations, activations.SAVED_ACTIVATIONS,
                             name="BertConfig.saved_activations")
    if self.saved_activations == "int8" and self.activation not in INT8_SAVED_ACTIVATIONS:
      raise ValueError(f"BertConfig.saved_activations='int8' needs activation in {sorted(INT8_SAVED_ACTIVATIONS)}, "
                       f"got activation={self.activation!r}.")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  def replace(self, **changes) -> "BertConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:  # saved_activations left out at its default: existing signatures hold
    return config_dict.to_dict(self, omit_at_default={"saved_activations": "float"})

  def mixer_spec(self) -> core.MixerSpec:
    """The attention layer's spec: multi-head (H_kv = H), no RoPE, non-causal."""
    return core.MixerSpec(embed_dim=self.embed_dim, num_heads=self.num_heads, num_kv_heads=self.num_heads,
                          head_dim=self.head_dim, rope_theta=None, param_dtype=self.param_dtype,
                          compute_dtype=self.compute_dtype, init_std=self.init_std, causal=False,
                          attention_implementation=self.attention_implementation)


MINILM_L6 = BertConfig()
# A random-init encoder small enough for unit tests.
TINY_BERT = BertConfig(vocab_size=128, embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64, max_positions=64)


def encoder_attention_fn(implementation: str | None = None) -> AttentionFn:
  """The encoder's `AttentionFn`: non-causal softmax attention, each query seeing the keys of its segment (a
  padding mask is segments 1/0). `implementation` as `BertConfig.attention_implementation`."""
  return softmax.softmax_attention_fn(None, implementation, causal=False)


def _einsum(equation, shape, names, config, rngs):
  return config.mixer_spec().einsum(equation, shape, names, rngs=rngs, use_bias=True)


def _layer_norm(config):
  return nn.LayerNorm(config.embed_dim, eps=config.norm_eps, param_dtype=config.param_dtype)


class Embeddings(nnx.Module):
  """word + position + token-type embeddings, then LayerNorm."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    c = config
    kwargs = dict(rngs=rngs, param_dtype=c.param_dtype, compute_dtype=jnp.float32, init=nn.normal_init(c.init_std))
    self.word = nn.Embed(c.vocab_size, c.embed_dim, names=("vocab", "embed"), **kwargs)
    self.position = nn.Embed(c.max_positions, c.embed_dim, names=(None, "embed"), **kwargs)
    self.token_type = nn.Embed(c.type_vocab_size, c.embed_dim, names=(None, "embed"), **kwargs)
    self.norm = _layer_norm(c)

  def __call__(self, ids, positions, token_type_ids):
    # Guarded lookups (`efficient.nn.take_rows`): a concrete out-of-range id is a ValueError naming its argument,
    # a traced one reads a row of NaN, never another row.
    word = self.word.lookup(ids, name="ids", bound="vocab_size")
    position = self.position.lookup(positions, name="positions", bound="max_positions")
    token_type = self.token_type.lookup(token_type_ids, name="token_type_ids", bound="type_vocab_size")
    return self.norm(word + position + token_type)


class MLP(nnx.Module):

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    c = config
    self.activation = (INT8_SAVED_ACTIVATIONS if c.saved_activations == "int8" else ACTIVATIONS)[c.activation]
    self.up = _einsum("btd,df->btf", (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c, rngs)  # HF 'intermediate'
    self.down = _einsum("btf,fd->btd", (c.mlp_dim, c.embed_dim), ("mlp", "embed"), c, rngs)  # HF 'output'

  def __call__(self, x):
    return self.down(self.activation(self.up(x).astype(jnp.float32)).astype(x.dtype))


class Block(nnx.Module):
  """Post-LN: x = LN(x + attention(x)); x = LN(x + mlp(x))."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    # q/k/v/o with biases, no RoPE, non-causal: the attention layer every model of this project uses.
    self.attention = softmax.Attention(config.mixer_spec(), rngs=rngs, use_bias=True)
    # Named post_*: these LayerNorms follow their sublayer (post-LN), unlike Llama's attention_norm / mlp_norm,
    # which feed theirs -- so rules that fold into "the norm before q/k/v" (SmoothQuant) never pick the wrong one.
    self.post_attention_norm = _layer_norm(config)
    self.mlp = MLP(config, rngs=rngs)
    self.post_mlp_norm = _layer_norm(config)

  def __call__(self, x, *, positions, segment_ids, attention_fn):
    attended, _ = self.attention(x, positions=positions, segment_ids=segment_ids, attention_fn=attention_fn)
    x = self.post_attention_norm(x + attended)
    return self.post_mlp_norm(x + self.mlp(x))


class Bert(nnx.Module):
  """`model(ids [B, T] int, attention_mask [B, T] (1 real, 0 padding) or None) -> last hidden state
  [B, T, embed_dim]` in float32.

  Keyword-only extras: `token_type_ids` (default 0), `positions` (default 0..T-1) and `segment_ids` (packed
  sequences: tokens attend within their segment; mutually exclusive with `attention_mask`, which is the
  one-segment case), so calibration passes that call `model(tokens, segment_ids=...)` work unchanged.

  `ids` must lie in [0, vocab_size), `token_type_ids` in [0, type_vocab_size), `positions` in
  [0, max_positions). Concrete (non-traced) values outside are a ValueError naming the argument, the bad value
  and the range. Under `jit` (traced inputs) an out-of-range value -- negative ones included -- embeds its token
  as NaN; attention being bidirectional, the NaN reaches every token of its segment (and, where the attention
  kernel multiplies masked zeros by the NaN values, as the XLA and reference paths do, the rest of its row),
  never another batch row; no out-of-range value ever reads another row's embedding.
  """

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, attention_fn: AttentionFn | None = None):
    self.config = config
    self.attention_fn = attention_fn  # None: each layer's own (`encoder_attention_fn` of the config's choice)
    self.embeddings = Embeddings(config, rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])

  def __call__(self, ids, attention_mask=None, *, token_type_ids=None, positions=None, segment_ids=None):
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"ids must be an integer array [batch, length], got {ids.dtype}{ids.shape}.")
    batch, length = ids.shape
    if length > self.config.max_positions:
      raise ValueError(f"ids: length {length} exceeds max_positions={self.config.max_positions}.")
    if attention_mask is not None and segment_ids is not None:
      raise ValueError("attention_mask and segment_ids are exclusive: a padding mask is segment ids 1/0.")
    for name, value in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                        ("positions", positions), ("segment_ids", segment_ids)):
      if value is not None and tuple(jnp.shape(value)) != (batch, length):
        raise ValueError(f"{name} must have the shape of ids {(batch, length)}, got {tuple(jnp.shape(value))}.")
    if attention_mask is not None:
      segment_ids = (jnp.asarray(attention_mask) > 0).astype(jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if token_type_ids is None:
      token_type_ids = jnp.zeros((batch, length), jnp.int32)
    x = self.embeddings(ids, positions, token_type_ids).astype(self.config.compute_dtype)
    for block in self.blocks:
      x = block(x, positions=positions, segment_ids=segment_ids, attention_fn=self.attention_fn)
    return x.astype(jnp.float32)


def mean_pool_normalize(hidden, attention_mask):
  """sentence-transformers' recipe: the mean of the real tokens' hidden states, L2-normalized -> [B, D] f32."""
  mask = jnp.asarray(attention_mask, jnp.float32)[..., None]
  summed = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
  mean = summed / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)  # sentence-transformers clamps the count at 1e-9
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)  # torch F.normalize's eps


@functools.partial(jax.jit, static_argnums=0)
def _embed_jit(graphdef, state, ids, attention_mask):
  return mean_pool_normalize(nnx.merge(graphdef, state)(ids, attention_mask), attention_mask)


def embed(model: Bert, ids, attention_mask) -> jax.Array:
  """Sentence embeddings [B, D] f32 of token ids [B, T] and their mask (jitted over the split model state)."""
  graphdef, state = nnx.split(model)
  return _embed_jit(graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32))
