"""Triton-style GPU flash attention: forward (online softmax, saved log-sum-exp), dq kernel and dk/dv kernel.

Layout stays [B, T, H, D] (no transposes): each program holds one (query block, head) and walks the key blocks
of its kv head h // group in a `fori_loop` whose bounds are the visible range (causal/window block skipping by
loop bounds). D is zero-padded to a power of two >= 16 (`tl.arange` and `tl.dot` need it; zeros change no dot
product). The dk/dv program of a key block loops over the query heads of its group and their visible query
blocks, so dk/dv are accumulated per kv head in registers, never per query head in HBM.

Grids:  forward and dq  (B, H, T/bq);   dk/dv  (B, H_kv, S/bkv).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util
from pallas_kernels.flash_attention import _common

DEFAULT_BLOCKS = (64, 64)  # (block_q, block_kv)
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
MAX_HEAD_DIM = 256  # a [block, D] f32 accumulator per program must stay in registers


def _triton(head_dim_padded):
  # Selects Triton over Mosaic GPU; wider heads want more warps.
  return pltriton.CompilerParams(num_warps=4 if head_dim_padded <= 64 else 8, num_stages=2)


def resolve_blocks(q_len: int, kv_len: int, block_q=None, block_kv=None) -> tuple[int, int]:
  """(block_q, block_kv): powers of two >= 16, clamped to cover the sequence lengths."""
  return (_util.gpu_block("block_q", block_q, q_len, default=DEFAULT_BLOCKS[0], minimum=MIN_BLOCK),
          _util.gpu_block("block_kv", block_kv, kv_len, default=DEFAULT_BLOCKS[1], minimum=MIN_BLOCK))


def check_head_dim(head_dim: int) -> None:
  if head_dim > MAX_HEAD_DIM:
    raise ValueError(f"head_dim={head_dim} is not supported by the GPU (Triton) kernel (at most "
                     f"{MAX_HEAD_DIM}; D is padded to a power of two >= {MIN_BLOCK}).")


def padded_head_dim(head_dim: int) -> int:
  return max(MIN_BLOCK, _util.next_power_of_2(head_dim))


def _dot_nt(a, b):
  return jnp.dot(a, b.T, preferred_element_type=jnp.float32)


def _hide(x, fill, q_seg, kv_seg, i, j, g):
  """x [bq, bkv] with the hidden (query, key) pairs of tile (i, j) set to `fill`. Without segment ids the mask
  is only built on boundary tiles (diagonal, window edge, key padding): a `lax.cond` skips the iota/compare/
  select work on fully visible tiles."""
  def apply(x):
    segments = {} if q_seg is None else dict(q_segment=q_seg[:, None], kv_segment=kv_seg[None, :])
    return jnp.where(_common.visible(i * g.block_q, j * g.block_kv, x.shape, g, **segments), x, fill)
  if q_seg is not None:
    return apply(x)
  return lax.cond(_common.tile_needs_mask(i, j, g), apply, lambda x: x, x)


def _rows(start, size):
  return pl.ds(pl.multiple_of(start * size, size), size)


def _forward_kernel(q_ref, k_ref, v_ref, *refs, g, has_segments):
  (q_seg_ref, kv_seg_ref), (o_ref, lse_ref) = (refs[:2], refs[2:]) if has_segments else ((None, None), refs)
  i = pl.program_id(2)
  q = q_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]

  def step(j, carry):
    m, l, acc = carry
    kv_rows = _rows(j, g.block_kv)
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[kv_rows]
    s = _hide(_common.logits(_dot_nt(q, k_ref[kv_rows, :]), g), -jnp.inf, q_seg, kv_seg, i, j, g)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_next[:, None])
    alpha = jnp.exp(m - m_next)
    pv = jnp.dot(p.astype(v_ref.dtype), v_ref[kv_rows, :], preferred_element_type=jnp.float32)
    return m_next, alpha * l + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

  first, last = _common.kv_block_range(i, g)
  init = (jnp.full((g.block_q,), _common.MASK_VALUE, jnp.float32), jnp.zeros((g.block_q,), jnp.float32),
          jnp.zeros(o_ref.shape, jnp.float32))
  m, l, acc = lax.fori_loop(first, last + 1, step, init)
  out, lse = _common.finish(acc, m[:, None], l[:, None])
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _p_and_ds(q, k, v, do, lse, delta, q_seg, kv_seg, i, j, g):
  """P = exp(s - lse) (0 where masked) and dS w.r.t. the raw q.k products, both [bq, bkv] f32."""
  s = _common.logits(_dot_nt(q, k), g)
  p = _hide(jnp.exp(s - lse[:, None]), 0.0, q_seg, kv_seg, i, j, g)
  dp = _dot_nt(do, v)
  return p, _common.logits_grad(p * (dp - delta[:, None]), s, g)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, g, has_segments):
  (q_seg_ref, kv_seg_ref), (dq_ref,) = (refs[:2], refs[2:]) if has_segments else ((None, None), refs)
  i = pl.program_id(2)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]

  def step(j, dq):
    kv_rows = _rows(j, g.block_kv)
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[kv_rows]
    k = k_ref[kv_rows, :]
    _, ds = _p_and_ds(q, k, v_ref[kv_rows, :], do, lse, delta, q_seg, kv_seg, i, j, g)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  first, last = _common.kv_block_range(i, g)
  dq = lax.fori_loop(first, last + 1, step, jnp.zeros(dq_ref.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, g, group, has_segments):
  (q_seg_ref, kv_seg_ref), (dk_ref, dv_ref) = (refs[:2], refs[2:]) if has_segments else ((None, None), refs)
  j = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
  first, last = _common.q_block_range(j, g)
  dk = dv = jnp.zeros(dk_ref.shape, jnp.float32)
  for head in range(group):  # the query heads reading this kv head (static: group is small)
    def step(i, carry, head=head):
      dk, dv = carry
      q_rows = _rows(i, g.block_q)
      q, do = q_ref[q_rows, head, :], do_ref[q_rows, head, :]
      q_seg = None if q_seg_ref is None else q_seg_ref[q_rows]
      p, ds = _p_and_ds(q, k, v, do, lse_ref[head, q_rows], delta_ref[head, q_rows], q_seg, kv_seg, i, j, g)
      dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
      dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
      return dk, dv
    dk, dv = lax.fori_loop(first, jnp.minimum(last, g.num_q_blocks - 1) + 1, step, (dk, dv))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _prepare(q, k, v, q_seg, kv_seg, g):
  dp = padded_head_dim(q.shape[-1])
  batch = q.shape[0]
  operands = [_util.pad_to(q, (batch, g.padded_q_len, q.shape[2], dp)),
              _util.pad_to(k, (batch, g.padded_kv_len, k.shape[2], dp)),
              _util.pad_to(v, (batch, g.padded_kv_len, k.shape[2], dp))]
  segments = []
  if q_seg is not None:  # padding gets ids that no real key has
    segments = [jnp.pad(q_seg, ((0, 0), (0, g.padded_q_len - g.q_len)), constant_values=-1),
                jnp.pad(kv_seg, ((0, 0), (0, g.padded_kv_len - g.kv_len)), constant_values=-2)]
  return dp, operands, segments


def _q_major_specs(g, dp, group, has_segments):
  """BlockSpecs on the (b, h, i) grid of the forward and dq kernels; k/v (and kv ids) are whole sequences."""
  q_spec = pl.BlockSpec((None, g.block_q, None, dp), lambda b, h, i: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, g.padded_kv_len, None, dp), lambda b, h, i: (b, 0, h // group, 0))
  row_spec = pl.BlockSpec((None, None, g.block_q), lambda b, h, i: (b, h, i))
  segment_specs = [pl.BlockSpec((None, g.block_q), lambda b, h, i: (b, i)),
                   pl.BlockSpec((None, g.padded_kv_len), lambda b, h, i: (b, 0))]
  return q_spec, kv_spec, row_spec, segment_specs if has_segments else []


def forward(q, k, v, q_seg, kv_seg, *, geometry, interpret=False, cost_estimate=None):
  """(out [B, T, H, D] in q.dtype, lse [B, H, T] f32)."""
  g = geometry
  batch, _, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  dp, operands, segments = _prepare(q, k, v, q_seg, kv_seg, g)
  q_spec, kv_spec, row_spec, segment_specs = _q_major_specs(g, dp, group, bool(segments))
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, g=g, has_segments=bool(segments)),
      out_shape=(jax.ShapeDtypeStruct(operands[0].shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, g.padded_q_len), jnp.float32)),
      grid=(batch, num_heads, g.num_q_blocks),
      in_specs=[q_spec, kv_spec, kv_spec] + segment_specs,
      out_specs=(q_spec, row_spec),
      compiler_params=_triton(dp),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="flash_attention_forward",
  )(*operands, *segments)
  return out[:, :g.q_len, :, :head_dim], lse[:, :, :g.q_len]


def backward(q, k, v, q_seg, kv_seg, out, lse, do, *, geometry, interpret=False, dq_cost_estimate=None,
             dkv_cost_estimate=None):
  """(dq, dk, dv) in the dtypes of (q, k, v): the dq kernel, then the dk/dv kernel."""
  g = geometry
  batch, _, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  dp, (q_op, k_op, v_op), segments = _prepare(q, k, v, q_seg, kv_seg, g)
  do_op = _util.pad_to(do.astype(q.dtype), q_op.shape)
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # [B, H, T]
  pad_rows = ((0, 0), (0, 0), (0, g.padded_q_len - g.q_len))
  # Padding rows: lse = +inf makes P = 0 there, delta = 0 keeps dS finite.
  stats = [jnp.pad(lse, pad_rows, constant_values=jnp.inf), jnp.pad(delta, pad_rows)]
  has_segments = bool(segments)

  q_spec, kv_spec, row_spec, segment_specs = _q_major_specs(g, dp, group, has_segments)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, g=g, has_segments=has_segments),
      out_shape=jax.ShapeDtypeStruct(q_op.shape, q.dtype),
      grid=(batch, num_heads, g.num_q_blocks),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec] + segment_specs,
      out_specs=q_spec,
      compiler_params=_triton(dp),
      interpret=interpret,
      cost_estimate=dq_cost_estimate,
      name="flash_attention_dq",
  )(q_op, k_op, v_op, do_op, *stats, *segments)

  # dk/dv: one program per (b, kv head, key block) reading the whole query sequence of its head group.
  q_spec = pl.BlockSpec((None, g.padded_q_len, group, dp), lambda b, hk, j: (b, 0, hk, 0))
  kv_spec = pl.BlockSpec((None, g.block_kv, None, dp), lambda b, hk, j: (b, j, hk, 0))
  rows_spec = pl.BlockSpec((None, group, g.padded_q_len), lambda b, hk, j: (b, hk, 0))
  segment_specs = [pl.BlockSpec((None, g.padded_q_len), lambda b, hk, j: (b, 0)),
                   pl.BlockSpec((None, g.block_kv), lambda b, hk, j: (b, j))]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, g=g, group=group, has_segments=has_segments),
      out_shape=(jax.ShapeDtypeStruct(k_op.shape, k.dtype), jax.ShapeDtypeStruct(v_op.shape, v.dtype)),
      grid=(batch, num_kv_heads, g.num_kv_blocks),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, rows_spec, rows_spec] + (segment_specs if has_segments else []),
      out_specs=(kv_spec, kv_spec),
      compiler_params=_triton(dp),
      interpret=interpret,
      cost_estimate=dkv_cost_estimate,
      name="flash_attention_dkv",
  )(q_op, k_op, v_op, do_op, *stats, *segments)
  return (dq[:, :g.q_len, :, :head_dim], dk[:, :g.kv_len, :, :head_dim], dv[:, :g.kv_len, :, :head_dim])


# --- Decode: one query step per sequence against a KV cache [B, S_max, H_kv, D] with per-sequence lengths. ---
# Split-K: program (b, kv head, split) walks its share of the key blocks below lengths[b] (loop bounds skip the
# rest) for the whole query-head group at once (rows padded to 16 for tl.dot); the splits' partial
# (acc, max, sum) are merged in XLA. The cache is read in place, never padded: D must already be a power of
# two >= 16 and block_kv must divide S_max.
DECODE_BLOCK_CANDIDATES = (64, 32, 16)


def resolve_decode_block(kv_len: int, block_kv=None) -> int:
  block = _common.decode_block(kv_len, block_kv, DECODE_BLOCK_CANDIDATES)
  if block & (block - 1) or block < MIN_BLOCK:
    raise ValueError(f"block_kv={block} is illegal for the GPU (Triton) decode kernel: it must be a power of two "
                     f">= {MIN_BLOCK} dividing the cache length S_max={kv_len}.")
  return block


def check_decode_head_dim(head_dim: int) -> None:
  if head_dim != padded_head_dim(head_dim) or head_dim > MAX_HEAD_DIM:
    raise ValueError(f"head_dim={head_dim} is not supported by the GPU (Triton) decode kernel: the cache is read "
                     f"in place, so D must be a power of two in [{MIN_BLOCK}, {MAX_HEAD_DIM}].")


def _decode_kernel(lengths_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, g, blocks_per_split):
  split = pl.program_id(2)
  length = lengths_ref[()]
  q = q_ref[...]

  def step(j, carry):
    m, l, acc = carry
    rows = _rows(j, g.block_kv)
    s = _common.logits(_dot_nt(q, k_ref[rows, :]), g)
    valid = j * g.block_kv + jnp.arange(g.block_kv) < length
    s = jnp.where(valid[None, :], s, -jnp.inf)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_next[:, None])
    alpha = jnp.exp(m - m_next)
    v = jnp.where(valid[:, None], v_ref[rows, :], 0.0)  # rows past the length may hold anything (0 * NaN)
    pv = jnp.dot(p.astype(v_ref.dtype), v.astype(v_ref.dtype), preferred_element_type=jnp.float32)
    return m_next, alpha * l + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

  first = split * blocks_per_split
  stop = jnp.minimum(first + blocks_per_split, lax.div(length + g.block_kv - 1, g.block_kv))
  rows = q_ref.shape[0]
  init = (jnp.full((rows,), _common.MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros(acc_ref.shape, jnp.float32))
  m, l, acc = lax.fori_loop(first, stop, step, init)
  acc_ref[...], m_ref[...], l_ref[...] = acc, m, l


def decode(q, k_cache, v_cache, lengths, *, geometry, num_splits, interpret=False, cost_estimate=None):
  """q [B, H, D] against caches [B, S_max, H_kv, D] holding lengths[b] valid rows -> [B, H, D] in q.dtype."""
  g = geometry
  batch, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
  group = num_heads // num_kv_heads
  rows = max(MIN_BLOCK, _util.next_power_of_2(group))
  blocks_per_split = -(-(kv_len // g.block_kv) // num_splits)
  q_op = _util.pad_to(q.reshape(batch, num_kv_heads, group, head_dim), (batch, num_kv_heads, rows, head_dim))
  part = lambda *shape: pl.BlockSpec((None, None, None, *shape), lambda b, hk, s: (b, hk, s) + (0,) * len(shape))
  kv_spec = pl.BlockSpec((None, kv_len, None, head_dim), lambda b, hk, s: (b, 0, hk, 0))
  acc, m, l = pl.pallas_call(
      functools.partial(_decode_kernel, g=g, blocks_per_split=blocks_per_split),
      out_shape=(jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, rows, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, rows), jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, rows), jnp.float32)),
      grid=(batch, num_kv_heads, num_splits),
      in_specs=[pl.BlockSpec((None,), lambda b, hk, s: (b,)),
                pl.BlockSpec((None, None, rows, head_dim), lambda b, hk, s: (b, hk, 0, 0)), kv_spec, kv_spec],
      out_specs=(part(rows, head_dim), part(rows), part(rows)),
      compiler_params=_triton(head_dim),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="flash_decode",
  )(lengths, q_op, k_cache, v_cache)
  out = _common.combine_splits(acc, m[..., None], l[..., None], axis=2)  # [B, H_kv, rows, D]
  return out[:, :, :group].reshape(batch, num_heads, head_dim).astype(q.dtype)
