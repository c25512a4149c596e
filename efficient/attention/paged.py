"""A paged KV cache: every sequence's tokens live in fixed-size pages drawn from one shared pool.

Two pieces, both pure functions of pytrees (so they run under `jit` and `lax.scan`):

- `PagePool`: the allocator. A stack of free page ids (`free[:num_free]`, top at the end), and per sequence its
  page table row (`page_table[b, j]`: the page of tokens [j * page_size, (j + 1) * page_size), -1 when none)
  and token count. `allocate(pool, n)` pops n pages; `append(pool, num_tokens)` grows sequences, taking a page
  only when a sequence crosses a page boundary; `reserve(pool, lengths)` grows them to given lengths (what the
  cache uses: its slots are the model's cache index); `free_sequence(pool, b)` pushes a sequence's pages back
  (another sequence then reuses them). Exhaustion: eagerly (concrete arrays) a `ValueError`; under `jit`, where
  nothing can be raised, the request that does not fit allocates nothing, sets the sticky flag
  `pool.exhausted`, and the tokens it was for are dropped (written nowhere, read as garbage): check the flag
  (e.g. on the cache returned by a jitted step) and size `num_pages` so it stays False.

- `PagedKV(page_size=16, num_pages=None, storage='float'|'int8'|'int4')`: a `cache.KVFormat` (frozen,
  hashable: a static jit argument) whose `create(...)` gives a `PagedKVCache`. Pages hold per-token storage
  (`cache.token_format(storage)`: float k/v, or asymmetric int8/int4 codes per token and kv head). A one-token
  decode step with `kv_lengths` reads the pages in place through `pallas_kernels.paged_decode` (only valid pages
  are fetched; under a mesh per shard of batch rows and kv heads, `decode`); other steps (prefill, packed or
  positioned batches) gather each sequence's pages into a contiguous view and run the model's attention
  function over it with the given positions and segment ids. Every array has logical axis names
  (`PagedKVCache.logical_axes`: pages (None, None, kv_heads, head_dim or None), page table (batch, None)).

The cache's slots are the model's: slot s of sequence b is token s % page_size of page page_table[b, s //
page_size]. Moving the model's cache index back (speculative rollback) keeps the pages and overwrites the slots
before any query reads them, so it is a complete rollback (`rollback_safe`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax.sharding import PartitionSpec

from efficient.attention import cache as cache_lib
from efficient.attention import core, flash
from pallas_kernels import packing
from pallas_kernels import paged_decode as paged_decode_op

STORAGES = ("float", "int8", "int4")
NO_PAGE = -1


@struct.dataclass
class PagePool:
  """free [num_pages] int32 (free[:num_free] are free), num_free int32, page_table [B, P] int32 (NO_PAGE where
  unassigned), pages_held [B] int32, lengths [B] int32 tokens, exhausted bool (sticky)."""
  free: jax.Array
  num_free: jax.Array
  page_table: jax.Array
  pages_held: jax.Array
  lengths: jax.Array
  exhausted: jax.Array
  page_size: int = struct.field(pytree_node=False, default=16)

  @classmethod
  def create(cls, num_pages: int, batch: int, max_pages_per_seq: int, page_size: int) -> "PagePool":
    for name, value in (("num_pages", num_pages), ("batch", batch), ("max_pages_per_seq", max_pages_per_seq),
                        ("page_size", page_size)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int.")
    # Pages pop from the end: reversing makes a fresh pool hand out 0, 1, 2, ... (easier to read in tests).
    return cls(free=jnp.arange(num_pages, dtype=jnp.int32)[::-1], num_free=jnp.asarray(num_pages, jnp.int32),
               page_table=jnp.full((batch, max_pages_per_seq), NO_PAGE, jnp.int32),
               pages_held=jnp.zeros((batch,), jnp.int32), lengths=jnp.zeros((batch,), jnp.int32),
               exhausted=jnp.zeros((), bool), page_size=int(page_size))

  @property
  def num_pages(self) -> int:
    return self.free.shape[0]

  def logical_axes(self) -> "PagePool":
    return self.replace(free=(None,), num_free=(), page_table=("batch", None), pages_held=("batch",),
                        lengths=("batch",), exhausted=())


def _concrete(*arrays) -> bool:
  return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _raise_if_exhausted(pool: PagePool, fits, needed, what: str) -> None:
  """Eagerly: a ValueError when this request does not fit (not for a flag a jitted step set earlier)."""
  if _concrete(fits, needed, pool.num_free) and not bool(fits):
    raise ValueError(f"PagePool exhausted: {what} needs {int(needed)} pages but only {int(pool.num_free)} of "
                     f"{pool.num_pages} are free; create the pool (PagedKV num_pages) larger, or free sequences.")


def allocate(pool: PagePool, count: int) -> tuple[PagePool, jax.Array]:
  """Pops `count` (static) pages -> (pool, page ids [count]); all NO_PAGE (and `exhausted`) if fewer are free."""
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    raise ValueError(f"count={count!r} must be a non-negative int.")
  fits = count <= pool.num_free
  slots = pool.num_free - 1 - jnp.arange(count, dtype=jnp.int32)
  pages = jnp.where(fits, pool.free[jnp.clip(slots, 0, pool.num_pages - 1)], NO_PAGE)
  new = pool.replace(num_free=jnp.where(fits, pool.num_free - count, pool.num_free),
                     exhausted=pool.exhausted | ~fits)
  _raise_if_exhausted(new, fits, jnp.asarray(count), f"allocate({count})")
  return new, pages


def reserve(pool: PagePool, lengths) -> PagePool:
  """Grows every sequence to hold `lengths` [B] tokens (never shrinks its pages; `pool.lengths` becomes
  `lengths`), allocating the pages that new page boundaries need, all or none: a request that does not fit
  changes nothing but the `exhausted` flag (see the module docstring)."""
  lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), pool.lengths.shape)
  max_pages = pool.page_table.shape[1]
  if _concrete(lengths) and int(jnp.max(lengths)) > max_pages * pool.page_size:
    raise ValueError(f"lengths: a sequence of {int(jnp.max(lengths))} tokens exceeds the page table's "
                     f"{max_pages} pages of {pool.page_size} tokens.")
  wanted = jnp.minimum(-(-lengths // pool.page_size), max_pages)
  new_pages = jnp.maximum(wanted - pool.pages_held, 0)  # [B]
  needed = jnp.sum(new_pages)
  fits = needed <= pool.num_free
  # Page slot j of row b is new iff held[b] <= j < wanted[b]; its rank among all new pages orders rows, then j.
  j = jnp.arange(max_pages, dtype=jnp.int32)[None, :]
  is_new = (j >= pool.pages_held[:, None]) & (j < (pool.pages_held + new_pages)[:, None]) & fits
  rank = (jnp.cumsum(new_pages) - new_pages)[:, None] + j - pool.pages_held[:, None]
  taken = pool.free[jnp.clip(pool.num_free - 1 - rank, 0, pool.num_pages - 1)]
  new = pool.replace(page_table=jnp.where(is_new, taken, pool.page_table),
                     pages_held=jnp.where(fits, pool.pages_held + new_pages, pool.pages_held),
                     num_free=jnp.where(fits, pool.num_free - needed, pool.num_free),
                     lengths=jnp.where(fits, lengths, pool.lengths), exhausted=pool.exhausted | ~fits)
  _raise_if_exhausted(new, fits, needed, "growing the sequences")
  return new


def append(pool: PagePool, num_tokens) -> PagePool:
  """Sequences grow by `num_tokens` (an int for all, or [B]); pages are allocated on page boundaries."""
  return reserve(pool, pool.lengths + jnp.asarray(num_tokens, jnp.int32))


def free_sequence(pool: PagePool, b) -> tuple[PagePool, jax.Array]:
  """Returns sequence b's pages to the pool -> (pool, its page ids [P], NO_PAGE-padded); b's row is emptied."""
  if _concrete(b) and not 0 <= int(b) < pool.lengths.shape[0]:
    raise ValueError(f"b={b!r} must be a sequence index in [0, {pool.lengths.shape[0]}).")
  row = pool.page_table[b]
  held = pool.pages_held[b]
  j = jnp.arange(row.shape[0], dtype=jnp.int32)
  slots = jnp.where(j < held, pool.num_free + j, pool.num_pages)  # past the stack: dropped
  free = pool.free.at[slots].set(row, mode="drop")
  new = pool.replace(free=free, num_free=pool.num_free + held, page_table=pool.page_table.at[b].set(NO_PAGE),
                     pages_held=pool.pages_held.at[b].set(0), lengths=pool.lengths.at[b].set(0))
  return new, jnp.where(j < held, row, NO_PAGE)


@struct.dataclass
class PagedKVCache:
  """A softmax layer's paged KV cache: `pages` (pool arrays [num_pages, page_size, H_kv, last] of the token
  format `storage`) and its `pool`; `efficient.attention.cache`'s `update_and_attend` interface."""
  pages: dict
  pool: PagePool
  storage: str = struct.field(pytree_node=False, default="float")
  rollback_safe = True  # see the module docstring

  @property
  def token_format(self) -> cache_lib.TokenFormat:
    return cache_lib.token_format(self.storage)

  def logical_axes(self) -> "PagedKVCache":
    """The same structure with each stored array's logical axis names (a tuple) in its place."""
    last = lambda name: "head_dim" if self.storage == "float" else None  # packed codes / scales: not head_dim
    pages = {name: (None, None, "kv_heads", last(name)) for name in self.pages}
    return PagedKVCache(pages=pages, pool=self.pool.logical_axes(), storage=self.storage)

  def update_and_attend(self, q, k, v, *, index, q_positions, kv_positions, q_segment_ids=None,
                        kv_segment_ids=None, kv_lengths=None, attention_fn=None):
    fmt = self.token_format
    batch, length = k.shape[:2]
    page_size = self.pool.page_size
    pool = reserve(self.pool, jnp.full((batch,), index + length, jnp.int32))
    slots = index + jnp.arange(length, dtype=jnp.int32)  # [T], the same for every row
    page = jnp.take_along_axis(pool.page_table, jnp.broadcast_to(slots // page_size, (batch, length)), axis=1)
    num_pages = self.pages["k"].shape[0]
    page = jnp.where(page < 0, num_pages, page)  # no page (exhausted pool): the write is dropped
    offset = jnp.broadcast_to(slots % page_size, (batch, length))
    dtype = self.pages["k"].dtype if fmt.bits is None else q.dtype
    stored = fmt.encode(k, v, dtype)
    pages = {name: array.at[page, offset].set(stored[name].astype(array.dtype), mode="drop")
             for name, array in self.pages.items()}
    new = PagedKVCache(pages=pages, pool=pool, storage=self.storage)
    if length == 1 and kv_lengths is not None and kv_segment_ids is None:
      q_pages = q[:, 0].astype(pages["k"].dtype) if fmt.bits is None else q[:, 0]
      out = decode(q_pages, pages, pool.page_table, kv_lengths, bits=fmt.bits)
      return out.astype(q.dtype)[:, None], new
    keys, values = fmt.decode(contiguous_view(pages, pool.page_table, kv_positions.shape[1]), q.dtype)
    attend = attention_fn or core.softmax_attention
    return attend(q, keys, values, q_positions=q_positions, kv_positions=kv_positions,
                  q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids), new


def decode(q, pages: dict, page_table, lengths, *, bits=None, implementation=None):
  """`paged_decode` of one query step q [B, H, D]; under a mesh inside `jax.shard_map`, like
  `efficient.attention.flash.decode` (GSPMD cannot partition a Pallas call): each device takes its batch rows'
  queries, page table rows and lengths (split over the data-like axes) and its kv heads of the whole pool (split
  over `tensor` when that divides both head counts; the pool has no batch axis, a page may belong to any row)."""
  local = lambda q, pages, table, lengths: paged_decode_op.paged_decode(q, pages, table, lengths, bits=bits,
                                                                         implementation=implementation)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q, pages, page_table, lengths)
  batch, heads, head_dim = q.shape
  spec = flash.activation_spec(mesh, (batch, 1, heads, head_dim), (batch, 1, pages["k"].shape[2], head_dim))
  rows, heads_axis = spec[0], spec[2]
  q_spec = PartitionSpec(rows, heads_axis, None)
  page_specs = {name: PartitionSpec(None, None, heads_axis, None) for name in pages}
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, page_specs, PartitionSpec(rows, None),
                                                   PartitionSpec(rows)),
                       out_specs=q_spec, check_vma=False)(q, pages, page_table, lengths)


