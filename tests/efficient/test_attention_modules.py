"""Token mixers of efficient.attention against independent float64 NumPy references, chunked vs step-by-step
decoding, the hybrid Llama's cache, sharding, and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient import sharding
from efficient.attention import (Based, BasedConfig, FNetMixer, LinearAttention, LinearAttentionConfig,
                                 WindowAttention, causal_depthwise_conv, every_kth_softmax, softmax_attention_fn)
from efficient.attention.linear import RESET_LOG_GATE
from efficient.models import llama

CONFIG = llama.TINY.replace(sliding_window=4)
SPEC = CONFIG.mixer_spec()  # what the mixers take
VARIANTS = {
    "elu1": LinearAttentionConfig(feature_map="elu1"),
    "identity_fixed_decay": LinearAttentionConfig(feature_map="identity", decay="fixed", normalize=False),
    "gla": LinearAttentionConfig(feature_map="identity", decay="gla", gate_rank=4, normalize=False),
    "taylor": LinearAttentionConfig(feature_map="taylor", feature_dim=4, num_heads=2),
}


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _params(module):
  return jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def _phi(x, feature_map):
  if feature_map == "identity":
    return x
  if feature_map == "elu1":
    return np.where(x > 0, x + 1.0, np.exp(x))
  d = x.shape[-1]  # taylor
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
  return np.concatenate([np.ones_like(x[..., :1]), x / d ** 0.25, outer / np.sqrt(2 * d)], -1)


def numpy_linear_attention(module, x, segment_ids=None):
  """The module's math written out in float64: projections, feature map, per-step state recurrence."""
  p, var = _params(module), module.variant
  x = np.asarray(x, np.float64)
  q, k, v = (np.einsum("btd,dhk->bthk", x, p[n]["kernel"]) for n in ("q", "k", "v"))
  key_dim = q.shape[-1]
  scale = 1.0 if var.feature_map == "taylor" else key_dim ** -0.5
  q, k = _phi(q, var.feature_map) * scale, _phi(k, var.feature_map)
  batch, length, heads, kp = q.shape
  log_g = np.zeros((batch, length, heads, kp))
  if var.decay == "fixed":
    log_g += np.log(1 - 2.0 ** (-5.0 - np.arange(heads)))[None, None, :, None]
  if var.decay == "gla":
    z = np.einsum("btr,rhk->bthk", x @ p["gate_down"]["kernel"], p["gate_up"]["kernel"]) + p["gate_bias"]
    log_g += -np.log1p(np.exp(-z)) / var.gate_normalizer
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    starts = np.concatenate([np.zeros((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
    log_g += np.where(starts, -np.inf, 0.0)[:, :, None, None]  # an exact reset
  out = np.zeros(v.shape)
  for b in range(batch):
    for h in range(heads):
      s, z = np.zeros((kp, v.shape[-1])), np.zeros(kp)
      for t in range(length):
        s = np.exp(log_g[b, t, h])[:, None] * s + np.outer(k[b, t, h], v[b, t, h])
        z = np.exp(log_g[b, t, h]) * z + k[b, t, h]
        num = q[b, t, h] @ s
        out[b, t, h] = num / (q[b, t, h] @ z + 1e-6) if var.normalize else num
  return np.einsum("bthk,hkd->btd", out, p["o"]["kernel"])


def _stepwise(module, x, cache, prefill, **kwargs):
  """Runs `module` on x[:, :prefill] (chunk form into the cache), then one token at a time (recurrent step)."""
  call = jax.jit(lambda m, x, c, i, pos: m(x, positions=pos, segment_ids=None, cache=c, cache_index=i))
  positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
  outs = []
  for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, x.shape[1])]:
    out, cache = call(module, x[:, start:stop], cache, jnp.int32(start), positions[:, start:stop])
    outs.append(out)
  return np.asarray(jnp.concatenate(outs, axis=1))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_linear_attention_chunk_equals_numpy_and_stepwise(name):
  from efficient.attention.linear import init_linear_cache
  variant = VARIANTS[name].__class__(**{**VARIANTS[name].__dict__, "chunk_size": 8})
  module = LinearAttention(SPEC, variant, rngs=nnx.Rngs(0))
  x = _x((2, 19, CONFIG.embed_dim))
  full = np.asarray(jax.jit(lambda m, x: m(x)[0])(module, x))
  expected = numpy_linear_attention(module, x)
  np.testing.assert_allclose(full, expected, atol=2e-5, rtol=1e-4)
  steps = _stepwise(module, x, init_linear_cache(SPEC, variant, 2), prefill=5)
  np.testing.assert_allclose(steps, expected, atol=2e-5, rtol=1e-4)


def test_linear_attention_resets_state_at_segment_starts():
  module = LinearAttention(SPEC, VARIANTS["elu1"], rngs=nnx.Rngs(0))
  x = _x((1, 16, CONFIG.embed_dim), seed=3)
  segments = jnp.asarray([[1] * 6 + [2] * 7 + [3] * 3], jnp.int32)
  packed = np.asarray(jax.jit(lambda m, x, s: m(x, segment_ids=s)[0])(module, x, segments))
  np.testing.assert_allclose(packed, numpy_linear_attention(module, x, segments), atol=2e-5, rtol=1e-4)
  alone = np.asarray(module(x[:, 6:13])[0])  # the second document on its own
  np.testing.assert_allclose(packed[:, 6:13], alone, atol=2e-5, rtol=1e-4)
  assert RESET_LOG_GATE <= -30


def numpy_window_attention(module, x, window):
  p, c = _params(module), module.spec
  x = np.asarray(x, np.float64)
  q, k, v = (np.einsum("btd,dhk->bthk", x, p[n]["kernel"]) for n in ("q", "k", "v"))
  t = x.shape[1]
  pos = np.arange(t, dtype=np.float64)
  half = c.head_dim // 2
  ang = pos[:, None] * c.rope_theta ** (-np.arange(half) / half)
  cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
  rot = lambda a: np.concatenate([a[..., :half] * cos - a[..., half:] * sin, a[..., half:] * cos + a[..., :half] * sin], -1)
  q, k = rot(q), rot(k)
  group = c.num_heads // c.num_kv_heads
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(c.head_dim)
  i, j = np.arange(t)[:, None], np.arange(t)[None]
  logits = np.where((j <= i) & (j > i - window), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bthk,hkd->btd", np.einsum("bhts,bshk->bthk", probs, v), p["o"]["kernel"])


def test_window_attention_matches_numpy_and_ring_cache():
  from efficient.attention.softmax import init_window_cache
  module = WindowAttention(SPEC, rngs=nnx.Rngs(0))
  x = _x((2, 13, CONFIG.embed_dim), seed=1)
  positions = jnp.broadcast_to(jnp.arange(13, dtype=jnp.int32), (2, 13))
  full = np.asarray(module(x, positions=positions, segment_ids=None)[0])
  expected = numpy_window_attention(module, x, CONFIG.sliding_window)
  np.testing.assert_allclose(full, expected, atol=2e-5, rtol=1e-4)
  # prefill of 6 > window 4 tokens, then steps: the 4-slot ring buffer wraps around twice.
  steps = _stepwise(module, x, init_window_cache(SPEC, 2, CONFIG.sliding_window), prefill=6)
  np.testing.assert_allclose(steps, expected, atol=2e-5, rtol=1e-4)


def test_based_matches_its_parts_and_stepwise():
  from efficient.attention.based import init_based_cache
  variant = BasedConfig(linear=LinearAttentionConfig(feature_map="taylor", feature_dim=4, chunk_size=8))
  module = Based(SPEC, variant, rngs=nnx.Rngs(0))
  x = _x((2, 17, CONFIG.embed_dim), seed=2)
  positions = jnp.broadcast_to(jnp.arange(17, dtype=jnp.int32), (2, 17))
  full = np.asarray(jax.jit(lambda m, x, p: m(x, positions=p)[0])(module, x, positions))
  kernel = np.asarray(module.conv[...], np.float64)
  xn = np.asarray(x, np.float64)
  u = sum(kernel[j] * np.pad(xn, ((0, 0), (j, 0), (0, 0)))[:, :17] for j in range(3))  # causal conv in NumPy
  expected = (numpy_linear_attention(module.linear, u)
              + numpy_window_attention(module.window, u, CONFIG.sliding_window))
  np.testing.assert_allclose(full, expected, atol=3e-5, rtol=1e-4)
  steps = _stepwise(module, x, init_based_cache(SPEC, variant, 2), prefill=6)
  np.testing.assert_allclose(steps, expected, atol=3e-5, rtol=1e-4)


def test_causal_conv_respects_segments():
  x = _x((1, 8, 3), seed=4)
  kernel = _x((3, 3), seed=5)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 3]], jnp.int32)
  out = np.asarray(causal_depthwise_conv(x, kernel, seg))
  xn, kn, sn = np.asarray(x, np.float64), np.asarray(kernel, np.float64), np.asarray(seg)
  expected = np.zeros_like(xn)
  for t in range(8):
    for j in range(3):
      if t - j >= 0 and sn[0, t - j] == sn[0, t]:
        expected[0, t] += kn[j] * xn[0, t - j]
  np.testing.assert_allclose(out, expected, atol=1e-6, rtol=1e-5)


