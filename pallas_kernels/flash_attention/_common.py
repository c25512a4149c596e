"""What every flash-attention implementation shares: the static problem description, which keys a query may see,
which key blocks a query block may see (block skipping), and the soft-cap math.

Positions: query row i sits at absolute position i + offset with offset = S - T, so the last query is aligned
with the last key (prefill of T new tokens after S - T cached ones). Key j is visible to query i iff
  j < S                                  (real key, not padding)
  and j <= i + offset                    (causal)
  and j > i + offset - window            (sliding window: the `window` most recent keys, itself included)
  and q_segment[i] == kv_segment[j]      (segment ids given)
Everything here works on Python ints and on traced int32 scalars alike, so the same functions serve the XLA
path, kernel bodies and BlockSpec index maps.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128  # TPU vector lanes: the decode kernels keep m and l lane-dense [rows, LANES]
# A finite "minus infinity" for running maxima: exp(MASK_VALUE - m) underflows to 0 and, unlike -inf,
# MASK_VALUE - MASK_VALUE is 0, so a row that has seen no visible key yet stays NaN-free.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static description of one attention problem after blocking (hashable: a jit static argument)."""
  q_len: int          # T (unpadded)
  kv_len: int         # S (unpadded)
  block_q: int
  block_kv: int
  causal: bool
  window: int | None  # left window size, None for unbounded
  soft_cap: float | None
  scale: float

  @property
  def offset(self) -> int:
    return self.kv_len - self.q_len

  @property
  def num_q_blocks(self) -> int:
    return -(-self.q_len // self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return -(-self.kv_len // self.block_kv)

  @property
  def padded_q_len(self) -> int:
    return self.num_q_blocks * self.block_q

  @property
  def padded_kv_len(self) -> int:
    return self.num_kv_blocks * self.block_kv


def kv_block_range(i, g: Geometry):
  """(first, last) kv block that query block `i` can see, inclusive; last < first when it sees none."""
  first_pos = i * g.block_q + g.offset
  last_pos = first_pos + g.block_q - 1
  last_key = jnp.minimum(last_pos, g.kv_len - 1) if g.causal else g.kv_len - 1
  first_key = jnp.maximum(first_pos - g.window + 1, 0) if g.window else 0
  # Divide non-negative numbers only: Mosaic's scalar division truncates, and so does lax.div.
  last = jnp.where(last_key < 0, -1, lax.div(jnp.maximum(last_key, 0), g.block_kv))
  first = lax.div(jnp.asarray(first_key, jnp.int32), g.block_kv)
  return first, last


def q_block_range(j, g: Geometry):
  """(first, last) query block that can see kv block `j`, inclusive: the inverse of `kv_block_range`.

  Causal: block i sees j iff its last position i*bq + bq - 1 + offset >= j*bkv. Window: iff its first
  position's window start i*bq + offset - window + 1 <= j*bkv + bkv - 1.
  """
  if g.causal:
    need = jnp.maximum(j * g.block_kv - g.offset - g.block_q + 1, 0)
    first = lax.div(need + g.block_q - 1, g.block_q)
  else:
    first = jnp.asarray(0, jnp.int32)
  if g.window:
    top = (j + 1) * g.block_kv - 2 - g.offset + g.window
    last = jnp.where(top < 0, -1, lax.div(jnp.maximum(top, 0), g.block_q))
    last = jnp.minimum(last, g.num_q_blocks - 1)
  else:
    last = jnp.asarray(g.num_q_blocks - 1, jnp.int32)
  return first, last


def clamp_block(index, first, last, num_blocks):
  """`index` clamped into [first, last] (and into the grid), for index maps: consecutive grid steps that map to
  the same block make the Pallas pipeline skip the copy, so skipped blocks are never fetched."""
  index = jnp.minimum(jnp.maximum(index, first), jnp.maximum(last, first))
  return jnp.minimum(jnp.maximum(index, 0), num_blocks - 1)


def tile_needs_mask(i, j, g: Geometry):
  """Whether tile (query block i, key block j) holds a hidden (query, key) pair, segment ids aside: it reaches
  into key padding, crosses the causal diagonal or the window's left edge. Padded query rows need no mask: their
  results are dropped (and their lse = +inf zeroes them in the backward)."""
  q_first = i * g.block_q + g.offset
  q_last = q_first + g.block_q - 1
  k_first = j * g.block_kv
  k_last = k_first + g.block_kv - 1
  needs = k_last >= g.kv_len
  if g.causal:
    needs = needs | (k_last > q_first)
  if g.window:
    needs = needs | (k_first <= q_last - g.window)
  return needs


def visible(q_start, kv_start, shape, g: Geometry, q_segment=None, kv_segment=None):
  """Bool [bq, bkv] mask of a (query block, key block) tile starting at rows q_start, columns kv_start.

  q_segment broadcasts as [bq, 1] and kv_segment as [1, bkv] (both None without segment ids).
  """
  rows = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = kv_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  positions = rows + g.offset
  ok = cols < g.kv_len
  if g.causal:
    ok = ok & (cols <= positions)
  if g.window:
    ok = ok & (cols > positions - g.window)
  if q_segment is not None:
    ok = ok & (q_segment == kv_segment)
  return ok


def logits(s, g: Geometry):
  """Scaled (and soft-capped) f32 logits from raw q.k products."""
  s = s * g.scale
  return s if g.soft_cap is None else g.soft_cap * jnp.tanh(s / g.soft_cap)


def logits_grad(ds, capped, g: Geometry):
  """Gradient w.r.t. the raw q.k products from the gradient w.r.t. `logits(...)` (whose value is `capped`)."""
  if g.soft_cap is not None:
    ds = ds * (1.0 - jnp.square(capped / g.soft_cap))
  return ds * g.scale


def finish(acc, m, l):
  """Output rows acc / l and log-sum-exp m + log(l); a row that saw no key gets 0 and lse = +inf (so that the
  backward's exp(s - lse) is 0 for it)."""
  empty = l == 0.0
  out = acc / jnp.where(empty, 1.0, l)
  lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
  return out, lse


def combine_splits(acc, m, l, axis):
  """Merges flash-decode partial results along the split `axis`: acc [..., splits, rows, D] (unnormalised),
  m and l [..., splits, rows, 1] (running max and sum) -> normalised [..., rows, D]; rows that saw no key -> 0."""
  m_all = jnp.max(m, axis=axis, keepdims=True)
  weight = jnp.exp(m - m_all)  # splits that saw nothing have l = 0 and acc = 0, whatever their weight
  l_all = jnp.sum(weight * l, axis=axis)
  acc_all = jnp.sum(weight * acc, axis=axis)
  return acc_all / jnp.where(l_all == 0.0, 1.0, l_all)


def decode_block(kv_len: int, requested, candidates, name="block_kv") -> int:
  """Key block of a decode kernel: it must divide the cache length S_max (the cache is never padded -- that
  would copy it every step). Default: the largest of `candidates` dividing S_max, else the whole cache."""
  if requested is None:
    return next((c for c in candidates if c < kv_len and kv_len % c == 0), kv_len)
  if requested >= kv_len:
    return kv_len
  if kv_len % requested:
    raise ValueError(f"{name}={requested} must divide the cache length S_max={kv_len} for the decode kernel "
                     f"(the cache is not padded).")
  return requested


def over_lanes(x, width):
  """Per-head columns x [rows, H_kv] broadcast over each head's `width` lanes -> [rows, H_kv * width] f32 (the
  decode kernels' scales and zero points laid beside a lane-dense [rows, H_kv * D] tile)."""
  rows, heads = x.shape
  x = x.astype(jnp.float32)
  lane = lax.broadcasted_iota(jnp.int32, (rows, heads * width), 1)
  out = jnp.broadcast_to(x[:, :1], (rows, heads * width))
  for kk in range(1, heads):
    out = jnp.where(lane >= kk * width, x[:, kk:kk + 1], out)
  return out


def online_softmax_update(s, m_ref, l_ref):
  """One block of f32 logits s [rows, n] folded into the running max m_ref and sum l_ref ([rows, lanes] refs,
  every lane equal) of a decode kernel -> (p = exp(s - m_new) [rows, n], alpha = exp(m_old - m_new) [rows, lanes]),
  with which the caller rescales and adds to its accumulators."""
  m_prev = m_ref[...]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  p = jnp.exp(s - m_next[:, :1])
  alpha = jnp.exp(m_prev - m_next)
  l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
  m_ref[...] = m_next
  return p, alpha



# --- GQA as a block-diagonal matmul (the TPU split-K decode kernels) ------------------------------------------


def block_diagonal(q, num_kv_heads):
  """q [B, H, w] -> [B, H, H_kv * w] with row h non-zero only in the lanes of kv head h // group: q_bd @ keys.T
  over a lane-dense [rows, H_kv * w] tile gives every query head its logits without repeating K/V."""
  batch, num_heads, _ = q.shape
  owner = jnp.arange(num_heads) // (num_heads // num_kv_heads)
  own = (owner[:, None] == jnp.arange(num_kv_heads)[None, :])[None, :, :, None]
  return jnp.where(own, q[:, :, None, :], jnp.zeros((), q.dtype)).reshape(batch, num_heads, -1)


def diagonal_blocks(x, num_kv_heads):
  """x [..., H, H_kv * w] (p @ v over a block-diagonal q) -> [..., H, w]: each head's block of its own kv head."""
  *lead, num_heads, lanes = x.shape
  group, width = num_heads // num_kv_heads, lanes // num_kv_heads
  heads = jnp.arange(num_kv_heads)
  picked = x.reshape(*lead, num_kv_heads, group, num_kv_heads, width)[..., heads, :, heads, :]  # [H_kv, ..., g, w]
  return jnp.moveaxis(picked, 0, -3).reshape(*lead, num_heads, width)


def split_partials_tpu(batch: int, num_splits: int, num_heads: int, plane_lanes: int, planes: int):
  """(out_shape, out_specs, scratch_shapes) of a TPU split-K decode kernel on grid (batch, split, step): per
  (row, split) `planes` unnormalised f32 accumulators [H, plane_lanes] and the running m, l [H, LANES], written
  from VMEM scratch of the same shapes on the split's last step."""
  part = lambda width: pl.BlockSpec((None, None, num_heads, width), lambda b, split, t, *_: (b, split, 0, 0))
  shape = lambda width: jax.ShapeDtypeStruct((batch, num_splits, num_heads, width), jnp.float32)
  widths = [plane_lanes] * planes + [LANES, LANES]
  return (tuple(shape(w) for w in widths), tuple(part(w) for w in widths),
          [pltpu.VMEM((num_heads, w), jnp.float32) for w in widths])
