"""efficient.quant formats: exact packing, RTN error bounds, SQNR thresholds (torchao style), honest bytes/param,
the QLoRA NF4 levels, OCP MX power-of-two scales, and bad input."""
import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient import quant
from pallas_kernels import packing

# QLoRA's NormalFloat4 levels as printed by bitsandbytes (functional.create_normal_map, index = code),
# written here independently of the library's table.
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def _gaussian(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _sqnr(x, fmt, **kwargs):
  return float(quant.sqnr_db(x, quant.dequantize(quant.quantize(x, fmt, **kwargs))))


# --- packing --------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=1)
def _pack_round_trip(codes, bits):
  packed = packing.pack(codes, bits)
  return packed, packing.unpack(packed, bits)


# Few distinct shapes (each compiles once); hypothesis varies the codes, including all-zero and all-max words.
@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(bits=st.sampled_from([2, 3, 4, 8]), words=st.sampled_from([1, 3]), cols=st.sampled_from([1, 5]),
                  fill=st.sampled_from(["random", "zeros", "max"]), seed=st.integers(0, 2 ** 31 - 1))
def test_pack_unpack_round_trip_is_exact(bits, words, cols, fill, seed):
  k = words * packing.values_per_word(bits)
  codes = np.random.default_rng(seed).integers(0, 2 ** bits, (k, cols), dtype=np.uint8)
  codes = {"random": codes, "zeros": np.zeros_like(codes), "max": np.full_like(codes, 2 ** bits - 1)}[fill]
  packed, unpacked = _pack_round_trip(jnp.asarray(codes), bits)
  assert packed.dtype == jnp.uint8 and packed.shape == (k * bits // 8, cols)
  np.testing.assert_array_equal(np.asarray(unpacked), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packing_along_any_axis_is_the_axis_0_layout_moved(bits):
  # A KV cache packs along a group's tokens or head_dim: the same planar layout along that axis.
  k = 2 * packing.values_per_word(bits)
  codes = np.random.default_rng(bits).integers(0, 2 ** bits, (3, k, 5), dtype=np.uint8)
  along_1 = packing.pack(jnp.asarray(codes), bits, axis=1)
  along_0 = packing.pack(jnp.asarray(np.moveaxis(codes, 1, 0)), bits)
  np.testing.assert_array_equal(np.asarray(along_1), np.moveaxis(np.asarray(along_0), 0, 1))
  np.testing.assert_array_equal(np.asarray(packing.unpack(along_1, bits, axis=-2)), codes)
  with pytest.raises(ValueError, match=r"^codes\.shape\[2\]=5 must be a multiple of"):
    packing.pack(jnp.asarray(codes), bits, axis=2)


def test_int4_layout_is_planar():
  # Row i's nibble is low, row i + K/2's is high: the documented layout the kernels unpack.
  codes = jnp.arange(8, dtype=jnp.uint8).reshape(8, 1)
  np.testing.assert_array_equal(np.asarray(packing.pack(codes, 4))[:, 0], [0 | 4 << 4, 1 | 5 << 4, 2 | 6 << 4,
                                                                            3 | 7 << 4])


@pytest.mark.parametrize("fmt, bits", [("int4", 4), ("int3", 3), ("int2", 2), ("nf4", 4), ("mxfp4", 4)])
def test_sub_byte_storage_is_really_packed(fmt, bits):
  x = _gaussian((256, 96))
  q = quant.quantize(x, fmt, group_size=None if fmt.startswith(("nf", "mx")) else 64)
  assert q.qvalue.dtype == jnp.uint8 and q.qvalue.nbytes == x.size * bits // 8


# --- round-trip error -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["int8", "int4", "int3", "int2"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [None, 32], ids=["channel", "g32"])
def test_rtn_error_is_at_most_half_a_step(fmt, symmetric, group_size):
  x = _gaussian((128, 40), seed=1) * jnp.linspace(0.1, 3.0, 40)  # columns of different ranges
  q = quant.quantize(x, fmt, group_size=group_size, symmetric=symmetric)
  step = np.repeat(np.asarray(q.scale, np.float64), q.group_size, axis=0)  # one scale per group, per column
  error = np.abs(np.asarray(quant.dequantize(q), np.float64) - np.asarray(x, np.float64))
  assert np.all(error <= step / 2 * (1 + 1e-5) + 1e-7), float(np.max(error / step))


def test_int8_asymmetric_is_exact_on_its_grid_and_zero_is_exact():
  x = jnp.asarray([[0.0, -1.0], [1.0, 0.5], [3.0, 2.0], [0.0, 4.0]], jnp.float32)
  q = quant.quantize(x, "int8", symmetric=False)
  assert q.qvalue.dtype == jnp.uint8 and q.zero_point.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q))[[0, 3], 0], [0.0, 0.0])


