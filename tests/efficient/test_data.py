"""The stdlib corpus, packing with segment ids, and deterministic resumable batches."""
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from efficient import data
from efficient.data import corpus


# --- corpus -----------------------------------------------------------------------------------------------

def test_file_list_is_sorted_relative_and_excludes_site_packages_and_tests():
  files = data.list_files()
  assert files == sorted(files) and len(files) > 300
  assert "os.py" in files and "json/decoder.py" in files
  assert not any(f.startswith("/") or "site-packages" in f or "__pycache__" in f for f in files)
  assert not any({"test", "tests", "idle_test"} & set(f.split("/")[:-1]) for f in files)
  assert not any(Path(f).name.startswith("_sysconfigdata_") for f in files)
  with_tests = data.list_files(include_tests=True)
  assert set(files) < set(with_tests) and any(f.startswith("test/") for f in with_tests)


def test_split_is_a_stable_hash_of_the_path():
  files = data.list_files()
  validation = data.split_files("validation")
  train = data.split_files("train")
  assert sorted(validation + train) == files and not set(validation) & set(train)
  for path in files[:50] + validation:
    fraction = int(hashlib.sha256(path.encode()).hexdigest()[:16], 16) / 2**64
    assert data.split_of(path) == ("validation" if fraction < 0.02 else "train")
  assert 0.005 < len(validation) / len(files) < 0.05
  assert data.split_files("validation", validation_fraction=0.5) != validation


def test_corpus_info_records_version_counts_and_bytes():
  info = data.corpus_info()
  assert info["python_version"] == "{}.{}.{}".format(*sys.version_info[:3])
  assert info["files"]["validation"] == len(data.split_files("validation"))
  assert info["files"]["train"] + info["files"]["validation"] == len(data.list_files())
  root = data.stdlib_root()
  assert info["bytes"]["validation"] == sum((root / p).stat().st_size for p in data.split_files("validation"))


def test_byte_tokens_are_the_files_utf8_bytes_and_limits_apply():
  documents = data.tokenized_documents("validation")
  paths = data.split_files("validation")
  first = (data.stdlib_root() / paths[0]).read_bytes()
  np.testing.assert_array_equal(documents[0], np.frombuffer(first, np.uint8))
  assert documents[0].dtype == np.int32
  assert data.tokenized_documents("validation") is documents  # cached
  assert len(data.tokenized_documents("validation", max_files=2)) == 2
  limited = data.tokenized_documents("validation", max_tokens=1000)
  assert sum(d.size for d in limited) == 1000
  np.testing.assert_array_equal(limited[0], documents[0][:1000])
  with_eos = data.tokenized_documents("validation", max_files=1, eos_id=7)
  assert with_eos[0][-1] == 7 and with_eos[0].size == documents[0].size + 1


class _WordTokenizer:
  """A stand-in model tokenizer: one id per whitespace-separated word length."""

  def encode(self, text):
    return [min(len(word), 99) for word in text.split()]


def test_model_tokenizer_object_or_callable():
  tokenizer = _WordTokenizer()
  documents = data.tokenized_documents("validation", tokenizer, max_files=3)
  text = (data.stdlib_root() / data.split_files("validation")[0]).read_text("utf-8", errors="replace")
  np.testing.assert_array_equal(documents[0], tokenizer.encode(text))
  from_callable = data.tokenized_documents("validation", tokenizer.encode, max_files=3)
  np.testing.assert_array_equal(from_callable[2], documents[2])


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="dev"), "split"),
    (dict(split="train", validation_fraction=1.5), "validation_fraction"),
    (dict(split="train", max_files=0), "max_files"),
    (dict(split="train", max_tokens=-1), "max_tokens"),
    (dict(split="train", tokenizer=42), "tokenizer"),
])
def test_corpus_argument_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    data.tokenized_documents(**kwargs)


# --- packing ----------------------------------------------------------------------------------------------

