"""C26: μP vs the standard parametrization -- does the best learning rate stay put as a Llama gets wider?

    python -m experiments.mup [--workdir=experiments/results/mup] [--config.widths=64,128,256,512]
        [--config.log2_learning_rates=-13,-12,-11,-10,-9,-8,-7] [--config.steps=200] [--config.seeds=0]

A 2-layer Llama on the stdlib corpus (bytes; 4 heads, head_dim = width / 4, MLP 3x wide, tied embeddings) at
every width x learning rate x seed, under SP (this library's default: every matrix N(0, 0.02**2), one Adam LR,
1/sqrt(head_dim) attention) and under μP relative to `base_width` (Tensor Programs V, Table 8, for Adam: hidden
init std / sqrt(m) and Adam LR / m, readout logits x 1/m, 1/d attention; `efficient.models.parametrization`,
`efficient.optim.mup`), trained by `efficient.scaling.sweep` with AdamW (warmup + cosine, global-norm clipping:
`efficient.train.make_optimizer` chained with `mup.scale_learning_rates`). SP and μP draw their parameters from
the same random draws and see the same batches, so at the base width they are the same run. The final loss is the
validation loss after the last step. Writes results.json, results.md (claims | measured | verdict) and
loss_vs_lr.png (two panels, SP / μP, one curve per width).

Claims (TP5 Fig. 1 / the seed digest's C26): under SP the best LR drifts by >= 2 grid steps across 8x width;
under μP it stays within +-1 grid step of the base width's; under μP wider is better at every fixed LR. Each is
judged by the grid argmin and, because one run is noisy, by near-optimal bands: `noise_seeds` more seeds of SP at
the base width give one run's noise (seed-to-seed std), and grid LRs within 2 std of a difference of two runs of
the best are indistinguishable from it; a verdict that rests on a difference inside the noise says so.
`--config.records_from=<results.json>` reuses the runs of an earlier results.json of the same settings (e.g. to
add seeds or re-judge without retraining).

Default run: 4 widths x 7 LRs x 1 seed x 2 parametrizations + 14 noise runs = 70 runs of 200 steps (batch 4 x
32 bytes); 612 s (10 min) measured on this machine's 2 CPU cores, idle (each distinct model compiles once: the
learning rate is a traced argument). Measured (experiments/results/mup): seed noise 0.037 nats; SP's best LR
moves from 2^-7 (w64, whose curve is flat within noise from 2^-10 to 2^-7) to 2^-11 (w512), and its low-LR edge
shifts left by ~2 steps -- but the near-optimal bands of w64 and w512 overlap, so the >= 2-step drift is not
resolvable at this scale; under μP the four curves coincide within 0.08 nats at every LR (bands identical,
2^-10..2^-7): the LR transfers, and -- after 25.6k training tokens, where training is optimization-limited --
wider μP models are no better than the base (SP at w512 even reaches 2.68 nats vs μP's 2.99).
"""
from __future__ import annotations

import functools
import json
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from efficient import data, scaling, train
from efficient.models import llama, parametrization
from efficient.optim import mup
from experiments import common

HEADS = 4  # fixed, so head_dim = width / HEADS grows with width and μP's 1/d attention matters


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.widths = "64,128,256,512"
  config.base_width = 64                      # μP's base: there μP == SP
  config.log2_learning_rates = "-13,-12,-11,-10,-9,-8,-7"   # the grid: 2**e, one grid step = a factor of 2
  config.seeds = "0"
  config.parametrizations = "sp,mup"
  config.steps = 200
  config.warmup_steps = 20
  config.batch_size = 4                       # x seq_len = 128 tokens a step: the 15-minute budget on 2 cores
  config.seq_len = 32
  config.num_layers = 2
  config.init_std = 0.02                      # SP's std of every matrix; μP's at the base width
  config.weight_decay = 0.0
  config.b1 = 0.9
  config.b2 = 0.95
  config.grad_clip_norm = 1.0
  config.eval_batches = 16
  config.noise_seeds = 2      # extra seeds at the base width (SP; μP is the same there): one run's noise
  config.records_from = ""    # a previous results.json of the same config: its runs are reused, not retrained
  return config


