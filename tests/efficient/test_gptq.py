"""efficient.quant.gptq_quantize: beats RTN's layer error on correlated inputs, equals RTN when H = I."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient import quant
from efficient.quant import calibrate

K, N, T = 128, 48, 1024


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(K, K)) / np.sqrt(K)
  x = (rng.normal(size=(T, K)) @ (np.eye(K) + 2.0 * mix)).astype(np.float32)  # correlated input features
  x[:, :4] *= 8.0  # a few large-magnitude features, where act-order matters
  w = (rng.normal(size=(K, N)) * 0.05).astype(np.float32)
  return x, w, (2.0 * x.T @ x / T).astype(np.float32)


CASES = [dict(bits=4, group_size=32), dict(bits=4, group_size=None), dict(bits=3, group_size=32, act_order=True),
         dict(bits=4, group_size=32, symmetric=False, act_order=True)]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gptq_beats_rtn_on_correlated_inputs(problem, kwargs):
  x, w, h = problem
  q = quant.gptq_quantize(w, h, **kwargs)
  rtn = calibrate.rtn_quantize(w, bits=kwargs["bits"], group_size=kwargs["group_size"],
                               symmetric=kwargs.get("symmetric", True))
  assert (q.fmt, q.shape, q.group_size, q.granularity) == (rtn.fmt, rtn.shape, rtn.group_size, rtn.granularity)
  assert q.qvalue.dtype == rtn.qvalue.dtype and q.qvalue.shape == rtn.qvalue.shape  # packed like RTN
  gptq_error = calibrate.layer_error(x, w, quant.dequantize(q))
  rtn_error = calibrate.layer_error(x, w, quant.dequantize(rtn))
  assert gptq_error < 0.7 * rtn_error, (gptq_error, rtn_error)


@pytest.mark.parametrize("kwargs", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gptq_with_identity_hessian_is_rtn(problem, kwargs):
  _, w, _ = problem
  # H = I: no error is propagated (U is diagonal) and act-order keeps the order (equal diagonal, stable sort).
  q = quant.gptq_quantize(w, np.eye(K, dtype=np.float32), **kwargs)
  rtn = calibrate.rtn_quantize(w, bits=kwargs["bits"], group_size=kwargs["group_size"],
                               symmetric=kwargs.get("symmetric", True))
  for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(rtn), strict=True):
    np.testing.assert_array_equal(a, b)


def test_act_order_keeps_groups_on_original_rows(problem):
  x, w, h = problem
  q = quant.gptq_quantize(w, h, bits=4, group_size=32, act_order=True)
  # Each original group of 32 rows fits in its own stored scale: |ŵ| <= qmax * scale row by row.
  w_hat = np.asarray(quant.dequantize(q)).reshape(K // 32, 32, N)
  scale = np.asarray(q.scale, np.float32)[:, None, :]
  assert np.all(np.abs(w_hat) <= 7 * scale + 1e-7)


@pytest.fixture(scope="module")
def two_four_mask(problem):
  _, w, _ = problem
  keep = np.argsort(-np.abs(w.reshape(K // 4, 4, N)), axis=1)[:, :2]
  mask = np.zeros((K // 4, 4, N), bool)
  np.put_along_axis(mask, keep, True, axis=1)
  return mask.reshape(K, N)


def test_masked_gptq_with_identity_hessian_is_rtn_of_the_masked_weight(problem, two_four_mask):
  _, w, _ = problem
  q = quant.gptq_quantize(w, np.eye(K, dtype=np.float32), bits=4, group_size=32, mask=two_four_mask)
  rtn = calibrate.rtn_quantize(np.where(two_four_mask, w, 0), bits=4, group_size=32)
  for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(rtn), strict=True):
    np.testing.assert_array_equal(a, b)


def test_masked_gptq_keeps_zeros_and_beats_rtn_of_the_masked_weight(problem, two_four_mask):
  x, w, h = problem
  sparse_w = np.where(two_four_mask, w, 0)
  w_hat = np.asarray(quant.dequantize(quant.gptq_quantize(sparse_w, h, bits=4, group_size=32, mask=two_four_mask)))
  assert np.all(w_hat[~two_four_mask] == 0)  # still 2:4
  rtn_hat = quant.dequantize(calibrate.rtn_quantize(sparse_w, bits=4, group_size=32))
  gptq_error, rtn_error = (calibrate.layer_error(x, sparse_w, a) for a in (w_hat, rtn_hat))
  assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)
  with pytest.raises(ValueError, match=r"mask must have w's shape \(128, 48\)"):
    quant.gptq_quantize(w, h, bits=4, group_size=32, mask=two_four_mask[:64])


def test_gptq_rejects_bad_arguments(problem):
  _, w, h = problem
  with pytest.raises(ValueError, match="group_size"):
    quant.gptq_quantize(w, h, group_size=48)
  with pytest.raises(ValueError, match="bits"):
    quant.gptq_quantize(w, h, bits=5)
  with pytest.raises(ValueError, match="hessian"):
    quant.gptq_quantize(w, h[:-1, :-1])
  with pytest.raises(ValueError, match="hessian"):
    quant.gptq_quantize(w, np.full_like(h, np.nan))
  with pytest.raises(ValueError, match="damp"):
    quant.gptq_quantize(w, h, damp=-0.1)
  with pytest.raises(ValueError, match="positive definite"):
    quant.gptq_quantize(w, -np.eye(K, dtype=np.float32), damp=0.0)


def test_smoothquant_scales_formula():
  act = jnp.asarray([4.0, 1.0, 9.0])
  w1, w2 = jnp.asarray([[1.0, -2.0], [0.5, 0.1], [1.0, 1.0]]), jnp.asarray([[0.5], [4.0], [1.0]])
  s = calibrate.smoothquant_scales(act, [w1, w2], alpha=0.5)
  np.testing.assert_allclose(s, np.sqrt([4.0, 1.0, 9.0]) / np.sqrt([2.0, 4.0, 1.0]), rtol=1e-6)
  with pytest.raises(ValueError, match="alpha"):
    calibrate.smoothquant_scales(act, [w1], alpha=1.5)
