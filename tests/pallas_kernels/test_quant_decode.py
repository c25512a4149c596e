"""quant_decode: every implementation runnable here vs a NumPy re-derivation (int8 and packed int4 KIVI caches;
ragged lengths incl. 0, shorter than one group, a multiple of the group, partial; stale NaN slots; GQA; splits
and blocks of groups), per-key logits and lse, a TPU interpret run with race detection, the cost model's
traffic vs the packed cache bytes, and bad input."""
import jax
import jax._src.pallas.mosaic.interpret.interpret_pallas_call as tpu_interpret
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _dispatch
from pallas_kernels.quant_decode import IMPLEMENTATIONS, cost, quant_decode, tpu
from tests.helpers import TOLERANCE, assert_close, interpreted

B, H, H_KV, D, S, G = 4, 4, 2, 32, 64, 32  # G = 32: the TPU kernel's smallest group; 2 groups of slots
LENGTHS = (45, 32, 13, 0)  # open group of 13; a multiple of G (empty open group); below one group; empty
# Chunks / blocks of one group and 2 splits: every path crosses a chunk or split boundary.
OPTIONS = {"xla": dict(block_groups=1), "interpret_tpu": dict(block_groups=1, num_splits=2),
           "interpret_gpu": dict(num_splits=2), "reference": {}}


def numpy_unpack(codes, bits, axis):
  """Planar unpacking re-derived: int4 byte i holds rows i (low nibble) and i + K/2 (high nibble)."""
  codes = np.asarray(codes).astype(np.int64)
  return codes if bits == 8 else np.concatenate([codes & 15, codes >> 4], axis=axis)


