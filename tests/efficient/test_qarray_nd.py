"""N-d QArrays (efficient.quant.qarray) against an independent NumPy re-derivation: codes in the array's own shape
(packed along the contraction axis), scales broadcast by tiles; a 3-D [embed, heads, head_dim] kernel per channel
and per group, a KV-style per-token array, several contraction axes, NF4 double quantization on N-d scales, fp8
and MX on a non-leading axis; the reshape to the 2-D kernel layout is free; zeros(); logical names; orbax; bad
input."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from efficient import quant
from efficient.quant import kv_cache, qarray

EMBED, HEADS, HEAD_DIM = 64, 3, 8


def _x(shape, seed=0, shift=0.0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) * np.linspace(0.2, 3.0, shape[-1]) + shift).astype(np.float32)


def np_tiles(x, tiles):
  """x split so that every tile is an axis pair (n, t): returns the split view and its tile axes."""
  split = []
  for d, t in zip(x.shape, tiles):
    split += [d // t, t]
  return x.reshape(split), tuple(range(1, 2 * x.ndim, 2))


def np_rtn(x, tiles, bits, symmetric, scale=None):
  """Independent RTN -> (integer codes, scale, zero point or None), scales of shape x.shape / tiles. The codes
  and zero points are derived from `scale` when given (the stored one: XLA may compute absmax / qmax as
  absmax * (1 / qmax), an ulp away from NumPy's quotient, so the statistics are compared to within 2 ulp and
  the rounding exactly)."""
  view, axes = np_tiles(x, tiles)
  full = lambda a: np.kron(a, np.ones(tiles, np.float32))
  if symmetric:
    qmax = 2 ** (bits - 1) - 1
    reference = (np.abs(view).max(axis=axes) / np.float32(qmax)).astype(np.float32)
    reference = np.where(reference > 0, reference, np.float32(1))
    scale = reference if scale is None else scale
    return np.clip(np.round(x / full(scale)), -qmax, qmax), reference, None
  levels = 2 ** bits - 1
  low = np.minimum(view.min(axis=axes), 0).astype(np.float32)
  high = np.maximum(view.max(axis=axes), 0).astype(np.float32)
  reference = ((high - low) / np.float32(levels)).astype(np.float32)
  reference = np.where(reference > 0, reference, np.float32(1))
  scale = reference if scale is None else scale
  zero = np.clip(np.round(-low / scale), 0, levels)
  return np.clip(np.round(x / full(scale)) + full(zero), 0, levels), reference, zero


def check_scale(stored, reference):
  """The stored scale is NumPy's statistic to within 2 ulp (f32)."""
  np.testing.assert_allclose(np.asarray(stored, np.float32), reference, rtol=2.5e-7, atol=0)


def np_unpack_int4(packed, axis):
  """Planar nibbles along `axis`: the low nibbles are the first half of the axis, the high ones the second."""
  packed = np.asarray(packed)
  return np.concatenate([packed & 15, packed >> 4], axis=axis)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_3d_kernel_per_channel_over_embed(symmetric):
  x = _x((EMBED, HEADS, HEAD_DIM), shift=0.0 if symmetric else 0.4)
  q = quant.quantize(x, "int4", axis=0, symmetric=symmetric)
  assert q.qvalue.shape == (EMBED // 2, HEADS, HEAD_DIM) and q.qvalue.dtype == jnp.uint8
  assert q.scale.shape == (1, HEADS, HEAD_DIM) and q.tile_shape == (EMBED, 1, 1)
  scale = np.asarray(q.scale)
  codes, reference, zero = np_rtn(x, (EMBED, 1, 1), 4, symmetric, scale)
  check_scale(scale, reference)
  stored = np_unpack_int4(q.qvalue, 0).astype(np.float32)
  np.testing.assert_array_equal(stored - (8 if symmetric else 0), codes)  # offset-binary when symmetric
  if not symmetric:
    np.testing.assert_array_equal(np.asarray(q.zero_point), zero)
  expected = (codes if symmetric else codes - zero) * scale
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), expected)