# --- SQNR thresholds (Gaussian weights, torchao's 20 log10(|x| / |x - y|)) ----------------------------------------

def test_sqnr_thresholds():
  x = _gaussian((512, 384), seed=2)
  assert _sqnr(x, "int8") >= 40.0
  assert _sqnr(x, "int4", group_size=128) >= 18.0
  assert _sqnr(x, "fp8_e4m3") >= 28.0 and _sqnr(x, "fp8_e5m2") >= 22.0
  assert _sqnr(x, "mxfp8") >= 28.0 and _sqnr(x, "mxfp4") >= 15.0
  assert _sqnr(x, "int3", group_size=64) >= 10.0
  # NF4 (block 64, double-quantized) beats int4 absmax at the same block: levels follow the Gaussian.
  assert _sqnr(x, "nf4") > _sqnr(x, "int4", group_size=64) + 0.5
  # Finer granularity never hurts; more bits never hurt.
  assert _sqnr(x, "int4", group_size=32) > _sqnr(x, "int4", group_size=128) > _sqnr(x, "int4")
  assert _sqnr(x, "int8", granularity="tensor") <= _sqnr(x, "int8") + 0.1


def test_sqnr_db_matches_definition():
  x, y = jnp.asarray([3.0, 4.0]), jnp.asarray([3.0, 4.5])
  assert math.isclose(float(quant.sqnr_db(x, y)), 20 * math.log10(5.0 / 0.5), rel_tol=1e-6)


# --- bytes per parameter -----------------------------------------------------------------------------------------

def test_bytes_per_param_targets():
  up, down = _gaussian((576, 1536), seed=3), _gaussian((1536, 576), seed=4)  # SmolLM2 MLP, Flax [in, out]
  int8 = quant.quantize(up, "int8")
  assert quant.nbytes(int8) == 576 * 1536 + 1536 * 4  # int8 codes + one f32 scale per output channel
  assert quant.bytes_per_param(int8) <= 1.02
  # g128 needs K % 128 == 0: the down projection (K = 1536); bf16 group scales.
  int4 = quant.quantize(down, "int4", group_size=128)
  assert quant.nbytes(int4) == 1536 * 576 // 2 + 12 * 576 * 2
  assert quant.bytes_per_param(int4) <= 0.52
  nf4 = quant.quantize(up, "nf4")  # QLoRA: 4 + 8/64 + 32/(64*256) bits per parameter
  expected = 576 * 1536 // 2 + 9 * 1536 + 9 * 6 * 4 + 4
  assert quant.nbytes(nf4) == expected and quant.bytes_per_param(nf4) <= 0.52
  assert quant.bytes_per_param(quant.quantize(up, "nf4", double_quant=False)) == 0.5 + 4 / 64
  assert quant.bytes_per_param(quant.quantize(up, "mxfp4")) == 0.5 + 1 / 32


# --- NF4, fp8, MX ---------------------------------------------------------------------------------------------------

def test_nf4_levels_are_qlora_exactly():
  assert list(packing.NF4_LEVELS) == QLORA_NF4
  # Every level survives a round trip unchanged (a block whose absmax is 1, no double quantization).
  column = jnp.asarray(QLORA_NF4 * 4, jnp.float32).reshape(64, 1)
  q = quant.quantize(column, "nf4", double_quant=False)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), np.asarray(column))
  np.testing.assert_array_equal(np.asarray(packing.unpack(q.qvalue, 4))[:16, 0], np.arange(16))


