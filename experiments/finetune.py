"""C20: fine-tuning SmolLM2-135M (real weights) onto a shifted corpus -- full fine-tuning vs PEFT, side by side.

    python -m experiments.finetune [--workdir=workdir/finetune] [--config.rows=full_adamw,lora,qlora,...]
        [--config.steps=12] [--config.model=smollm2-135m|tiny]

The corpus: the CPython standard library's docstrings (English prose about code; `efficient.data.docstrings_of`),
split by a hash of the file path -- shifted from SmolLM2's web/code pre-training mix. Rows (every one through
`efficient.train.train`, the trainer's own path, same data, seed and steps):

  full_adamw     every parameter, fp32 AdamW                   full_adam8bit  every parameter, 8-bit Adam
  lora           LoRA r=8 (alpha 16) on every block projection  qlora          the same on an NF4 base (64-blocks,
                                                                               double-quantized absmax), packed
  dora           DoRA r=8 on the same layers                   road           RoAd (road_1) on the same layers
  loreft         LoReFT rank 4 on every block's output hidden state (all positions)

Columns: trainable parameters, optimizer-state bytes (the real state pytree), parameter bytes (every array of
the model: a packed base counts packed), the compiled step's temp and peak bytes (`memory_analysis` on this
CPU), step time (median of the logged per-step intervals after the first) and validation perplexity before ->
after. Writes results.json, results.md (claims | measured | verdict), finetune.png.
"""
from __future__ import annotations

import os
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from efficient import data, measure, models, peft, train
from efficient.models import llama
from efficient.quant import QuantConfig
from experiments import common
from experiments.optimizers import run_one

ROWS = ("full_adamw", "full_adam8bit", "lora", "qlora", "dora", "road", "loreft")
# Every projection of every block (attention q/k/v/o, MLP gate/up/down): QLoRA's "all linear layers".
BLOCK_PROJECTIONS = r"blocks/\d+/(attention/(q|k|v|o)|mlp/(gate|up|down))"
# Learning rates by row: full fine-tuning moves every weight (small steps); adapters start at zero/identity.
DEFAULT_LEARNING_RATES = "full_adamw=3e-5,full_adam8bit=3e-5,lora=1e-3,qlora=1e-3,dora=1e-3,road=3e-3,loreft=2e-3"


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.rows = ",".join(ROWS)
  config.model = "smollm2-135m"  # or 'tiny': a random-init TINY Llama on bytes (tests)
  config.steps = 12
  config.batch_size = 2
  config.seq_len = 128
  config.learning_rates = DEFAULT_LEARNING_RATES
  config.lora_rank = 8
  config.lora_alpha = 16.0
  config.reft_rank = 4
  config.road_group_size = 64
  config.nf4_group_size = 64
  config.eval_batches = 4
  config.seed = 0
  config.keep_checkpoints = False
  return config


def _load(config):
  """(model, tokenizer or None for bytes, name) of `config.model`."""
  if config.model == "tiny":
    return llama.Llama(llama.TINY, rngs=nnx.Rngs(config.seed)), None
  loaded = models.load(config.model, dtype=jnp.float32)
  return loaded.model, loaded.tokenizer


def _learning_rates(config) -> dict[str, float]:
  rates = common.learning_rates(config, "learning_rates", ROWS, what="row")
  missing = [row for row in ROWS if row not in rates]
  if missing:
    raise ValueError(f"--config.learning_rates has no rate for rows {missing}.")
  return rates


def adapt(row: str, model: nnx.Module, config) -> dict:
  """Applies `row`'s method to `model` in place; returns what it added ({path: wrapper}, empty for full rows)."""
  lora = peft.LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha)
  if row.startswith("full_"):
    return {}
  if row == "lora":
    return peft.add_adapters(model, [(BLOCK_PROJECTIONS, lora)], seed=config.seed)
  if row == "qlora":
    quant = QuantConfig(fmt="nf4", group_size=config.nf4_group_size, double_quant=True)
    return peft.qlora(model, BLOCK_PROJECTIONS, quant=quant, lora=lora, seed=config.seed)
  if row == "dora":
    return peft.add_adapters(model, [(BLOCK_PROJECTIONS, peft.LoRAConfig(rank=config.lora_rank,
                                                                          alpha=config.lora_alpha, dora=True))],
                             seed=config.seed)
  if row == "road":
    return peft.add_adapters(model, [(BLOCK_PROJECTIONS, peft.RoAdConfig(variant="road_1",
                                                                          group_size=config.road_group_size))],
                             seed=config.seed)
  if row == "loreft":
    reft = peft.ReFTConfig(rank=config.reft_rank, positions="all")
    return peft.add_interventions(model, [(r"blocks/\d+", reft)], seed=config.seed)
  raise ValueError(f"--config.rows: unknown row {row!r}; choose from {ROWS}.")


