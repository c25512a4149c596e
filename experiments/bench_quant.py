"""Quantization benchmark, side by side in one run: stored bytes per parameter of every format at SmolLM2's
shapes; CPU time of our W8A8 linear vs an f32 linear vs qwix's W8A8; modeled HBM traffic of `quant_matmul` at
decode shapes.

    python -m experiments.bench_quant [--workdir=workdir/bench_quant] [--config.shapes=2048x2048x2048 ...]

(a) bytes/param: `efficient.quant.nbytes(q) / q.size` of the QArray each format stores for a random [K, N]
    weight (codes + scales + zero points + second-level scales). A group size that does not divide K is reported
    as not applicable (SmolLM2's K = 576 does not divide by 128: g128 is measured at K = 1536, the `down` input).
(b) CPU time of x [M, K] @ W [K, N]: f32 `jnp.matmul`; ours: `pallas_kernels.int8_matmul.dynamic_int8_matmul`,
    what `efficient.quant.QuantizedEinsum(mode='w8a8')` calls (per-token int8 activations quantized inside the
    timed call, per-channel int8 weights quantized beforehand, int32 accumulation -- the default implementation
    on CPU, 'reference'); the same int8 GEMM on activations quantized beforehand; qwix: `qwix.quantize_model` of an `nnx.Linear` with
    a `PtqProvider` rule weight_qtype = act_qtype = int8 (weights quantized beforehand, activations per token
    inside the call). Alternating runs, medians (`common.time_side_by_side`); each compiled HLO's dot is recorded.
(c) `quant_matmul.cost` (the TPU kernel's modeled HBM traffic) at decode shapes against its ideal bytes (packed
    weight + scales + activations + output once) and against `matmul.cost` of a bf16 weight: the decode speedup
    those bytes predict on a memory-bound accelerator. Modeled, not measured.
"""
from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from efficient import quant
from experiments import common
from pallas_kernels.int8_matmul import dynamic_int8_matmul, int8_matmul, quantize_activations
from pallas_kernels.matmul import cost as dense_cost
from pallas_kernels.quant_matmul import BITS as QUANT_BITS, cost as quant_matmul_cost
from pallas_kernels.quant_matmul import tpu as quant_matmul_tpu

# SmolLM2-135M's projection matrices [K, N] and how many of each the 30 blocks hold.
SMOLLM2_MATRICES = {"q, o (576x576)": ((576, 576), 60), "k, v (576x192)": ((576, 192), 60),
                    "gate, up (576x1536)": ((576, 1536), 60), "down (1536x576)": ((1536, 576), 30)}
# name -> quantize kwargs.
FORMATS = {
    "int8 per-channel": dict(fmt="int8"),
    "int4 g64": dict(fmt="int4", group_size=64),
    "int4 g128": dict(fmt="int4", group_size=128),
    "nf4 + double quant (block 64)": dict(fmt="nf4", group_size=64, double_quant=True),
    "int3 g64": dict(fmt="int3", group_size=64),
    "int3 g128": dict(fmt="int3", group_size=128),
    "int2 g64": dict(fmt="int2", group_size=64),
    "fp8 e4m3 per-channel": dict(fmt="fp8_e4m3"),
    "mxfp8": dict(fmt="mxfp8"),
    "mxfp4": dict(fmt="mxfp4"),
}
GEMM_ONLY = "ours int8 GEMM only (x pre-quantized)"
TARGETS = {"int8 per-channel": 1.02, "int4 g128": 0.52}
# quant_matmul formats for the decode traffic model: name -> (fmt, group size or None (per channel), double quant).
DECODE_FORMATS = {"int8 per-channel": ("int8", None, False), "int4 g64": ("int4", 64, False),
                  "int4 g128": ("int4", 128, False), "nf4 + DQ (block 64)": ("nf4", 64, True)}


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.shapes = "2048x2048x2048,512x576x1536,512x1536x576"   # MxKxN of the timed linears
  config.repeats = 9
  config.qwix = True
  config.decode_m = "1,8,16"
  config.decode_kn = "576x1536,1536x576"
  config.traffic_target = 1.15
  config.seed = 0
  return config


