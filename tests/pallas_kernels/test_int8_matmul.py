"""int8_matmul (W8A8): every implementation runnable here vs an independent NumPy int64 product, the dynamic float
entry point's forward and straight-through activation gradient, the per-token quantizer, bad input, cost."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.int8_matmul import (IMPLEMENTATIONS, cost, dynamic_int8_matmul, int8_matmul,
                                        quantize_activations, reference)
from tests.helpers import TOLERANCE, assert_close

# name -> (x shape, N, (block_m, block_n, block_k), out_dtype). Blocks legal for both kernel styles.
CASES = {
    # M = 10 from (2, 5), K = 200, N = 130 ragged. TPU grid 1x1x1 (whole dims); GPU 1x3 with 4 K steps of 64.
    "ragged_default_blocks": ((2, 5, 200), 130, (None, None, None), jnp.float32),
    # M = 40 -> 64, K = 256, N = 256. TPU grid 2x2x2; GPU 2x2 with 2 K steps; bf16 output.
    "several_blocks": ((40, 256), 256, (32, 128, 128), jnp.bfloat16),
}


def _weights(rng, k, n):
  w = rng.standard_normal((k, n)) * np.linspace(0.5, 2.0, n)
  scale = np.abs(w).max(axis=0) / 127
  return jnp.asarray(np.round(w / scale), jnp.int8), jnp.asarray(scale, jnp.float32)


def _numpy_quantize_rows(x):
  """Independent per-token symmetric int8: scale = max|x| / 127 per row, round half to even."""
  x = np.asarray(x, np.float64)
  scale = np.abs(x).max(axis=-1, keepdims=True) / 127
  return np.clip(np.round(x / scale), -127, 127), scale


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("implementation", _dispatch.runnable(IMPLEMENTATIONS))
def test_int8_matmul_matches_int64_numpy(implementation, case):
  x_shape, n, (block_m, block_n, block_k), out_dtype = CASES[case]
  rng = np.random.default_rng(0)
  x_q = jnp.asarray(rng.integers(-127, 128, x_shape), jnp.int8)
  x_scale = jnp.asarray(rng.uniform(0.01, 0.1, (*x_shape[:-1], 1)), jnp.float32)
  w_q, w_scale = _weights(rng, x_shape[-1], n)
  out = int8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=out_dtype, implementation=implementation,
                    block_m=block_m, block_n=block_n, block_k=block_k)
  exact = np.asarray(x_q, np.int64) @ np.asarray(w_q, np.int64)  # what int32 accumulation must reproduce
  expected = exact * np.asarray(x_scale, np.float64) * np.asarray(w_scale, np.float64)
  assert out.dtype == out_dtype and out.shape == (*x_shape[:-1], n)
  assert_close("out", out, expected, 1e-6 if out_dtype == jnp.float32 else TOLERANCE[jnp.dtype(out_dtype)])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("implementation", _dispatch.runnable(IMPLEMENTATIONS))
def test_dynamic_int8_matmul_forward_and_straight_through_gradient(implementation, dtype):
  x_shape, n, blocks, _ = CASES["several_blocks"]
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  w_q, w_scale = _weights(rng, x_shape[-1], n)
  dy = jnp.asarray(rng.standard_normal((x_shape[0], n)), dtype)
  op = functools.partial(dynamic_int8_matmul, w_q=w_q, w_scale=w_scale, implementation=implementation,
                         block_m=blocks[0], block_n=blocks[1], block_k=blocks[2])

  @jax.jit
  def forward_and_grad(x, dy):
    out, vjp = jax.vjp(lambda x: op(x), x)
    return out, vjp(dy)[0]

  out, dx = forward_and_grad(x, dy)
  q, scale = _numpy_quantize_rows(np.asarray(x, np.float32))
  weight = np.asarray(w_q, np.float64) * np.asarray(w_scale, np.float64)
  assert out.dtype == dtype and dx.dtype == dtype
  assert_close("out", out, (q @ np.asarray(w_q, np.float64)) * scale * np.asarray(w_scale, np.float64),
               1e-6 if dtype == jnp.float32 else TOLERANCE[jnp.dtype(dtype)])
  assert_close("dx", dx, np.asarray(dy, np.float64) @ weight.T, TOLERANCE[jnp.dtype(dtype)])


def test_quantize_activations_is_per_token_rtn():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 7, 64)) * [[[1.0]], [[10.0]], [[0.1]]],
                  jnp.float32)
  q, scale = quantize_activations(x)
  assert q.dtype == jnp.int8 and scale.shape == (3, 7, 1)
  q64, scale64 = np.asarray(q, np.float64), np.asarray(scale, np.float64)
  assert np.all(np.abs(q64).max(axis=-1) == 127)  # every token uses the full range
  assert np.all(np.abs(q64 * scale64 - np.asarray(x, np.float64)) <= scale64 / 2 * (1 + 1e-6))
  zeros_q, zeros_scale = quantize_activations(jnp.zeros((2, 8)))
  assert not np.any(np.asarray(zeros_q)) and np.all(np.asarray(zeros_scale) == 1.0)


def test_xla_path_accumulates_int8_dots_in_int32():
  jaxpr = jax.make_jaxpr(reference.int8_matmul)(jnp.ones((4, 8), jnp.int8), jnp.ones((4, 1)),
                                                jnp.ones((8, 16), jnp.int8), jnp.ones((1, 16)))
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 1 and dots[0].params["preferred_element_type"] == jnp.int32
  assert dots[0].invars[0].aval.dtype == jnp.int8 and dots[0].invars[1].aval.dtype == jnp.int8


_XQ, _XS = jnp.ones((32, 256), jnp.int8), jnp.ones((32, 1))
_WQ, _WS = jnp.ones((256, 128), jnp.int8), jnp.ones((128,))
BAD_INPUTS = {  # name -> (keyword arguments, regex the ValueError must match: it names the argument)
    "x_q_float": (dict(x_q=jnp.ones((32, 256))), r"^x_q: dtype float32 must be int8"),
    "x_q_scalar": (dict(x_q=jnp.ones((), jnp.int8)), r"^x_q must be a non-empty"),
    "x_scale_per_tensor": (dict(x_scale=jnp.ones((1, 1))), r"^x_scale must have shape \(32, 1\)"),
    "x_scale_int": (dict(x_scale=jnp.ones((32, 1), jnp.int32)), r"^x_scale: dtype int32"),
    "w_q_uint8": (dict(w_q=jnp.ones((256, 128), jnp.uint8)), r"^w_q: dtype uint8 must be int8"),
    "k_mismatch": (dict(w_q=jnp.ones((128, 128), jnp.int8)), r"^w_q\.shape\[0\] \(128\) must equal .* \(256\)"),
    "w_scale_shape": (dict(w_scale=jnp.ones((64,))), r"^w_scale must have shape \(N,\) or \(1, N\)"),
    "out_dtype_int": (dict(out_dtype=jnp.int32), r"^out_dtype: dtype int32"),
    "block_k_zero": (dict(block_k=0), r"^block_k=0 must be a positive int"),
    "tpu_block_m_int8_tiling": (dict(block_m=8, implementation="interpret_tpu"),
                                r"^block_m=8 is illegal .* TPU .* multiple of 32"),
    "gpu_block_k_below_32": (dict(block_k=16, implementation="interpret_gpu"), r"^block_k=16 is illegal .* GPU"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_int8_matmul_rejects_bad_input(bad):
  overrides, message = BAD_INPUTS[bad]
  kwargs = dict(x_q=_XQ, x_scale=_XS, w_q=_WQ, w_scale=_WS, implementation="reference") | overrides
  with pytest.raises(ValueError, match=message):
    int8_matmul(**kwargs)


def test_dynamic_int8_matmul_rejects_integer_activations():
  with pytest.raises(ValueError, match=r"^x: dtype int8"):
    dynamic_int8_matmul(_XQ, _WQ, _WS, implementation="reference")


def test_int8_matmul_cost_matches_hand_count():
  # 512 x 576 x 1536, f32 out, default blocks: (256, 256, whole K = 576), grid (2, 6, 1). x is fetched once per
  # N block (6x), w once per M block (2x).
  modeled = cost((512, 576), (576, 1536))
  moved = 512 * 576 * 6 + 576 * 1536 * 2 + 4 * 512 * 6 + 4 * 1536 * 2 + 4 * 512 * 1536
  assert modeled["hbm_bytes"] == moved
  assert modeled["ideal_bytes"] == 512 * 576 + 576 * 1536 + 4 * 512 + 4 * 1536 + 4 * 512 * 1536
  # K = 4608 > 2048 takes the widest dividing block (1536): no K padding.
  assert cost((16, 4608), (4608, 256), block_m=32)["hbm_bytes"] == (
      16 * 4608 + 4608 * 256 + 4 * 16 + 4 * 256 + 4 * 16 * 256)
