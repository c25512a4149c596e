"""Triton-style GPU chunked linear attention: one program per (batch, head), looping over the chunks inside the
kernel with the [K, V] state carried in registers (forward) or dS and the gate-gradient suffix sum (backward,
chunks in reverse). Same per-chunk math as the TPU kernel (`common.chunk_forward` / `chunk_backward`).

Tiling decision: `tl.dot` needs power-of-two dims >= 16, so K and V are zero-padded up to one and the chunk must
be a power of two >= 16; a fixed decay is broadcast over K by the caller (`EXPAND_DECAY`), as a [C, 1] gate column
would need N = 1 matmuls. Parallelism is B*H programs, enough when B*H is at least the SM count; splitting V
across programs (dq, dk and the gate gradient then become partial sums) is the next step for small B*H.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util
from pallas_kernels.linear_attention import common

MIN_DIM = 16  # tl.dot needs every dimension >= 16
EXPAND_DECAY = True
_TRITON = pltriton.CompilerParams(num_warps=4, num_stages=1)  # selects Triton over Mosaic GPU


def resolve_chunk(chunk_size, seq_len: int, *, default: int) -> int:
  """The chunk length: a power of two >= 16; the default is clamped to the sequence's next power of two."""
  _util.check_block_arg("chunk_size", chunk_size)
  if chunk_size is None:
    return max(MIN_DIM, min(default, _util.next_power_of_2(seq_len)))
  if chunk_size & (chunk_size - 1) or chunk_size < MIN_DIM:
    raise ValueError(f"chunk_size={chunk_size} is illegal for the GPU (Triton) kernel: it must be a power of two "
                     f"and at least {MIN_DIM}.")
  return chunk_size


def feature_padding(k_dim: int, v_dim: int) -> tuple[int, int]:
  return max(MIN_DIM, _util.next_power_of_2(k_dim)), max(MIN_DIM, _util.next_power_of_2(v_dim))


def _check_tiling(chunk_size, padded_t):
  resolve_chunk(chunk_size, padded_t, default=chunk_size)
  if padded_t % chunk_size:
    raise ValueError(f"chunk_size={chunk_size} must divide the padded sequence length {padded_t}.")


def _rows(n, chunk):
  return pl.ds(pl.multiple_of(n * chunk, chunk), chunk)


def _load(ref, rows):
  return ref[rows, :].astype(jnp.float32)


