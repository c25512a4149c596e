"""Budgeted KV caches (efficient.attention.budget): policies' kept sets and merges vs a NumPy re-derivation, the
layer's attention with merged slots vs NumPy, exactness below the budget on a tiny Llama, int4 storage under jit,
and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient.attention import budget
from efficient.attention.core import EMPTY_POSITION
from efficient.models import llama
from tests.helpers import rel_rms_error

CONFIG = llama.TINY.replace(num_layers=1)
LENGTH, PROMPT = 10, 4
eager_step = lambda model, tokens, cache: model(tokens, cache=cache)
step = jax.jit(eager_step)


@pytest.fixture(scope="module")
def model():
  return llama.Llama(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, LENGTH), 0, CONFIG.vocab_size, dtype=jnp.int32)


def decode_all(model, tokens, kv_format, run=step):
  """Chunked prefill of PROMPT tokens, then one token at a time: logits of every position + the cache."""
  cache = llama.init_cache(CONFIG, tokens.shape[0], LENGTH, kv_format=kv_format)
  logits, cache = run(model, tokens[:, :PROMPT], cache)
  out = [logits]
  for i in range(PROMPT, LENGTH):
    logits, cache = run(model, tokens[:, i:i + 1], cache)
    out.append(logits)
  return np.asarray(jnp.concatenate(out, axis=1)), cache


@pytest.fixture(scope="module")
def full_logits(model, tokens):
  return decode_all(model, tokens, None)[0]


@pytest.mark.parametrize("policy", budget.policies())
def test_shorter_than_budget_gives_the_full_cache(model, tokens, full_logits, policy):
  # Eagerly: two compilations per policy would cost more than the tiny model's few hundred dispatches (the jitted
  # path of every policy runs in the int4 test below).
  logits, cache = decode_all(model, tokens, budget.BudgetedKV(policy, LENGTH, sinks=1), run=eager_step)
  assert np.abs(logits - full_logits).max() <= 1e-5
  np.testing.assert_array_equal(budget.kept_positions(cache["layers"][0]), np.broadcast_to(
      np.arange(LENGTH), (2, CONFIG.num_kv_heads, LENGTH)))


@pytest.mark.parametrize("policy", budget.policies())
def test_every_policy_with_int4_storage_under_jit(model, tokens, full_logits, policy):
  kept_budget = 4
  logits, cache = decode_all(model, tokens, budget.BudgetedKV(policy, kept_budget, sinks=1, storage="int4"))
  layer = cache["layers"][0]
  assert layer.stored["k"].dtype == jnp.uint8 and layer.stored["k"].shape[-1] == CONFIG.head_dim // 2
  assert np.isfinite(logits).all()
  # The prompt chunk saw the whole (quantized) prompt: close to the float cache, not equal (int4 noise).
  error = rel_rms_error(logits[:, :PROMPT], full_logits[:, :PROMPT])
  assert 1e-4 < error < 0.1
  kept = np.asarray(budget.kept_positions(layer))
  assert kept.shape == (2, CONFIG.num_kv_heads, kept_budget) and (kept < LENGTH).all()
  assert all(len(set(row)) == kept_budget for row in kept.reshape(-1, kept_budget))
  if policy == "window":
    np.testing.assert_array_equal(kept, np.broadcast_to(np.arange(6, 10), kept.shape))
  elif policy == "sinks":
    np.testing.assert_array_equal(kept, np.broadcast_to([0, 7, 8, 9], kept.shape))
  else:  # the sink and the recent window are always kept
    recent = budget.BudgetedKV(policy, kept_budget, sinks=1).resolved_recent
    assert (kept[..., 0] == 0).all() and (kept[..., kept_budget - recent:] >= LENGTH - recent).all()
  if policy in ("kvmerger", "elastic"):  # all 10 tokens live on in 4 slots
    np.testing.assert_allclose(np.asarray(layer.counts).sum(1), LENGTH)


# --- policies on a hand-made pattern vs NumPy ------------------------------------------------------------------
BUDGET, SINKS, RECENT = 4, 1, 1
# Two kv heads, 8 candidates each (one empty per head); positions distinct per head.
POSITIONS = np.array([[[0, 5, 2, 9, 3, EMPTY_POSITION, 7, 1],
                       [6, 0, EMPTY_POSITION, 4, 8, 2, 3, 9]]], np.int32)
SCORES = np.array([[[0.1, 3.0, 0.5, 0.2, 2.0, 0.0, 1.0, 4.0],
                    [5.0, 0.3, 0.0, 2.5, 0.4, 0.6, 3.5, 0.1]]], np.float32)
KEYS = np.random.default_rng(0).normal(size=(1, 2, 8, 6)).astype(np.float32)


def candidates():
  counts = np.where(POSITIONS == EMPTY_POSITION, 0.0, 1.0).astype(np.float32)
  return budget.Candidates(jnp.asarray(POSITIONS), jnp.asarray(SCORES), jnp.asarray(counts), jnp.asarray(KEYS))


def numpy_keep(policy, positions, scores):
  valid = [i for i in range(len(positions)) if positions[i] != EMPTY_POSITION]
  by_recency = sorted(valid, key=lambda i: -positions[i])
  if policy == "window":
    return set(by_recency[:BUDGET])
  protected = {i for i in valid if positions[i] < SINKS} | set(by_recency[:RECENT])
  rest = [i for i in valid if i not in protected]
  if policy == "sinks":
    return protected | set(sorted(rest, key=lambda i: -positions[i])[:BUDGET - len(protected)])
  return protected | set(sorted(rest, key=lambda i: -scores[i])[:BUDGET - len(protected)])  # h2o's set


@pytest.mark.parametrize("policy", ["window", "sinks", "h2o", "kvmerger", "elastic"])
def test_kept_set_and_merges_match_numpy(policy):
  plan = budget._POLICIES[policy](candidates(), budget=BUDGET, sinks=SINKS, recent=RECENT, key=jax.random.key(0))
  for head in range(2):
    positions, scores, keys = POSITIONS[0, head], SCORES[0, head], KEYS[0, head]
    expected = numpy_keep("h2o" if policy in ("kvmerger", "elastic") else policy, positions, scores)
    keep = list(np.asarray(plan.keep[0, head]))
    assert set(keep) == expected, (policy, head)
    if policy in ("kvmerger", "elastic"):
      merge_into = np.asarray(plan.merge_into[0, head])
      for i in range(8):
        if i in keep:
          assert merge_into[i] == keep.index(i)
        elif positions[i] == EMPTY_POSITION:
          assert merge_into[i] == -1
        elif policy == "kvmerger":
          unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
          assert keep[merge_into[i]] == keep[int(np.argmax([unit[i] @ unit[j] for j in keep]))]
        else:
          distances = [abs(int(positions[i]) - int(positions[j])) for j in keep]
          assert abs(int(positions[i]) - int(positions[keep[merge_into[i]]])) == min(distances)
    else:
      assert plan.merge_into is None


def test_random_policy_is_uniform_and_keeps_sinks():
  keys = jax.random.split(jax.random.key(3), 400)
  plans = jax.vmap(lambda k: budget.random_policy(candidates(), budget=BUDGET, sinks=SINKS, recent=0, key=k).keep)
  kept = np.asarray(plans(keys))[:, 0, 0]  # head 0: valid candidates 0..4, 6, 7 (index 5 empty)
  frequency = np.array([(kept == i).any(-1).mean() for i in range(8)])
  assert frequency[0] == 1.0 and frequency[5] == 0.0  # the sink (position 0) always, the empty slot never
  others = frequency[[1, 2, 3, 4, 6, 7]]
  np.testing.assert_allclose(others, 3 / 6, atol=0.09)  # 3 free slots among 6 unprotected tokens


def test_layer_attention_and_merge_numbers_match_numpy():
  """One new token into a full kvmerger cache of 3 slots (one already a merge of 2 tokens) vs NumPy."""
  rng = np.random.default_rng(1)
  head_dim, heads = 4, 2
  spec = budget.BudgetedKV("kvmerger", 3, sinks=0, recent=1)
  layer = spec.create(1, 8, 1, head_dim)
  old_k, old_v = rng.normal(size=(3, head_dim)), rng.normal(size=(3, head_dim))
  layer = layer.replace_slots(
      stored={"k": jnp.asarray(old_k, jnp.float32)[None, :, None], "v": jnp.asarray(old_v, jnp.float32)[None, :, None]},
      positions=jnp.array([[[0], [2], [3]]], jnp.int32), scores=jnp.array([[[0.5], [3.0], [1.0]]]),
      counts=jnp.array([[[2.0], [1.0], [1.0]]]))
  q = rng.normal(size=(1, 1, heads, head_dim)).astype(np.float32)
  k = (old_k[0] + 0.01 * rng.normal(size=head_dim)).astype(np.float32)  # close to slot 0: the merge target
  v = rng.normal(size=head_dim).astype(np.float32)
  out, new = jax.jit(lambda c, *a: c.update_and_attend(*a, q_positions=jnp.array([[4]])))(
      layer, jnp.asarray(q), jnp.asarray(k)[None, None, None], jnp.asarray(v)[None, None, None])
  keys, values = np.vstack([old_k, k]), np.vstack([old_v, v])
  counts = np.array([2.0, 1.0, 1.0, 1.0])
  logits = q[0, 0] @ keys.T / np.sqrt(head_dim) + np.log(counts)  # [heads, 4]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(out[0, 0], probs @ values, rtol=1e-5, atol=1e-6)
  scores = np.array([0.5, 3.0, 1.0, 0.0]) + probs.sum(0)
  # recent 1 keeps position 4 (the new token); the two heaviest of the rest by accumulated mass.
  keep = [3] + sorted([0, 1, 2], key=lambda i: -scores[i])[:2]
  evicted = ({0, 1, 2, 3} - set(keep)).pop()
  unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
  target = keep[int(np.argmax([unit[evicted] @ unit[j] for j in keep]))]
  got_positions = np.asarray(new.positions[0, :, 0])
  assert set(got_positions) == {[0, 2, 3, 4][j] for j in keep}
  for slot, position in enumerate(got_positions):
    j = [0, 2, 3, 4].index(position)
    members = [j] + ([evicted] if j == target else [])
    weight = counts[members]
    np.testing.assert_allclose(new.stored["k"][0, slot, 0], weight @ keys[members] / weight.sum(), rtol=1e-5)
    np.testing.assert_allclose(new.stored["v"][0, slot, 0], weight @ values[members] / weight.sum(), rtol=1e-5)
    assert float(new.counts[0, slot, 0]) == weight.sum()
    np.testing.assert_allclose(new.scores[0, slot, 0], scores[members].sum(), rtol=1e-5)


@pytest.mark.parametrize("kwargs,argument", [
    (dict(policy="lru", budget=4), "policy"), (dict(policy="h2o", budget=0), "budget"),
    (dict(policy="sinks", budget=4, sinks=4), "budget"), (dict(policy="h2o", budget=4, recent=5), "recent"),
    (dict(policy="h2o", budget=4, sinks=2, recent=3), "recent"), (dict(policy="h2o", budget=4, sinks=-1), "sinks"),
    (dict(policy="h2o", budget=4, storage="fp3"), "storage")])
def test_bad_input_names_the_argument(kwargs, argument):
  with pytest.raises(ValueError, match=argument):
    budget.BudgetedKV(**kwargs)


def test_segments_and_group_size_are_refused():
  spec = budget.BudgetedKV("window", 4)
  with pytest.raises(ValueError, match="kv_group_size"):
    spec.create(1, 8, 1, 4, group_size=4)
  layer = spec.create(1, 8, 1, 4)
  x = jnp.zeros((1, 2, 1, 4))
  with pytest.raises(ValueError, match="segment_ids"):
    layer.update_and_attend(x, x, x, q_positions=jnp.zeros((1, 2), jnp.int32), q_segment_ids=jnp.ones((1, 2)))
  assert hash(spec) == hash(budget.BudgetedKV("window", 4))  # static-argument friendly
