"""Mosaic-TPU paged decode: the page table and lengths are scalar-prefetched into SMEM and drive the BlockSpec
index maps, so each grid step DMAs exactly the pages it reads, straight from the shared page pool.

Layout: a pool array [num_pages, page_size, H_kv, last] is viewed as [num_pages, page_size, H_kv * last] (a
free reshape) and one block is one page holding every kv head. As in `flash_decode`, q is laid out
block-diagonally, q_bd [H, H_kv * w] with row h non-zero only in the lanes of kv head h // group, so
q_bd @ page.T gives every query head its logits and p @ page gives [H, H_kv * w] whose diagonal blocks are the
outputs (GQA without repeating K/V; H_kv-fold redundant FLOPs, decode is bound by reading pages). Quantized
pages are dequantized in VMEM: per-token scales/zeros [page_size, H_kv] are broadcast over each head's lanes
with H_kv selects, int4 bytes are split into their two nibble planes (see `_common`).

Grid (B, splits, steps): split s covers pages [s * steps * ppb, (s + 1) * steps * ppb) of the sequence, ppb
(pages_per_block) pages per step, each its own operand. Index maps clamp the page number to the sequence's
last valid page: steps past the length map to the block already resident, so the pipeline fetches nothing
for them (and `pl.when` skips their compute). The splits' partial (acc, max, sum) are merged in XLA.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import _common as flash_common
from pallas_kernels.paged_decode import _common

LANES = flash_common.LANES
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
DEFAULT_PAGES_PER_BLOCK = 1


def sublane_tile(dtype) -> int:
  """Rows of one Mosaic tile for `dtype`: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
  return 8 * (4 // jnp.dtype(dtype).itemsize)


def check_page_size(page_size: int, dtypes) -> None:
  tile = max(sublane_tile(d) for d in dtypes)
  if page_size % tile:
    raise ValueError(f"page_size={page_size} does not fit the TPU tiling: a page is one block whose rows must be "
                     f"a multiple of {tile} for pages of dtype(s) {sorted({jnp.dtype(d).name for d in dtypes})} "
                     f"(Mosaic tiles 32-bit rows by 8, 16-bit by 16, 8-bit by 32).")


def _page_planes(refs, name, bits, dtype):
  """A page's k or v as planes [page_size, H_kv * w] in `dtype` (dequantized in f32 first)."""
  if bits is None:
    return [refs[name][...]]
  codes = refs[name][...]
  width = codes.shape[1] // refs[f"{name}_scale"].shape[1]
  scale = flash_common.over_lanes(refs[f"{name}_scale"][...], width)
  zero = flash_common.over_lanes(refs[f"{name}_zero"][...].astype(jnp.int32), width)
  return [_common.dequantize(p, scale, zero).astype(dtype) for p in _common.code_planes(codes, bits)]


def _kernel(lengths_ref, table_ref, *refs, g, bits, pages_per_block, steps, max_pages, page_size):
  names = _common.names(bits)
  planes = _common.num_planes(bits)
  q_refs = refs[:planes]
  page_refs = refs[planes:planes + pages_per_block * len(names)]
  outs = refs[planes + pages_per_block * len(names):]
  acc_outs, m_out, l_out = outs[:planes], outs[planes], outs[planes + 1]
  scratch = outs[planes + 2:]
  acc_refs, m_ref, l_ref = scratch[:planes], scratch[planes], scratch[planes + 1]
  b, split, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = lengths_ref[b]

  @pl.when(t == 0)
  def _init():
    m_ref[...] = jnp.full_like(m_ref, flash_common.MASK_VALUE)
    l_ref[...] = jnp.zeros_like(l_ref)
    for acc in acc_refs:
      acc[...] = jnp.zeros_like(acc)

  for i in range(pages_per_block):
    page_no = (split * steps + t) * pages_per_block + i
    start = page_no * page_size
    refs_i = dict(zip(names, page_refs[i * len(names):(i + 1) * len(names)]))

    @pl.when((start < length) & (page_no < max_pages))
    def _compute():
      dtype = q_refs[0].dtype
      keys = _page_planes(refs_i, "k", bits, dtype)
      s = sum(lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32)
              for q_ref, k in zip(q_refs, keys))
      s = flash_common.logits(s, g)
      s = jnp.where(start + lax.broadcasted_iota(jnp.int32, s.shape, 1) < length, s, -jnp.inf)
      p, alpha = flash_common.online_softmax_update(s, m_ref, l_ref)
      for acc, v in zip(acc_refs, _page_planes(refs_i, "v", bits, dtype)):
        # Slots past the length may hold anything (a recycled page): zero them, as 0 * NaN = NaN.
        v = jnp.where(start + lax.broadcasted_iota(jnp.int32, v.shape, 0) < length, v, jnp.zeros_like(v))
        acc[...] = acc[...] * alpha[:, :1] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)

  @pl.when(t == pl.num_programs(2) - 1)
  def _finish():
    for out, acc in zip(acc_outs, acc_refs):
      out[...] = acc[...]
    m_out[...], l_out[...] = m_ref[...], l_ref[...]


