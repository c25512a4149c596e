"""KV reuse (efficient.attention.reuse, efficient.models.kv_reuse): RoPE re-rotation vs core.rope and NumPy,
cache-level moves for float and budgeted caches, PIE edits vs full recomputation on a tiny Llama, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient.attention import budget, cache as cache_lib, core, reuse
from efficient.attention.core import EMPTY_POSITION
from efficient.models import kv_reuse, llama
from tests.helpers import rel_rms_error

THETA = 10000.0


def numpy_rope(x, positions, theta):
  half = x.shape[-1] // 2
  angles = positions[..., None].astype(np.float64) / theta ** (np.arange(half) / half)
  cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


@pytest.mark.parametrize("delta", [1, 7, 250, -3, -40])
def test_rerotation_is_rope_at_the_shifted_position(delta):
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16))
  positions = jnp.array([[40, 41, 45, 60, 300], [50, 77, 100, 101, 2000]], jnp.int32)
  moved = reuse.rerotate_keys(core.rope(x, positions, THETA), positions, delta, rope_theta=THETA)
  # f32 angles at position ~2000 are off by ~1e-4 rad: compare at that scale.
  np.testing.assert_allclose(moved, core.rope(x, positions + delta, THETA), atol=5e-4)
  np.testing.assert_allclose(moved, numpy_rope(np.asarray(x, np.float64), np.asarray(positions) + delta, THETA),
                             atol=5e-4)
  assert rel_rms_error(moved, core.rope(x, positions, THETA)) > 1e-2  # it did rotate


def test_delta_below_zero_is_refused():
  keys = jnp.ones((1, 2, 1, 4))
  with pytest.raises(ValueError, match="delta"):
    reuse.rerotate_keys(keys, jnp.array([[3, 9]]), -4, rope_theta=THETA)
  cache = {"index": jnp.int32(2), "positions": jnp.array([[0, 1, EMPTY_POSITION]]),
           "layers": [cache_lib.FloatKVCache.create(1, 3, 1, 4)]}
  with pytest.raises(ValueError, match="delta"):
    reuse.rerotate_cache(cache, -2, rope_theta=THETA, start=1)


def rope_cache(max_len, length, raw):
  """A contiguous float cache holding RoPE(raw) at positions 0..length-1."""
  positions = jnp.where(jnp.arange(max_len) < length, jnp.arange(max_len), EMPTY_POSITION)[None]
  keys = core.rope(raw, jnp.arange(max_len)[None], THETA) * (positions < EMPTY_POSITION)[..., None, None]
  layer = cache_lib.FloatKVCache(k=keys, v=raw * 2.0)
  return {"index": jnp.int32(length), "positions": positions, "layers": [layer]}


@pytest.mark.parametrize("delta", [3, -2])
def test_float_cache_moves_and_rerotates_the_suffix(delta):
  raw = jax.random.normal(jax.random.key(1), (1, 12, 2, 8))
  start, length = 4, 8
  moved = reuse.rerotate_cache(rope_cache(12, length, raw), delta, rope_theta=THETA, start=start)
  assert int(moved["index"]) == length + delta
  positions = np.asarray(moved["positions"][0])
  expect = [p for p in range(start + min(delta, 0))] + [EMPTY_POSITION] * max(delta, 0)
  expect += [p + delta for p in range(start, length)]
  np.testing.assert_array_equal(positions[:len(expect)], expect)
  assert (positions[len(expect):] == EMPTY_POSITION).all()
  layer = moved["layers"][0]
  for slot, position in enumerate(expect):
    if position == EMPTY_POSITION:
      continue
    source = position - delta if position >= start + delta and slot >= start + min(delta, 0) else position
    np.testing.assert_allclose(layer.k[0, slot], core.rope(raw[:, source:source + 1], jnp.array([[position]]),
                                                           THETA)[0, 0], atol=1e-5)
    np.testing.assert_array_equal(layer.v[0, slot], raw[0, source] * 2.0)


@pytest.mark.parametrize("storage", ["float", "int8"])
def test_budgeted_cache_rerotates_in_place(storage):
  spec = budget.BudgetedKV("window", 4, storage=storage)
  raw = jax.random.normal(jax.random.key(2), (1, 4, 1, 8))
  positions = jnp.array([[[1], [5], [6], [9]]], jnp.int32)
  layer = spec.create(1, 16, 1, 8)
  stored = layer.token_format.encode(core.rope(raw, positions[..., 0], THETA), raw, jnp.float32)
  layer = layer.replace_slots(stored=stored, positions=positions, counts=jnp.ones((1, 4, 1)))
  cache = {"index": jnp.int32(10), "positions": jnp.zeros((1, 16), jnp.int32), "layers": [layer]}
  moved = reuse.rerotate_cache(cache, -2, rope_theta=THETA, start=6)  # position 5 was deleted, 6 -> 4, 9 -> 7
  new = moved["layers"][0]
  np.testing.assert_array_equal(new.positions[0, :, 0], [1, EMPTY_POSITION, 4, 7])
  keys, values = new.keys_values()
  tol = 1e-5 if storage == "float" else 0.05
  expected = core.rope(raw, jnp.array([[1, 5, 4, 7]]), THETA)
  np.testing.assert_allclose(keys[0, [0, 2, 3]], expected[0, [0, 2, 3]], atol=tol)
  np.testing.assert_array_equal(new.stored["v"], layer.stored["v"])  # values untouched
  np.testing.assert_array_equal(new.stored["k"][:, 0], layer.stored["k"][:, 0])  # unmoved slot: same codes


def test_per_channel_quantized_cache_is_refused():
  cache = llama.init_cache(llama.TINY.replace(num_layers=1), 1, 8, kv_format="int8")
  with pytest.raises(ValueError, match="QuantizedKVCache"):
    reuse.rerotate_cache(cache, 1, rope_theta=THETA, start=0)


# --- PIE on a tiny Llama -----------------------------------------------------------------------------------------
CONFIG = llama.TINY.replace(num_layers=2, init_std=0.1)  # peakier attention than the default init
MAX_LEN = 64


@pytest.fixture(scope="module")
def model():
  return llama.Llama(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def old_prompt():
  return np.random.default_rng(0).integers(0, CONFIG.vocab_size, 40)


def greedy(model, logits, cache, steps=4):
  graphdef, state = nnx.split(model)
  out = [int(jnp.argmax(logits[0]))]
  for _ in range(steps - 1):
    logits, cache = kv_reuse._run(graphdef, state, jnp.array([[out[-1]]], jnp.int32), cache)
    out.append(int(jnp.argmax(logits[0, -1])))
  return out


def test_edit_at_the_end_is_exact(model, old_prompt):
  new = np.concatenate([old_prompt[:37], [5, 6, 7, 8]])
  _, cache = kv_reuse.full_prefill(model, old_prompt, MAX_LEN)
  result = kv_reuse.edit_cached_prompt(model, cache, old_prompt, new)
  assert (result.prefix, result.recomputed, result.reused_suffix, result.delta) == (37, 4, 0, 1)
  logits, full = kv_reuse.full_prefill(model, new, MAX_LEN)
  np.testing.assert_allclose(result.logits, logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(result.cache["layers"][1].k[:, :41], full["layers"][1].k[:, :41], atol=1e-5)
  np.testing.assert_array_equal(result.cache["positions"], full["positions"])
  assert greedy(model, result.logits, result.cache) == greedy(model, logits, full)


@pytest.mark.parametrize("edit", ["insert", "delete"])
def test_suffix_reuse_is_close_and_beats_stale_reuse(model, old_prompt, edit):
  if edit == "insert":
    new = np.concatenate([old_prompt[:20], [11, 12, 13], old_prompt[20:]])
    expected = (20, 4, 19, 3)
  else:
    new = np.concatenate([old_prompt[:15], old_prompt[19:]])
    expected = (15, 1, 20, -4)
  _, cache = kv_reuse.full_prefill(model, old_prompt, MAX_LEN)
  logits, full = kv_reuse.full_prefill(model, new, MAX_LEN)
  pie = kv_reuse.edit_cached_prompt(model, cache, old_prompt, new)
  stale = kv_reuse.edit_cached_prompt(model, cache, old_prompt, new, stale=True)
  assert (pie.prefix, pie.recomputed, pie.reused_suffix, pie.delta) == expected
  assert pie.compute_saved > 0.85 if edit == "delete" else pie.compute_saved > 0.9
  np.testing.assert_array_equal(pie.cache["positions"], full["positions"])
  pie_error, stale_error = rel_rms_error(pie.logits, logits), rel_rms_error(stale.logits, logits)
  # Approximate (the moved tokens' deeper hidden states saw the old context), and better than not re-rotating.
  assert 1e-4 < pie_error < 0.8 * stale_error
  # Layer 0's K/V depend only on each token and its position: re-rotation makes every slot of it exact.
  length = len(new)
  np.testing.assert_allclose(pie.cache["layers"][0].k[:, :length], full["layers"][0].k[:, :length], atol=1e-4)
  np.testing.assert_allclose(pie.cache["layers"][0].v[:, :length], full["layers"][0].v[:, :length], atol=1e-6)
  assert rel_rms_error(stale.cache["layers"][0].k[:, :length], full["layers"][0].k[:, :length]) > 1e-2
  # The prefix KV is kept exactly; the edited span recomputed exactly.
  np.testing.assert_allclose(pie.cache["layers"][1].k[:, :pie.prefix], full["layers"][1].k[:, :pie.prefix],
                             atol=1e-5)


def test_edit_input_errors(model, old_prompt):
  _, cache = kv_reuse.full_prefill(model, old_prompt, MAX_LEN)
  with pytest.raises(ValueError, match="cache must hold exactly old_tokens"):
    kv_reuse.edit_cached_prompt(model, cache, old_prompt[:-1], old_prompt)
  with pytest.raises(ValueError, match="new_tokens"):
    kv_reuse.edit_cached_prompt(model, cache, old_prompt, np.zeros((2, 3), np.int32))
