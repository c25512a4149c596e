"""Post-training quantization of SmolLM2-135M: RTN, GPTQ, SmoothQuant, LLM.int8(), NF4, MXFP4 side by side.

    python -m experiments.ptq [--workdir=workdir/ptq] [--config.rows=float32,w8,w4-g64-gptq ...]

Every row quantizes the 210 projections (q/k/v/o/gate/up/down of 30 blocks) of the float model by rules
(`efficient.quant.quantize_model`); embeddings/head and norms stay f32. Columns: bytes per parameter of the
projection weights as stored (codes + scales + zero points), validation perplexity on the quickstart's slice of
the stdlib validation split and its change vs float, and the CPU forward time of one [1, prefill_len] prefill
measured alternately with the float model (ratio = row / float). The 'kv-int8' / 'kv-int4' rows keep float
weights and quantize the KV cache (`efficient.quant.kv_cache`): perplexity from the simulated forward (k/v
quantize->dequantized exactly as the cache stores them), KV bytes per token of a `kv_bytes_len`-slot cache, and
greedy decode tokens/s with the quantized cache vs the float cache (side by side). Calibration (GPTQ Hessians, SmoothQuant
activation maxima) uses `calib_batches` x `calib_batch_size` sequences of `calib_seq_len` tokens of the TRAIN
split, captured once from the float model and shared by the GPTQ rows.

Runtime: the default runs the 6 rows of QUICK_ROWS (about 10 min on 2 cores). `--config.rows=all` (13 rows) took
37 min on the shared 2-core CPU at load ~8 (float model eval ~1.5 min per row; each GPTQ row ~5 min: the per-row
loop costs ~1-2 ms, ~1.5 s per matrix x 210).

KV rows (`--config.rows=float32,kv-int8,kv-int4,kv-int4-ktoken`; all three are in `all`): float32 + kv-int8 +
kv-int4 with the decode timing: each decode timing prefills three caches (float, fused quantized, dequantize-all
quantized) with a `decode_prompt_len` prompt once and times `decode_tokens` greedy steps from each, alternating,
(1 + max(timing_repeats, 5)) times: a few minutes per row on a quiet 2-core CPU; `--config.decode_tokens=0` skips
the timing.

Group sizes: SmolLM2's q/k/v/o/gate/up contract over K = 576, which 128 does not divide, so the 4/3-bit rows
use groups of 64 (GPTQ's usual g128 would only fit `down`).

MiniLM rows (`--config.minilm_rows`, default MINILM_QUICK_ROWS; '' skips them, 'all' adds the GPTQ rows): the same
rules on all-MiniLM-L6-v2 (BERT encoder, 36 projections with biases; embeddings and LayerNorms stay f32): the
cosine of each sentence embedding to the float model's over the 32 texts of RETRIEVAL_PAIRS, and top-1 retrieval
agreement with the float model (each query's nearest document by cosine; also the accuracy against the true
pairing). GPTQ rows calibrate on CALIBRATION_SENTENCES (disjoint from the evaluation texts). SmoothQuant and KV
rows do not apply (post-LN encoder: no norm feeds q/k/v or up directly; no KV cache). The 9 default MiniLM rows
took ~45 s on the shared 2-core CPU (load and float pass ~5 s, each row a quantize + one embedding pass of 2-10 s);
each GPTQ row adds ~25-30 s ('all': ~2 min). `--config.rows=none` runs the MiniLM rows alone.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from efficient import calibration, data, models, quant, train
from efficient.models import bert, llama
from efficient.quant import QuantConfig, kv_cache
from experiments import common

SMOOTHABLE = r".*/(attention/(q|k|v)|mlp/(gate|up))"  # full match on the path


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "smollm2-135m"
  config.rows = QUICK_ROWS  # 'all' runs every row of ROWS
  config.group_size = 64
  config.smoothquant_alpha = 0.5
  config.gptq_damp = 0.01
  config.calib_batches = 4
  config.calib_batch_size = 4
  config.calib_seq_len = 256
  config.eval_batches = 4          # the quickstart's validation slice: 4 x 4 x 256 tokens
  config.eval_batch_size = 4
  config.eval_seq_len = 256
  config.prefill_len = 256
  config.timing_repeats = 3
  config.kv_group_size = kv_cache.DEFAULT_GROUP_SIZE  # kv-* rows: K tokens per per-channel scale
  config.kv_bytes_len = 4096       # kv-* rows: cache length the KV bytes/token are measured on (capped at max_seq_len)
  config.decode_prompt_len = 2048  # kv-* rows: greedy decode speed (float cache, fused, dequantize-all)
  config.decode_tokens = 32         # 0: skip the decode timing
  config.weight_decode_prompt_len = 128  # weight rows: greedy decode (M = 1) tok/s beside the float model's
  config.weight_decode_tokens = 16       # 0: skip it
  config.minilm_model = "all-minilm-l6-v2"  # MiniLM rows: a BERT model name or Hugging Face folder
  config.minilm_rows = MINILM_QUICK_ROWS    # '' skips them; 'all' runs every row of MINILM_ROWS
  return config


def _w(fmt="int8", **kwargs):
  return lambda c: [(".*", QuantConfig(fmt=fmt, **kwargs))]


def _grouped(fmt, method="rtn", **kwargs):
  return lambda c: [(".*", QuantConfig(fmt=fmt, group_size=c.group_size, method=method, damp=c.gptq_damp,
                                       **kwargs))]


class KVRow:
  """A row with float weights and a quantized KV cache of `kv_format` (key_granularity='token': the per-token-K
  ablation, simulated only)."""

  def __init__(self, kv_format, key_granularity="channel"):
    self.kv_format = kv_format
    self.key_granularity = key_granularity


def _smoothquant(c):
  return [(SMOOTHABLE, QuantConfig(mode="w8a8", smoothquant_alpha=c.smoothquant_alpha)),
          (".*", QuantConfig(mode="w8a8"))]


# name -> (description, config -> rules (None: the float model)).
ROWS = {
    "float32": ("f32 projections (the GGUF's Q4_1/Q8_0 blocks dequantized)", None),
    "w8": ("W8 per-channel RTN, weight-only", _w()),
    "w8a8": ("W8A8: per-channel int8 W, dynamic per-token int8 activations", _w(mode="w8a8")),
    "w8a8-smoothquant": ("W8A8 + SmoothQuant (q/k/v, gate/up smoothed into their RMSNorm)", _smoothquant),
    "llm-int8": ("LLM.int8(): vector-wise int8, |x| >= 6 feature columns in float", _w(mode="llm_int8")),
    "fp8-e4m3": ("fp8 e4m3 per-channel weights x per-token fp8 activations", _w("fp8_e4m3", mode="fp8")),
    "w4-rtn": ("W4 per-group RTN (symmetric)", _grouped("int4")),
    "w4-gptq": ("W4 per-group GPTQ", _grouped("int4", "gptq")),
    "w4-gptq-actorder": ("W4 per-group GPTQ, act-order (static groups)", _grouped("int4", "gptq", act_order=True)),
    "nf4": ("NF4 blocks of 64 + double-quantized absmax (QLoRA)", _w("nf4", group_size=64)),
    "w3-rtn": ("W3 per-group RTN (symmetric)", _grouped("int3")),
    "w3-gptq": ("W3 per-group GPTQ", _grouped("int3", "gptq")),
    "mxfp4": ("MXFP4 (E2M1, blocks of 32, E8M0 scales)", _w("mxfp4")),
    "kv-int8": ("f32 weights; KV cache int8 (K per channel over groups of slots, V per token, asymmetric)",
                KVRow("int8")),
    "kv-int4": ("f32 weights; KV cache int4 packed (K per channel over groups of slots, V per token, asymmetric)",
                KVRow("int4")),
    "kv-int4-ktoken": ("ablation: f32 weights; int4 KV with K per token like V (no float open group)",
                       KVRow("int4", key_granularity="token")),
}

QUICK_ROWS = "float32,w8,w8a8-smoothquant,w4-rtn,w4-gptq-actorder,nf4"
# Rows that apply to the BERT encoder: every weight format; not SmoothQuant (post-LN) nor the KV-cache rows.
MINILM_ROWS = tuple(name for name, (_, rules) in ROWS.items()
                    if not isinstance(rules, KVRow) and name != "w8a8-smoothquant")
MINILM_QUICK_ROWS = ",".join(name for name in MINILM_ROWS if "gptq" not in name)

# 16 query -> document pairs (MiniLM rows): each query has one relevant document; topics are distinct, so the float
# model retrieves every pair, and a quantized model is scored on whether it picks the float model's document.
RETRIEVAL_PAIRS = (
    ("How do I reverse a list in Python?", "Use list.reverse() to reverse in place, or slicing with [::-1] for a copy."),
    ("What causes the seasons on Earth?", "Earth's axial tilt of about 23 degrees changes how directly sunlight strikes "
     "each hemisphere through the year."),
    ("best way to store fresh basil", "Keep basil stems in a glass of water at room temperature, loosely covered."),
    ("Why is the sky blue?", "Rayleigh scattering sends short blue wavelengths of sunlight across the sky more than red."),
    ("symptoms of dehydration", "Thirst, dark urine, dizziness and fatigue are early signs that the body lacks water."),
    ("How does a bicycle gear work?", "A larger rear sprocket lowers the gear ratio, so each pedal turn is easier but "
     "covers less ground."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the portrait in the early sixteenth century in Florence."),
    ("how to fix a flat tire", "Remove the wheel, find the puncture, patch or replace the inner tube and reinflate it."),
    ("What is photosynthesis?", "Plants turn light, water and carbon dioxide into glucose and oxygen in their "
     "chloroplasts."),
    ("tips for a job interview", "Research the company, prepare examples of your work and arrive a few minutes early."),
    ("How do vaccines work?", "They train the immune system with a harmless piece of a pathogen so it reacts fast "
     "later."),
    ("What is the capital of Japan?", "Tokyo has been the country's capital since 1868, when the emperor moved "
     "there from Kyoto."),
    ("How to brew pour-over coffee", "Pour hot water slowly in circles over medium-fine grounds in a paper filter "
     "cone."),
    ("Why do cats purr?", "Cats purr when content, and also to soothe themselves when stressed or injured."),
    ("How does compound interest work?", "Interest is added to the principal, so later interest is earned on past "
     "interest too."),
    ("What is a black hole?", "A region where gravity is so strong that nothing, not even light, can escape past "
     "the event horizon."),
)
CALIBRATION_SENTENCES = (
    "The train to the coast leaves every hour from platform four.",
    "A recipe for bread needs flour, water, salt and yeast.",
    "Mountains form where tectonic plates collide over millions of years.",
    "The orchestra tuned their instruments before the concert began.",
    "Solar panels convert sunlight into electricity with semiconductor cells.",
    "She wrote the report in a single afternoon and sent it to her manager.",
    "Rivers carry sediment downstream and deposit it at their deltas.",
    "The museum opened a new exhibition about ancient Egyptian tombs.",
    "Regular exercise improves sleep, mood and cardiovascular health.",
    "The compiler reported an error on line twelve of the source file.",
    "Honeybees communicate the location of flowers through a waggle dance.",
    "The city council voted to extend the bicycle lanes downtown.",
    "Glaciers are retreating as average global temperatures rise.",
    "A good night's sleep helps memory consolidation in the brain.",
    "The chess player sacrificed a knight to open the king's defenses.",
    "Electric cars use regenerative braking to recover energy.",
)


def projection_bytes(model) -> dict:
  """Bytes of every projection's weight as stored (float kernels or quantized arrays) and their parameter count."""
  total, params, count = 0, 0, 0
  for module in calibration.einsum_modules(model, types=(nnx.Module,)).values():
    if hasattr(module, "kernel") and hasattr(module, "equation"):
      total += module.kernel[...].nbytes
      params += module.kernel[...].size
    elif hasattr(module, "qarray"):
      total += quant.nbytes(module.qarray)
      params += int(np.prod(module.qarray.shape))
    else:
      continue
    count += 1
  return {"bytes": total, "parameters": params, "bytes_per_param": total / params, "projections": count}


