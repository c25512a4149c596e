"""rms_norm: every implementation runnable here vs plain f32 jnp, forward and all gradients; bad inputs; cost."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.rms_norm import IMPLEMENTATIONS, cost, rms_norm
from tests.helpers import TOLERANCE, assert_close

# name -> (x shape, weight dtype or None for x's dtype, block_rows, eps).
CASES = {
    # 18 rows in blocks of 8: padded to 24, 3 grid steps; D = 96 is masked up to 128 in the GPU kernel.
    "ragged_rows_several_blocks": ((2, 9, 96), None, 8, 1e-5),
    # Default blocks: one whole-rows block on TPU, 5 rows padded to 8 on GPU; f32 weight with any x.
    "default_block_f32_weight": ((5, 256), jnp.float32, None, 1e-6),
}


def _expected(x, weight, dy, eps):
  """Plain-jnp f32 RMSNorm and its gradients, written independently of the op."""
  def norm(x, weight):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight
  out, vjp = jax.vjp(norm, x.astype(jnp.float32), weight.astype(jnp.float32))
  return out, vjp(dy.astype(jnp.float32))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("implementation", _dispatch.runnable(IMPLEMENTATIONS))
def test_rms_norm_matches_reference(implementation, dtype, case):
  x_shape, weight_dtype, block_rows, eps = CASES[case]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  weight = jnp.asarray(1 + 0.1 * rng.standard_normal(x_shape[-1]), weight_dtype or dtype)
  dy = jnp.asarray(rng.standard_normal(x_shape), dtype)
  op = functools.partial(rms_norm, eps=eps, implementation=implementation, block_rows=block_rows)

  @jax.jit  # one compilation for the forward and backward kernels
  def forward_and_grads(x, weight, dy):
    out, vjp = jax.vjp(op, x, weight)
    return out, vjp(dy)

  out, (dx, dweight) = forward_and_grads(x, weight, dy)
  expected_out, (expected_dx, expected_dweight) = _expected(x, weight, dy, eps)
  tol = TOLERANCE[jnp.dtype(dtype)]
  assert (out.dtype, dx.dtype, dweight.dtype) == (x.dtype, x.dtype, weight.dtype)
  assert_close("out", out, expected_out, tol)
  assert_close("dx", dx, expected_dx, tol)
  assert_close("dweight", dweight, expected_dweight, tol)


_X, _WEIGHT = jnp.ones((64, 128)), jnp.ones((128,))
BAD_INPUTS = {  # name -> (keyword arguments, regex the ValueError must match: it names the argument)
    "x_scalar": (dict(x=jnp.ones(())), r"^x must"),
    "weight_wrong_length": (dict(weight=jnp.ones((127,))), r"^weight must have shape \(D,\) = \(128,\)"),
    "weight_rank_2": (dict(weight=jnp.ones((1, 128))), r"^weight must have shape"),
    "x_int": (dict(x=jnp.ones((64, 128), jnp.int32)), r"^x: dtype int32"),
    "weight_float16": (dict(weight=jnp.ones((128,), jnp.float16)), r"^weight: dtype float16"),
    "eps_zero": (dict(eps=0.0), r"^eps=0.0 must be a positive number"),
    "eps_array": (dict(eps=jnp.array(1e-6)), r"^eps=.* must be a positive number"),
    "block_rows_zero": (dict(block_rows=0), r"^block_rows=0 must be a positive int"),
    "tpu_block_rows_unaligned": (dict(block_rows=12, implementation="interpret_tpu"),
                                 r"^block_rows=12 is illegal .* TPU"),
    "gpu_block_rows_not_power_of_2": (dict(block_rows=12, implementation="interpret_gpu"),
                                      r"^block_rows=12 is illegal .* GPU"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_rms_norm_rejects_bad_input(bad):
  overrides, message = BAD_INPUTS[bad]
  kwargs = dict(x=_X, weight=_WEIGHT, implementation="reference") | overrides
  with pytest.raises(ValueError, match=message):
    rms_norm(**kwargs)


def test_rms_norm_cost_matches_hand_count():
  # 2 x 9 = 18 rows of D = 96 in f32, blocks of 8 rows: padded to 24 rows. x read and y written once per
  # padded row; the weight block's index never changes, so it is fetched once.
  assert cost((2, 9, 96), dtype=jnp.float32, block_rows=8) == {
      "flops": 4 * 24 * 96, "hbm_bytes": 4 * (2 * 24 * 96 + 96), "ideal_bytes": 4 * (2 * 18 * 96 + 96)}
  # Default blocks cover all 18 rows at once: no padding, the model meets the ideal.
  modeled = cost((18, 96), dtype=jnp.bfloat16)
  assert modeled["hbm_bytes"] == modeled["ideal_bytes"] == 2 * (2 * 18 * 96 + 96)
