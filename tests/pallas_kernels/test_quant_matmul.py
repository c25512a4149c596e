"""quant_matmul: every implementation runnable here vs dequantize-then-f32-matmul (efficient.quant's own
dequantization, independent of the op's), forward and the activation gradient; bad inputs; cost model."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient import quant
from pallas_kernels import _dispatch
from pallas_kernels.quant_matmul import BITS, IMPLEMENTATIONS, cost, quant_matmul
from tests.helpers import TOLERANCE, assert_close

# name -> (x shape, N, fmt, quantize kwargs, (block_m, block_n), out_dtype). Blocks are legal for both kernel
# styles; comments give the TPU grid (N blocks x M blocks) / GPU grid (M x N blocks) x K chunk steps.
CASES = {
    # M = 10 from (2, 5), N = 200 ragged, per-channel int8, f32 output. TPU 2x1; GPU 1x2, 2 chunks of 64 (+ pad).
    "int8_channel_ragged": ((2, 5, 96), 200, "int8", {}, (None, 128), jnp.float32),
    # M = 40 padded to 48, 4 groups of 32, symmetric. TPU 2x3 (N outer); GPU 3x2, 2 chunks of 32 per nibble plane.
    "int4_g32_several_blocks": ((40, 128), 256, "int4", dict(group_size=32), (16, 128), None),
    # Groups of 128 lanes: the TPU kernel slices x per group in-kernel (no group-major transpose). TPU 1x1.
    "int4_g128_lane_groups": ((8, 256), 128, "int4", dict(group_size=128), (None, None), None),
    # Zero points: the rowsum correction. TPU 1x1; GPU 2x2.
    "int4_g32_asymmetric": ((24, 64), 128, "int4", dict(group_size=32, symmetric=False), (None, None), None),
    # NF4 blocks of 64, double-quantized absmax; N = 384 spans two 256-column second-level blocks and the 128-wide
    # tiles meet both. x outweighs the weights here, so the TPU grid is M outer (2x3). GPU 2x3, chunks of 64.
    "nf4_double_quant_m_outer": ((64, 128), 384, "nf4", {}, (32, 128), None),
}


def _inputs(case, dtype, seed=0):
  x_shape, n, fmt, kwargs, _, out_dtype = CASES[case]
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  # Shifted columns make the asymmetric zero points non-trivial.
  w = rng.standard_normal((x_shape[-1], n)) * x_shape[-1] ** -0.5 + 0.02 * rng.standard_normal(n)
  q = quant.quantize(jnp.asarray(w, jnp.float32), fmt, **kwargs)
  dy = jnp.asarray(rng.standard_normal((*x_shape[:-1], n)), jnp.dtype(out_dtype or dtype))
  return x, q, dy


def _op(q, implementation, blocks=(None, None), out_dtype=None):
  return functools.partial(quant_matmul, w=q.qvalue, scale=q.scale, zero_point=q.zero_point, fmt=q.fmt,
                           scale_scale=q.scale_scale, scale_offset=q.scale_offset, implementation=implementation,
                           block_m=blocks[0], block_n=blocks[1], out_dtype=out_dtype)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("implementation", _dispatch.runnable(IMPLEMENTATIONS))
def test_quant_matmul_matches_dequantized_f32_matmul(implementation, dtype, case):
  x, q, dy = _inputs(case, dtype)
  blocks, out_dtype = CASES[case][4], CASES[case][5]
  op = _op(q, implementation, blocks, out_dtype)

  @jax.jit  # one compilation for the forward kernel and the backward
  def forward_and_grad(x, dy):
    out, vjp = jax.vjp(lambda x: op(x), x)
    return out, vjp(dy)[0]

  out, dx = forward_and_grad(x, dy)
  weight = quant.dequantize(q, jnp.float32)  # efficient.quant's dequantization, not the op's
  highest = jax.lax.Precision.HIGHEST
  expected = jnp.matmul(x.astype(jnp.float32), weight, precision=highest)
  expected_dx = jnp.matmul(dy.astype(jnp.float32), weight.T, precision=highest)
  assert out.dtype == jnp.dtype(out_dtype or dtype) and dx.dtype == x.dtype
  tol = TOLERANCE[jnp.dtype(dtype)]
  assert_close("out", out, expected, tol)
  assert_close("dx", dx, expected_dx, tol)


def test_quant_matmul_gives_no_gradient_to_the_frozen_weight():
  x, q, _ = _inputs("int4_g32_asymmetric", jnp.float32)
  loss = lambda scale: jnp.sum(quant_matmul(x, q.qvalue, scale, q.zero_point, fmt="int4",
                                            implementation="interpret_gpu"))
  assert not np.any(np.asarray(jax.grad(loss)(q.scale.astype(jnp.float32))))


_X = jnp.ones((16, 128))
_Q = quant.quantize(jnp.ones((128, 256)), "int4", group_size=32)
_NF4 = quant.quantize(jnp.ones((128, 768)), "nf4")
BAD_INPUTS = {  # name -> (keyword arguments, regex the ValueError must match: it names the argument)
    "fmt": (dict(fmt="int3"), r"^fmt='int3' is not supported by quant_matmul"),
    "x_scalar": (dict(x=jnp.ones(())), r"^x must"),
    "x_int": (dict(x=jnp.ones((16, 128), jnp.int8)), r"^x: dtype int8"),
    "w_dtype": (dict(w=_Q.qvalue.astype(jnp.int8)), r"^w: dtype int8 does not hold fmt='int4' codes"),
    "k_mismatch": (dict(x=jnp.ones((16, 64))), r"^w\.shape\[0\] \(64\) holds K=128 rows .* x\.shape\[-1\] is 64"),
    "groups_not_dividing_k": (dict(scale=jnp.ones((3, 256))), r"^scale must have shape \[G, N=256\]"),
    "scale_int": (dict(scale=jnp.ones((4, 256), jnp.int32)), r"^scale: dtype int32"),
    "zero_point_dtype": (dict(zero_point=jnp.ones((4, 256), jnp.int32)), r"^zero_point must be uint8"),
    "zero_point_nf4": (dict(w=_Q.qvalue, fmt="nf4", zero_point=jnp.ones((4, 256), jnp.uint8)),
                       r"^zero_point is not supported for fmt='nf4'"),
    "scale_scale_alone": (dict(fmt="nf4", scale=_Q.scale.astype(jnp.int8), scale_scale=jnp.ones((4, 1))),
                          r"^scale_scale and scale_offset .* together"),
    "out_dtype_int": (dict(out_dtype=jnp.int32), r"^out_dtype: dtype int32"),
    "block_m_zero": (dict(block_m=0), r"^block_m=0 must be a positive int"),
    "tpu_block_n_unaligned": (dict(block_n=100, implementation="interpret_tpu"), r"^block_n=100 is illegal .* TPU"),
    "tpu_group_of_4": (dict(x=jnp.ones((16, 96)), w=jnp.ones((48, 256), jnp.uint8), scale=jnp.ones((24, 256)),
                            implementation="interpret_tpu"), r"^group size 4 .* illegal for the TPU kernel"),
    "gpu_k_chunk": (dict(x=jnp.ones((16, 48)), w=jnp.ones((24, 256), jnp.uint8), scale=jnp.ones((1, 256)),
                         implementation="interpret_gpu"), r"^x\.shape\[-1\]=48 .* illegal for the GPU"),
    "gpu_block_m_below_16": (dict(block_m=8, implementation="interpret_gpu"), r"^block_m=8 is illegal .* GPU"),
    "tpu_nf4_block_n_384": (dict(w=_NF4.qvalue, scale=_NF4.scale, scale_scale=_NF4.scale_scale,
                                 scale_offset=_NF4.scale_offset, fmt="nf4", block_n=384,
                                 implementation="interpret_tpu"), r"^block_n=384 is illegal .* double-quantized"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_quant_matmul_rejects_bad_input(bad):
  overrides, message = BAD_INPUTS[bad]
  kwargs = dict(x=_X, w=_Q.qvalue, scale=_Q.scale, fmt="int4", implementation="reference") | overrides
  with pytest.raises(ValueError, match=message):
    quant_matmul(**kwargs)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("k, n, fmt, groups, zero_point, double_quant", [
    (576, 1536, "int8", 1, False, False),    # SmolLM2 up projection, per channel
    (576, 1536, "int4", 9, False, False),    # g64
    (576, 1536, "int4", 9, True, False),     # g64 with zero points
    (1536, 576, "int4", 12, False, False),   # down projection, g128
    (1536, 576, "int4", 24, True, False),    # down projection, g64 with zero points (largest scale overhead)
    (576, 1536, "nf4", 9, False, True),      # QLoRA NF4, double-quantized
], ids=["int8", "int4_g64", "int4_g64_zeros", "int4_g128_down", "int4_g64_down_zeros", "nf4_dq"])
def test_quant_matmul_decode_traffic_is_within_15_percent_of_ideal(m, dtype, k, n, fmt, groups, zero_point,
                                                                   double_quant):
  modeled = cost((m, k), (k * BITS[fmt] // 8, n), (groups, n), fmt=fmt, dtype=dtype, zero_point=zero_point,
                 scale_scale=double_quant)
  assert modeled["hbm_bytes"] <= 1.15 * modeled["ideal_bytes"], modeled["hbm_bytes"] / modeled["ideal_bytes"]


def test_quant_matmul_cost_matches_hand_count():
  # m=16, k=576, n=1536, int4 g64 (9 groups, bf16 scales), bf16 x: block_m = 16, block_n = 512, grid (3, 1).
  weight = 576 // 2 * 1536 + 9 * 1536 * 2
  ideal = weight + 16 * 576 * 2 + 16 * 1536 * 2
  # 64-row groups sit inside 128 lanes: the kernel scales the decoded [576, 512] tile (one multiply per weight
  # element, once: a single M block) instead of copying x to group-major order, so it moves the ideal bytes.
  assert cost((16, 576), (288, 1536), (9, 1536), fmt="int4", dtype=jnp.bfloat16) == {
      "flops": 2 * 16 * 1536 * 576 + 576 * 1536, "hbm_bytes": ideal, "ideal_bytes": ideal}
  # Prefill: two M blocks of 256 and three N blocks of 512. N outer would fetch x three times (3 * 590 KB);
  # M outer fetches x once and the int8 weights (885 KB + scales) twice, which is less: the grid goes M outer.
  prefill = cost((512, 576), (576, 1536), (1, 1536), fmt="int8", dtype=jnp.bfloat16)
  assert prefill["hbm_bytes"] == 2 * (576 * 1536 + 1536 * 4) + 512 * 576 * 2 + 512 * 1536 * 2
  # With 128-row blocks (four M blocks) re-reading the weights costs more: N outer, x fetched 3 times.
  assert cost((512, 576), (576, 1536), (1, 1536), fmt="int8", dtype=jnp.bfloat16, block_m=128)["hbm_bytes"] == (
      576 * 1536 + 1536 * 4 + 3 * 512 * 576 * 2 + 512 * 1536 * 2)
