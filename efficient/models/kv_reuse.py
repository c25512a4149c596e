"""Reuse a cached prompt after an edit in its middle (PIE: positional integrity encoding).

`edit_cached_prompt(model, cache, old_tokens, new_tokens)` keeps the KV of the common prefix as it is, recomputes
the edited span (it sees only the prefix, so it is exact), moves the KV of the unchanged suffix by the length
change with its keys re-rotated (`efficient.attention.reuse.rerotate_cache`), and recomputes the last token so the
caller gets next-token logits. The re-rotated suffix is approximate: its hidden states were computed with the old
span in context (PIE's premise is that this matters little); the prefix and the span are exact. An edit at the
end (no common suffix) is therefore exact. `stale=True` moves the suffix without re-rotating it (the naive
reuse baseline), `full_prefill` is the recomputation to compare against.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient.attention import cache as cache_lib
from efficient.attention import reuse
from efficient.models import llama


@dataclasses.dataclass
class EditResult:
  logits: jax.Array  # [1, V] next-token logits after the edited prompt
  cache: dict        # the cache of the edited prompt (index = len(new_tokens))
  prefix: int        # tokens whose KV was kept as it was
  recomputed: int    # tokens run through the model (edited span + the last token)
  reused_suffix: int  # tokens whose KV was moved (and re-rotated unless stale)
  delta: int         # len(new) - len(old)

  @property
  def compute_saved(self) -> float:
    """Fraction of a full prefill's tokens not recomputed."""
    total = self.prefix + self.recomputed + self.reused_suffix
    return 1.0 - self.recomputed / total


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _run(graphdef, state, tokens, cache):
  return nnx.merge(graphdef, state)(tokens, cache=cache)


def _as_row(tokens, name):
  tokens = np.asarray(tokens)
  if tokens.ndim == 2 and tokens.shape[0] == 1:
    tokens = tokens[0]
  if tokens.ndim != 1 or tokens.size < 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{name} must be one prompt of integer ids, [T] or [1, T] with T >= 1, got "
                     f"{tokens.dtype}{tokens.shape}.")
  return tokens


def edit_span(old_tokens, new_tokens) -> tuple[int, int]:
  """(common prefix length p, common suffix length s) with p + s <= min(len(old), len(new)) and p < len(new)."""
  old, new = _as_row(old_tokens, "old_tokens"), _as_row(new_tokens, "new_tokens")
  shortest = min(len(old), len(new))
  prefix = int(np.argmin(old[:shortest] == new[:shortest])) if (old[:shortest] != new[:shortest]).any() \
      else shortest
  prefix = min(prefix, len(new) - 1)  # the last token is always recomputed (its logits are the output)
  tail = shortest - prefix
  same = old[len(old) - tail:][::-1] == new[len(new) - tail:][::-1]
  suffix = int(np.argmin(same)) if (~same).any() else tail
  return prefix, suffix


def full_prefill(model: llama.Llama, tokens, max_len: int):
  """(next-token logits [1, V], cache) of `tokens` prefilled from scratch into a float cache of max_len slots."""
  tokens = jnp.asarray(_as_row(tokens, "tokens"), jnp.int32)[None]
  graphdef, state = nnx.split(model)
  logits, cache = _run(graphdef, state, tokens, llama.init_cache(model.config, 1, max_len))
  return logits[:, -1], cache


def edit_cached_prompt(model: llama.Llama, cache: dict, old_tokens, new_tokens, *, stale: bool = False
                       ) -> EditResult:
  """The cache and next-token logits of `new_tokens` from `cache` holding exactly `old_tokens` (see the module
  docstring). `cache` must be a contiguous float cache (`llama.init_cache(..., kv_format=None)`), batch 1."""
  old, new = _as_row(old_tokens, "old_tokens"), _as_row(new_tokens, "new_tokens")
  if not all(isinstance(layer, cache_lib.FloatKVCache) for layer in cache["layers"]):
    raise ValueError("cache: edit_cached_prompt needs a contiguous float KV cache in every layer "
                     "(llama.init_cache(config, 1, max_len)).")
  if cache["positions"].shape[0] != 1 or int(cache["index"]) != len(old):
    raise ValueError(f"cache must hold exactly old_tokens (batch 1, index {len(old)}), got batch "
                     f"{cache['positions'].shape[0]}, index {int(cache['index'])}.")
  if len(new) > cache["positions"].shape[1]:
    raise ValueError(f"new_tokens: {len(new)} tokens exceed the cache's {cache['positions'].shape[1]} slots.")
  prefix, suffix = edit_span(old, new)
  delta = len(new) - len(old)
  rope_theta = model.config.rope_theta
  if suffix:
    # Move the suffix (and the old last token, to be overwritten) to its new place, keys re-rotated.
    cache = reuse.rerotate_cache(cache, delta, rope_theta=rope_theta, start=len(old) - suffix, rotate=not stale)
  graphdef, state = nnx.split(model)
  span_end = len(new) - suffix if suffix else len(new)
  logits = None
  if span_end > prefix:
    cache = {**cache, "index": jnp.int32(prefix)}
    logits, cache = _run(graphdef, state, jnp.asarray(new[prefix:span_end], jnp.int32)[None], cache)
  if suffix:
    cache = {**cache, "index": jnp.int32(len(new) - 1)}
    logits, cache = _run(graphdef, state, jnp.asarray(new[-1:], jnp.int32)[None], cache)
  recomputed = (span_end - prefix) + (1 if suffix else 0)
  return EditResult(logits=logits[:, -1], cache=cache, prefix=prefix, recomputed=recomputed,
                    reused_suffix=len(new) - prefix - recomputed, delta=delta)