def test_nf4_double_quantization_recovers_absmax():
  x = _gaussian((256, 512), seed=5)
  q = quant.quantize(x, "nf4")
  assert q.scale.dtype == jnp.int8 and q.scale_scale.shape == (4, 2) and q.scale_offset.shape == ()
  absmax = np.abs(np.asarray(x)).reshape(4, 64, 512).max(axis=1)
  recovered = np.asarray(q.scale, np.float32) * np.repeat(np.asarray(q.scale_scale), 256, axis=1) \
      + np.asarray(q.scale_offset)
  spread = np.abs(absmax - absmax.mean()).max()
  assert np.abs(recovered - absmax).max() <= spread / 127 / 2 * 1.001
  assert _sqnr(x, "nf4") > _sqnr(x, "nf4", double_quant=False) - 0.1


@pytest.mark.parametrize("fmt, dtype", [("fp8_e4m3", jnp.float8_e4m3fn), ("fp8_e5m2", jnp.float8_e5m2)])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fp8_stores_float8_with_f32_scales(fmt, dtype, granularity):
  x = _gaussian((64, 48), seed=6) * 100.0
  q = quant.quantize(x, fmt, granularity=granularity)
  assert q.qvalue.dtype == dtype and q.scale.dtype == jnp.float32
  assert q.scale.shape == ((1, 1) if granularity == "tensor" else (1, 48))
  y = np.asarray(quant.dequantize(q))
  assert np.all(np.isfinite(y))
  # The largest magnitude maps to the format's max and back (up to f32 rounding of the scale).
  np.testing.assert_allclose(np.abs(y).max(), np.abs(np.asarray(x)).max(), rtol=1e-6)


@pytest.mark.parametrize("fmt, emax, element_max", [("mxfp8", 8, 448.0), ("mxfp4", 2, 6.0)])
def test_mx_scales_are_shared_powers_of_two(fmt, emax, element_max):
  x = _gaussian((128, 24), seed=7) * jnp.logspace(-3, 3, 24)
  q = quant.quantize(x, fmt)
  assert q.scale.dtype == jnp.uint8 and q.scale.shape == (4, 24) and q.group_size == 32
  exponent = np.asarray(q.scale, np.float64) - 127  # E8M0
  scale = 2.0 ** exponent
  absmax = np.abs(np.asarray(x, np.float64)).reshape(4, 32, 24).max(axis=1)
  # OCP MX: X = 2^(floor(log2(absmax)) - emax_elem), so absmax / X lies in [2^emax, 2^(emax+1)).
  ratio = absmax / scale
  assert np.all((ratio >= 2.0 ** emax) & (ratio < 2.0 ** (emax + 1)))
  elements = np.asarray(quant.dequantize(q), np.float64).reshape(4, 32, 24) / scale[:, None, :]
  assert np.all(np.abs(elements) <= element_max)


def test_mxfp4_rounds_to_e2m1_levels_ties_to_even():
  # One block with absmax 6 (scale 1): 0.25 -> 0 (even), 0.75 -> 1.0 (even), 2.5 -> 2, 5 -> 4, 1.75 -> 2.
  values = [6.0, 0.25, 0.75, 2.5, 5.0, 1.75, -0.75, -3.0] + [0.0] * 24
  q = quant.quantize(jnp.asarray(values).reshape(32, 1), "mxfp4")
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q))[:8, 0], [6, 0, 1, 2, 4, 2, -1, -3])


# --- QArray as a pytree ---------------------------------------------------------------------------------------------