def _forward_kernel(*refs, has_gates: bool, save_states: bool, chunk: int):
  q_ref, k_ref, v_ref, *refs = refs
  g_ref = refs.pop(0) if has_gates else None
  s0_ref, out_ref, final_ref, *refs = refs
  states_ref = refs[0] if save_states else None

  def step(n, state):
    rows = _rows(n, chunk)
    if states_ref is not None:
      states_ref[n] = state  # the state entering chunk n, for the backward pass
    out, state = common.chunk_forward(_load(q_ref, rows), _load(k_ref, rows), _load(v_ref, rows),
                                      None if g_ref is None else _load(g_ref, rows), state, dtype=q_ref.dtype)
    out_ref[rows, :] = out.astype(out_ref.dtype)
    return state

  final_ref[...] = lax.fori_loop(0, q_ref.shape[0] // chunk, step, s0_ref[...].astype(jnp.float32))


def _backward_kernel(*refs, has_gates: bool, chunk: int):
  q_ref, k_ref, v_ref, *refs = refs
  g_ref = refs.pop(0) if has_gates else None
  states_ref, final_ref, d_out_ref, d_final_ref, dq_ref, dk_ref, dv_ref, *refs = refs
  dg_ref = refs.pop(0) if has_gates else None
  (d_s0_ref,) = refs
  num_chunks = q_ref.shape[0] // chunk

  def step(i, carry):
    d_state, gate_carry = carry
    n = num_chunks - 1 - i  # chunks in reverse
    rows = _rows(n, chunk)
    dq, dk, dv, d_state, gate_term = common.chunk_backward(
        _load(q_ref, rows), _load(k_ref, rows), _load(v_ref, rows), None if g_ref is None else _load(g_ref, rows),
        states_ref[n], _load(d_out_ref, rows), d_state, dtype=common.backward_matmul_dtype(q_ref.dtype, has_gates))
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    if has_gates:
      dg, gate_carry = common.gate_grad_chunk(gate_term, gate_carry)
      dg_ref[rows, :] = dg
    return d_state, gate_carry

  d_final = d_final_ref[...]
  gate_carry = (common.gate_grad_init(final_ref[...], d_final, g_ref.shape[-1]) if has_gates
                else jnp.zeros((1, 1), jnp.float32))
  d_s0_ref[...], _ = lax.fori_loop(0, num_chunks, step, (d_final, gate_carry))


def _whole(shape):
  """The BlockSpec of one (b*h)'s whole slice of an array [BH, *shape]."""
  return pl.BlockSpec((None, *shape), lambda i: (i,) + (0,) * len(shape))


def forward(q, k, v, gates, s0, *, chunk_size, out_dtype, save_states, interpret=False, cost_estimate=None):
  """Same contract as `tpu.forward` (K, V padded by `feature_padding`, T' a multiple of chunk_size)."""
  bh, padded_t, k_dim = q.shape
  v_dim = v.shape[-1]
  _check_tiling(chunk_size, padded_t)
  num_chunks = padded_t // chunk_size
  has_gates = gates is not None
  operands = [q, k, v] + ([gates] if has_gates else []) + [s0]
  in_specs = ([_whole((padded_t, k_dim)), _whole((padded_t, k_dim)), _whole((padded_t, v_dim))]
              + ([_whole(gates.shape[1:])] if has_gates else []) + [_whole((k_dim, v_dim))])
  out_shape = [jax.ShapeDtypeStruct((bh, padded_t, v_dim), out_dtype),
               jax.ShapeDtypeStruct((bh, k_dim, v_dim), jnp.float32)]
  if save_states:
    out_shape.append(jax.ShapeDtypeStruct((bh, num_chunks, k_dim, v_dim), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, has_gates=has_gates, save_states=save_states, chunk=chunk_size),
      out_shape=tuple(out_shape),
      grid=(bh,),
      in_specs=in_specs,
      out_specs=tuple(_whole(shape.shape[1:]) for shape in out_shape),
      compiler_params=_TRITON,
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="linear_attention_forward",
  )(*operands)
  return outs[0], outs[1], (outs[2] if save_states else None)


def backward(q, k, v, gates, states, final, d_out, d_final, *, chunk_size, interpret=False):
  """Same contract as `tpu.backward`."""
  bh, padded_t, k_dim = q.shape
  v_dim = v.shape[-1]
  _check_tiling(chunk_size, padded_t)
  has_gates = gates is not None
  operands = ([q, k, v] + ([gates] if has_gates else [])
              + [states, final, d_out, d_final.astype(jnp.float32)])
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
               jax.ShapeDtypeStruct(v.shape, v.dtype)]
  if has_gates:
    out_shape.append(jax.ShapeDtypeStruct(gates.shape, jnp.float32))
  out_shape.append(jax.ShapeDtypeStruct((bh, k_dim, v_dim), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_backward_kernel, has_gates=has_gates, chunk=chunk_size),
      out_shape=tuple(out_shape),
      grid=(bh,),
      in_specs=[_whole(x.shape[1:]) for x in operands],
      out_specs=tuple(_whole(shape.shape[1:]) for shape in out_shape),
      compiler_params=_TRITON,
      interpret=interpret,
      name="linear_attention_backward",
  )(*operands)
  dq, dk, dv = outs[:3]
  return dq, dk, dv, (outs[3] if has_gates else None), outs[-1]