def model_config(config, width: int) -> llama.LlamaConfig:
  """The 2-layer byte-level Llama of `width` (`common.small_llama`'s family: 4 heads, MLP 3x wide)."""
  if width % (2 * HEADS):
    raise ValueError(f"--config.widths / base_width: {width} must be a multiple of {2 * HEADS} ({HEADS} heads of "
                     f"an even head_dim, for RoPE).")
  sized = ml_collections.ConfigDict({"embed_dim": width, "num_layers": config.num_layers, "seq_len": config.seq_len})
  return common.small_llama(sized).replace(init_std=config.init_std)


def _train_config(config) -> train.TrainConfig:
  """AdamW at peak learning rate 1: the sweep multiplies its updates by the traced learning rate (one compile per
  model for the whole LR grid; lr * AdamW(schedule) is AdamW(lr * schedule), decay included)."""
  return train.TrainConfig(learning_rate=1.0, warmup_steps=config.warmup_steps, total_steps=config.steps,
                           weight_decay=config.weight_decay, b1=config.b1, b2=config.b2,
                           grad_clip_norm=config.grad_clip_norm, batch_size=config.batch_size,
                           seq_len=config.seq_len)


def _stacked(source, steps: int) -> dict:
  batches = [source.batch(s) for s in range(steps)]
  return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def make_runner(graphdef, mu_plan, train_config: train.TrainConfig):
  """jit(params, rest, batches, validation, learning_rate) -> (train losses [steps], final validation loss)."""
  tx = optax.chain(train.make_optimizer(train_config), mup.scale_learning_rates(mu_plan))

  def loss_of(params, rest, batch):
    return train.batch_loss(nnx.merge(graphdef, params, rest), batch)

  @jax.jit
  def run(params, rest, batches, validation, learning_rate):
    def step(carry, batch):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(lambda p: loss_of(p, rest, batch)[0])(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      updates = jax.tree.map(lambda u: learning_rate * u, updates)
      return (optax.apply_updates(params, updates), opt_state), loss

    def loss_sum(batch):  # token-weighted over the held-out batches, as train.evaluate
      loss, tokens = loss_of(params, rest, batch)
      return loss * tokens, tokens

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), batches)
    sums, tokens = jax.lax.map(loss_sum, validation)
    return losses, sums.sum() / jnp.maximum(tokens.sum(), 1.0)

  return run


