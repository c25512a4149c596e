"""paged_decode: every implementation runnable here vs a NumPy re-derivation (float, int8, int4 pages; f32/bf16;
ragged lengths incl. 0; shuffled, non-contiguous page tables with garbage past each sequence's pages; GQA/MQA;
splits and pages per block), a TPU interpret run with race detection, the cost model (pages fetched, traffic
vs the cache bytes), and bad input."""
import jax
import jax._src.pallas.mosaic.interpret.interpret_pallas_call as tpu_interpret
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _dispatch
from pallas_kernels.flash_attention import _common as flash_common
from pallas_kernels.paged_decode import IMPLEMENTATIONS, cost, fetched_pages, paged_decode, tpu
from tests.helpers import TOLERANCE, assert_close

# name -> (B, H, H_kv, D, page_size, num_pages, pages per sequence, bits, dtype, lengths, options)
CASES = {
    # GQA group 3, ragged lengths with an empty row and a full one, 2 splits x 2 pages per block.
    "float_gqa_f32": (3, 6, 2, 32, 16, 17, 5, None, jnp.float32, (0, 37, 80), dict(num_splits=2, pages_per_block=2)),
    "float_bf16_defaults": (2, 4, 2, 64, 16, 9, 4, None, jnp.bfloat16, (64, 1), {}),
    # MQA; int8 codes need 32-row pages on TPU (8-bit sublane tile).
    "int8_mqa_bf16": (2, 4, 1, 64, 32, 7, 3, 8, jnp.bfloat16, (70, 33), dict(num_splits=2)),
    # int4: two nibble planes of head_dim / 2; 3 splits over 3 pages, one of them past every length.
    "int4_gqa_f32": (2, 4, 2, 64, 32, 8, 3, 4, jnp.float32, (65, 17), dict(num_splits=3)),
}


def make_case(batch, num_heads, num_kv_heads, head_dim, page_size, num_pages, max_pages, bits, dtype, lengths,
              seed=0):
  """Random q, a pool whose slots no sequence reads hold NaN (recycled pages), a shuffled page table whose
  entries past a sequence's last valid page hold garbage (-1 or past the pool: never read, not an error)."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((batch, num_heads, head_dim)), dtype)
  table = rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages)
  unused = np.arange(max_pages)[None, :] * page_size >= np.asarray(lengths)[:, None]
  table = np.where(unused, np.where(np.arange(batch)[:, None] % 2, num_pages + 7, -1), table)
  valid = np.zeros((num_pages, page_size), bool)  # pool slots some sequence reads
  for b, length in enumerate(lengths):
    for t in range(length):
      valid[table[b, t // page_size], t % page_size] = True
  shape = (num_pages, page_size, num_kv_heads)
  hide = lambda x: np.where(valid[:, :, None, None], x, np.nan)
  if bits is None:
    pages = {name: jnp.asarray(hide(rng.standard_normal((*shape, head_dim))), dtype) for name in ("k", "v")}
  else:
    pages = {}
    for name in ("k", "v"):
      pages[name] = jnp.asarray(rng.integers(0, 256, (*shape, head_dim * bits // 8)), jnp.uint8)
      pages[f"{name}_scale"] = jnp.asarray(hide(rng.uniform(0.01, 0.1, (*shape, 1))), jnp.float32)
      pages[f"{name}_zero"] = jnp.asarray(rng.integers(0, 2 ** bits, (*shape, 1)), jnp.uint8)
  return q, pages, jnp.asarray(table, jnp.int32), jnp.asarray(lengths, jnp.int32)


def numpy_values(pages, name, bits, dtype):
  """[num_pages, ps, H_kv, D] float64 values of k or v, rounded through the kernels' compute dtype."""
  if bits is None:
    values = np.asarray(pages[name], np.float64)
  else:
    codes = np.asarray(pages[name]).astype(np.int64)
    if bits == 4:  # planar: byte i holds dim i (low nibble) and dim i + D/2 (high nibble)
      codes = np.concatenate([codes & 15, codes >> 4], axis=-1)
    values = (codes - np.asarray(pages[f"{name}_zero"], np.float64)) * np.asarray(pages[f"{name}_scale"], np.float64)
  return np.asarray(jnp.asarray(values, jnp.float32).astype(dtype).astype(jnp.float32), np.float64)


