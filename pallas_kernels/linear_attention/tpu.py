"""Mosaic-TPU chunked linear attention: forward and backward kernels on a (B*H, chunks) grid.

The chunk axis is sequential ("arbitrary"): the [K, V] state lives in a VMEM f32 scratch carried from chunk to
chunk, batch*heads are independent ("parallel", split across TensorCores). The forward writes the state entering
every chunk when the backward will need it (a [B*H, chunks, K, V] f32 residual: K*V*4 bytes per chunk, the size
of one f32 q when K = V = chunk); the backward visits the chunks in reverse (its index maps read chunk N-1-n) carrying dS, and the running
suffix sum of the gate gradient, in scratch.

Tiling decision: K and V are zero-padded to multiples of 128 (lane-dense tiles for every matmul, no masked
layouts; zero key/value columns change nothing) and a block spans the whole padded feature dim; the chunk is the
sublane dim of every time block, so it must be a multiple of 8. Matmul operands are the inputs' dtype (bf16 runs
natively on the MXU; f32 at HIGHEST precision) with f32 accumulation; a gated backward uses f32 operands
(`common.backward_matmul_dtype`). States, gate cumsums and elementwise math are f32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _util
from pallas_kernels.linear_attention import common

LANES, SUBLANES = 128, 8
VMEM_BUDGET_BYTES = 16 << 20  # the default scoped-VMEM limit on v5e; v4/v6e allow more
EXPAND_DECAY = False  # a fixed decay stays a [C, 1] column: the kernel uses the exact [C, C] decay matrix
_SEQUENTIAL_CHUNKS = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def resolve_chunk(chunk_size, seq_len: int, *, default: int) -> int:
  """The chunk length: a multiple of 8; the default is clamped to the sequence rounded up to 8."""
  _util.check_block_arg("chunk_size", chunk_size)
  if chunk_size is None:
    return min(default, _util.round_up(seq_len, SUBLANES))
  if chunk_size % SUBLANES:
    raise ValueError(f"chunk_size={chunk_size} is illegal for the TPU kernel: it must be a multiple of "
                     f"{SUBLANES} (the time rows of every block are Mosaic's sublanes).")
  return chunk_size


def feature_padding(k_dim: int, v_dim: int) -> tuple[int, int]:
  return _util.round_up(k_dim, LANES), _util.round_up(v_dim, LANES)


def vmem_estimate(chunk: int, k_dim: int, v_dim: int) -> int:
  """Bytes of VMEM the backward kernel (the larger of the two) needs, f32 throughout, padded dims: ~9 [K, V]
  tiles (dS scratch; saved state, final state, dS_T and dS_0 blocks double-buffered), double-buffered time blocks
  (q, k, dq, dk, v, dO, dv and the gates in and out), and ~6 [C, C] plus ~6 [C, max(K, V)] intermediates."""
  states = 9 * k_dim * v_dim
  time_blocks = 2 * chunk * (4 * k_dim + 3 * v_dim + 2 * k_dim)
  temporaries = 6 * chunk * chunk + 6 * chunk * max(k_dim, v_dim)
  return 4 * (states + time_blocks + temporaries)


def _check_tiling(chunk_size, padded_t, k_dim, v_dim):
  """Refuses a chunk that does not tile T' or Mosaic's sublanes, and shapes whose tiles overflow VMEM."""
  resolve_chunk(chunk_size, padded_t, default=chunk_size)
  if padded_t % chunk_size:
    raise ValueError(f"chunk_size={chunk_size} must divide the padded sequence length {padded_t}.")
  needed = vmem_estimate(chunk_size, k_dim, v_dim)
  if needed > VMEM_BUDGET_BYTES:
    raise ValueError(f"chunk_size={chunk_size} with q/k feature dim K'={k_dim} and v dim V={v_dim} (padded) needs "
                     f"~{needed / 2**20:.1f} MiB of VMEM, over the TPU kernel's {VMEM_BUDGET_BYTES >> 20} MiB "
                     f"budget; use a smaller chunk_size, head dim or feature map.")


def _f32(ref):
  return ref[...].astype(jnp.float32)


def _forward_kernel(*refs, has_gates: bool, save_states: bool):
  q_ref, k_ref, v_ref, *refs = refs
  g_ref = refs.pop(0) if has_gates else None
  s0_ref, out_ref, final_ref, *refs = refs
  states_ref = refs.pop(0) if save_states else None
  (state_ref,) = refs
  n = pl.program_id(1)

  @pl.when(n == 0)
  def _init():
    state_ref[...] = _f32(s0_ref)

  state = state_ref[...]
  if states_ref is not None:
    states_ref[...] = state  # the state entering this chunk, for the backward pass
  out, state = common.chunk_forward(_f32(q_ref), _f32(k_ref), _f32(v_ref), None if g_ref is None else g_ref[...],
                                    state, dtype=q_ref.dtype)
  out_ref[...] = out.astype(out_ref.dtype)
  state_ref[...] = state

  @pl.when(n == pl.num_programs(1) - 1)
  def _finish():
    final_ref[...] = state


def _backward_kernel(*refs, has_gates: bool):
  q_ref, k_ref, v_ref, *refs = refs
  g_ref = refs.pop(0) if has_gates else None
  state_ref, final_ref, d_out_ref, d_final_ref, dq_ref, dk_ref, dv_ref, *refs = refs
  dg_ref = refs.pop(0) if has_gates else None
  d_s0_ref, d_state_ref, *refs = refs
  carry_ref = refs[0] if has_gates else None
  n = pl.program_id(1)  # the n-th chunk from the end

  @pl.when(n == 0)
  def _init():
    d_state_ref[...] = d_final_ref[...]
    if has_gates:
      carry_ref[...] = common.gate_grad_init(final_ref[...], d_final_ref[...], g_ref.shape[-1])

  g = None if g_ref is None else g_ref[...]
  dq, dk, dv, d_state, gate_term = common.chunk_backward(
      _f32(q_ref), _f32(k_ref), _f32(v_ref), g, state_ref[...], _f32(d_out_ref), d_state_ref[...],
      dtype=common.backward_matmul_dtype(q_ref.dtype, has_gates))
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  d_state_ref[...] = d_state
  if has_gates:
    dg, carry_ref[...] = common.gate_grad_chunk(gate_term, carry_ref[...])
    dg_ref[...] = dg

  @pl.when(n == pl.num_programs(1) - 1)
  def _finish():
    d_s0_ref[...] = d_state


def _specs(chunk, k_dim, v_dim, gate_dim, num_chunks, *, reverse=False):
  """BlockSpecs for a time block of width k_dim, v_dim and gate_dim, and for one (b*h)'s state."""
  chunk_index = (lambda n: num_chunks - 1 - n) if reverse else (lambda n: n)
  time = lambda d: pl.BlockSpec((None, chunk, d), lambda i, n: (i, chunk_index(n), 0))
  state = pl.BlockSpec((None, k_dim, v_dim), lambda i, n: (i, 0, 0))  # resident across the chunk axis
  saved = pl.BlockSpec((None, None, k_dim, v_dim), lambda i, n: (i, chunk_index(n), 0, 0))
  return time(k_dim), time(v_dim), time(gate_dim), state, saved