def _shapes(text: str, name: str, rank: int) -> list[tuple[int, ...]]:
  try:
    shapes = [tuple(int(d) for d in s.split("x")) for s in text.split(",") if s.strip()]
  except ValueError as e:
    raise ValueError(f"--config.{name}={text!r} must be comma-separated {'x'.join('ABC'[:rank])} sizes.") from e
  if not shapes or any(len(s) != rank or min(s) <= 0 for s in shapes):
    raise ValueError(f"--config.{name}={text!r} must be comma-separated {'x'.join('ABC'[:rank])} positive sizes.")
  return shapes


# --- (a) bytes per parameter -----------------------------------------------------------------------------------

def storage(seed: int = 0) -> dict:
  """{format: {matrix: bytes/param or the reason it does not apply}, '<whole model>': parameter-weighted}."""
  rng = np.random.default_rng(seed)
  weights = {name: jnp.asarray(rng.standard_normal(shape), jnp.float32)
             for name, (shape, _) in SMOLLM2_MATRICES.items()}
  out = {}
  for fmt_name, kwargs in FORMATS.items():
    row, total_bytes, total_params, complete = {}, 0, 0, True
    for name, (shape, count) in SMOLLM2_MATRICES.items():
      try:
        q = quant.quantize(weights[name], **kwargs)
      except ValueError as e:
        row[name] = f"n/a: {e}"
        complete = False
        continue
      row[name] = quant.bytes_per_param(q)
      total_bytes += count * quant.nbytes(q)
      total_params += count * q.size
    row["all 210 projections"] = total_bytes / total_params if complete else "n/a (some K not divisible)"
    out[fmt_name] = row
  return out


# --- (b) CPU time ----------------------------------------------------------------------------------------------

def qwix_w8a8_linear(w, x):
  """qwix's W8A8 `nnx.Linear` with kernel `w`: (jitted forward(state, x), state)."""
  import qwix
  from flax import nnx
  linear = nnx.Linear(w.shape[0], w.shape[1], use_bias=False, rngs=nnx.Rngs(0))
  linear.kernel[...] = w
  rules = [qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)]
  quantized = qwix.quantize_model(linear, qwix.PtqProvider(rules), x)
  graphdef, state = nnx.split(quantized)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  return forward, state


def dot_instructions(compiled_text: str) -> list[str]:
  """The compiled HLO's dot instructions and the fusions that hold them (metadata stripped)."""
  lines = []
  for line in compiled_text.splitlines():
    if " dot(" in line or "__ynn_fusion" in line or "onednn" in line.lower() or "custom-call(" in line:
      lines.append(_without_attributes(line)[:200])
  return lines


def _without_attributes(line: str) -> str:
  return re.sub(r",? (metadata|backend_config|frontend_attributes)=\{.*?\}(?=,|$)", "", line.strip())


