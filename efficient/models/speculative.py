"""Speculative decoding: a cheap draft proposes k tokens, the target verifies them in ONE call and keeps a prefix.

    tokens, stats = speculative_generate(target, prompt, 64, draft=PromptLookupDraft(), num_draft_tokens=4)

Each step feeds the target [pending token, d_1 .. d_k] (k + 1 tokens, one `model(tokens, cache=cache)` call) and
reads k + 1 next-token distributions p_0 .. p_k. Greedy (temperature 0): d_i is kept while it equals argmax p_{i-1};
the first mismatch is replaced by the target's argmax, and when all k are kept p_k gives a bonus token -- so the
output is exactly `llama.generate`'s greedy output. Sampling: the standard rejection rule (Leviathan et al.; Chen
et al.): keep d_i with probability min(1, p(d_i) / q(d_i)), else draw from norm(max(p - q, 0)); a deterministic
draft has q = one-hot(d_i). Every emitted token is then an exact sample of the target distribution (with the same
temperature / top_k as `llama.sample_token`).

Batches: the cache index is one scalar for all rows, so a step keeps the MINIMUM accepted count n over rows. A row
that accepted more emits its own verdict at position n + 1 (its accepted draft, an exact sample there) and drops
the rest; a row that rejected at n + 1 emits its correction. Both are exact target samples given the prefix, and the
stopping point only depends on acceptance events up to it, so greedy and sampling stay exact; batches just accept
fewer tokens per call than single rows would.

Cache rollback after a rejection: layer caches that declare `rollback_safe = True` (the float KV cache and the paged
cache `efficient.attention.paged.PagedKV`, float or int8/int4 pages: slots past the new index are overwritten before
any query reads them) are rolled back by resetting the index and marking the dropped slots' positions EMPTY. Any other cache (int8/int4 `QuantizedKVCache`, whose groups may have been
quantized with rejected keys; window ring buffers; recurrent states) is re-fed the accepted tokens from the
pre-verification cache: one extra target call, counted in `stats['refeed_calls']`.

Drafts implement `start(prompt, max_len) -> state` and `propose(state, context, length, num_tokens, *, rng,
temperature, top_k) -> (tokens [B, k], probs [B, k, V] or None for deterministic drafts, state)`, where `context`
[B, S] holds the `length` tokens decoded so far (prompt included) and `vocab_size` is the vocabulary it proposes
from (None: whatever the context holds).
  PromptLookupDraft  copies what followed the latest earlier occurrence of the context's longest suffix n-gram
  ModelDraft         any smaller Llama with the target's vocabulary (its own float KV cache)
  SelfDraft          early exit: the target's first `num_layers` blocks + a head (default the target's own final
                     norm and output head; `fit_self_draft_head` fits a ridge-regression head on teacher logits)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient import nn
from efficient.models import llama

__all__ = ["speculative_generate", "PromptLookupDraft", "ModelDraft", "SelfDraft", "fit_self_draft_head",
           "rollback_cache", "is_rollback_safe"]


# --- cache bookkeeping ---------------------------------------------------------------------------------------------

def is_rollback_safe(cache: dict) -> bool:
  """Whether every layer cache of a model cache says (`rollback_safe = True`) that moving the index back is enough."""
  return all(getattr(layer, "rollback_safe", False) for layer in cache["layers"])


def rollback_cache(cache: dict, index) -> dict:
  """The model cache with `index` moved back and the positions of slots >= index reset to EMPTY_POSITION (only
  valid for rollback-safe layer caches, see `is_rollback_safe`)."""
  slots = jnp.arange(cache["positions"].shape[1], dtype=jnp.int32)
  positions = jnp.where(slots[None, :] >= index, llama.EMPTY_POSITION, cache["positions"])
  return {**cache, "index": jnp.asarray(index, jnp.int32), "positions": positions}


# --- distributions -------------------------------------------------------------------------------------------------

def _probs(logits, temperature: float, top_k: int | None):
  """The distribution `llama.sample_token` samples from (temperature > 0), as probabilities."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.nn.softmax(logits, axis=-1)