def sweep_parametrization(config, name: str, widths, learning_rates, seeds, validation, batches_of, bar,
                          previous: dict, runners: dict) -> list:
  """`scaling.sweep` of one parametrization: records with 'loss' (validation) and 'train_loss' (last 10 steps);
  a point in `previous` ({(parametrization, width, lr, seed): record}) is taken from there. `runners` caches
  the compiled training runs across calls."""
  base = model_config(config, config.base_width)
  train_config = _train_config(config)
  initial = {}

  def run(width, learning_rate, seed):
    if (name, width, learning_rate, seed) in previous:
      return {k: v for k, v in previous[(name, width, learning_rate, seed)].items()
              if k not in ("width", "learning_rate", "seed")}
    if (width, seed) not in initial:  # one model per width and seed, trained from the same state at every LR
      model, mu_plan = parametrization.build(model_config(config, width), base, name, seed=seed)
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      # One compile per distinct model and multipliers (SP and μP coincide at the base width); the graphdef
      # and plan of a width do not depend on the seed.
      key = (graphdef, tuple(sorted(mup.learning_rate_multipliers(mu_plan).items())))
      if key not in runners:
        runners[key] = make_runner(graphdef, mu_plan, train_config)
      initial[(width, seed)] = runners[key], params, rest
    runner, params, rest = initial[(width, seed)]
    losses, loss = runner(params, rest, batches_of(seed), validation, jnp.float32(learning_rate))
    losses = np.asarray(losses)
    return {"loss": float(loss), "train_loss": float(np.mean(losses[-10:])), "parametrization": name,
            "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))}

  def progress(record):
    bar.update(1)
    bar.set_postfix_str(f"{name} w={record['width']} lr=2^{math.log2(record['learning_rate']):g} "
                        f"loss={record['loss']:.3f}")

  return scaling.sweep(run, widths=widths, learning_rates=learning_rates, seeds=seeds, progress=progress)


def _grid_of(config):
  widths = common.config_list(config, "widths", int)
  exponents = common.config_list(config, "log2_learning_rates", float)
  seeds = common.config_list(config, "seeds", int)
  names = common.config_list(config, "parametrizations")
  bad = [n for n in names if n not in parametrization.PARAMETRIZATIONS]
  if bad:
    raise ValueError(f"--config.parametrizations: unknown {bad}; choose from {parametrization.PARAMETRIZATIONS}.")
  for w in widths + [config.base_width]:
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
      raise ValueError(f"--config.widths / base_width: {w!r} must be a positive integer.")
    model_config(config, w)
  if config.noise_seeds < 0:
    raise ValueError(f"--config.noise_seeds must be >= 0, got {config.noise_seeds}.")
  if len(set(exponents)) != len(exponents) or len(set(widths)) != len(widths):
    raise ValueError("--config.widths and --config.log2_learning_rates must not repeat a value.")
  for field in ("steps", "batch_size", "seq_len", "num_layers", "eval_batches"):
    if config[field] < 1:
      raise ValueError(f"--config.{field} must be >= 1, got {config[field]}.")
  return sorted(widths), [2.0 ** e for e in sorted(exponents)], seeds, names


def _monotone_widths(means, widths, learning_rates) -> list[bool]:
  """Per learning rate: is the loss strictly lower at every wider width (diverged = +inf)?"""
  return [all(means[(b, lr)] < means[(a, lr)] for a, b in zip(widths, widths[1:])) for lr in learning_rates]


def analyse(records, widths, learning_rates, tolerance: float) -> dict:
  """Per parametrization: best LR per width, the near-optimal band (within `tolerance`: the LRs this sweep's
  noise cannot tell from the best), the best-LR log-log slope, a power law of best loss in width, and per LR
  whether loss falls with width and how far apart the widths' losses are."""
  out = {}
  for name in sorted({r["parametrization"] for r in records}):
    rows = [r for r in records if r["parametrization"] == name]
    best = scaling.best_learning_rates(rows)
    means = scaling.mean_loss(rows)
    found = {w: b for w, b in best.items() if b["index"] is not None}
    slope = None
    if len(found) >= 2:
      slope = scaling.fit_log_log(list(found), [b["learning_rate"] for b in found.values()])[1]
    law = None
    if len(found) >= 3:
      fit = scaling.fit_power_law(list(found), [b["loss"] for b in found.values()])
      law = {"a": fit.a, "b": fit.b, "c": fit.c, "r2": fit.r2}
    spread = [max(means[(w, lr)] for w in widths) - min(means[(w, lr)] for w in widths) for lr in learning_rates]
    out[name] = {"best": best, "near_optimal": scaling.near_optimal(rows, tolerance),
                 "best_lr_slope_vs_width": slope, "loss_vs_width_power_law": law,
                 "monotone_in_width": _monotone_widths(means, widths, learning_rates),
                 "width_spread_by_lr": spread}
  return out


def _exp(lr) -> str:
  return "diverged" if lr is None else f"2^{math.log2(lr):g}"


def _band(a, w, learning_rates) -> str:
  band = a["near_optimal"][w]
  return "diverged" if not band else ",".join(f"{math.log2(learning_rates[i]):g}" for i in band)


def _gap(first: list[int], second: list[int]) -> int | None:
  """Grid steps between two near-optimal bands (0 when they overlap)."""
  return None if not first or not second else min(abs(i - j) for i in first for j in second)


def claims_of(analysis, widths, learning_rates, base_width, tolerance: float) -> list[common.Claim]:
  """The three claims, by the argmin of the grid and, where noise could decide it, by near-optimal bands
  (LRs within `tolerance` of the best): a verdict that rests on a difference inside the noise says so."""
  claims = []
  span = f"{widths[-1] // widths[0]}x width ({widths[0]} -> {widths[-1]})"
  within = f"within {tolerance:.3f} nats of the best"
  sp, mu = analysis.get("sp"), analysis.get("mup")
  bands = lambda a: "; near-optimal log2 LRs (" + within + ") " + ", ".join(
      f"w{w}: {_band(a, w, learning_rates)}" for w in widths)
  if sp:
    lo, hi = sp["best"][widths[0]]["index"], sp["best"][widths[-1]]["index"]
    drift = None if lo is None or hi is None else hi - lo
    gap = _gap(sp["near_optimal"][widths[0]], sp["near_optimal"][widths[-1]])
    slope = sp["best_lr_slope_vs_width"]
    verdict = ("not measurable (diverged)" if drift is None else "reproduced" if gap >= 2 else
               "not resolvable at our scale (the drift is inside the noise)" if abs(drift) >= 2 else "not reproduced")
    claims.append(common.Claim(
        f"Under SP the best LR drifts by >= 2 grid steps across {span}",
        "best LR " + ", ".join(f"w{w}: {_exp(sp['best'][w]['learning_rate'])}" for w in widths)
        + (f"; drift {drift:+d} steps" if drift is not None else "")
        + (f"; log-log slope {slope:+.2f}" if slope is not None else "") + bands(sp)
        + (f"; the bands of w{widths[0]} and w{widths[-1]} lie {gap} steps apart" if gap is not None else ""),
        verdict))
  if mu:
    base = min(widths, key=lambda w: abs(w - base_width))
    ref = mu["best"][base]["index"]
    indices = [mu["best"][w]["index"] for w in widths]
    ok = ref is not None and all(i is not None and abs(i - ref) <= 1 for i in indices)
    near = all(g is not None and g <= 1 for g in (_gap(mu["near_optimal"][base], mu["near_optimal"][w])
                                                  for w in widths))
    slope = mu["best_lr_slope_vs_width"]
    claims.append(common.Claim(
        f"Under μP the best LR stays within +-1 grid step across {span}",
        "best LR " + ", ".join(f"w{w}: {_exp(mu['best'][w]['learning_rate'])}" for w in widths)
        + (f"; log-log slope {slope:+.2f}" if slope is not None else "") + bands(mu),
        "reproduced" if ok else "reproduced within noise (every width's band is within 1 step of the base's)"
        if near else "not reproduced"))
    mono, spread = mu["monotone_in_width"], mu["width_spread_by_lr"]
    equal = sum(x <= tolerance for x in spread)
    sp_text = (f"; SP: falls at {sum(sp['monotone_in_width'])}/{len(mono)}, widths up to "
               f"{max(sp['width_spread_by_lr']):.3f} nats apart" if sp else "")
    claims.append(common.Claim(
        "Under μP wider is better at every fixed LR",
        f"loss falls with width at {sum(mono)}/{len(mono)} grid LRs; the widths' losses lie within {tolerance:.3f} "
        f"nats of each other at {equal}/{len(mono)} LRs (at most {max(spread):.3f} apart){sp_text}",
        "reproduced" if all(mono) else
        "not reproduced at our scale (μP's widths train alike: equal within noise)" if equal else "not reproduced"))
  return claims


def _plot(workdir, records, widths, learning_rates, names) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), sharey=True, squeeze=False)
  finite = [r["loss"] for r in records if math.isfinite(r["loss"])]
  top = min(max(finite), np.log(256) + 0.5) if finite else np.log(256)
  for ax, name in zip(axes[0], names):
    means = scaling.mean_loss([r for r in records if r["parametrization"] == name])
    best = scaling.best_learning_rates([r for r in records if r["parametrization"] == name])
    for i, w in enumerate(widths):
      ys = [min(means[(w, lr)], top) for lr in learning_rates]  # a diverged point sits on the chart's top
      ax.plot(np.log2(learning_rates), ys, "o-", color=f"C{i}", label=f"width {w}")
      if best[w]["learning_rate"] is not None:
        ax.plot(np.log2(best[w]["learning_rate"]), best[w]["loss"], "*", color=f"C{i}", markersize=14)
    ax.set_title({"sp": "standard parametrization", "mup": "μP"}.get(name, name))
    ax.set_xlabel("log2 learning rate")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("validation loss (nats / byte)")
  axes[0][0].legend()
  return common.save_figure(fig, workdir, "loss_vs_lr.png")


