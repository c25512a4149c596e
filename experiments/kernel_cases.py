"""The cases `experiments.bench_kernels` times: for every op in `pallas_kernels/`, inputs at the canonical shapes
of its lowering test (tests/lowering) and at SmolLM2-135M's (d 576, 9 heads / 3 kv heads of 64, MLP 1536,
vocab 49152), one function per implementation that runs on the backend, the peers that compute the same thing,
and the op's own `cost()` model (the TPU kernel's grid: flops, hbm_bytes, ideal_bytes).

`build(op, size, dtype, backend)` returns the op's cases; size 'full' is the benchmark, 'tiny' a seconds-long
check of the harness (shapes legal for every kernel style, as in the op tests).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from efficient import quant
from experiments import bench_decode, bench_quant
from pallas_kernels import _dispatch
from pallas_kernels.block_sparse_matmul import from_block_mask

# `pallas_kernels.<op>` is re-exported as the op *function*; the cost models and lists live in the submodules.
_op = {name: importlib.import_module(f"pallas_kernels.{name}") for name in (
    "block_sparse_matmul", "flash_attention", "grouped_matmul", "int8_matmul", "linear_attention", "lowbit_adam",
    "matmul", "paged_decode", "quant_decode", "quant_matmul", "rms_norm")}

SIZES = ("full", "tiny")
PEERS_HINT = "not installed: pip install -e '.[peers]'"


@dataclasses.dataclass
class Case:
  """One shape of one op: `functions` maps an implementation (or peer) name to (f, args), timed as f(*args)."""
  op: str
  name: str
  shape: str
  functions: dict[str, tuple[Callable, tuple]]
  cost: dict[str, Any]
  default: str                                   # what implementation=None runs on this backend
  peers: tuple[str, ...] = ()                    # the names in `functions` that are not the op's implementations
  missing: dict[str, str] = dataclasses.field(default_factory=dict)   # peer -> why it has no row here
  note: str = ""


def timed_implementations(available, backend: str) -> tuple[str, ...]:
  """The implementations of `available` a benchmark times on `backend`: those that run there
  (`_dispatch.runnable`) except the interpret modes, which simulate a kernel step by step rather than run it."""
  return tuple(name for name in _dispatch.runnable(available, backend) if not name.startswith("interpret"))


def _case(op: str, name: str, shape: str, call: Callable, available, args: tuple, cost: dict, backend: str,
          peers: dict | None = None, missing: dict | None = None, note: str = "") -> Case:
  """`call(*args, implementation=...)` for every timed implementation, plus `peers` {name: (f, args)}."""
  functions = {impl: (functools.partial(call, implementation=impl), args)
               for impl in timed_implementations(available, backend)}
  peers = peers or {}
  return Case(op=op, name=name, shape=shape, functions={**functions, **peers}, cost=cost,
              default=_dispatch.choose(None, available, op=op), peers=tuple(peers), missing=missing or {},
              note=note)


def _peers(package: str, makers: dict[str, Callable]) -> tuple[dict, dict]:
  """(peers, missing) from `package` of the optional extra '.[peers]': `makers` maps a row name to
  make(module) -> (f, args); when the package is not installed, every row says how to get it instead."""
  if importlib.util.find_spec(package) is None:
    return {}, {name: PEERS_HINT for name in makers}
  if not flags.FLAGS.is_parsed():  # tokamax reads absl flags and would parse sys.argv itself (e.g. under pytest)
    flags.FLAGS.mark_as_parsed()
  module = importlib.import_module(package)
  return {name: make(module) for name, make in makers.items()}, {}


def _normal(rng, shape, dtype, scale=1.0):
  return jnp.asarray(scale * rng.standard_normal(shape), dtype)


def _sizes(size: str, full: list, tiny: list) -> list:
  return {"full": full, "tiny": tiny}[size]


def _qwix_w8a8(w, x, qwix):
  """qwix's W8A8 nnx.Linear of float `w` on float `x` (it quantizes both itself, per channel / per token)."""
  del qwix  # bench_quant builds the layer
  forward, state = bench_quant.qwix_w8a8_linear(w, x)
  return forward, (state, x)


# --- dense and quantized products ------------------------------------------------------------------------------

