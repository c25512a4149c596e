"""The dispatch contract, once for every op: `implementation=None` picks a CPU path here, the policy context
`pallas_kernels.implementation(name)` picks what it names (an explicit argument still wins), and unknown names,
kernels an op lacks and compiled kernels this backend cannot run are refused with a ValueError listing the
choices. What ran is observed in the traced program (`pallas_call` equations), not inferred from the numbers."""
import jax
from jax.extend.core import ClosedJaxpr, Jaxpr
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import _dispatch
from pallas_kernels.block_sparse_matmul import IMPLEMENTATIONS as BSR, block_sparse_matmul, from_block_mask
from pallas_kernels.flash_attention import (DECODE_IMPLEMENTATIONS as DECODE, IMPLEMENTATIONS as FLASH,
                                            flash_attention, flash_decode)
from pallas_kernels.grouped_matmul import IMPLEMENTATIONS as GROUPED, grouped_matmul, transposed_grouped_matmul
from pallas_kernels.int8_matmul import IMPLEMENTATIONS as INT8, int8_matmul
from pallas_kernels.linear_attention import IMPLEMENTATIONS as LINEAR, linear_attention
from pallas_kernels.matmul import IMPLEMENTATIONS as MATMUL, matmul
from pallas_kernels.quant_matmul import IMPLEMENTATIONS as QUANT, quant_matmul
from pallas_kernels.rms_norm import IMPLEMENTATIONS as RMS_NORM, rms_norm
from tests.helpers import TOLERANCE, assert_close

_RNG = np.random.default_rng(0)


def _normal(*shape, scale=1.0):
  return jnp.asarray(scale * _RNG.standard_normal(shape), jnp.float32)


def _int8(*shape):
  return jnp.asarray(_RNG.integers(-127, 128, shape), jnp.int8)


# Random inputs, drawn once, small but legal for every kernel style (whole-dimension blocks, 128-wide sparse blocks).
_X, _W, _BIAS, _WEIGHT = _normal(8, 16), _normal(16, 8, scale=0.25), _normal(8), _normal(16)
_Q, _K, _V = _normal(2, 8, 2, 16), _normal(2, 8, 2, 16), _normal(2, 8, 2, 16)
_K_CACHE, _V_CACHE, _LENGTHS = _normal(2, 16, 2, 16), _normal(2, 16, 2, 16), jnp.asarray([5, 16])
_SPARSE_X, _SPARSE_W = _normal(8, 256), from_block_mask(np.asarray(_normal(256, 256, scale=1 / 16)),
                                                         [[1, 0], [1, 1]], (128, 128))
_EXPERTS, _GRAD, _GROUP_SIZES = _normal(2, 16, 8, scale=0.25), _normal(8, 8), jnp.asarray([3, 4], jnp.int32)
_X_Q, _W_Q, _X_SCALE, _W_SCALE = _int8(8, 16), _int8(16, 8), _normal(8, 1, scale=0.01), _normal(1, 8, scale=0.01)
# op name -> (callable taking implementation=, its IMPLEMENTATIONS)
OPS = {
    "matmul": (lambda **kw: matmul(_X, _W, _BIAS, **kw), MATMUL),
    "block_sparse_matmul": (lambda **kw: block_sparse_matmul(_SPARSE_X, _SPARSE_W, **kw), BSR),
    # 7 of 8 rows routed: the last row belongs to no group.
    "grouped_matmul": (lambda **kw: grouped_matmul(_X, _EXPERTS, _GROUP_SIZES, **kw), GROUPED),
    "transposed_grouped_matmul": (lambda **kw: transposed_grouped_matmul(_X, _GRAD, _GROUP_SIZES, **kw), GROUPED),
    "rms_norm": (lambda **kw: rms_norm(_X, _WEIGHT, **kw), RMS_NORM),
    "flash_attention": (lambda **kw: flash_attention(_Q, _K, _V, **kw), FLASH),
    "flash_decode": (lambda **kw: flash_decode(_Q[:, 0], _K_CACHE, _V_CACHE, _LENGTHS, **kw), DECODE),
    "linear_attention": (lambda **kw: linear_attention(_Q, _K, _V, **kw), LINEAR),
    "quant_matmul": (lambda **kw: quant_matmul(_X, _W_Q, _W_SCALE, fmt="int8", **kw), QUANT),
    "int8_matmul": (lambda **kw: int8_matmul(_X_Q, _X_SCALE, _W_Q, _W_SCALE, **kw), INT8),
}
INTERPRET = ["interpret_tpu", "interpret_gpu"]


