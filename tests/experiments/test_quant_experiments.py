"""experiments.quant_formats, experiments.bench_quant and the MiniLM rows of experiments.ptq at toy configs (no
SmolLM2 or MiniLM load)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, models as tokenizer_models, normalizers, pre_tokenizers, processors

from efficient import calibration, models
from efficient.models import bert, hf
from experiments import bench_quant, ptq, quant_formats


def test_quant_formats_synthetic_only(tmp_path):
  config = quant_formats.default_config()
  config.update(model="none", rows=128, cols=256, student_t_nus="10,2", outlier_fractions="0.001",
                outlier_sigmas="100")
  results = quant_formats.run(config, str(tmp_path))
  assert results["weights"] is None and results["activations"] is None
  synthetic = results["synthetic"]
  assert set(synthetic) == {"gaussian", "student-t ν=10", "student-t ν=2", "0.1% outliers ≤100σ"}
  gaussian = synthetic["gaussian"]
  assert abs(gaussian["kurtosis"] - 3.0) < 0.3
  # Uniform int8 (255 levels over ±max) beats e4m3 (3 mantissa bits) on a Gaussian; theory: ~40 vs ~31 dB.
  assert 36 < gaussian["sqnr_db"]["int8 per-tensor"] < 43
  assert 29 < gaussian["sqnr_db"]["fp8 e4m3 per-tensor"] < 34
  assert gaussian["sqnr_db"]["fp8 e4m3 per-tensor"] > gaussian["sqnr_db"]["fp8 e5m2 per-tensor"]
  # Sparse 100σ outliers: the int8 step is set by the outliers, fp8's relative precision is not.
  outliers = synthetic["0.1% outliers ≤100σ"]
  assert outliers["max_over_bulk_sigma"] > 45 and outliers["kurtosis"] > 100
  assert outliers["sqnr_db"]["fp8 e4m3 per-tensor"] > outliers["sqnr_db"]["int8 per-tensor"] + 5
  for name in ("results.json", "results.md", "quant_formats.png"):
    assert (tmp_path / name).exists(), name
  claims = json.loads((tmp_path / "results.json").read_text())["claims"]
  assert claims[0]["claim"].startswith("Digest §Q") and "int8 ahead by" in claims[0]["measured"]


def test_tensor_stats_of_a_known_tensor():
  x = np.array([-2.0, -1.0, 0.0, 1.0, 2.0] * 4)  # mean 0, var 2, E[x^4] = (16 + 1) * 2 / 5 = 6.8
  stats = quant_formats.tensor_stats(x)
  assert stats["kurtosis"] == pytest.approx(6.8 / 4.0)
  assert stats["max_over_sigma"] == pytest.approx(2.0 / np.sqrt(2.0))
  assert stats["max_over_bulk_sigma"] == pytest.approx(2.0 / 1.4826)  # median |x| = 1


def test_projection_inputs_are_each_layers_distinct_inputs():
  loaded = models.load("tiny", dtype=jnp.float32)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, loaded.config.vocab_size)
  inputs = quant_formats.projection_inputs(loaded.model, tokens)
  layers = loaded.config.num_layers
  assert len(inputs) == 4 * layers  # q,k,v share one input, gate,up another; o and down their own
  assert "blocks/0/attention/q,k,v" in inputs and "blocks/0/mlp/gate,up" in inputs
  down = calibration.get_module(loaded.model, "blocks/0/mlp/down")
  assert inputs["blocks/0/mlp/down"].shape == (16, calibration.matrix_shape(down)[0])


def test_bad_quant_formats_config_is_refused(tmp_path):
  config = quant_formats.default_config()
  config.update(model="none", outlier_fractions="0.01,1.5")
  with pytest.raises(ValueError, match="outlier_fractions"):
    quant_formats.run(config, str(tmp_path))


def test_bench_quant_small(tmp_path):
  config = bench_quant.default_config()
  config.update(shapes="32x128x256", repeats=1, decode_m="1,16")
  results = bench_quant.run(config, str(tmp_path))
  stored = results["bytes_per_param"]
  assert stored["int8 per-channel"]["all 210 projections"] <= 1.02
  assert stored["int4 g128"]["down (1536x576)"] <= 0.52
  assert stored["int4 g128"]["q, o (576x576)"].startswith("n/a") and "divide" in stored["int4 g128"]["q, o (576x576)"]
  # Packed int4: half a byte per code plus one bf16 scale per 64 -> 0.5 + 2/64.
  assert stored["int4 g64"]["gate, up (576x1536)"] == pytest.approx(0.5 + 2 / 64)
  linear = results["linears"]["32x128x256"]
  assert linear["rel_error_vs_f32"]["ours W8A8"] < 0.02
  if linear["qwix_error"] is None:
    assert linear["rel_error_vs_f32"]["ours vs qwix"] < 0.02
  assert any("s32" in line and "dot(" in line for line in linear["hlo_dots"]["ours W8A8"])
  traffic = [t for t in results["decode_traffic"] if "traffic_ratio" in t]
  assert all(t["traffic_ratio"] >= 1.0 and t["bf16_bytes_over_quant"] > 1.5 for t in traffic)
  for name in ("results.json", "results.md", "bench_quant.png"):
    assert (tmp_path / name).exists(), name


def test_bad_bench_shapes_are_refused(tmp_path):
  config = bench_quant.default_config()
  config.shapes = "32x128"
  with pytest.raises(ValueError, match="--config.shapes='32x128'"):
    bench_quant.run(config, str(tmp_path))


def toy_encoder_folder(directory):
  """A random-init BERT folder whose WordPiece tokenizer.json knows every word of ptq's sentence sets."""
  texts = [t for pair in ptq.RETRIEVAL_PAIRS for t in pair] + list(ptq.CALIBRATION_SENTENCES)
  normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
  words = sorted({w for t in texts for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(t))})
  vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
  tokenizer = Tokenizer(tokenizer_models.WordPiece(vocab, unk_token="[UNK]"))
  tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, splitter
  tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  # init_std 0.2 (not 0.02): weights large enough that the projections, not the embeddings, shape the output.
  model = bert.Bert(bert.TINY_BERT.replace(vocab_size=len(vocab), init_std=0.2), rngs=nnx.Rngs(0))
  folder = hf.save_folder(model, directory / "toy_encoder")
  tokenizer.save(str(folder / "tokenizer.json"))
  return folder