def cpu_features() -> list[str]:
  """The vector/int8 ISA extensions this CPU reports (what bounds an int8 GEMM's speed-up over f32)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return []
  return sorted(f for f in flags if f.startswith(("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx", "avxvnni")))


def time_linear(m: int, k: int, n: int, *, repeats: int, use_qwix: bool, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
  qw = quant.quantize(w, "int8")  # per output channel, f32 scales [1, N]
  f32 = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32))
  ours = jax.jit(lambda x, w_q, w_scale: dynamic_int8_matmul(x, w_q, w_scale))
  # The int8 GEMM alone (x quantized beforehand) separates the GEMM from the dynamic quantization's passes.
  x_q, x_scale = quantize_activations(x)
  gemm_only = jax.jit(lambda x_q, x_scale, w_q, w_scale: int8_matmul(x_q, x_scale, w_q, w_scale))
  functions = {"f32": lambda: f32(x, w), "ours W8A8": lambda: ours(x, qw.qvalue, qw.scale),
               GEMM_ONLY: lambda: gemm_only(x_q, x_scale, qw.qvalue, qw.scale)}
  compiled = {"f32": f32.lower(x, w).compile(), "ours W8A8": ours.lower(x, qw.qvalue, qw.scale).compile()}
  outputs = {"f32": f32(x, w), "ours W8A8": ours(x, qw.qvalue, qw.scale)}
  qwix_error = None
  if use_qwix:
    try:
      forward, state = qwix_w8a8_linear(w, x)
      functions["qwix W8A8"] = lambda: forward(state, x)
      compiled["qwix W8A8"] = forward.lower(state, x).compile()
      outputs["qwix W8A8"] = forward(state, x)
    except Exception as e:  # reported in results.md: why qwix could not run here
      qwix_error = f"{type(e).__name__}: {e}"
  timings = common.time_side_by_side(functions, repeats=repeats)
  reference = outputs["f32"]
  errors = {name: float(jnp.linalg.norm(y - reference) / jnp.linalg.norm(reference)) for name, y in outputs.items()}
  if "qwix W8A8" in outputs:
    errors["ours vs qwix"] = float(jnp.linalg.norm(outputs["ours W8A8"] - outputs["qwix W8A8"])
                                   / jnp.linalg.norm(outputs["qwix W8A8"]))
  medians = {name: t["median_s"] for name, t in timings.items()}
  return {"m": m, "k": k, "n": n, "timings": timings, "median_ms": {k_: 1e3 * v for k_, v in medians.items()},
          "speedup_vs_f32": {name: medians["f32"] / t for name, t in medians.items()},
          "ours_vs_qwix": medians["qwix W8A8"] / medians["ours W8A8"] if "qwix W8A8" in medians else None,
          "paired_speedup_vs_f32": {name: _paired_ratio(timings["f32"], t) for name, t in timings.items()},
          "rel_error_vs_f32": errors, "hlo_dots": {name: dot_instructions(c.as_text()) for name, c in compiled.items()},
          "same_hlo_as_qwix": _shape_only(compiled["ours W8A8"]) == _shape_only(compiled["qwix W8A8"])
          if "qwix W8A8" in compiled else None, "qwix_error": qwix_error}


def _paired_ratio(baseline, other) -> float:
  """Median over alternation rounds of baseline / other: each pair ran back to back, so slow drift of the shared
  CPU's load cancels within a pair (a cross-check on the ratio of medians)."""
  return float(np.median(np.asarray(baseline["samples_s"]) / np.asarray(other["samples_s"])))


def _shape_only(compiled) -> list[str]:
  """The compiled program's fusions and dots with names and metadata removed: equal lists mean XLA runs the same
  kernels (kind, shapes, dtypes) -- the elementwise ops inside a fusion (e.g. rounding constants) may differ."""
  lines = []
  for line in compiled.as_text().splitlines():
    line = re.sub(r"%[\w.\-]+", "%_", _without_attributes(line))
    if line.startswith(("%_ =", "ROOT %_ =")) and (" fusion(" in line or " dot(" in line):
      lines.append(line)
  return sorted(lines)


# --- (c) modeled decode traffic ---------------------------------------------------------------------------------

