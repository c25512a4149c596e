"""Paged KV cache (efficient.attention.paged): the page allocator (allocate, append on page boundaries, free and
reuse, exhaustion eagerly and under jit), the layer cache against the float cache (prefill + a kernel decode
step), and end to end on a tiny Llama: paged float decoding == the float cache token for token, logits ==
full recomputation, int8 pages == recomputation with per-token quantized k/v; on 8 fake devices == one device;
pools and pages that cannot work rejected when the cache is made."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels
from efficient import sharding
from efficient.attention import cache as cache_lib
from efficient.attention import core, paged
from efficient.attention.paged import PagedKV
from efficient.models import llama
from efficient.quant import kv_cache
from tests.helpers import assert_close, rel_rms_error

CONFIG = llama.TINY.replace(num_layers=1)  # one layer: every path, half the compile time
# Pages of 16 tokens run on every backend's kernel (GPU: a power of two >= 16; TPU: f32 rows by 8, int8 codes
# by 32): the prefill fills most of page 0, decoding crosses into page 1.
PROMPT, MAX_LEN, PAGE = 12, 20, 16
QUANT_PAGE = 32 if jax.default_backend() == "tpu" else PAGE
step = jax.jit(lambda model, tokens, cache: model(tokens, cache=cache))
forward = jax.jit(lambda model, tokens: model(tokens))


def held_pages(pool):
  table = np.asarray(pool.page_table)
  return [table[b, :n].tolist() for b, n in enumerate(np.asarray(pool.pages_held))]


def assert_partition(pool):
  """Every page is either free or held by exactly one sequence."""
  free = np.asarray(pool.free)[:int(pool.num_free)].tolist()
  held = sum(held_pages(pool), [])
  assert sorted(free + held) == list(range(pool.num_pages)), (free, held)


def test_pool_allocates_on_page_boundaries_frees_and_reuses():
  pool = paged.PagePool.create(num_pages=6, batch=2, max_pages_per_seq=4, page_size=4)
  pool = paged.append(pool, jnp.asarray([5, 3]))  # 2 pages and 1 page
  assert held_pages(pool) == [[0, 1], [2]] and int(pool.num_free) == 3
  pool = paged.append(pool, jnp.asarray([3, 1]))  # 8 and 4 tokens: both still inside their pages
  assert held_pages(pool) == [[0, 1], [2]] and np.asarray(pool.lengths).tolist() == [8, 4]
  pool = paged.append(pool, 1)  # 9 and 5 tokens: each crosses a boundary
  assert held_pages(pool) == [[0, 1, 3], [2, 4]] and int(pool.num_free) == 1
  assert_partition(pool)
  pool, freed = paged.free_sequence(pool, 0)
  assert np.asarray(freed).tolist() == [0, 1, 3, paged.NO_PAGE] and int(pool.num_free) == 4
  assert held_pages(pool)[0] == [] and int(pool.lengths[0]) == 0
  pool = paged.append(pool, jnp.asarray([0, 8]))  # sequence 1 grows to 13 tokens: 2 more pages, freed ones
  assert held_pages(pool)[1][:2] == [2, 4] and set(held_pages(pool)[1][2:]) <= {0, 1, 3}
  assert_partition(pool)
  pool, pages = paged.allocate(pool, 2)
  assert int(pool.num_free) == 0 and set(np.asarray(pages).tolist()) <= {0, 1, 3, 5}
  assert not bool(pool.exhausted)


def test_pool_exhaustion_raises_eagerly_and_flags_under_jit():
  pool = paged.PagePool.create(num_pages=3, batch=2, max_pages_per_seq=4, page_size=4)
  pool = paged.append(pool, jnp.asarray([4, 4]))
  with pytest.raises(ValueError, match=r"^PagePool exhausted: growing the sequences needs 2 pages but only 1"):
    paged.append(pool, 1)
  with pytest.raises(ValueError, match=r"^PagePool exhausted: allocate\(2\) needs 2 pages but only 1"):
    paged.allocate(pool, 2)
  grown = jax.jit(paged.append)(pool, 1)  # under jit: all or nothing, and the sticky flag
  assert bool(grown.exhausted) and held_pages(grown) == held_pages(pool) and int(grown.num_free) == 1
  assert np.asarray(grown.lengths).tolist() == [4, 4]  # the request that did not fit changed nothing
  still = paged.append(grown, 0)  # eagerly, a request that fits does not raise over the earlier flag
  assert bool(still.exhausted) and int(still.num_free) == 1
  with pytest.raises(ValueError, match=r"^lengths: a sequence of 17 tokens exceeds the page table's 4 pages"):
    paged.reserve(pool, 17)


def test_paged_kv_format_is_validated_and_hashable():
  assert hash(PagedKV(page_size=8)) == hash(PagedKV(page_size=8)) and PagedKV(8).name == "paged-float-8"
  assert isinstance(PagedKV(), cache_lib.KVFormat)
  with pytest.raises(ValueError, match=r"^page_size=0 must be an int >= 1"):
    PagedKV(page_size=0)
  with pytest.raises(ValueError, match=r"^storage='int5' must be one of"):
    PagedKV(storage="int5")
  with pytest.raises(ValueError, match=r"^num_pages=0 must be an int >= 1"):
    PagedKV(num_pages=0)
  with pytest.raises(ValueError, match=r"^kv_group_size applies to the contiguous quantized caches only"):
    llama.init_cache(CONFIG, 1, 8, kv_format=PagedKV(8), kv_group_size=4)
  layer = llama.init_cache(CONFIG, 3, 40, kv_format=PagedKV(page_size=QUANT_PAGE, storage="int4"))["layers"][0]
  default_pool = 3 * -(-40 // QUANT_PAGE)
  assert layer.pages["k"].shape == (default_pool, QUANT_PAGE, CONFIG.num_kv_heads, CONFIG.head_dim // 2)
  axes = layer.logical_axes()
  assert jax.tree.structure(layer) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))
  assert axes.pages["k"] == (None, None, "kv_heads", None) and axes.pool.page_table == ("batch", None)


def test_layer_cache_prefill_and_kernel_decode_match_float_cache():
  """A chunked prefill (6 + 14 tokens, through the contiguous view), then a one-token step through the GPU
  kernel (interpret mode) reading non-contiguous page tables."""
  batch, heads, kv_heads, head_dim, max_len = 2, 4, 2, 32, 40
  keys = jax.random.normal(jax.random.key(0), (2, batch, 21, kv_heads, head_dim))
  q, k, v = jax.random.normal(jax.random.key(1), (batch, 21, heads, head_dim)), keys[0], keys[1]
  positions = jnp.broadcast_to(jnp.arange(max_len), (batch, max_len))
  seen = lambda n: jnp.where(positions < n, positions, 2 ** 30)  # kv positions after n tokens are written

  @functools.partial(jax.jit, static_argnames=("start", "stop"))
  def run(cache, start, stop, lengths=None):
    return cache.update_and_attend(q[:, start:stop], k[:, start:stop], v[:, start:stop], index=jnp.int32(start),
                                   q_positions=positions[:, start:stop], kv_positions=seen(stop), kv_lengths=lengths)

  float_cache = cache_lib.make_layer_cache("float", batch, max_len, kv_heads, head_dim)
  paged_cache = PagedKV(page_size=16, num_pages=12).create(batch, max_len, kv_heads, head_dim)
  for start, stop in ((0, 6), (6, 20)):
    expected, float_cache = run(float_cache, start=start, stop=stop)
    out, paged_cache = run(paged_cache, start=start, stop=stop)
    assert_close(f"prefill [{start}, {stop})", out, expected, 1e-6)
  assert held_pages(paged_cache.pool) == [[0, 2], [1, 3]]  # allocated as the rows grew: not contiguous
  lengths = jnp.full((batch,), 21, jnp.int32)
  expected, _ = run(float_cache, lengths=lengths, start=20, stop=21)
  with pallas_kernels.implementation("interpret_gpu"):
    out, paged_cache = run(paged_cache, lengths=lengths, start=20, stop=21)
  assert_close("kernel decode step", out, expected, 1e-5)


@pytest.fixture(scope="module")
def model():
  return llama.Llama(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, MAX_LEN), 0, CONFIG.vocab_size, dtype=jnp.int32)


def decode(model, tokens, cache):
  """Logits of a prefill of PROMPT tokens, then token-by-token steps over the rest of `tokens`."""
  logits, cache = step(model, tokens[:, :PROMPT], cache)
  pieces = [logits]
  for i in range(PROMPT, tokens.shape[1]):
    logits, cache = step(model, tokens[:, i:i + 1], cache)
    pieces.append(logits)
  assert not bool(cache["layers"][0].pool.exhausted)
  return jnp.concatenate(pieces, 1)


def test_generate_with_paged_cache_equals_float_cache(model, tokens):
  prompt = tokens[:, :PROMPT]
  np.testing.assert_array_equal(llama.generate(model, prompt, MAX_LEN - PROMPT, kv_format=PagedKV(page_size=PAGE)),
                                llama.generate(model, prompt, MAX_LEN - PROMPT))


def per_token_quantized_attention(storage):
  """Full recomputation with every k/v rounded through `storage`'s per-token codes (what the pages hold)."""
  fmt = cache_lib.token_format(storage)

  def attention(q, k, v, **kwargs):
    keys, values = fmt.decode(fmt.encode(k, v, q.dtype), q.dtype)
    return core.softmax_attention(q, keys, values, **kwargs)
  return attention