def _batches(split, tokenizer, batch_size, seq_len, count):
  dataset = data.stdlib_dataset(split, batch_size=batch_size, seq_len=seq_len, tokenizer=tokenizer, shuffle=False,
                                max_tokens=count * batch_size * seq_len * 2)
  return [dataset.batch(step) for step in range(count)]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  workdir = common.prepare_workdir(workdir)
  names = [] if config.rows == "none" else list(ROWS) if config.rows == "all" else [
      n.strip() for n in config.rows.split(",") if n.strip()]
  unknown = [n for n in names if n not in ROWS]
  minilm_names = _minilm_names(config)
  if unknown or not (names or minilm_names):
    raise ValueError(f"--config.rows: unknown {unknown or names}; choose from {list(ROWS)} (or 'none' with "
                     "--config.minilm_rows).")
  started = time.perf_counter()
  results = {"rows": {}, "corpus": data.corpus_info()}
  if minilm_names:
    results["minilm"] = minilm_rows(config, minilm_names)
  if not names:
    results["wall_seconds"] = time.perf_counter() - started
    _write(workdir, config, results)
    print(f"wrote {workdir}/results.json, results.md ({results['wall_seconds']:.0f} s)", flush=True)
    return results
  loaded = models.load(config.model, dtype=jnp.float32)
  float_model, tokenizer = loaded.model, loaded.tokenizer
  calib = _batches("train", tokenizer, config.calib_batch_size, config.calib_seq_len, config.calib_batches)
  evals = _batches("validation", tokenizer, config.eval_batch_size, config.eval_seq_len, config.eval_batches)
  statistics = None
  if any("gptq" in n for n in names):
    print(f"capturing Hessians on {config.calib_batches}x{config.calib_batch_size}x{config.calib_seq_len} "
          "train tokens ...", flush=True)
    t0 = time.perf_counter()
    statistics = calibration.capture_hessians(float_model, calib)
    print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
  prefill = jax.random.randint(jax.random.key(0), (1, config.prefill_len), 0, float_model.config.vocab_size,
                               dtype=jnp.int32)
  float_forward = _forward(float_model)
  rows = {}
  for name in names:
    description, make_rules = ROWS[name]
    t0 = time.perf_counter()
    model = float_model
    if isinstance(make_rules, KVRow):
      model = nnx.merge(*nnx.split(float_model))  # shares the float weights; only the attention function differs
      model.attention_fn = kv_cache.simulated_attention_fn(make_rules.kv_format, config.kv_group_size,
                                                           make_rules.key_granularity)
    elif make_rules is not None:
      model = quant.quantize_model(nnx.clone(float_model), make_rules(config), calibration_data=calib,
                                   statistics=statistics)
    quantize_s = time.perf_counter() - t0
    validation = train.evaluate(model, evals)
    forward = _forward(model)
    timings = common.time_side_by_side({"float32": lambda: float_forward(prefill), name: lambda: forward(prefill)},
                                       repeats=config.timing_repeats)
    rows[name] = {"description": description, "quantize_s": quantize_s, "validation": validation,
                  **projection_bytes(model), "forward_ms": 1e3 * timings[name]["median_s"],
                  "forward_ratio": timings[name]["median_s"] / timings["float32"]["median_s"], "timings": timings,
                  **kv_bytes(float_model.config, make_rules if isinstance(make_rules, KVRow) else None, config)}
    if isinstance(make_rules, KVRow) and make_rules.key_granularity == "channel" and config.decode_tokens > 0:
      rows[name]["decode"] = decode_speed(float_model, make_rules.kv_format, config)
      print(f"  decode {rows[name]['decode']['tokens_per_s']}", flush=True)
    elif make_rules is not None and not isinstance(make_rules, KVRow) and config.weight_decode_tokens > 0:
      rows[name]["weight_decode"] = common.greedy_decode_rates(
          {"float32": (float_model, None, None), name: (model, None, None)},
          prompt_len=config.weight_decode_prompt_len, steps=config.weight_decode_tokens,
          repeats=max(config.timing_repeats, 5))
      rates = rows[name]["weight_decode"]["tokens_per_s"]
      print(f"  decode tok/s float {rates['float32']:.1f}, {name} {rates[name]:.1f}", flush=True)
    print(f"[{name}] {rows[name]['bytes_per_param']:.3f} B/param, ppl {validation['perplexity']:.3f}, "
          f"forward {rows[name]['forward_ms']:.0f} ms ({rows[name]['forward_ratio']:.2f}x float), "
          f"quantized in {quantize_s:.0f} s", flush=True)
    del model, forward
  results.update(rows=rows, wall_seconds=time.perf_counter() - started)
  _write(workdir, config, results)
  print(f"wrote {workdir}/results.json, results.md, ptq.png ({results['wall_seconds']:.0f} s)", flush=True)
  return results