def decode_traffic(ms, kns) -> list[dict]:
  rows = []
  for k, n in kns:
    for name, (fmt, group, double_quant) in DECODE_FORMATS.items():
      if group is not None and k % group:
        rows.append({"format": name, "k": k, "n": n, "skipped": f"group {group} does not divide K={k}"})
        continue
      groups = 1 if group is None else k // group
      for m in ms:
        modeled = quant_matmul_cost((m, k), (k * QUANT_BITS[fmt] // 8, n), (groups, n), fmt=fmt, dtype=jnp.bfloat16,
                                    scale_scale=double_quant)
        bf16 = dense_cost((m, k), (k, n), dtype=jnp.bfloat16)
        rows.append({"format": name, "m": m, "k": k, "n": n, "modeled": modeled, "bf16": bf16,
                     "group_size": group, "x_bytes": m * k * 2,
                     "scales_partial_sums": quant_matmul_tpu.scales_partial_sums(k, groups),
                     "traffic_ratio": modeled["hbm_bytes"] / modeled["ideal_bytes"],
                     "bf16_bytes_over_quant": bf16["hbm_bytes"] / modeled["hbm_bytes"]})
  return rows


# --- run ------------------------------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  workdir = common.prepare_workdir(workdir)
  if config.repeats < 1:
    raise ValueError(f"--config.repeats={config.repeats!r} must be >= 1.")
  shapes = _shapes(config.shapes, "shapes", 3)
  kns = _shapes(config.decode_kn, "decode_kn", 2)
  ms = [m for (m,) in _shapes(config.decode_m, "decode_m", 1)]
  started = time.perf_counter()
  bytes_table = storage(config.seed)
  for name, row in bytes_table.items():
    print(f"[bytes] {name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} n/a"
                                          for k, v in row.items()), flush=True)
  linears = {}
  for m, k, n in shapes:
    r = time_linear(m, k, n, repeats=config.repeats, use_qwix=config.qwix, seed=config.seed)
    linears[f"{m}x{k}x{n}"] = r
    print(f"[time] M={m} K={k} N={n}: " + ", ".join(f"{name} {ms_:.1f} ms" for name, ms_ in r["median_ms"].items())
          + f"; ours {r['speedup_vs_f32']['ours W8A8']:.2f}x f32" + (
              f", ours/qwix speed {r['ours_vs_qwix']:.2f}x" if r["ours_vs_qwix"] else f" (qwix: {r['qwix_error']})"),
          flush=True)
  traffic = decode_traffic(ms, kns)
  results = {"bytes_per_param": bytes_table, "linears": linears, "decode_traffic": traffic,
             "cpu_features": cpu_features(),
             "wall_seconds": time.perf_counter() - started}
  _write(workdir, config, results)
  print(f"wrote {workdir}/results.json, results.md, bench_quant.png ({results['wall_seconds']:.0f} s)", flush=True)
  return results


