"""Packing token documents into fixed [B, T] rows with segment ids, and deterministic resumable batches.

Every document of n tokens becomes n - 1 (input, next-token target) pairs; the pairs of all documents are laid
end to end and the stream is cut into rows of `seq_len`. So:
- no row holds padding except the last row of an epoch (throughput), and a document longer than a row (or one
  that crosses a row boundary) is split into chunks that continue in the next row;
- within a row, `segment_ids` number the document chunks 1, 2, 3, … (0 is padding) and `positions` restart at 0
  at each chunk, so attention never crosses a document or chunk boundary;
- every non-padding position has a target from its own document: `loss_mask = segment_ids > 0`, and there is
  no loss on padding nor across a document boundary by construction.

A batch is a dict of numpy arrays: `tokens, targets, segment_ids, positions` (int32 [B, T]) and `loss_mask`
(float32 [B, T]). `PackedDataset.batch(step)` is a pure function of (seed, step): documents and rows are
shuffled per epoch by seed-derived permutations, and a batch is gathered directly, without replaying history.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence

import numpy as np

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


class _PairStream:
  """The (input, target) pairs of `documents`, addressable by position in any document order."""

  def __init__(self, documents: Sequence[np.ndarray], pad_id: int = 0):
    documents = [np.asarray(d).reshape(-1) for d in documents]
    for i, document in enumerate(documents):
      if not np.issubdtype(document.dtype, np.integer):
        raise ValueError(f"documents[{i}] must hold integer token ids, got dtype {document.dtype}.")
    # Single-token documents have no next-token pair and are dropped.
    documents = [d for d in documents if d.size >= 2]
    if not documents:
      raise ValueError("documents must contain at least one document of >= 2 tokens.")
    lengths = np.array([d.size for d in documents], np.int64)
    self.flat = np.concatenate(documents).astype(np.int32)
    self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    self.pair_counts = lengths - 1
    self.num_documents = len(documents)
    self.num_pairs = int(self.pair_counts.sum())
    self.pad_id = pad_id

  def boundaries(self, order: np.ndarray) -> np.ndarray:
    """[D + 1] stream offsets where each document (in `order`) starts; the last entry is the total."""
    return np.concatenate([[0], np.cumsum(self.pair_counts[order])])

  def rows(self, order: np.ndarray, boundaries: np.ndarray, row_indices: np.ndarray, seq_len: int) -> dict:
    """Rows `row_indices` (cut every `seq_len` pairs of the stream in document `order`)."""
    row_starts = np.asarray(row_indices, np.int64)[:, None] * seq_len
    stream = row_starts + np.arange(seq_len)  # [R, T] positions in the pair stream
    valid = stream < self.num_pairs
    stream = np.where(valid, stream, 0)
    slot = np.searchsorted(boundaries, stream, side="right") - 1  # document slot in `order`
    chunk_start = np.maximum(boundaries[slot], row_starts)  # where this document's chunk in the row begins
    token_index = self.starts[order[slot]] + (stream - boundaries[slot])
    first_slot = slot[:, :1]
    return {
        "tokens": np.where(valid, self.flat[token_index], self.pad_id).astype(np.int32),
        "targets": np.where(valid, self.flat[token_index + 1], self.pad_id).astype(np.int32),
        "segment_ids": np.where(valid, slot - first_slot + 1, 0).astype(np.int32),
        "positions": np.where(valid, stream - chunk_start, 0).astype(np.int32),
        "loss_mask": valid.astype(np.float32),
    }


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def pack_documents(documents: Sequence[np.ndarray], seq_len: int, *, pad_id: int = 0) -> dict[str, np.ndarray]:
  """All documents, in the given order, packed into ceil(pairs / seq_len) rows of `seq_len`."""
  _check_positive(seq_len=seq_len)
  stream = _PairStream(documents, pad_id)
  order = np.arange(stream.num_documents)
  num_rows = -(-stream.num_pairs // seq_len)
  return stream.rows(order, stream.boundaries(order), np.arange(num_rows), seq_len)


class BatchSource(Protocol):
  """What `BatchIterator` and `efficient.train` need from a dataset: a seed and a pure `batch(step)`."""
  seed: int

  def batch(self, step: int) -> dict[str, np.ndarray]: ...


class PackedDataset:
  """Endless packed batches of `documents`; `batch(step)` depends on (seed, step) only.

  Epoch e uses the document order `permutation(seed, e)` and visits its rows in the order
  `permutation(seed, e, 'rows')`, so consecutive rows of a batch rarely come from the same long document.
  With `shuffle=False` epochs repeat the documents and rows in their given order (evaluation).
  """

  def __init__(self, documents: Sequence[np.ndarray], batch_size: int, seq_len: int, *, seed: int = 0,
               shuffle: bool = True, pad_id: int = 0):
    _check_positive(batch_size=batch_size, seq_len=seq_len)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    self.batch_size, self.seq_len, self.seed, self.shuffle = batch_size, seq_len, int(seed), shuffle
    self._stream = _PairStream(documents, pad_id)
    self.rows_per_epoch = -(-self._stream.num_pairs // seq_len)
    self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

  @property
  def tokens_per_epoch(self) -> int:
    """Number of (input, target) pairs -- loss tokens -- in one pass over the documents."""
    return self._stream.num_pairs

  @property
  def steps_per_epoch(self) -> float:
    return self.rows_per_epoch / self.batch_size

  def _epoch(self, epoch: int):
    """(document order, stream boundaries, row order) of one epoch, cached for the two latest epochs."""
    if epoch not in self._epochs:
      num_documents = self._stream.num_documents
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(num_documents)
        row_order = np.random.default_rng([self.seed, epoch, 1]).permutation(self.rows_per_epoch)
      else:
        order, row_order = np.arange(num_documents), np.arange(self.rows_per_epoch)
      if len(self._epochs) >= 2:
        self._epochs.pop(min(self._epochs))
      self._epochs[epoch] = (order, self._stream.boundaries(order), row_order)
    return self._epochs[epoch]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch at `step` (rows step*B … step*B + B - 1 of the endless epoch sequence)."""
    if not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step must be a non-negative integer, got {step!r}.")
    global_rows = int(step) * self.batch_size + np.arange(self.batch_size)
    epochs = global_rows // self.rows_per_epoch
    parts = []
    for epoch in np.unique(epochs):  # a batch spans at most a few epochs
      order, boundaries, row_order = self._epoch(int(epoch))
      rows_in_epoch = row_order[global_rows[epochs == epoch] % self.rows_per_epoch]
      parts.append(self._stream.rows(order, boundaries, rows_in_epoch, self.seq_len))
    return {key: np.concatenate([part[key] for part in parts]) for key in BATCH_KEYS}

  def epoch_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """One pass over every row in document order (no shuffle); the last batch is padded with empty rows.

    This is what evaluation wants: each pair is seen exactly once, padding carries zero loss weight.
    """
    order = np.arange(self._stream.num_documents)
    boundaries = self._stream.boundaries(order)
    for first in range(0, self.rows_per_epoch, self.batch_size):
      # Rows past the end fall entirely beyond the stream and come out as padding.
      rows = np.arange(first, first + self.batch_size)
      yield self._stream.rows(order, boundaries, rows, self.seq_len)


class BatchIterator:
  """A resumable iterator over `source.batch(step)`; its whole state is `{'seed', 'step'}`."""

  def __init__(self, source: BatchSource, step: int = 0):
    self.source = source
    self.step = int(step)

  @property
  def state(self) -> dict[str, int]:
    return {"seed": int(self.source.seed), "step": self.step}

  def restore(self, state: dict[str, Any]) -> "BatchIterator":
    """Continues from `state`; refuses a state written with another seed (it would be other data)."""
    if int(state["seed"]) != int(self.source.seed):
      raise ValueError(f"iterator state has seed {state['seed']} but the dataset's seed is {self.source.seed}.")
    self.step = int(state["step"])
    return self

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.source.batch(self.step)
    self.step += 1
    return batch
