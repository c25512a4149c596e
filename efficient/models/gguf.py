"""Loading a Llama-architecture GGUF file (llama.cpp's format) into `efficient.models.llama.Llama`.

Layout facts this loader relies on (measured on SmolLM2-135M-Instruct.Q4_1.gguf, gguf 0.19):
- Tensor names: `token_embd.weight`, `output_norm.weight`, optional `output.weight` (absent: tied embeddings),
  and per block `blk.{i}.attn_norm / attn_q / attn_k / attn_v / attn_output / ffn_norm / ffn_gate / ffn_up /
  ffn_down .weight`.
- `gguf.quants.dequantize` returns each matrix as [out, in] (the reverse of the GGUF `ne` order), i.e. PyTorch
  layout: we transpose to our [in, out] kernels and reshape into head layouts.
- attn_q / attn_k rows are permuted by llama.cpp's converter so its interleaved (pairwise) RoPE applies; our
  model uses Hugging Face's rotate-half RoPE, so we undo that permutation (`unpermute_rope_rows`).
- Config keys: `{arch}.context_length, embedding_length, block_count, feed_forward_length,
  attention.head_count, attention.head_count_kv, rope.freq_base, attention.layer_norm_rms_epsilon,
  vocab_size` (falls back to the number of tokenizer tokens), optional `attention.key_length`.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient.models import llama
from efficient.models.tokenizer import Tokenizer


class GGUFError(ValueError):
  """A GGUF file that cannot be read or does not describe a model this loader supports."""


@functools.lru_cache(maxsize=None)
def _reader_class():
  import gguf  # Imported here so `import efficient.models` stays cheap.

  class PlainArrayReader(gguf.GGUFReader):
    """`gguf.GGUFReader`, parsing a plain ndarray view of the same memory map: np.memmap's per-slice
    `__array_finalize__` made reading SmolLM2's ~100k tokenizer strings take ~4 s; this takes ~1.5 s."""

    @property
    def data(self):
      return self._plain_data

    @data.setter
    def data(self, value):
      self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

  return PlainArrayReader


def open_gguf(path: str | os.PathLike):
  """A `gguf.GGUFReader` for `path`; any failure (missing, truncated, not a GGUF) raises one `GGUFError`
  naming the file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise GGUFError(f"{path}: no such GGUF file.")
  try:
    reader = _reader_class()(path, "r")
  except Exception as error:  # The gguf library raises ValueError/IndexError/struct errors on bad bytes.
    raise GGUFError(f"{path}: not a readable GGUF file (corrupt or truncated?): "
                    f"{type(error).__name__}: {error}") from error
  # The reader silently memory-maps whatever is there; make sure every tensor's bytes are inside the file.
  size = os.path.getsize(path)
  for tensor in reader.tensors:
    end = int(tensor.data_offset) + int(tensor.n_bytes)
    if end > size or tensor.data.nbytes != tensor.n_bytes:
      raise GGUFError(f"{path}: truncated GGUF file: tensor {tensor.name!r} needs bytes up to {end}, "
                      f"the file has {size}.")
  reader.source = path
  return reader


def read_metadata(reader) -> dict[str, Any]:
  """GGUF key/values as Python values (strings, numbers, lists), skipping the GGUF.* header fields."""
  metadata = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    try:
      metadata[key] = field.contents()
    except Exception as error:
      raise GGUFError(f"{getattr(reader, 'source', '<gguf>')}: cannot read metadata key {key!r}: {error}") from error
  return metadata


def _f32_value(value) -> float:
  # GGUF stores these as float32; take the shortest decimal (1e-05, not 9.999999747378752e-06), as the
  # original config had it.
  return float(str(np.float32(value)))


def config_from_metadata(metadata: dict[str, Any], *, source: str = "<metadata>", **overrides) -> llama.LlamaConfig:
  """A `LlamaConfig` from GGUF metadata; `overrides` replace fields (e.g. param_dtype, max_seq_len)."""
  arch = metadata.get("general.architecture")
  if arch != "llama":
    raise GGUFError(f"{source}: general.architecture is {arch!r}; only 'llama' is supported.")

  def get(key, default=None):
    full = f"{arch}.{key}"
    if full not in metadata:
      if default is not None:
        return default
      raise GGUFError(f"{source}: GGUF metadata has no {full!r}.")
    return metadata[full]

  embed_dim, num_heads = int(get("embedding_length")), int(get("attention.head_count"))
  head_dim = int(get("attention.key_length", embed_dim // num_heads))
  rope_dims = int(get("rope.dimension_count", head_dim))
  if rope_dims != head_dim:
    raise GGUFError(f"{source}: partial RoPE ({arch}.rope.dimension_count={rope_dims} < head_dim={head_dim}) "
                    "is not supported.")
  scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise GGUFError(f"{source}: RoPE scaling {scaling!r} is not supported.")
  vocab_size = metadata.get(f"{arch}.vocab_size", len(metadata.get("tokenizer.ggml.tokens", ())))
  fields = dict(
      vocab_size=int(vocab_size), embed_dim=embed_dim, num_layers=int(get("block_count")), num_heads=num_heads,
      num_kv_heads=int(get("attention.head_count_kv", num_heads)), head_dim=head_dim,
      mlp_dim=int(get("feed_forward_length")), rope_theta=_f32_value(get("rope.freq_base", 10000.0)),
      norm_eps=_f32_value(get("attention.layer_norm_rms_epsilon")),
      max_seq_len=int(get("context_length")))
  fields.update(overrides)
  return llama.LlamaConfig(**fields)


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation on an [heads*head_dim, in] matrix.

  llama.cpp's converter reorders each head's rows from (first half, second half) to interleaved pairs
  (row i, row i + head_dim/2, ...) so its pairwise RoPE works:
    w.reshape(heads, 2, head_dim // 2, in).swapaxes(1, 2)
  The inverse below restores the Hugging Face order, for rotate-half RoPE.
  """
  rows = weight.shape[0]
  if rows % (2 * num_heads):
    raise ValueError(f"cannot unpermute {rows} rows into {num_heads} heads of even size.")
  half = rows // num_heads // 2
  return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _param_source(path: tuple, config: llama.LlamaConfig) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
  """(GGUF tensor name, conversion from the dequantized [out, in] array to our layout) for a model param."""
  c = config
  if path == ("embedding",):
    return "token_embd.weight", lambda w: w  # [vocab, embed] in both.
  if path == ("lm_head",):
    return "output.weight", lambda w: w.T
  if path == ("final_norm", "scale"):
    return "output_norm.weight", lambda w: w
  if len(path) >= 4 and path[0] == "blocks":
    block = f"blk.{path[1]}."
    table = {
        ("attention_norm", "scale"): ("attn_norm", lambda w: w),
        ("mlp_norm", "scale"): ("ffn_norm", lambda w: w),
        ("attention", "q", "kernel"): ("attn_q", lambda w: unpermute_rope_rows(w, c.num_heads).T.reshape(
            c.embed_dim, c.num_heads, c.head_dim)),
        ("attention", "k", "kernel"): ("attn_k", lambda w: unpermute_rope_rows(w, c.num_kv_heads).T.reshape(
            c.embed_dim, c.num_kv_heads, c.head_dim)),
        ("attention", "v", "kernel"): ("attn_v", lambda w: w.T.reshape(c.embed_dim, c.num_kv_heads, c.head_dim)),
        ("attention", "o", "kernel"): ("attn_output", lambda w: w.T.reshape(c.num_heads, c.head_dim, c.embed_dim)),
        ("mlp", "gate", "kernel"): ("ffn_gate", lambda w: w.T),
        ("mlp", "up", "kernel"): ("ffn_up", lambda w: w.T),
        ("mlp", "down", "kernel"): ("ffn_down", lambda w: w.T),
    }
    if path[2:] in table:
      name, convert = table[path[2:]]
      return f"{block}{name}.weight", convert
  raise GGUFError(f"no GGUF tensor is known for model parameter {'.'.join(map(str, path))}.")


