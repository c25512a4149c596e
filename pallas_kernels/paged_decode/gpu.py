"""Triton-style GPU paged decode: each program reads its sequence's pages by dynamic index from the pool.

Grid (B, H_kv, splits): a program holds the whole query-head group of one kv head (rows padded to 16 for
tl.dot) and walks its split's pages in a `fori_loop` whose bound stops at the sequence's last valid page, so
pages past the length are never read. Each page is loaded as `pool[page_table[b, j]]` ([page_size, w] for its
kv head; the pool is passed whole, never copied); quantized pages are dequantized in registers (int4: two
nibble planes, see `_common`). The splits' partial (acc, max, sum) are merged in XLA.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util
from pallas_kernels.flash_attention import _common as flash_common
from pallas_kernels.paged_decode import _common

MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
MAX_HEAD_DIM = 256


def check_page_size(page_size: int) -> None:
  if page_size < MIN_BLOCK or page_size & (page_size - 1):
    raise ValueError(f"page_size={page_size} does not fit the GPU (Triton) kernel: a page is one tl.dot operand, "
                     f"so it must be a power of two >= {MIN_BLOCK}.")


def check_head_dim(head_dim: int, bits) -> None:
  width = head_dim // _common.num_planes(bits)
  if width < MIN_BLOCK or width & (width - 1) or head_dim > MAX_HEAD_DIM:
    raise ValueError(f"head_dim={head_dim} is not supported by the GPU (Triton) paged decode kernel: pages are read "
                     f"in place, so each packed plane (head_dim / {_common.num_planes(bits)}) must be a power of two "
                     f">= {MIN_BLOCK} and head_dim <= {MAX_HEAD_DIM}.")


def _page_planes(refs, name, page, bits, dtype):
  if bits is None:
    return [refs[name][page]]
  scale, zero = refs[f"{name}_scale"][page], refs[f"{name}_zero"][page]  # [page_size, 1]
  return [_common.dequantize(p, scale, zero).astype(dtype) for p in _common.code_planes(refs[name][page], bits)]


def _kernel(lengths_ref, table_ref, *refs, g, bits, pages_per_block, pages_per_split, page_size):
  names = _common.names(bits)
  planes = _common.num_planes(bits)
  q_refs, page_refs = refs[:planes], dict(zip(names, refs[planes:planes + len(names)]))
  acc_outs, m_out, l_out = refs[planes + len(names):-2], refs[-2], refs[-1]
  split = pl.program_id(2)
  length = lengths_ref[()]
  qs = [q_ref[...] for q_ref in q_refs]
  dtype = qs[0].dtype

  def one_page(page_no, carry):
    m, l, accs = carry
    page = jnp.clip(table_ref[page_no], 0, page_refs["k"].shape[0] - 1)  # never read outside the pool
    s = sum(jnp.dot(q, k.T, preferred_element_type=jnp.float32)
            for q, k in zip(qs, _page_planes(page_refs, "k", page, bits, dtype)))
    s = flash_common.logits(s, g)
    valid = page_no * page_size + jnp.arange(page_size) < length
    s = jnp.where(valid[None, :], s, -jnp.inf)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_next[:, None])
    alpha = jnp.exp(m - m_next)
    new_accs = []
    for acc, v in zip(accs, _page_planes(page_refs, "v", page, bits, dtype)):
      v = jnp.where(valid[:, None], v, jnp.zeros((), v.dtype))  # a recycled page's tail may hold anything
      new_accs.append(acc * alpha[:, None] + jnp.dot(p.astype(dtype), v, preferred_element_type=jnp.float32))
    return m_next, alpha * l + jnp.sum(p, axis=1), tuple(new_accs)

  def step(j, carry):
    for i in range(pages_per_block):  # unrolled: the block's pages' loads can be in flight together
      page_no = j * pages_per_block + i
      carry = lax.cond(page_no * page_size < length, lambda c: one_page(page_no, c), lambda c: c, carry)
    return carry

  first = split * pages_per_split
  valid_pages = lax.div(length + page_size - 1, page_size)
  stop = lax.div(jnp.minimum(first + pages_per_split, valid_pages) + pages_per_block - 1, pages_per_block)
  rows = qs[0].shape[0]
  init = (jnp.full((rows,), flash_common.MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
          tuple(jnp.zeros(out.shape, jnp.float32) for out in acc_outs))
  m, l, accs = lax.fori_loop(lax.div(first, pages_per_block), stop, step, init)
  for out, acc in zip(acc_outs, accs):
    out[...] = acc
  m_out[...], l_out[...] = m, l


def decode(q, pages: dict, page_table, lengths, *, geometry, bits, pages_per_block, num_splits, interpret=False,
           cost_estimate=None):
  """q [B, H, D] over paged k/v (`pages`: arrays [num_pages, page_size, H_kv, last]) -> [B, H, D] in q.dtype."""
  g = geometry
  names = _common.names(bits)
  batch, num_heads, head_dim = q.shape
  num_pages, page_size, num_kv_heads = pages["k"].shape[:3]
  max_pages = page_table.shape[1]
  group = num_heads // num_kv_heads
  rows = max(MIN_BLOCK, _util.next_power_of_2(group))
  # Splits own whole blocks of pages, so a block never straddles two programs.
  pages_per_split = -(-max_pages // (num_splits * pages_per_block)) * pages_per_block
  q_planes = [_util.pad_to(x.reshape(batch, num_kv_heads, group, x.shape[-1]), (batch, num_kv_heads, rows, x.shape[-1]))
              for x in _common.split_head_dim(q, bits)]
  width = q_planes[0].shape[-1]
  in_specs = [pl.BlockSpec((None,), lambda b, hk, s: (b,)), pl.BlockSpec((None, max_pages), lambda b, hk, s: (b, 0))]
  in_specs += [pl.BlockSpec((None, None, rows, width), lambda b, hk, s: (b, hk, 0, 0))] * len(q_planes)
  for name in names:  # the whole pool, one kv head of it: [num_pages, page_size, last]
    in_specs.append(pl.BlockSpec((num_pages, page_size, None, pages[name].shape[-1]), lambda b, hk, s: (0, 0, hk, 0)))
  part = lambda *shape: pl.BlockSpec((None, None, None, *shape), lambda b, hk, s: (b, hk, s) + (0,) * len(shape))
  stats = jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, rows), jnp.float32)
  planes = len(q_planes)
  outs = pl.pallas_call(
      functools.partial(_kernel, g=g, bits=bits, pages_per_block=pages_per_block, pages_per_split=pages_per_split,
                        page_size=page_size),
      out_shape=(*[jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, rows, width), jnp.float32)] * planes,
                 stats, stats),
      grid=(batch, num_kv_heads, num_splits),
      in_specs=in_specs,
      out_specs=(*[part(rows, width)] * planes, part(rows), part(rows)),
      compiler_params=pltriton.CompilerParams(num_warps=4 if width <= 64 else 8, num_stages=2),
      interpret=interpret,
      cost_estimate=cost_estimate,
      name="paged_decode",
  )(lengths, page_table, *q_planes, *[pages[name] for name in names])
  accs, m, l = outs[:planes], outs[planes][..., None], outs[planes + 1][..., None]
  out = jnp.concatenate([flash_common.combine_splits(acc, m, l, axis=2) for acc in accs], axis=-1)
  return out[:, :, :group].reshape(batch, num_heads, head_dim).astype(q.dtype)
