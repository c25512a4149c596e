"""`flash_attention(q, k, v)`: exact softmax attention with online softmax, GQA/MQA, causal and sliding-window
masks, segment ids (packed sequences), logit soft cap; Pallas kernels for TPU and GPU, a memory-linear XLA path,
and `flash_decode` for one query step against a KV cache.

Positions (the convention every implementation follows): query i sits at absolute position i + S - T, i.e. the
LAST query is aligned with the LAST key -- training (T == S) or a prefill of T new tokens after S - T cached ones.
Key j is visible to query i iff j <= i + S - T (causal), j > i + S - T - sliding_window (window, which implies
causal) and the segment ids agree. A query that sees no key outputs zeros (and gets zero gradients).

When T > S, the first T - S queries precede every key and (causal) see none.

Implementations:
  reference      plain jnp with the full T x S mask (readable ground truth; O(T * S) memory).
  xla            chunked online softmax with `lax.scan`, chunk pairs hidden by causal/window skipped with
                 `lax.cond`; memory linear in T (forward and backward).
  pallas_tpu     Mosaic kernels: forward, dq, dk/dv; D padded to a multiple of 128 (so 64 works), at most 256;
                 hidden tiles skipped with `pl.when` and never fetched (clamped index maps); the element mask
                 is built only on boundary tiles.
  pallas_gpu     Triton kernels: forward, dq, dk/dv; D padded to a power of two >= 16, at most 256; hidden
                 tiles skipped by loop bounds; the element mask only on boundary tiles (`lax.cond`).
  interpret_*    the kernels in Pallas interpret mode (CPU tests).

The implementation modules (xla.py, tpu.py, gpu.py) each provide `forward -> (out, lse)` and
`backward(..., out, lse, do) -> (dq, dk, dv)` (FlashAttention-2: P recomputed from the saved log-sum-exp,
delta = rowsum(dO * O)); this file validates, dispatches and wires them with one `jax.custom_vjp`.
"""
from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _dispatch, _util
from pallas_kernels.flash_attention import _common, gpu, reference, tpu, xla

IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu")
_MODULES = {"xla": xla, **_dispatch.kernel_modules(tpu=tpu, gpu=gpu)}


def flash_attention(q, k, v, *, causal=True, sliding_window=None, segment_ids=None, logit_soft_cap=None,
                    scale=None, implementation=None, block_q=None, block_kv=None):
  """Softmax attention of q [B, T, H, D] over k, v [B, S, H_kv, D] -> [B, T, H, D] in q.dtype.

  Args:
    causal: mask keys after the query's absolute position (see the module docstring: last query <-> last key).
    sliding_window: None or the left window size w >= 1: query at position p sees keys p - w < j <= p.
    segment_ids: None, an int array [B, T] (self-attention, T == S) or a pair (q_segment_ids [B, T],
      kv_segment_ids [B, S]); queries only see keys of the same segment.
    logit_soft_cap: None or c > 0: logits become c * tanh(logits / c) (Gemma 2 style), before masking.
    scale: logit scale, default head_dim ** -0.5.
    implementation: None (the `pallas_kernels.implementation` policy, else by backend) or one of
      IMPLEMENTATIONS; see `pallas_kernels._dispatch`.
    block_q, block_kv: tile sizes (query rows, keys) of the kernels or chunk sizes of the XLA path; defaults
      tpu/gpu/xla.DEFAULT_BLOCKS. TPU: block_q a multiple of 8, block_kv of 128 (or the whole length);
      GPU: powers of two >= 16.
  q, k, v are float32 or bfloat16 (all alike); logits, softmax and accumulation are f32. H must be a multiple
  of H_kv (query head h reads kv head h // (H // H_kv); K/V are never repeated in memory).
  """
  q_seg, kv_seg = _check(q, k, v, causal, sliding_window, segment_ids, logit_soft_cap, scale, block_q, block_kv)
  implementation = _dispatch.choose(implementation, IMPLEMENTATIONS, op="flash_attention")
  return _run(q, k, v, q_seg, kv_seg, implementation=implementation, causal=bool(causal),
              sliding_window=sliding_window, logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
              scale=None if scale is None else float(scale), blocks=(block_q, block_kv))


