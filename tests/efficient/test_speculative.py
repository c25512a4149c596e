"""Speculative decoding (efficient.models.speculative): greedy output == llama.generate for every draft, for the
float, int8 (re-fed) and paged int8 (rolled back in place) caches, for int8 weights, and on SmolLM2-135M (slow);
stats; sampling preserves the target distribution (exact enumeration on a vocabulary of 8, and a rule that skips
the rejection step fails the same check); the prompt-lookup draft vs a NumPy re-derivation; rollback bookkeeping;
bad input."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient import quant
from efficient.attention.paged import PagedKV
from efficient.models import llama
from efficient.models import speculative as sp
from efficient.quant import kv_cache

CONFIG = llama.TINY.replace(init_std=0.3, max_seq_len=64)  # std 0.3: varied greedy outputs, not one repeated id
NEW = 12
K = 3
_forward = nnx.jit(lambda model, tokens: model(tokens))


@pytest.fixture(scope="module")
def target():
  return llama.Llama(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def near_draft(target):
  """The target with small noise on every parameter: agrees often, not always (partial acceptance)."""
  graphdef, state = nnx.split(target)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  noisy = [x + 0.03 * jnp.std(x) * jax.random.normal(key, x.shape) for x, key in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))


@pytest.fixture(scope="module")
def prompt(target):
  # The prompt ends with a repeat of its start, so prompt lookup finds matches.
  start = jax.random.randint(jax.random.key(1), (2, 10), 0, CONFIG.vocab_size, dtype=jnp.int32)
  return jnp.concatenate([start, start[:, :4]], axis=1)  # [2, 14]


def _check_stats(stats):
  assert 0 <= stats["accepted"] <= stats["proposed"] == K * stats["verify_calls"], stats
  assert stats["target_calls"] == 1 + stats["verify_calls"] + stats["refeed_calls"]
  # every verification emits accepted + 1 tokens; the first token comes from the prefill
  assert NEW <= 1 + stats["accepted"] + stats["verify_calls"] < NEW + K + 1


def test_greedy_equals_generate_for_every_draft(target, near_draft, prompt):
  expected = llama.generate(target, prompt, NEW)
  drafts = {"lookup": sp.PromptLookupDraft(max_ngram=2), "model": sp.ModelDraft(near_draft),
            "self": sp.SelfDraft(target, 1)}
  accepted = {}
  for name, draft in drafts.items():
    tokens, stats = sp.speculative_generate(target, prompt, NEW, draft=draft, num_draft_tokens=K)
    np.testing.assert_array_equal(tokens, expected, err_msg=name)
    _check_stats(stats)
    assert stats["refeed_calls"] == 0, name  # a float cache rolls back in place
    accepted[name] = stats["accepted"]
  assert 0 < accepted["model"] < K * NEW, accepted  # a real mix of kept and rejected drafts


def test_greedy_with_refed_int8_cache(target, near_draft, prompt):
  """The contiguous int8 cache (K quantized per channel over groups of slots: not rollback-safe) is re-fed the
  accepted tokens after a partial acceptance, and still gives generate's tokens."""
  expected = llama.generate(target, prompt, NEW, kv_format="int8", kv_group_size=4)
  tokens, stats = sp.speculative_generate(target, prompt, NEW, draft=sp.ModelDraft(near_draft), num_draft_tokens=K,
                                          kv_format="int8", kv_group_size=4)
  np.testing.assert_array_equal(tokens, expected)
  _check_stats(stats)
  assert 0 < stats["accepted"] < stats["proposed"] and stats["refeed_calls"] > 0, stats


def test_greedy_with_int8_weights_paged_int8_cache_and_eos(target, near_draft, prompt):
  """Quantized weights and a quantized paged cache (per-token codes: rolled back in place, no re-feed), with an
  eos that row 0 hits mid-way (it must then keep emitting eos, as generate does)."""
  model = quant.quantize_model(nnx.clone(target), [(".*", quant.QuantConfig(fmt="int8"))])
  paged = PagedKV(page_size=4, storage="int8")
  run = lambda draft, eos: sp.speculative_generate(model, prompt, NEW, draft=draft, num_draft_tokens=K,
                                                   kv_format=paged, eos_id=eos)
  eos = int(run(sp.ModelDraft(near_draft), None)[0][0, 3])
  expected = llama.generate(model, prompt, NEW, kv_format=paged, eos_id=eos)
  assert (np.asarray(expected[0, 3:]) == eos).all()
  for draft in (sp.ModelDraft(near_draft), sp.PromptLookupDraft()):
    tokens, stats = run(draft, eos)
    np.testing.assert_array_equal(tokens, expected)
    assert stats["refeed_calls"] == 0, stats