def matmul(size, dtype, backend, rng):
  op = _op["matmul"]
  for name, m, k, n in _sizes(size, [("canonical: SmolLM2 MLP up, 512 tokens", 512, 576, 1536),
                                     ("SmolLM2 LM head, decode", 1, 576, 49152)], [("tiny", 8, 64, 128)]):
    args = (_normal(rng, (m, k), dtype), _normal(rng, (k, n), dtype, k ** -0.5), _normal(rng, (n,), dtype))
    yield _case("matmul", name, f"{m}x{k} @ {k}x{n} + bias", op.matmul, op.IMPLEMENTATIONS, args,
                op.cost((m, k), (k, n), dtype=dtype, bias=True), backend,
                note="the reference is jnp.matmul (XLA: cuBLAS on GPU, Eigen/oneDNN on CPU)")


def rms_norm(size, dtype, backend, rng):
  op = _op["rms_norm"]
  for name, rows, d in _sizes(size, [("canonical = SmolLM2, 2048 tokens", 2048, 576)], [("tiny", 16, 128)]):
    args = (_normal(rng, (rows, d), dtype), jnp.asarray(1 + 0.1 * rng.standard_normal(d), jnp.float32))
    peers, missing = _peers("tokamax", {"tokamax.layer_norm (RMS)": lambda tokamax: (functools.partial(
        tokamax.layer_norm, offset=None, epsilon=1e-5, subtract_mean=False), args)})
    yield _case("rms_norm", name, f"{rows}x{d}", functools.partial(op.rms_norm, eps=1e-5), op.IMPLEMENTATIONS,
                args, op.cost((rows, d), dtype=dtype), backend, peers, missing)


def int8_matmul(size, dtype, backend, rng):
  op = _op["int8_matmul"]
  for name, m, k, n in _sizes(size, [("canonical: SmolLM2 MLP up, decode M=16", 16, 576, 1536),
                                     ("canonical: SmolLM2 MLP up, prefill M=512", 512, 576, 1536),
                                     ("SmolLM2 MLP up, one token", 1, 576, 1536)], [("tiny", 8, 64, 128)]):
    x_q = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
    x_scale = jnp.asarray(rng.uniform(0.01, 0.1, (m, 1)), jnp.float32)
    w_q = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    w_scale = jnp.asarray(rng.uniform(0.5, 2.0, (n,)) / 127 / np.sqrt(k), jnp.float32)
    peers, missing = _peers("qwix", {"qwix W8A8 nnx.Linear": functools.partial(
        _qwix_w8a8, w_q.astype(jnp.float32) * w_scale, x_q.astype(jnp.float32) * x_scale)})
    yield _case("int8_matmul", name, f"int8 {m}x{k} @ int8 {k}x{n}", functools.partial(op.int8_matmul, out_dtype=dtype),
                op.IMPLEMENTATIONS, (x_q, x_scale, w_q, w_scale), op.cost((m, k), (k, n), out_dtype=dtype), backend,
                peers, missing)


def quant_matmul(size, dtype, backend, rng):
  op = _op["quant_matmul"]
  full = [("canonical: int8 per channel, M=16", 16, 576, 1536, "int8", {}),
          ("canonical: int4 g64, M=16", 16, 576, 1536, "int4", dict(group_size=64)),
          ("canonical: int4 g64, M=512", 512, 576, 1536, "int4", dict(group_size=64)),
          ("canonical: nf4 + double quant, M=16", 16, 576, 1536, "nf4", dict(group_size=64, double_quant=True)),
          ("canonical: SmolLM2 down int4 g128, one token", 1, 1536, 576, "int4", dict(group_size=128))]
  for name, m, k, n, fmt, kwargs in _sizes(size, full, [("tiny int4 g32", 8, 128, 256, "int4", dict(group_size=32))]):
    q = quant.quantize(_normal(rng, (k, n), jnp.float32, k ** -0.5), fmt, **kwargs)
    x = _normal(rng, (m, k), dtype)
    cost = op.cost((m, k), q.qvalue.shape, q.scale.shape, fmt=fmt, dtype=dtype, zero_point=q.zero_point is not None,
                   scale_scale=q.scale_scale is not None, scale_dtype=q.scale.dtype)
    call = lambda x, w, scale, zero, ss, so, *, implementation, fmt=fmt: op.quant_matmul(
        x, w, scale, zero, fmt=fmt, scale_scale=ss, scale_offset=so, implementation=implementation)
    yield _case("quant_matmul", name, f"{m}x{k} @ {fmt} {k}x{n}", call, op.IMPLEMENTATIONS,
                (x, q.qvalue, q.scale, q.zero_point, q.scale_scale, q.scale_offset), cost, backend)