def numpy_paged_decode(q, pages, table, lengths, bits):
  k, v = (numpy_values(pages, name, bits, q.dtype) for name in "kv")  # the kernels dequantize to q's dtype
  q = np.asarray(q.astype(jnp.float32), np.float64)
  batch, num_heads, head_dim = q.shape
  page_size, num_kv_heads = k.shape[1], k.shape[2]
  out = np.zeros_like(q)
  for b in range(batch):
    n = int(lengths[b])
    if n == 0:
      continue
    slots = [(int(table[b, t // page_size]), t % page_size) for t in range(n)]
    keys = np.stack([k[p, o] for p, o in slots])  # [n, H_kv, D]
    values = np.stack([v[p, o] for p, o in slots])
    for h in range(num_heads):
      kk = h // (num_heads // num_kv_heads)
      s = keys[:, kk] @ q[b, h] / np.sqrt(head_dim)
      p = np.exp(s - s.max())
      out[b, h] = (p / p.sum()) @ values[:, kk]
  return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("implementation", _dispatch.runnable(IMPLEMENTATIONS))
def test_paged_decode_matches_numpy(implementation, case):
  *shape, bits, dtype, lengths, options = CASES[case]
  q, pages, table, lengths_arr = make_case(*shape, bits, dtype, lengths)
  out = paged_decode(q, pages, table, lengths_arr, bits=bits, implementation=implementation, **options)
  assert out.dtype == q.dtype and out.shape == q.shape
  expected = numpy_paged_decode(q, pages, np.asarray(table), lengths, bits)
  assert_close(f"{implementation} {case}", np.asarray(out.astype(jnp.float32)), expected, TOLERANCE[jnp.dtype(dtype)])
  assert not np.any(np.asarray(out.astype(jnp.float32))[np.asarray(lengths) == 0])  # empty rows -> zeros


def test_tpu_kernel_has_no_races():
  """int4 (two planes), 2 splits x 2 pages per block, a zero-length row: every code path, race detection on."""
  q, pages, table, lengths = make_case(2, 4, 2, 64, 32, 8, 4, 4, jnp.float32, (0, 100))
  geometry = flash_common.Geometry(q_len=1, kv_len=128, block_q=1, block_kv=32, causal=False, window=None,
                                   soft_cap=None, scale=64 ** -0.5)
  params = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager", uninitialized_memory="nan")
  try:
    out = tpu.decode(q, pages, table, lengths, geometry=geometry, bits=4, pages_per_block=2, num_splits=2,
                     interpret=params)
    jax.block_until_ready(out)
  finally:
    races_found = tpu_interpret.races.races_found
    pltpu.reset_tpu_interpret_mode_state()
  assert not races_found
  assert_close("race-checked run", out, numpy_paged_decode(q, pages, np.asarray(table), (0, 100), 4), 1e-5)


def test_cost_reads_only_valid_pages():
  # 8 pages of 16 tokens per sequence, f32, H 8, H_kv 2, D 128, one page per step: length 20 reads 2 pages.
  short, full = (cost((1, 8, 128), (64, 16, 2, 128), 8, dtype=jnp.float32, lengths=n, num_splits=1,
                      pages_per_block=1) for n in (20, 128))
  assert full["hbm_bytes"] - short["hbm_bytes"] == 6 * 16 * 2 * (2 * 128 * 4)  # 6 more K and V pages
  assert short["ideal_bytes"] == 2 * 8 * 128 * 4 + 20 * 2 * 2 * 128 * 4
  # 4 pages per step (2 steps): operand 0 reads pages 0 then 1, operands 1-3 (clamped) page 1 once each;
  # 4 splits of 2 pages: splits past the length stay on the resident page.
  assert fetched_pages(20, 16, 8, 4, 1) == 5 and fetched_pages(20, 16, 8, 1, 4) == 2
  assert fetched_pages(0, 16, 8, 1, 2) == 1  # an empty sequence still fetches its first page once
  # int4 pages: codes D/2 bytes + f32 scale + uint8 zero per token, kv head and K/V.
  quant = cost((1, 8, 128), (64, 16, 2, 128), 8, dtype=jnp.bfloat16, bits=4, lengths=20, num_splits=1,
               pages_per_block=1)
  assert quant["ideal_bytes"] == 2 * 8 * 128 * 2 + 20 * 2 * 2 * (64 + 4 + 1)
  assert quant["flops"] == short["flops"]


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_modelled_traffic_is_close_to_the_cache_bytes(bits):
  """SmolLM2 heads, 4 sequences of 2048 tokens in 32-token pages, bf16 queries: what the TPU kernel moves (the
  pages, the block-diagonal q, the table, the splits' f32 partials) stays within 1.15x of reading the stored
  cache and q/out once."""
  modelled = cost((4, 9, 64), (256, 32, 3, 64), 64, dtype=jnp.bfloat16, bits=bits)
  assert modelled["ideal_bytes"] <= modelled["hbm_bytes"] <= 1.15 * modelled["ideal_bytes"]
  per_token = {None: 2 * 64 * 2, 8: 2 * (64 + 4 + 1), 4: 2 * (32 + 4 + 1)}[bits] * 3  # K and V, 3 kv heads
  assert modelled["ideal_bytes"] == 4 * 2 * 9 * 64 * 2 + 4 * 2048 * per_token


_Q = jnp.ones((2, 4, 32))
_FLOAT = {name: jnp.ones((6, 16, 2, 32)) for name in ("k", "v")}
_TABLE, _LENGTHS = jnp.asarray([[0, 1], [2, 3]], jnp.int32), jnp.asarray([3, 20], jnp.int32)
_INT8 = {"k": jnp.ones((6, 16, 2, 32), jnp.uint8), "k_scale": jnp.ones((6, 16, 2, 1)),
         "k_zero": jnp.ones((6, 16, 2, 1), jnp.uint8)}
_INT8 |= {"v" + key[1:]: value for key, value in _INT8.items()}
BAD_INPUTS = {  # name -> (keyword arguments, regex the ValueError must match: it names the argument)
    "q_rank_4": (dict(q=jnp.ones((2, 1, 4, 32))), r"^q must be a non-empty 3-D array"),
    "bits_3": (dict(bits=3), r"^bits=3 must be one of"),
    "missing_scale": (dict(bits=8, pages={k: v for k, v in _INT8.items() if k != "v_scale"}),
                      r"^pages must be a dict with keys"),
    "float_dtype_mismatch": (dict(pages={"k": _FLOAT["k"].astype(jnp.bfloat16), "v": _FLOAT["v"]}),
                             r"^pages\['k'\]: dtype bfloat16 must be float32"),
    "codes_not_uint8": (dict(bits=8, pages=_INT8 | {"v": jnp.ones((6, 16, 2, 32), jnp.int32)}),
                        r"^pages\['v'\]: dtype int32 must be uint8"),
    "int4_codes_width": (dict(bits=4, pages=_INT8), r"^pages\['k'\] must be \[num_pages, page_size, H_kv, 16\]"),
    "v_other_pool": (dict(pages={"k": _FLOAT["k"], "v": jnp.ones((5, 16, 2, 32))}), r"^pages\['v'\] must be"),
    "heads_not_multiple": (dict(q=jnp.ones((2, 3, 32))), r"^num_heads: q has H=3 heads"),
    "page_table_batch": (dict(page_table=_TABLE[:1]), r"^page_table must be an integer array \[B=2"),
    "page_table_float": (dict(page_table=_TABLE.astype(jnp.float32)), r"^page_table must be an integer array"),
    "page_outside_pool": (dict(page_table=jnp.asarray([[0, 1], [6, 3]], jnp.int32)),
                          r"^page_table\[1, 0\]=6 is outside the pool of num_pages=6"),
    "lengths_past_table": (dict(lengths=jnp.asarray([3, 33], jnp.int32)),
                           r"^lengths\[1\]=33 exceeds what page_table holds: 2 pages of page_size=16 = 32 tokens"),
    "lengths_shape": (dict(lengths=jnp.asarray([3])), r"^lengths must be an integer array of shape \(B,\)"),
    "pages_per_block_zero": (dict(pages_per_block=0), r"^pages_per_block=0 must be a positive int"),
    "tpu_page_size": (dict(pages={n: jnp.ones((6, 12, 2, 32)) for n in "kv"}, implementation="interpret_tpu"),
                      r"^page_size=12 does not fit the TPU tiling: .* multiple of 8"),
    "tpu_int8_page_size": (dict(bits=8, pages=_INT8, implementation="interpret_tpu"),
                           r"^page_size=16 does not fit the TPU tiling: .* multiple of 32"),
    "gpu_page_size": (dict(pages={n: jnp.ones((6, 24, 2, 32)) for n in "kv"}, implementation="interpret_gpu"),
                      r"^page_size=24 does not fit the GPU \(Triton\) kernel"),
    "gpu_int4_head_dim": (dict(q=jnp.ones((2, 4, 48)), bits=4,
                               pages={k: jnp.ones((6, 16, 2, 24 if k in "kv" else 1), v.dtype)
                                      for k, v in _INT8.items()}, implementation="interpret_gpu"),
                          r"^head_dim=48 is not supported by the GPU \(Triton\) paged decode kernel"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_paged_decode_rejects_bad_input(bad):
  overrides, message = BAD_INPUTS[bad]
  kwargs = dict(q=_Q, pages=_FLOAT, page_table=_TABLE, lengths=_LENGTHS, implementation="reference") | overrides
  with pytest.raises(ValueError, match=message):
    paged_decode(**kwargs)