def kv_bytes(model_config, row: KVRow | None, config) -> dict:
  """Measured bytes per token of the k/v storage of every layer (nbytes of a `kv_bytes_len`-slot cache / slots;
  quantized: codes + scales + zero points + the open group's float keys) and the ratio to the f32 cache. The
  per-token-K ablation has no cache: its bytes are those of K and V stored the way V is."""
  length = min(config.kv_bytes_len, model_config.max_seq_len)
  measure = lambda **kwargs: kv_cache.cache_nbytes(jax.eval_shape(lambda: llama.init_cache(
      model_config, 1, length, **kwargs))) / length
  float_bytes = measure()
  if row is None:
    quantized = float_bytes
  elif row.key_granularity == "token":
    shape = jax.ShapeDtypeStruct((1, length, model_config.num_kv_heads, model_config.head_dim), jnp.float32)
    stored = jax.eval_shape(lambda x: kv_cache.quantize_values(x, row.kv_format), shape)
    stored_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(stored))  # a QArray's arrays
    quantized = 2 * model_config.num_layers * stored_bytes / length
  else:
    quantized = measure(kv_format=row.kv_format, kv_group_size=config.kv_group_size)
  return {"kv_bytes_per_token": quantized, "kv_ratio": quantized / float_bytes, "kv_bytes_len": length}