def _pallas_calls(jaxpr) -> int:
  """How many `pallas_call` equations `jaxpr` holds, inside nested jits and custom_vjps included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "pallas_call"
    for param in eqn.params.values():
      for inner in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(inner, ClosedJaxpr):
          count += _pallas_calls(inner.jaxpr)
        elif isinstance(inner, Jaxpr):
          count += _pallas_calls(inner)
  return count


def _kernels_traced(op: str, **kwargs) -> int:
  fn, _ = OPS[op]
  return _pallas_calls(jax.make_jaxpr(lambda: fn(**kwargs))().jaxpr)


@pytest.mark.parametrize("op", sorted(OPS))
def test_default_runs_no_kernel_on_cpu_and_the_policy_runs_the_kernel_it_names(op):
  _, implementations = OPS[op]
  default = _dispatch.choose(None, implementations)
  assert default in _dispatch.runnable(implementations)
  # A CPU default is a jnp path; on a GPU / TPU it is the compiled kernel.
  assert (_kernels_traced(op) > 0) == (default in ("pallas_tpu", "pallas_gpu"))
  for name in INTERPRET:
    with pallas_kernels.implementation(name):
      assert _dispatch.choose(None, implementations, op=op) == name
      assert _kernels_traced(op) >= 1, name


@pytest.mark.parametrize("op", sorted(OPS))
def test_explicit_implementation_beats_the_policy(op):
  with pallas_kernels.implementation("interpret_tpu"):
    assert _kernels_traced(op, implementation="reference") == 0
  with pallas_kernels.implementation("reference"):
    assert _kernels_traced(op, implementation="interpret_gpu") >= 1


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("policy", INTERPRET)
def test_policy_gives_the_reference_numbers_on_random_inputs(policy, op):
  fn, _ = OPS[op]
  expected = fn(implementation="reference")
  with pallas_kernels.implementation(policy):
    actual = fn()
  assert_close(op, actual, expected, TOLERANCE[jnp.dtype(jnp.float32)])


def test_nested_policies_restore_the_outer_one():
  assert pallas_kernels.current_implementation() is None
  backend_default = _dispatch.choose(None, MATMUL)  # 'reference' on a CPU
  with pallas_kernels.implementation("interpret_tpu"):
    with pallas_kernels.implementation("reference"):
      assert _dispatch.choose(None, MATMUL) == "reference"
    with pallas_kernels.implementation(None):  # back to "best for the backend" inside a policy
      assert _dispatch.choose(None, MATMUL) == _dispatch.choose(None, MATMUL, op="outside") == backend_default
      assert pallas_kernels.current_implementation() is None
    with pytest.raises(RuntimeError), pallas_kernels.implementation("interpret_gpu"):
      raise RuntimeError("leaves the inner policy by an exception")
    assert pallas_kernels.current_implementation() == "interpret_tpu"
  assert pallas_kernels.current_implementation() is None


def test_a_function_jitted_outside_the_policy_is_traced_again_inside_it():
  traces = []

  @jax.jit
  def norm(x):
    traces.append(pallas_kernels.current_implementation())
    return rms_norm(x, _WEIGHT)

  norm(_X)
  norm(_X)
  with pallas_kernels.implementation("interpret_tpu"):
    assert _pallas_calls(jax.make_jaxpr(norm)(_X).jaxpr) >= 1
    norm(_X)
  assert traces[0] is None and traces[1:] == ["interpret_tpu"] * (len(traces) - 1) and len(traces) >= 2


@pytest.mark.parametrize("name", ["cuda", "Pallas_TPU", "triton"])
def test_unknown_policy_is_refused_at_entry_naming_the_argument(name):
  with pytest.raises(ValueError, match=rf"^implementation='{name}' is unknown; choose one of \('reference', 'xla', "
                                       rf"'pallas_tpu', 'pallas_gpu', 'interpret_tpu', 'interpret_gpu'\)"):
    with pallas_kernels.implementation(name):
      pass
  assert pallas_kernels.current_implementation() is None


def test_policy_naming_a_kernel_the_op_lacks_is_refused_with_its_choices():
  with pallas_kernels.implementation("interpret_tpu"):
    with pytest.raises(ValueError, match=r"^jnp_only_op: the policy pallas_kernels.implementation\('interpret_tpu'\) "
                                         r"names a kernel this op does not have; it has \('reference', 'xla'\)"):
      _dispatch.choose(None, ("reference", "xla"), op="jnp_only_op")


def test_xla_policy_runs_the_reference_of_ops_without_an_xla_path():
  with pallas_kernels.implementation("xla"):
    assert _dispatch.choose(None, MATMUL) == "reference"  # matmul's reference is its plain-jnp XLA path
    assert _dispatch.choose(None, FLASH) == "xla"
    assert _kernels_traced("rms_norm") == 0


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
  with pytest.raises(ValueError, match=rf"policy pallas_kernels.implementation\('{implementation}'\) needs a "
                                       rf"'(tpu|gpu)' backend"), pallas_kernels.implementation(implementation):
    fn()


def test_cpu_runnable_excludes_compiled_kernels():
  assert _dispatch.cpu_runnable(_dispatch.ALL_IMPLEMENTATIONS) == (
      "reference", "xla", "interpret_tpu", "interpret_gpu")


@pytest.mark.parametrize("op", sorted(OPS))
def test_runnable_is_the_cpu_list_on_cpu_and_adds_the_compiled_kernel_of_an_accelerator(op, monkeypatch):
  _, implementations = OPS[op]
  cpu = tuple(name for name in implementations if name not in ("pallas_tpu", "pallas_gpu"))
  assert _dispatch.runnable(implementations, "cpu") == _dispatch.cpu_runnable(implementations) == cpu
  assert _dispatch.runnable(implementations, "gpu") == tuple(n for n in implementations if n != "pallas_tpu")
  assert _dispatch.runnable(implementations, "tpu") == tuple(n for n in implementations if n != "pallas_gpu")
  # No backend given: jax's default backend decides (what the parametrized op tests collect).
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert "pallas_gpu" in _dispatch.runnable(implementations) and "pallas_tpu" not in _dispatch.runnable(implementations)