@pytest.mark.slow
def test_greedy_equals_generate_on_smollm2(smollm2, smollm2_golden):
  """SmolLM2-135M, prompt lookup: token-identical to generate (and to transformers' greedy continuation). The
  generate call is the golden test's own (compiled once per session)."""
  generation = smollm2_golden["generation"]
  prompt = jnp.asarray([generation["prompt_ids"]], jnp.int32)
  new = len(generation["tokens"])
  expected = llama.generate(smollm2.model, prompt, new)
  tokens, stats = sp.speculative_generate(smollm2.model, prompt, new, draft=sp.PromptLookupDraft(), num_draft_tokens=K)
  np.testing.assert_array_equal(tokens, expected)
  assert np.asarray(tokens[0]).tolist() == generation["tokens"]
  assert stats["accepted"] > 0 and stats["target_calls"] < new, stats  # the continuation repeats "primary colors"


def test_target_as_its_own_draft_accepts_everything(target, prompt):
  tokens, stats = sp.speculative_generate(target, prompt, NEW, draft=sp.ModelDraft(target), num_draft_tokens=K)
  np.testing.assert_array_equal(tokens, llama.generate(target, prompt, NEW))
  # NEW - 1 tokens after the prefill's, K + 1 per verification
  assert stats["accepted"] == stats["proposed"] and stats["verify_calls"] == -(-(NEW - 1) // (K + 1))
  assert stats["refeed_calls"] == 0 and stats["accepted_per_target_call"] == K
  assert stats["target_calls_per_token"] == (1 + stats["verify_calls"]) / NEW


def _numpy_lookup(row, length, max_ngram, k):
  """Independent prompt lookup: longest n first, latest earlier start j with j + n < length."""
  row = list(row[:length])
  for n in range(max_ngram, 0, -1):
    if n > length:
      continue
    suffix = row[length - n:]
    for j in range(length - n - 1, -1, -1):
      if row[j:j + n] == suffix:
        out = []
        for i in range(k):  # what followed, continued periodically past the end of the context
          source = j + n + i
          out.append(row[source] if source < length else out[source - length])
        return out
  return [row[-1]] * k


def test_prompt_lookup_matches_numpy():
  rng = np.random.default_rng(0)
  draft = sp.PromptLookupDraft(max_ngram=3)
  for trial in range(6):
    context = rng.integers(0, 4, size=(3, 20)).astype(np.int32)  # small alphabet: many matches
    context[2, :] = [5, 6, 7] * 6 + [5, 6]  # a periodic row: continuation runs past the end
    for length in (1, 2, 9, 20):
      got, probs, _ = draft.propose(None, jnp.asarray(context), length, 5)
      assert probs is None
      expected = [_numpy_lookup(row, length, 3, 5) for row in context]
      np.testing.assert_array_equal(got, expected, err_msg=f"trial {trial} length {length}")


def test_rollback_bookkeeping():
  cache = llama.init_cache(CONFIG, 2, 10)
  cache = {**cache, "index": jnp.int32(6),  # as after 6 tokens: positions 0..5 written
           "positions": cache["positions"].at[:, :6].set(jnp.arange(6, dtype=jnp.int32))}
  rolled = sp.rollback_cache(cache, 4)
  assert int(rolled["index"]) == 4
  np.testing.assert_array_equal(rolled["positions"][:, :4], np.broadcast_to(np.arange(4), (2, 4)))
  assert (np.asarray(rolled["positions"][:, 4:]) == llama.EMPTY_POSITION).all()
  assert sp.is_rollback_safe(cache)
  assert not sp.is_rollback_safe(llama.init_cache(CONFIG, 2, 10, kv_format="int8", kv_group_size=4))
  assert not kv_cache.QuantizedKVCache.__dict__.get("rollback_safe", False)


# --- sampling: the emitted tokens are exact samples of the target ------------------------------------------------

SMALL_VOCAB = llama.TINY.replace(vocab_size=8, num_layers=1, init_std=0.15, max_seq_len=16)
SAMPLES = 10000
TEMPERATURE = 0.8
TOP_K = 6  # of 8: restricts the support, so the top_k filter is exercised, while leaving most draws random


def _next_probs(model, prompt, new, *, top_k=None):
  """Every prefix x_1..x_{new-1} (8^(new-1) rows) and the sampling distributions after prompt + prefix at each of
  the new positions: (prefixes [R, new - 1], probs [R, new, V]) at TEMPERATURE/top_k, in float64."""
  vocab = model.config.vocab_size
  prefixes = np.array(list(itertools.product(range(vocab), repeat=new - 1)), np.int32).reshape(-1, new - 1)
  tokens = np.concatenate([np.repeat(prompt[None], len(prefixes), 0), prefixes], axis=1)
  logits = np.asarray(_forward(model, jnp.asarray(tokens))[:, len(prompt) - 1:], np.float64) / TEMPERATURE
  if top_k is not None:
    logits = np.where(logits < np.sort(logits, -1)[..., -top_k:-top_k + 1], -np.inf, logits)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return prefixes, probs / probs.sum(-1, keepdims=True)


def _exact_joint(model, prompt, new, *, top_k=None):
  """P(x_1..x_new | prompt) of sampling at TEMPERATURE/top_k, by enumerating every prefix."""
  vocab = model.config.vocab_size
  prefixes, probs = _next_probs(model, prompt, new, top_k=top_k)
  joint = np.zeros((vocab,) * new)
  for row, prefix in enumerate(prefixes):
    chain = np.prod([probs[row, i, prefix[i]] for i in range(new - 1)])
    joint[tuple(prefix)] = chain * probs[row, new - 1]
  return joint


def _tv(a, b):
  return 0.5 * np.abs(a - b).sum()


def _tv_bound(exact):
  """E[TV(empirical, exact)] <= 1/2 sum sqrt(p (1 - p) / N) (Jensen), plus McDiarmid's deviation at 1e-6."""
  return 0.5 * np.sqrt(exact * (1 - exact) / SAMPLES).sum() + np.sqrt(np.log(1e6) / (2 * SAMPLES))


@pytest.mark.parametrize("draft_kind", ["other", "same", "lookup"])
def test_sampling_preserves_target_distribution(draft_kind):
  top_k = TOP_K  # one sampling configuration for all three: the compiled target steps are shared
  target = llama.Llama(SMALL_VOCAB, rngs=nnx.Rngs(0))
  other = llama.Llama(SMALL_VOCAB, rngs=nnx.Rngs(1))
  draft = {"other": sp.ModelDraft(other), "same": sp.ModelDraft(target), "lookup": sp.PromptLookupDraft()}[draft_kind]
  prompt = np.array([3, 1, 4], np.int32)
  new = 3
  tokens, stats = sp.speculative_generate(target, np.repeat(prompt[None], SAMPLES, 0), new, draft=draft,
                                          num_draft_tokens=2, temperature=TEMPERATURE, top_k=top_k,
                                          rng=jax.random.key(11))
  empirical = np.zeros((8,) * new)
  np.add.at(empirical, tuple(np.asarray(tokens).T), 1.0 / SAMPLES)
  exact = _exact_joint(target, prompt, new, top_k=top_k)
  # x_2 (and x_3) go through the acceptance rule: the draft's own samples kept with prob min(1, p/q), a residual
  # draw, or (the target drafting for itself: every draft kept) the bonus token from p_k.
  if draft_kind == "same":
    assert stats["accepted"] == stats["proposed"]
  for axes, name in (((2,), "x1,x2"), ((0,), "x2,x3"), ((0, 1), "x3")):
    exact_pair, empirical_pair = exact.sum(axes), empirical.sum(axes)
    assert _tv(empirical_pair, exact_pair) < _tv_bound(exact_pair), (name, draft_kind)
  if draft_kind == "other":
    # Always accepting would emit the draft's own x_2 given x_1: its exact distribution is far outside the bound,
    # so this test fails a rule that skips the rejection step.
    # q(x_2 | x_1) [x_1, x_2]; enumerated with new = 3 (the shapes of the target's enumeration: no new compile)
    prefixes, draft_probs = _next_probs(other, prompt, new, top_k=top_k)
    draft_given_x1 = draft_probs[prefixes[:, 1] == 0, 1]
    always_accept = exact.sum((1, 2))[:, None] * draft_given_x1
    assert _tv(always_accept, exact.sum(2)) > 3 * _tv_bound(exact.sum(2))


def test_bad_input(target, prompt):
  draft = sp.PromptLookupDraft()
  cases = [(dict(temperature=-0.5), "temperature"), (dict(top_k=0, temperature=1.0, rng=jax.random.key(0)), "top_k"),
           (dict(top_k=CONFIG.vocab_size + 1, temperature=1.0, rng=jax.random.key(0)), "top_k"),
           (dict(num_draft_tokens=0), "num_draft_tokens"), (dict(temperature=1.0), "rng"),
           (dict(draft=sp.ModelDraft(nnx.eval_shape(lambda: llama.Llama(CONFIG.replace(vocab_size=128),
                                                                        rngs=nnx.Rngs(0))))), "draft"),
           (dict(draft=object()), "draft"), (dict(eos_id=CONFIG.vocab_size), "eos_id")]
  for kwargs, name in cases:
    kwargs = {"draft": draft, **kwargs}
    with pytest.raises(ValueError, match=name):
      sp.speculative_generate(target, prompt, 4, **kwargs)
  with pytest.raises(ValueError, match="max_new_tokens"):
    sp.speculative_generate(target, prompt, 0, draft=draft)
  with pytest.raises(ValueError, match="max_seq_len"):
    sp.speculative_generate(target, prompt, CONFIG.max_seq_len, draft=draft)
  for layers in (0, CONFIG.num_layers, 1.5):
    with pytest.raises(ValueError, match="num_layers"):
      sp.SelfDraft(target, layers)
  with pytest.raises(ValueError, match="head"):
    sp.SelfDraft(target, 1, head=jnp.zeros((3, 3)))
  with pytest.raises(ValueError, match="max_ngram"):
    sp.PromptLookupDraft(max_ngram=0)