def decode_speed(model, kv_format, config) -> dict:
  """Greedy decode tokens/s of three caches side by side (`common.greedy_decode_rates`): float, the quantized cache read
  in place by `pallas_kernels.quant_decode` (the fused path `generate` takes), and the same quantized cache with the
  op forced to its reference (`pallas_kernels.implementation("reference")`: the whole cache dequantized every step,
  the pre-fusion cost), from a `decode_prompt_len` prompt."""
  rates = common.greedy_decode_rates({"float": (model, None, None), "fused": (model, kv_format, None),
                               "dequantize_all": (model, kv_format, "reference")},
                              prompt_len=config.decode_prompt_len, steps=config.decode_tokens,
                              repeats=max(config.timing_repeats, 5), kv_group_size=config.kv_group_size)
  speed = rates["tokens_per_s"]
  return {**rates, "speed_ratio": speed["fused"] / speed["float"],
          "fused_speedup": speed["fused"] / speed["dequantize_all"]}


def _minilm_names(config) -> list[str]:
  rows = config.minilm_rows
  names = list(MINILM_ROWS) if rows == "all" else [n.strip() for n in rows.split(",") if n.strip()]
  unknown = [n for n in names if n not in MINILM_ROWS]
  if unknown:
    raise ValueError(f"--config.minilm_rows: unknown {unknown}; choose from {list(MINILM_ROWS)} (SmoothQuant and "
                     "KV rows do not apply to the post-LN encoder).")
  return names


