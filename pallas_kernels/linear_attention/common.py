"""Shared pieces of linear attention: feature maps, the jnp prologue/epilogue around the core recurrence, the
kernel layout, and the per-chunk math that the XLA path and both Pallas kernels run (written once, on f32 2-D
tiles, like `rms_norm.reference.normalize_rows`).

The core every implementation computes, per (batch, head), on feature-mapped and scaled q/k:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,      o_t = q_t S_t,      S_0 = initial state

with log gates g_t of width Kg: Kg = K for GLA (per key dimension), Kg = 1 for a fixed per-head decay
(RetNet/Lightning; broadcast over K) and no gates at all for plain linear attention. Normalization rides along as
one extra value column of ones: its state column is z_t (the decayed key sum) and its output column q_t . z_t.

Chunked form (chunk of C steps, state S entering it, b = inclusive cumsum of g inside the chunk, b_C its last
row): o = (q * e^b) S + A v with A_ij = sum_d q_id k_jd e^(b_id - b_jd) for j <= i, and
S' = e^(b_C) * S + (k * e^(b_C - b))^T v. A fixed decay uses the exact [C, C] decay matrix e^(b_i - b_j);
GLA gates factor A into a few matmuls over sub-chunks of 16 with every exponent <= 0 or bounded by half a
sub-chunk of gates (`_gated_pairs`), so strong gates (log gate -5 per step, chunk 64) stay finite and exact.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

FEATURE_MAPS = ("identity", "elu1", "relu", "taylor")
_HIGHEST = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)


# --- feature maps, prologue and epilogue (plain jnp, outside every kernel) ---

def feature_dim(feature_map: str, k_dim: int) -> int:
  """Width of phi(q), phi(k) for q/k of width `k_dim` (Taylor expands K to 1 + K + K^2)."""
  return 1 + k_dim + k_dim * k_dim if feature_map == "taylor" else k_dim


def default_scale(feature_map: str, k_dim: int) -> float:
  """K^-0.5, except for 'taylor', whose map already carries Based's 1/sqrt scalings (scale 1)."""
  return 1.0 if feature_map == "taylor" else k_dim ** -0.5


def apply_feature_map(x, feature_map: str):
  """phi(x) over the last axis, computed in f32 and returned in x.dtype.

  'taylor' is Based's second-order Taylor map [1, x / K^(1/4), vec(x x^T) / sqrt(2K)], so that
  phi(q) . phi(k) = 1 + q.k / sqrt(K) + (q.k)^2 / (2K), the expansion of exp(q.k / sqrt(K)).
  """
  x32 = x.astype(jnp.float32)
  if feature_map == "identity":
    out = x32
  elif feature_map == "elu1":
    out = jax.nn.elu(x32) + 1.0
  elif feature_map == "relu":
    out = jax.nn.relu(x32)
  elif feature_map == "taylor":
    k_dim = x.shape[-1]
    outer = (x32[..., :, None] * x32[..., None, :]).reshape(*x.shape[:-1], k_dim * k_dim)
    out = jnp.concatenate([jnp.ones_like(x32[..., :1]), x32 / k_dim ** 0.25, outer / math.sqrt(2 * k_dim)], -1)
  else:
    raise ValueError(f"feature_map={feature_map!r} is unknown; choose one of {FEATURE_MAPS}.")
  return out.astype(x.dtype)


def prepare(q, k, v, *, feature_map: str, scale: float, normalize: bool):
  """(phi(q) * scale, phi(k), v with a ones column appended when normalizing): what the core consumes."""
  q = (apply_feature_map(q, feature_map).astype(jnp.float32) * scale).astype(q.dtype)
  k = apply_feature_map(k, feature_map)
  if normalize:
    v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
  return q, k, v


def finish(out, *, normalize: bool, eps: float, dtype):
  """The core's output in `dtype`; with normalization, numerator / (q . z + eps) from the ones column."""
  if normalize:
    out = out.astype(jnp.float32)
    out = out[..., :-1] / (out[..., -1:] + eps)
  return out.astype(dtype)