@functools.partial(jax.jit, static_argnames=("implementation", "causal", "sliding_window", "logit_soft_cap",
                                             "scale", "blocks"))
def _run(q, k, v, q_seg=None, kv_seg=None, *, implementation, causal=True, sliding_window=None,
         logit_soft_cap=None, scale=None, blocks=(None, None)):
  """`flash_attention` without validation or dispatch: runs `implementation` even where it cannot execute,
  which is how the lowering tests export 'pallas_tpu'/'pallas_gpu' from a CPU host."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if implementation == "reference":
    return reference.flash_attention(q, k, v, q_seg, kv_seg, causal=causal, window=sliding_window,
                                     soft_cap=logit_soft_cap, scale=scale)
  module = _MODULES[implementation]
  block_q, block_kv = module.resolve_blocks(q.shape[1], k.shape[1], *blocks)
  if module is not xla:
    module.check_head_dim(q.shape[-1])
  geometry = _common.Geometry(q_len=q.shape[1], kv_len=k.shape[1], block_q=block_q, block_kv=block_kv,
                              causal=causal, window=sliding_window, soft_cap=logit_soft_cap, scale=scale)
  return _attention(q, k, v, q_seg, kv_seg, geometry, implementation)


def _module_args(geometry, implementation, q, k, q_seg, **estimates):
  """The module call's keyword arguments; a kernel also gets its `pl.CostEstimate`s (argument name -> kernel
  name of `kernel_cost`), the XLA path none."""
  args = dict(geometry=geometry, interpret=_dispatch.interpret_params(implementation))
  if _MODULES[implementation] is not xla:
    for argument, kernel in estimates.items():
      args[argument] = _util.cost_estimate(
          kernel_cost, kernel, q.shape, k.shape, dtype=q.dtype, causal=geometry.causal,
          sliding_window=geometry.window, segment_ids=q_seg is not None, implementation=implementation,
          blocks={"block_q": geometry.block_q, "block_kv": geometry.block_kv})
  return args


def _forward(q, k, v, q_seg, kv_seg, geometry, implementation):
  return _MODULES[implementation].forward(q, k, v, q_seg, kv_seg, **_module_args(
      geometry, implementation, q, k, q_seg, cost_estimate="forward"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, q_seg, kv_seg, geometry, implementation):
  return _forward(q, k, v, q_seg, kv_seg, geometry, implementation)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, geometry, implementation):
  out, lse = _forward(q, k, v, q_seg, kv_seg, geometry, implementation)
  return out, (q, k, v, q_seg, kv_seg, out, lse)  # lse [B, H, T] f32: the only residual beyond the inputs


def _attention_bwd(geometry, implementation, residuals, do):
  q, k, v, q_seg, kv_seg, out, lse = residuals
  dq, dk, dv = _MODULES[implementation].backward(q, k, v, q_seg, kv_seg, out, lse, do, **_module_args(
      geometry, implementation, q, k, q_seg, dq_cost_estimate="dq", dkv_cost_estimate="dkv"))
  return dq, dk, dv, None, None  # segment ids are integers: no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)


def _is_positive_number(value):
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_soft_cap_and_scale(logit_soft_cap, scale):
  if logit_soft_cap is not None and not _is_positive_number(logit_soft_cap):
    raise ValueError(f"logit_soft_cap={logit_soft_cap!r} must be a positive number (or None).")
  if scale is not None and not _is_positive_number(scale):
    raise ValueError(f"scale={scale!r} must be a positive number (or None for head_dim ** -0.5).")


def _check(q, k, v, causal, sliding_window, segment_ids, logit_soft_cap, scale, block_q, block_kv):
  """Raises one `ValueError` naming the first bad argument; returns (q_segment_ids, kv_segment_ids)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4 or 0 in x.shape:
      layout = "[B, T, H, D]" if name == "q" else "[B, S, H_kv, D]"
      raise ValueError(f"{name} must be a non-empty 4-D array {layout}; got shape {tuple(x.shape)}.")
    _util.check_float_dtype(name, x.dtype)
  batch, q_len, num_heads, head_dim = q.shape
  if tuple(v.shape) != tuple(k.shape):
    raise ValueError(f"v must have k's shape {tuple(k.shape)}; got {tuple(v.shape)}.")
  if k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(f"k must be [B={batch}, S, H_kv, D={head_dim}] to match q {tuple(q.shape)}; "
                     f"got {tuple(k.shape)}.")
  if num_heads % k.shape[2]:
    raise ValueError(f"num_heads: q has H={num_heads} heads, which is not a multiple of k/v's "
                     f"H_kv={k.shape[2]} (GQA needs H % H_kv == 0).")
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"k, v: dtypes {k.dtype}, {v.dtype} must equal q's dtype {q.dtype} (cast them).")
  if not isinstance(causal, bool):
    raise ValueError(f"causal={causal!r} must be a bool.")
  if sliding_window is not None:
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
      raise ValueError(f"sliding_window={sliding_window!r} must be an int >= 1 (or None).")
    if not causal:
      raise ValueError("sliding_window is a left window and needs causal=True.")
  _check_soft_cap_and_scale(logit_soft_cap, scale)
  _util.check_block_arg("block_q", block_q)
  _util.check_block_arg("block_kv", block_kv)
  return _check_segment_ids(segment_ids, batch, q_len, k.shape[1])