def test_fnet_matches_dft_matrices():
  x = _x((2, 6, 5), seed=6)
  out = np.asarray(FNetMixer()(x))
  dft = lambda n: np.exp(-2j * np.pi * np.outer(np.arange(n), np.arange(n)) / n)
  expected = np.real(np.einsum("st,btd,de->bse", dft(6), np.asarray(x, np.float64), dft(5)))
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  # not causal: changing the last token changes the first output
  assert not np.allclose(np.asarray(FNetMixer()(x.at[:, -1].add(1.0)))[:, 0], out[:, 0])


HYBRID = CONFIG.replace(
    num_layers=4, attention_schedule="linear,based,window,softmax",
    linear_attention=LinearAttentionConfig(feature_map="identity", decay="gla", gate_rank=4, chunk_size=8),
    based=BasedConfig(linear=LinearAttentionConfig(feature_map="taylor", feature_dim=4, chunk_size=8)))


def test_hybrid_llama_cached_decoding_equals_full_forward():
  model = llama.Llama(HYBRID, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, HYBRID.vocab_size, dtype=jnp.int32)
  full = np.asarray(jax.jit(lambda m, t: m(t))(model, tokens))
  step = jax.jit(lambda m, t, c: m(t, cache=c))
  cache = llama.init_cache(HYBRID, 2, 16)
  assert set(cache["layers"][0]) == {"state"} and cache["layers"][2]["k"].shape[1] == HYBRID.sliding_window
  logits, cache = step(model, tokens[:, :6], cache)
  outs = [logits]
  for t in range(6, 11):
    logits, cache = step(model, tokens[:, t:t + 1], cache)
    outs.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), full, atol=3e-5, rtol=1e-4)
  greedy = np.asarray(llama.generate(model, tokens[:, :6], 3))
  assert greedy[:, 0].tolist() == full[:, 5].argmax(-1).tolist()


