"""efficient.calibration: module lookup by path, the matrix view of einsum kernels, Hessian capture."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient import calibration, nn
from efficient.models import llama


def _batch(seed=0, batch=2, length=16, pad_from=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, llama.TINY.vocab_size, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.float32)
  mask[1, pad_from:] = 0.0  # trailing padding in row 1
  segment_ids = mask.astype(np.int32)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
  return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "loss_mask": mask}


def test_einsum_modules_finds_paths(tiny):
  found = calibration.einsum_modules(tiny)
  assert len(found) == llama.TINY.num_layers * 7
  assert "blocks/1/mlp/gate" in found and "blocks/0/attention/o" in found
  assert list(calibration.einsum_modules(tiny, r".*/mlp/(gate|up)")) == [
      "blocks/0/mlp/gate", "blocks/0/mlp/up", "blocks/1/mlp/gate", "blocks/1/mlp/up"]
  with pytest.raises(ValueError, match="pattern"):
    calibration.einsum_modules(tiny, "(")


@pytest.mark.parametrize("path", ["blocks/0/attention/q", "blocks/0/attention/o", "blocks/0/mlp/down"])
def test_kernel_matrix_round_trip_and_product(tiny, path):
  module = calibration.get_module(tiny, path)
  matrix = calibration.kernel_as_matrix(module)
  kernel = module.kernel[...]
  assert matrix.shape == calibration.matrix_shape(module)
  assert matrix.shape[0] * matrix.shape[1] == kernel.size
  np.testing.assert_array_equal(calibration.matrix_to_kernel(module, matrix), kernel)
  spec = calibration.parse_equation(module.equation)
  x_shape = (2, 3) + tuple(dict(zip(spec["rhs"], kernel.shape))[a] for a in spec["lhs"][2:])
  x = jax.random.normal(jax.random.key(1), x_shape)
  y2 = calibration.inputs_as_matrix(module.equation, x) @ matrix
  y = calibration.outputs_from_matrix(module.equation, y2, x.shape, kernel.shape)
  np.testing.assert_allclose(y, module(x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="matrix"):
    calibration.matrix_to_kernel(module, matrix.T if matrix.shape[0] != matrix.shape[1] else matrix[:1])


def test_parse_equation_rejects_bad_equations():
  with pytest.raises(ValueError, match="equation"):
    calibration.parse_equation("btd,df")
  with pytest.raises(ValueError, match="ellipsis"):
    calibration.parse_equation("bi,...io->bo")


def test_ellipsis_equation_of_nnx_linear():
  """nnx.Linear's '...i,io->...o': the ellipsis is batch axes, spelled out per input rank."""
  spec = calibration.parse_equation("...i,io->...o")
  assert (spec["contract"], spec["outputs"], spec["batch"], spec["ellipsis"]) == (("i",), ("o",), (), True)
  assert calibration.concrete_equation("...i,io->...o", 3) == "abi,io->abo"
  linear = nnx.Linear(6, 5, bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 3, 6))
  rows = calibration.inputs_as_matrix("...i,io->...o", x)
  assert rows.shape == (6, 6)
  y2 = np.asarray(rows, np.float64) @ np.asarray(calibration.kernel_as_matrix(linear), np.float64)
  y = calibration.outputs_from_matrix("...i,io->...o", jnp.asarray(y2, jnp.float32), x.shape, (6, 5))
  y = calibration.add_bias("...i,io->...o", y, linear.bias[...], x.ndim, (6, 5))
  np.testing.assert_allclose(y, linear(x), rtol=1e-5, atol=1e-5)
  assert calibration.matrix_axis_names(linear) == (None, None)


def test_capture_hessians_matches_recorded_inputs(tiny, monkeypatch):
  batches = [_batch(0), _batch(1, pad_from=5)]
  hessians = calibration.capture_hessians(tiny, batches)
  assert all(isinstance(m, nn.Einsum) for m in calibration.einsum_modules(tiny).values())  # restored

  # Independent: record every Einsum's input with an eager monkeypatched __call__, then 2 XᵀX / n in f64.
  recorded = {}
  original = nn.Einsum.__call__

  def recording(self, x):
    recorded.setdefault(id(self), []).append(np.asarray(x, np.float64))
    return original(self, x)

  monkeypatch.setattr(nn.Einsum, "__call__", recording)
  for b in batches:
    tiny(jnp.asarray(b["tokens"]), positions=jnp.asarray(b["positions"]), segment_ids=jnp.asarray(b["segment_ids"]))
  monkeypatch.undo()
  masks = [b["loss_mask"].reshape(-1).astype(bool) for b in batches]
  n = sum(int(m.sum()) for m in masks)
  for path, module in calibration.einsum_modules(tiny).items():
    rows = [x.reshape(x.shape[0] * x.shape[1], -1)[m] for x, m in zip(recorded[id(module)], masks)]
    x2 = np.concatenate(rows)
    expected = 2.0 * x2.T @ x2 / n
    assert hessians[path]["count"] == n
    assert hessians[path]["hessian"].dtype == jnp.float32
    np.testing.assert_allclose(hessians[path]["hessian"], expected, rtol=2e-4, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(hessians[path]["absmax"], np.abs(x2).max(axis=0), rtol=1e-5)


def test_capture_hessians_restores_modules_on_error(tiny):
  bad = _batch(0)
  bad["tokens"] = np.full_like(bad["tokens"], -1)[:, :0]  # an empty batch breaks the forward
  with pytest.raises(Exception):
    calibration.capture_hessians(tiny, [bad], pattern=r".*/mlp/.*")
  assert all(isinstance(m, nn.Einsum) for m in calibration.einsum_modules(tiny).values())
  with pytest.raises(ValueError, match="pattern"):
    calibration.capture_hessians(tiny, [_batch(0)], pattern="nothing-matches")