def claims(results, traffic_target: float) -> list[common.Claim]:
  out = []
  for name, target in TARGETS.items():
    row = results["bytes_per_param"][name]
    measured = {k: v for k, v in row.items() if isinstance(v, float)}
    worst = max(measured.values()) if measured else None
    out.append(common.Claim(
        f"issue 3: {name} costs ≤ {target} bytes/param including scales",
        "; ".join(f"{k}: {v:.4f}" for k, v in measured.items()) + (
            "; K=576 matrices: n/a (128 does not divide 576)" if len(measured) < len(row) else ""),
        "n/a" if worst is None else ("reproduced" if worst <= target else "not reproduced")))
  for shape, r in results["linears"].items():
    speedup = r["speedup_vs_f32"]["ours W8A8"]
    out.append(common.Claim(
        f"issue 3: our W8A8 linear ≥ 1.3× the f32 linear's CPU speed ({shape})",
        f"{speedup:.2f}× ({r['median_ms']['ours W8A8']:.1f} vs {r['median_ms']['f32']:.1f} ms); median of paired "
    f"ratios {r['paired_speedup_vs_f32']['ours W8A8']:.2f}×; int8 GEMM alone {r['speedup_vs_f32'][GEMM_ONLY]:.2f}×",
        "reproduced" if speedup >= 1.3 else "not reproduced on this CPU"))
    if r["ours_vs_qwix"] is not None:
      out.append(common.Claim(
          f"issue 3: our W8A8 is not slower than qwix's ({shape})",
          f"qwix {r['median_ms']['qwix W8A8']:.1f} ms / ours {r['median_ms']['ours W8A8']:.1f} ms = "
          f"{r['ours_vs_qwix']:.2f}; outputs differ by {r['rel_error_vs_f32']['ours vs qwix']:.1e} (rel.); "
          + ("the two compile to the same fusions and dot (kinds, shapes, dtypes), so the gap is run-to-run noise"
             if r["same_hlo_as_qwix"] else "the compiled fusions differ (see the dots below)"),
          _qwix_verdict(r)))
    else:
      out.append(common.Claim(f"issue 3: our W8A8 is not slower than qwix's ({shape})",
                              f"qwix could not run: {r['qwix_error']}", "n/a"))
  measured = [t for t in results["decode_traffic"] if "traffic_ratio" in t]
  worst = max(measured, key=lambda t: t["traffic_ratio"])
  over = [t for t in measured if t["traffic_ratio"] > traffic_target]
  excess = worst["modeled"]["hbm_bytes"] - worst["modeled"]["ideal_bytes"]
  why = (f"; its excess ({excess} B) is {excess / worst['x_bytes']:.1f}x the bf16 x bytes" if excess else "")
  out.append(common.Claim(
      f"issue 3: quant_matmul's modeled HBM traffic at decode shapes (M ≤ 16) ≤ {traffic_target}× the ideal bytes",
      f"worst {worst['traffic_ratio']:.3f}× ({worst['format']}, M={worst['m']}, K={worst['k']}, N={worst['n']}) "
      f"over {len(measured)} shapes x formats; above target: "
      + (", ".join(f"{t['format']} M={t['m']} K={t['k']} ({t['traffic_ratio']:.3f})" for t in over) or "none")
      + why,
      "reproduced (modeled)" if worst["traffic_ratio"] <= traffic_target else "not reproduced (modeled)"))
  return out


def _qwix_verdict(r) -> str:
  if r["ours_vs_qwix"] >= 0.95:  # within 5% is a tie: alternating medians on this shared CPU resolve no less
    return "reproduced"
  if r["same_hlo_as_qwix"]:
    return "tie by construction (identical compiled fusions and dot); the measured gap is noise"
  return "not reproduced on this CPU"


