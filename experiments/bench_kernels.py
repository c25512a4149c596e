"""Every kernel in `pallas_kernels/`, every implementation that runs on this backend, side by side in one process.

    PYTHONPATH=. python -m experiments.bench_kernels [--workdir=workdir/bench_kernels] [--ops=matmul,rms_norm]
        [--config.size=tiny] [--config.repeats=5] [--config.dtype=auto] [--config.device=h200]

For each op at the canonical shapes of its lowering test and at SmolLM2-135M's (`experiments.kernel_cases`):
CPU times the reference and the XLA paths; GPU the compiled 'pallas_gpu' kernel, the XLA paths and the peers
(`jax.nn.dot_product_attention(implementation='cudnn')`; matmul's reference is jnp.matmul, i.e. cuBLAS); TPU
'pallas_tpu' and the XLA paths. qwix / tokamax rows come from the optional extra `pip install -e '.[peers]'`
(without it the row says so). Interpret modes are not timed: they simulate a kernel, they do not run it.

Each function is compiled once (AOT), called once as its warm-up (the output checked against the op's reference:
relative RMS error) and timed with `common.time_side_by_side` (alternating, median of `repeats`). Every row
reports, from the op's own `cost()` model (the TPU kernel's grid, the same for every implementation of a case):
modeled FLOP/s = cost flops / median time, modeled bytes/s = cost hbm_bytes / median time, and beside them XLA's
compiled `bytes accessed` for that implementation (the compiler's count of an XLA program; a Pallas call counts
as the `pl.CostEstimate` it passes, i.e. its own cost(), or 0 without one). On an accelerator with a row in `efficient.measure`'s peak
table the rows also give % of peak FLOP/s and bytes/s and the roofline bound; a CPU has no published peak.
Results: results.json, results.md and roofline.png (arithmetic intensity vs achieved FLOP/s, log-log).
"""
from __future__ import annotations

import importlib.util
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from efficient import measure
from experiments import common, kernel_cases

# Contract tolerances of a kernel vs its reference (relative RMS), by output dtype (README, "Design").
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.ops = ""          # comma-separated subset of kernel_cases.OPS (the --ops flag sets it); empty: all
  config.size = "full"     # 'full': lowering-test and SmolLM2 shapes; 'tiny': a seconds-long check
  config.repeats = 5       # timed runs per function (median), after one warm-up
  config.dtype = "auto"    # float32 on CPU, bfloat16 on GPU / TPU
  config.device = ""       # peak-table name (efficient.measure.DEVICE_PEAKS); empty: jax's device_kind
  config.seed = 0
  return config


def select_ops(text) -> tuple[str, ...]:
  """The ops named in `text` (comma-separated; empty or None: all), or a ValueError naming --ops."""
  names = [name.strip() for name in str(text or "").split(",") if name.strip()]
  unknown = [name for name in names if name not in kernel_cases.OPS]
  if unknown:
    raise ValueError(f"--ops={text!r}: unknown op(s) {unknown}; choose from {kernel_cases.OPS} (comma-separated).")
  return tuple(dict.fromkeys(names)) or kernel_cases.OPS


def _dtype(config):
  if config.dtype == "auto":
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
  try:
    return jnp.dtype(config.dtype)
  except TypeError as e:
    raise ValueError(f"--config.dtype={config.dtype!r} is not a dtype (use auto, float32 or bfloat16).") from e


def peak_device(config) -> tuple[str | None, str]:
  """(the `efficient.measure.device_peak` name whose peaks the rows are held against, or None; a note): the name
  --config.device gives, else this device's kind if the table has it. A CPU has no published peak."""
  if config.device:
    measure.device_peak(config.device)  # an unknown name fails before anything runs
    return config.device, f"peaks of {config.device!r} (--config.device)"
  device = jax.devices()[0]
  if device.platform == "cpu":
    return None, "CPU: no published peak (measured numbers only)"
  try:
    measure.device_peak(device.device_kind)
  except ValueError:  # a chip the table lacks: its numbers are reported without a peak
    return None, f"{device.device_kind!r}: not in efficient.measure.DEVICE_PEAKS, no peak (pass --config.device)"
  return device.device_kind, f"peaks of {device.device_kind!r}"


