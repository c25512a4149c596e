"""Mosaic-TPU flash attention: forward (online softmax, saved log-sum-exp), dq kernel and dk/dv kernel.

Layout: q [B, T, H, D] is viewed as [B, T, H * Dp] (a free reshape when D is a multiple of 128; otherwise D is
zero-padded to Dp = 128, which leaves q.k and P.v unchanged) and a block (bq, Dp) picks one head by its lane
index, so no transpose is ever materialised. K/V stay [B, S, H_kv * Dp]; the index map of query head h reads kv
head h // group (GQA without repeating K/V). Row statistics (running max, sum, lse, delta) are lane-replicated
[bq, 128] f32 tiles, the layout Mosaic handles natively. The kv axis is innermost ("arbitrary"); tiles that the
causal mask or the window hide entirely are skipped with `pl.when`, and their index maps are clamped to a visible
block so the pipeline does not fetch them either.

Grids:  forward and dq  (B, H, T/bq, S/bkv);   dk/dv  (B, H_kv, S/bkv, group * T/bq), accumulating the whole
query-head group of a kv head in VMEM (no per-query-head dk/dv in HBM).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _util
from pallas_kernels.flash_attention import _common

DEFAULT_BLOCKS = (128, 128)  # (block_q, block_kv): MXU-sized tiles; a few hundred KiB of VMEM at Dp = 128
LANES = 128
SUBLANES = 8
MAX_HEAD_DIM = 256  # q, k, v, do tiles double-buffered plus f32 accumulators stay well inside scoped VMEM
_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def resolve_blocks(q_len: int, kv_len: int, block_q=None, block_kv=None) -> tuple[int, int]:
  """(block_q, block_kv) checked against Mosaic's (8, 128) tiling: block_q is a sublane dim of the q/o tiles,
  block_kv the lane dim of the logits tile and of the kv segment ids."""
  return (_util.tpu_block("block_q", block_q, q_len, default=DEFAULT_BLOCKS[0], align=SUBLANES),
          _util.tpu_block("block_kv", block_kv, kv_len, default=DEFAULT_BLOCKS[1], align=LANES))


def check_head_dim(head_dim: int) -> None:
  if head_dim > MAX_HEAD_DIM:
    raise ValueError(f"head_dim={head_dim} is not supported by the TPU kernel (at most {MAX_HEAD_DIM}; "
                     f"D is padded to a multiple of {LANES}).")


def padded_head_dim(head_dim: int) -> int:
  return _util.round_up(head_dim, LANES)


def _heads_on_lanes(x, length, head_dim_padded):
  """[B, L, H, D] -> [B, length, H * Dp], zero-padded."""
  batch, _, heads, _ = x.shape
  return _util.pad_to(x, (batch, length, heads, head_dim_padded)).reshape(batch, length, heads * head_dim_padded)


def _segment_operands(q_seg, kv_seg, g):
  """q ids lane-replicated [B, T', 128] and kv ids sublane-replicated [B, 8, S'] (padding: ids no key has)."""
  q_seg = jnp.pad(q_seg, ((0, 0), (0, g.padded_q_len - g.q_len)), constant_values=-1)
  kv_seg = jnp.pad(kv_seg, ((0, 0), (0, g.padded_kv_len - g.kv_len)), constant_values=-2)
  return (jnp.broadcast_to(q_seg[:, :, None], (*q_seg.shape, LANES)),
          jnp.broadcast_to(kv_seg[:, None, :], (kv_seg.shape[0], SUBLANES, kv_seg.shape[1])))


def _tile(q_ref, k_ref, segment_refs, i, j, g, masked):
  """(capped f32 logits [bq, bkv], visibility mask or None for a tile known to be fully visible) of query
  block i against key block j."""
  s = _common.logits(lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32), g)
  if not masked:
    return s, None
  segments = {}
  if segment_refs:
    q_seg_ref, kv_seg_ref = segment_refs
    segments = dict(q_segment=q_seg_ref[...][:, :1], kv_segment=kv_seg_ref[...][:1, :])
  return s, _common.visible(i * g.block_q, j * g.block_kv, s.shape, g, **segments)


def _when_visible(i, j, g, has_segments, compute):
  """Runs `compute(masked)` for a visible tile: with the element mask on boundary tiles (the causal diagonal,
  window edge, key padding, or any tile when segment ids are given) and without it inside the visible region,
  which saves the iota/compare/select work on most tiles of a long causal sequence."""
  first, last = _common.kv_block_range(i, g)
  visible = (j >= first) & (j <= last)
  if has_segments:
    pl.when(visible)(lambda: compute(True))
    return
  needs_mask = _common.tile_needs_mask(i, j, g)
  pl.when(visible & needs_mask)(lambda: compute(True))
  pl.when(visible & jnp.logical_not(needs_mask))(lambda: compute(False))


def _forward_kernel(q_ref, k_ref, v_ref, *refs, g, has_segments):
  segment_refs, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = (refs[:2], refs[2:]) if has_segments else ((), refs)
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full_like(m_ref, _common.MASK_VALUE)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def compute(masked):
    s, ok = _tile(q_ref, k_ref, segment_refs, i, j, g, masked)
    if ok is not None:
      s = jnp.where(ok, s, -jnp.inf)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128], lanes equal
    p = jnp.exp(s - m_next[:, :1])
    alpha = jnp.exp(m_prev - m_next)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
    acc_ref[...] = acc_ref[...] * alpha[:, :1] + pv
    m_ref[...] = m_next

  _when_visible(i, j, g, has_segments, compute)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    out, lse = _common.finish(acc_ref[...], m_ref[...][:, :1], l_ref[...][:, :1])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _probabilities_and_ds(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segment_refs, i, j, g, masked):
  """P = exp(s - lse) (0 where masked) and dS w.r.t. the raw q.k products, both [bq, bkv] f32."""
  s, ok = _tile(q_ref, k_ref, segment_refs, i, j, g, masked)
  p = jnp.exp(s - lse_ref[...][:, :1])
  if ok is not None:
    p = jnp.where(ok, p, 0.0)
  dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
  return p, _common.logits_grad(p * (dp - delta_ref[...][:, :1]), s, g)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, g, has_segments):
  segment_refs, (dq_ref, acc_ref) = (refs[:2], refs[2:]) if has_segments else ((), refs)
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def compute(masked):
    _, ds = _probabilities_and_ds(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segment_refs, i, j, g,
                                  masked)
    acc_ref[...] += jnp.dot(ds.astype(k_ref.dtype), k_ref[...], preferred_element_type=jnp.float32)

  _when_visible(i, j, g, has_segments, compute)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, g, has_segments):
  segment_refs, (dk_ref, dv_ref, dk_acc, dv_acc) = (refs[:2], refs[2:]) if has_segments else ((), refs)
  j, r = pl.program_id(2), pl.program_id(3)
  i = lax.rem(r, g.num_q_blocks)  # r walks (query head of the group, query block)

  @pl.when(r == 0)
  def _init():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  def compute(masked):
    p, ds = _probabilities_and_ds(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segment_refs, i, j, g,
                                  masked)
    # Transpose in f32, then cast (as jax's own TPU kernel does): the layout Mosaic transposes best.
    dv_acc[...] += jnp.dot(p.T.astype(do_ref.dtype), do_ref[...], preferred_element_type=jnp.float32)
    dk_acc[...] += jnp.dot(ds.T.astype(q_ref.dtype), q_ref[...], preferred_element_type=jnp.float32)

  _when_visible(i, j, g, has_segments, compute)

  @pl.when(r == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _prepare(q, k, v, q_seg, kv_seg, g):
  head_dim_padded = padded_head_dim(q.shape[-1])
  operands = [_heads_on_lanes(q, g.padded_q_len, head_dim_padded),
              _heads_on_lanes(k, g.padded_kv_len, head_dim_padded),
              _heads_on_lanes(v, g.padded_kv_len, head_dim_padded)]
  segments = [] if q_seg is None else list(_segment_operands(q_seg, kv_seg, g))
  return head_dim_padded, operands, segments


def _row_stats(x, g, fill):
  """[B, H, T] f32 -> lane-replicated [B, H, T', 128], padding rows set to `fill`."""
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, 0), (0, g.padded_q_len - g.q_len)), constant_values=fill)
  return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def _q_major_specs(g, dp, group, has_segments):
  """BlockSpecs on the (b, h, i, j) grid of the forward and dq kernels: q-side blocks follow i, kv-side
  blocks follow the clamped j (the same block is re-used while j is outside the visible range)."""
  def kv_index(i, j):
    first, last = _common.kv_block_range(i, g)
    return _common.clamp_block(j, first, last, g.num_kv_blocks)

  q_spec = pl.BlockSpec((None, g.block_q, dp), lambda b, h, i, j: (b, i, h))
  kv_spec = pl.BlockSpec((None, g.block_kv, dp), lambda b, h, i, j: (b, kv_index(i, j), lax.div(h, group)))
  stats_spec = pl.BlockSpec((None, None, g.block_q, LANES), lambda b, h, i, j: (b, h, i, 0))
  segment_specs = [pl.BlockSpec((None, g.block_q, LANES), lambda b, h, i, j: (b, i, 0)),
                   pl.BlockSpec((None, SUBLANES, g.block_kv), lambda b, h, i, j: (b, 0, kv_index(i, j)))]
  return q_spec, kv_spec, stats_spec, segment_specs if has_segments else []