def test_the_2d_kernel_layout_is_a_free_reshape_of_the_3d_codes():
  """[embed, heads, head_dim] along axis 0 reshaped to [embed, heads*head_dim] *is* the 2-D weight's storage, so
  `quant_matmul` reads a 3-D kernel's QArray through a reshape (no transpose, no copy)."""
  x = _x((EMBED, HEADS, HEAD_DIM), seed=1)
  q3 = quant.quantize(x, "int4", axis=0, group_size=16, symmetric=False)
  q2 = quant.quantize(x.reshape(EMBED, -1), "int4", axis=0, group_size=16, symmetric=False)
  for field in ("qvalue", "scale", "zero_point"):
    np.testing.assert_array_equal(np.asarray(getattr(q3, field)).reshape(getattr(q2, field).shape),
                                  getattr(q2, field))
  reshaped = q2.replace(qvalue=q3.qvalue.reshape(EMBED // 2, -1), scale=q3.scale.reshape(EMBED // 16, -1),
                        zero_point=q3.zero_point.reshape(EMBED // 16, -1))
  inputs = _x((5, EMBED), seed=2)
  expected = inputs.astype(np.float64) @ np.asarray(quant.dequantize(q3), np.float64).reshape(EMBED, -1)
  np.testing.assert_allclose(quant.matmul(inputs, reshaped, implementation="reference"), expected, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("shape, axis, group", [((EMBED, HEADS, HEAD_DIM), 0, 16), ((4, 64, 6), 1, 32)])
def test_group_wise_against_numpy(shape, axis, group):
  x = _x(shape, seed=3, shift=-0.3)
  q = quant.quantize(x, "int4", axis=axis, group_size=group, symmetric=False, scale_dtype=jnp.float32)
  tiles = tuple(group if i == axis else 1 for i in range(len(shape)))
  scale = np.asarray(q.scale)
  codes, reference, zero = np_rtn(x, tiles, 4, False, scale)
  assert scale.shape == reference.shape and q.tile_shape == tiles and q.num_groups == shape[axis] // group
  check_scale(scale, reference)
  np.testing.assert_array_equal(np.asarray(q.zero_point), zero)
  np.testing.assert_array_equal(np_unpack_int4(q.qvalue, axis), codes)
  full = lambda a: np.kron(a, np.ones(tiles, np.float32))
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), (codes - full(zero)) * full(scale))
  # Default per-group scales are bf16, rounded up: never below the f32 step, and RTN stays within half a step.
  bf16 = quant.quantize(x, "int4", axis=axis, group_size=group, symmetric=False)
  step = np.asarray(bf16.scale, np.float32)
  assert bf16.scale.dtype == jnp.bfloat16 and np.all(step >= reference * (1 - 2.5e-7))
  assert np.all(np.abs(np.asarray(quant.dequantize(bf16)) - x) <= full(step) / 2 * (1 + 1e-6) + 1e-7)


@pytest.mark.parametrize("fmt, bits", [("int8", 8), ("int4", 4)])
def test_kv_style_per_token_over_head_dim(fmt, bits):
  x = _x((2, 5, HEADS, 16), seed=4, shift=0.5)
  q = quant.quantize(x, fmt, axis=3, symmetric=False, scale_dtype=jnp.float32)
  assert q.qvalue.shape == (2, 5, HEADS, 16 * bits // 8) and q.scale.shape == q.zero_point.shape == (2, 5, HEADS, 1)
  scale = np.asarray(q.scale)
  codes, reference, zero = np_rtn(x, (1, 1, 1, 16), bits, False, scale)
  check_scale(scale, reference)
  stored = np.asarray(q.qvalue) if bits == 8 else np_unpack_int4(q.qvalue, 3)
  np.testing.assert_array_equal(stored, codes)
  np.testing.assert_array_equal(np.asarray(q.zero_point), zero)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), (codes - zero) * scale)


def test_several_contraction_axes_pack_like_the_flattened_matrix():
  """An output projection [heads, head_dim, embed] contracting (heads, head_dim): one scale per embed column;
  planar packing along heads equals packing the flattened [heads*head_dim, embed] matrix."""
  x = _x((4, HEAD_DIM, 12), seed=5)
  q = quant.quantize(x, "int4", axis=(0, 1))
  assert q.axis == (0, 1) and q.pack_axis == 0 and q.contraction_size == 4 * HEAD_DIM
  assert q.qvalue.shape == (2, HEAD_DIM, 12) and q.scale.shape == (1, 1, 12) and q.group_size == 4 * HEAD_DIM
  scale = np.asarray(q.scale)
  codes, reference, _ = np_rtn(x, (4, HEAD_DIM, 1), 4, True, scale)
  check_scale(scale, reference)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), codes * scale)
  flat = quant.quantize(x.reshape(-1, 12), "int4")
  np.testing.assert_array_equal(np.asarray(q.qvalue).reshape(-1, 12), flat.qvalue)
  tensor = quant.quantize(x, "int8", axis=(1, 0), granularity="tensor")
  assert tensor.axis == (0, 1) and tensor.scale.shape == (1, 1, 1)
  check_scale(np.asarray(tensor.scale).reshape(()), np.float32(np.abs(x).max() / np.float32(127)))