def _error(actual, expected) -> float:
  """Relative RMS error of the first output (an op returning several, e.g. lowbit_adam's, leads with its main one)."""
  return common.relative_rms_error(jax.tree.leaves(actual)[0], jax.tree.leaves(expected)[0])


def _first_line(error: Exception) -> str:
  return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:240]}"


def rates(cost: dict, seconds: float, device: str | None) -> dict:
  """Modeled FLOP/s and bytes/s of work `cost` done in `seconds`; with a `device`, the fractions of its peaks
  and of its roofline bound (`efficient.measure.roofline` of the modeled flops and HBM bytes)."""
  out = {"gflops_per_s": cost["flops"] / seconds / 1e9, "hbm_gb_per_s": cost["hbm_bytes"] / seconds / 1e9,
         "ideal_gb_per_s": cost["ideal_bytes"] / seconds / 1e9,
         "intensity": cost["flops"] / cost["hbm_bytes"] if cost["hbm_bytes"] else math.inf}
  if device is not None:
    roof = measure.roofline(cost["flops"], cost["hbm_bytes"], device)
    out.update(pct_peak_flops=100 * cost["flops"] / seconds / roof["peak_flops_per_s"],
               pct_peak_bytes=100 * cost["hbm_bytes"] / seconds / roof["peak_hbm_bytes_per_s"],
               roofline_bound_s=roof["bound_s"], pct_of_roofline=100 * roof["bound_s"] / seconds,
               bound_by=roof["bound_by"])
  return out


def bench_case(case: kernel_cases.Case, *, repeats: int, device: str | None) -> list[dict]:
  """One row per function of `case` (and per missing peer): time, error vs the reference, rates, XLA bytes."""
  compiled, outputs, failed = {}, {}, {}
  for name, (fn, args) in case.functions.items():
    try:
      compiled[name] = jax.jit(fn).lower(*args).compile()
      outputs[name] = jax.block_until_ready(compiled[name](*args))
    except Exception as e:  # a kernel or peer that fails here is reported in its row; the others still run
      compiled.pop(name, None)
      failed[name] = _first_line(e)
  # The output call above was each function's warm-up run (a second one would add a seventh call to every row).
  timings = common.time_side_by_side(
      {name: (lambda exe=exe, args=case.functions[name][1]: exe(*args)) for name, exe in compiled.items()},
      repeats=repeats, warmup=0)
  fastest = min((t["median_s"] for t in timings.values()), default=math.nan)
  reference = outputs.get("reference")
  base = {"op": case.op, "case": case.name, "shape": case.shape, "default": case.default, "note": case.note,
          "flops": case.cost["flops"], "hbm_bytes": case.cost["hbm_bytes"], "ideal_bytes": case.cost["ideal_bytes"]}
  rows = []
  for name in case.functions:
    row = dict(base, implementation=name, kind="peer" if name in case.peers else "op")
    if name in failed:
      rows.append(dict(row, status=f"failed: {failed[name]}"))
      continue
    seconds = timings[name]["median_s"]
    xla = measure.compiled_cost(compiled[name])
    output_dtype = jnp.dtype(jax.tree.leaves(outputs[name])[0].dtype)
    rows.append(dict(row, status="ok", median_s=seconds, samples_s=timings[name]["samples_s"],
                     x_fastest=seconds / fastest, output_dtype=output_dtype.name,
                     error_vs_reference=None if reference is None else _error(outputs[name], reference),
                     tolerance=TOLERANCE.get(output_dtype, 1e-5), xla_flops=xla["flops"],
                     xla_bytes_accessed=xla["bytes_accessed"], **rates(case.cost, seconds, device)))
  rows += [dict(base, implementation=name, kind="peer", status=why) for name, why in case.missing.items()]
  return rows