def test_ptq_minilm_rows_on_a_toy_encoder(tmp_path):
  config = ptq.default_config()
  config.update(rows="none", minilm_model=str(toy_encoder_folder(tmp_path)), minilm_rows="float32,w8,w4-rtn",
                group_size=16)
  results = ptq.run(config, str(tmp_path / "work"))
  assert results["rows"] == {} and results["minilm"]["pairs"] == 16
  rows = results["minilm"]["rows"]
  assert list(rows) == ["float32", "w8", "w4-rtn"]
  assert rows["float32"]["cosine_min"] == pytest.approx(1.0) and rows["float32"]["agreement"] == 1.0
  assert rows["float32"]["score_rms"] == 0.0 and rows["float32"]["bytes_per_param"] == 4.0
  assert rows["w8"]["projections"] == 12  # q/k/v/o/up/down of 2 blocks
  assert 1.0 < rows["w8"]["bytes_per_param"] < 1.2  # int8 codes + one scale per output column (K = 32 or 64)
  assert 0.5 < rows["w4-rtn"]["bytes_per_param"] < 0.7  # packed int4 + a scale per 16 rows
  assert rows["w8"]["cosine_min"] > 0.99 and rows["w8"]["agreement"] >= 0.9
  assert rows["w4-rtn"]["score_rms"] > rows["w8"]["score_rms"] > 0
  assert rows["w4-rtn"]["cosine_mean"] < rows["w8"]["cosine_mean"]
  markdown = (tmp_path / "work" / "results.md").read_text()
  assert "MiniLM rows" in markdown and "issue 9: int8 weight-only PTQ" in markdown


def test_retrieval_scores_of_known_embeddings(tmp_path):
  eye = np.eye(4)
  scores = ptq.retrieval_scores(eye, eye[[1, 0, 2, 3]], eye, eye)
  assert scores["accuracy"] == 0.5 and scores["agreement"] == 0.5 and scores["top1"] == [1, 0, 2, 3]
  assert scores["cosine_min"] == 0.0 and scores["cosine_mean"] == 0.75
  with pytest.raises(ValueError, match="minilm_rows: unknown \\['kv-int8'\\]"):
    config = ptq.default_config()
    config.update(rows="none", minilm_rows="kv-int8")
    ptq.run(config, str(tmp_path))