def decode(q, pages: dict, page_table, lengths, *, geometry, bits, pages_per_block, num_splits, interpret=False,
           cost_estimate=None):
  """q [B, H, D] over paged k/v (`pages`: arrays [num_pages, page_size, H_kv, last]) -> [B, H, D] in q.dtype."""
  g = geometry
  names = _common.names(bits)
  batch, num_heads, head_dim = q.shape
  num_pages, page_size, num_kv_heads = pages["k"].shape[:3]
  max_pages = page_table.shape[1]
  steps = -(-max_pages // (pages_per_block * num_splits))
  q_planes = [flash_common.block_diagonal(x, num_kv_heads) for x in _common.split_head_dim(q, bits)]
  plane_lanes = q_planes[0].shape[-1]

  def page_index(i):
    def index(b, split, t, lengths_ref, table_ref):
      last = lax.div(jnp.maximum(lengths_ref[b] - 1, 0), page_size)  # clamp: pages past the length not fetched
      page_no = jnp.minimum((split * steps + t) * pages_per_block + i, jnp.minimum(last, max_pages - 1))
      page = jnp.clip(table_ref[b * max_pages + page_no], 0, num_pages - 1)  # never DMA outside the pool
      return (page, 0, 0)
    return index

  operands, in_specs = list(q_planes), [pl.BlockSpec((None, num_heads, plane_lanes),
                                                     lambda b, split, t, *_: (b, 0, 0))] * len(q_planes)
  for i in range(pages_per_block):
    for name in names:
      array = pages[name]
      operands.append(array.reshape(num_pages, page_size, -1))
      in_specs.append(pl.BlockSpec((None, page_size, operands[-1].shape[-1]), page_index(i)))
  planes = len(q_planes)
  out_shape, out_specs, scratch_shapes = flash_common.split_partials_tpu(batch, num_splits, num_heads, plane_lanes,
                                                                         planes)
  outs = pl.pallas_call(
      functools.partial(_kernel, g=g, bits=bits, pages_per_block=pages_per_block, steps=steps,
                        max_pages=max_pages, page_size=page_size),
      out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,  # lengths and the flattened page table in SMEM
          grid=(batch, num_splits, steps),
          in_specs=in_specs,
          out_specs=out_specs, scratch_shapes=scratch_shapes),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="paged_decode",
  )(lengths, page_table.reshape(-1), *operands)
  accs, m, l = outs[:planes], outs[planes][..., :1], outs[planes + 1][..., :1]
  results = [flash_common.diagonal_blocks(flash_common.combine_splits(acc, m, l, axis=1), num_kv_heads)
             for acc in accs]  # [B, H, w] each
  return jnp.concatenate(results, axis=-1).astype(q.dtype)
