"""Kernel tests on the device they target: the parametrized tests sweep `_dispatch.runnable(...)`, so on a GPU
(TPU) they also run the compiled 'pallas_gpu' ('pallas_tpu') kernels against the reference; on a CPU nothing
changes. `PYTHONPATH=. python -m pytest -x -q tests/pallas_kernels` checks the real kernels on a real chip."""
import jax
import pytest


@pytest.fixture(autouse=True)
def _full_f32_matmul_precision_on_accelerators():
  """f32 dots default to TF32 on GPU and to bf16 passes on TPU (~1e-3 relative error), which the op contract's f32
  tolerance (1e-5) does not allow: kernels and references compare at full f32 precision there. CPU is unchanged."""
  if jax.default_backend() == "cpu":
    yield
    return
  with jax.default_matmul_precision("highest"):
    yield
