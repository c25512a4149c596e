"""Data: the CPython stdlib as a text corpus, packing with segment ids, synthetic tasks (MQAR).

Every dataset is a `BatchSource`: a `seed` and a pure `batch(step) -> dict` of numpy arrays
(`tokens, targets, segment_ids, positions` int32 [B, T] and `loss_mask` float32 [B, T]).
This package never imports `efficient.models`: a tokenizer is any object with `encode(str) -> list[int]`.
"""
from __future__ import annotations

from pathlib import Path

from efficient.data.corpus import (DEFAULT_VALIDATION_FRACTION, SPLITS, TEXTS, clear_cache, corpus_info,
                                   docstrings_of, list_files, split_files, split_of, stdlib_root,
                                   tokenized_documents)
from efficient.data.mqar import MQARDataset, recall_accuracy
from efficient.data.packing import BATCH_KEYS, BatchIterator, BatchSource, PackedDataset, pack_documents


def stdlib_dataset(split: str = "train", *, batch_size: int, seq_len: int, seed: int = 0, tokenizer=None,
                   shuffle: bool | None = None, max_files: int | None = None, max_tokens: int | None = None,
                   include_tests: bool = False, validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
                   eos_id: int | None = None, pad_id: int = 0, root: str | Path | None = None,
                   text: str = "source") -> PackedDataset:
  """Packed batches of one stdlib split (UTF-8 bytes unless `tokenizer` is given); `text='docstrings'` keeps
  only each file's docstrings (English prose: a corpus shifted from code, see `corpus.docstrings_of`).

  `shuffle` defaults to True for 'train' and False for 'validation'.
  """
  documents = tokenized_documents(split, tokenizer, root=root, include_tests=include_tests,
                                  validation_fraction=validation_fraction, max_files=max_files,
                                  max_tokens=max_tokens, eos_id=eos_id, text=text)
  shuffle = split == "train" if shuffle is None else shuffle
  return PackedDataset(documents, batch_size, seq_len, seed=seed, shuffle=shuffle, pad_id=pad_id)


__all__ = [
    "BATCH_KEYS", "BatchIterator", "BatchSource", "DEFAULT_VALIDATION_FRACTION", "MQARDataset", "PackedDataset",
    "SPLITS", "TEXTS", "clear_cache", "docstrings_of", "corpus_info", "list_files", "pack_documents", "recall_accuracy", "split_files",
    "split_of", "stdlib_dataset", "stdlib_root", "tokenized_documents",
]