def grouped_matmul(size, dtype, backend, rng):
  op = _op["grouped_matmul"]
  for name, m, k, n, groups in _sizes(size, [("canonical: MoE, 1024 tokens x top-2, SmolLM2 MLP", 2048, 576, 1536, 8)],
                                      [("tiny", 64, 128, 128, 4)]):
    sizes = rng.multinomial(m, np.full(groups, 1 / groups))  # rows sorted by expert, every row routed
    lhs, rhs = _normal(rng, (m, k), dtype), _normal(rng, (groups, k, n), dtype, k ** -0.5)
    grad, group_sizes = _normal(rng, (m, n), dtype), jnp.asarray(sizes, jnp.int32)
    peers, missing = _peers("tokamax", {"tokamax.ragged_dot": lambda tokamax: (tokamax.ragged_dot,
                                                                            (lhs, rhs, group_sizes))})
    yield _case("grouped_matmul", name, f"{m}x{k} @ {groups}x{k}x{n}", op.grouped_matmul, op.IMPLEMENTATIONS,
                (lhs, rhs, group_sizes), op.cost((m, k), (groups, k, n), dtype=dtype, group_sizes=sizes), backend,
                peers, missing)
    yield _case("grouped_matmul", f"{name}: transposed (weight gradient)", f"{m}x{k}^T @ {m}x{n} -> {groups}x{k}x{n}",
                op.transposed_grouped_matmul, op.IMPLEMENTATIONS, (lhs, grad, group_sizes),
                op.cost_transposed((m, k), (m, n), dtype=dtype, group_sizes=sizes), backend)