def test_nf4_double_quantization_blocks_run_along_the_last_non_contraction_axis():
  x = _x((128, 3, 300), seed=6)
  q = quant.quantize(x, "nf4", axis=0)
  assert q.qvalue.shape == (64, 3, 300) and q.scale.shape == (2, 3, 300) and q.scale.dtype == jnp.int8
  assert q.scale_scale.shape == (2, 3, 2) and q.scale_offset.shape == ()  # ceil(300 / 256) blocks per (group, head)
  absmax = np.abs(x).reshape(2, 64, 3, 300).max(axis=1)
  centred = absmax - absmax.mean()
  padded = np.pad(centred, ((0, 0), (0, 0), (0, 512 - 300)))
  block_scale = np.abs(padded).reshape(2, 3, 2, 256).max(axis=-1) / 127
  np.testing.assert_allclose(np.asarray(q.scale_scale), block_scale, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q.scale_offset), absmax.mean(), rtol=1e-6)
  per_constant = np.repeat(block_scale, 256, axis=-1)[..., :300]
  recovered = np.asarray(q.scale, np.float32) * per_constant + absmax.mean()
  assert np.all(np.abs(recovered - absmax) <= per_constant / 2 * 1.001 + 1e-6)
  assert float(quant.sqnr_db(x, quant.dequantize(q))) > 19.0


def test_fp8_and_mx_along_a_non_leading_axis():
  x = _x((4, 6, 64), seed=7)
  fp8 = quant.quantize(x, "fp8_e4m3", axis=2)
  assert fp8.qvalue.shape == x.shape and fp8.scale.shape == (4, 6, 1)
  scale = np.asarray(fp8.scale)
  check_scale(scale, (np.abs(x).max(axis=2, keepdims=True) / np.float32(448)).astype(np.float32))
  elements = np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(fp8)), elements * scale)
  mx = quant.quantize(np.moveaxis(x, 2, 1), "mxfp4", axis=1)  # [4, 64, 6]: blocks of 32 along axis 1
  assert mx.qvalue.shape == (4, 32, 6) and mx.scale.shape == (4, 2, 6) and mx.tile_shape == (1, 32, 1)
  absmax = np.abs(np.moveaxis(x, 2, 1)).reshape(4, 2, 32, 6).max(axis=2)
  np.testing.assert_array_equal(np.asarray(mx.scale, np.int32) - 127, np.floor(np.log2(absmax)) - 2)


