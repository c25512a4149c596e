"""`paged_decode(q, pages, page_table, lengths)`: one decoding step of attention over a paged KV cache.

The cache is a shared pool of pages: every array of `pages` is [num_pages, page_size, H_kv, last] (the
per-token storage of `efficient.attention.cache.token_format`, one page = page_size consecutive tokens of one
sequence); `page_table[b, j]` is the pool page holding tokens [j * page_size, (j + 1) * page_size) of sequence
b, and `lengths[b]` how many of its tokens are valid. Pages are float ({"k", "v"} in q's dtype) or quantized
(bits 8 / 4: {"k", "k_scale", "k_zero", "v", "v_scale", "v_zero"}; asymmetric per token and kv head,
value = (code - zero) * scale, uint8 codes packed planar along head_dim per `pallas_kernels.packing`).

Implementations:
  reference      gathers every page of the table into a contiguous view, dequantizes, masked softmax (jnp).
  pallas_tpu     Mosaic: page table and lengths scalar-prefetched, driving the BlockSpec index maps (one block
                 per page, `pages_per_block` pages per grid step); pages past a length are never fetched.
  pallas_gpu     Triton: each program loads pages by dynamic index from the pool, looping only over valid ones.
  interpret_*    the kernels in Pallas interpret mode (CPU tests).
Both kernels: GQA without repeating K/V, f32 logits/softmax/accumulation, dequantization in VMEM/registers,
split-K over `num_splits` programs per sequence merged with `flash_attention._common.combine_splits`. There is
no separate XLA path: on CPU (and under the 'xla' policy) the reference runs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _dispatch, _util, packing
from pallas_kernels.flash_attention import _common as flash_common
from pallas_kernels.paged_decode import _common, gpu, reference, tpu

IMPLEMENTATIONS = ("reference", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu")
_MODULES = _dispatch.kernel_modules(tpu=tpu, gpu=gpu)
DEFAULT_SPLITS = 4  # split-K programs per sequence: parallelism when B * H_kv is small
TPU_TOKENS_PER_STEP = 128  # default pages_per_block on TPU: about this many tokens per grid step


def paged_decode(q, pages: dict, page_table, lengths, *, bits=None, scale=None, implementation=None,
                 pages_per_block=None, num_splits=None):
  """q [B, H, D] attends to the first lengths[b] tokens stored in pages page_table[b, :] -> [B, H, D] in q.dtype.

  Args:
    pages: dict of pool arrays [num_pages, page_size, H_kv, last] (see the module docstring).
    page_table: int [B, P]; entries past a sequence's last valid page are never read (may hold anything).
    lengths: int [B] <= P * page_size (checked eagerly; clipped under jit); a length of 0 gives zeros.
    bits: None (float pages), 8 or 4.
    scale: logit scale, default head_dim ** -0.5.
    pages_per_block: pages per grid step (TPU; default about 128 tokens) or per unrolled loop step (GPU, 1).
    num_splits: split-K programs per sequence (default DEFAULT_SPLITS, at most the number of page blocks).
  TPU needs page_size a multiple of the pages' sublane tile (8 f32, 16 bf16, 32 uint8); GPU a power of two >=
  16 and power-of-two head_dim planes (int4: head_dim / 2).
  """
  _check(q, pages, page_table, lengths, bits, scale, pages_per_block, num_splits)
  implementation = _dispatch.choose(implementation, IMPLEMENTATIONS, op="paged_decode")
  return _run(q, pages, page_table, lengths, implementation=implementation, bits=bits,
              scale=None if scale is None else float(scale), pages_per_block=pages_per_block, num_splits=num_splits)


def resolve_blocks(implementation, page_size, max_pages, pages_per_block=None, num_splits=None):
  """(pages_per_block, num_splits) the kernels run with."""
  if pages_per_block is None:
    pages_per_block = max(1, TPU_TOKENS_PER_STEP // page_size) if _dispatch.tpu_style(implementation) else 1
  pages_per_block = min(pages_per_block, max_pages)
  num_blocks = -(-max_pages // pages_per_block)
  return pages_per_block, min(num_splits or DEFAULT_SPLITS, num_blocks)


@functools.partial(jax.jit, static_argnames=("implementation", "bits", "scale", "pages_per_block", "num_splits"))
def _run(q, pages, page_table, lengths, *, implementation, bits=None, scale=None, pages_per_block=None,
         num_splits=None):
  """`paged_decode` without validation or dispatch (the lowering tests export the kernels through it)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  num_pages, page_size = pages["k"].shape[:2]
  max_pages = page_table.shape[1]
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_pages * page_size)
  page_table = page_table.astype(jnp.int32)
  if implementation == "reference":
    return reference.paged_decode(q, pages, page_table, lengths, bits=bits, scale=scale)
  module = _MODULES[implementation]
  _check_kernel_fit(implementation, page_size, q.shape[-1], bits, [pages[name].dtype for name in _common.names(bits)])
  pages_per_block, num_splits = resolve_blocks(implementation, page_size, max_pages, pages_per_block, num_splits)
  geometry = flash_common.Geometry(q_len=1, kv_len=max_pages * page_size, block_q=1, block_kv=page_size,
                                   causal=False, window=None, soft_cap=None, scale=scale)
  # The resolved blocks are those of this implementation's own kernel, so they go to the model as they are.
  estimate = _util.cost_estimate(cost, q.shape, pages["k"].shape, max_pages, implementation=implementation,
                                 transcendentals=q.shape[0] * q.shape[1] * max_pages * page_size, dtype=q.dtype,
                                 bits=bits, pages_per_block=pages_per_block, num_splits=num_splits)
  return module.decode(q, {name: pages[name] for name in _common.names(bits)}, page_table, lengths,
                       geometry=geometry, bits=bits, pages_per_block=pages_per_block, num_splits=num_splits,
                       interpret=_dispatch.interpret_params(implementation), cost_estimate=estimate)