def test_qarray_is_a_pytree_that_jits_and_keeps_shape_dtype_and_axes():
  x = _gaussian((3, 64, 5), seed=8, dtype=jnp.bfloat16)
  q = quant.quantize(x, "int4", axis=1, group_size=32, symmetric=False, logical_axes=("heads", "embed", "mlp"))
  # N-d storage: codes keep x's shape, packed along axis 1; scales [3, 2 groups, 5] broadcast by tiles.
  assert q.qvalue.shape == (3, 32, 5) and q.scale.shape == (3, 2, 5) and q.zero_point.shape == (3, 2, 5)
  leaves, treedef = jax.tree_util.tree_flatten(q)
  assert len(leaves) == 3  # qvalue, scale, zero_point: the None fields are no leaves
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  y = jax.jit(quant.dequantize)(rebuilt)
  assert y.shape == x.shape and y.dtype == jnp.bfloat16 and rebuilt.logical_axes == ("heads", "embed", "mlp")
  assert _sqnr(x, "int4", axis=1, group_size=32, symmetric=False) > 18.0


@pytest.mark.parametrize("fmt, kwargs", [("int8", dict(granularity="tensor")), ("int4", dict(group_size=32)),
                                         ("int4", dict(group_size=32, symmetric=False)), ("nf4", {})])
def test_matmul_runs_the_weight_only_kernel_on_a_qarray(fmt, kwargs):
  x, w = _gaussian((4, 128), seed=9), _gaussian((128, 64), seed=10)
  q = quant.quantize(w, fmt, **kwargs)
  expected = jnp.matmul(x, quant.dequantize(q), precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(np.asarray(quant.matmul(x, q, implementation="reference")), np.asarray(expected),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"^q must be a 2-D \[K, N\] weight quantized along axis 0"):
    quant.matmul(x, quant.quantize(w, "mxfp4"))
  with pytest.raises(ValueError, match=r"^x: dtype float16 is not supported"):  # activations must be f32/bf16
    quant.matmul(x.astype(jnp.float16), q)


# --- bad input --------------------------------------------------------------------------------------------------

BAD_INPUTS = {  # name -> (x shape, fmt, keyword arguments, regex naming the argument)
    "unknown_format": ((64, 8), "int5", {}, r"^fmt='int5' is not a quantization format"),
    "group_not_dividing_k": ((576, 8), "int4", dict(group_size=128), r"^group_size=128 must divide .* = 576"),
    "odd_k_int4": ((63, 8), "int4", {}, r"^x\.shape\[0\]=63 must be a multiple of 2"),
    "k_int3": ((60, 8), "int3", dict(group_size=20), r"^x\.shape\[0\]=60 must be a multiple of 8"),
    "group_size_zero": ((64, 8), "int8", dict(group_size=0), r"^group_size=0 must be a positive int"),
    "asymmetric_nf4": ((64, 8), "nf4", dict(symmetric=False), r"^symmetric=False is not supported by fmt='nf4'"),
    "asymmetric_fp8": ((64, 8), "fp8_e4m3", dict(symmetric=False), r"^symmetric=False is not supported"),
    "mx_group_64": ((64, 8), "mxfp4", dict(group_size=64), r"^fmt='mxfp4' uses blocks of 32"),
    "nf4_per_channel": ((64, 8), "nf4", dict(granularity="channel"), r"^fmt='nf4' is block-wise"),
    "granularity_name": ((64, 8), "int8", dict(granularity="row"), r"^granularity='row' must be one of"),
    "group_size_with_channel": ((64, 8), "int8", dict(group_size=32, granularity="channel"),
                                r"^group_size=32 is only meaningful"),
    "axis_out_of_range": ((64, 8), "int8", dict(axis=2), r"^axis=2 is out of range"),
    "logical_axes_length": ((64, 8), "int8", dict(logical_axes=("embed",)), r"^logical_axes=.* must name all 2"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_quantize_rejects_bad_input(bad):
  shape, fmt, kwargs, message = BAD_INPUTS[bad]
  with pytest.raises(ValueError, match=message):
    quant.quantize(jnp.ones(shape), fmt, **kwargs)


def test_quantize_rejects_integer_input_and_bad_bits():
  with pytest.raises(ValueError, match=r"^x: dtype int32 is not a float dtype"):
    quant.quantize(jnp.ones((64, 8), jnp.int32), "int8")
  with pytest.raises(ValueError, match=r"^bits=5 is not a packed width"):
    packing.pack(jnp.zeros((8, 1), jnp.uint8), 5)