def forward(q, k, v, gates, s0, *, chunk_size, out_dtype, save_states, interpret=False, cost_estimate=None):
  """q, k [BH, T', K], v [BH, T', V] (K, V multiples of 128, T' of chunk_size), f32 log gates [BH, T', Kg] or None,
  f32 s0 [BH, K, V] -> (o [BH, T', V] in out_dtype, final state [BH, K, V] f32, states entering each chunk
  [BH, T'/C, K, V] f32 or None)."""
  bh, padded_t, k_dim = q.shape
  v_dim = v.shape[-1]
  _check_tiling(chunk_size, padded_t, k_dim, v_dim)
  num_chunks = padded_t // chunk_size
  has_gates = gates is not None
  key_spec, value_spec, gate_spec, state_spec, saved_spec = _specs(
      chunk_size, k_dim, v_dim, gates.shape[-1] if has_gates else 1, num_chunks)
  operands = [q, k, v] + ([gates] if has_gates else []) + [s0]
  in_specs = [key_spec, key_spec, value_spec] + ([gate_spec] if has_gates else []) + [state_spec]
  out_shape = [jax.ShapeDtypeStruct((bh, padded_t, v_dim), out_dtype),
               jax.ShapeDtypeStruct((bh, k_dim, v_dim), jnp.float32)]
  out_specs = [value_spec, state_spec]
  if save_states:
    out_shape.append(jax.ShapeDtypeStruct((bh, num_chunks, k_dim, v_dim), jnp.float32))
    out_specs.append(saved_spec)
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, has_gates=has_gates, save_states=save_states),
      out_shape=tuple(out_shape),
      grid=(bh, num_chunks),
      in_specs=in_specs,
      out_specs=tuple(out_specs),
      scratch_shapes=[pltpu.VMEM((k_dim, v_dim), jnp.float32)],
      compiler_params=_SEQUENTIAL_CHUNKS,
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="linear_attention_forward",
  )(*operands)
  return outs[0], outs[1], (outs[2] if save_states else None)


