"""Memory-linear flash attention in plain XLA: online softmax over key chunks, never a T x S buffer.

Forward: `lax.map` over query chunks, each a `lax.scan` over key chunks carrying the running max, sum and f32
accumulator; the log-sum-exp is returned for the backward. Backward (FlashAttention-2 style, wired by the
custom VJP in `__init__`): a scan over key chunks, each an inner scan over query chunks that recomputes P from the
saved log-sum-exp, accumulates dK/dV for the key chunk and emits dQ contributions. Chunk pairs that the causal
mask or the window hide entirely are skipped with `lax.cond`. The largest temporary is one
[B, H, chunk_q, chunk_kv] tile plus O(T) arrays, so memory grows linearly in T.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels import _util
from pallas_kernels.flash_attention import _common

DEFAULT_BLOCKS = (512, 512)  # (chunk_q, chunk_kv): a [B, H, 512, 512] f32 tile is 1 MiB per batch-head


def resolve_blocks(q_len: int, kv_len: int, block_q=None, block_kv=None) -> tuple[int, int]:
  """Any positive chunk sizes are legal here; they are clamped to the sequence lengths."""
  _util.check_block_arg("block_q", block_q)
  _util.check_block_arg("block_kv", block_kv)
  return (min(block_q or DEFAULT_BLOCKS[0], q_len), min(block_kv or DEFAULT_BLOCKS[1], kv_len))


def _chunks(x, num, size, fill=0):
  """[B, L, ...] zero-padded (or `fill`-padded) to num * size and split to [num, B, size, ...]."""
  pad = [(0, 0), (0, num * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
  x = jnp.pad(x, pad, constant_values=fill)
  return x.reshape(x.shape[0], num, size, *x.shape[2:]).swapaxes(0, 1)


def _unchunk(x, length):
  """[num, B, size, ...] -> [B, length, ...] (drops padding)."""
  x = x.swapaxes(0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _grouped(q, num_kv_heads):
  """[B, T, H, D] -> [B, T, H_kv, G, D]: query heads grouped under the kv head they read (no K/V copies)."""
  return q.reshape(*q.shape[:2], num_kv_heads, q.shape[2] // num_kv_heads, q.shape[3])


def _tile_logits(q_i, k_j, i, j, qseg_i, kvseg_j, g):
  """(capped logits [B, H_kv, G, bq, bkv] in f32, visibility mask broadcastable to it) for one chunk pair."""
  s = _common.logits(jnp.einsum("bqkgd,bskd->bkgqs", q_i, k_j, preferred_element_type=jnp.float32), g)
  segments = {}
  if qseg_i is not None:
    segments = dict(q_segment=qseg_i[:, None, None, :, None], kv_segment=kvseg_j[:, None, None, None, :])
  ok = _common.visible(i * g.block_q, j * g.block_kv, (g.block_q, g.block_kv), g, **segments)
  return s, ok


def _is_visible(i, j, g):
  first, last = _common.kv_block_range(i, g)
  return (j >= first) & (j <= last)


def _split_inputs(q, k, v, q_seg, kv_seg, g):
  num_kv_heads = k.shape[2]
  qs = _chunks(_grouped(q, num_kv_heads), g.num_q_blocks, g.block_q)
  ks, vs = (_chunks(x, g.num_kv_blocks, g.block_kv) for x in (k, v))
  qsegs = None if q_seg is None else _chunks(q_seg, g.num_q_blocks, g.block_q, fill=-1)
  kvsegs = None if kv_seg is None else _chunks(kv_seg, g.num_kv_blocks, g.block_kv, fill=-2)
  return qs, ks, vs, qsegs, kvsegs


def forward(q, k, v, q_seg, kv_seg, *, geometry, interpret=None):
  """(out [B, T, H, D] in q.dtype, lse [B, H, T] f32) for q [B, T, H, D], k/v [B, S, H_kv, D]."""
  del interpret
  g = geometry
  batch, _, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  qs, ks, vs, qsegs, kvsegs = _split_inputs(q, k, v, q_seg, kv_seg, g)
  stats_shape = (batch, num_kv_heads, group, g.block_q)

  def one_q_chunk(xs):
    i, q_i, qseg_i = xs

    def step(carry, kv_xs):
      j, k_j, v_j, kvseg_j = kv_xs

      def compute(carry):
        m, l, acc = carry
        s, ok = _tile_logits(q_i, k_j, i, j, qseg_i, kvseg_j, g)
        s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
        return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

      return lax.cond(_is_visible(i, j, g), compute, lambda c: c, carry), None

    init = (jnp.full(stats_shape, _common.MASK_VALUE, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32))
    (m, l, acc), _ = lax.scan(step, init, (jnp.arange(g.num_kv_blocks), ks, vs, kvsegs))
    out, lse = _common.finish(acc, m[..., None], l[..., None])
    return out.astype(q.dtype), lse[..., 0]

  outs, lses = lax.map(one_q_chunk, (jnp.arange(g.num_q_blocks), qs, qsegs))
  # outs [nq, B, H_kv, G, bq, D] -> [B, T, H, D];  lses [nq, B, H_kv, G, bq] -> [B, H, T]
  out = _unchunk(outs.transpose(0, 1, 4, 2, 3, 5), g.q_len).reshape(batch, g.q_len, num_heads, head_dim)
  lse = _unchunk(lses.transpose(0, 1, 4, 2, 3), g.q_len).reshape(batch, g.q_len, num_heads).transpose(0, 2, 1)
  return out, lse


def backward(q, k, v, q_seg, kv_seg, out, lse, do, *, geometry, interpret=None):
  """(dq, dk, dv) in the dtypes of (q, k, v) given the forward's out, lse [B, H, T] and the cotangent do."""
  del interpret
  g = geometry
  batch, _, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  qs, ks, vs, qsegs, kvsegs = _split_inputs(q, k, v, q_seg, kv_seg, g)
  dos = _chunks(_grouped(do, num_kv_heads), g.num_q_blocks, g.block_q)
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, H]: rowsum(dO * O)
  deltas = _chunks(_grouped(delta[..., None], num_kv_heads)[..., 0], g.num_q_blocks, g.block_q)
  # Padded query rows get lse = +inf, so exp(s - lse) = 0 there.
  lses = _chunks(_grouped(lse.transpose(0, 2, 1)[..., None], num_kv_heads)[..., 0], g.num_q_blocks,
                 g.block_q, fill=jnp.inf)

  def one_kv_chunk(dq, kv_xs):
    j, k_j, v_j, kvseg_j = kv_xs

    def q_step(dkv, q_xs):
      i, q_i, do_i, lse_i, delta_i, qseg_i = q_xs

      def compute(dkv):
        dk, dv = dkv
        s, ok = _tile_logits(q_i, k_j, i, j, qseg_i, kvseg_j, g)
        lse_t, delta_t = (x.transpose(0, 2, 3, 1)[..., None] for x in (lse_i, delta_i))  # [B, H_kv, G, bq, 1]
        p = jnp.where(ok, jnp.exp(s - lse_t), 0.0)
        dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
        ds = _common.logits_grad(p * (dp - delta_t), s, g)
        dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(q_i.dtype), q_i, preferred_element_type=jnp.float32)
        return (dk, dv), dq_i

      def skip(dkv):
        return dkv, jnp.zeros(q_i.shape, jnp.float32)

      return lax.cond(_is_visible(i, j, g), compute, skip, dkv)

    zeros = jnp.zeros((batch, g.block_kv, num_kv_heads, head_dim), jnp.float32)
    (dk, dv), dq_parts = lax.scan(q_step, (zeros, zeros),
                                  (jnp.arange(g.num_q_blocks), qs, dos, lses, deltas, qsegs))
    return dq + dq_parts, (dk, dv)

  dq, (dks, dvs) = lax.scan(one_kv_chunk, jnp.zeros(qs.shape, jnp.float32),
                            (jnp.arange(g.num_kv_blocks), ks, vs, kvsegs))
  dq = _unchunk(dq, g.q_len).reshape(q.shape)
  return dq.astype(q.dtype), _unchunk(dks, g.kv_len).astype(k.dtype), _unchunk(dvs, g.kv_len).astype(v.dtype)