def check_page_size(page_size: int, *, head_dim: int, bits=None, dtype=jnp.float32, implementation=None) -> None:
  """Raises a `ValueError` naming `page_size` (or `head_dim`) when the implementation `paged_decode` would run
  (`implementation`, else the active policy / backend) cannot read pages of this shape: what a paged cache
  checks when it is made, rather than at its first decode step. `dtype`: of float pages (quantized pages
  are uint8 codes and f32 scales whatever the queries)."""
  implementation = _dispatch.choose(implementation, IMPLEMENTATIONS, op="paged_decode")
  dtypes = [dt for _, dt in _expected_pages(bits, head_dim, dtype).values()]
  _check_kernel_fit(implementation, page_size, head_dim, bits, dtypes)


def _check_kernel_fit(implementation, page_size, head_dim, bits, dtypes) -> None:
  if implementation == "reference":
    return  # gathers pages into a contiguous view: any page size
  if _MODULES[implementation] is tpu:
    tpu.check_page_size(page_size, dtypes)
  else:
    gpu.check_page_size(page_size)
    gpu.check_head_dim(head_dim, bits)


def _expected_pages(bits, head_dim, dtype):
  """name -> (last dim, dtype) of every pool array for `bits`."""
  if bits is None:
    return {"k": (head_dim, dtype), "v": (head_dim, dtype)}
  codes = head_dim * bits // 8
  return {"k": (codes, jnp.uint8), "k_scale": (1, jnp.float32), "k_zero": (1, jnp.uint8),
          "v": (codes, jnp.uint8), "v_scale": (1, jnp.float32), "v_zero": (1, jnp.uint8)}


def _check(q, pages, page_table, lengths, bits, scale, pages_per_block, num_splits):
  """Raises one `ValueError` naming the first bad argument of `paged_decode`."""
  if not hasattr(q, "ndim") or q.ndim != 3 or 0 in q.shape:
    raise ValueError(f"q must be a non-empty 3-D array [B, H, D] (one query step); got {getattr(q, 'shape', q)}.")
  _util.check_float_dtype("q", q.dtype)
  batch, num_heads, head_dim = q.shape
  if bits not in _common.BITS:
    raise ValueError(f"bits={bits!r} must be one of {_common.BITS} (None: float pages).")
  if bits is not None:
    packing.check_packable(head_dim, bits, name="head_dim")
  expected = _expected_pages(bits, head_dim, q.dtype)
  if not isinstance(pages, dict) or set(pages) != set(expected):
    got = sorted(pages) if isinstance(pages, dict) else type(pages).__name__
    raise ValueError(f"pages must be a dict with keys {sorted(expected)} for bits={bits}; got {got}.")
  lead = tuple(pages["k"].shape[:3]) if pages["k"].ndim == 4 else None
  for name, (last, dtype) in expected.items():
    array = pages[name]
    if array.ndim != 4 or 0 in array.shape or tuple(array.shape[:3]) != lead or array.shape[3] != last:
      raise ValueError(f"pages[{name!r}] must be [num_pages, page_size, H_kv, {last}] sharing pages['k']'s leading "
                       f"axes {lead}; got {tuple(array.shape)}.")
    if jnp.dtype(array.dtype) != jnp.dtype(dtype):
      raise ValueError(f"pages[{name!r}]: dtype {jnp.dtype(array.dtype).name} must be {jnp.dtype(dtype).name} "
                       f"(bits={bits}, q {jnp.dtype(q.dtype).name}).")
  num_pages, _, num_kv_heads = lead
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads: q has H={num_heads} heads, which is not a multiple of the pages' "
                     f"H_kv={num_kv_heads} (GQA needs H % H_kv == 0).")
  if (not hasattr(page_table, "shape") or page_table.ndim != 2 or page_table.shape[0] != batch
      or page_table.shape[1] < 1 or not jnp.issubdtype(page_table.dtype, jnp.integer)):
    raise ValueError(f"page_table must be an integer array [B={batch}, max_pages_per_seq >= 1]; got "
                     f"{getattr(page_table, 'dtype', '')}{tuple(getattr(page_table, 'shape', ()))}.")
  _util.check_lengths(lengths, batch)
  _util.check_logit_scale(scale)
  _util.check_block_arg("pages_per_block", pages_per_block)
  _util.check_block_arg("num_splits", num_splits)
  _check_used_pages(page_table, lengths, num_pages, lead[1])