def test_pack_documents_by_hand():
  documents = [np.array([1, 2, 3]), np.array([4, 5]), np.array([9]), np.array([6, 7, 8, 9, 10])]
  packed = data.pack_documents(documents, seq_len=4, pad_id=0)
  # Pairs: (1,2)(2,3) | (4,5) | [9] has none | (6,7)(7,8)(8,9)(9,10); the last document crosses the row end.
  np.testing.assert_array_equal(packed["tokens"], [[1, 2, 4, 6], [7, 8, 9, 0]])
  np.testing.assert_array_equal(packed["targets"], [[2, 3, 5, 7], [8, 9, 10, 0]])
  np.testing.assert_array_equal(packed["segment_ids"], [[1, 1, 2, 3], [1, 1, 1, 0]])
  np.testing.assert_array_equal(packed["positions"], [[0, 1, 0, 0], [0, 1, 2, 0]])
  np.testing.assert_array_equal(packed["loss_mask"], [[1, 1, 1, 1], [1, 1, 1, 0]])
  assert packed["tokens"].dtype == np.int32 and packed["loss_mask"].dtype == np.float32


def _reference_pack(documents, seq_len):
  """Row by row with Python lists: an independent statement of the packing rules."""
  pairs = [(int(d[i]), int(d[i + 1]), doc) for doc, d in enumerate(documents) for i in range(len(d) - 1)]
  rows = []
  for start in range(0, len(pairs), seq_len):
    chunk = pairs[start:start + seq_len]
    segment, position, previous = 0, 0, None
    row = []
    for token, target, doc in chunk:
      if doc != previous:
        segment, position, previous = segment + 1, 0, doc
      row.append((token, target, segment, position, 1.0))
      position += 1
    row += [(0, 0, 0, 0, 0.0)] * (seq_len - len(row))
    rows.append(row)
  return {key: np.array([[entry[i] for entry in row] for row in rows]) for i, key in enumerate(data.BATCH_KEYS)}


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_pack_documents_matches_a_reference(seq_len):
  rng = np.random.default_rng(0)
  documents = [rng.integers(1, 50, size=rng.integers(1, 150)) for _ in range(20)]
  packed = data.pack_documents(documents, seq_len)
  expected = _reference_pack(documents, seq_len)
  for key in data.BATCH_KEYS:
    np.testing.assert_array_equal(packed[key], expected[key], err_msg=key)


def _dataset(batch_size=4, seq_len=16, seed=0, **kwargs):
  rng = np.random.default_rng(1)
  # 25 documents of 2..60 tokens whose token ids encode (document, index): every pair is traceable.
  documents = [np.arange(n) + 1000 * doc for doc, n in enumerate(rng.integers(2, 60, size=25))]
  return data.PackedDataset(documents, batch_size, seq_len, seed=seed, **kwargs), documents


def test_batch_is_a_pure_function_of_seed_and_step():
  dataset, documents = _dataset()
  later = dataset.batch(37)
  fresh, _ = _dataset()
  for step in (5, 0, 37):  # any order, fresh object: same batches
    for key in data.BATCH_KEYS:
      np.testing.assert_array_equal(fresh.batch(step)[key], dataset.batch(step)[key])
  np.testing.assert_array_equal(later["tokens"], fresh.batch(37)["tokens"])
  other_seed, _ = _dataset(seed=1)
  assert not np.array_equal(other_seed.batch(0)["tokens"], dataset.batch(0)["tokens"])


def test_each_epoch_covers_every_pair_once_in_a_new_order():
  dataset, documents = _dataset(batch_size=1)
  expected = sorted((int(d[i]), int(d[i + 1])) for d in documents for i in range(len(d) - 1))
  epochs = []
  for epoch in range(2):
    rows = [dataset.batch(epoch * dataset.rows_per_epoch + r) for r in range(dataset.rows_per_epoch)]
    pairs = [(int(t), int(y)) for b in rows for t, y, m in zip(b["tokens"][0], b["targets"][0], b["loss_mask"][0])
             if m]
    assert sorted(pairs) == expected
    # Targets are the next token of the same document: ids encode (document, index).
    assert all(y == t + 1 for t, y in pairs)
    epochs.append([b["tokens"][0].tolist() for b in rows])
  assert epochs[0] != epochs[1]
  assert dataset.tokens_per_epoch == len(expected)