def _sample(probs, rng):
  return jax.random.categorical(rng, jnp.log(probs), axis=-1).astype(jnp.int32)


# --- drafts --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptLookupDraft:
  """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (n = max_ngram .. 1, longest
  first) and propose the tokens that followed it (continued periodically when the match runs into the end); with no
  match at all, repeat the last token. Deterministic (q = one-hot), no model call."""
  max_ngram: int = 3
  vocab_size = None

  def __post_init__(self):
    if isinstance(self.max_ngram, bool) or not isinstance(self.max_ngram, int) or self.max_ngram < 1:
      raise ValueError(f"max_ngram must be an int >= 1, got {self.max_ngram!r}.")

  def start(self, prompt, max_len):
    return None

  def propose(self, state, context, length, num_tokens, *, rng=None, temperature=0.0, top_k=None):
    return _lookup(context, jnp.asarray(length, jnp.int32), max_ngram=self.max_ngram,
                   num_tokens=num_tokens), None, state


@functools.partial(jax.jit, static_argnames=("max_ngram", "num_tokens"))
def _lookup(context, length, *, max_ngram, num_tokens):
  batch, size = context.shape
  starts = jnp.arange(size, dtype=jnp.int32)
  best_start = jnp.full((batch,), -1, jnp.int32)  # start j of the chosen earlier match
  best_n = jnp.zeros((batch,), jnp.int32)
  for n in range(1, max_ngram + 1):  # longer n-grams overwrite shorter ones' matches
    suffix = jax.lax.dynamic_slice_in_dim(context, jnp.maximum(length - n, 0), n, axis=1)  # [B, n]
    match = jnp.ones((batch, size), bool)
    for i in range(n):
      shifted = jnp.roll(context, -i, axis=1)  # shifted[:, j] = context[:, j + i]
      match &= shifted == suffix[:, i:i + 1]
    # an earlier occurrence that leaves at least one following token before the suffix: j + n < length
    match &= (starts[None, :] + n < length) & (length - n >= 0)
    latest = jnp.max(jnp.where(match, starts[None, :], -1), axis=1)
    found = latest >= 0
    best_start = jnp.where(found, latest, best_start)
    best_n = jnp.where(found, n, best_n)
  # The token that followed the match sits at j + n = length - period; past the context, continue periodically.
  period = jnp.maximum(length - best_n - best_start, 1)
  offsets = jnp.arange(num_tokens, dtype=jnp.int32)[None, :] % period[:, None]
  index = length - period[:, None] + offsets
  proposals = jnp.take_along_axis(context, jnp.clip(index, 0, size - 1), axis=1)
  last = jax.lax.dynamic_slice_in_dim(context, length - 1, 1, axis=1)
  return jnp.where((best_start >= 0)[:, None], proposals, last).astype(jnp.int32)


