"""MQAR, multi-query associative recall (Arora et al., Zoology 2023; used again in Based 2024).

A sequence starts with `num_kv_pairs` key-value pairs `k1 v1 k2 v2 …`, followed by a query region where each
key appears once more, at a gap drawn from a power law (short gaps likelier, as in Zoology's `power_a`). The
model must emit the key's value right after the query key: targets exist only at the query positions.
Generation follows Zoology's `multiquery_ar`: keys are distinct draws from `[1, vocab/2)`, values distinct
draws from `[vocab/2, vocab)`, queries sit on even offsets of the query region, and every other query-region
slot is a uniformly random token (`random_non_queries=True`) or 0.

Batches use the packed-text layout (`tokens, targets, segment_ids, positions, loss_mask`) so the same train
step runs both; `batch(step)` depends on (seed, step) only.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class MQARDataset:
  vocab_size: int = 8192
  num_kv_pairs: int = 8
  seq_len: int = 256
  batch_size: int = 64
  seed: int = 0
  power_a: float = 0.01
  random_non_queries: bool = True

  def __post_init__(self):
    for name in ("vocab_size", "num_kv_pairs", "seq_len", "batch_size"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"MQARDataset.{name} must be a positive integer, got {value!r}.")
    if self.seed < 0:
      raise ValueError(f"MQARDataset.seed must be >= 0, got {self.seed}.")
    if not 0 < self.power_a <= 1:
      raise ValueError(f"MQARDataset.power_a must be in (0, 1], got {self.power_a}.")
    # Distinct keys come from [1, vocab/2) and distinct values from [vocab/2, vocab).
    if self.vocab_size // 2 - 1 < self.num_kv_pairs:
      raise ValueError(f"MQARDataset.vocab_size={self.vocab_size} is too small for num_kv_pairs="
                       f"{self.num_kv_pairs} distinct keys; need vocab_size >= {2 * (self.num_kv_pairs + 1)}.")
    # The query region holds (seq_len - 2K) // 2 even slots, one per key at least.
    if self.seq_len < 4 * self.num_kv_pairs:
      raise ValueError(f"MQARDataset.seq_len={self.seq_len} must be >= 4 * num_kv_pairs "
                       f"({4 * self.num_kv_pairs}) to fit the pairs and their queries.")

  @property
  def query_slots(self) -> int:
    return (self.seq_len - 2 * self.num_kv_pairs) // 2

  def gap_probabilities(self) -> np.ndarray:
    """Zoology's power law over query slots: p(i) ∝ a * i^(a - 1), i = 1 … query_slots."""
    p = self.power_a * np.arange(1, self.query_slots + 1, dtype=np.float64) ** (self.power_a - 1)
    return p / p.sum()

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch at `step`: tokens/targets/segment_ids/positions int32 [B, T], loss_mask float32 [B, T]."""
    if not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step must be a non-negative integer, got {step!r}.")
    rng = np.random.default_rng([self.seed, int(step)])
    batch, length, pairs = self.batch_size, self.seq_len, self.num_kv_pairs
    half = self.vocab_size // 2

    def distinct(low, high):  # `pairs` distinct integers from [low, high) per row
      return np.argsort(rng.random((batch, high - low)), axis=1)[:, :pairs] + low

    keys, values = distinct(1, half), distinct(half, self.vocab_size)
    # Weighted sampling without replacement by the Gumbel top-k trick (same law as np.random.choice's).
    gumbel = rng.gumbel(size=(batch, self.query_slots))
    gaps = np.argsort(-(np.log(self.gap_probabilities()) + gumbel), axis=1)[:, :pairs]

    tokens = np.zeros((batch, length), np.int64)
    tokens[:, 0:2 * pairs:2], tokens[:, 1:2 * pairs:2] = keys, values
    query_positions = 2 * pairs + 2 * gaps
    np.put_along_axis(tokens, query_positions, keys, axis=1)
    targets = np.zeros((batch, length), np.int64)
    np.put_along_axis(targets, query_positions, values, axis=1)
    loss_mask = np.zeros((batch, length), np.float32)
    np.put_along_axis(loss_mask, query_positions, 1.0, axis=1)
    if self.random_non_queries:
      noise = rng.integers(0, self.vocab_size, size=(batch, length))
      tokens = np.where(tokens == 0, noise, tokens)
    return {
        "tokens": tokens.astype(np.int32),
        "targets": targets.astype(np.int32),
        "segment_ids": np.ones((batch, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
        "loss_mask": loss_mask,
    }


def recall_accuracy(logits, batch: dict) -> float:
  """Fraction of query positions whose argmax prediction is the right value."""
  predictions = np.asarray(logits).argmax(-1)
  mask = np.asarray(batch["loss_mask"]) > 0
  if not mask.any():
    raise ValueError("batch has no query positions (loss_mask is all zero).")
  return float((predictions[mask] == np.asarray(batch["targets"])[mask]).mean())