def forward(q, k, v, q_seg, kv_seg, *, geometry, interpret=False, cost_estimate=None):
  """(out [B, T, H, D] in q.dtype, lse [B, H, T] f32)."""
  g = geometry
  batch, _, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  dp, operands, segments = _prepare(q, k, v, q_seg, kv_seg, g)
  q_spec, kv_spec, stats_spec, segment_specs = _q_major_specs(g, dp, group, bool(segments))
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, g=g, has_segments=bool(segments)),
      out_shape=(jax.ShapeDtypeStruct(operands[0].shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, g.padded_q_len, LANES), jnp.float32)),
      grid=(batch, num_heads, g.num_q_blocks, g.num_kv_blocks),
      in_specs=[q_spec, kv_spec, kv_spec] + segment_specs,
      out_specs=(q_spec, stats_spec),
      scratch_shapes=[pltpu.VMEM((g.block_q, LANES), jnp.float32), pltpu.VMEM((g.block_q, LANES), jnp.float32),
                      pltpu.VMEM((g.block_q, dp), jnp.float32)],
      compiler_params=_SEMANTICS,
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="flash_attention_forward",
  )(*operands, *segments)
  out = out.reshape(batch, g.padded_q_len, num_heads, dp)[:, :g.q_len, :, :head_dim]
  return out, lse[:, :, :g.q_len, 0]