def _dequantized(tensor, source: str) -> np.ndarray:
  import gguf

  try:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except Exception as error:
    raise GGUFError(f"{source}: cannot dequantize tensor {tensor.name!r} ({tensor.tensor_type.name}): "
                    f"{error}") from error
  values = np.asarray(values, np.float32)
  if not np.isfinite(values).all():
    raise GGUFError(f"{source}: tensor {tensor.name!r} has non-finite values (corrupt file?).")
  return values


def load_gguf(path: str | os.PathLike, *, param_dtype=jnp.float32, compute_dtype=None,
              attention_fn=None, **config_overrides) -> tuple[llama.Llama, Tokenizer]:
  """Reads a Llama GGUF into `(Llama, Tokenizer)`: every tensor dequantized to f32, converted to our layouts,
  cast to `param_dtype`. `compute_dtype` defaults to `param_dtype`; `config_overrides` replace config fields.

  `attention_fn` replaces the model's default `AttentionFn` (None: Llama's own). Parameters keep their
  logical-axis metadata (the model is built by `llama.Llama` abstractly, then filled).
  Raises `GGUFError` naming the file for an unreadable file, and the tensor too when one is missing or has
  the wrong shape.
  """
  source = os.fspath(path)
  reader = open_gguf(source)
  metadata = read_metadata(reader)
  tensors = {tensor.name: tensor for tensor in reader.tensors}
  config = config_from_metadata(
      metadata, source=source, tie_embeddings="output.weight" not in tensors, param_dtype=param_dtype,
      compute_dtype=compute_dtype or param_dtype, **config_overrides)
  tokenizer = Tokenizer.from_metadata(metadata, source=source)
  if tokenizer.vocab_size != config.vocab_size:
    raise GGUFError(f"{source}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                    f"{config.vocab_size}.")

  # Shapes and logical axes come from the model definition itself; no random init is computed.
  attention = {} if attention_fn is None else {"attention_fn": attention_fn}
  model = nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0), **attention))
  for param_path, variable in list(nnx.iter_graph(model)):
    if not isinstance(variable, nnx.Param):
      continue
    name, convert = _param_source(tuple(param_path), config)
    if name not in tensors:
      raise GGUFError(f"{source}: tensor {name!r} is missing (needed for "
                      f"{'.'.join(map(str, param_path))}).")
    value = convert(_dequantized(tensors[name], source))
    expected = variable.get_value().shape
    if value.shape != tuple(expected):
      raise GGUFError(f"{source}: tensor {name!r} converts to shape {value.shape}, the model expects "
                      f"{tuple(expected)}.")
    variable.set_value(jnp.asarray(value, config.param_dtype))
  return model, tokenizer