class ModelDraft:
  """A smaller Llama sharing the target's tokenizer (same vocab_size; checked by `speculative_generate`). It keeps
  its own float KV cache, rolled back to the accepted context at every proposal: each `propose` feeds the last two
  context tokens (re-writing one slot keeps the shape fixed whether 0 or k drafts were accepted) and then k - 1
  drafted tokens, all in one jitted call. Greedy: proposes its argmax; sampling: samples q (same temperature and
  top_k as the target) and returns q."""

  def __init__(self, model: llama.Llama):
    if not isinstance(model, llama.Llama):
      raise ValueError(f"draft model must be an efficient.models.llama.Llama, got {type(model).__name__}.")
    self.model = model
    self.vocab_size = model.config.vocab_size
    self._graphdef, self._state = nnx.split(model)

  def start(self, prompt, max_len):
    if max_len > self.model.config.max_seq_len:
      raise ValueError(f"draft: needs {max_len} positions, more than its max_seq_len={self.model.config.max_seq_len}.")
    shapes = jax.eval_shape(lambda: llama.init_cache(self.model.config, prompt.shape[0], max_len))
    if not is_rollback_safe(shapes):
      raise ValueError(f"draft: every layer's cache must be rollback-safe (float softmax KV); layer kinds are "
                       f"{self.model.config.layer_kinds()}.")
    # the cache holds all but the last two context tokens before each proposal
    return _draft_start(self._graphdef, self._state, jnp.asarray(prompt, jnp.int32), max_len=max_len)

  def propose(self, state, context, length, num_tokens, *, rng=None, temperature=0.0, top_k=None):
    rng = jax.random.key(0) if rng is None else rng
    tokens, probs, cache = _draft_step(self._graphdef, self._state, state, context, jnp.asarray(length, jnp.int32),
                                       rng, num_tokens=num_tokens, temperature=float(temperature), top_k=top_k)
    return tokens, probs, cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill(graphdef, state, cache, tokens):
  return nnx.merge(graphdef, state)(tokens, cache=cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _draft_start(graphdef, state, prompt, *, max_len):
  model = nnx.merge(graphdef, state)
  cache = llama.init_cache(model.config, prompt.shape[0], max_len)
  return cache if prompt.shape[1] == 1 else model(prompt[:, :-1], cache=cache)[1]


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "temperature", "top_k"))
def _draft_step(graphdef, state, cache, context, length, rng, *, num_tokens, temperature, top_k):
  model = nnx.merge(graphdef, state)
  cache = rollback_cache(cache, length - 2)
  last_two = jax.lax.dynamic_slice_in_dim(context, length - 2, 2, axis=1)
  logits, cache = model(last_two, cache=cache)

  def choose(logits, rng):
    if temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    probs = _probs(logits, temperature, top_k)
    return _sample(probs, rng), probs

  rngs = jax.random.split(rng, num_tokens)
  first, first_probs = choose(logits[:, -1], rngs[0])

  def step(carry, step_rng):
    token, cache = carry
    logits, cache = model(token[:, None], cache=cache)
    token, probs = choose(logits[:, -1], step_rng)
    return (token, cache), (token, probs)

  (_, cache), (rest, rest_probs) = jax.lax.scan(step, (first, cache), rngs[1:])
  tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
  probs = None if first_probs is None else jnp.concatenate([first_probs[:, None],
                                                            jnp.swapaxes(rest_probs, 0, 1)], axis=1)
  return tokens, probs, cache


def _truncated(target: llama.Llama, num_layers: int, head) -> llama.Llama:
  """A Llama made of the target's embedding, first `num_layers` blocks and final norm (shared, not copied), with
  the target's output head or `head` [embed, vocab]."""
  config = target.config
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers < config.num_layers:
    raise ValueError(f"num_layers must be an int in [1, {config.num_layers}) (the target's layers), got "
                     f"{num_layers!r}.")
  if head is not None and tuple(jnp.shape(head)) != (config.embed_dim, config.vocab_size):
    raise ValueError(f"head must be [embed_dim, vocab_size] = {(config.embed_dim, config.vocab_size)}, got "
                     f"{jnp.shape(head)}.")
  tied = head is None and config.tie_embeddings
  small = config.replace(num_layers=num_layers, tie_embeddings=tied,
                         attention_schedule=None if config.attention_schedule is None else
                         ",".join(config.layer_kinds()[:num_layers]))
  shell = nnx.eval_shape(lambda: llama.Llama(small, rngs=nnx.Rngs(0)))  # structure only; parameters come next
  shell.embedding = target.embedding
  shell.blocks = nnx.List(list(target.blocks)[:num_layers])
  shell.final_norm = target.final_norm
  shell.attention_fn = target.attention_fn
  if not tied:
    shell.lm_head = nn.logical_param(jnp.asarray(head, config.param_dtype), ("embed", "vocab")) if head is not None \
        else target.lm_head
  return shell


