"""lowbit_adam: the fused block-wise quantized Adam step against independent NumPy re-derivations.

- The maps: bitsandbytes' `create_dynamic_map` (signed and unsigned) and Li et al.'s 4-bit maps re-derived here in
  NumPy from the published algorithms (torch.linspace's float32 formula, float32 means and scales) -> exactly equal.
- Block-wise quantization of a state tensor: absmax per block, nearest code by float64 distances (argmin: ties to
  the lower code), the never-zero rule of the unsigned 8-bit map -> codes and absmax exactly equal.
- The step: every implementation runnable here x (8-bit, Li et al. 4-bit maps) on several tiles with a ragged last
  one (plus one-tile and naive-4-bit cases) against a float32 NumPy re-derivation in the same order of operations
  (no fused multiply-adds, as the op pins every product's rounding; reciprocals of the per-block absmax and of
  the bias corrections, as the op writes out XLA's rewrite of a division by a broadcast). All five outputs are
  EXACT; the one scalar not re-derived in NumPy is optax's bias correction `1 - b ** count`, which is taken from
  jax because XLA's float32 pow rounds differently from NumPy's. Interpret modes equal the reference bit-for-bit
  on all five outputs.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.lowbit_adam import (IMPLEMENTATIONS, MAPS, blockwise_adam_update, cost, dequantize_blocks, maps,
                                        quantize_blocks, tpu)
from tests.helpers import interpreted

F32 = np.float32
MAP_PAIRS = {"8bit": ("dynamic_signed_8", "dynamic_unsigned_8"), "4bit": ("de_signed_4", "linear_unsigned_4_nozero"),
             "4bit_naive": ("linear_signed_4", "linear_unsigned_4")}
HYPER = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


# ---- NumPy re-derivations ------------------------------------------------------------------------------------------

def np_linspace_f32(start, end, steps):
  """torch.linspace(start, end, steps) in float32: start + step*k below steps // 2, end - step*(steps-1-k) above."""
  start, end = F32(start), F32(end)
  step = F32((end - start) / F32(steps - 1))
  k = np.arange(steps, dtype=F32)
  low = start + step * k
  high = end - step * (F32(steps - 1) - k)
  return np.where(np.arange(steps) < steps // 2, low, high).astype(F32)


def np_dynamic_map(signed, exponent_bits, total_bits):
  """bitsandbytes / lpmm create_dynamic_map: per exponent group i, float32 means of a 0.1..1 linspace times
  10**(i - (exponent_bits - 1)), negated copies when signed, then 0 and 1; zero-padded to 2**total_bits, sorted."""
  values = [F32(0.0), F32(1.0)]
  for i in range(exponent_bits):
    n = (2 ** (i + total_bits - 1 - exponent_bits) + 1) if signed else (2 ** (i + total_bits - exponent_bits) + 1)
    edges = np_linspace_f32(0.1, 1.0, n)
    means = (edges[1:] + edges[:-1]) / F32(2)
    scale = F32(10.0 ** (i - (exponent_bits - 1)))
    values += list(means * scale)
    if signed:
      values += list(means * -scale)
  values += [F32(0.0)] * (2 ** total_bits - len(values))
  return np.sort(np.array(values, F32))


def np_unpack(codes, bits):
  codes = np.asarray(codes).astype(np.int64)
  if bits == 8:
    return codes
  out = np.empty((codes.shape[0], 2 * codes.shape[1]), np.int64)
  out[:, 0::2], out[:, 1::2] = codes & 15, codes >> 4
  return out


def np_pack(codes, bits):
  return codes.astype(np.uint8) if bits == 8 else (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def np_quantize(x, map_name):
  """Block-wise quantization: absmax per block, nearest map value of x / absmax (float64 distances, ties low)."""
  values = MAPS[map_name].astype(np.float64)
  absmax = np.abs(x).max(axis=1).astype(F32)
  normalized = (x * (F32(1) / np.where(absmax > 0, absmax, F32(1)))[:, None]).astype(F32)  # one reciprocal/block
  codes = np.argmin(np.abs(normalized.astype(np.float64)[..., None] - values), axis=-1)
  if map_name == "dynamic_unsigned_8":
    codes = np.where((normalized > 0) & (codes == 0), 1, codes)  # never the zero code for a positive v
  return np_pack(codes, 4 if len(values) == 16 else 8), absmax


def optax_bias_correction(decay, count):
  """optax.bias_correction's `1 - decay ** count` for a traced int32 count, as a jitted optax step evaluates it.
  XLA's float32 pow differs from NumPy's by an ulp (e.g. 0.999 ** 3), and `1 - 0.997...` cancels ~9 bits, so this
  one scalar is taken from jax rather than re-derived."""
  return np.asarray(jax.jit(lambda c: 1 - decay ** c)(jnp.asarray(count, jnp.int32))).astype(F32)


def np_adam(grad, param, m_codes, m_absmax, v_codes, v_absmax, count, lr, m_map, v_map, b1, b2, eps, weight_decay):
  bits = {name: 4 if len(MAPS[name]) == 16 else 8 for name in (m_map, v_map)}
  m = MAPS[m_map][np_unpack(m_codes, bits[m_map])] * m_absmax[:, None]
  v = MAPS[v_map][np_unpack(v_codes, bits[v_map])] * v_absmax[:, None]
  m = F32(b1) * m + F32(1 - b1) * grad
  v = F32(b2) * v + F32(1 - b2) * (grad * grad)
  m_hat = m * (F32(1) / optax_bias_correction(b1, count))  # (the reciprocal: XLA's rewrite of a scalar division)
  v_hat = v * (F32(1) / optax_bias_correction(b2, count))
  update = m_hat / (np.sqrt(v_hat) + F32(eps)) + F32(weight_decay) * param
  update = -F32(lr) * update
  m_codes, m_absmax = np_quantize(m, m_map)
  v_codes, v_absmax = np_quantize(v, v_map)
  return update.astype(F32), m_codes, m_absmax, v_codes, v_absmax


def random_state(n_blocks, block, m_map, v_map, seed=0):
  """Random grad/param and random stored states, with one all-zero block (state, grad, param) in the middle."""
  rng = np.random.default_rng(seed)
  grad = rng.normal(size=(n_blocks, block)).astype(F32) * F32(0.1)
  param = rng.normal(size=(n_blocks, block)).astype(F32)
  states = []
  for map_name in (m_map, v_map):
    levels = len(MAPS[map_name])
    codes = rng.integers(0, levels, size=(n_blocks, block))
    absmax = rng.uniform(0.01, 0.2, size=n_blocks).astype(F32)
    codes[n_blocks // 2] = maps.ZERO_CODE[map_name]
    absmax[n_blocks // 2] = 0.0
    states += [np_pack(codes, 4 if levels == 16 else 8), absmax]
  grad[n_blocks // 2] = param[n_blocks // 2] = 0.0  # like padding: zero state, zero grad, zero param
  return grad, param, *states


# ---- the step ------------------------------------------------------------------------------------------------------

def _tile(implementation, n_blocks):
  if n_blocks <= 16:
    return None
  return 32 if _dispatch.tpu_style(implementation) else 16


@pytest.mark.parametrize("shape", [(40, 32)], ids=["ragged_tiles"])  # 2 (TPU) / 3 (GPU) programs, last one partial
@pytest.mark.parametrize("pair", ["8bit", "4bit"])
@pytest.mark.parametrize("implementation", _dispatch.runnable(IMPLEMENTATIONS))
def test_update_matches_numpy_and_reference(implementation, pair, shape):
  m_map, v_map = MAP_PAIRS[pair]
  n_blocks, block = shape
  if interpreted(implementation) == "interpret_gpu" and pair != "8bit" and n_blocks > 16:
    n_blocks = 48  # 4-bit GPU tiles are >= 16 blocks (tl.dot): 48 blocks in 16-block tiles, last one ragged
  args = random_state(n_blocks, block, m_map, v_map)
  count, lr = 3, F32(1e-3)
  run = functools.partial(blockwise_adam_update, count=jnp.int32(count), learning_rate=jnp.float32(lr), **HYPER,
                          m_map=m_map, v_map=v_map)
  got = run(*map(jnp.asarray, args), implementation=implementation,
            blocks_per_tile=_tile(implementation, n_blocks))
  want = np_adam(*args, count, lr, m_map, v_map, **HYPER)
  names = ("update", "m_codes", "m_absmax", "v_codes", "v_absmax")
  for name, a, b in zip(names, got, want):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)
  zero = n_blocks // 2
  assert float(got[2][zero]) == 0.0 and float(got[4][zero]) == 0.0  # a zero block stays zero: no NaN, update 0
  assert np.all(np.asarray(got[0][zero]) == 0.0)
  if implementation != "reference":
    reference = run(*map(jnp.asarray, args), implementation="reference")
    for name, a, b in zip(names, got, reference):
      np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8), err_msg=name)


def test_naive_4bit_update_matches_numpy():
  m_map, v_map = MAP_PAIRS["4bit_naive"]
  args = random_state(40, 32, m_map, v_map, seed=3)
  got = blockwise_adam_update(*map(jnp.asarray, args), count=jnp.int32(7), learning_rate=jnp.float32(1e-3), **HYPER,
                              m_map=m_map, v_map=v_map, implementation="reference")
  for a, b in zip(got, np_adam(*args, 7, F32(1e-3), m_map, v_map, **HYPER)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_update_without_weight_decay_is_adam():
  m_map, v_map = MAP_PAIRS["4bit"]
  args = random_state(8, 64, m_map, v_map, seed=1)  # one tile
  hyper = dict(HYPER, weight_decay=0.0)
  got = blockwise_adam_update(*map(jnp.asarray, args), count=jnp.int32(1), learning_rate=jnp.float32(0.01), **hyper,
                              m_map=m_map, v_map=v_map, implementation="interpret_tpu")
  want = np_adam(*args, 1, F32(0.01), m_map, v_map, **hyper)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), b)


# ---- the maps --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_dynamic_8bit_maps_equal_bitsandbytes(signed):
  expected = np_dynamic_map(signed, 7, 8)
  got = MAPS["dynamic_signed_8" if signed else "dynamic_unsigned_8"]
  assert got.dtype == np.float32 and got.shape == (256,)
  np.testing.assert_array_equal(got, expected)
  assert got[-1] == 1.0 and 0.0 in got and np.all(np.diff(got) > 0)
  if signed:  # 127 negative values, zero, 127 positive values below 1, and 1.0 (no -1)
    assert np.sum(got < 0) == 127 and got[0] == F32(-0.99296874)
  else:       # the smallest positive value: 10**-6 * (0.1 + 0.55) / 2
    assert got[0] == 0.0 and abs(got[1] / 3.25e-7 - 1) < 1e-6


def test_li_et_al_4bit_maps():
  np.testing.assert_array_equal(MAPS["de_signed_4"], np_dynamic_map(True, 3, 4))
  np.testing.assert_allclose(MAPS["de_signed_4"][8:], [0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875, 1.0],
                             rtol=1e-6)  # the published DE map's positive half
  np.testing.assert_array_equal(MAPS["linear_unsigned_4_nozero"], np.arange(1, 17, dtype=F32) / F32(16))
  np.testing.assert_array_equal(MAPS["linear_unsigned_4"], (np.arange(16) / 15).astype(F32))
  assert MAPS["linear_unsigned_4"][0] == 0.0 and MAPS["linear_unsigned_4_nozero"][0] > 0.0
  np.testing.assert_array_equal(MAPS["linear_signed_4"][:15], (np.arange(-7, 8) / 7).astype(F32))


@pytest.mark.parametrize("map_name", sorted(MAPS))
def test_kernel_lookups_equal_the_tables(map_name):
  """The kernels' select-tree decode equals the table on EVERY code; the binary-search encode equals NumPy's
  nearest code on every map value, every exact midpoint (a tie: the lower code), both float32 neighbours of every
  midpoint, and random values."""
  codes = jnp.arange(len(MAPS[map_name]), dtype=jnp.int32).reshape(-1, 16 if len(MAPS[map_name]) == 256 else 4)
  np.testing.assert_array_equal(np.asarray(tpu.decode(codes, map_name)).ravel(), MAPS[map_name])
  values = MAPS[map_name].astype(np.float64)
  midpoints = ((values[:-1] + values[1:]) / 2).astype(F32)
  exact = midpoints[midpoints.astype(np.float64) == (values[:-1] + values[1:]) / 2]
  lo = -1.0 if values[0] < 0 else 0.0
  # probes on both sides of every rounding boundary (the largest float32 at or below each real midpoint and the next)
  below = (values[:-1] + values[1:]) / 2
  below = np.where(below.astype(F32) > below, np.nextafter(below.astype(F32), F32(-2)), below.astype(F32)).astype(F32)
  above = np.nextafter(below, F32(2))
  x = np.concatenate([MAPS[map_name], exact, below, above, np.random.default_rng(0).uniform(lo, 1.0, 4096).astype(F32)])
  x = np.pad(x, (0, (-x.size) % 128)).astype(F32).reshape(-1, 128)
  want = np.argmin(np.abs(x.astype(np.float64)[..., None] - values), axis=-1)
  if map_name == "dynamic_unsigned_8":
    want = np.where((x > 0) & (want == 0), 1, want)
  np.testing.assert_array_equal(np.asarray(tpu.encode(jnp.asarray(x), map_name)), want)


# ---- block-wise quantization -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("map_name", ["dynamic_signed_8", "dynamic_unsigned_8", "de_signed_4", "linear_unsigned_4"])
def test_quantize_blocks_equals_numpy_blockwise_quantization(map_name):
  rng = np.random.default_rng(2)
  x = rng.standard_t(3, size=(6, 256)).astype(F32) * F32(0.01)
  if not maps.SIGNED[map_name]:
    x = np.abs(x) ** 2
  codes, absmax = quantize_blocks(jnp.asarray(x), map_name=map_name)
  want_codes, want_absmax = np_quantize(x, map_name)
  np.testing.assert_array_equal(np.asarray(absmax), want_absmax)
  np.testing.assert_array_equal(np.asarray(codes), want_codes)
  back = np.asarray(dequantize_blocks(codes, absmax, map_name))
  bits = 4 if len(MAPS[map_name]) == 16 else 8
  np.testing.assert_array_equal(back, MAPS[map_name][np_unpack(want_codes, bits)] * want_absmax[:, None])


def test_nibble_layout():
  codes = np.arange(16).reshape(1, 16).astype(F32) / F32(15)  # element i takes code i of the linear map
  packed, _ = quantize_blocks(jnp.asarray(codes), map_name="linear_unsigned_4")
  assert np.asarray(packed).tolist() == [[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]


def test_unsigned_8bit_never_rounds_a_positive_v_to_zero():
  tiny = np.zeros((1, 256), F32)
  tiny[0, 0], tiny[0, 1:] = 1.0, 1e-9  # normalized 1e-9 is far below half the smallest code (3.25e-7)
  codes, absmax = quantize_blocks(jnp.asarray(tiny), map_name="dynamic_unsigned_8")
  assert np.all(np.asarray(codes)[0, 1:] == 1)
  smallest = np.asarray(dequantize_blocks(codes, absmax, "dynamic_unsigned_8"))[0, 1:]
  assert np.all(smallest == MAPS["dynamic_unsigned_8"][1]) and abs(smallest[0] / 3.25e-7 - 1) < 1e-6
  naive = np.argmin(np.abs(tiny[0, 1:, None].astype(np.float64) - MAPS["dynamic_unsigned_8"]), axis=-1)
  assert np.all(naive == 0)  # plain nearest rounding would store v = 0 ...
  codes4, absmax4 = quantize_blocks(jnp.asarray(tiny), map_name="linear_unsigned_4")
  assert np.all(np.asarray(dequantize_blocks(codes4, absmax4, "linear_unsigned_4"))[0, 1:] == 0.0)  # ... as naive 4-bit


@pytest.mark.parametrize("map_name", sorted(MAPS))
def test_zero_blocks_dequantize_to_exact_zero(map_name):
  codes, absmax = quantize_blocks(jnp.zeros((3, 32), jnp.float32), map_name=map_name)
  assert np.all(np.asarray(absmax) == 0.0)
  assert np.all(np_unpack(codes, maps.BITS[map_name]) == maps.ZERO_CODE[map_name])
  back = np.asarray(dequantize_blocks(codes, absmax, map_name))
  assert not np.any(np.isnan(back)) and np.all(back == 0.0)


# ---- cost model --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pair, block", [("8bit", 256), ("4bit", 128)])
def test_cost_traffic_is_within_1_1x_of_one_pass(pair, block):
  m_map, v_map = MAP_PAIRS[pair]
  n_blocks = 576 * 1536 // block
  modelled = cost((n_blocks, block), m_map=m_map, v_map=v_map)
  elements = n_blocks * block
  code_bytes = 2 * elements if pair == "8bit" else elements  # two moments, 1 or 1/2 byte per element
  assert modelled["ideal_bytes"] == 12 * elements + 2 * code_bytes + 16 * n_blocks
  assert modelled["hbm_bytes"] <= 1.1 * modelled["ideal_bytes"]
  assert modelled["flops"] > 0


# ---- bad input -----------------------------------------------------------------------------------------------------

def _good(**changes):
  m_map, v_map = MAP_PAIRS["8bit"]
  grad, param, m_codes, m_absmax, v_codes, v_absmax = map(jnp.asarray, random_state(4, 32, m_map, v_map))
  kwargs = dict(grad=grad, param=param, m_codes=m_codes, m_absmax=m_absmax, v_codes=v_codes, v_absmax=v_absmax,
                count=jnp.int32(1), learning_rate=jnp.float32(1e-3), m_map=m_map, v_map=v_map, **HYPER,
                implementation="reference")
  kwargs.update(changes)
  return kwargs


@pytest.mark.parametrize("changes, message", [
    (dict(grad=jnp.zeros((4, 32), jnp.bfloat16)), r"grad: dtype bfloat16 must be float32"),
    (dict(grad=jnp.zeros((4, 24), jnp.float32)), r"block size B = grad.shape\[1\] = 24 must be a power of two"),
    (dict(param=jnp.zeros((4, 16), jnp.float32)), r"param must have grad's shape"),
    (dict(m_codes=jnp.zeros((4, 32), jnp.int8)), r"m_codes must be uint8 \(4, 32\)"),
    (dict(v_codes=jnp.zeros((4, 16), jnp.uint8)), r"v_codes must be uint8 \(4, 32\) for the 8-bit map"),
    (dict(m_map="de_signed_4"), r"m_codes must be uint8 \(4, 16\) for the 4-bit map"),
    (dict(v_absmax=jnp.zeros((4, 1), jnp.float32)), r"v_absmax must be float32 \(4,\)"),
    (dict(m_map="dynamic_8"), r"map name 'dynamic_8' is unknown"),
    (dict(b1=1.0), r"b1=1.0 must be a Python float in \[0, 1\)"),
    (dict(count=jnp.float32(1)), r"count must be an integer scalar"),
    (dict(implementation="xla"), r"unknown implementation='xla'"),
])
def test_bad_input_is_refused(changes, message):
  with pytest.raises(ValueError, match=message):
    blockwise_adam_update(**_good(**changes))


def test_bad_quantize_input_is_refused():
  with pytest.raises(ValueError, match=r"map name 'nf4' is unknown"):
    quantize_blocks(jnp.zeros((2, 32), jnp.float32), map_name="nf4")
  with pytest.raises(ValueError, match=r"x: the block size B = x.shape\[1\] = 48 must be a power of two"):
    quantize_blocks(jnp.zeros((2, 48), jnp.float32), map_name="dynamic_signed_8")
  with pytest.raises(ValueError, match=r"x must be a non-empty float32"):
    quantize_blocks(jnp.zeros((2, 32), jnp.int32), map_name="dynamic_signed_8")
  with pytest.raises(ValueError, match=r"absmax must be float32 of shape \(2,\)"):
    quantize_blocks(jnp.zeros((2, 32), jnp.float32), jnp.ones((3,), jnp.float32), "dynamic_signed_8")
  with pytest.raises(ValueError, match=r"codes must be a non-empty uint8"):
    dequantize_blocks(jnp.zeros((2, 32), jnp.int32), jnp.ones((2,), jnp.float32), "dynamic_signed_8")