def backward(q, k, v, q_seg, kv_seg, out, lse, do, *, geometry, interpret=False, dq_cost_estimate=None,
             dkv_cost_estimate=None):
  """(dq, dk, dv) in the dtypes of (q, k, v): the dq kernel, then the dk/dv kernel."""
  g = geometry
  batch, _, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  group = num_heads // num_kv_heads
  dp, (q_op, k_op, v_op), segments = _prepare(q, k, v, q_seg, kv_seg, g)
  do_op = _heads_on_lanes(do.astype(q.dtype), g.padded_q_len, dp)
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # [B, H, T]
  # Padding rows: lse = +inf makes P = 0 there, delta = 0 keeps dS = 0 * (0 - 0) finite.
  stats = [_row_stats(lse, g, jnp.inf), _row_stats(delta, g, 0.0)]
  has_segments = bool(segments)

  q_spec, kv_spec, stats_spec, segment_specs = _q_major_specs(g, dp, group, has_segments)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, g=g, has_segments=has_segments),
      out_shape=jax.ShapeDtypeStruct(q_op.shape, q.dtype),
      grid=(batch, num_heads, g.num_q_blocks, g.num_kv_blocks),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, stats_spec, stats_spec] + segment_specs,
      out_specs=q_spec,
      scratch_shapes=[pltpu.VMEM((g.block_q, dp), jnp.float32)],
      compiler_params=_SEMANTICS,
      interpret=interpret,
      cost_estimate=dq_cost_estimate,
      name="flash_attention_dq",
  )(q_op, k_op, v_op, do_op, *stats, *segments)

  # dk/dv grid (b, kv head, j, r): r = (query head within the group) * num_q_blocks + query block.
  def q_index(j, r):
    first, last = _common.q_block_range(j, g)
    return _common.clamp_block(lax.rem(r, g.num_q_blocks), first, last, g.num_q_blocks)

  def q_head(hk, r):
    return hk * group + lax.div(r, g.num_q_blocks)

  q_spec = pl.BlockSpec((None, g.block_q, dp), lambda b, hk, j, r: (b, q_index(j, r), q_head(hk, r)))
  kv_spec = pl.BlockSpec((None, g.block_kv, dp), lambda b, hk, j, r: (b, j, hk))
  stats_spec = pl.BlockSpec((None, None, g.block_q, LANES),
                            lambda b, hk, j, r: (b, q_head(hk, r), q_index(j, r), 0))
  segment_specs = [pl.BlockSpec((None, g.block_q, LANES), lambda b, hk, j, r: (b, q_index(j, r), 0)),
                   pl.BlockSpec((None, SUBLANES, g.block_kv), lambda b, hk, j, r: (b, 0, j))]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, g=g, has_segments=has_segments),
      out_shape=(jax.ShapeDtypeStruct(k_op.shape, k.dtype), jax.ShapeDtypeStruct(v_op.shape, v.dtype)),
      grid=(batch, num_kv_heads, g.num_kv_blocks, group * g.num_q_blocks),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, stats_spec, stats_spec] + (segment_specs if has_segments else []),
      out_specs=(kv_spec, kv_spec),
      scratch_shapes=[pltpu.VMEM((g.block_kv, dp), jnp.float32), pltpu.VMEM((g.block_kv, dp), jnp.float32)],
      compiler_params=_SEMANTICS,
      interpret=interpret,
      cost_estimate=dkv_cost_estimate,
      name="flash_attention_dkv",
  )(q_op, k_op, v_op, do_op, *stats, *segments)

  def unpad(x, length, heads):
    return x.reshape(batch, -1, heads, dp)[:, :length, :, :head_dim]
  return unpad(dq, g.q_len, num_heads), unpad(dk, g.kv_len, num_kv_heads), unpad(dv, g.kv_len, num_kv_heads)