def _train_config(config, row: str, learning_rate: float) -> train.TrainConfig:
  full = row.startswith("full_")
  return train.TrainConfig(
      learning_rate=learning_rate, warmup_steps=0, total_steps=config.steps, batch_size=config.batch_size,
      seq_len=config.seq_len, checkpoint_every=config.steps, keep_checkpoints=1, log_every=1, b2=0.999,
      weight_decay=0.0 if not full else 0.1, optimizer="adam8bit" if row == "full_adam8bit" else "adamw",
      trainable="all" if full else "adapters")


def _datasets(config, tokenizer):
  tokens = (config.steps + config.eval_batches) * config.batch_size * config.seq_len * 2
  kwargs = dict(batch_size=config.batch_size, seq_len=config.seq_len, tokenizer=tokenizer, text="docstrings",
                max_tokens=tokens)
  dataset = data.stdlib_dataset("train", seed=config.seed, **kwargs)
  held_out = data.stdlib_dataset("validation", **kwargs)
  return dataset, [held_out.batch(s) for s in range(config.eval_batches)]


def run_row(row, base, base_eval, dataset, validation, config, learning_rate, workdir) -> dict:
  model = nnx.clone(base)
  added = adapt(row, model, config)
  train_config = _train_config(config, row, learning_rate)
  # A full row starts from the base itself; an adapted one is measured at init (QLoRA: the quantized base).
  before = base_eval if not added else train.evaluate(model, validation)
  result = run_one(row, model, dataset, validation, train_config, workdir, keep_checkpoints=config.keep_checkpoints)
  return dict(result, learning_rate=learning_rate, adapted_layers=len(added), validation_before=before,
              trainable_parameters=result["parameters"], parameter_bytes=measure.parameter_bytes(model)["total"])


def _mib(n: float) -> str:
  return f"{n / 2 ** 20:.1f}"


def _table(rows, full_params: int | None):
  header = ("row", "lr", "trainable params", "x fewer", "optimizer state MiB", "parameter MiB",
            "step temp MiB", "step peak MiB", "step s", "val ppl before -> after")
  body = []
  for name, r in rows.items():
    fewer = f"{full_params / r['trainable_parameters']:.0f}" if full_params else "n/a"
    body.append((name, f"{r['learning_rate']:g}", f"{r['trainable_parameters']:,}", fewer, _mib(r["state_bytes"]),
                 _mib(r["parameter_bytes"]), _mib(r["step_memory"]["temp_bytes"]),
                 _mib(r["step_memory"]["peak_bytes"]), f"{r['step_seconds']:.2f}",
                 f"{r['validation_before']['perplexity']:.3f} -> {r['validation']['perplexity']:.3f}"))
  return header, body


def _claims(rows, steps) -> list[common.Claim]:
  claims = []
  full, qlora, lora = rows.get("full_adamw"), rows.get("qlora"), rows.get("lora")
  if full and qlora:
    gap = (qlora["validation"]["loss"] - full["validation"]["loss"]) / full["validation"]["loss"]
    gained_full = full["validation_before"]["loss"] - full["validation"]["loss"]
    gained_qlora = qlora["validation_before"]["loss"] - qlora["validation"]["loss"]
    memory = qlora["step_memory"]["peak_bytes"] / full["step_memory"]["peak_bytes"]
    params = qlora["parameter_bytes"] / full["parameter_bytes"]
    verdict = ("reproduced at this budget" if abs(gap) <= 0.02 else
               "not reproduced at this budget" if gap > 0.02 else "QLoRA ahead at this budget")
    claims.append(common.Claim(
        "QLoRA (NF4 base + LoRA) matches 16-bit full fine-tuning at a fraction of the memory (Dettmers et al.)",
        f"after {steps} steps validation loss {qlora['validation']['loss']:.4f} vs full AdamW "
        f"{full['validation']['loss']:.4f} ({gap:+.2%}); loss gained {gained_qlora:+.4f} vs {gained_full:+.4f}; "
        f"parameter bytes {params:.2f}x, compiled step peak {memory:.2f}x of full fine-tuning; the NF4 base alone "
        f"starts at perplexity {qlora['validation_before']['perplexity']:.3f} vs "
        f"{full['validation_before']['perplexity']:.3f} (float)", verdict))
  if full:
    adapters = {k: r for k, r in rows.items() if not k.startswith("full_")}
    if adapters:
      ratios = {k: full["trainable_parameters"] / r["trainable_parameters"] for k, r in adapters.items()}
      low, high = min(ratios.values()), max(ratios.values())
      claims.append(common.Claim(
          "PEFT trains 100-1000x fewer parameters than full fine-tuning",
          ", ".join(f"{k} {v:.0f}x" for k, v in ratios.items()),
          "reproduced" if low >= 100 else
          f"partly (under 100x: {', '.join(k for k, v in ratios.items() if v < 100)})" if high >= 100
          else "not reproduced"))
      base_step = full["step_seconds"]
      speed = {k: base_step / r["step_seconds"] for k, r in adapters.items()}
      modest = all(s < 3.0 for s in speed.values())
      claims.append(common.Claim(
          "Step time drops only modestly with PEFT: the backward still runs through the frozen base",
          "step-time speed-up vs full AdamW (CPU, per-step median): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in speed.items()),
          "reproduced" if modest else "not reproduced (larger speed-ups here)"))
  if lora and qlora:
    claims.append(common.Claim(
        "The QLoRA base stays packed: 4-bit weights at ~0.5 bytes/param",
        f"parameter bytes {_mib(qlora['parameter_bytes'])} MiB (QLoRA) vs {_mib(lora['parameter_bytes'])} MiB "
        f"(LoRA on the f32 base)", "reproduced" if qlora["parameter_bytes"] < 0.4 * lora["parameter_bytes"]
        else "not reproduced"))
  return claims