def paged_cache(storage="float", page_size=PAGE):
  return llama.init_cache(CONFIG, 2, MAX_LEN, kv_format=PagedKV(page_size=page_size, storage=storage))


def test_paged_decoding_logits_match_full_recomputation(model, tokens):
  assert_close("paged float decoding", decode(model, tokens, paged_cache()), forward(model, tokens), 1e-5)
  # int8 pages: the same function as a full forward whose k/v are quantized per token and kv head (int4 pages
  # share every line but the code width; the kernel tests cover their nibble planes).
  simulated = nnx.merge(*nnx.split(model))
  simulated.attention_fn = per_token_quantized_attention("int8")
  decoded, full = decode(model, tokens, paged_cache("int8", QUANT_PAGE)), forward(simulated, tokens)
  assert_close("paged int8 decoding vs per-token quantized recomputation", decoded, full, 1e-5)
  assert rel_rms_error(decoded, forward(model, tokens)) > 1e-5  # the pages really are quantized


def test_sharded_paged_decoding_equals_single_device(model, tokens):
  """8 fake devices: batch on data, kv heads on tensor (pages split by their logical axes), embed on fsdp; the
  decode steps run the (interpreted GPU) kernel inside shard_map, each device on its rows and kv heads."""
  tokens = tokens[:, :PROMPT + 2]
  expected = decode(model, tokens, paged_cache())
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  sharded = nnx.clone(model)
  sharding.shard_model(sharded, mesh, "fsdp_tp")
  cache = paged_cache()
  cache["layers"] = [jax.device_put(layer, kv_cache.layer_cache_shardings(layer, mesh, "fsdp_tp"))
                     for layer in cache["layers"]]
  pages = cache["layers"][0].pages["k"]
  assert pages.sharding.shard_shape(pages.shape) == (*pages.shape[:2], 1, CONFIG.head_dim)
  # The GPU kernel in interpret mode (the TPU one's interpreter stalls under shard_map on fake CPU devices, as
  # noted in tests/pallas_kernels/test_attention_sharded.py; both kernels see only their shard's arrays).
  with jax.set_mesh(mesh), pallas_kernels.implementation("interpret_gpu"):
    assert "shard_map" in str(jax.make_jaxpr(step)(sharded, tokens[:, :1], dict(cache, index=jnp.int32(PROMPT))))
    logits = decode(sharded, tokens, cache)
  assert len(logits.sharding.device_set) == 8
  assert_close("sharded paged decoding", logits, expected, 1e-5)


def test_paged_kv_rejects_pools_and_pages_that_cannot_work():
  with pytest.raises(ValueError, match=r"^num_pages=3 is too small: 2 sequences of up to max_len=20 tokens need "
                                       r"2 \* ceil\(20 / page_size=16\) = 4 pages"):
    llama.init_cache(CONFIG, 2, MAX_LEN, kv_format=PagedKV(page_size=PAGE, num_pages=3))
  with pytest.raises(ValueError, match=r"^head_dim=15 must be a multiple of 2"):
    PagedKV(storage="int4").create(1, 8, 1, 15)
  # The kernel that will read the pages decides what a page may be, checked when the cache is made.
  with pallas_kernels.implementation("interpret_tpu"):
    with pytest.raises(ValueError, match=r"^page_size=16 does not fit the TPU tiling: .* multiple of 32"):
      PagedKV(page_size=16, storage="int8").create(1, 64, 2, 32)
    PagedKV(page_size=32, storage="int8").create(1, 64, 2, 32)
  with pallas_kernels.implementation("interpret_gpu"):
    with pytest.raises(ValueError, match=r"^page_size=8 does not fit the GPU \(Triton\) kernel"):
      PagedKV(page_size=8).create(1, 64, 2, 32)
