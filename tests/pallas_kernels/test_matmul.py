"""matmul: every implementation runnable here vs plain f32 jnp, forward and all gradients; bad inputs; cost model."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.matmul import IMPLEMENTATIONS, cost, matmul
from tests.helpers import TOLERANCE, assert_close

# name -> (x shape, N, with bias, (block_m, block_n, block_k), out_dtype). The blocks are legal for both kernel
# styles; the comments give the TPU grid (M, N, K blocks) / GPU grid (M, N blocks) x K loop steps. Few cases,
# each covering several paths, because every interpret-mode case costs seconds of compilation.
CASES = {
    # M = 10 flattened from (2, 5), K = 200, N = 130 ragged, f32 output from bf16 inputs too.
    # TPU 1x2x2 (M one whole block); GPU 1x3, 7 K steps.
    "ragged_default_blocks_f32_out": ((2, 5, 200), 130, True, (None, None, None), jnp.float32),
    # M = 40 padded to 48, N = 96 one whole block on TPU, no bias. TPU 3x1x2; GPU 3x1, 2 K steps.
    "several_blocks_explicit": ((40, 256), 96, False, (16, 128, 128), None),
}


def _random(rng, shape, dtype, scale=1.0):
  return jnp.asarray(scale * rng.standard_normal(shape), dtype)


def _expected(x, w, bias, dy):
  """Plain-jnp f32 product and its gradients at HIGHEST precision, written independently of the op."""
  def product(x, w, bias):
    out = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)
    return out if bias is None else out + bias
  upcast = lambda a: None if a is None else a.astype(jnp.float32)
  out, vjp = jax.vjp(product, upcast(x), upcast(w), upcast(bias))
  return out, vjp(upcast(dy))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("implementation", _dispatch.runnable(IMPLEMENTATIONS))
def test_matmul_matches_reference(implementation, dtype, case):
  x_shape, n, with_bias, (block_m, block_n, block_k), out_dtype = CASES[case]
  rng = np.random.default_rng(0)
  x = _random(rng, x_shape, dtype)
  w = _random(rng, (x_shape[-1], n), dtype, scale=x_shape[-1] ** -0.5)
  bias = _random(rng, (n,), dtype) if with_bias else None
  result_dtype = jnp.dtype(out_dtype or dtype)
  dy = _random(rng, (*x_shape[:-1], n), result_dtype)
  op = functools.partial(matmul, implementation=implementation, block_m=block_m, block_n=block_n,
                         block_k=block_k, out_dtype=out_dtype)

  @jax.jit  # one compilation for the forward and both backward kernels
  def forward_and_grads(x, w, bias, dy):
    out, vjp = jax.vjp(op, x, w, bias)
    return out, vjp(dy)

  out, (dx, dw, dbias) = forward_and_grads(x, w, bias, dy)
  expected_out, (expected_dx, expected_dw, expected_dbias) = _expected(x, w, bias, dy)
  tol = TOLERANCE[jnp.dtype(dtype)]
  assert (out.dtype, dx.dtype, dw.dtype) == (result_dtype, x.dtype, w.dtype)
  assert_close("out", out, expected_out, tol)
  assert_close("dx", dx, expected_dx, tol)
  assert_close("dw", dw, expected_dw, tol)
  if with_bias:
    assert dbias.dtype == bias.dtype
    assert_close("dbias", dbias, expected_dbias, tol)


_X, _W = jnp.ones((24, 256)), jnp.ones((256, 256))
BAD_INPUTS = {  # name -> (keyword arguments, regex the ValueError must match: it names the argument)
    "x_scalar": (dict(x=jnp.ones(())), r"^x must"),
    "w_rank_1": (dict(w=jnp.ones((256,))), r"^w must"),
    "k_mismatch": (dict(w=jnp.ones((128, 256))), r"^w\.shape\[0\] \(128\) must equal x\.shape\[-1\]"),
    "bias_shape": (dict(bias=jnp.ones((255,))), r"^bias must have shape"),
    "x_int": (dict(x=jnp.ones((24, 256), jnp.int32), w=jnp.ones((256, 256), jnp.int32)), r"^x: dtype int32"),
    "w_float16": (dict(w=jnp.ones((256, 256), jnp.float16)), r"^w: dtype float16"),
    "w_dtype_differs": (dict(w=jnp.ones((256, 256), jnp.bfloat16)), r"^w: dtype bfloat16 must equal"),
    "bias_int": (dict(bias=jnp.ones((256,), jnp.int8)), r"^bias: dtype int8"),
    "out_dtype_int": (dict(out_dtype=jnp.int8), r"^out_dtype: dtype int8"),
    "block_m_zero": (dict(block_m=0), r"^block_m=0 must be a positive int"),
    "block_n_float": (dict(block_n=128.0), r"^block_n=128.0 must be a positive int"),
    "tpu_block_n_unaligned": (dict(block_n=100, implementation="interpret_tpu"), r"^block_n=100 is illegal .* TPU"),
    "tpu_block_m_unaligned": (dict(block_m=12, implementation="interpret_tpu"), r"^block_m=12 is illegal .* TPU"),
    "gpu_block_k_not_power_of_2": (dict(block_k=48, implementation="interpret_gpu"), r"^block_k=48 is illegal .* GPU"),
    "gpu_block_m_below_16": (dict(block_m=8, implementation="interpret_gpu"), r"^block_m=8 is illegal .* GPU"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_matmul_rejects_bad_input(bad):
  overrides, message = BAD_INPUTS[bad]
  kwargs = dict(x=_X, w=_W, bias=None, implementation="reference") | overrides
  with pytest.raises(ValueError, match=message):
    matmul(**kwargs)


def test_matmul_cost_matches_hand_count():
  # m=40, k=200, n=130, f32, bias, default 128 blocks: block_m = 40 (whole M), N and K padded to 256,
  # grid (1, 2, 2). x [40, 256] is fetched once per N block (2x), w [256, 256] once per M block (1x),
  # the output [40, 256] written once, the bias [256] once per M block.
  moved = 40 * 256 * 2 + 256 * 256 * 1 + 40 * 256 + 256
  ideal = 40 * 200 + 200 * 130 + 40 * 130 + 130
  assert cost((40, 200), (200, 130), dtype=jnp.float32, bias=True) == {
      "flops": 2 * 40 * 256 * 256 + 40 * 256, "hbm_bytes": 4 * moved, "ideal_bytes": 4 * ideal}
  # 256^3 in bf16 with 128-row blocks: grid (2, 2, 2); x and w are each fetched twice.
  modeled = cost((256, 256), (256, 256), dtype=jnp.bfloat16, block_m=128)
  assert modeled["hbm_bytes"] == 2 * (2 * 256 * 256 + 2 * 256 * 256 + 256 * 256)
  assert modeled["ideal_bytes"] == 2 * 3 * 256 * 256