class SelfDraft(ModelDraft):
  """Early-exit self-speculation (LayerSkip/S3D-style, without training): the target's first `num_layers` blocks
  and a head -- by default the target's final norm and output head, or `head` [embed, vocab] (e.g. from
  `fit_self_draft_head`). The draft keeps its own cache of those layers (the target recomputes them when it
  verifies)."""

  def __init__(self, target: llama.Llama, num_layers: int, head=None):
    super().__init__(_truncated(target, num_layers, head))
    self.num_layers = num_layers


def fit_self_draft_head(target: llama.Llama, num_layers: int, batches, *, ridge: float = 1e-2) -> jax.Array:
  """A head [embed, vocab] for `SelfDraft(target, num_layers, head=...)`: ridge regression of the target's logits
  on the early exit's normed hidden states (the target's final norm after `num_layers` blocks) over `batches` of
  tokens [B, T]: W = (H^T H + ridge * mean(diag) * I)^-1 H^T Z."""
  if not ridge > 0:
    raise ValueError(f"ridge must be > 0, got {ridge}.")
  dim = target.config.embed_dim
  early = _truncated(target, num_layers, None)
  # An identity head makes the early exit return its normed hidden state [B, T, embed] as its "logits".
  early.config = early.config.replace(tie_embeddings=False)
  early.lm_head = nnx.Param(jnp.eye(dim, dtype=target.config.param_dtype))
  hidden_of = nnx.jit(lambda m, tokens: m(tokens))
  teacher = nnx.jit(lambda m, tokens: m(tokens))
  gram = jnp.zeros((dim, dim), jnp.float32)
  cross = jnp.zeros((dim, target.config.vocab_size), jnp.float32)
  count = 0
  for tokens in batches:
    tokens = jnp.asarray(tokens, jnp.int32)
    h = hidden_of(early, tokens).reshape(-1, dim)
    z = teacher(target, tokens).reshape(h.shape[0], -1)
    gram, cross, count = gram + h.T @ h, cross + h.T @ z, count + h.shape[0]
  if count == 0:
    raise ValueError("batches holds no tokens.")
  scale = jnp.mean(jnp.diag(gram))
  return jnp.linalg.solve(gram + ridge * scale * jnp.eye(dim), cross)


# --- verification --------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "temperature", "top_k", "kv_format",
                                             "kv_group_size"))
def _start(graphdef, state, prompt, rng, *, max_len, temperature, top_k, kv_format, kv_group_size):
  """Prefill the target's new cache with the prompt and sample the first token: (context [B, max_len + 1] holding
  prompt + first token, the cache, the next rng). One compiled call instead of a string of eager ops."""
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt.shape
  cache = llama.init_cache(model.config, batch, max_len, kv_format=kv_format, kv_group_size=kv_group_size)
  logits, cache = model(prompt, cache=cache)
  rng, first_rng = jax.random.split(rng)
  first = llama.sample_token(logits[:, -1], first_rng, temperature=temperature, top_k=top_k)
  context = jnp.zeros((batch, max_len + 1), jnp.int32).at[:, :prompt_len].set(prompt).at[:, prompt_len].set(first)
  return context, cache, rng


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k", "rollback"))
def _verify(graphdef, state, cache, context, length, drafts, draft_probs, rng, *, temperature, top_k, rollback):
  """One target call on [pending, d_1..d_k]; returns (n kept drafts (min over rows), per-row kept counts, the
  context with the n + 1 new tokens written at `length` (k + 1 slots written; those past n + 1 are junk that the
  next step overwrites), the cache after it (rolled back when `rollback`))."""
  model = nnx.merge(graphdef, state)
  k = drafts.shape[1]
  pending = jax.lax.dynamic_slice_in_dim(context, length - 1, 1, axis=1)
  start = cache["index"]
  logits, new_cache = model(jnp.concatenate([pending, drafts], axis=1), cache=cache)  # [B, k + 1, V]
  if temperature == 0.0:
    corrections = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    kept = drafts == corrections[:, :k]
  else:
    accept_rng, residual_rng, bonus_rng = jax.random.split(rng, 3)
    p = _probs(logits, temperature, top_k)
    q = jax.nn.one_hot(drafts, p.shape[-1], dtype=p.dtype) if draft_probs is None else draft_probs
    p_draft = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    kept = jax.random.uniform(accept_rng, drafts.shape) * q_draft < p_draft  # prob min(1, p/q)
    residual = jnp.maximum(p[:, :k] - q, 0.0)
    mass = residual.sum(-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p[:, :k])  # mass 0: p == q, never used
    corrections = jnp.concatenate([_sample(residual, residual_rng), _sample(p[:, k:], bonus_rng)], axis=1)
  row_kept = jnp.cumprod(kept.astype(jnp.int32), axis=1).sum(axis=1)  # leading kept drafts per row
  n = jnp.min(row_kept)
  padded = jnp.concatenate([drafts, jnp.zeros_like(drafts[:, :1])], axis=1)
  at_n = jax.lax.dynamic_slice_in_dim(padded, n, 1, axis=1)[:, 0]
  # a row that kept its draft at position n emits it (an exact sample there); otherwise its correction
  token_n = jnp.where(row_kept > n, at_n, jax.lax.dynamic_slice_in_dim(corrections, n, 1, axis=1)[:, 0])
  new_tokens = jnp.where(jnp.arange(k + 1)[None, :] == n, token_n[:, None], padded)
  context = jax.lax.dynamic_update_slice_in_dim(context, new_tokens, length, axis=1)
  if rollback:
    new_cache = rollback_cache(new_cache, start + n + 1)
  return n, row_kept, context, new_cache