def backward(q, k, v, gates, states, final, d_out, d_final, *, chunk_size, interpret=False):
  """Gradients of `forward` -> (dq, dk, dv in the inputs' dtypes, d log_gates [BH, T', Kg] f32 or None,
  d s0 [BH, K, V] f32), from the saved per-chunk states, the final state and the output cotangents."""
  bh, padded_t, k_dim = q.shape
  v_dim = v.shape[-1]
  _check_tiling(chunk_size, padded_t, k_dim, v_dim)
  num_chunks = padded_t // chunk_size
  has_gates = gates is not None
  gate_dim = gates.shape[-1] if has_gates else 1
  key_spec, value_spec, gate_spec, state_spec, saved_spec = _specs(
      chunk_size, k_dim, v_dim, gate_dim, num_chunks, reverse=True)
  operands = ([q, k, v] + ([gates] if has_gates else [])
              + [states, final, d_out, d_final.astype(jnp.float32)])
  in_specs = ([key_spec, key_spec, value_spec] + ([gate_spec] if has_gates else [])
              + [saved_spec, state_spec, value_spec, state_spec])
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
               jax.ShapeDtypeStruct(v.shape, v.dtype)]
  out_specs = [key_spec, key_spec, value_spec]
  if has_gates:
    out_shape.append(jax.ShapeDtypeStruct(gates.shape, jnp.float32))
    out_specs.append(gate_spec)
  out_shape.append(jax.ShapeDtypeStruct((bh, k_dim, v_dim), jnp.float32))
  out_specs.append(state_spec)
  scratch = [pltpu.VMEM((k_dim, v_dim), jnp.float32)]
  if has_gates:
    scratch.append(pltpu.VMEM((1, gate_dim), jnp.float32))  # suffix sum of the gate term over later chunks
  outs = pl.pallas_call(
      functools.partial(_backward_kernel, has_gates=has_gates),
      out_shape=tuple(out_shape),
      grid=(bh, num_chunks),
      in_specs=in_specs,
      out_specs=tuple(out_specs),
      scratch_shapes=scratch,
      compiler_params=_SEQUENTIAL_CHUNKS,
      interpret=interpret,
      name="linear_attention_backward",
  )(*operands)
  dq, dk, dv = outs[:3]
  return dq, dk, dv, (outs[3] if has_gates else None), outs[-1]