def _check_used_pages(page_table, lengths, num_pages, page_size):
  """Eagerly (concrete arrays only): lengths fit the table, and every page a sequence reads is in the pool."""
  if isinstance(page_table, jax.core.Tracer) or isinstance(lengths, jax.core.Tracer):
    return  # under jit: lengths are clipped, out-of-pool pages clipped into the pool (garbage, never a crash)
  table, lengths = np.asarray(page_table), np.maximum(np.asarray(lengths), 0)
  capacity = table.shape[1] * page_size
  if lengths.max() > capacity:
    b = int(np.argmax(lengths))
    raise ValueError(f"lengths[{b}]={int(lengths[b])} exceeds what page_table holds: {table.shape[1]} pages of "
                     f"page_size={page_size} = {capacity} tokens per sequence.")
  used = np.arange(table.shape[1])[None, :] * page_size < lengths[:, None]
  bad = used & ((table < 0) | (table >= num_pages))
  if bad.any():
    b, j = map(int, np.argwhere(bad)[0])
    raise ValueError(f"page_table[{b}, {j}]={int(table[b, j])} is outside the pool of num_pages={num_pages}, "
                     f"but sequence {b} (length {int(lengths[b])}) reads it.")


def cost(q_shape, page_shape, max_pages: int, *, dtype, bits=None, lengths=None, pages_per_block=None,
         num_splits=None) -> dict:
  """Modelled cost of the TPU kernel for q [B, H, D] over pools of page_shape [num_pages, page_size, H_kv, D]
  (D: the unpacked head_dim), a page table of `max_pages` columns and sequences holding `lengths` tokens (B
  ints, one int, or None for full tables).

  `hbm_bytes`: the block-diagonal q once, the pages the pipeline fetches (`fetched_pages`: whole pages, all
  arrays of the format), the page table and lengths (SMEM) and the f32 partial results of every split;
  `ideal_bytes`: q, the valid tokens' storage and the output once. `flops`: the matmuls on fetched pages,
  including the H_kv-fold block-diagonal redundancy.
  """
  batch, num_heads, head_dim = q_shape
  _, page_size, num_kv_heads, _ = page_shape
  itemsize = jnp.dtype(dtype).itemsize
  per_token = sum(last * jnp.dtype(dt).itemsize for last, dt in _expected_pages(bits, head_dim, dtype).values())
  per_token *= num_kv_heads  # bytes of one token of every array, all kv heads
  ppb, splits = resolve_blocks("pallas_tpu", page_size, max_pages, pages_per_block, num_splits)
  lengths = np.asarray(max_pages * page_size if lengths is None else lengths)
  lengths = np.clip(np.broadcast_to(lengths, (batch,)), 0, max_pages * page_size)
  fetched = sum(fetched_pages(int(n), page_size, max_pages, ppb, splits) for n in lengths)
  lanes = num_kv_heads * head_dim
  moved = (batch * num_heads * lanes * itemsize + fetched * page_size * per_token
           + batch * (max_pages + 1) * 4 + batch * splits * num_heads * (lanes + 2 * tpu.LANES) * 4)
  ideal = batch * 2 * num_heads * head_dim * itemsize + int(lengths.sum()) * per_token
  flops = 4 * num_heads * lanes * fetched * page_size
  return {"flops": int(flops), "hbm_bytes": int(moved), "ideal_bytes": int(ideal)}


def fetched_pages(length: int, page_size: int, max_pages: int, pages_per_block: int, num_splits: int) -> int:
  """Pages the TPU pipeline DMAs for one sequence of `length` tokens: it walks the grid (split, step) with one
  operand per page of a block and fetches whenever an operand's clamped page differs from its previous one
  (each sequence's first step always fetches; distinct table entries assumed)."""
  steps = -(-max_pages // (pages_per_block * num_splits))
  last = max(length - 1, 0) // page_size
  count = 0
  for i in range(pages_per_block):
    previous = None
    for split in range(num_splits):
      for t in range(steps):
        page = min((split * steps + t) * pages_per_block + i, last, max_pages - 1)
        count += page != previous
        previous = page
  return count