def _check_segment_ids(segment_ids, batch, q_len, kv_len):
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(f"segment_ids must be one array or a pair (q_segment_ids, kv_segment_ids); "
                       f"got {len(segment_ids)} items.")
    q_seg, kv_seg = segment_ids
  elif q_len != kv_len:
    raise ValueError(f"segment_ids: one array needs T == S (got T={q_len}, S={kv_len}); pass a pair "
                     f"(q_segment_ids [B, T], kv_segment_ids [B, S]).")
  else:
    q_seg = kv_seg = segment_ids
  for name, seg, length in (("q_segment_ids", q_seg, q_len), ("kv_segment_ids", kv_seg, kv_len)):
    if not hasattr(seg, "shape") or tuple(seg.shape) != (batch, length):
      shape = tuple(seg.shape) if hasattr(seg, "shape") else type(seg).__name__
      raise ValueError(f"segment_ids: {name} must have shape (B, {'T' if name[0] == 'q' else 'S'}) = "
                       f"({batch}, {length}); got {shape}.")
    if not jnp.issubdtype(seg.dtype, jnp.integer):
      raise ValueError(f"segment_ids: {name} must be integers; got dtype {seg.dtype}.")
  return jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)


def cost(q_shape, k_shape, *, dtype, causal=True, sliding_window=None, segment_ids=False, block_q=None,
         block_kv=None, backward=False) -> dict:
  """Modelled cost of the TPU kernels (forward, or forward + backward with `backward=True`) for q [B, T, H, D]
  and k, v [B, S, H_kv, D] in `dtype`; `segment_ids`: whether segment ids are passed.

  Follows the grid and BlockSpecs of tpu.py, counting only the (query block, key block) pairs that causal and
  window block skipping visit (segment ids skip nothing at block level): `flops` of the matmuls on visited
  padded tiles; `hbm_bytes` of the blocks the pipeline fetches (a clamped index map re-uses the block, so a
  skipped tile moves nothing) and writes, with D padded to a multiple of 128 and the lane-replicated f32
  statistics; `ideal_bytes` reads q, k, v once and writes out once (backward: also reads o, do and writes dq,
  dk, dv), unpadded.
  """
  g, dims = _cost_geometry(q_shape, k_shape, causal, sliding_window, block_q, block_kv)
  return tpu.cost(g, *dims, jnp.dtype(dtype).itemsize, segment_ids=segment_ids, backward=backward)


def kernel_cost(kernel, q_shape, k_shape, *, dtype, causal=True, sliding_window=None, segment_ids=False,
                block_q=None, block_kv=None) -> dict:
  """One TPU kernel's share of `cost` -- `kernel` 'forward', 'dq' or 'dkv' -- as {'flops', 'hbm_bytes'}: what
  its `pl.CostEstimate` carries ('forward' is `cost(...)` without backward)."""
  g, dims = _cost_geometry(q_shape, k_shape, causal, sliding_window, block_q, block_kv)
  return tpu.kernel_costs(g, *dims, jnp.dtype(dtype).itemsize, segment_ids=segment_ids)[kernel]