def _check_sampling(vocab_size, temperature, top_k, num_draft_tokens, rng):
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}.")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                            or not 1 <= top_k <= vocab_size):
    raise ValueError(f"top_k must be an int in [1, vocab_size={vocab_size}], got {top_k!r}.")
  if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, (int, np.integer)) \
      or num_draft_tokens < 1:
    raise ValueError(f"num_draft_tokens must be an int >= 1, got {num_draft_tokens!r}.")
  if temperature > 0 and rng is None:
    raise ValueError("rng is required when temperature > 0.")


def speculative_generate(target: llama.Llama, prompt, max_new_tokens: int, *, draft, num_draft_tokens: int = 4,
                         temperature: float = 0.0, top_k: int | None = None, rng: jax.Array | None = None,
                         eos_id: int | None = None, kv_format: Any = None, kv_group_size: int | None = None,
                         ) -> tuple[jax.Array, dict]:
  """`llama.generate` with a draft: returns (tokens [B, max_new_tokens], stats).

  Greedy output equals `llama.generate(target, prompt, max_new_tokens, kv_format=..., eos_id=...)`; sampling draws
  from the same distribution (see the module docstring). `kv_format`: the target cache's storage, as for
  `llama.init_cache` (None, 'int8', 'int4', or a `KVFormat` such as `PagedKV(...)`). The target cache needs `num_draft_tokens` slots beyond
  prompt + max_new_tokens (so that much below the model's max_seq_len). stats: target_calls (prefill included;
  `generate` makes max_new_tokens), verify_calls, refeed_calls (non-rollback-safe caches), draft_calls (proposals),
  proposed / accepted draft tokens, acceptance_rate, accepted_per_target_call (accepted drafts per verification),
  tokens_per_target_call, target_calls_per_token.
  """
  if not isinstance(target, llama.Llama):
    raise ValueError(f"target must be an efficient.models.llama.Llama, got {type(target).__name__}.")
  config = target.config
  if not (hasattr(draft, "propose") and hasattr(draft, "start")):
    raise ValueError(f"draft must have start(prompt, max_len) and propose(...) (e.g. PromptLookupDraft, ModelDraft, "
                     f"SelfDraft), got {type(draft).__name__}.")
  draft_vocab = getattr(draft, "vocab_size", None)
  if draft_vocab is not None and draft_vocab != config.vocab_size:
    raise ValueError(f"draft proposes from a vocabulary of {draft_vocab} tokens; the target's is "
                     f"{config.vocab_size} (a draft must share the target's tokenizer).")
  if jnp.ndim(prompt) != 2 or jnp.shape(prompt)[1] < 1:
    raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {jnp.shape(prompt)}.")
  nn.check_ids(prompt, config.vocab_size, name="prompt", bound="vocab_size")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
  if eos_id is not None and not 0 <= eos_id < config.vocab_size:
    raise ValueError(f"eos_id must be in [0, vocab_size={config.vocab_size}), got {eos_id}.")
  _check_sampling(config.vocab_size, temperature, top_k, num_draft_tokens, rng)
  temperature, k = float(temperature), int(num_draft_tokens)
  prompt = jnp.asarray(prompt, jnp.int32)
  prompt_len = prompt.shape[1]
  max_len = prompt_len + max_new_tokens + k
  if max_len > config.max_seq_len:
    raise ValueError(f"max_new_tokens={max_new_tokens}: prompt ({prompt_len}) + max_new_tokens + num_draft_tokens "
                     f"({k}) = {max_len} positions exceed the target's max_seq_len={config.max_seq_len}.")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(target)
  context, cache, rng = _start(graphdef, state, prompt, rng, max_len=max_len, temperature=temperature, top_k=top_k,
                               kv_format=kv_format, kv_group_size=kv_group_size)
  rollback = is_rollback_safe(cache)
  length = prompt_len + 1
  draft_state = draft.start(prompt, max_len)
  stats = dict(target_calls=1, verify_calls=0, refeed_calls=0, draft_calls=0, proposed=0, accepted=0)
  while length - prompt_len < max_new_tokens:
    rng, draft_rng, verify_rng = jax.random.split(rng, 3)
    drafts, draft_probs, draft_state = draft.propose(draft_state, context, length, k, rng=draft_rng,
                                                     temperature=temperature, top_k=top_k)
    n, _, new_context, new_cache = _verify(graphdef, state, cache, context, jnp.asarray(length, jnp.int32),
                                           jnp.asarray(drafts, jnp.int32), draft_probs, verify_rng,
                                           temperature=temperature, top_k=top_k, rollback=rollback)
    n = int(n)
    stats["draft_calls"] += 1
    stats["verify_calls"] += 1
    stats["proposed"] += k
    stats["accepted"] += n
    if rollback or n == k:
      cache = new_cache
    else:  # re-feed pending + the n kept drafts to the cache as it was before the verification
      kept = jax.lax.dynamic_slice_in_dim(new_context, jnp.int32(length - 1), n + 1, axis=1)  # traced start:
      cache = _prefill(graphdef, state, cache, kept)[1]  # one compile per n, not per position
      stats["refeed_calls"] += 1
    context, length = new_context, length + n + 1
    if eos_id is not None and (np.asarray(context)[:, prompt_len:length] == eos_id).any(axis=1).all():
      break
  stats["target_calls"] += stats["verify_calls"] + stats["refeed_calls"]
  tokens = context[:, prompt_len:prompt_len + max_new_tokens]
  if length - prompt_len < max_new_tokens:  # stopped early: every row has emitted eos
    tokens = tokens.at[:, length - prompt_len:].set(eos_id)
  if eos_id is not None:  # as generate: after a row's first eos it keeps emitting eos
    seen = jnp.cumsum(tokens == eos_id, axis=1) - (tokens == eos_id) > 0
    tokens = jnp.where(seen, eos_id, tokens)
  verify = max(stats["verify_calls"], 1)
  stats.update(generated=int(max_new_tokens), acceptance_rate=stats["accepted"] / max(stats["proposed"], 1),
               accepted_per_target_call=stats["accepted"] / verify,
               tokens_per_target_call=max_new_tokens / stats["target_calls"],
               target_calls_per_token=stats["target_calls"] / max_new_tokens)
  return tokens, stats