def visited_tiles(g) -> list[int]:
  """Number of kv blocks each query block visits (what block skipping leaves)."""
  counts = []
  for i in range(g.num_q_blocks):
    first, last = (int(x) for x in _common.kv_block_range(i, g))
    counts.append(max(last - first + 1, 0))
  return counts


def cost(g, batch, num_heads, num_kv_heads, head_dim, itemsize, *, segment_ids=False, backward=False) -> dict:
  """See `pallas_kernels.flash_attention.cost`."""
  parts = kernel_costs(g, batch, num_heads, num_kv_heads, head_dim, itemsize, segment_ids=segment_ids)
  kernels = ("forward", "dq", "dkv") if backward else ("forward",)
  total = {key: sum(parts[name][key] for name in kernels) for key in ("flops", "hbm_bytes")}
  ideal = (2 * batch * g.q_len * num_heads + 2 * batch * g.kv_len * num_kv_heads) * head_dim * itemsize
  if backward:
    ideal += (3 * batch * g.q_len * num_heads + 2 * batch * g.kv_len * num_kv_heads) * head_dim * itemsize
  return {**total, "ideal_bytes": int(ideal)}


def kernel_costs(g, batch, num_heads, num_kv_heads, head_dim, itemsize, *, segment_ids=False) -> dict:
  """{'forward' | 'dq' | 'dkv': {'flops', 'hbm_bytes'}}: each kernel's share of `cost` (its `pl.CostEstimate`)."""
  dp = padded_head_dim(head_dim)
  tiles = visited_tiles(g)
  visited = sum(tiles)
  fetched = sum(max(t, 1) for t in tiles)  # a query block that sees nothing still fetches its clamped kv block
  heads = batch * num_heads
  q_rows = g.padded_q_len
  tile_bytes = g.block_kv * dp * itemsize
  stats_bytes = q_rows * LANES * 4
  seg_q, seg_kv = (q_rows * LANES * 4, SUBLANES * g.block_kv * 4) if segment_ids else (0, 0)
  tile_flops = 2 * g.block_q * g.block_kv * dp
  # Forward: q read and o written once per row block, k and v per fetched tile, lse written lane-replicated.
  forward_bytes = heads * (2 * q_rows * dp * itemsize + fetched * (2 * tile_bytes + seg_kv) + stats_bytes + seg_q)
  # dq kernel: q, do read and dq written once per row block, lse and delta read, k and v per fetched tile.
  dq_bytes = heads * (3 * q_rows * dp * itemsize + 2 * stats_bytes + seg_q + fetched * (2 * tile_bytes + seg_kv))
  # dk/dv kernel: k, v read and dk, dv written once per kv block; q, do, lse, delta (and q segment ids) per
  # visited tile (an invisible step re-uses its clamped block).
  kv_rows = g.padded_kv_len
  per_q_tile = (2 * g.block_q * dp * itemsize + 2 * g.block_q * LANES * 4
                + (g.block_q * LANES * 4 if segment_ids else 0))
  dkv_bytes = (batch * num_kv_heads * 4 * kv_rows * dp * itemsize + heads * visited * per_q_tile
               + batch * num_kv_heads * g.num_kv_blocks * seg_kv)
  flops = {"forward": 2, "dq": 3, "dkv": 4}  # matmuls per visited tile: s, pv; s, dp, dq; s, dp, dv, dk
  moved = {"forward": forward_bytes, "dq": dq_bytes, "dkv": dkv_bytes}
  return {name: {"flops": int(heads * visited * flops[name] * tile_flops), "hbm_bytes": int(moved[name])}
          for name in moved}