def contiguous_view(pages: dict, page_table, max_len: int) -> dict:
  """Each sequence's pages gathered in order -> arrays [B, max_len, H_kv, last] (slots past a sequence's pages
  read page 0: callers mask them by position)."""
  def gather(array):
    rows = jnp.take(array, jnp.clip(page_table, 0, array.shape[0] - 1), axis=0)  # [B, P, ps, H_kv, last]
    return rows.reshape(rows.shape[0], -1, *rows.shape[3:])[:, :max_len]
  return jax.tree.map(gather, pages)


@dataclasses.dataclass(frozen=True)
class PagedKV:
  """KV format of a paged cache (`cache.KVFormat`): pass as `kv_format=PagedKV(...)` to `make_layer_cache`,
  `llama.init_cache` or `llama.generate`.

  page_size: tokens per page (>= 1; the TPU kernel needs a multiple of the pages' sublane tile, 8 for f32,
  16 for bf16, 32 for int8/int4 codes; the GPU kernel a power of two >= 16 -- checked by `create` against the
  kernel the backend or `pallas_kernels.implementation` policy picks). num_pages: the pool size, at least
  batch * ceil(max_len / page_size) (the cache grows every sequence together; fewer is a ValueError); None:
  exactly that. storage: 'float' (the cache dtype), 'int8' or 'int4' (per-token asymmetric codes; registered
  by efficient.quant.kv_cache).
  """
  page_size: int = 16
  num_pages: int | None = None
  storage: str = "float"

  def __post_init__(self):
    if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size < 1:
      raise ValueError(f"page_size={self.page_size!r} must be an int >= 1.")
    if self.num_pages is not None and (isinstance(self.num_pages, bool) or not isinstance(self.num_pages, int)
                                       or self.num_pages < 1):
      raise ValueError(f"num_pages={self.num_pages!r} must be an int >= 1 (or None: enough for every sequence).")
    if self.storage not in STORAGES:
      raise ValueError(f"storage={self.storage!r} must be one of {STORAGES}.")

  @property
  def name(self) -> str:
    return f"paged-{self.storage}-{self.page_size}"

  def create(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, dtype=jnp.float32,
             group_size=None) -> PagedKVCache:
    if group_size is not None:
      raise ValueError("kv_group_size applies to the contiguous quantized caches only; a paged cache quantizes "
                       "per token (PagedKV(storage='int8'/'int4')).")
    fmt = cache_lib.token_format(self.storage, argument="storage")
    if fmt.bits is not None:
      packing.check_packable(head_dim, fmt.bits, name="head_dim")
    # Fail here, not at the first decode step (inside generate's jit): the kernel that will read the pages.
    paged_decode_op.check_page_size(self.page_size, head_dim=head_dim, bits=fmt.bits, dtype=dtype)
    max_pages = -(-max_len // self.page_size)
    needed = batch * max_pages
    if self.num_pages is not None and self.num_pages < needed:
      # The cache grows every row to the model's cache index together; under jit a pool that runs dry can only
      # set `exhausted` and drop tokens, so refuse a pool that cannot reach max_len up front.
      raise ValueError(f"num_pages={self.num_pages} is too small: {batch} sequences of up to max_len={max_len} "
                       f"tokens need {batch} * ceil({max_len} / page_size={self.page_size}) = {needed} pages.")
    num_pages = needed if self.num_pages is None else self.num_pages
    pages = cache_lib.empty_tokens(fmt, (num_pages, self.page_size, num_kv_heads, head_dim), dtype)
    return PagedKVCache(pages=pages, pool=PagePool.create(num_pages, batch, max_pages, self.page_size),
                        storage=self.storage)
