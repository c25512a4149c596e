"""Hugging Face folders: `config.json` + `*.safetensors` (+ `tokenizer.json`) -> a Llama or BERT model.

    model, tokenizer = load_folder("path/to/folder")      # what `efficient.models.load(folder)` calls

`config.json`'s `model_type` picks the architecture:
- `"llama"` -> `llama.Llama`: tensors `model.embed_tokens.weight`, `model.norm.weight`, optional `lm_head.weight`
  (absent, or `tie_word_embeddings`: tied), per layer `model.layers.N.{input_layernorm, post_attention_layernorm}
  .weight`, `self_attn.{q,k,v,o}_proj.weight`, `mlp.{gate,up,down}_proj.weight`. Matrices are torch Linear
  weights, [out, in]: transposed into our [in, out] kernels and reshaped into heads. q/k rows are in Hugging
  Face's order, which is what our rotate-half RoPE expects (a GGUF stores them permuted; see `gguf.py`).
- `"bert"` -> `bert.Bert`: `embeddings.{word,position,token_type}_embeddings.weight`, `embeddings.LayerNorm`,
  per layer `encoder.layer.N.attention.self.{query,key,value}`, `attention.output.{dense,LayerNorm}`,
  `intermediate.dense`, `output.{dense,LayerNorm}` (weights and biases). A `bert.` prefix (task heads'
  checkpoints) is accepted; the pooler and task heads are not loaded (sentence embeddings do not use them).

`to_hf_tensors(model)` / `save_folder(model, folder)` write the inverse (the same names and layouts), so a folder
round-trips exactly. Every problem raises one `CheckpointError` naming the file, and the tensor when one is
missing or misshaped. `FileTokenizer` wraps the folder's `tokenizer.json` (`tokenizers.Tokenizer.from_file`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer as HFTokenizer

from efficient.models import bert, llama

SUPPORTED_MODEL_TYPES = ("llama", "bert")


class CheckpointError(ValueError):
  """A Hugging Face folder or safetensors file that cannot be read into a supported model."""


# ----------------------------------------------------------------------------------------- files


def read_config(folder: str | os.PathLike) -> dict:
  path = Path(folder) / "config.json"
  if not Path(folder).is_dir():
    raise CheckpointError(f"{folder}: not a folder (a Hugging Face model folder holds config.json and "
                          "*.safetensors).")
  if not path.is_file():
    raise CheckpointError(f"{path}: missing; a Hugging Face model folder needs config.json beside its "
                          "*.safetensors.")
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise CheckpointError(f"{path}: not readable JSON: {error}") from error
  if not isinstance(config, dict):
    raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}.")
  return config


class TensorFiles:
  """The tensors of one or more safetensors files, read lazily by name (`get(name) -> np.ndarray`)."""

  def __init__(self, paths: Sequence[Path]):
    self.paths = list(paths)
    self._where: dict[str, Path] = {}
    self._handles = {}
    for path in self.paths:
      try:
        handle = safe_open(str(path), framework="np")
        names = list(handle.keys())
      except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from error
      self._handles[path] = handle
      for name in names:
        if name in self._where:
          raise CheckpointError(f"{path}: tensor {name!r} is also in {self._where[name]}.")
        self._where[name] = path

  @classmethod
  def in_folder(cls, folder: str | os.PathLike) -> "TensorFiles":
    paths = sorted(Path(folder).glob("*.safetensors"))
    if not paths:
      raise CheckpointError(f"{folder}: no *.safetensors file (only safetensors checkpoints are supported).")
    return cls(paths)

  def names(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def source(self, name: str) -> str:
    return str(self._where.get(name, self.paths[0] if len(self.paths) == 1 else self.paths[0].parent))

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      where = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0].parent} ({len(self.paths)} files)"
      raise CheckpointError(f"{where}: tensor {name!r} is missing.")
    try:
      value = self._handles[self._where[name]].get_tensor(name)
    except (SafetensorError, OSError, ValueError, TypeError) as error:  # e.g. bf16, which numpy lacks
      raise CheckpointError(f"{self._where[name]}: cannot read tensor {name!r}: {error}") from error
    return np.asarray(value)


# ----------------------------------------------------------------------------------------- configs


def _require(config: dict, key: str, source: str):
  if key not in config:
    raise CheckpointError(f"{source}: config.json has no {key!r}.")
  return config[key]


def llama_config(config: dict, *, source: str = "config.json", **overrides) -> llama.LlamaConfig:
  """A `LlamaConfig` from a Hugging Face `LlamaConfig` dict (plain SiLU/RoPE/RMSNorm Llamas only)."""
  get = lambda key: _require(config, key, source)  # noqa: E731
  if config.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act={config['hidden_act']!r}; only 'silu' is supported.")
  if config.get("rope_scaling") not in (None, {}):
    raise CheckpointError(f"{source}: rope_scaling={config['rope_scaling']!r} is not supported.")
  for key in ("attention_bias", "mlp_bias"):
    if config.get(key):
      raise CheckpointError(f"{source}: {key}=true is not supported (Llama projections have no bias here).")
  embed_dim, num_heads = int(get("hidden_size")), int(get("num_attention_heads"))
  fields = dict(vocab_size=int(get("vocab_size")), embed_dim=embed_dim, num_layers=int(get("num_hidden_layers")),
                num_heads=num_heads, num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
                head_dim=int(config.get("head_dim") or embed_dim // num_heads), mlp_dim=int(get("intermediate_size")),
                rope_theta=float(config.get("rope_theta", 10000.0)), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                max_seq_len=int(config.get("max_position_embeddings", 2048)))
  fields.update(overrides)
  return llama.LlamaConfig(**fields)


def bert_config(config: dict, *, source: str = "config.json", **overrides) -> bert.BertConfig:
  """A `BertConfig` from a Hugging Face `BertConfig` dict (absolute position embeddings only)."""
  get = lambda key: _require(config, key, source)  # noqa: E731
  kind = config.get("position_embedding_type", "absolute")
  if kind != "absolute":
    raise CheckpointError(f"{source}: position_embedding_type={kind!r}; only 'absolute' is supported.")
  activation = config.get("hidden_act", "gelu")
  if activation not in bert.ACTIVATIONS:
    raise CheckpointError(f"{source}: hidden_act={activation!r}; supported: {sorted(bert.ACTIVATIONS)}.")
  fields = dict(vocab_size=int(get("vocab_size")), embed_dim=int(get("hidden_size")),
                num_layers=int(get("num_hidden_layers")), num_heads=int(get("num_attention_heads")),
                mlp_dim=int(get("intermediate_size")), max_positions=int(get("max_position_embeddings")),
                type_vocab_size=int(config.get("type_vocab_size", 2)), norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                activation=activation, pad_id=int(config.get("pad_token_id") or 0))
  fields.update(overrides)
  return bert.BertConfig(**fields)


# ----------------------------------------------------------------------------------------- name maps
# For each parameter path of our model: (Hugging Face tensor name, HF array -> ours, ours -> HF array).

Convert = Callable[[np.ndarray], np.ndarray]
_SAME = (lambda w: w, lambda w: w)


def _heads_in(w_out_in, heads, head_dim):  # [H*D, E] -> [E, H, D]
  return w_out_in.T.reshape(w_out_in.shape[1], heads, head_dim)


def _heads_out(kernel):  # [E, H, D] -> [H*D, E]
  return kernel.reshape(kernel.shape[0], -1).T


def _llama_names(config: llama.LlamaConfig) -> dict[tuple, tuple[str, Convert, Convert]]:
  c = config
  table = {("embedding",): ("model.embed_tokens.weight", *_SAME),
           ("final_norm", "scale"): ("model.norm.weight", *_SAME)}
  if not c.tie_embeddings:
    table[("lm_head",)] = ("lm_head.weight", lambda w: w.T, lambda k: k.T)
  for i in range(c.num_layers):
    p, b = ("blocks", i), f"model.layers.{i}."
    table.update({
        (*p, "attention_norm", "scale"): (b + "input_layernorm.weight", *_SAME),
        (*p, "mlp_norm", "scale"): (b + "post_attention_layernorm.weight", *_SAME),
        (*p, "attention", "q", "kernel"): (b + "self_attn.q_proj.weight",
                                           lambda w: _heads_in(w, c.num_heads, c.head_dim), _heads_out),
        (*p, "attention", "k", "kernel"): (b + "self_attn.k_proj.weight",
                                           lambda w: _heads_in(w, c.num_kv_heads, c.head_dim), _heads_out),
        (*p, "attention", "v", "kernel"): (b + "self_attn.v_proj.weight",
                                           lambda w: _heads_in(w, c.num_kv_heads, c.head_dim), _heads_out),
        (*p, "attention", "o", "kernel"): (b + "self_attn.o_proj.weight",
                                           lambda w: w.T.reshape(c.num_heads, c.head_dim, c.embed_dim),
                                           lambda k: k.reshape(-1, k.shape[-1]).T),
        (*p, "mlp", "gate", "kernel"): (b + "mlp.gate_proj.weight", lambda w: w.T, lambda k: k.T),
        (*p, "mlp", "up", "kernel"): (b + "mlp.up_proj.weight", lambda w: w.T, lambda k: k.T),
        (*p, "mlp", "down", "kernel"): (b + "mlp.down_proj.weight", lambda w: w.T, lambda k: k.T),
    })
  return table


def _bert_names(config: bert.BertConfig, prefix: str = "") -> dict[tuple, tuple[str, Convert, Convert]]:
  c = config
  e = prefix + "embeddings."
  table = {("embeddings", "word", "embedding"): (e + "word_embeddings.weight", *_SAME),
           ("embeddings", "position", "embedding"): (e + "position_embeddings.weight", *_SAME),
           ("embeddings", "token_type", "embedding"): (e + "token_type_embeddings.weight", *_SAME),
           ("embeddings", "norm", "scale"): (e + "LayerNorm.weight", *_SAME),
           ("embeddings", "norm", "bias"): (e + "LayerNorm.bias", *_SAME)}
  heads = (lambda w: _heads_in(w, c.num_heads, c.head_dim), _heads_out)
  head_bias = (lambda w: w.reshape(c.num_heads, c.head_dim), lambda k: k.reshape(-1))
  linear = (lambda w: w.T, lambda k: k.T)
  for i in range(c.num_layers):
    p, b = ("blocks", i), f"{prefix}encoder.layer.{i}."
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
      table[(*p, "attention", ours, "kernel")] = (f"{b}attention.self.{theirs}.weight", *heads)
      table[(*p, "attention", ours, "bias")] = (f"{b}attention.self.{theirs}.bias", *head_bias)
    table.update({
        (*p, "attention", "o", "kernel"): (b + "attention.output.dense.weight",
                                           lambda w: w.T.reshape(c.num_heads, c.head_dim, c.embed_dim),
                                           lambda k: k.reshape(-1, k.shape[-1]).T),
        (*p, "attention", "o", "bias"): (b + "attention.output.dense.bias", *_SAME),
        (*p, "post_attention_norm", "scale"): (b + "attention.output.LayerNorm.weight", *_SAME),
        (*p, "post_attention_norm", "bias"): (b + "attention.output.LayerNorm.bias", *_SAME),
        (*p, "mlp", "up", "kernel"): (b + "intermediate.dense.weight", *linear),
        (*p, "mlp", "up", "bias"): (b + "intermediate.dense.bias", *_SAME),
        (*p, "mlp", "down", "kernel"): (b + "output.dense.weight", *linear),
        (*p, "mlp", "down", "bias"): (b + "output.dense.bias", *_SAME),
        (*p, "post_mlp_norm", "scale"): (b + "output.LayerNorm.weight", *_SAME),
        (*p, "post_mlp_norm", "bias"): (b + "output.LayerNorm.bias", *_SAME),
    })
  return table


def _names_for(model) -> dict:
  if isinstance(model, llama.Llama):
    return _llama_names(model.config)
  if isinstance(model, bert.Bert):
    return _bert_names(model.config)
  raise TypeError(f"no Hugging Face layout is known for {type(model).__name__}; expected Llama or Bert.")


def _fill(model, table: dict, tensors: TensorFiles, dtype) -> None:
  """Sets every parameter of the abstract `model` from `tensors` through `table` (path -> name, convert)."""
  for path, variable in list(nnx.iter_graph(model)):
    if not isinstance(variable, nnx.Param):
      continue
    path = tuple(path)
    if path not in table:
      raise CheckpointError(f"no Hugging Face tensor is known for model parameter {'/'.join(map(str, path))}.")
    name, convert, _ = table[path]
    raw = tensors.get(name)
    expected = tuple(variable.get_value().shape)
    try:
      value = convert(raw.astype(np.float32))
    except ValueError as error:  # a reshape that cannot hold: the stored shape is wrong
      raise CheckpointError(f"{tensors.source(name)}: tensor {name!r} has shape {raw.shape}, which does not "
                            f"fit the model's {'/'.join(map(str, path))} {expected}.") from error
    if value.shape != expected:
      raise CheckpointError(f"{tensors.source(name)}: tensor {name!r} has shape {raw.shape}, which converts to "
                            f"{value.shape}; the model's {'/'.join(map(str, path))} needs {expected}.")
    if not np.isfinite(value).all():
      raise CheckpointError(f"{tensors.source(name)}: tensor {name!r} has non-finite values.")
    variable.set_value(jnp.asarray(value, dtype))


# ----------------------------------------------------------------------------------------- the tokenizer


class FileTokenizer:
  """A `tokenizers.Tokenizer` read from a `tokenizer.json` (the folder's own pipeline: normalizer, WordPiece or
  BPE, and its post-processor, e.g. BERT's [CLS] ... [SEP]).

  `encode_batch(texts) -> (ids, attention_mask)` int32 [B, T]: padded with the file's padding token, id and
  side, to the longest text of the batch (rounded up to a multiple of 8, so few shapes are compiled) rather than
  to the file's fixed length; truncated to `max_length` (sentence-transformers' `max_seq_length` when the folder
  has sentence_bert_config.json, else the file's truncation).
  """

  def __init__(self, backend: HFTokenizer, *, max_length: int | None = None, source: str = "<tokenizer>"):
    self.source = source
    self.file_json = backend.to_str()  # the pipeline as read (what `save_folder` writes back)
    padding = backend.padding or {}
    truncation = backend.truncation or {}
    self.pad_id = int(padding.get("pad_id", 0))
    self.max_length = int(max_length or truncation.get("max_length") or 0) or None
    self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
    self._single = HFTokenizer.from_str(self.file_json)
    self._single.no_padding()
    self._batch = HFTokenizer.from_str(self.file_json)
    self._batch.enable_padding(direction=padding.get("direction", "right"), pad_id=self.pad_id,
                               pad_type_id=int(padding.get("pad_type_id", 0)),
                               pad_token=padding.get("pad_token", "[PAD]"), length=None, pad_to_multiple_of=8)
    for backend_ in (self._single, self._batch):
      if self.max_length:
        backend_.enable_truncation(self.max_length)
      else:
        backend_.no_truncation()

  @classmethod
  def from_file(cls, path: str | os.PathLike, *, max_length: int | None = None) -> "FileTokenizer":
    try:
      backend = HFTokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a plain Exception on a malformed file
      raise CheckpointError(f"{path}: not a readable tokenizer.json: {error}") from error
    return cls(backend, max_length=max_length, source=str(path))

  def encode(self, text: str) -> list[int]:
    """Ids of one text with the file's special tokens (BERT: [CLS] ... [SEP]), unpadded."""
    return self._single.encode(text).ids

  def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention_mask), int32 [B, T], of a non-empty list of texts (see the class docstring)."""
    if isinstance(texts, str) or not len(texts):
      raise ValueError(f"texts must be a non-empty list of strings, got {texts!r:.80}.")
    encodings = self._batch.encode_batch(list(texts))
    return (np.asarray([e.ids for e in encodings], np.int32),
            np.asarray([e.attention_mask for e in encodings], np.int32))

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    return self._single.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def __repr__(self):
    return f"FileTokenizer({self.source!r}, vocab_size={self.vocab_size}, max_length={self.max_length})"


def folder_tokenizer(folder: str | os.PathLike) -> FileTokenizer | None:
  """The folder's tokenizer.json as a `FileTokenizer`, or None when there is none."""
  folder = Path(folder)
  path = folder / "tokenizer.json"
  if not path.is_file():
    return None
  max_length = None
  st_config = folder / "sentence_bert_config.json"
  if st_config.is_file():
    try:
      max_length = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
    except (OSError, json.JSONDecodeError) as error:
      raise CheckpointError(f"{st_config}: not readable JSON: {error}") from error
  return FileTokenizer.from_file(path, max_length=max_length)