def retrieval_scores(queries, documents, reference_queries=None, reference_documents=None) -> dict:
  """Top-1 retrieval of L2-normalized embeddings [n, D]: each query's nearest document by cosine. `accuracy`:
  query i finds document i. With reference embeddings (the float model's): `agreement`, the same top-1 document
  as the reference; `cosine_mean/min`, each embedding's cosine to its reference (queries and documents); and
  `score_rms`, the RMS change of the query x document cosine matrix (more sensitive than top-1 on a small set)."""
  queries, documents = np.asarray(queries, np.float64), np.asarray(documents, np.float64)
  scores_matrix = queries @ documents.T
  top1 = np.argmax(scores_matrix, axis=1)
  scores = {"accuracy": float(np.mean(top1 == np.arange(len(queries)))), "top1": top1.tolist()}
  if reference_queries is not None:
    reference_matrix = np.asarray(reference_queries, np.float64) @ np.asarray(reference_documents, np.float64).T
    ours = np.concatenate([queries, documents])
    theirs = np.concatenate([reference_queries, reference_documents]).astype(np.float64)
    cosines = np.sum(ours * theirs, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    scores.update(agreement=float(np.mean(top1 == np.argmax(reference_matrix, axis=1))),
                  cosine_mean=float(cosines.mean()), cosine_min=float(cosines.min()),
                  score_rms=float(np.sqrt(np.mean((scores_matrix - reference_matrix) ** 2))))
  return scores


def minilm_rows(config, names) -> dict:
  """The MiniLM rows (see the module docstring): {row: bytes/param, cosine to float, top-1 agreement/accuracy}."""
  t0 = time.perf_counter()
  loaded = models.load(config.minilm_model, dtype=jnp.float32)
  if not isinstance(loaded.model, bert.Bert) or loaded.tokenizer is None:
    raise ValueError(f"--config.minilm_model={config.minilm_model!r} must be a BERT model with a tokenizer.json.")
  # Queries and documents in one padded batch: one compile per row.
  texts = loaded.tokenizer.encode_batch([q for q, _ in RETRIEVAL_PAIRS] + [d for _, d in RETRIEVAL_PAIRS])
  ids, mask = loaded.tokenizer.encode_batch(list(CALIBRATION_SENTENCES))
  calib = [{"tokens": ids, "segment_ids": mask}]  # padding is segment 0: left out of the Hessians
  statistics = calibration.capture_hessians(loaded.model, calib) if any("gptq" in n for n in names) else None
  embed = lambda model: np.split(np.asarray(bert.embed(model, *texts)), 2)  # noqa: E731  (queries, documents)
  reference = embed(loaded.model)
  print(f"MiniLM ({config.minilm_model}) loaded and embedded in {time.perf_counter() - t0:.0f} s", flush=True)
  rows = {}
  for name in names:
    description, make_rules = ROWS[name]
    t0 = time.perf_counter()
    model = loaded.model
    if make_rules is not None:
      model = quant.quantize_model(nnx.clone(loaded.model), make_rules(config), calibration_data=calib,
                                   statistics=statistics)
    if make_rules is None:
      description = "f32 projections (the wheel's f32 safetensors)"
    rows[name] = {"description": description, **projection_bytes(model),
                  **retrieval_scores(*embed(model), *reference), "seconds": time.perf_counter() - t0}
    row = rows[name]
    print(f"[minilm {name}] {row['bytes_per_param']:.3f} B/param, cosine to float mean {row['cosine_mean']:.5f} "
          f"min {row['cosine_min']:.5f}, score RMS change {row['score_rms']:.4f}, top-1 agreement "
          f"{row['agreement']:.3f}, accuracy {row['accuracy']:.3f} "
          f"({row['seconds']:.0f} s)", flush=True)
    del model
  return {"model": config.minilm_model, "source": loaded.source, "pairs": len(RETRIEVAL_PAIRS),
          "calibration_sentences": len(CALIBRATION_SENTENCES), "rows": rows}


def _forward(model):
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  return lambda tokens: jitted(state, tokens)


def _delta(rows, name):
  if name not in rows or "float32" not in rows:
    return None
  return 100.0 * (rows[name]["validation"]["perplexity"] / rows["float32"]["validation"]["perplexity"] - 1.0)


def _fmt(delta):
  return "n/a (row not run)" if delta is None else f"{delta:+.2f}%"


def claims(rows, group_size: int = 64) -> list[common.Claim]:
  """Seed claims beside what we measured. 'Negligible' / 'without degradation' = within 1% perplexity here."""
  d = {name: _delta(rows, name) for name in ROWS}
  out = []

  def verdict(ok, partly=False):
    return "reproduced" if ok else ("partly" if partly else "not reproduced")

  if d["w4-gptq"] is not None and d["w3-gptq"] is not None:
    out.append(common.Claim(
        "GPTQ: quantize to '3 or 4 bits per weight' with negligible accuracy loss (175B models)",
        f"135M: W4 GPTQ {_fmt(d['w4-gptq'])} ppl, W3 GPTQ {_fmt(d['w3-gptq'])} (groups of {group_size})",
        verdict(d["w4-gptq"] <= 1.0 and d["w3-gptq"] <= 1.0, partly=d["w4-gptq"] <= 1.0)
        + ("" if d["w3-gptq"] <= 1.0 else " at 135M (the claim is for 100B+ models; the paper's smallest models "
           "lose more too)")))
  if all(d[k] is not None for k in ("w4-gptq", "w4-rtn", "w3-gptq", "w3-rtn", "w8")):
    beats_rtn = d["w4-gptq"] < d["w4-rtn"] and d["w3-gptq"] < d["w3-rtn"]
    out.append(common.Claim(
        "GPTQ 'more than doubles the compression gains' of earlier one-shot methods (RTN at 8 bits): 4 bits "
        "(or fewer) at near-8-bit accuracy",
        f"W8 RTN {_fmt(d['w8'])}; W4: RTN {_fmt(d['w4-rtn'])} -> GPTQ {_fmt(d['w4-gptq'])}; "
        f"W3: RTN {_fmt(d['w3-rtn'])} -> GPTQ {_fmt(d['w3-gptq'])}",
        "reproduced" if beats_rtn and d["w4-gptq"] <= 1.0 else
        ("partly: GPTQ beats RTN at 4 and 3 bits, but 4-bit GPTQ is not within 1% of float at 135M"
         if beats_rtn else "not reproduced")))
  if d["w4-gptq-actorder"] is not None and d["w4-gptq"] is not None:
    out.append(common.Claim("GPTQ act-order (descending diag H) helps",
                            f"W4 GPTQ {_fmt(d['w4-gptq'])} vs act-order {_fmt(d['w4-gptq-actorder'])}",
                            verdict(d["w4-gptq-actorder"] < d["w4-gptq"])))
  if d["llm-int8"] is not None:
    out.append(common.Claim("LLM.int8(): 8-bit inference 'without any performance degradation'",
                            f"LLM.int8() {_fmt(d['llm-int8'])}, plain W8A8 {_fmt(d['w8a8'])}",
                            verdict(abs(d["llm-int8"]) <= 1.0)))
  if d["w8"] is not None:
    out.append(common.Claim("issue 3: int8 weight-only within 1% perplexity of float", f"W8 RTN {_fmt(d['w8'])}",
                            verdict(abs(d["w8"]) <= 1.0)))
  if d["w8a8-smoothquant"] is not None and d["w8a8"] is not None:
    out.append(common.Claim("SmoothQuant: migrating activation outliers into weights makes W8A8 more accurate",
                            f"W8A8 {_fmt(d['w8a8'])} -> with SmoothQuant {_fmt(d['w8a8-smoothquant'])}",
                            verdict(d["w8a8-smoothquant"] < d["w8a8"])))
  if d["kv-int8"] is not None:
    out.append(common.Claim("KV-cache int8 (per-channel K, per-token V; KIVI / Cache-Me-If-You-Must) costs ~no "
                            "perplexity (within 1%)", f"kv-int8 {_fmt(d['kv-int8'])} at "
                            f"{rows['kv-int8']['kv_ratio']:.3f}x the f32 cache bytes", verdict(abs(d["kv-int8"]) <= 1.0)))
  if d["kv-int4"] is not None:
    out.append(common.Claim("4-bit KV is usable with per-channel K (KIVI; Block-FP KV: '2x' memory savings with no "
                            "significant loss); 'usable' = within 5% perplexity here",
                            f"kv-int4 {_fmt(d['kv-int4'])} at {rows['kv-int4']['kv_ratio']:.3f}x the f32 cache bytes",
                            verdict(d["kv-int4"] <= 5.0, partly=d["kv-int4"] <= 10.0)))
  if d["kv-int4"] is not None and d["kv-int4-ktoken"] is not None:
    out.append(common.Claim("KV quantization (seed digest C11, KIVI): per-channel K beats per-token K",
                            f"int4 KV: per-channel K {_fmt(d['kv-int4'])} vs per-token K {_fmt(d['kv-int4-ktoken'])} "
                            "(per-channel also keeps the open group's keys in float)",
                            verdict(d["kv-int4"] < d["kv-int4-ktoken"])))
  if d["nf4"] is not None and d["w4-rtn"] is not None:
    out.append(common.Claim("QLoRA: NF4 quantizes normally distributed weights better than int4",
                            f"NF4 (block 64) {_fmt(d['nf4'])} vs int4 RTN g64 {_fmt(d['w4-rtn'])}",
                            verdict(d["nf4"] < d["w4-rtn"])))
  return out


def _write(workdir, config, results):
  rows = results["rows"]
  tables, notes, plots = {}, [], []
  if rows:
    _smollm2_report(workdir, config, rows, tables, notes, plots)
  minilm = results.get("minilm")
  if minilm:
    tables[f"MiniLM rows ({minilm['model']}, {minilm['pairs']} query/document pairs)"] = (
        ("row", "method", "projection bytes/param", "cosine to float (mean)", "cosine to float (min)",
         "query x doc score RMS change", "top-1 agreement with float", "top-1 accuracy (true pairs)"),
        [(name, row["description"], f"{row['bytes_per_param']:.3f}", f"{row['cosine_mean']:.5f}",
          f"{row['cosine_min']:.5f}", f"{row['score_rms']:.4f}", f"{row['agreement']:.3f}", f"{row['accuracy']:.3f}")
         for name, row in minilm["rows"].items()])
    projections = next(iter(minilm["rows"].values()))["projections"]
    notes.append(f"MiniLM rows: the same rules on the BERT encoder's {projections} projections (biases, embeddings "
                 "and LayerNorms stay f32), scored on the embeddings of RETRIEVAL_PAIRS (queries and documents). "
                 "Top-1 retrieval on 16 distinct-topic pairs saturates (every row here keeps it); the cosines and "
                 "the RMS change of the query x document score matrix are what separate the formats. GPTQ rows "
                 f"calibrate on {minilm['calibration_sentences']} other sentences (a few hundred tokens: Hessians "
                 "of rank below in_features, held up by the 1% damping).")
  title = "PTQ of SmolLM2-135M on this CPU" if rows else f"PTQ of {minilm['model']} on this CPU"
  common.write_results(workdir, title=title, config=config.to_dict(), results=results,
                       claims=claims(rows, config.group_size) + minilm_claims(minilm), plots=plots, tables=tables,
                       notes="\n\n".join(notes))


def minilm_claims(minilm) -> list[common.Claim]:
  rows = (minilm or {}).get("rows", {})
  if "w8" not in rows:
    return []
  row = rows["w8"]
  return [common.Claim("issue 9: int8 weight-only PTQ by the same path rules keeps a BERT encoder's sentence "
                       "embeddings (cosine to float >= 0.99, top-1 retrieval unchanged)",
                       f"all-MiniLM-L6-v2 W8: cosine mean {row['cosine_mean']:.5f}, min {row['cosine_min']:.5f}; "
                       f"top-1 agreement {row['agreement']:.3f}",
                       "reproduced" if row["cosine_min"] >= 0.99 and row["agreement"] == 1.0 else "not reproduced")]


def _smollm2_report(workdir, config, rows, tables, notes, plots):
  """The SmolLM2 rows' table, decode table, plot and notes (added to `tables`, `notes`, `plots`)."""
  base = rows.get("float32", {}).get("validation", {}).get("perplexity")
  table = []
  for name, row in rows.items():
    ppl = row["validation"]["perplexity"]
    delta = "" if base is None else f"{100 * (ppl / base - 1):+.2f}%"
    table.append((name, row["description"], f"{row['bytes_per_param']:.3f}",
                  f"{row['kv_bytes_per_token']:.0f} ({row['kv_ratio']:.3f}x)", f"{ppl:.3f}", delta,
                  f"{row['forward_ms']:.0f}", f"{row['forward_ratio']:.2f}x", f"{row['quantize_s']:.0f}"))
  decode = [(name, f"{row['decode']['tokens_per_s']['float']:.1f}", f"{row['decode']['tokens_per_s']['dequantize_all']:.1f}",
             f"{row['decode']['tokens_per_s']['fused']:.1f}", f"{row['decode']['fused_speedup']:.2f}x",
             f"{row['decode']['speed_ratio']:.2f}x")
            for name, row in rows.items() if "decode" in row]
  plot = _plot(workdir, rows, base)
  plots.extend([plot] if plot else [])
  tokens = next(iter(rows.values()))["validation"]["tokens"]
  projections = next(iter(rows.values()))["projections"]
  tables["Rows"] = (("row", "method", "projection bytes/param", "KV bytes/token (vs f32 cache)",
                     f"val ppl ({tokens} tokens)", "Δ ppl vs f32", f"forward [1,{config.prefill_len}] ms",
                     "vs f32 (alternating)", "quantize s"), table)
  if decode:
    tables["KV-cache decode (greedy, CPU)"] = (
        ("row", "float cache tok/s", "quantized, dequantize-all (before) tok/s", "quantized, fused (after) tok/s",
         "after / before", "after / float"), decode)
  weight_decode = [(name, f"{row['weight_decode']['tokens_per_s']['float32']:.1f}",
                    f"{row['weight_decode']['tokens_per_s'][name]:.1f}",
                    f"{row['weight_decode']['tokens_per_s'][name] / row['weight_decode']['tokens_per_s']['float32']:.2f}x")
                   for name, row in rows.items() if "weight_decode" in row]
  if weight_decode:
    tables["Weight-only decode, M = 1 (greedy, CPU)"] = (
        ("row", "float32 tok/s", "row tok/s", "row / float"), weight_decode)
    notes.append(
        f"Weight decode: prompt {config.weight_decode_prompt_len}, {config.weight_decode_tokens} greedy steps timed "
        "from a prefilled float cache, alternating with the float model. On CPU the int8/int4/NF4 layers run "
        "quant_matmul's reference (every weight dequantized to f32, then an f32 GEMV): XLA:CPU fuses no "
        "conversion into a dot, so each step writes and re-reads an f32 copy of every weight, and no CPU path reads "
        "the packed weight inside the product (the Pallas kernels do that on TPU/GPU).")
  notes.append(
      f"Calibration: {config.calib_batches}x{config.calib_batch_size}x{config.calib_seq_len} train tokens "
      "(GPTQ's paper uses 128x2048); Hessians captured once from the float model (one-shot, not GPTQ's "
      f"sequential re-capture), damp 1% of mean diag. Bytes/param counts the {projections} projections only "
      "(embedding/head and norms stay f32). CPU forward times run the reference/XLA paths of the kernels "
      "(dequantize then matmul for weight-only; int8 GEMM for W8A8), medians of "
      f"{config.timing_repeats} runs alternating with the float model on a shared 2-core machine "
      "(±50%); they say nothing about TPU/GPU kernels. kv-* rows: float weights, perplexity of the simulated "
      f"quantized-KV forward (= decoding with the quantized cache); K scales per channel over groups of "
      f"{config.kv_group_size} slots, the open group kept in float (KIVI's residual), so in these "
      f"{config.eval_seq_len}-token sequences a query sees up to {config.kv_group_size - 1} float keys; "
      f"KV bytes/token measured on a {next(iter(rows.values()))['kv_bytes_len']}-slot cache (all layers); "
      f"decode: each cache prefilled once with a {config.decode_prompt_len}-token prompt (untimed), then "
      f"{config.decode_tokens} greedy steps timed (batch 1, median of {max(config.timing_repeats, 5)} alternating "
      "runs; the weights' 0.5 GB per step dominate the bytes, the cache adds 1-20% of them); 'before' "
      "forces pallas_kernels.quant_decode to its reference (the whole cache dequantized every step, as before "
      "the fused path), 'after' is the default path (on CPU quant_decode's XLA loop: one chunk of groups "
      "dequantized at a time inside the online softmax; the Pallas kernels on TPU/GPU).")


def _plot(workdir, rows, base):
  if base is None:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, row in rows.items():
    ax.scatter(row["bytes_per_param"], row["validation"]["perplexity"])
    ax.annotate(name, (row["bytes_per_param"], row["validation"]["perplexity"]), fontsize=8,
                xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("projection bytes per parameter (log2)")
  ax.set_ylabel("validation perplexity")
  ax.set_title("SmolLM2-135M PTQ: size vs perplexity")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = f"{workdir}/ptq.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


if __name__ == "__main__":
  common.run_program(run, default_config(), "workdir/ptq")