# --- kernel layout: [B, T, H, D] <-> [B*H, T_padded, D] ---

def to_kernel_layout(x, padded_t: int):
  """[B, T, H, D] -> [B*H, padded_t, D], zero-padded in time (padded steps then leave the state unchanged:
  k = v = 0 and log gate 0, i.e. decay factor 1)."""
  b, t, h, d = x.shape
  x = jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, t, d)
  return jnp.pad(x, ((0, 0), (0, padded_t - t), (0, 0))) if padded_t > t else x


def from_kernel_layout(x, batch: int, seq_len: int):
  """[B*H, T_padded, D] -> [B, T, H, D] (drops the padded steps)."""
  bh, _, d = x.shape
  return jnp.transpose(x[:, :seq_len].reshape(batch, bh // batch, seq_len, d), (0, 2, 1, 3))


# --- per-chunk math on f32 tiles, shared by xla.py, tpu.py and gpu.py ---

def _dot(a, b, contract, dtype=jnp.float32):
  """dot_general with operands in `dtype` and f32 accumulation; f32 operands at full (HIGHEST) precision."""
  if jnp.dtype(dtype) == jnp.float32:
    return lax.dot_general(a, b, (contract, ((), ())), precision=_HIGHEST, preferred_element_type=jnp.float32)
  return lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())),
                         preferred_element_type=jnp.float32)


def mm(a, b, dtype=jnp.float32):  # a @ b
  return _dot(a, b, ((1,), (0,)), dtype)


def mm_nt(a, b, dtype=jnp.float32):  # a @ b.T
  return _dot(a, b, ((1,), (1,)), dtype)


def mm_tn(a, b, dtype=jnp.float32):  # a.T @ b
  return _dot(a, b, ((0,), (0,)), dtype)


def _iotas(n):
  return lax.broadcasted_iota(jnp.int32, (n, n), 0), lax.broadcasted_iota(jnp.int32, (n, n), 1)


def column_to_row(col):
  """[n, 1] -> [1, n] by a masked reduction (no vector transpose: safe for any n in Mosaic and Triton)."""
  rows, cols = _iotas(col.shape[0])
  return jnp.sum(jnp.where(rows == cols, col, 0.0), axis=0, keepdims=True)


def row_to_column(row):
  """[1, n] -> [n, 1], like `column_to_row`."""
  rows, cols = _iotas(row.shape[1])
  return jnp.sum(jnp.where(rows == cols, row, 0.0), axis=1, keepdims=True)


def cumsum_rows(x, *, reverse: bool = False, exclusive: bool = False):
  """Cumulative sum over axis 0 of x [C, n] (reverse: suffix sums; exclusive: without row i itself), as a
  triangular matmul; a single column is summed with a masked reduction instead of an N = 1 matmul."""
  rows, cols = _iotas(x.shape[0])
  if exclusive:
    keep = rows < cols if reverse else rows > cols  # [i, j]: j contributes to i
  else:
    keep = rows <= cols if reverse else rows >= cols
  if x.shape[1] == 1:
    return jnp.sum(jnp.where(keep, column_to_row(x), 0.0), axis=1, keepdims=True)
  return mm(keep.astype(jnp.float32), x)


def _gate_terms(g, chunk):
  """Decay factors of one chunk from its log gates g [C, Kg] (None: no gates)."""
  rows, cols = _iotas(chunk)
  causal = rows >= cols
  if g is None:
    return dict(causal=causal)
  b = cumsum_rows(g)
  b_last = jnp.sum(g, axis=0, keepdims=True)  # rows of b by reductions of g: Triton cannot lower a slice
  # e^(b_C - b) from suffix sums of g rather than a difference of cumulative sums, which cancels for strong gates.
  to_end = jnp.exp(cumsum_rows(g, reverse=True, exclusive=True))
  terms = dict(causal=causal, b=b, to_start=jnp.exp(b), to_end=to_end, chunk_decay=jnp.exp(b_last))
  if g.shape[1] == 1:
    # Fixed decay: the exact decay matrix e^(b_i - b_j); the where() keeps the overflowing j > i entries out.
    terms["decay"] = jnp.where(causal, jnp.exp(jnp.where(causal, b - column_to_row(b), 0.0)), 0.0)
  else:
    terms["pairs"] = _gated_pairs(b, chunk)
    terms["chunk_decay"] = row_to_column(terms["chunk_decay"])  # [K, 1]: scales the state's rows
  return terms


