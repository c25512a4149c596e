"""Every Pallas kernel carries its op's `cost()` as a `pl.CostEstimate`, so XLA's cost analysis sees it.

Two observations, both on a CPU host: (1) exported for TPU, the Mosaic custom call's backend config holds
`"cost_estimate": {"bytes_accessed": ..., "flops": ...}` -- what XLA:TPU's cost analysis reads -- equal to the
op's `cost()` (flops, hbm_bytes); (2) for TPU and GPU alike, the traced `pallas_call` carries that estimate
(jax 0.10's Triton lowering drops it, so for GPU the jaxpr is where it can be seen).
"""
import functools
import importlib
import json
import re

import jax
import jax.extend  # noqa: F401  (ClosedJaxpr, Jaxpr: walking nested jaxprs)
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import export_lowered
from tests.lowering import test_paged_decode_lowering as paged_case, test_quant_decode_lowering as quant_case

# `pallas_kernels.<op>` is re-exported as the op function; the modules hold `_run` (no dispatch) and `cost`.
bsr_op, flash_op, gmm_op, int8_op, linear_op, adam_op, matmul_op, quant_op, rms_op = (
    importlib.import_module(f"pallas_kernels.{name}") for name in (
        "block_sparse_matmul", "flash_attention", "grouped_matmul", "int8_matmul", "linear_attention", "lowbit_adam",
        "matmul", "quant_matmul", "rms_norm"))
matmul_run, matmul_cost, quant_run, quant_cost, rms_run, rms_cost = (
    matmul_op._run, matmul_op.cost, quant_op._run, quant_op.cost, rms_op._run, rms_op.cost)

S = jax.ShapeDtypeStruct
BF16, F32 = jnp.bfloat16, jnp.float32
_BSR_MASK = np.array([[True, False], [True, True]])
_BSR = bsr_op.from_block_mask(np.ones((256, 256), np.float32), _BSR_MASK, (128, 128)).astype(BF16)

# name -> (op(implementation) -> function of the args, args, the op's own cost() of the forward kernel)
CASES = {
    "matmul": (lambda impl: functools.partial(matmul_run, implementation=impl),
               [S((256, 576), BF16), S((576, 384), BF16), S((384,), BF16)],
               lambda: matmul_cost((256, 576), (576, 384), dtype=BF16, bias=True)),
    "rms_norm": (lambda impl: functools.partial(rms_run, eps=1e-5, implementation=impl),
                 [S((4, 100, 576), F32), S((576,), F32)], lambda: rms_cost((4, 100, 576), dtype=F32)),
    "int8_matmul": (lambda impl: functools.partial(int8_op._run, implementation=impl, out_dtype=F32),
                    [S((256, 576), jnp.int8), S((256, 1), F32), S((576, 1536), jnp.int8), S((1536,), F32)],
                    lambda: int8_op.cost((256, 576), (576, 1536), out_dtype=F32)),
    "quant_matmul": (lambda impl: functools.partial(quant_run, fmt="int4", implementation=impl),
                     [S((64, 576), BF16), S((288, 1536), jnp.uint8), S((9, 1536), BF16)],
                     lambda: quant_cost((64, 576), (288, 1536), (9, 1536), fmt="int4", dtype=BF16,
                                        scale_dtype=BF16, out_dtype=BF16)),
    "block_sparse_matmul": (lambda impl: functools.partial(bsr_op._run, implementation=impl),
                            [S((64, 256), BF16), jax.tree.map(lambda a: S(a.shape, a.dtype), _BSR)],
                            lambda: bsr_op.cost((64, 256), _BSR.shape, dtype=BF16, nnz_blocks=3,
                                                block_shape=(128, 128), max_blocks_per_col=_BSR.col_slots.shape[1])),
    "grouped_matmul": (lambda impl: functools.partial(gmm_op._run, implementation=impl),
                       [S((256, 128), BF16), S((4, 128, 256), BF16), S((4,), jnp.int32)],
                       lambda: gmm_op.cost((256, 128), (4, 128, 256), dtype=BF16)),  # balanced groups
    "linear_attention": (lambda impl: functools.partial(
                             linear_op._run, feature_map="identity", scale=128 ** -0.5, normalize=False, eps=1e-6,
                             chunk_size=64, form="chunk", implementation=impl),
                         [S((1, 256, 2, 128), BF16)] * 3 + [None, None, None],
                         lambda: linear_op.cost((1, 256, 2, 128), (1, 256, 2, 128), dtype=BF16, chunk_size=64)),
    "lowbit_adam": (lambda impl: functools.partial(adam_op._run, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                                   m_map="dynamic_signed_8", v_map="dynamic_unsigned_8",
                                                   implementation=impl),
                    [S((64, 256), F32), S((64, 256), F32), S((64, 256), jnp.uint8), S((64,), F32),
                     S((64, 256), jnp.uint8), S((64,), F32), S((), jnp.int32), S((), F32)],
                    lambda: adam_op.cost((64, 256), m_map="dynamic_signed_8", v_map="dynamic_unsigned_8")),
    "flash_attention": (lambda impl: functools.partial(flash_op._run, implementation=impl, causal=True),
                        [S((1, 256, 4, 64), BF16), S((1, 256, 2, 64), BF16), S((1, 256, 2, 64), BF16)],
                        lambda: flash_op.cost((1, 256, 4, 64), (1, 256, 2, 64), dtype=BF16, causal=True)),
    "flash_decode": (lambda impl: functools.partial(flash_op._run_decode, implementation=impl),
                     [S((2, 9, 64), BF16), S((2, 1024, 3, 64), BF16), S((2, 1024, 3, 64), BF16),
                      S((2,), jnp.int32)],
                     lambda: flash_op.cost_decode((2, 9, 64), (2, 1024, 3, 64), dtype=BF16)),
}


