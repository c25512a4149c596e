"""C15: memory-efficient optimizers side by side -- the same model, data, seed and steps, one row per optimizer.

    python -m experiments.optimizers [--workdir=workdir/optimizers] [--config.optimizers=adamw,adam8bit,...]
        [--config.steps=300] [--config.smollm2_steps=16] [--config.smollm2_optimizers=none]

Part 1 trains a small Llama from scratch on the stdlib corpus (bytes) with every optimizer of
`efficient.optim.OPTIMIZERS` through `efficient.train.train` (the trainer's own path: named, sharding-ready
state, checkpoints): final validation loss and its change vs fp32 AdamW, optimizer-state bytes per parameter
measured from the real state pytree (codes, block scales, factored statistics, projections: every array leaf),
the compiled step's peak memory (`memory_analysis`), step time (median over logged intervals after the first,
which holds compilation) and a loss-curve plot. Part 2 fine-tunes SmolLM2-135M (real weights) for a few steps
with fp32 AdamW, 8-bit and 4-bit Adam and MeZO: state bytes of a 135M model, compiled step memory and loss
before -> after. Writes results.json, results.md (claims | measured | verdict), loss_curves.png.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from efficient import data, measure, models, optim, train
from efficient.models import llama
from experiments import common

# Learning rates that differ from --config.learning_rate by method: MeZO's SPSA estimate is noisy (one random
# direction per step), the paper runs it ~100x below first-order rates.
DEFAULT_LEARNING_RATES = "mezo=1e-4"


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # optimizer names; '<name>+stable' keeps the embedding's state in f32 (bitsandbytes' stable embedding)
  config.optimizers = ",".join(optim.OPTIMIZERS[:2] + ("adam8bit+stable",) + optim.OPTIMIZERS[2:])
  config.steps = 300
  config.warmup_steps = 30
  config.batch_size = 8
  config.seq_len = 128
  config.learning_rate = 3e-3
  config.learning_rates = DEFAULT_LEARNING_RATES  # per-optimizer overrides, 'name=lr,...'
  config.embed_dim = 128
  config.num_layers = 2
  config.rank = 32            # galore / apollo projection rank (the model's matrices are 128 x 128..384)
  config.update_proj_gap = 50
  config.eval_batches = 8
  config.seed = 0
  config.adamw_seeds = 3      # AdamW also at seeds seed+1.. (1: none): the seed-to-seed spread of the loss
  config.keep_checkpoints = False  # False: each run's checkpoints are deleted once measured
  config.smollm2_model = "smollm2-135m"
  config.smollm2_optimizers = "adamw,adam8bit,adam4bit,mezo"  # 'none' skips part 2
  config.smollm2_steps = 16
  config.smollm2_batch_size = 2
  config.smollm2_seq_len = 128
  config.smollm2_learning_rate = 3e-5
  config.smollm2_learning_rates = "mezo=1e-6"
  config.smollm2_eval_batches = 4
  return config


def _names(config, field: str) -> list[str]:
  if str(config[field]) == "none":
    return []
  names = common.config_list(config, field)
  unknown = [n for n in names if _optimizer(n)[0] not in optim.OPTIMIZERS or n.count("+") > 1
             or "+" in n and not n.endswith("+stable")]
  if unknown:
    raise ValueError(f"--config.{field}: unknown optimizers {unknown}; choose from {optim.OPTIMIZERS}.")
  return names


def _optimizer(row: str) -> tuple[str, bool]:
  """'adam8bit+stable' -> ('adam8bit', True): the optimizer of a row and whether its embedding state is f32."""
  name, _, suffix = row.partition("+")
  return name, suffix == "stable"


def measure_optimizer(model: nnx.Module, train_config: train.TrainConfig, batch: dict) -> dict:
  """State bytes (real pytree) and the compiled step's memory, for `model` under `train_config`'s optimizer."""
  state = train.init_train_state(nnx.clone(model), train_config)
  step = train.make_train_step(state)
  memory = optim.compiled_memory(step, state.params, state.opt_state, state.rest, train.place_batch(batch, state),
                                 0)
  parameters = measure.parameter_count(state.params)
  state_bytes = optim.state_bytes(state.opt_state)
  return {"state_bytes": state_bytes, "state_bytes_per_param": state_bytes / parameters,
          "parameters": parameters, "step_memory": memory}


def _history(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, train.METRICS_FILE)) as f:
    return [record for record in map(json.loads, f) if "loss" in record]


def _step_seconds(history: list[dict], tokens_per_step: int) -> float:
  rates = [r["tokens_per_sec"] for r in history[1:]] or [r["tokens_per_sec"] for r in history]
  return tokens_per_step / float(np.median(rates))


def run_one(name, model, dataset, validation, train_config, workdir, *, keep_checkpoints) -> dict:
  """Trains `model` in place with optimizer `name`; its measurements, history and validation loss."""
  measured = measure_optimizer(model, train_config, dataset.batch(0))
  run_dir = os.path.join(workdir, "runs", name)
  started = time.perf_counter()
  train.train(model, dataset, train_config, run_dir, progress=False)
  wall = time.perf_counter() - started
  history = _history(run_dir)
  if not keep_checkpoints:
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
  evaluation = train.evaluate(model, validation)
  tokens = train_config.batch_size * train_config.seq_len
  return {**measured, "history": history, "validation": evaluation, "wall_seconds": wall,
          "step_seconds": _step_seconds(history, tokens),
          "skipped_steps": history[-1].get("skipped_steps", 0) if history else 0}


def _train_config(config, row, learning_rate, *, steps, warmup, batch_size, seq_len) -> train.TrainConfig:
  name, stable_embedding = _optimizer(row)
  return train.TrainConfig(
      learning_rate=learning_rate, warmup_steps=warmup, total_steps=steps, batch_size=batch_size,
      seq_len=seq_len, checkpoint_every=steps, keep_checkpoints=1, log_every=max(1, min(10, steps // 10)),
      b2=0.999, optimizer=name, stable_embedding=stable_embedding, rank=config.rank,
      update_proj_gap=config.update_proj_gap,
      optimizer_seed=config.seed, skip_nonfinite_steps=True)


def part_one(config, workdir, names) -> dict:
  architecture = common.small_llama(config)
  rates = common.learning_rates(config, "learning_rates", optim.OPTIMIZERS, what="optimizer")
  held_out = data.stdlib_dataset("validation", batch_size=config.batch_size, seq_len=config.seq_len)
  validation = [held_out.batch(s) for s in range(config.eval_batches)]
  # (row name, optimizer row, seed): every optimizer at config.seed, then AdamW at other seeds (model init and
  # data order) -- how far two equally good runs land apart at this scale, the yardstick for every delta.
  runs = [(name, name, config.seed) for name in names]
  runs += [(f"adamw seed={config.seed + k}", "adamw", config.seed + k) for k in range(1, config.adamw_seeds)]
  rows = {}
  for key, name, seed in common.progress(runs, desc="optimizers part 1", unit="run"):
    lr = rates.get(_optimizer(name)[0], config.learning_rate)
    train_config = _train_config(config, name, lr, steps=config.steps, warmup=config.warmup_steps,
                                 batch_size=config.batch_size, seq_len=config.seq_len)
    dataset = data.stdlib_dataset("train", batch_size=config.batch_size, seq_len=config.seq_len, seed=seed)
    model = llama.Llama(architecture, rngs=nnx.Rngs(seed))
    print(f"[part 1] {key}: lr {lr:g}, {config.steps} steps", flush=True)
    rows[key] = dict(run_one(key.replace(" ", "_"), model, dataset, validation, train_config,
                             os.path.join(workdir, "part1"), keep_checkpoints=config.keep_checkpoints),
                     learning_rate=lr, seed=seed)
    print(f"  validation loss {rows[key]['validation']['loss']:.4f}, state "
          f"{rows[key]['state_bytes_per_param']:.3f} B/param, step {rows[key]['step_seconds'] * 1e3:.1f} ms",
          flush=True)
  adamw = [r["validation"]["loss"] for k, r in rows.items() if k == "adamw" or k.startswith("adamw seed=")]
  spread = (max(adamw) - min(adamw)) / min(adamw) if len(adamw) > 1 else None
  return {"model": architecture.to_dict(), "rows": rows, "adamw_seed_spread": spread}


def part_two(config, workdir, names) -> dict:
  loaded = models.load(config.smollm2_model, dtype=jnp.float32)
  rates = common.learning_rates(config, "smollm2_learning_rates", optim.OPTIMIZERS,
                                what="optimizer")
  count = config.smollm2_steps + config.smollm2_eval_batches
  tokens = count * config.smollm2_batch_size * config.smollm2_seq_len * 2
  dataset = data.stdlib_dataset("train", batch_size=config.smollm2_batch_size, seq_len=config.smollm2_seq_len,
                                tokenizer=loaded.tokenizer, seed=config.seed, max_tokens=tokens)
  held_out = data.stdlib_dataset("validation", batch_size=config.smollm2_batch_size,
                                 seq_len=config.smollm2_seq_len, tokenizer=loaded.tokenizer, max_tokens=tokens)
  validation = [held_out.batch(s) for s in range(config.smollm2_eval_batches)]
  before = train.evaluate(loaded.model, validation)
  rows = {}
  for name in common.progress(names, desc="optimizers part 2", unit="run"):
    lr = rates.get(_optimizer(name)[0], config.smollm2_learning_rate)
    train_config = _train_config(config, name, lr, steps=config.smollm2_steps, warmup=0,
                                 batch_size=config.smollm2_batch_size, seq_len=config.smollm2_seq_len)
    model = nnx.clone(loaded.model)
    print(f"[part 2] SmolLM2 {name}: lr {lr:g}, {config.smollm2_steps} steps", flush=True)
    rows[name] = dict(run_one(name, model, dataset, validation, train_config, os.path.join(workdir, "part2"),
                              keep_checkpoints=config.keep_checkpoints), learning_rate=lr)
    del model
  return {"model": config.smollm2_model, "validation_before": before, "rows": rows}


def _plot(workdir, part1) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, (name, row) in enumerate(part1["rows"].items()):  # dashed once the 10 default colors repeat
    ax.plot([r["step"] for r in row["history"]], [r["loss"] for r in row["history"]], label=name,
            linestyle="-" if i < 10 else "--")
  ax.axhline(np.log(256), color="gray", linestyle=":", label="uniform over bytes (ln 256)")
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (nats / byte)")
  ax.set_ylim(0.0, 6.5)  # a diverged run (the naive 4-bit baseline) leaves the chart instead of squashing it
  ax.grid(alpha=0.3)
  ax.legend(ncol=2, fontsize=8)
  return common.save_figure(fig, workdir, "loss_curves.png")


def _mib(n: float) -> str:
  return f"{n / 2**20:.2f}"


def _loss_verdict(d: float, tolerance: float, spread: float | None, *, memory_ok: bool = True) -> str:
  """A 'no worse than AdamW by more than tolerance' claim: reproduced, unresolvable (the gap is within AdamW's own
  seed-to-seed spread), or not reproduced."""
  if not memory_ok:
    return "not reproduced (memory)"
  if d <= tolerance:
    return "reproduced" if d >= -tolerance else "reproduced (lower loss than AdamW)"
  if spread is not None and d <= spread:
    return f"not resolvable at our scale (gap within AdamW's {spread:.1%} seed-to-seed spread)"
  return "not reproduced"


def _claims(part1, part2) -> list[common.Claim]:
  rows = part1["rows"]
  claims = []
  base = rows.get("adamw")
  spread = part1.get("adamw_seed_spread")
  spread_text = f"; AdamW over seeds: {spread:.2%} spread" if spread is not None else ""

  def delta(name):
    return (rows[name]["validation"]["loss"] - base["validation"]["loss"]) / base["validation"]["loss"]

  for name, claim, tolerance, bound in (
      ("adam8bit", "8-bit Adam (block-wise dynamic quantization) matches 32-bit Adam (within 1%); state <= 2.1 "
                   "B/param (fp32: 8)", 0.01, 2.1),
      ("adam8bit+stable", "8-bit Adam with f32 embedding state (bitsandbytes' stable embedding) matches 32-bit "
                          "Adam (within 1%)", 0.01, 8.0),
      ("adam4bit", "4-bit Adam (B128/DE first moment, rank-1/linear second moment) within ~1-2% of 32-bit at ~8x "
                   "less state (<= 1.1 B/param)", 0.02, 1.1)):
    if base and name in rows:
      d, b = delta(name), rows[name]["state_bytes_per_param"]
      claims.append(common.Claim(
          claim, f"validation loss {rows[name]['validation']['loss']:.4f} vs {base['validation']['loss']:.4f} "
                 f"({d:+.2%}); state {b:.3f} B/param vs {base['state_bytes_per_param']:.3f}{spread_text}",
          _loss_verdict(d, tolerance, spread, memory_ok=b <= bound)))
  if base and "adam4bit_naive" in rows:
    d = delta("adam4bit_naive")
    skipped = rows["adam4bit_naive"]["skipped_steps"]
    unstable = d > 0.02 or skipped > 0 or not math.isfinite(rows["adam4bit_naive"]["validation"]["loss"])
    claims.append(common.Claim(
        "Naive 4-bit (block-wise, zero in the second-moment map) is unstable: the zero point blows updates up",
        f"validation loss {d:+.2%} vs AdamW; {skipped} non-finite steps skipped",
        "reproduced" if unstable else "not reproduced at our scale"))
  if base and "apollo_mini" in rows:
    d, b = delta("apollo_mini"), rows["apollo_mini"]["state_bytes_per_param"]
    claims.append(common.Claim(
        "APOLLO-Mini: AdamW-level loss (within 2%) at SGD-like memory (rank-1 state)",
        f"validation loss {d:+.2%} vs AdamW; state {b:.3f} B/param (SGD with momentum: 4, AdamW: 8)"
        f"{spread_text}", _loss_verdict(d, 0.02, spread, memory_ok=b < 4)))
  if base and "galore" in rows:
    d, b = delta("galore"), rows["galore"]["state_bytes_per_param"]
    claims.append(common.Claim(
        "GaLore cuts optimizer memory (low-rank projected moments) at a small loss cost",
        f"state {b:.3f} B/param vs AdamW {base['state_bytes_per_param']:.3f}; validation loss {d:+.2%}"
        f"{spread_text}",
        "reproduced" if b < base["state_bytes_per_param"] and d <= 0.05 else
        "partly (memory cut, loss cost > 5%)" if b < base["state_bytes_per_param"] else "not reproduced"))
  if part2 and "adamw" in part2["rows"] and "mezo" in part2["rows"]:
    adamw, mezo = part2["rows"]["adamw"], part2["rows"]["mezo"]
    claims.append(common.Claim(
        "MeZO fine-tunes with inference-level memory (no gradients or optimizer state)",
        f"SmolLM2 step peak {_mib(mezo['step_memory']['peak_bytes'])} MiB vs AdamW "
        f"{_mib(adamw['step_memory']['peak_bytes'])} MiB; loss {part2['validation_before']['loss']:.4f} -> "
        f"{mezo['validation']['loss']:.4f} (AdamW -> {adamw['validation']['loss']:.4f})",
        "reproduced" if mezo["step_memory"]["peak_bytes"] < adamw["step_memory"]["peak_bytes"] else
        "not reproduced"))
  return claims


def _table(rows, base_loss):
  header = ("optimizer", "lr", "validation loss", "delta vs AdamW", "state B/param", "state MiB",
            "step peak MiB", "step ms", "skipped steps")
  body = []
  for name, r in rows.items():
    loss = r["validation"]["loss"]
    d = f"{(loss - base_loss) / base_loss:+.2%}" if base_loss else "n/a"
    body.append((name, f"{r['learning_rate']:g}", f"{loss:.4f}", d, f"{r['state_bytes_per_param']:.3f}",
                 _mib(r["state_bytes"]), _mib(r["step_memory"]["peak_bytes"]), f"{r['step_seconds'] * 1e3:.1f}",
                 r["skipped_steps"]))
  return header, body


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  common.check_finite_config(config)
  workdir = common.prepare_workdir(workdir)
  names, smollm2_names = _names(config, "optimizers"), _names(config, "smollm2_optimizers")
  if not names:
    raise ValueError("--config.optimizers names no optimizer.")
  for field in ("steps", "batch_size", "seq_len", "eval_batches", "embed_dim", "num_layers", "rank"):
    if config[field] < 1:
      raise ValueError(f"--config.{field} must be >= 1, got {config[field]}.")
  started = time.perf_counter()
  # Each run's step is compiled for its memory analysis, then by the trainer: the second is a cache hit.
  with common.compilation_cache(os.path.join(workdir, "compilation_cache")):
    part1 = part_one(config, workdir, names)
    part2 = part_two(config, workdir, smollm2_names) if smollm2_names else None
  plot = _plot(workdir, part1)
  base = part1["rows"].get("adamw")
  tables = {"Part 1: small Llama from scratch (stdlib bytes)": _table(
      part1["rows"], base["validation"]["loss"] if base else None)}
  if part2:
    header, body = _table(part2["rows"], None)
    before = part2["validation_before"]["loss"]
    tables[f"Part 2: SmolLM2-135M fine-tuning, {config.smollm2_steps} steps (loss before: {before:.4f})"] = (
        header[:3] + header[4:], [row[:3] + row[4:] for row in body])
  results = {"part1": part1, "part2": part2, "wall_seconds": time.perf_counter() - started,
             "corpus": data.corpus_info()}
  notes = ("State bytes are measured from the real optimizer-state pytree (every array leaf, nnx variables "
           "unwrapped). 'step peak' is the compiled training step's argument + output + temp - alias bytes "
           "(XLA memory_analysis on this CPU). Step times are CPU XLA timings: the low-bit optimizers run their "
           "jnp reference path here (the fused Pallas kernel targets TPU/GPU), so their step time overhead on "
           "this CPU says nothing about an accelerator.")
  common.write_results(workdir, title="Memory-efficient optimizers (C15)", config=config.to_dict(),
                       results=results, claims=_claims(part1, part2), tables=tables, notes=notes, plots=[plot])
  print(f"wrote {workdir}/results.md ({results['wall_seconds']:.0f} s)", flush=True)
  return results


if __name__ == "__main__":
  common.run_program(run, default_config(), "workdir/optimizers")
