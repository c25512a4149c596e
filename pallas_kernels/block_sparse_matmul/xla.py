"""XLA block-sparse matmul: gather the x blocks each stored block multiplies, one batched einsum per column block.

Work and memory scale with the stored blocks (padded to the fullest column block, `Tc`), not with K x N. Plain
jnp, so autodiff gives dx and the gradient of the stored block values only (the gather's transpose is a
scatter-add into [nnz, bk, bn]); no custom_vjp is needed.
"""
from __future__ import annotations

import jax.numpy as jnp


def matmul_2d(x, w, *, out_dtype):
  """`x [M, K] @ w` for a BlockSparseMatrix `w` with at least one stored block -> [M, N] in `out_dtype`."""
  m = x.shape[0]
  (bk, bn), (kb, nb) = w.block_shape, w.grid_shape
  x_blocks = x.reshape(m, kb, bk)
  ids = w.col_slots                                                  # [Nb, Tc]
  valid = jnp.arange(ids.shape[1])[None, :] < w.col_counts[:, None]  # padding slots contribute nothing
  gathered_x = x_blocks[:, w.block_row[ids]]                         # [M, Nb, Tc, bk]
  gathered_w = jnp.where(valid[..., None, None], w.values[ids], 0).astype(x.dtype)  # [Nb, Tc, bk, bn]
  out = jnp.einsum("mjtk,jtkn->mjn", gathered_x, gathered_w, preferred_element_type=jnp.float32)
  return out.reshape(m, nb * bn).astype(out_dtype)