def claims(rows, backend: str) -> list[common.Claim]:
  timed = [r for r in rows if r["status"] == "ok"]
  ours = [r for r in timed if r["kind"] == "op" and r["error_vs_reference"] is not None]
  bad = [r for r in ours if r["error_vs_reference"] > r["tolerance"]]
  worst = max(ours, key=lambda r: r["error_vs_reference"] / r["tolerance"], default=None)
  failed = [r for r in rows if r["kind"] == "op" and r["status"] != "ok"]
  out = [common.Claim(
      "every implementation matches its op's reference (rel. RMS <= 1e-5 f32, <= 1e-2 bf16)",
      f"{len(ours) - len(bad)} of {len(ours)} rows within, {len(failed)} failed to run"
      + (f"; worst {worst['op']} / {worst['case']} / {worst['implementation']}: {worst['error_vs_reference']:.1e}"
         if worst else ""),
      "reproduced" if ours and not bad and not failed else "not reproduced" if len(bad) == len(ours) else "partly")]
  cases = {}
  for r in timed:
    if r["kind"] == "op":
      cases.setdefault((r["op"], r["case"]), []).append(r)
  slower = []
  compared = 0
  for (op, case), group in cases.items():
    default = next((r for r in group if r["implementation"] == r["default"]), None)
    if len(group) < 2 or default is None:
      continue
    compared += 1
    best = min(group, key=lambda r: r["median_s"])
    if default["median_s"] > 1.1 * best["median_s"]:  # beyond the run-to-run noise of side-by-side medians
      slower.append(f"{op} / {case}: {default['implementation']} takes {default['median_s'] / best['median_s']:.2f}x "
                    f"{best['implementation']}'s time")
  out.append(common.Claim(
      f"implementation=None runs the fastest implementation at every shape ({backend}; within 10%)",
      f"{compared - len(slower)} of {compared} cases" + (f"; slower defaults: {'; '.join(slower)}" if slower else ""),
      "reproduced" if compared and not slower else "not reproduced" if compared and len(slower) == compared
      else "partly" if compared else "n/a (one implementation per case)"))
  return out


def _fmt(value, spec: str, missing: str = "-") -> str:
  return missing if value is None else format(value, spec)


def tables(rows, peak_note: str) -> dict:
  header = ("op", "case", "implementation", "median ms", "x fastest", "rel err vs ref", "modeled GFLOP",
            "GFLOP/s", "modeled MB", "ideal MB", "XLA MB accessed", "GB/s (modeled)", "% peak FLOP/s",
            "% peak BW", "% roofline")
  body = []
  for r in rows:
    ok = r["status"] == "ok"
    label = r["implementation"] + (" (default)" if r["implementation"] == r["default"] else "")
    if not ok:
      body.append((r["op"], r["case"], label, r["status"], *["-"] * (len(header) - 4)))
      continue
    body.append((r["op"], r["case"], label, f"{1e3 * r['median_s']:.3f}", f"{r['x_fastest']:.2f}",
                 _fmt(r["error_vs_reference"], ".1e"), f"{r['flops'] / 1e9:.3f}", f"{r['gflops_per_s']:.1f}",
                 f"{r['hbm_bytes'] / 1e6:.2f}", f"{r['ideal_bytes'] / 1e6:.2f}", f"{r['xla_bytes_accessed'] / 1e6:.2f}",
                 f"{r['hbm_gb_per_s']:.1f}", _fmt(r.get("pct_peak_flops"), ".1f", "no peak"),
                 _fmt(r.get("pct_peak_bytes"), ".1f", "no peak"), _fmt(r.get("pct_of_roofline"), ".1f", "no peak")))
  shapes = {}
  for r in rows:
    shapes.setdefault((r["op"], r["case"]), (r["op"], r["case"], r["shape"], r["note"] or "-"))
  return {f"Side by side ({peak_note})": (header, body),
          "Shapes": (("op", "case", "shape", "note"), list(shapes.values()))}