def _cost_geometry(q_shape, k_shape, causal, sliding_window, block_q, block_kv):
  """(the TPU kernels' Geometry, (batch, num_heads, num_kv_heads, head_dim)) of a cost model's shapes."""
  batch, q_len, num_heads, head_dim, kv_len, num_kv_heads = _attention_dims(q_shape, k_shape, "k_shape")
  block_q, block_kv = tpu.resolve_blocks(q_len, kv_len, block_q, block_kv)
  g = _common.Geometry(q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv, causal=causal,
                       window=sliding_window, soft_cap=None, scale=1.0)
  return g, (batch, num_heads, num_kv_heads, head_dim)


DECODE_IMPLEMENTATIONS = ("reference", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu")
DEFAULT_DECODE_SPLITS = 4  # split-K programs per (sequence, kv head): parallelism when B * H_kv is small


def flash_decode(q, k_cache, v_cache, lengths, *, logit_soft_cap=None, scale=None, implementation=None,
                 block_kv=None, num_splits=None):
  """One decoding step: q [B, H, D] attends to rows [0, lengths[b]) of k_cache/v_cache [B, S_max, H_kv, D].

  Returns [B, H, D] in q.dtype (zeros for a sequence of length 0); lengths [B] ints are clipped to [0, S_max].
  The kernels split S_max into blocks of `block_kv` keys (it must divide S_max: the cache is read in place,
  never padded; default the largest of tpu/gpu.DECODE_BLOCK_CANDIDATES that does) spread over `num_splits`
  parallel programs (default DEFAULT_DECODE_SPLITS) whose partial softmax results are merged; blocks at or
  beyond a sequence's length are neither computed nor fetched. Cache positions are implicit: the new query
  sees every valid row (causality is the caller's bookkeeping of `lengths`).
  """
  _check_decode(q, k_cache, v_cache, lengths, logit_soft_cap, scale, block_kv, num_splits)
  implementation = _dispatch.choose(implementation, DECODE_IMPLEMENTATIONS, op="flash_decode")
  return _run_decode(q, k_cache, v_cache, lengths, implementation=implementation,
                     logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
                     scale=None if scale is None else float(scale), block_kv=block_kv, num_splits=num_splits)


@functools.partial(jax.jit, static_argnames=("implementation", "logit_soft_cap", "scale", "block_kv",
                                             "num_splits"))
def _run_decode(q, k_cache, v_cache, lengths, *, implementation, logit_soft_cap=None, scale=None, block_kv=None,
                num_splits=None):
  """`flash_decode` without validation or dispatch (the lowering tests export the kernels through it)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  kv_len = k_cache.shape[1]
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, kv_len)
  if implementation == "reference":
    return reference.flash_decode(q, k_cache, v_cache, lengths, soft_cap=logit_soft_cap, scale=scale)
  module = _MODULES[implementation]
  block = module.resolve_decode_block(kv_len, block_kv)
  (gpu.check_decode_head_dim if module is gpu else tpu.check_head_dim)(q.shape[-1])
  geometry = _common.Geometry(q_len=1, kv_len=kv_len, block_q=1, block_kv=block, causal=False, window=None,
                              soft_cap=logit_soft_cap, scale=scale)
  splits = min(num_splits or DEFAULT_DECODE_SPLITS, kv_len // block)
  # The lengths are traced here: the estimate is the model's for full caches (an upper bound).
  estimate = _util.cost_estimate(cost_decode, q.shape, k_cache.shape, dtype=q.dtype, implementation=implementation,
                                 blocks={"block_kv": block, "num_splits": splits})
  return module.decode(q, k_cache, v_cache, lengths, geometry=geometry, num_splits=splits,
                       interpret=_dispatch.interpret_params(implementation), cost_estimate=estimate)


def _check_decode(q, k_cache, v_cache, lengths, logit_soft_cap, scale, block_kv, num_splits):
  """Raises one `ValueError` naming the first bad argument of `flash_decode`."""
  if q.ndim != 3 or 0 in q.shape:
    raise ValueError(f"q must be a non-empty 3-D array [B, H, D] (one query step); got shape {tuple(q.shape)}.")
  batch, num_heads, head_dim = q.shape
  for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
    if cache.ndim != 4 or cache.shape[0] != batch or cache.shape[3] != head_dim or 0 in cache.shape:
      raise ValueError(f"{name} must be [B={batch}, S_max, H_kv, D={head_dim}]; got {tuple(cache.shape)}.")
    _util.check_float_dtype(name, cache.dtype)
  _util.check_float_dtype("q", q.dtype)
  if tuple(v_cache.shape) != tuple(k_cache.shape):
    raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}; got {tuple(v_cache.shape)}.")
  if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
    raise ValueError(f"k_cache, v_cache: dtypes {k_cache.dtype}, {v_cache.dtype} must equal q's dtype {q.dtype}.")
  if num_heads % k_cache.shape[2]:
    raise ValueError(f"num_heads: q has H={num_heads} heads, which is not a multiple of the cache's "
                     f"H_kv={k_cache.shape[2]} (GQA needs H % H_kv == 0).")
  if tuple(lengths.shape) != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be an integer array of shape (B,) = ({batch},); "
                     f"got {lengths.dtype}{tuple(lengths.shape)}.")
  _check_soft_cap_and_scale(logit_soft_cap, scale)
  _util.check_block_arg("block_kv", block_kv)
  _util.check_block_arg("num_splits", num_splits)


def cost_decode(q_shape, k_cache_shape, *, dtype, lengths=None, block_kv=None, num_splits=None) -> dict:
  """Modelled cost of the TPU decode kernel for q [B, H, D] against k_cache, v_cache [B, S_max, H_kv, D] in
  `dtype`, the sequences holding `lengths` rows (B ints, or one int for all; default S_max).

  `hbm_bytes`: q (block-diagonal, [H, H_kv * D]) once, the K and V blocks below the length (whole blocks), the
  f32 partial results of every split; `ideal_bytes`: q, the valid K/V rows and the output once. `flops`
  include the H_kv-fold redundancy of the block-diagonal layout.
  """
  if len(q_shape) != 3:
    raise ValueError(f"q_shape must be [B, H, D] (one query step); got {tuple(q_shape)}.")
  batch, _, num_heads, head_dim, max_len, num_kv_heads = _attention_dims(
      (q_shape[0], 1, *q_shape[1:]), k_cache_shape, "k_cache_shape")
  block = tpu.resolve_decode_block(max_len, block_kv)
  lengths = np.asarray(max_len if lengths is None else lengths)
  if lengths.shape not in ((), (batch,)):
    raise ValueError(f"lengths must be one int or B={batch} ints; got shape {lengths.shape}.")
  lengths = np.clip(np.broadcast_to(lengths, (batch,)), 0, max_len)  # as the op clips them
  splits = min(num_splits or DEFAULT_DECODE_SPLITS, max_len // block)
  per_sequence = [tpu.decode_cost(1, max_len, int(length), num_heads, num_kv_heads, head_dim,
                                  jnp.dtype(dtype).itemsize, block_kv=block, num_splits=splits)
                  for length in lengths]
  return {key: sum(cost[key] for cost in per_sequence) for key in per_sequence[0]}


def _attention_dims(q_shape, k_shape, k_name: str):
  """(B, T, H, D, S, H_kv) of q [B, T, H, D] and k [B, S, H_kv, D]; a `ValueError` naming the bad shape."""
  if len(q_shape) != 4:
    raise ValueError(f"q_shape must be [B, T, H, D]; got {tuple(q_shape)}.")
  if len(k_shape) != 4 or k_shape[0] != q_shape[0] or k_shape[3] != q_shape[3]:
    raise ValueError(f"{k_name} must be [B={q_shape[0]}, S, H_kv, D={q_shape[3]}] to match q_shape; got "
                     f"{tuple(k_shape)}.")
  return (*q_shape, k_shape[1], k_shape[2])