def make_cache(bits, dtype, lengths=LENGTHS, seed=0):
  """Random codes/scales/zeros; every slot (group, residual row) that no query may read holds NaN."""
  rng = np.random.default_rng(seed)
  n = S // G
  arrays = dict(
      k_codes=rng.integers(0, 256, (B, n, G * bits // 8, H_KV, D)).astype(np.uint8),
      k_scale=rng.uniform(0.01, 0.1, (B, n, 1, H_KV, D)).astype(np.float32),
      k_zero=rng.integers(0, 2 ** bits, (B, n, 1, H_KV, D)).astype(np.uint8),
      k_residual=rng.standard_normal((B, G, H_KV, D)).astype(np.float32),
      v_codes=rng.integers(0, 256, (B, S, H_KV, D * bits // 8)).astype(np.uint8),
      v_scale=rng.uniform(0.01, 0.1, (B, S, H_KV, 1)).astype(np.float32),
      v_zero=rng.integers(0, 2 ** bits, (B, S, H_KV, 1)).astype(np.uint8))
  for b, length in enumerate(lengths):
    complete = length // G
    arrays["k_scale"][b, complete:] = np.nan
    arrays["k_residual"][b, length - complete * G:] = np.nan
    arrays["v_scale"][b, length:] = np.nan
  q = rng.standard_normal((B, H, D)).astype(np.float32)
  cast = {"k_residual": dtype}
  return jnp.asarray(q, dtype), {k: jnp.asarray(v, cast.get(k, v.dtype)) for k, v in arrays.items()}


def numpy_quant_decode(q, a, lengths, bits):
  """(out [B, H, D], logits [B, H, S], lse [B, H]) in float64, slot by slot."""
  q = np.asarray(q, np.float64)
  keys = (numpy_unpack(a["k_codes"], bits, 2) - np.asarray(a["k_zero"], np.int64)) * np.asarray(a["k_scale"],
                                                                                                 np.float64)
  keys = keys.reshape(B, -1, H_KV, D)
  values = (numpy_unpack(a["v_codes"], bits, 3) - np.asarray(a["v_zero"], np.int64)) * np.asarray(a["v_scale"],
                                                                                                   np.float64)
  residual = np.asarray(a["k_residual"], np.float64)
  out, logits, lse = np.zeros((B, H, D)), np.full((B, H, S), -np.inf), np.full((B, H), np.inf)
  for b, length in enumerate(lengths):
    complete = length // G * G
    for h in range(H):
      kv = h // (H // H_KV)
      for s in range(length):
        key = keys[b, s, kv] if s < complete else residual[b, s - complete, kv]
        logits[b, h, s] = key @ q[b, h] / np.sqrt(D)
      if length:
        w = np.exp(logits[b, h, :length] - logits[b, h, :length].max())
        out[b, h] = (w / w.sum()) @ values[b, :length, kv]
        lse[b, h] = np.log(w.sum()) + logits[b, h, :length].max()
  return out, logits, lse


def _args(q, a):
  return (q, a["k_codes"], a["k_scale"], a["k_zero"], a["k_residual"], a["v_codes"], a["v_scale"], a["v_zero"],
          jnp.asarray(LENGTHS, jnp.int32))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("implementation", _dispatch.runnable(IMPLEMENTATIONS))
def test_matches_numpy(implementation, bits):
  q, a = make_cache(bits, jnp.float32)
  out = quant_decode(*_args(q, a), bits=bits, implementation=implementation,
                     **OPTIONS[interpreted(implementation)])
  expected, _, _ = numpy_quant_decode(q, a, LENGTHS, bits)
  assert out.dtype == q.dtype and out.shape == q.shape
  assert_close(f"{implementation} int{bits}", out, expected, TOLERANCE[jnp.dtype(jnp.float32)])
  assert not np.any(np.asarray(out)[np.asarray(LENGTHS) == 0])  # an empty row gives zeros


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_key_logits_and_bf16(implementation):
  q, a = make_cache(4, jnp.bfloat16, seed=1)
  out, logits, lse = quant_decode(*_args(q, a), bits=4, implementation=implementation, return_key_logits=True,
                                  **OPTIONS[implementation])
  expected, expected_logits, expected_lse = numpy_quant_decode(q.astype(jnp.float32), a, LENGTHS, 4)
  assert out.dtype == jnp.bfloat16 and logits.shape == (B, H, S) and lse.shape == (B, H)
  assert_close(f"{implementation} bf16 out", out.astype(jnp.float32), expected, TOLERANCE[jnp.dtype(jnp.bfloat16)])
  visible = np.isfinite(expected_logits)
  np.testing.assert_array_equal(np.isfinite(np.asarray(logits)), visible)  # -inf exactly past each length
  assert_close("logits", np.asarray(logits)[visible], expected_logits[visible], TOLERANCE[jnp.dtype(jnp.bfloat16)])
  mass = np.exp(np.asarray(logits, np.float64) - np.asarray(lse, np.float64)[..., None]).sum(-1)
  np.testing.assert_allclose(mass[np.asarray(LENGTHS) > 0], 1.0, rtol=1e-5)  # attention mass sums to one
  assert np.all(np.isinf(np.asarray(lse)[np.asarray(LENGTHS) == 0]))


def test_tpu_kernel_has_no_races():
  """int4 (two nibble planes), 2 splits of one block of one group, every length case, race detection on."""
  q, a = make_cache(4, jnp.float32, seed=2)
  params = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager", uninitialized_memory="nan")
  args = _args(q, a)
  try:
    acc, m, l = tpu.decode(*args[:8], args[8], bits=4, scale=D ** -0.5, block_groups=1, num_splits=2,
                           interpret=params)
    jax.block_until_ready(acc)
  finally:
    races_found = tpu_interpret.races.races_found
    pltpu.reset_tpu_interpret_mode_state()
  assert not races_found
  assert acc.shape == (B, 2, H, D) and m.shape == l.shape == (B, 2, H)


@pytest.mark.parametrize("bits", [8, 4])
def test_modeled_traffic_close_to_packed_cache_bytes(bits):
  """SmolLM2's layer (H 9, H_kv 3, D 64), S = 4096, G = 32, bf16, 4091 valid slots (an open group of 27 float
  keys): the kernel moves <= 1.15x the packed cache, and `packed_bytes` is what the cache stores for them."""
  batch, heads, kv_heads, dim, max_len, group = 1, 9, 3, 64, 4096, 32
  length = max_len - 5
  complete, open_keys = length // group * group, length % group
  packed = (complete * kv_heads * dim * bits // 8              # K codes of the complete groups
            + complete // group * kv_heads * dim * (4 + 1)     # K: f32 scale + uint8 zero per channel per group
            + length * kv_heads * (dim * bits // 8 + 4 + 1)    # V codes, scale, zero per token and head
            + open_keys * kv_heads * dim * 2)                  # the open group's bf16 keys
  v_shape = (batch, max_len, kv_heads, dim)
  modeled = cost((batch, heads, dim), v_shape, group_size=group, dtype=jnp.bfloat16, bits=bits, lengths=length)
  assert modeled["packed_bytes"] == packed
  assert modeled["hbm_bytes"] <= 1.15 * packed, (modeled, packed)
  assert modeled["ideal_bytes"] <= modeled["hbm_bytes"]
  short = cost((batch, heads, dim), v_shape, group_size=group, dtype=jnp.bfloat16, bits=bits, lengths=700)
  assert short["hbm_bytes"] < 0.35 * modeled["hbm_bytes"]  # 2 of 8 blocks: those past the length are not fetched


def test_bad_input():
  q, a = make_cache(8, jnp.float32)
  args = list(_args(q, a))
  with pytest.raises(ValueError, match="bits"):
    quant_decode(*args, bits=5)
  with pytest.raises(ValueError, match="k_codes"):
    quant_decode(*args, bits=4)  # int8 codes are twice as long as int4's
  with pytest.raises(ValueError, match="v_scale"):
    quant_decode(*args[:6], args[6][:, :, :, 0], *args[7:], bits=8)
  with pytest.raises(ValueError, match="lengths"):
    quant_decode(*args[:8], jnp.zeros((B,), jnp.float32), bits=8)
  with pytest.raises(ValueError, match="num_heads"):
    quant_decode(q[:, :3], *args[1:], bits=8)
  with pytest.raises(ValueError, match="block_groups"):
    quant_decode(*args, bits=8, implementation="interpret_tpu", block_groups=3)  # 3 does not divide 2 groups
  with pytest.raises(ValueError, match="return_key_logits"):
    quant_decode(*args, bits=8, implementation="interpret_gpu", return_key_logits=True)
  with pytest.raises(ValueError, match="implementation"):
    quant_decode(*args, bits=8, implementation="pallas_tpu")  # no TPU here