def test_segments_and_positions_restart_at_each_document_chunk():
  dataset, _ = _dataset(batch_size=8, seq_len=32)
  batch = dataset.batch(3)
  for tokens, segments, positions in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
    for i in range(1, len(tokens)):
      if segments[i] == 0:
        continue
      same_document = tokens[i] // 1000 == tokens[i - 1] // 1000 and segments[i] == segments[i - 1]
      assert positions[i] == (positions[i - 1] + 1 if same_document else 0)
      assert segments[i] in (segments[i - 1], segments[i - 1] + 1)
    assert segments[0] == 1 and positions[0] == 0


def test_epoch_batches_visit_everything_once_without_shuffle():
  dataset, documents = _dataset(batch_size=3)
  batches = list(dataset.epoch_batches())
  assert len(batches) == -(-dataset.rows_per_epoch // 3)
  assert sum(b["loss_mask"].sum() for b in batches) == dataset.tokens_per_epoch
  packed = data.pack_documents(documents, 16)
  np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches])[:dataset.rows_per_epoch],
                                packed["tokens"])


def test_iterator_state_and_restore():
  dataset, _ = _dataset()
  iterator = data.BatchIterator(dataset)
  for _ in range(3):
    next(iterator)
  assert iterator.state == {"seed": 0, "step": 3}
  resumed = data.BatchIterator(_dataset()[0]).restore(iterator.state)
  np.testing.assert_array_equal(next(resumed)["tokens"], next(iterator)["tokens"])
  with pytest.raises(ValueError, match="seed"):
    data.BatchIterator(_dataset(seed=5)[0]).restore({"seed": 0, "step": 3})


def test_stdlib_dataset_quick_run():
  dataset = data.stdlib_dataset("train", batch_size=2, seq_len=64, max_files=3)
  batch = dataset.batch(0)
  assert batch["tokens"].shape == (2, 64) and batch["tokens"].max() < 256
  assert data.stdlib_dataset("validation", batch_size=2, seq_len=64, max_files=3).shuffle is False


@pytest.mark.parametrize("make, message", [
    (lambda: data.pack_documents([np.array([1, 2])], 0), "seq_len"),
    (lambda: data.pack_documents([np.array([1])], 4), "at least one document"),
    (lambda: data.pack_documents([np.array([1.5, 2.0])], 4), "integer"),
    (lambda: data.PackedDataset([np.array([1, 2])], 0, 4), "batch_size"),
    (lambda: data.PackedDataset([np.array([1, 2])], 1, 4, seed=-1), "seed"),
    (lambda: data.PackedDataset([np.array([1, 2])], 1, 4).batch(-1), "step"),
])
def test_packing_argument_errors(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_corpus_module_does_not_import_models():
  import ast
  for module in (corpus, data.packing, data.mqar, data):
    tree = ast.parse(Path(module.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not any(name.startswith("efficient.models") for name in imported)


def test_docstrings_corpus_keeps_only_docstrings_in_file_order():
  source = ('"""Module doc."""\nimport os\n\n\nclass A:\n  """Class doc.\n\n    indented line\n  """\n\n'
            '  def f(self):\n    """Method doc."""\n    return "not a docstring"\n\n\ndef g():\n  x = 1\n')
  assert data.docstrings_of(source) == "Module doc.\n\nClass doc.\n\nindented line\n\nMethod doc."
  assert data.docstrings_of("def broken(:\n") == ""
  documents = data.tokenized_documents("validation", text="docstrings", max_files=3)
  sources = [corpus.read_text(None, p) for p in corpus.split_files("validation")[:3]]
  assert len(documents) <= 3 and sum(d.size for d in documents) < sum(len(s.encode()) for s in sources) / 2
  with pytest.raises(ValueError, match="text='html'"):
    data.tokenized_documents("validation", text="html")