def test_default_config_is_unchanged():
  assert llama.TINY.layer_kinds() == ("softmax",) * 2
  assert "attention" not in llama.TINY.to_dict()  # checkpoint signatures of the plain model are unchanged
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(llama.Llama(llama.TINY,
                                                                                     rngs=nnx.Rngs(0)), nnx.Param))}
  assert "blocks/1/attention/q/kernel" in paths and len(paths) == 2 + 2 * 9  # embedding, final norm, 9 per block
  assert every_kth_softmax(6, 3, "based") == "based,based,softmax,based,based,softmax"


def test_sharded_hybrid_equals_single_device():
  tokens = jax.random.randint(jax.random.key(2), (8, 12), 0, HYBRID.vocab_size, dtype=jnp.int32)
  forward = lambda m, t: m(t)
  expected = np.asarray(jax.jit(forward)(llama.Llama(HYBRID, rngs=nnx.Rngs(0)), tokens))
  mesh = sharding.make_mesh("data:4,tensor:2")
  model = llama.Llama(HYBRID, rngs=nnx.Rngs(0))
  assert sharding.shard_model(model, mesh, "tp") == []
  q = model.blocks[1].attention.linear.q.kernel[...]
  assert q.sharding.shard_shape(q.shape)[1] == q.shape[1] // 2  # heads on `tensor`
  with jax.set_mesh(mesh):
    logits = jax.jit(forward)(model, jax.device_put(tokens, sharding.batch_sharding(mesh, "tp")))
  assert len(logits.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(logits), expected, atol=3e-5, rtol=1e-4)


def test_bad_input():
  with pytest.raises(ValueError, match="num_kv_heads"):
    CONFIG.replace(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="sliding_window"):
    CONFIG.replace(sliding_window=0)
  with pytest.raises(ValueError, match="sliding_window"):
    softmax_attention_fn(sliding_window=0)
  with pytest.raises(ValueError, match="sliding_window is required"):
    llama.TINY.replace(attention="window")
  with pytest.raises(ValueError, match="unknown attention 'flash'"):
    CONFIG.replace(attention="flash")
  with pytest.raises(ValueError, match="attention_schedule"):
    CONFIG.replace(attention_schedule="linear,softmax,linear")
  with pytest.raises(ValueError, match="feature_map"):
    LinearAttentionConfig(feature_map="cosine")
  with pytest.raises(ValueError, match="decay"):
    LinearAttentionConfig(decay="mamba")
  with pytest.raises(ValueError, match="num_heads"):
    softmax_attention_fn()(_x((1, 2, 3, 4)), _x((1, 2, 2, 4)), _x((1, 2, 2, 4)),
                           q_positions=jnp.zeros((1, 2), jnp.int32), kv_positions=jnp.zeros((1, 2), jnp.int32))
