"""The CPython standard library's own `.py` files as a text corpus -- present on every machine, no download.

Choices (fixed so numbers are comparable across machines running the same Python version):
- Files: every `*.py` under `sysconfig.get_paths()['stdlib']`, excluding `site-packages/` (installed packages
  differ per machine), `_sysconfigdata_*.py` (generated per build) and, by default, test directories (`test/`,
  `tests/`, `idle_test/`): they are half the files, full of deliberately odd encodings and syntax, and would
  dominate the corpus with repetitive test code. `include_tests=True` adds them.
- Order: sorted relative POSIX paths, so the file list is identical wherever the Python version is.
- Split: sha256 of the relative path -> a number in [0, 1); below `validation_fraction` (default 2%) is
  validation. A file keeps its split when other files are added or removed.
- Text: UTF-8 with undecodable bytes replaced (U+FFFD), so a model tokenizer always gets a `str`.
- Tokens: `tokenizer=None` means UTF-8 bytes (ids 0..255); any object with `encode(str) -> list[int]` (or a
  plain callable) works. Token arrays are cached in memory per (split, tokenizer, limits).
"""
from __future__ import annotations

import ast
import hashlib
import os
import platform
import sys
import sysconfig
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

SPLITS = ("train", "validation")
DEFAULT_VALIDATION_FRACTION = 0.02
_TEST_DIR_NAMES = frozenset({"test", "tests", "idle_test"})
_EXCLUDED_DIR_NAMES = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
  """The directory of the running interpreter's standard library."""
  return Path(sysconfig.get_paths()["stdlib"])


def _is_excluded(relative: Path, include_tests: bool) -> bool:
  directories = set(relative.parts[:-1])
  if directories & _EXCLUDED_DIR_NAMES:
    return True
  if not include_tests and directories & _TEST_DIR_NAMES:
    return True
  return relative.name.startswith("_sysconfigdata_")


def list_files(root: str | Path | None = None, *, include_tests: bool = False) -> list[str]:
  """Sorted relative POSIX paths of the corpus's `.py` files under `root` (default: the stdlib)."""
  root = stdlib_root() if root is None else Path(root)
  if not root.is_dir():
    raise ValueError(f"root={str(root)!r} is not a directory.")
  paths = []
  for directory, subdirectories, filenames in os.walk(root):
    # Prune excluded directories so os.walk never descends into site-packages' thousands of files.
    subdirectories[:] = [d for d in subdirectories if d not in _EXCLUDED_DIR_NAMES]
    for filename in filenames:
      if filename.endswith(".py"):
        relative = Path(directory, filename).relative_to(root)
        if not _is_excluded(relative, include_tests):
          paths.append(relative.as_posix())
  return sorted(paths)