def block_sparse_matmul(size, dtype, backend, rng):
  op = _op["block_sparse_matmul"]
  full = [("canonical: SmolLM2 down^T, 512 tokens, 128x128 blocks at 50%", 512, 1536, 1536, (128, 128))]
  for name, m, k, n, block in _sizes(size, full, [("tiny, 50%", 8, 256, 256, (128, 128))]):
    mask = rng.random((k // block[0], n // block[1])) < 0.5
    w = from_block_mask(rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k), mask, block).astype(dtype)
    cost = op.cost((m, k), w.shape, dtype=dtype, nnz_blocks=w.nnz_blocks, block_shape=w.block_shape,
                   max_blocks_per_col=w.col_slots.shape[1])
    yield _case("block_sparse_matmul", name, f"{m}x{k} @ bsr {k}x{n} ({w.nnz_blocks} of {mask.size} blocks)",
                op.block_sparse_matmul, op.IMPLEMENTATIONS, (_normal(rng, (m, k), dtype), w), cost, backend)


# --- attention ---------------------------------------------------------------------------------------------------

def _attention_peers(backend: str, q, k, v) -> tuple[dict, dict]:
  peers = {"jax.nn.dot_product_attention[xla]": (
      functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="xla"), (q, k, v))}
  if backend == "gpu":
    peers["jax.nn.dot_product_attention[cudnn]"] = (
        functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"), (q, k, v))
  tokamax, missing = _peers("tokamax", {"tokamax.dot_product_attention": lambda tokamax: (
      functools.partial(tokamax.dot_product_attention, is_causal=True), (q, k, v))})
  return {**peers, **tokamax}, missing


def flash_attention(size, dtype, backend, rng):
  op = _op["flash_attention"]
  full = [("canonical: D=64", 1, 2048, 8, 2, 64), ("canonical: D=128", 1, 2048, 8, 2, 128),
          ("SmolLM2 prefill, 512-token prompt", 1, 512, 9, 3, 64)]
  for name, batch, length, heads, kv_heads, head_dim in _sizes(size, full, [("tiny", 1, 128, 2, 1, 64)]):
    q = _normal(rng, (batch, length, heads, head_dim), dtype)
    k, v = (_normal(rng, (batch, length, kv_heads, head_dim), dtype) for _ in range(2))
    peers, missing = _attention_peers(backend, q, k, v)
    yield _case("flash_attention", name, f"B{batch} T=S={length} H{heads}/{kv_heads} D{head_dim}, causal",
                functools.partial(op.flash_attention, causal=True), op.IMPLEMENTATIONS, (q, k, v),
                op.cost(q.shape, k.shape, dtype=dtype, causal=True), backend, peers, missing)


def flash_decode(size, dtype, backend, rng):
  op = _op["flash_attention"]
  full = [("canonical: D=64, batch 4", 4, 2048, 8, 2, 64), ("SmolLM2 decode, 4096-token cache", 1, 4096, 9, 3, 64)]
  for name, batch, length, heads, kv_heads, head_dim in _sizes(size, full, [("tiny", 2, 256, 4, 2, 64)]):
    q = _normal(rng, (batch, heads, head_dim), dtype)
    k, v = (_normal(rng, (batch, length, kv_heads, head_dim), dtype) for _ in range(2))
    lengths = jnp.full((batch,), length, jnp.int32)
    yield _case("flash_decode", name, f"B{batch} S={length} H{heads}/{kv_heads} D{head_dim}", op.flash_decode,
                op.DECODE_IMPLEMENTATIONS, (q, k, v, lengths),
                op.cost_decode(q.shape, k.shape, dtype=dtype, lengths=length), backend)


def linear_attention(size, dtype, backend, rng):
  op = _op["linear_attention"]
  full = [("canonical: plain", 2, 2048, 8, 128, "identity", None),
          ("canonical: GLA gates", 2, 2048, 8, 128, "identity", "gates"),
          ("SmolLM2 heads: elu1 + fixed decay", 1, 2048, 9, 64, "elu1", "decay")]
  for name, batch, length, heads, dim, feature_map, gating in _sizes(
      size, full, [("tiny", 1, 64, 2, 16, "identity", "decay")]):
    q, k, v = (_normal(rng, (batch, length, heads, dim), dtype) for _ in range(3))
    decay = jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(heads, dtype=jnp.float32)))) if gating == "decay" else None
    gates = (jax.nn.log_sigmoid(_normal(rng, (batch, length, heads, dim), jnp.float32) + 2.0)
             if gating == "gates" else None)

    def call(q, k, v, decay, gates, *, implementation, feature_map=feature_map):
      # The reference runs its recurrent form: the naive one holds a [T, T] matrix per head (seconds at T=2048).
      form = "recurrent" if implementation == "reference" else None
      return op.linear_attention(q, k, v, feature_map=feature_map, log_decay=decay, log_gates=gates, form=form,
                                 implementation=implementation)

    cost = op.cost(q.shape, v.shape, dtype=dtype, feature_map=feature_map, log_decay=decay is not None,
                   log_gates=gates is not None)
    yield _case("linear_attention", name, f"B{batch} T={length} H{heads} K=V={dim}, {feature_map}",
                call, op.IMPLEMENTATIONS, (q, k, v, decay, gates), cost, backend,
                note="reference = the recurrent form (lax.scan over time); the others the chunked form")


def quant_decode(size, dtype, backend, rng):
  op = _op["quant_decode"]
  group = 32
  full = [("canonical = SmolLM2 decode, int8", 1, 4096, 9, 3, 64, 8),
          ("canonical = SmolLM2 decode, int4", 1, 4096, 9, 3, 64, 4)]
  for name, batch, length, heads, kv_heads, head_dim, bits in _sizes(size, full, [("tiny", 1, 128, 4, 2, 64, 8)]):
    q = _normal(rng, (batch, heads, head_dim), dtype)
    k, v = (_normal(rng, (batch, length, kv_heads, head_dim), dtype) for _ in range(2))
    valid = length - 5  # an open group of float keys, as a live cache has
    layer = bench_decode.quantized_inputs(k, v, valid, f"int{bits}", group, dtype)
    yield _case("quant_decode", name, f"B{batch} S={length} H{heads}/{kv_heads} D{head_dim}, groups of {group}",
                functools.partial(op.quant_decode, bits=bits), op.IMPLEMENTATIONS,
                (q, *op.cache_arrays(layer), jnp.full((batch,), valid, jnp.int32)),
                op.cost(q.shape, layer.v.shape, group_size=group, bits=bits, dtype=dtype, lengths=valid), backend,
                note="the reference dequantizes the whole cache, then one softmax")