def plot(rows, device: str | None, workdir: str, backend: str) -> list[str]:
  """roofline.png: modeled arithmetic intensity vs achieved FLOP/s per row, log-log, with the device's roofline
  when it has a peak. Skipped (listed in the notes) where matplotlib is not installed (e.g. a bare GPU image)."""
  if importlib.util.find_spec("matplotlib") is None:
    return []
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  timed = [r for r in rows if r["status"] == "ok" and r["flops"] > 0]
  fig, ax = plt.subplots(figsize=(9, 6))
  names = sorted({r["implementation"] for r in timed})
  for index, name in enumerate(names):
    points = [(r["intensity"], r["gflops_per_s"] * 1e9) for r in timed if r["implementation"] == name]
    ax.scatter(*zip(*points), label=name, marker="os^vD<>ph*"[index % 10], alpha=0.8)
  for (op, case), best in _best_per_case(timed).items():
    ax.annotate(op, (best["intensity"], best["gflops_per_s"] * 1e9), fontsize=6, alpha=0.7)
  peak = None if device is None else measure.device_peak(device)
  if peak is not None and timed:
    intensities = np.geomspace(min(r["intensity"] for r in timed) / 2, max(r["intensity"] for r in timed) * 2, 200)
    ax.plot(intensities, np.minimum(peak.flops_per_s, intensities * peak.hbm_bytes_per_s), "k--",
            label=f"{peak.name} roofline")
  ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (modeled FLOP / modeled HBM byte)",
         ylabel="achieved FLOP/s (modeled FLOP / median time)",
         title=f"pallas_kernels on {backend}" + ("" if peak is not None else " (no peak)"))
  ax.legend(fontsize=7)
  ax.grid(True, which="both", alpha=0.3)
  return [common.save_figure(fig, workdir, "roofline.png")]


def _best_per_case(rows) -> dict:
  best = {}
  for r in rows:
    key = (r["op"], r["case"])
    if key not in best or r["median_s"] < best[key]["median_s"]:
      best[key] = r
  return best


def run(config: ml_collections.ConfigDict, workdir: str, ops: str | None = None) -> dict:
  """Benchmarks `ops` (the --ops flag; None: --config.ops) and writes results.json, results.md, roofline.png."""
  start = time.perf_counter()
  ops = select_ops(config.ops if ops is None else ops)
  if config.size not in kernel_cases.SIZES:
    raise ValueError(f"--config.size={config.size!r} is unknown; choose from {kernel_cases.SIZES}.")
  if int(config.repeats) < 1:
    raise ValueError(f"--config.repeats={config.repeats!r} must be a positive int.")
  dtype = _dtype(config)
  device, peak_note = peak_device(config)
  workdir = common.prepare_workdir(workdir)
  backend = jax.default_backend()
  rows = []
  for op in common.progress(ops, desc="bench_kernels", unit="op"):
    for case in kernel_cases.build(op, config.size, dtype, backend, seed=config.seed):
      case_start = time.perf_counter()
      rows += bench_case(case, repeats=int(config.repeats), device=device)
      print(f"[bench_kernels] {op} / {case.name}: {time.perf_counter() - case_start:.1f} s", flush=True)
  plots = plot(rows, device, workdir, backend)
  wall_s = time.perf_counter() - start
  notes = (f"Backend {backend} ({jax.devices()[0].device_kind}), dtype {dtype.name}, {config.size} shapes; "
           f"{peak_note}. Medians of {config.repeats} alternating runs after a warm-up. 'modeled' numbers use each "
           f"op's cost() (the TPU kernel's grid and BlockSpecs) for every implementation of a case, so FLOP/s and "
           f"GB/s compare like times; 'XLA MB accessed' is the compiler's count for that implementation (a Pallas "
           f"call counts as the pl.CostEstimate it passes, 0 without one). Peers marked {kernel_cases.PEERS_HINT!r} were not "
           f"installed. Whole run: {wall_s:.0f} s."
           + ("" if plots else " No plot: matplotlib is not installed here."))
  common.write_results(workdir, title=f"Kernels side by side ({backend})", config=config.to_dict(),
                       results={"rows": rows, "ops": list(ops), "wall_s": wall_s,
                                "peak": None if device is None else measure.device_peak(device)},
                       claims=claims(rows, backend), tables=tables(rows, peak_note), notes=notes, plots=plots)
  return {"rows": rows, "wall_s": wall_s, "plots": plots}


if __name__ == "__main__":
  _OPS = flags.DEFINE_string("ops", None, f"Comma-separated ops to benchmark (default all): {kernel_cases.OPS}.")
  common.run_program(lambda config, workdir: run(config, workdir, ops=_OPS.value), default_config(),
                     "workdir/bench_kernels")