# --- Decode: one query step per sequence against a KV cache [B, S_max, H_kv, D] with per-sequence lengths. ---
# The cache is read in place as [B, S_max, H_kv * D] (a free reshape), every block holding all kv heads, so any
# D works without padding the cache. The query is laid out block-diagonally, q_bd [H, H_kv * D] with row h
# non-zero only in the lanes of kv head h // group: q_bd @ k_block.T gives every query head its own logits,
# and p @ v_block gives [H, H_kv * D] whose diagonal blocks are the outputs. That spends H_kv times the
# (tiny) decode FLOPs to keep every matmul lane-aligned; decode is bound by reading the cache.
DECODE_BLOCK_CANDIDATES = (512, 256, 128, 64, 32, 16, 8)


def resolve_decode_block(kv_len: int, block_kv=None) -> int:
  block = _common.decode_block(kv_len, block_kv, DECODE_BLOCK_CANDIDATES)
  if block != kv_len and block % SUBLANES:
    raise ValueError(f"block_kv={block} is illegal for the TPU decode kernel: it must be a multiple of "
                     f"{SUBLANES} (Mosaic tiles blocks by (8, 128)) or the whole cache length ({kv_len}).")
  return block


def _decode_kernel(lengths_ref, q_ref, k_ref, v_ref, acc_out, m_out, l_out, m_ref, l_ref, acc_ref, *, g,
                   blocks_per_split, num_blocks):
  b, split, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  block = split * blocks_per_split + t
  start = block * g.block_kv
  length = lengths_ref[b]

  @pl.when(t == 0)
  def _init():
    m_ref[...] = jnp.full_like(m_ref, _common.MASK_VALUE)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when((start < length) & (block < num_blocks))
  def _compute():
    s = _common.logits(lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32), g)
    ok = start + lax.broadcasted_iota(jnp.int32, s.shape, 1) < length
    s = jnp.where(ok, s, -jnp.inf)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_next[:, :1])
    alpha = jnp.exp(m_prev - m_next)
    # Rows past the length may hold anything (stale or uninitialised cache): zero them, as 0 * NaN = NaN.
    v = v_ref[...]
    v = jnp.where(start + lax.broadcasted_iota(jnp.int32, v.shape, 0) < length, v, jnp.zeros_like(v))
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = acc_ref[...] * alpha[:, :1] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    m_ref[...] = m_next

  @pl.when(t == pl.num_programs(2) - 1)
  def _finish():
    acc_out[...], m_out[...], l_out[...] = acc_ref[...], m_ref[...], l_ref[...]