def _plot(workdir, rows) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, r in rows.items():
    axes[0].plot([h["step"] for h in r["history"]], [h["loss"] for h in r["history"]], label=name)
  axes[0].set(xlabel="step", ylabel="training loss", title="fine-tuning loss")
  axes[0].legend(fontsize=8)
  names = list(rows)
  axes[1].bar(names, [rows[n]["trainable_parameters"] for n in names])
  axes[1].set(yscale="log", ylabel="trainable parameters", title="trainable parameters")
  axes[1].tick_params(axis="x", rotation=45)
  return common.save_figure(fig, workdir, "finetune.png")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  common.check_finite_config(config)
  workdir = common.prepare_workdir(workdir)
  rows_wanted = common.config_list(config, "rows")
  for row in rows_wanted:
    if row not in ROWS:
      raise ValueError(f"--config.rows: unknown row {row!r}; choose from {ROWS}.")
  for field in ("steps", "batch_size", "seq_len", "eval_batches", "lora_rank", "reft_rank"):
    if config[field] < 1:
      raise ValueError(f"--config.{field} must be >= 1, got {config[field]}.")
  rates = _learning_rates(config)
  started = time.perf_counter()
  base, tokenizer = _load(config)
  dataset, validation = _datasets(config, tokenizer)
  base_eval = train.evaluate(base, validation)
  rows = {}
  # Each row's step is compiled once for its memory analysis and once more by the trainer: the second is a hit.
  with common.compilation_cache(os.path.join(workdir, "compilation_cache")):
    for row in common.progress(rows_wanted, desc="finetune", unit="row"):
      print(f"[finetune] {row}: lr {rates[row]:g}, {config.steps} steps", flush=True)
      rows[row] = run_row(row, base, base_eval, dataset, validation, config, rates[row], workdir)
      r = rows[row]
      print(f"  trainable {r['trainable_parameters']:,}, ppl {r['validation_before']['perplexity']:.3f} -> "
            f"{r['validation']['perplexity']:.3f}, step {r['step_seconds']:.2f} s", flush=True)
  full = rows.get("full_adamw") or rows.get("full_adam8bit")
  tables = {f"{config.model}, {config.steps} steps of batch {config.batch_size} x {config.seq_len} tokens "
            f"(base validation perplexity {base_eval['perplexity']:.3f})":
            _table(rows, full["trainable_parameters"] if full else None)}
  results = {"model": config.model, "validation_base": base_eval, "rows": rows,
             "wall_seconds": time.perf_counter() - started, "corpus": dict(data.corpus_info(), text="docstrings"),
             "validation_tokens": int(np.sum([b["loss_mask"].sum() for b in validation]))}
  notes = (f"What this budget cannot show: {config.steps} steps of {config.batch_size}x{config.seq_len} tokens is "
           "far from convergence, so final-quality claims (QLoRA = full fine-tuning) are about the first steps "
           "only; learning rates are per-method defaults, not tuned. LoReFT starts from pyreft's (non-identity) "
           "init on every block's output at every position, far from the base model (its 'before' perplexity); "
           "the LoRA family at rank 8 on all seven projections of every block trains ~2% of the parameters, "
           "RoAd and LoReFT ~0.1%. The 'float' SmolLM2 base is the "
           "dequantized Q4_1 GGUF (DESIGN.md), so NF4 re-quantizes weights already on a 4-bit grid. Step "
           "memory and time are XLA:CPU figures (QLoRA's packed matmul runs its XLA reference path on a CPU; "
           "the Pallas kernel targets TPU/GPU).")
  common.write_results(workdir, title=f"Fine-tuning {config.model}: full vs PEFT (C20)", config=config.to_dict(),
                       results=results, claims=_claims(rows, config.steps), tables=tables, notes=notes,
                       plots=[_plot(workdir, rows)])
  print(f"wrote {workdir}/results.md ({results['wall_seconds']:.0f} s)", flush=True)
  return results


if __name__ == "__main__":
  common.run_program(run, default_config(), "workdir/finetune")
