"""C21: activation memory of one training step -- remat presets, Mesa-style int8-saved SiLU, freezing half.

    python -m experiments.activation_memory [--workdir=workdir/activation_memory] [--config.rows=none,block,...]
        [--config.steps=300] [--config.batch_size=2] [--config.seq_len=256]

A 4-layer Llama (d 128, SwiGLU 384, byte vocabulary) at context 256, one row per way of saving activation memory
(`efficient.activations` presets on `LlamaConfig.remat` / `saved_activations`; `TrainConfig.freeze` for the
frozen half). Columns, all from the trainer's own step (`efficient.train.make_train_step`):

  - saved-residual activation bytes: what autodiff keeps from the forward for the backward
    (`efficient.measure.saved_residual_bytes` on the trained parameters, frozen ones being constants) --
    exact and backend-independent (Design, fact 7);
  - compiled temp bytes of the step (XLA `memory_analysis`; on CPU a buffer-assignment figure that remat and
    fusion decisions of XLA:CPU shape, not an accelerator's peak);
  - step time: median of `timing_repeats` alternating steps after one warm-up, all rows side by side in one
    process (same initial weights and batch);
  - loss after `steps` steps on the stdlib .py corpus for the rows whose numbers differ (`loss_rows`): remat
    rows compute the same loss and gradients as 'none' (tests/efficient/test_activations.py asserts it; here
    the timed steps' losses are compared as a check), so they are not trained again.

Writes results.json, results.md (seed claim | measured | verdict) and activation_memory.png.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from efficient import activations, data, measure, train
from efficient.models import llama
from experiments import common

# row -> (LlamaConfig.remat, LlamaConfig.saved_activations, freeze the first half of the blocks)
ROWS = {
    "none": ("none", "float", False),
    "block": ("block", "float", False),
    "dots_saveable": ("dots_saveable", "float", False),
    "names": ("names", "float", False),
    "int8": ("none", "int8", False),
    "frozen_half": ("none", "float", True),
}
LABELS = {"none": "no remat", "block": "per-block remat", "dots_saveable": "remat, dots saveable",
          "names": "remat, named tensors", "int8": "int8-saved SiLU (Mesa)",
          "frozen_half": "embedding + first half frozen"}


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.rows = "none,block,dots_saveable,names,int8,frozen_half"
  config.loss_rows = "none,int8,frozen_half"  # rows trained for `steps` ('': no training)
  config.embed_dim = 128
  config.num_layers = 4
  config.frozen_blocks = 0     # 0: half the layers
  config.seq_len = 256
  config.batch_size = 2
  config.steps = 300
  config.warmup_steps = 30
  config.learning_rate = 3e-3
  config.timing_repeats = 9
  config.eval_batches = 4
  config.seed = 0
  return config


def _rows(config, field: str) -> list[str]:
  if field == "loss_rows" and not str(config[field]).strip():
    return []
  names = common.config_list(config, field)
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    raise ValueError(f"--config.{field}: unknown rows {unknown}; choose from {tuple(ROWS)}.")
  return names


def frozen_blocks(config) -> int:
  return config.frozen_blocks or config.num_layers // 2


def freeze_regex(blocks: int) -> str:
  """The TrainConfig.freeze rule of the embedding and the first `blocks` blocks. The embedding must freeze too:
  a trained embedding needs the backward through every block below it, which would keep their activations."""
  return "embedding|blocks/(" + "|".join(str(i) for i in range(blocks)) + ")/.*"


def row_configs(config, name: str) -> tuple[llama.LlamaConfig, train.TrainConfig]:
  remat, saved, frozen = ROWS[name]
  model_config = common.small_llama(config).replace(remat=remat, saved_activations=saved)
  train_config = train.TrainConfig(
      learning_rate=config.learning_rate, warmup_steps=config.warmup_steps, total_steps=config.steps,
      batch_size=config.batch_size, seq_len=config.seq_len, checkpoint_every=config.steps, keep_checkpoints=1,
      log_every=max(1, min(10, config.steps // 10)), optimizer_seed=config.seed,
      freeze=freeze_regex(frozen_blocks(config)) if frozen else "")
  return model_config, train_config


def measure_row(config, name: str, batch: dict) -> tuple[dict, train.TrainState, object]:
  """Saved-residual bytes and the compiled step's cost of row `name`; its train state and jitted step."""
  model_config, train_config = row_configs(config, name)
  state = train.init_train_state(llama.Llama(model_config, rngs=nnx.Rngs(config.seed)), train_config)
  placed = train.place_batch(batch, state)

  def loss_fn(params):  # the trainer's loss, as a function of the trained parameters only
    return train.batch_loss(nnx.merge(state.graphdef, params, state.rest), placed)[0]

  residuals = measure.saved_residual_bytes(loss_fn, state.params)
  step = train.make_train_step(state)
  started = time.perf_counter()
  compiled = step.lower(state.params, state.opt_state, state.rest, placed, state.step).compile()
  row = {"model": model_config.to_dict(), "freeze": train_config.freeze,
         "trained_parameters": measure.parameter_count(state.params),
         "saved_residuals": residuals, "compiled": measure.compiled_cost(compiled),
         "compile_seconds": time.perf_counter() - started}
  return row, state, step