# ----------------------------------------------------------------------------------------- load / save


def load_folder(folder: str | os.PathLike, *, param_dtype: Any = jnp.float32, compute_dtype: Any = None,
                attention_fn=None, **config_overrides) -> tuple[Any, FileTokenizer | None]:
  """`(model, tokenizer)` from a Hugging Face folder (see the module docstring); `tokenizer` is None when the
  folder has no tokenizer.json. `config_overrides` replace `LlamaConfig` / `BertConfig` fields; `attention_fn`
  replaces the model's default one."""
  folder = Path(folder)
  hf_config = read_config(folder)
  source = str(folder / "config.json")
  model_type = hf_config.get("model_type")
  dtypes = dict(param_dtype=param_dtype, compute_dtype=compute_dtype or param_dtype)
  tensors = TensorFiles.in_folder(folder)
  kwargs = {} if attention_fn is None else {"attention_fn": attention_fn}
  if model_type == "llama":
    config = llama_config(hf_config, source=source, **dtypes, **config_overrides)
    if config.tie_embeddings is False and "lm_head.weight" not in tensors:
      config = config.replace(tie_embeddings=True)  # some exports drop the head when it equals the embedding
    model = nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0), **kwargs))
    table = _llama_names(config)
  elif model_type == "bert":
    config = bert_config(hf_config, source=source, **dtypes, **config_overrides)
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in tensors else ""
    model = nnx.eval_shape(lambda: bert.Bert(config, rngs=nnx.Rngs(0), **kwargs))
    table = _bert_names(config, prefix)
  else:
    raise CheckpointError(f"{source}: model_type={model_type!r} is not supported; supported: "
                          f"{list(SUPPORTED_MODEL_TYPES)}.")
  _fill(model, table, tensors, config.param_dtype)
  return model, folder_tokenizer(folder)


