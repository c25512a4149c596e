"""`linear_attention(q, k, v)`: linear attention with feature maps, fixed decay (RetNet/Lightning), data-dependent
gates (GLA) and Based/TransNormer-style normalization; naive, recurrent and chunked forms; Pallas TPU and GPU chunk
kernels with backward kernels.

This file validates, applies the feature map / scale / normalizer column in plain jnp (common.prepare), converts
to the kernel layout [B*H, T padded to whole chunks, D], pads feature dims where a kernel needs it, dispatches,
and wires one `jax.custom_vjp` for both kernels: the forward kernel saves the state entering every chunk, the
backward kernel walks the chunks in reverse carrying dS and computes dq, dk, dv, d log_gates (reverse-cumsum
identity, `common.chunk_backward`) and d initial_state. Padding, transposes and the decay broadcast are
differentiated by jax around the kernels (so d log_decay is the sum of the kernel's per-step gate gradients).
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _dispatch, _util
from pallas_kernels.linear_attention import common, gpu, reference, tpu, xla
from pallas_kernels.linear_attention.common import FEATURE_MAPS
from pallas_kernels.linear_attention.reference import recurrent_step

IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu")
FORMS = {"reference": ("naive", "recurrent")}  # every other implementation runs the 'chunk' form
DEFAULT_CHUNK = 64
_KERNELS = _dispatch.kernel_modules(tpu=tpu, gpu=gpu)

__all__ = ["linear_attention", "recurrent_step", "cost", "IMPLEMENTATIONS", "FEATURE_MAPS"]


def linear_attention(q, k, v, *, feature_map="identity", log_decay=None, log_gates=None, scale=None,
                     normalize=False, eps=1e-6, initial_state=None, return_final_state=False, chunk_size=None,
                     form=None, implementation=None):
  """Causal linear attention: S_t = diag(exp(g_t)) S_{t-1} + phi(k_t) v_t^T, o_t = scale * phi(q_t) S_t.

  Args:
    q, k: [B, T, H, K]; v: [B, T, H, V]; float32 or bfloat16, all the same dtype.
    feature_map: phi, one of FEATURE_MAPS ('identity', 'elu1' = elu + 1, 'relu', 'taylor' = Based's
      1 + x + x(x)x/2 map, which makes the key width K' = 1 + K + K^2; otherwise K' = K).
    log_decay: [H] fixed per-head log decay <= 0 (RetNet/Lightning: g_t = log_decay for every t and key).
    log_gates: [B, T, H, K'] data-dependent log gates <= 0 per key dimension (GLA). At most one of the two.
    scale: multiplies phi(q); default K^-0.5 (1 for 'taylor', whose map carries its own scalings).
    normalize: o_t = (phi(q_t) S_t) / (phi(q_t) . z_t + eps) with z_t the decayed key sum. The state then
      carries z as one extra value column: states are [B, H, K', V + 1].
    initial_state: [B, H, K', V'] (V' = V, or V + 1 when normalizing); default zeros.
    return_final_state: also return the state after step T (f32), which `recurrent_step` continues from.
    chunk_size: steps per chunk of the chunked forms (default 64, clamped to the padded length); T need not be
      a multiple (padded steps do not touch the state). TPU: a multiple of 8; GPU: a power of two >= 16.
    form: 'naive' (quadratic, default) or 'recurrent' (lax.scan over time) for implementation='reference';
      every other implementation is the 'chunk' form.
    implementation: None (the `pallas_kernels.implementation` policy, else by backend) or one of
      IMPLEMENTATIONS; see `pallas_kernels._dispatch`.

  Returns:
    o [B, T, H, V] in q.dtype, or (o, final_state [B, H, K', V'] f32) with return_final_state.
  Values of log_decay/log_gates are checked (<= 0) only when they are concrete (not under jit).
  """
  implementation = _dispatch.choose(implementation, IMPLEMENTATIONS, op="linear_attention")
  form, chunk_size = _check(q, k, v, feature_map=feature_map, log_decay=log_decay, log_gates=log_gates,
                            scale=scale, normalize=normalize, eps=eps, initial_state=initial_state,
                            chunk_size=chunk_size, form=form, implementation=implementation)
  scale = common.default_scale(feature_map, q.shape[-1]) if scale is None else float(scale)
  out, final = _run(q, k, v, log_decay, log_gates, initial_state, feature_map=feature_map, scale=scale,
                    normalize=bool(normalize), eps=float(eps), chunk_size=chunk_size, form=form,
                    implementation=implementation)
  return (out, final) if return_final_state else out


@functools.partial(jax.jit, static_argnames=("feature_map", "scale", "normalize", "eps", "chunk_size", "form",
                                             "implementation"))
def _run(q, k, v, log_decay, log_gates, initial_state, *, feature_map, scale, normalize, eps, chunk_size, form,
         implementation):
  """`linear_attention` without validation or dispatch: runs `implementation` even where it cannot execute,
  which is how the lowering tests export 'pallas_tpu'/'pallas_gpu' from a CPU host. Returns (o, final state)."""
  batch, seq_len, heads, _ = q.shape
  q_core, k_core, v_core = common.prepare(q, k, v, feature_map=feature_map, scale=scale, normalize=normalize)
  gates = None
  if log_decay is not None:
    gates = jnp.broadcast_to(log_decay.astype(jnp.float32)[None, None, :, None], (batch, seq_len, heads, 1))
  elif log_gates is not None:
    gates = log_gates.astype(jnp.float32)
  state_shape = (batch, heads, k_core.shape[-1], v_core.shape[-1])
  s0 = (jnp.zeros(state_shape, jnp.float32) if initial_state is None else initial_state.astype(jnp.float32))
  if form == "naive":
    out, final = reference.naive(q_core, k_core, v, gates, s0, normalize=normalize)
  elif form == "recurrent":
    out, final = reference.recurrent(q_core, k_core, v_core, gates, s0)
  else:
    estimate = None if implementation not in _KERNELS else _util.cost_estimate(
        cost, q.shape, v.shape, dtype=q.dtype, feature_map=feature_map, log_decay=log_decay is not None,
        log_gates=log_gates is not None, normalize=normalize, implementation=implementation,
        blocks={"chunk_size": chunk_size})
    out, final = _chunked(q_core, k_core, v_core, gates, s0, chunk_size=chunk_size, normalize=normalize,
                          implementation=implementation, estimate=estimate)
  return common.finish(out, normalize=normalize, eps=eps, dtype=q.dtype), final


def _chunked(q, k, v, gates, s0, *, chunk_size, normalize, implementation, estimate=None):
  """The chunk form on prepared [B, T, H, D] inputs -> (o [B, T, H, V'], final state [B, H, K', V']);
  `estimate`: the forward kernel's `pl.CostEstimate` (from `cost` of the op's own shapes)."""
  batch, seq_len, heads, k_dim = q.shape
  v_dim = v.shape[-1]
  padded_t = _util.round_up(seq_len, chunk_size)
  layout = lambda x: None if x is None else common.to_kernel_layout(x, padded_t)
  q, k, v, gates = layout(q), layout(k), layout(v), layout(gates)
  s0 = s0.reshape(batch * heads, k_dim, v_dim)
  if implementation == "xla":
    out, final = xla.chunk(q, k, v, gates, s0, chunk_size=chunk_size)
  else:
    kernel = _KERNELS[implementation]
    k_pad, v_pad = kernel.feature_padding(k_dim, v_dim)
    if gates is not None and kernel.EXPAND_DECAY and gates.shape[-1] == 1:
      gates = jnp.broadcast_to(gates, (*gates.shape[:-1], k_dim))  # jax sums its gradient back over K
    widen = lambda x, d: None if x is None else _util.pad_to(x, (*x.shape[:-1], d))
    gates = None if gates is None else widen(gates, k_pad if gates.shape[-1] > 1 else 1)
    # Normalization divides by one output column: keep it in f32 rather than rounding it to bf16.
    out_dtype = jnp.dtype(jnp.float32 if normalize else q.dtype)
    out, final = _pallas_core(widen(q, k_pad), widen(k, k_pad), widen(v, v_pad), gates,
                              _util.pad_to(s0, (s0.shape[0], k_pad, v_pad)), chunk_size, out_dtype,
                              implementation, estimate)
    out, final = out[..., :v_dim], final[:, :k_dim, :v_dim]
  return common.from_kernel_layout(out, batch, seq_len), final.reshape(batch, heads, k_dim, v_dim)


def _kernel_args(chunk_size, implementation):
  return dict(chunk_size=chunk_size, interpret=_dispatch.interpret_params(implementation))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _pallas_core(q, k, v, gates, s0, chunk_size, out_dtype, implementation, estimate):
  out, final, _ = _KERNELS[implementation].forward(q, k, v, gates, s0, out_dtype=out_dtype, save_states=False,
                                                   cost_estimate=estimate, **_kernel_args(chunk_size, implementation))
  return out, final


def _pallas_core_fwd(q, k, v, gates, s0, chunk_size, out_dtype, implementation, estimate):
  out, final, states = _KERNELS[implementation].forward(q, k, v, gates, s0, out_dtype=out_dtype, save_states=True,
                                                        cost_estimate=estimate,
                                                        **_kernel_args(chunk_size, implementation))
  return (out, final), (q, k, v, gates, states, final)


def _pallas_core_bwd(chunk_size, out_dtype, implementation, estimate, residuals, cotangents):
  del out_dtype, estimate
  q, k, v, gates, states, final = residuals
  d_out, d_final = cotangents
  return _KERNELS[implementation].backward(q, k, v, gates, states, final, d_out, d_final,
                                           **_kernel_args(chunk_size, implementation))


_pallas_core.defvjp(_pallas_core_fwd, _pallas_core_bwd)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_shape(name, x, shape, meaning):
  if x is None:
    return
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {meaning} = {tuple(shape)}; got {tuple(x.shape)}.")
  _util.check_float_dtype(name, x.dtype)


def _check(q, k, v, *, feature_map, log_decay, log_gates, scale, normalize, eps, initial_state, chunk_size, form,
           implementation):
  """Raises one `ValueError` naming the first bad argument; returns (form, resolved chunk size)."""
  if q.ndim != 4 or 0 in q.shape:
    raise ValueError(f"q must be a non-empty array [B, T, H, K]; got shape {tuple(q.shape)}.")
  batch, seq_len, heads, k_dim = q.shape
  if tuple(k.shape) != tuple(q.shape):
    raise ValueError(f"k must have q's shape [B, T, H, K] = {tuple(q.shape)}; got {tuple(k.shape)}.")
  if v.ndim != 4 or tuple(v.shape[:3]) != (batch, seq_len, heads) or v.shape[3] == 0:
    raise ValueError(f"v must have shape [B, T, H, V] with (B, T, H) = {(batch, seq_len, heads)} from q; "
                     f"got {tuple(v.shape)}.")
  for name, x in (("q", q), ("k", k), ("v", v)):
    _util.check_float_dtype(name, x.dtype)
  for name, x in (("k", k), ("v", v)):
    if x.dtype != q.dtype:
      raise ValueError(f"{name}: dtype {x.dtype} must equal q's dtype {q.dtype} (cast one of them).")
  if feature_map not in FEATURE_MAPS:
    raise ValueError(f"feature_map={feature_map!r} is unknown; choose one of {FEATURE_MAPS}.")
  key_dim = common.feature_dim(feature_map, k_dim)
  if log_decay is not None and log_gates is not None:
    raise ValueError("log_decay and log_gates: pass at most one (a fixed decay or data-dependent gates).")
  _check_shape("log_decay", log_decay, (heads,), "[H]")
  _check_shape("log_gates", log_gates, (batch, seq_len, heads, key_dim), "[B, T, H, K'] (K' = feature dim)")
  for name, x in (("log_decay", log_decay), ("log_gates", log_gates)):
    if x is not None and _is_concrete(x) and bool(np.any(np.asarray(x, np.float32) > 0)):
      raise ValueError(f"{name} must be <= 0 (log-space decay factors in (0, 1]); it has positive entries.")
  value_dim = v.shape[3] + (1 if normalize else 0)
  _check_shape("initial_state", initial_state, (batch, heads, key_dim, value_dim),
               "[B, H, K', V'] (V' = V + 1 when normalize)")
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0):
    raise ValueError(f"scale={scale!r} must be a positive number (or None for the default).")
  if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:
    raise ValueError(f"eps={eps!r} must be a positive number.")
  if not isinstance(normalize, (bool, np.bool_)):
    raise ValueError(f"normalize={normalize!r} must be a bool.")
  forms = FORMS.get(implementation, ("chunk",))
  if form is None:
    form = forms[0]
  elif form not in forms:
    raise ValueError(f"form={form!r} is not available for implementation={implementation!r}; choose one of "
                     f"{forms} (or None).")
  _util.check_block_arg("chunk_size", chunk_size)
  if implementation in _KERNELS:
    chunk_size = _KERNELS[implementation].resolve_chunk(chunk_size, seq_len, default=DEFAULT_CHUNK)
  elif form == "chunk":
    chunk_size = min(DEFAULT_CHUNK, seq_len) if chunk_size is None else chunk_size
  return form, chunk_size


def cost(q_shape, v_shape, *, dtype, feature_map="identity", log_decay=False, log_gates=False, normalize=False,
         chunk_size=None) -> dict:
  """Modelled cost of the TPU forward kernel (grid (B*H, chunks)) for q, k [B, T, H, K] and v [B, T, H, V] in
  `dtype`; `log_decay` / `log_gates`: whether a fixed decay / data-dependent gates are passed (at most one).

  `hbm_bytes` follows the BlockSpecs: every grid step reads its q, k [C, K_p], v [C, V_p] (and f32 log gates
  [C, Kg]) blocks and writes o [C, V_p]; the f32 initial and final states [K_p, V_p] move once per (batch, head).
  Padding (time to whole chunks, feature dims to the kernel's tiling) counts, as the kernel moves it.
  `ideal_bytes` reads q, k, v, the gates and the initial state and writes o and the final state once, unpadded.
  `flops`: the four chunk matmuls (q k^T, A v, q S, k^T v) plus the gate cumsum.
  """
  if len(q_shape) != 4:
    raise ValueError(f"q_shape must be [B, T, H, K]; got {tuple(q_shape)}.")
  if len(v_shape) != 4 or tuple(v_shape[:3]) != tuple(q_shape[:3]):
    raise ValueError(f"v_shape must be [B, T, H, V] with (B, T, H) of q_shape [B, T, H, K] = {tuple(q_shape)}; "
                     f"got {tuple(v_shape)}.")
  if log_decay and log_gates:
    raise ValueError("log_decay and log_gates: at most one is passed (a fixed decay or data-dependent gates).")
  (batch, seq_len, heads, k_dim), v_dim = q_shape, v_shape[3]
  key_dim = common.feature_dim(feature_map, k_dim)
  value_dim = v_dim + (1 if normalize else 0)
  chunk = tpu.resolve_chunk(chunk_size, seq_len, default=DEFAULT_CHUNK)
  k_pad, v_pad = tpu.feature_padding(key_dim, value_dim)
  gate_dim = 1 if log_decay else k_pad if log_gates else 0  # f32 gate columns per row the kernel reads
  padded_t = _util.round_up(seq_len, chunk)
  rows = batch * heads * padded_t
  itemsize = jnp.dtype(dtype).itemsize
  out_itemsize = 4 if normalize else itemsize
  state_bytes = 2 * batch * heads * k_pad * v_pad * 4
  moved = rows * ((2 * k_pad + v_pad) * itemsize + v_pad * out_itemsize + gate_dim * 4) + state_bytes
  real_rows = batch * heads * seq_len
  ideal_gates = 4 * (heads if log_decay else real_rows * key_dim if log_gates else 0)
  ideal = (real_rows * ((2 * k_dim + v_dim) * itemsize + v_dim * jnp.dtype(dtype).itemsize) + ideal_gates
           + 2 * batch * heads * key_dim * value_dim * 4)
  flops = rows * (2 * chunk * (k_pad + v_pad) + 4 * k_pad * v_pad + 2 * chunk * gate_dim)
  return {"flops": flops, "hbm_bytes": moved, "ideal_bytes": ideal}