def _write(workdir, config, results):
  bytes_rows = [(name, *(f"{v:.4f}" if isinstance(v, float) else "n/a" for v in row.values()))
                for name, row in results["bytes_per_param"].items()]
  bytes_header = ("format", *next(iter(results["bytes_per_param"].values())).keys())
  names = ("f32", "ours W8A8", "qwix W8A8", GEMM_ONLY)
  time_rows = [(shape, *(f"{r['median_ms'][n]:.1f}" if n in r["median_ms"] else "n/a" for n in names),
                f"{r['speedup_vs_f32']['ours W8A8']:.2f}× ({r['paired_speedup_vs_f32']['ours W8A8']:.2f}×)",
                f"{r['speedup_vs_f32']['qwix W8A8']:.2f}×" if "qwix W8A8" in r["speedup_vs_f32"] else "n/a",
                f"{r['speedup_vs_f32'][GEMM_ONLY]:.2f}×", f"{r['rel_error_vs_f32']['ours W8A8']:.1e}",
                f"{r['rel_error_vs_f32'].get('qwix W8A8', float('nan')):.1e}")
               for shape, r in results["linears"].items()]
  traffic_rows = [(t["format"], t.get("m", "-"), t["k"], t["n"],
                   *((t["modeled"]["hbm_bytes"], t["modeled"]["ideal_bytes"], f"{t['traffic_ratio']:.3f}",
                      t["bf16"]["hbm_bytes"], f"{t['bf16_bytes_over_quant']:.2f}×") if "modeled" in t
                     else (t["skipped"], "", "", "", "")))
                  for t in results["decode_traffic"]]
  hlo_lines = []
  for shape, r in results["linears"].items():
    for name, dots in r["hlo_dots"].items():
      hlo_lines += [f"- {shape} {name}:"] + [f"  `{d}`" for d in dots]
  plot = _plot(workdir, results)
  common.write_results(
      workdir, title="Quantization benchmark: storage, W8A8 CPU time, modeled decode traffic",
      config=config.to_dict(), results=results, claims=claims(results, config.traffic_target), plots=[plot],
      tables={"(a) stored bytes per parameter (random weights at SmolLM2 shapes)": (bytes_header, bytes_rows),
              f"(b) CPU linear x[M,K] @ W[K,N], median ms of {config.repeats} alternating runs": (
                  ("MxKxN", "f32 ms", "ours W8A8 ms", "qwix W8A8 ms", "int8 GEMM only ms",
                   "ours vs f32 speed (median of paired ratios)", "qwix vs f32 speed",
                   "int8 GEMM only vs f32 speed", "ours rel. err", "qwix rel. err"), time_rows),
              "(c) quant_matmul modeled HBM bytes at decode shapes (bf16 activations)": (
                  ("format", "M", "K", "N", "modeled bytes", "ideal bytes", "modeled / ideal", "bf16 matmul bytes",
                   "bf16 bytes / quant bytes"), traffic_rows)},
      notes="\n".join([
          "Bytes/param: codes + every scale/zero-point array as stored; group scales bf16, per-channel f32, MX "
          "E8M0 uint8, NF4 int8 absmax codes + f32 second-level scales. SmolLM2's K = 576 is not a multiple of "
          "128, so g128 formats apply only to `down` (K = 1536) and have no whole-model figure.",
          "", "CPU times: XLA:CPU on a shared 2-core machine (±50% run to run); the ratios are from one process, "
          "alternating. 'rel. err' = |y - y_f32| / |y_f32|. The (c) column 'bf16 bytes / quant bytes' is the "
          "decode speedup a memory-bound accelerator would get if time ∝ bytes -- a model, not a measurement.",
          "", f"CPU ISA extensions: {', '.join(results['cpu_features']) or 'unknown'}. With AVX512-VNNI an int8 "
          "multiply-accumulate instruction does 4x the MACs of an f32 FMA of the same width, so ~4x is the compute "
          "ceiling of W8A8 over f32; the dynamic W8A8 call also reads x in f32 for the per-token absmax, writes int8 "
          "x, and rescales the int32 output (the 'int8 GEMM only' column leaves the first two out).",
          "", "Dots in the compiled HLO (how XLA:CPU runs each product; `ynn_fusion` = XLA:CPU's YNNPACK GEMM):",
          *hlo_lines]))


def _plot(workdir, results):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  whole = {name: row["down (1536x576)"] for name, row in results["bytes_per_param"].items()
           if isinstance(row["down (1536x576)"], float)}
  axes[0].barh(list(whole), list(whole.values()))
  for name, target in TARGETS.items():
    axes[0].axvline(target, ls="--", lw=0.8, color="gray")
  axes[0].set_xlabel("bytes / parameter (down, K=1536); dashed: targets")
  shapes = list(results["linears"])
  names = ("f32", "ours W8A8", "qwix W8A8", GEMM_ONLY)
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    values = [results["linears"][s]["speedup_vs_f32"].get(name, 0.0) for s in shapes]
    axes[1].bar(np.arange(len(shapes)) + i * width, values, width, label=name)
  axes[1].axhline(1.3, ls="--", lw=0.8, color="gray")
  axes[1].set_xticks(np.arange(len(shapes)) + 1.5 * width, shapes)
  axes[1].set_ylabel("speed vs f32 (CPU, higher is faster)")
  axes[1].legend(fontsize=7, loc="lower right")
  return common.save_figure(fig, workdir, "bench_quant.png", dpi=110)


if __name__ == "__main__":
  common.run_program(run, default_config(), "workdir/bench_quant")