def paged_decode(size, dtype, backend, rng):
  op = _op["paged_decode"]
  page_size = 32
  full = [(f"canonical: SmolLM2 heads, {storage} pages", 4, 2048, 9, 3, 64, storage)
          for storage in ("float", "int8", "int4")]
  for name, batch, length, heads, kv_heads, head_dim, storage in _sizes(
      size, full, [("tiny", 2, 128, 4, 2, 64, "float")]):
    q = _normal(rng, (batch, heads, head_dim), dtype)
    k, v = (_normal(rng, (batch, length, kv_heads, head_dim), dtype) for _ in range(2))
    pool, table = bench_decode.paged_inputs(k, v, page_size, storage, rng)
    bits = {"int8": 8, "int4": 4}.get(storage)
    cost = op.cost(q.shape, (pool["k"].shape[0], page_size, kv_heads, head_dim), table.shape[1], dtype=dtype,
                   bits=bits, lengths=length)
    yield _case("paged_decode", name, f"B{batch} S={length} H{heads}/{kv_heads} D{head_dim}, pages of {page_size}",
                functools.partial(op.paged_decode, bits=bits), op.IMPLEMENTATIONS,
                (q, pool, table, jnp.full((batch,), length, jnp.int32)), cost, backend)


# --- optimizer step ----------------------------------------------------------------------------------------------

def lowbit_adam(size, dtype, backend, rng):
  del dtype  # the optimizer state is f32 grads / params and uint8 codes whatever the model computes in
  op = _op["lowbit_adam"]
  elements = 576 * 1536  # a SmolLM2 MLP weight
  full = [("canonical: 8-bit moments, blocks of 256", elements, "dynamic_signed_8", "dynamic_unsigned_8", 256),
          ("canonical: 4-bit moments, blocks of 128", elements, "de_signed_4", "linear_unsigned_4_nozero", 128)]
  for name, count, m_map, v_map, block in _sizes(
      size, full, [("tiny", 64 * 256, "dynamic_signed_8", "dynamic_unsigned_8", 256)]):
    shape = (count // block, block)
    m_codes, m_absmax = op.quantize_blocks(_normal(rng, shape, jnp.float32, 1e-3), map_name=m_map)
    v_codes, v_absmax = op.quantize_blocks(_normal(rng, shape, jnp.float32, 1e-3) ** 2, map_name=v_map)
    call = functools.partial(op.blockwise_adam_update, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                             m_map=m_map, v_map=v_map)
    call_with_step = lambda *a, implementation, call=call: call(*a[:6], count=a[6], learning_rate=a[7],
                                                                 implementation=implementation)
    args = (_normal(rng, shape, jnp.float32, 1e-2), _normal(rng, shape, jnp.float32), m_codes, m_absmax, v_codes,
            v_absmax, jnp.int32(3), jnp.float32(1e-3))
    yield _case("lowbit_adam", name, f"{shape[0]}x{block} f32 ({m_map} / {v_map})", call_with_step,
                op.IMPLEMENTATIONS, args, op.cost(shape, m_map=m_map, v_map=v_map), backend,
                note="error column: the update (codes and absmax match bit for bit in the op tests)")


BUILDERS = {"matmul": matmul, "rms_norm": rms_norm, "int8_matmul": int8_matmul, "quant_matmul": quant_matmul,
            "grouped_matmul": grouped_matmul, "block_sparse_matmul": block_sparse_matmul,
            "flash_attention": flash_attention, "flash_decode": flash_decode, "linear_attention": linear_attention,
            "quant_decode": quant_decode, "paged_decode": paged_decode, "lowbit_adam": lowbit_adam}
OPS = tuple(BUILDERS)


def build(op: str, size: str, dtype, backend: str, seed: int = 0) -> list[Case]:
  """The cases of `op` (one of OPS) at `size` (one of SIZES), inputs in `dtype` drawn from `seed`."""
  if op not in BUILDERS:
    raise ValueError(f"op={op!r} is unknown; choose from {OPS}.")
  if size not in SIZES:
    raise ValueError(f"size={size!r} is unknown; choose from {SIZES}.")
  return list(BUILDERS[op](size, jnp.dtype(dtype), backend, np.random.default_rng(seed)))