def _tables(records, analysis, widths, learning_rates):
  tables = {}
  header = ("width",) + tuple(_exp(lr) for lr in learning_rates) + ("best LR",)
  for name, a in analysis.items():
    means = scaling.mean_loss([r for r in records if r["parametrization"] == name])
    rows = [(w,) + tuple(f"{means[(w, lr)]:.4f}" for lr in learning_rates) + (_exp(a["best"][w]["learning_rate"]),)
            for w in widths]
    tables[f"{name}: final validation loss by learning rate"] = (header, rows)
  return tables


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  common.check_finite_config(config)
  workdir = common.prepare_workdir(workdir)
  widths, learning_rates, seeds, names = _grid_of(config)
  started = time.perf_counter()
  held_out = data.stdlib_dataset("validation", batch_size=config.batch_size, seq_len=config.seq_len)
  validation = _stacked(held_out, config.eval_batches)

  @functools.lru_cache(maxsize=None)
  def batches_of(seed):  # the same batches for every width, LR and parametrization of a seed
    return _stacked(data.stdlib_dataset("train", batch_size=config.batch_size, seq_len=config.seq_len, seed=seed),
                    config.steps)

  previous = _previous_records(config)
  noise_seeds = [max(seeds) + k for k in range(1, config.noise_seeds + 1)]
  total = len(names) * len(widths) * len(learning_rates) * len(seeds) + len(learning_rates) * len(noise_seeds)
  records, runners = [], {}
  with common.progress(total=total, desc="mup sweep", unit="run") as bar:
    for name in names:
      records += sweep_parametrization(config, name, widths, learning_rates, seeds, validation, batches_of, bar,
                                       previous, runners)
    # SP at the base width over more seeds: how far two runs that differ only by their seed land apart
    noise_records = sweep_parametrization(config, "sp", [config.base_width], learning_rates, noise_seeds,
                                          validation, batches_of, bar, previous, runners) if noise_seeds else []
  base_runs = [r for r in records if r["parametrization"] == "sp" and r["width"] == config.base_width]
  noise = scaling.seed_noise(base_runs + noise_records)
  # two runs' losses differ by noise * sqrt(2) (std): "indistinguishable" is within two of those
  tolerance = 2 * math.sqrt(2) * noise if noise is not None else 0.0
  analysis = analyse(records, widths, learning_rates, tolerance)
  claims = claims_of(analysis, widths, learning_rates, config.base_width, tolerance)
  plot = _plot(workdir, records, widths, learning_rates, names)
  wall = time.perf_counter() - started
  results = {"records": records, "noise_records": noise_records, "seed_noise": noise, "tolerance": tolerance,
             "analysis": analysis, "wall_seconds": wall, "corpus": data.corpus_info(),
             "models": {w: model_config(config, w).to_dict() for w in widths}}
  reused = sum(1 for r in records + noise_records if (r["parametrization"], r["width"], r["learning_rate"],
                                                      r["seed"]) in previous)
  notes = (f"{len(records) + len(noise_records)} runs ({reused} reused from {config.records_from}), "
           if reused else f"{len(records) + len(noise_records)} runs, ")
  notes += (f"{wall:.0f} s wall. Loss: next-byte cross-entropy on {config.eval_batches} held-out batches after "
            f"{config.steps} steps (diverged: NaN, plotted at the top). μP base width {config.base_width}; one "
            f"grid step = a factor of 2 in LR. Seed noise: the median seed-to-seed std of SP at the base width over "
            f"{1 + len(noise_seeds)} seeds = {noise if noise is not None else float('nan'):.4f} nats; a loss "
            f"within {tolerance:.3f} (2 std of a difference of two runs) of the best is near-optimal. Best-LR "
            f"log-log slope: the exponent k of best LR ~ width^k (SP theory for Adam's hidden weights: -1; μP: 0).")
  common.write_results(workdir, title="μP vs standard parametrization: learning-rate transfer across width (C26)",
                       config=config.to_dict(), results=results, claims=claims,
                       tables=_tables(records, analysis, widths, learning_rates), notes=notes, plots=[plot])
  print(f"wrote {workdir}/results.md ({wall:.0f} s)", flush=True)
  return results


def _previous_records(config) -> dict:
  """{(parametrization, width, lr, seed): record} of `--config.records_from` (a results.json written under the
  same training settings; ValueError naming the flag otherwise), or {}."""
  if not config.records_from:
    return {}
  try:
    with open(config.records_from) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"--config.records_from={config.records_from!r}: cannot read a results.json: {e}") from e
  fields = ("steps", "warmup_steps", "batch_size", "seq_len", "num_layers", "init_std", "weight_decay", "b1", "b2",
            "grad_clip_norm", "eval_batches", "base_width")
  differ = [f for f in fields if saved.get("config", {}).get(f) != config[f]]
  if differ:
    raise ValueError(f"--config.records_from={config.records_from!r} was run with other {differ}; its runs "
                     f"cannot be reused.")
  rows = saved["results"]["records"] + saved["results"].get("noise_records", [])
  return {(r["parametrization"], r["width"], r["learning_rate"], r["seed"]): r for r in rows}


if __name__ == "__main__":
  common.run_program(run, default_config(), "workdir/mup")
