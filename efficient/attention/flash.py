"""Flash attention as an `AttentionFn` (`pallas_kernels.flash_attention`), sharded per (batch row, head).

The model's attention contract is positional: key j is visible to query i iff kv_position[j] <= q_position[i]
(and the segment ids agree). Flash attention is index-causal instead (last query aligned with the last key).
The two agree in the training / prefill-without-cache case this adapter is for: q, k and v come from the same
T tokens and positions count 0, 1, ..., up within each contiguous segment (what `efficient.data.packing`
produces). Positions are therefore not read. With a KV cache (decoding, or a prefill written into a cache of
max_len slots) keys are not index-aligned with queries: the cache's `update_and_attend` handles that (the
positional reference, or `flash_decode` for one-token steps).

One difference on padding: packed rows mark padding as segment 0 with every position 0; the positional mask lets
padding tokens see each other in both directions, the index-causal one only backwards. Padding outputs differ,
real tokens do not (and losses are masked on padding).

Under a mesh (`jax.set_mesh`), the kernel runs inside `jax.shard_map`: a Pallas call is an opaque custom call
that GSPMD cannot partition (it would gather q/k/v onto every device), while attention is independent per
(batch row, head). So each device gets its batch rows (split over the data-like axes) and heads (split over
`tensor`) and runs the kernel locally; a dimension a mesh axis does not divide stays whole. Query and kv heads
are split by the same factor, so query head h still reads kv head h // (H // H_kv) within each shard.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from efficient import sharding
from pallas_kernels.flash_attention import flash_attention, flash_decode

# Activation layout inside attention: [batch, length, heads, head_dim]; k/v heads must split like q heads.
_ACTIVATION_RULES = (("batch", ("data", "fsdp")), ("heads", "tensor"))


def flash_attention_fn(implementation: str | None = None, **block_kwargs):
  """Returns an `AttentionFn` (see `efficient.attention.core.AttentionFn`) running causal flash attention, and
  refusing keys that are not the queries' own tokens (use `softmax_attention_fn`, which falls back to the
  positional reference there, or a cache's `update_and_attend`).

  `implementation` and `block_kwargs` (block_q, block_kv) are passed to `flash_attention`; segment ids, when
  the model gets them, become the (q_segment_ids, kv_segment_ids) pair.
  """
  _check_block_kwargs("flash_attention_fn", block_kwargs)

  def attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None):
    del q_positions, kv_positions  # index-causal == position-causal for the training/prefill case (see above)
    if q.shape[1] != k.shape[1]:
      raise ValueError(f"flash_attention_fn: queries ({q.shape[1]}) and keys ({k.shape[1]}) must be the same "
                       f"tokens (training / prefill without a cache); decode through the cache or with "
                       f"softmax_attention_fn.")
    return self_attention(q, k, v, q_segment_ids, kv_segment_ids, implementation=implementation,
                          **block_kwargs)

  return attention


def _check_block_kwargs(where: str, block_kwargs) -> None:
  unknown = set(block_kwargs) - {"block_q", "block_kv"}
  if unknown:
    raise ValueError(f"{where}: unexpected keyword arguments {sorted(unknown)}; "
                     f"only block_q and block_kv are passed through.")


def self_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, causal=True, sliding_window=None,
                   implementation=None, **block_kwargs):
  """`flash_attention` of q, k, v that are the same T tokens; under a mesh it runs per shard (see above)."""
  segments = () if q_segment_ids is None else (q_segment_ids, kv_segment_ids)

  def local(q, k, v, *segments):
    return flash_attention(q, k, v, causal=causal, sliding_window=sliding_window, segment_ids=segments or None,
                           implementation=implementation, **block_kwargs)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q, k, v, *segments)
  qkv_spec = activation_spec(mesh, q.shape, k.shape)
  segment_spec = PartitionSpec(qkv_spec[0], None)
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (segment_spec,) * len(segments),
                       out_specs=qkv_spec, check_vma=False)(q, k, v, *segments)


def decode(q, k_cache, v_cache, lengths, *, implementation=None):
  """`flash_decode` of one query step q [B, H, D] over cache rows [0, lengths) of k/v [B, S, H_kv, D]; under a
  mesh per (batch row, head) shard like `self_attention`."""
  mesh = jax.sharding.get_abstract_mesh()
  local = lambda q, k, v, lengths: flash_decode(q, k, v, lengths, implementation=implementation)
  if mesh.empty or mesh.size == 1:
    return local(q, k_cache, v_cache, lengths)
  batch, heads, head_dim = q.shape
  kv_spec = activation_spec(mesh, (batch, 1, heads, head_dim), k_cache.shape)
  q_spec = PartitionSpec(kv_spec[0], kv_spec[2], None)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(kv_spec[0])),
                       out_specs=q_spec, check_vma=False)(q, k_cache, v_cache, lengths)


def activation_spec(mesh, q_shape, kv_shape) -> PartitionSpec:
  """PartitionSpec of q/k/v [B, T, H, D] on `mesh`: batch over the data-like axes, heads over `tensor` when
  the axis divides both the query and the kv head counts (else heads stay whole), length and head_dim whole."""
  spec = sharding.logical_to_spec(("batch", "length", "heads", None), _ACTIVATION_RULES, shape=q_shape, mesh=mesh)
  kv_spec = sharding.logical_to_spec(("batch", "length", "heads", None), _ACTIVATION_RULES, shape=kv_shape,
                                     mesh=mesh)
  return spec if spec[2] == kv_spec[2] else PartitionSpec(spec[0], None, None, None)