def silu_residual_bytes(shape) -> dict:
  """Bytes one SiLU over a [B, T, F] tensor saves for its backward: float autodiff vs int8-saved (Mesa)."""
  h = jnp.zeros(shape, jnp.float32)
  out = {}
  for saved in activations.SAVED_ACTIVATIONS:
    fn = activations.activation("silu", saved)
    out[saved] = measure.saved_residual_bytes(lambda v: jnp.sum(fn(v)), h)["activations"]
  out["elements"] = int(np.prod(shape))
  return out


def _history(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, train.METRICS_FILE)) as f:
    return [record for record in map(json.loads, f) if "loss" in record]


def train_row(config, name: str, workdir: str, validation: list) -> dict:
  model_config, train_config = row_configs(config, name)
  model = llama.Llama(model_config, rngs=nnx.Rngs(config.seed))
  dataset = data.stdlib_dataset("train", batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed)
  run_dir = os.path.join(workdir, "runs", name)
  shutil.rmtree(run_dir, ignore_errors=True)
  started = time.perf_counter()
  train.train(model, dataset, train_config, run_dir, progress=False)
  wall = time.perf_counter() - started
  history = _history(run_dir)
  shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints and the log: the history goes into results.json
  tail = [r["loss"] for r in history[-max(1, len(history) // 10):]]
  return {"history": history, "final_train_loss": float(np.mean(tail)),
          "validation": train.evaluate(model, validation), "wall_seconds": wall}


def _plot(workdir, rows, trained) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(rows)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  mib = [rows[n]["saved_residuals"]["activations"] / 2**20 for n in names]
  axes[0].bar(names, mib, color="tab:blue")
  axes[0].set_ylabel("saved-residual activations (MiB)")
  axes[0].set_title("activation memory of one step (exact)")
  axes[1].bar(names, [rows[n]["step_seconds"] * 1e3 for n in names], color="tab:orange")
  axes[1].set_ylabel("step time (ms, median, CPU)")
  axes[1].set_title("step time, side by side")
  for ax in axes[:2]:
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
  for name, run in trained.items():
    axes[2].plot([r["step"] for r in run["history"]], [r["loss"] for r in run["history"]], label=name)
  axes[2].set_xlabel("step")
  axes[2].set_ylabel("train loss (nats / byte)")
  axes[2].set_title("train loss (remat rows: the numbers of 'none')")
  axes[2].grid(alpha=0.3)
  if trained:
    axes[2].legend()
  return common.save_figure(fig, workdir, "activation_memory.png")


def _ratio(rows, name, key_fn) -> float | None:
  if name not in rows or "none" not in rows:
    return None
  return key_fn(rows[name]) / key_fn(rows["none"])


def _activation_bytes(row):
  return row["saved_residuals"]["activations"]


def _step_seconds(row):
  return row["step_seconds"]


def _step_ratio(rows, name) -> float | None:
  """Median over timing rounds of (this row's step / none's step in the same round): each round runs every row
  once, so a load change on the shared CPU between rounds cancels out of the ratio."""
  if name not in rows or "none" not in rows:
    return None
  return float(np.median(np.asarray(rows[name]["step_samples_s"]) / np.asarray(rows["none"]["step_samples_s"])))


def _flops_ratio(rows, name) -> float | None:
  return _ratio(rows, name, lambda row: row["compiled"]["flops"])


def claims(rows, silu, layers: int, frozen: int, trained: dict) -> list[common.Claim]:
  out = []
  ratio = _ratio(rows, "int8", _activation_bytes)
  if ratio is not None:
    saving = 1 - ratio
    per_element = {k: silu[k] / silu["elements"] for k in activations.SAVED_ACTIVATIONS}
    out.append(common.Claim(
        "Mesa: 8-bit-saved activations cut training activation memory by up to 50%",
        f"int8-saved SiLU input: {saving:.1%} fewer saved-residual activation bytes for the whole step "
        f"({_activation_bytes(rows['int8']) / 2**20:.2f} vs {_activation_bytes(rows['none']) / 2**20:.2f} MiB); "
        f"per SiLU {per_element['float']:.2f} -> {per_element['int8']:.2f} B/element "
        f"({per_element['float'] / per_element['int8']:.1f}x). Only the SiLU is 8-bit here; Mesa also stores "
        f"matmul inputs, norms, GELU and softmax in 8 bits" + (
            f". Validation loss after training: {trained['int8']['validation']['loss']:.4f} vs float "
            f"{trained['none']['validation']['loss']:.4f}" if "int8" in trained and "none" in trained else ""),
        "reproduced" if saving >= 0.4 else "partly (only the SiLU's input is 8-bit-saved)" if saving > 0.05
        else "not reproduced"))
  ratio = _ratio(rows, "block", _activation_bytes)
  if ratio is not None:
    less = 1 / ratio
    # the backward recomputes one block at a time: its internals are live on top of the saved block inputs
    peak = _activation_bytes(rows["block"]) + _activation_bytes(rows["none"]) / layers
    with_recompute = _activation_bytes(rows["none"]) / peak
    out.append(common.Claim(
        f"Per-block re-materialization: ~L x (L = {layers}) less activation memory",
        f"stored activations (saved residuals) {less:.1f}x fewer with per-block remat; {with_recompute:.1f}x "
        f"counting one block's internals, live again while the backward recomputes it (an estimate: "
        f"none / L added)",
        "reproduced (stored activations)" if less >= 0.75 * layers else "partly" if less > 1.5 else
        "not reproduced"))
  time_ratio = _step_ratio(rows, "block")
  if time_ratio is not None:
    out.append(common.Claim(
        "Per-block re-materialization costs ~1.3x step time (one extra forward)",
        f"step time {time_ratio:.2f}x of no remat (median of per-round ratios of alternating steps, this CPU); "
        f"compiled step FLOPs {_flops_ratio(rows, 'block'):.2f}x (XLA cost analysis: the recomputation is there)",
        "reproduced" if 1.1 <= time_ratio <= 1.6 else
        "not reproduced (below 1.1x on this CPU)" if time_ratio < 1.1 else
        "not reproduced (slower than 1.6x on this CPU)"))
  ratio = _ratio(rows, "dots_saveable", _activation_bytes)
  if ratio is not None and "block" in rows:
    out.append(common.Claim(
        "Selective remat (save the matmul outputs, recompute elementwise work) sits between none and per-block",
        f"saved residuals {ratio:.2f}x of none (per-block {_ratio(rows, 'block', _activation_bytes):.2f}x); step "
        f"time {_step_ratio(rows, 'dots_saveable'):.2f}x, FLOPs {_flops_ratio(rows, 'dots_saveable'):.2f}x",
        "reproduced" if _ratio(rows, "block", _activation_bytes) < ratio < 1 else "not reproduced"))
  ratio = _ratio(rows, "frozen_half", _activation_bytes)
  if ratio is not None:
    out.append(common.Claim(
        f"Freezing the embedding and the first {frozen} of {layers} blocks: no backward through them, so none "
        f"of their activations are saved (~{frozen / layers:.0%} less) and the step is cheaper",
        f"saved residuals {ratio:.2f}x of none; step time {_step_ratio(rows, 'frozen_half'):.2f}x, FLOPs "
        f"{_flops_ratio(rows, 'frozen_half'):.2f}x",
        "reproduced" if ratio <= 1 - 0.75 * frozen / layers and _step_ratio(rows, "frozen_half") < 1
        else "partly" if ratio < 1 else "not reproduced"))
  return out


def _table(rows, trained, none_loss_check):
  header = ("row", "remat", "saved", "trained params", "activation MiB", "x none", "compiled temp MiB",
            "step GFLOP", "step ms", "x none", "train loss (last 10%)", "validation loss")
  body = []
  for name, r in rows.items():
    remat, saved, _ = ROWS[name]
    if name in trained:
      loss, validation = f"{trained[name]['final_train_loss']:.4f}", f"{trained[name]['validation']['loss']:.4f}"
    elif ROWS[name][1:] == ROWS["none"][1:] and "none" in trained:
      loss = validation = f"= none (timed-step loss delta {none_loss_check.get(name, float('nan')):.1e})"
    else:
      loss = validation = "not trained"
    body.append((f"{name} ({LABELS[name]})", remat, saved + (f", freeze {r['freeze']}" if r["freeze"] else ""),
                 r["trained_parameters"], f"{_activation_bytes(r) / 2**20:.2f}",
                 f"{_ratio(rows, name, _activation_bytes) or float('nan'):.2f}",
                 f"{r['compiled']['temp_bytes'] / 2**20:.1f}", f"{r['compiled']['flops'] / 1e9:.2f}",
                 f"{r['step_seconds'] * 1e3:.0f}", f"{_step_ratio(rows, name) or float('nan'):.2f}", loss, validation))
  return header, body


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  common.check_finite_config(config)
  workdir = common.prepare_workdir(workdir)
  names, loss_names = _rows(config, "rows"), _rows(config, "loss_rows")
  missing = [n for n in loss_names if n not in names]
  if missing:
    raise ValueError(f"--config.loss_rows: {missing} are not in --config.rows={config.rows!r}.")
  for field in ("steps", "batch_size", "seq_len", "eval_batches", "embed_dim", "num_layers", "timing_repeats"):
    if config[field] < 1:
      raise ValueError(f"--config.{field} must be >= 1, got {config[field]}.")
  if not 0 <= config.frozen_blocks < config.num_layers or frozen_blocks(config) < 1:
    raise ValueError(f"--config.frozen_blocks={config.frozen_blocks} must leave a block to train and freeze at "
                     f"least one of num_layers={config.num_layers} (0: half).")
  started = time.perf_counter()
  batch = data.stdlib_dataset("train", batch_size=config.batch_size, seq_len=config.seq_len,
                              seed=config.seed).batch(0)
  rows, states = {}, {}
  for name in names:
    print(f"[measure] {name}", flush=True)
    rows[name], state, step = measure_row(config, name, batch)
    states[name] = (state, step)
    print(f"  saved activations {_activation_bytes(rows[name]) / 2**20:.2f} MiB, compiled temp "
          f"{rows[name]['compiled']['temp_bytes'] / 2**20:.1f} MiB", flush=True)

  last = {}

  def timed(name):
    state, step = states[name]

    def one_step():
      last[name] = train.apply_train_step(state, step, batch)
      return last[name]
    return one_step

  timing = common.time_side_by_side({name: timed(name) for name in names}, repeats=config.timing_repeats)
  for name in names:
    rows[name]["step_seconds"] = timing[name]["median_s"]
    rows[name]["step_samples_s"] = timing[name]["samples_s"]
    rows[name]["timed_loss"] = float(last[name]["loss"])  # after the same steps from the same start
  del states
  # remat rows compute what 'none' computes: their losses after the identical timed steps must agree
  none_loss_check = {name: abs(rows[name]["timed_loss"] - rows["none"]["timed_loss"]) for name in names
                     if "none" in rows and ROWS[name][1:] == ROWS["none"][1:]}
  shape = (config.batch_size, config.seq_len, common.small_llama(config).mlp_dim)
  silu = silu_residual_bytes(shape)
  held_out = data.stdlib_dataset("validation", batch_size=config.batch_size, seq_len=config.seq_len)
  validation = [held_out.batch(s) for s in range(config.eval_batches)]
  trained = {}
  for name in loss_names:
    print(f"[train] {name}: {config.steps} steps", flush=True)
    trained[name] = train_row(config, name, workdir, validation)
    print(f"  train loss {trained[name]['final_train_loss']:.4f}, validation "
          f"{trained[name]['validation']['loss']:.4f} ({trained[name]['wall_seconds']:.0f} s)", flush=True)
  shutil.rmtree(os.path.join(workdir, "runs"), ignore_errors=True)
  plot = _plot(workdir, rows, trained)
  layers = config.num_layers
  results = {"model": common.small_llama(config).to_dict(), "rows": rows, "trained": trained, "silu_residuals": silu,
             "remat_loss_check": none_loss_check, "frozen_blocks": frozen_blocks(config),
             "wall_seconds": time.perf_counter() - started, "corpus": data.corpus_info()}
  notes = ("Activation bytes are the saved residuals of the trainer's loss (jax.ad_checkpoint.saved_residuals, "
           "parameters excluded: they are resident anyway); they do not include the transient peak of the "
           "backward (under per-block remat one block's internals are live again while it is recomputed). "
           "'compiled temp' is XLA:CPU's buffer assignment of the whole step (optimizer update included): on CPU "
           "it reflects XLA:CPU's scheduling and may drop or reorder recomputation (Design, fact 7), so it is no "
           "accelerator peak. Step times are medians of alternating steps on a shared CPU (batch "
           f"{config.batch_size} x {config.seq_len}): ratios (each the median of per-round ratios), not absolute "
           "speeds; XLA's FLOP count of the compiled step shows the recomputation independently of timing noise. "
           "The frozen row trains from scratch with a random frozen embedding and half the blocks, so its loss is "
           "no measure of freezing's quality cost (that is for fine-tuning a trained model, "
           f"experiments/finetune.py). At {config.steps} steps of "
           f"{config.batch_size * config.seq_len} tokens this run cannot show whether int8-saved gradients "
           "change final quality at scale (Mesa trains ImageNet-scale ViTs), nor the memory of a real "
           "accelerator run.")
  common.write_results(workdir, title="Activation memory: remat, int8-saved activations, freezing (C21)",
                       config=config.to_dict(), results=results,
                       claims=claims(rows, silu, layers, frozen_blocks(config), trained),
                       tables={"Rows": _table(rows, trained, none_loss_check)}, notes=notes, plots=[plot])
  print(f"wrote {workdir}/results.md ({results['wall_seconds']:.0f} s)", flush=True)
  return results


if __name__ == "__main__":
  common.run_program(run, default_config(), "workdir/activation_memory")