def _row(x, index):
  """Row `index` of x [C, n] as [1, n], by a masked reduction (Triton cannot lower a slice)."""
  rows = lax.broadcasted_iota(jnp.int32, (x.shape[0], 1), 0)
  return jnp.sum(jnp.where(rows == index, x, 0.0), axis=0, keepdims=True)


def _factor(exponent, rows):
  """exp(exponent) on the selected rows [C, 1], 0 elsewhere (never exponentiating what is thrown away)."""
  return jnp.where(rows, jnp.exp(jnp.where(rows, exponent, 0.0)), 0.0)


def sub_chunk(chunk: int) -> int:
  """Sub-chunk length of the gated intra-chunk scores: 16 (or 8) where it divides the chunk, else the chunk."""
  return next((size for size in (16, 8) if chunk % size == 0 and chunk > size), chunk)


def _gated_pairs(b, chunk):
  """Factorizations (q_factor, k_factor, mask) whose masked products q_factor k_factor^T sum to the GLA decay
  e^(b_i - b_j) over i >= j, with every exponent bounded (so nothing overflows for strong gates, as in fla):
  - pairs i, j in the same sub-chunk: around that sub-chunk's middle row (|exponent| <= half a sub-chunk of gates);
  - i in a later sub-chunk than j in sub-chunk J: around J's last row r, e^(b_i - r) <= 1 and e^(r - b_j) <= 1.
  """
  size = sub_chunk(chunk)
  # index // size as a sum of comparisons: jnp's integer floor division emits `sign`, which Mosaic lowers only
  # with a TPU attached, and vector integer division is not something to rely on in any kernel dialect.
  sub_block = lambda index: sum(((index >= j * size).astype(jnp.int32) for j in range(1, chunk // size)),
                                jnp.zeros_like(index))
  block = sub_block(lax.broadcasted_iota(jnp.int32, (chunk, 1), 0))  # each row's sub-chunk
  row_index, col_index = _iotas(chunk)
  same_block = (sub_block(row_index) == sub_block(col_index)) & (row_index >= col_index)
  middle = sum(jnp.where(block == j, _row(b, j * size + size // 2), 0.0) for j in range(chunk // size))
  pairs = [(jnp.exp(b - middle), jnp.exp(middle - b), same_block)]
  for j in range(chunk // size - 1):
    end = _row(b, j * size + size - 1)
    pairs.append((_factor(b - end, block > j), _factor(end - b, block == j), None))  # zero outside the pair
  return pairs


def _intra_scores(q, k, terms, dtype):
  """A [C, C]: the causal, decayed q_i . k_j within the chunk."""
  if "pairs" in terms:
    scores = 0.0
    for q_factor, k_factor, mask in terms["pairs"]:
      product = mm_nt(q * q_factor, k * k_factor, dtype)
      scores = scores + (product if mask is None else jnp.where(mask, product, 0.0))
    return scores
  scores = jnp.where(terms["causal"], mm_nt(q, k, dtype), 0.0)
  return scores * terms["decay"] if "decay" in terms else scores


def chunk_forward(q, k, v, g, state, dtype=jnp.float32):
  """One chunk: q, k [C, K], v [C, V], log gates g [C, Kg] or None, state [K, V] entering the chunk (all f32)
  -> (o [C, V], the state leaving the chunk). `dtype` is the matmul operand dtype, the inputs' dtype: bf16 feeds
  the MXU / tensor cores natively (as fla does), f32 runs at HIGHEST precision; accumulation, the state, the gate
  cumsums and everything elementwise stay f32."""
  terms = _gate_terms(g, q.shape[0])
  intra = mm(_intra_scores(q, k, terms, dtype), v, dtype)
  if g is None:
    return mm(q, state, dtype) + intra, state + mm_tn(k, v, dtype)
  out = mm(q * terms["to_start"], state, dtype) + intra
  return out, terms["chunk_decay"] * state + mm_tn(k * terms["to_end"], v, dtype)


def chunk_backward(q, k, v, g, state, d_out, d_state, dtype=jnp.float32):
  """Reverse of `chunk_forward` given the state entering the chunk, d_out [C, V] and d_state [K, V] (the
  cotangent of the state leaving it) -> (dq, dk, dv, cotangent of the entering state, gate term [C, Kg] or None).

  The gate term is x_t = q_t * dq_t - k_t * dk_t (summed over K for a fixed decay): d log_gates is its reverse
  cumulative sum over the whole sequence plus sum_V(S_T * dS_T) (see `gate_grad_chunk`), because g_t enters
  only through the cumulative log gate B_t, as q_t e^(B_t), k_t e^(-B_t) and S_T = e^(B_T) (...).
  """
  terms = _gate_terms(g, q.shape[0])
  scores = _intra_scores(q, k, terms, dtype)
  d_scores = jnp.where(terms["causal"], mm_nt(d_out, v, dtype), 0.0)
  dv = mm_tn(scores, d_out, dtype)
  if g is None:
    dq = mm_nt(d_out, state, dtype) + mm(d_scores, k, dtype)
    dk = mm_nt(v, d_state, dtype) + mm_tn(d_scores, q, dtype)
    return dq, dk, dv + mm(k, d_state, dtype), d_state + mm_tn(q, d_out, dtype), None
  if "pairs" in terms:
    dq_intra = dk_intra = 0.0
    for q_factor, k_factor, mask in terms["pairs"]:
      d_pair = d_scores if mask is None else jnp.where(mask, d_scores, 0.0)
      dq_intra = dq_intra + mm(d_pair, k * k_factor, dtype) * q_factor
      dk_intra = dk_intra + mm_tn(d_pair, q * q_factor, dtype) * k_factor
  else:
    d_scores = d_scores * terms["decay"]
    dq_intra, dk_intra = mm(d_scores, k, dtype), mm_tn(d_scores, q, dtype)
  dq = mm_nt(d_out, state, dtype) * terms["to_start"] + dq_intra
  dk = mm_nt(v, d_state, dtype) * terms["to_end"] + dk_intra
  dv = dv + mm(k * terms["to_end"], d_state, dtype)
  d_state_in = terms["chunk_decay"] * d_state + mm_tn(q * terms["to_start"], d_out, dtype)
  gate_term = q * dq - k * dk
  if g.shape[1] == 1:
    gate_term = jnp.sum(gate_term, axis=1, keepdims=True)
  return dq, dk, dv, d_state_in, gate_term


def backward_matmul_dtype(dtype, has_gates: bool):
  """Matmul operand dtype of a backward kernel: the inputs' dtype, except f32 when there are gates, because
  d log_gates comes from q * dq - k * dk, a difference of nearly equal terms that would amplify bf16 rounding in
  dq, dk (measured on the bf16 GLA test: 7.6e-3 relative error with bf16 operands, 3.1e-3 with f32)."""
  return jnp.dtype(jnp.float32) if has_gates else jnp.dtype(dtype)


def gate_grad_init(final_state, d_final_state, gate_dim: int):
  """The suffix-sum carry before the last chunk: sum_V(S_T * dS_T) as a [1, Kg] row."""
  per_key = jnp.sum(final_state * d_final_state, axis=1, keepdims=True)  # [K, 1]
  if gate_dim == 1:
    return jnp.sum(per_key, axis=0, keepdims=True)
  return column_to_row(per_key)


def gate_grad_chunk(gate_term, carry):
  """(d log_gates of this chunk, carry for the previous chunk): suffix sums within the chunk plus the carry."""
  return cumsum_rows(gate_term, reverse=True) + carry, carry + jnp.sum(gate_term, axis=0, keepdims=True)
