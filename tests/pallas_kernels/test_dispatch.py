"""The dispatch contract, once for every op: `implementation=None` picks a CPU path here, unknown names and
compiled kernels this backend cannot run are refused with a ValueError listing the choices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.block_sparse_matmul import IMPLEMENTATIONS as BSR, block_sparse_matmul, from_dense
from pallas_kernels.flash_attention import IMPLEMENTATIONS as FLASH, flash_attention
from pallas_kernels.grouped_matmul import IMPLEMENTATIONS as GROUPED, grouped_matmul, transposed_grouped_matmul
from pallas_kernels.int8_matmul import IMPLEMENTATIONS as INT8, int8_matmul
from pallas_kernels.linear_attention import IMPLEMENTATIONS as LINEAR, linear_attention
from pallas_kernels.matmul import IMPLEMENTATIONS as MATMUL, matmul
from pallas_kernels.quant_matmul import IMPLEMENTATIONS as QUANT, quant_matmul
from pallas_kernels.rms_norm import IMPLEMENTATIONS as RMS_NORM, rms_norm

_F = jnp.ones((2, 8, 2, 16), jnp.float32)
# op name -> (callable taking implementation=, its IMPLEMENTATIONS)
OPS = {
    "matmul": (lambda **kw: matmul(jnp.ones((8, 16)), jnp.ones((16, 8)), **kw), MATMUL),
    "block_sparse_matmul": (lambda **kw: block_sparse_matmul(jnp.ones((8, 32)), from_dense(np.eye(32), (16, 16)),
                                                             **kw), BSR),
    "grouped_matmul": (lambda **kw: grouped_matmul(jnp.ones((8, 16)), jnp.ones((2, 16, 8)),
                                                   jnp.asarray([3, 4], jnp.int32), **kw), GROUPED),
    "transposed_grouped_matmul": (lambda **kw: transposed_grouped_matmul(
        jnp.ones((8, 16)), jnp.ones((8, 8)), jnp.asarray([3, 4], jnp.int32), **kw), GROUPED),
    "rms_norm": (lambda **kw: rms_norm(jnp.ones((8, 16)), jnp.ones((16,)), **kw), RMS_NORM),
    "flash_attention": (lambda **kw: flash_attention(_F, _F, _F, **kw), FLASH),
    "linear_attention": (lambda **kw: linear_attention(_F, _F, _F, **kw), LINEAR),
    "quant_matmul": (lambda **kw: quant_matmul(jnp.ones((8, 16)), jnp.ones((16, 8), jnp.int8),
                                               jnp.ones((1, 8)), fmt="int8", **kw), QUANT),
    "int8_matmul": (lambda **kw: int8_matmul(jnp.ones((8, 16), jnp.int8), jnp.ones((8, 1)),
                                             jnp.ones((16, 8), jnp.int8), jnp.ones((8,)), **kw), INT8),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_default_implementation_runs_on_cpu_and_equals_reference(op):
  fn, implementations = OPS[op]
  assert _dispatch.choose(None, implementations) in _dispatch.cpu_runnable(implementations)
  np.testing.assert_allclose(np.asarray(fn()), np.asarray(fn(implementation="reference")), rtol=1e-6)


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("implementation", ["cuda", "triton", "Pallas_TPU"])
def test_unknown_implementation_is_refused_with_the_choices(op, implementation):
  fn, implementations = OPS[op]
  with pytest.raises(ValueError, match=rf"unknown implementation='{implementation}'; choose one of "
                                       rf"\('reference'"):
    fn(implementation=implementation)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the refusal on a CPU host")
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
def test_compiled_kernel_is_refused_on_cpu(op, implementation):
  fn, _ = OPS[op]
  with pytest.raises(ValueError, match=rf"implementation='{implementation}' needs a '(tpu|gpu)' backend"):
    fn(implementation=implementation)


def test_cpu_runnable_excludes_compiled_kernels():
  assert _dispatch.cpu_runnable(_dispatch.ALL_IMPLEMENTATIONS) == (
      "reference", "xla", "interpret_tpu", "interpret_gpu")
