"""The NNX Llama against an independent float64 NumPy forward, plus cache decoding, sampling and packing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient.models import llama

CONFIG = llama.TINY
# Eager NNX calls dispatch op by op; jitting the forward keeps the suite fast.
forward = jax.jit(lambda model, tokens, **kwargs: model(tokens, **kwargs))


@pytest.fixture(scope="module")
def model():
  return llama.Llama(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, 12), 0, CONFIG.vocab_size, dtype=jnp.int32)


def numpy_llama(model, tokens):
  """A plain float64 NumPy Llama written from the paper's equations (interleaving-free rotate-half RoPE)."""
  c = model.config
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  def norm(x, scale):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * scale

  def rotate(x, pos):
    half = c.head_dim // 2
    freq = c.rope_theta ** (-np.arange(half) / half)
    ang = pos[:, None] * freq[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    return np.concatenate([x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin], -1)

  out = []
  for row in np.asarray(tokens):
    t = len(row)
    pos = np.arange(t, dtype=np.float64)
    x = p["embedding"][row]
    for i in range(c.num_layers):
      b = p["blocks"][i]
      h = norm(x, b["attention_norm"]["scale"])
      q = rotate(np.einsum("td,dhk->thk", h, b["attention"]["q"]["kernel"]), pos)
      k = rotate(np.einsum("td,dhk->thk", h, b["attention"]["k"]["kernel"]), pos)
      v = np.einsum("td,dhk->thk", h, b["attention"]["v"]["kernel"])
      group = c.num_heads // c.num_kv_heads
      k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
      logits = np.einsum("thk,shk->hts", q, k) / np.sqrt(c.head_dim)
      logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      attended = np.einsum("hts,shk->thk", probs, v)
      x = x + np.einsum("thk,hkd->td", attended, b["attention"]["o"]["kernel"])
      h = norm(x, b["mlp_norm"]["scale"])
      gate = h @ b["mlp"]["gate"]["kernel"]
      x = x + (gate / (1 + np.exp(-gate)) * (h @ b["mlp"]["up"]["kernel"])) @ b["mlp"]["down"]["kernel"]
    out.append(norm(x, p["final_norm"]["scale"]) @ p["embedding"].T)
  return np.stack(out)


def test_forward_matches_numpy_float64(model, tokens):
  logits = forward(model, tokens)
  assert logits.shape == (2, 12, CONFIG.vocab_size) and logits.dtype == jnp.float32
  expected = numpy_llama(model, tokens)
  np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5, rtol=1e-4)


def test_bf16_compute_close_to_f32(tokens):
  f32 = llama.Llama(CONFIG, rngs=nnx.Rngs(0))
  bf16 = llama.Llama(CONFIG.replace(compute_dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  a, b = np.asarray(forward(f32, tokens)), np.asarray(forward(bf16, tokens))
  assert b.dtype == np.float32  # logits stay f32 whatever the compute dtype
  assert np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(a**2)) < 2e-2


def test_cache_decoding_equals_full_forward(model, tokens):
  full = forward(model, tokens)
  cache = llama.init_cache(CONFIG, 2, 16)
  pieces = []
  logits, cache = forward(model, tokens[:, :7], cache=cache)
  pieces.append(logits)
  for i in range(7, 12):
    logits, cache = forward(model, tokens[:, i:i + 1], cache=cache)
    pieces.append(logits)
  assert int(cache["index"]) == 12
  np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(full), atol=1e-5)


def test_greedy_generate_equals_argmax_loop(model, tokens):
  generated = llama.generate(model, tokens[:, :5], 6)
  sequence = tokens[:, :5]
  for _ in range(6):
    next_token = jnp.argmax(forward(model, sequence)[:, -1], -1).astype(jnp.int32)
    sequence = jnp.concatenate([sequence, next_token[:, None]], 1)
  np.testing.assert_array_equal(np.asarray(generated), np.asarray(sequence[:, 5:]))


def test_sampling(model, tokens):
  prompt = tokens[:, :5]
  greedy = llama.generate(model, prompt, 5)
  np.testing.assert_array_equal(np.asarray(llama.generate(model, prompt, 5, temperature=0.7, top_k=1,
                                                          rng=jax.random.key(0))), np.asarray(greedy))
  first = llama.generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(4))
  again = llama.generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(4))
  other = llama.generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  assert not np.array_equal(np.asarray(first), np.asarray(other))  # near-uniform logits at init
  # With top_k=3 the first sampled token is always one of the 3 most likely.
  top3 = np.asarray(jax.lax.top_k(forward(model, prompt)[:, -1], 3)[1])
  for seed in range(5):
    token = np.asarray(llama.generate(model, prompt, 1, temperature=1.0, top_k=3, rng=jax.random.key(seed)))
    assert all(token[b, 0] in top3[b] for b in range(2))


def test_eos_stops_a_row(model, tokens):
  generated = np.asarray(llama.generate(model, tokens[:, :5], 6))
  eos = int(generated[0, 1])
  stopped = np.asarray(llama.generate(model, tokens[:, :5], 6, eos_id=eos))
  first_eos = list(stopped[0]).index(eos)
  assert (stopped[0, first_eos:] == eos).all()


def test_packed_segments_equal_separate_sequences(model, tokens):
  a, b = tokens[0, :5], tokens[1, :7]
  packed = jnp.concatenate([a, b])[None]
  segment_ids = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  logits = forward(model, packed, positions=positions, segment_ids=segment_ids)
  np.testing.assert_allclose(np.asarray(logits[0, :5]), np.asarray(forward(model, a[None])[0]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits[0, 5:]), np.asarray(forward(model, b[None])[0]), atol=1e-5)
  unmasked = forward(model, packed, positions=positions)  # without segment ids the second document sees the first
  assert np.abs(np.asarray(unmasked[0, 5:]) - np.asarray(forward(model, b[None])[0])).max() > 1e-3


@pytest.mark.parametrize("change, message", [
    (dict(num_kv_heads=3), "num_heads"),
    (dict(head_dim=15), "head_dim"),
    (dict(num_layers=0), "num_layers"),
])
def test_bad_config(change, message):
  with pytest.raises(ValueError, match=message):
    CONFIG.replace(**change)


def test_bad_inputs(model, tokens):
  with pytest.raises(ValueError, match="tokens"):
    model(jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(ValueError, match="segment_ids"):
    model(tokens, segment_ids=jnp.ones((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="top_k"):
    llama.generate(model, tokens, 2, temperature=1.0, top_k=0, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="rng"):
    llama.generate(model, tokens, 2, temperature=1.0)
  with pytest.raises(ValueError, match="max_len"):
    llama.init_cache(CONFIG, 1, CONFIG.max_seq_len + 1)