def test_zeros_is_quantizes_layout():
  kwargs = dict(axis=2, symmetric=False, scale_dtype=jnp.float32, logical_axes=("batch", "length", None,
                                                                                  "kv_heads", "head_dim"))
  shape = (2, 3, 8, 2, 4)
  empty = qarray.zeros(shape, "int4", **kwargs)
  real = quant.quantize(jnp.ones(shape), "int4", **kwargs)
  assert jax.tree.structure(empty) == jax.tree.structure(real)
  for a, b in zip(jax.tree.leaves(empty), jax.tree.leaves(real), strict=True):
    assert (a.shape, a.dtype) == (b.shape, b.dtype) and not np.any(np.asarray(a))


def test_array_logical_axes():
  names = ("embed", "heads", "head_dim")
  x = _x((EMBED, HEADS, HEAD_DIM), seed=8)
  grouped = quant.quantize(x, "int4", group_size=16, symmetric=False, logical_axes=names)
  assert grouped.array_logical_axes() == {"qvalue": (None, "heads", "head_dim"), "scale": names,
                                          "zero_point": names}
  channel = quant.quantize(x, "int8", logical_axes=names)
  assert channel.array_logical_axes() == {"qvalue": names, "scale": (None, "heads", "head_dim")}
  nf4 = quant.quantize(x, "nf4", logical_axes=names)
  assert nf4.array_logical_axes() == {"qvalue": (None, "heads", "head_dim"), "scale": (None, "heads", "head_dim"),
                                      "scale_scale": (None, "heads", None), "scale_offset": ()}


BAD_AXES = {
    "repeated": (dict(axis=(0, -3)), r"^axis=\(0, -3\) names an axis twice"),
    "out_of_range": (dict(axis=(0, 3)), r"^axis=\(0, 3\) is out of range for x of rank 3"),
    "empty": (dict(axis=()), r"^axis=\(\) is out of range"),
    "group_over_two_axes": (dict(axis=(0, 1), group_size=16), r"^axis=\(0, 1\): granularity='group'"),
    "nf4_over_two_axes": (dict(axis=(0, 1), fmt="nf4"), r"^axis=\(0, 1\): granularity='group'"),
    "packed_axis_odd": (dict(axis=(1, 0), fmt="int4"), r"^x\.shape\[0\]=63 must be a multiple of 2"),
}


@pytest.mark.parametrize("bad", BAD_AXES)
def test_bad_axes_are_refused(bad):
  kwargs, message = BAD_AXES[bad]
  kwargs = dict(kwargs)
  fmt = kwargs.pop("fmt", "int8")
  shape = (63, 4, 8) if bad == "packed_axis_odd" else (EMBED, HEADS, HEAD_DIM)
  with pytest.raises(ValueError, match=message):
    quant.quantize(jnp.ones(shape), fmt, **kwargs)


def test_orbax_round_trip_of_nd_qarrays_is_bit_identical(tmp_path):
  """A packed 3-D int4 weight and a quantized KV cache (QArrays inside) restore bit for bit, packed as stored."""
  q = quant.quantize(_x((EMBED, HEADS, HEAD_DIM), seed=9), "int4", group_size=16, symmetric=False)
  cache = kv_cache.init_layer_cache(1, 8, 2, 16, kv_format="int4", group_size=4)
  cache = kv_cache.update_and_attend(cache, jnp.ones((1, 5, 2, 16)), jnp.asarray(_x((1, 5, 2, 16), seed=10)),
                                     jnp.asarray(_x((1, 5, 2, 16), seed=11)), index=jnp.int32(0),
                                     q_positions=jnp.arange(5)[None], kv_positions=jnp.arange(8)[None])[1]
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "q", {"weight": q, "cache": cache})
  checkpointer.wait_until_finished()
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), {"weight": q, "cache": cache})
  restored = checkpointer.restore(tmp_path / "q", target)
  assert restored["weight"].qvalue.dtype == jnp.uint8 and restored["weight"].qvalue.shape == (EMBED // 2, HEADS,
                                                                                              HEAD_DIM)
  assert jax.tree.structure(restored) == jax.tree.structure({"weight": q, "cache": cache})
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves({"weight": q, "cache": cache}), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