def to_hf_tensors(model) -> dict[str, np.ndarray]:
  """{Hugging Face name: f32 array in torch layout} of a `Llama` or `Bert` (the inverse of loading)."""
  table = _names_for(model)
  out = {}
  for path, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.Param):
      name, _, back = table[tuple(path)]
      out[name] = np.ascontiguousarray(back(np.asarray(variable.get_value(), np.float32)))
  return out


def hf_config_of(model) -> dict:
  """The config.json dict `load_folder` reads back into `model`'s config."""
  c = model.config
  if isinstance(model, llama.Llama):
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": c.vocab_size,
            "hidden_size": c.embed_dim, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.mlp_dim,
            "rope_theta": c.rope_theta, "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
            "max_position_embeddings": c.max_seq_len, "hidden_act": "silu", "torch_dtype": "float32"}
  if isinstance(model, bert.Bert):
    return {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": c.vocab_size,
            "hidden_size": c.embed_dim, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "intermediate_size": c.mlp_dim, "max_position_embeddings": c.max_positions,
            "type_vocab_size": c.type_vocab_size, "layer_norm_eps": c.norm_eps, "hidden_act": c.activation,
            "pad_token_id": c.pad_id, "position_embedding_type": "absolute", "torch_dtype": "float32"}
  raise TypeError(f"no Hugging Face config is known for {type(model).__name__}; expected Llama or Bert.")


def save_folder(model, folder: str | os.PathLike, *, tokenizer: FileTokenizer | None = None) -> Path:
  """Writes config.json + model.safetensors (+ tokenizer.json) that `load_folder` reads back into `model`."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(hf_config_of(model), indent=2) + "\n", encoding="utf-8")
  save_file(to_hf_tensors(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    (folder / "tokenizer.json").write_text(tokenizer.file_json, encoding="utf-8")
    if tokenizer.max_length:
      (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": tokenizer.max_length}) + "\n",
                                                       encoding="utf-8")
  return folder
