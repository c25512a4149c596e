"""An `AttentionFn` for `efficient.models.llama` backed by `pallas_kernels.flash_attention`.

The model's attention contract is positional: key j is visible to query i iff kv_position[j] <= q_position[i]
(and the segment ids agree). Flash attention is index-causal instead (last query aligned with the last key).
The two agree in the training / prefill-without-cache case this adapter is for: q, k and v come from the same
T tokens and positions count 0, 1, ..., up within each contiguous segment (what `efficient.data.packing`
produces). Positions are therefore not read. With a KV cache (decoding, or a prefill written into a cache of
max_len slots) keys are not index-aligned with queries: keep `llama.softmax_attention` there, or call
`pallas_kernels.flash_attention.flash_decode` with per-sequence cache lengths for one-token steps.

One difference on padding: packed rows mark padding as segment 0 with every position 0; the positional mask lets
padding tokens see each other in both directions, the index-causal one only backwards. Padding outputs differ,
real tokens do not (and losses are masked on padding).
"""
from __future__ import annotations

from pallas_kernels.flash_attention import flash_attention


def flash_attention_fn(implementation: str | None = None, **block_kwargs):
  """Returns an `AttentionFn` (see `efficient.models.llama.AttentionFn`) running causal flash attention.

  `implementation` and `block_kwargs` (block_q, block_kv) are passed to `flash_attention`; segment ids, when
  the model gets them, become the (q_segment_ids, kv_segment_ids) pair.
  """
  unknown = set(block_kwargs) - {"block_q", "block_kv"}
  if unknown:
    raise ValueError(f"flash_attention_fn: unexpected keyword arguments {sorted(unknown)}; "
                     f"only block_q and block_kv are passed through.")

  def attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None):
    del q_positions, kv_positions  # index-causal == position-causal for the training/prefill case (see above)
    if q.shape[1] != k.shape[1]:
      raise ValueError(f"flash_attention_fn: queries ({q.shape[1]}) and keys ({k.shape[1]}) must be the same "
                       f"tokens (training / prefill without a cache); decode with llama.softmax_attention or "
                       f"flash_decode.")
    segment_ids = None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
    return flash_attention(q, k, v, causal=True, segment_ids=segment_ids, implementation=implementation,
                           **block_kwargs)

  return attention