def _subjaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _subjaxprs(item)


def traced_estimates(fn, *args) -> list:
  """The `cost_estimate` of every pallas_call in `fn`'s jaxpr (nested jaxprs included), in trace order."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.append(eqn.params["cost_estimate"])
      for value in eqn.params.values():
        for sub in _subjaxprs(value):
          walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def exported_estimates(exported) -> list[dict]:
  """The cost_estimate objects in an exported module's Mosaic backend configs. MLIR prints the JSON string
  attribute with `\\22` for '"' and `\\0A` for a newline; the object is flat (no nested braces)."""
  text = exported.mlir_module()
  bodies = re.findall(r"\\22cost_estimate\\22:\s*(\{[^}]*\})", text)
  return [json.loads(body.replace("\\22", '"').replace("\\0A", "\n")) for body in bodies]


def _numbers(modelled) -> tuple[int, int]:
  return int(modelled["flops"]), int(modelled["hbm_bytes"])


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("case", CASES)
def test_every_kernel_traces_with_its_cost_estimate(case, implementation):
  op, args, modelled = CASES[case]
  (estimate,) = traced_estimates(op(implementation), *args)  # one forward kernel per op
  assert estimate is not None, f"{case}: pallas_call has no cost_estimate"
  assert (estimate.flops, estimate.bytes_accessed) == _numbers(modelled())


@pytest.mark.parametrize("case", ["matmul", "flash_attention", "grouped_matmul", "lowbit_adam"])
def test_exported_tpu_module_carries_the_cost_numbers(case):
  op, args, modelled = CASES[case]
  (estimate,) = exported_estimates(export_lowered(op("pallas_tpu"), "tpu", *args))
  assert (estimate["flops"], estimate["bytes_accessed"]) == _numbers(modelled())


def test_backward_kernels_carry_their_share():
  """matmul: dx and dw are the same kernel on transposed shapes, each estimated by `cost` of its own product;
  flash attention: forward + dq + dk/dv estimates add up to `cost(backward=True)`."""
  m, k, n = 256, 576, 384
  op = functools.partial(matmul_run, implementation="pallas_tpu")

  def matmul_grads(x, w, dy):
    out, vjp = jax.vjp(lambda x, w: op(x, w), x, w)
    return out, vjp(dy)

  exported = export_lowered(matmul_grads, "tpu", S((m, k), BF16), S((k, n), BF16), S((m, n), BF16))
  got = sorted((e["flops"], e["bytes_accessed"]) for e in exported_estimates(exported))
  expected = sorted(_numbers(matmul_cost(x, w, dtype=BF16)) for x, w in (((m, k), (k, n)), ((m, n), (n, k)),
                                                                        ((k, m), (m, n))))
  assert got == expected

  flash = CASES["flash_attention"][0]("pallas_tpu")
  q, kv = S((1, 256, 4, 64), BF16), S((1, 256, 2, 64), BF16)

  def flash_grads(q, k, v, do):
    out, vjp = jax.vjp(flash, q, k, v)
    return out, vjp(do)

  estimates = exported_estimates(export_lowered(flash_grads, "tpu", q, kv, kv, q))
  assert len(estimates) == 3
  total = flash_op.cost(q.shape, kv.shape, dtype=BF16, causal=True, backward=True)
  assert (sum(e["flops"] for e in estimates), sum(e["bytes_accessed"] for e in estimates)) == _numbers(total)


# op -> (pallas_calls of forward + backward, how many carry an estimate): backward kernels without a cost model
# of their own (rms_norm's, linear attention's, the block-sparse weight gradient) carry none.
BACKWARD_KERNELS = {"matmul": (3, 3), "rms_norm": (2, 1), "block_sparse_matmul": (3, 2), "grouped_matmul": (3, 3),
                    "linear_attention": (2, 1), "flash_attention": (3, 3)}


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("case", BACKWARD_KERNELS)
def test_backward_kernels_trace_with_their_estimates(case, implementation):
  op, (first, *rest), _ = CASES[case]
  fn = op(implementation)

  def forward_and_grad(x, *rest):
    out, vjp = jax.vjp(lambda x: fn(x, *rest), x)
    return vjp(jax.tree.map(jnp.ones_like, out))

  estimates = traced_estimates(forward_and_grad, first, *rest)
  assert (len(estimates), sum(e is not None for e in estimates)) == BACKWARD_KERNELS[case]


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("op_name,bits", [("quant_decode", 8), ("quant_decode", 4), ("paged_decode", None),
                                          ("paged_decode", 4)])
def test_decode_kernels_trace_with_the_cost_of_their_resolved_blocks(op_name, bits, implementation):
  """The decode ops resolve their blocks per implementation (TPU: several groups/pages per step; GPU: one), and
  the estimate is the op's `cost()` at exactly those blocks."""
  module = importlib.import_module(f"pallas_kernels.{op_name}")
  if op_name == "quant_decode":
    args = quant_case._cache(bits)
    q, v_codes, k_residual = args[0], args[5], args[4]
    group = k_residual.shape[1]
    blocks, splits = module.resolve_blocks(implementation, v_codes.shape[1] // group, group)
    modelled = module.cost(q.shape, v_codes.shape[:3] + (q.shape[-1],), group_size=group, bits=bits,
                           dtype=q.dtype, block_groups=blocks, num_splits=splits)
    slots = v_codes.shape[1]
  else:
    args = paged_case._args(9, 3, 64, bits)
    q, pages, page_table = args[0], args[1], args[2]
    blocks, splits = module.resolve_blocks(implementation, pages["k"].shape[1], page_table.shape[1])
    modelled = module.cost(q.shape, pages["k"].shape, page_table.shape[1], dtype=q.dtype, bits=bits,
                           pages_per_block=blocks, num_splits=splits)
    slots = page_table.shape[1] * pages["k"].shape[1]
  (estimate,) = traced_estimates(functools.partial(module._run, implementation=implementation, bits=bits), *args)
  assert estimate is not None and (estimate.flops, estimate.bytes_accessed) == _numbers(modelled)
  assert estimate.transcendentals == q.shape[0] * q.shape[1] * slots  # one exp per (query head, slot)
