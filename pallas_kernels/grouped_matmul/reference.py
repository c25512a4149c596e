"""Plain-jnp grouped matmul: one dense product per group, masked to the group's rows (the ground truth).

Rows of lhs are sorted by group: group g owns rows [sum(group_sizes[:g]), sum(group_sizes[:g+1])); rows past
sum(group_sizes) belong to no group. Products accumulate in f32.
"""
from __future__ import annotations

import jax.numpy as jnp


def group_row_masks(group_sizes, num_rows: int):
  """[G, num_rows] bool: mask[g, r] is True when row r belongs to group g."""
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  rows = jnp.arange(num_rows)
  return (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])


def grouped_matmul(lhs, rhs, group_sizes, *, out_dtype):
  """out [M, N]: out[r] = lhs[r] @ rhs[g] for the group g owning row r; zeros for rows in no group."""
  masks = group_row_masks(group_sizes, lhs.shape[0])
  out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
  for group in range(rhs.shape[0]):
    product = jnp.dot(lhs, rhs[group], preferred_element_type=jnp.float32)
    out = jnp.where(masks[group][:, None], product, out)
  return out.astype(out_dtype)


def transposed_grouped_matmul(lhs, grad, group_sizes, *, out_dtype):
  """out [G, K, N]: out[g] = lhs[rows of g].T @ grad[rows of g] (zeros for an empty group)."""
  masks = group_row_masks(group_sizes, lhs.shape[0])
  per_group = [jnp.dot(jnp.where(mask[:, None], lhs, 0).T, grad, preferred_element_type=jnp.float32)
               for mask in masks]
  return jnp.stack(per_group).astype(out_dtype)
