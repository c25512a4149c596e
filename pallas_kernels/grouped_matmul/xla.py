"""XLA grouped matmul: `jax.lax.ragged_dot` and its transposed form (`ragged_dot_general`, ragged contraction).

XLA lowers both to its own ragged-dot implementation (on CPU a per-group loop; on GPU/TPU a grouped GEMM);
rows past sum(group_sizes) produce zeros, an empty group's weight gradient is zero.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# lhs [M, K] and grad [M, N] contract over M, which is ragged: one [K, N] result per group.
_RAGGED_CONTRACTION = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def grouped_matmul(lhs, rhs, group_sizes, *, out_dtype):
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def transposed_grouped_matmul(lhs, grad, group_sizes, *, out_dtype):
  out = jax.lax.ragged_dot_general(lhs, grad, group_sizes.astype(jnp.int32), _RAGGED_CONTRACTION,
                                   preferred_element_type=jnp.float32)
  return out.astype(out_dtype)