def decode(q, k_cache, v_cache, lengths, *, geometry, num_splits, interpret=False, cost_estimate=None):
  """q [B, H, D] against caches [B, S_max, H_kv, D] holding lengths[b] valid rows -> [B, H, D] in q.dtype."""
  g = geometry
  batch, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
  group = num_heads // num_kv_heads
  lanes = num_kv_heads * head_dim
  num_blocks = kv_len // g.block_kv
  blocks_per_split = -(-num_blocks // num_splits)
  # q_bd[b, h, kk * D + d] = q[b, h, d] if kk == h // group else 0
  owner = jnp.arange(num_heads) // group
  q_bd = jnp.where((owner[:, None] == jnp.arange(num_kv_heads)[None, :])[None, :, :, None],
                   q[:, :, None, :], jnp.zeros((), q.dtype)).reshape(batch, num_heads, lanes)

  def kv_index(b, split, t, lengths_ref):
    last = lax.div(jnp.maximum(lengths_ref[b] - 1, 0), g.block_kv)  # clamp: blocks past the length are not fetched
    return (b, jnp.minimum(split * blocks_per_split + t, last), 0)

  kv_spec = pl.BlockSpec((None, g.block_kv, lanes), kv_index)
  def part_spec(width):  # one split's partial result
    return pl.BlockSpec((None, None, num_heads, width), lambda b, split, t, lengths_ref: (b, split, 0, 0))
  stats_shape = jax.ShapeDtypeStruct((batch, num_splits, num_heads, LANES), jnp.float32)
  acc, m, l = pl.pallas_call(
      functools.partial(_decode_kernel, g=g, blocks_per_split=blocks_per_split, num_blocks=num_blocks),
      out_shape=(jax.ShapeDtypeStruct((batch, num_splits, num_heads, lanes), jnp.float32), stats_shape, stats_shape),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,  # lengths in SMEM, read by the index maps and the kernel
          grid=(batch, num_splits, blocks_per_split),
          in_specs=[pl.BlockSpec((None, num_heads, lanes), lambda b, split, t, lengths_ref: (b, 0, 0)),
                    kv_spec, kv_spec],
          out_specs=(part_spec(lanes), part_spec(LANES), part_spec(LANES)),
          scratch_shapes=[pltpu.VMEM((num_heads, LANES), jnp.float32), pltpu.VMEM((num_heads, LANES), jnp.float32),
                          pltpu.VMEM((num_heads, lanes), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="flash_decode",
  )(lengths, q_bd, k_cache.reshape(batch, kv_len, lanes), v_cache.reshape(batch, kv_len, lanes))
  out = _common.combine_splits(acc, m[..., :1], l[..., :1], axis=1)  # [B, H, H_kv * D]
  out = out.reshape(batch, num_kv_heads, group, num_kv_heads, head_dim)
  heads = jnp.arange(num_kv_heads)
  out = out[:, heads, :, heads, :].transpose(1, 0, 2, 3)  # the diagonal blocks: [B, H_kv, group, D]
  return out.reshape(batch, num_heads, head_dim).astype(q.dtype)


def decode_cost(batch, kv_len, length, num_heads, num_kv_heads, head_dim, itemsize, *, block_kv, num_splits):
  """Modelled cost of `decode` with every sequence holding `length` rows (see flash_attention.cost_decode)."""
  lanes = num_kv_heads * head_dim
  fetched_rows = max(1, -(-length // block_kv)) * block_kv
  moved = batch * (num_heads * lanes * itemsize + 2 * fetched_rows * lanes * itemsize
                   + num_splits * num_heads * (lanes + 2 * LANES) * 4)
  ideal = batch * (2 * num_heads * head_dim * itemsize + 2 * length * lanes * itemsize)
  flops = batch * 4 * num_heads * lanes * fetched_rows
  return {"flops": int(flops), "hbm_bytes": int(moved), "ideal_bytes": int(ideal)}