def split_of(relative_path: str, validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> str:
  """'validation' or 'train', decided by a stable hash of the path alone."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  fraction = int.from_bytes(digest[:8], "big") / 2**64
  return "validation" if fraction < validation_fraction else "train"


def _check_fraction(validation_fraction: float) -> None:
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")


def split_files(split: str, root: str | Path | None = None, *, include_tests: bool = False,
                validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> list[str]:
  """The sorted relative paths of one split."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  _check_fraction(validation_fraction)
  return [p for p in list_files(root, include_tests=include_tests) if split_of(p, validation_fraction) == split]


def read_text(root: str | Path | None, relative_path: str) -> str:
  root = stdlib_root() if root is None else Path(root)
  return Path(root, relative_path).read_bytes().decode("utf-8", errors="replace")


# What of each file becomes a document: its source, or only its docstrings (module, class, function), an English
# prose corpus shifted from code -- what a fine-tuning experiment moves a code-and-web model onto.
TEXTS = ("source", "docstrings")


def docstrings_of(source: str) -> str:
  """The docstrings of a Python source (module, classes, functions; in file order, cleaned by
  `inspect.cleandoc`), separated by blank lines; '' for a file without any or one that does not parse."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return ""
  kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  nodes = sorted((n for n in ast.walk(tree) if isinstance(n, kinds)), key=lambda n: getattr(n, "lineno", 0))
  texts = [ast.get_docstring(n, clean=True) for n in nodes]
  return "\n\n".join(t for t in texts if t)


def corpus_info(root: str | Path | None = None, *, include_tests: bool = False,
                validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> dict[str, Any]:
  """What the corpus is, to record beside every result: Python version, root, file counts and bytes per split."""
  root = stdlib_root() if root is None else Path(root)
  info: dict[str, Any] = {
      "python_version": platform.python_version(),
      "python_implementation": platform.python_implementation(),
      "version_info": list(sys.version_info[:3]),
      "root": str(root),
      "include_tests": include_tests,
      "validation_fraction": validation_fraction,
      "files": {},
      "bytes": {},
  }
  _check_fraction(validation_fraction)
  for path in list_files(root, include_tests=include_tests):
    split = split_of(path, validation_fraction)
    info["files"][split] = info["files"].get(split, 0) + 1
    info["bytes"][split] = info["bytes"].get(split, 0) + Path(root, path).stat().st_size
  for split in SPLITS:
    info["files"].setdefault(split, 0)
    info["bytes"].setdefault(split, 0)
  return info


Tokenizer = Any  # an object with `encode(str) -> Sequence[int]`, a callable str -> Sequence[int], or None (bytes)


def _encoder(tokenizer: Tokenizer) -> Callable[[str], np.ndarray]:
  if tokenizer is None:
    return lambda text: np.frombuffer(text.encode("utf-8", errors="replace"), np.uint8).astype(np.int32)
  encode = getattr(tokenizer, "encode", tokenizer)
  if not callable(encode):
    raise ValueError(f"tokenizer must have encode(str) -> list[int] or be callable, got {type(tokenizer)}.")
  # A Hugging Face `tokenizers.Tokenizer` returns an Encoding; its ids are what we want.
  return lambda text: np.asarray(getattr(encoded := encode(text), "ids", encoded), np.int32).reshape(-1)


# (split, id(tokenizer), limits...) -> (tokenizer, documents). The tokenizer is kept in the value so its id
# cannot be reused by another object while the entry lives.
_TOKEN_CACHE: dict[tuple, tuple[Tokenizer, list[np.ndarray]]] = {}


def tokenized_documents(split: str, tokenizer: Tokenizer = None, *, root: str | Path | None = None,
                        include_tests: bool = False, validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
                        max_files: int | None = None, max_tokens: int | None = None,
                        eos_id: int | None = None, text: str = "source") -> list[np.ndarray]:
  """One int32 token array per file of `split`, in sorted path order (cached in memory).

  `text` (TEXTS): 'source' (the whole file) or 'docstrings' (`docstrings_of` the file; files without any are
  skipped). The split is by file path either way, so docstrings and sources of one file share a split.
  `max_files` keeps the first files; `max_tokens` stops once that many tokens are collected (the last document
  is cut), so a quick run never tokenizes the whole library. `eos_id`, when given, ends every document.
  Empty files are dropped. Treat the returned arrays as read-only: they are shared through the cache.
  """
  if max_files is not None and max_files < 1:
    raise ValueError(f"max_files must be >= 1 or None, got {max_files}.")
  if max_tokens is not None and max_tokens < 1:
    raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}.")
  if text not in TEXTS:
    raise ValueError(f"text={text!r} must be one of {TEXTS}.")
  root_key = str(stdlib_root() if root is None else Path(root))
  key = (split, id(tokenizer), root_key, include_tests, validation_fraction, max_files, max_tokens, eos_id, text)
  if key in _TOKEN_CACHE:
    return _TOKEN_CACHE[key][1]
  encode = _encoder(tokenizer)
  paths = split_files(split, root, include_tests=include_tests, validation_fraction=validation_fraction)
  documents: list[np.ndarray] = []
  collected = 0
  for path in paths[:max_files]:
    content = read_text(root, path)
    content = docstrings_of(content) if text == "docstrings" else content
    if not content:
      continue
    tokens = encode(content)
    if eos_id is not None:
      tokens = np.append(tokens, np.int32(eos_id))
    if max_tokens is not None:
      tokens = tokens[:max_tokens - collected]
    if tokens.size:
      tokens.flags.writeable = False
      documents.append(tokens)
      collected += tokens.size
    if max_tokens is not None and collected >= max_tokens:
      break
  if not documents:
    raise ValueError(f"split {split!r} under {root_key!r} has no tokens (max_files={max_files}).")
  _TOKEN_CACHE[key] = (tokenizer, documents)
  return documents


def clear_cache() -> None:
  """Drops every cached token array (e.g. after tokenizing with a throwaway tokenizer)."""
  _TOKEN_CACHE.clear()
