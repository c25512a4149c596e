"""Post-training pruning of SmolLM2-135M: magnitude vs Wanda vs SparseGPT at 50% unstructured and 2:4.

    python -m experiments.prune [--workdir=workdir/prune] [--config.calibration_batches=8 ...]

Every projection of every block (q, k, v, o, gate, up, down; not the tied embedding) is pruned by path rules
(`efficient.sparse.prune.prune_model`), from one capture of the dense model's calibration Hessians on the stdlib
train split (shared by Wanda and SparseGPT, one-shot: layers see dense-model inputs). Reports validation
perplexity on the quickstart's slice (first `eval_batches` of the validation split, 4 x 256 tokens each), its
change vs dense, the measured sparsity, and the measured bytes of the pruned matrices in compressed storage
(2:4 -> kept values + 2-bit packed positions; unstructured -> kept values + a 1-bit mask), against dense f32.
Every N:M row also runs with its kept values quantized to int4 (`--config.quantize_nm`; symmetric, one scale per
32 kept values, packed two per byte — Sparse-MARLIN's 2:4 + int4 storage; '' turns it off), by RTN and by GPTQ
with the sparsity mask fixed (pruned entries stay zero, kept ones absorb the quantization error: SparseGPT's joint
sparsify + quantize, run as a second pass over the pruned weights with the same Hessians).

Writes results.json, results.md and prune.png (validation perplexity against the compressed bytes of the pruned
matrices, one point per variant). No default run is kept in the repository yet: `python -m experiments.report
--run=prune` makes one in experiments/results/prune/ and adds it to the results index. Runtime: a default run
took 36 min on the shared 2-core CPU with 3-4 other jobs running (Hessian capture 2.3 min, SparseGPT 8-9 min per
pattern, magnitude/Wanda 1-2.5 min each before their mask selection dropped XLA:CPU's sort); on an idle machine
expect roughly a third. `--config.methods=magnitude,wanda` skips SparseGPT.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from efficient import calibration, data, models, quant, sparse, train
from efficient.quant import calibrate as calibrate_lib
from efficient.sparse import prune, storage
from experiments import common


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "smollm2-135m"
  config.methods = "magnitude,wanda,sparsegpt"
  config.patterns = "50%,2:4"          # '<p>%' unstructured, or 'n:m'
  config.rule = r"blocks/\d+/(attention|mlp)/.*"  # which projections are pruned (full match on the path)
  config.calibration_batches = 8        # of calibration_batch_size x seq_len tokens from the train split
  config.calibration_batch_size = 4
  config.seq_len = 256
  config.eval_batches = 4
  config.eval_batch_size = 4
  config.block_size = 128               # SparseGPT
  config.damping = 0.01                 # SparseGPT
  # N:M rows also run with their kept values quantized (Sparse-MARLIN's 2:4 + int4 storage); '' turns it off.
  config.quantize_nm = "int4"
  config.quantize_nm_group = 32         # kept values per scale: 32 of 2:4 = 64 dense inputs (ptq.py's g64)
  config.quantize_nm_methods = "rtn,gptq"  # gptq: GPTQ with the sparsity mask fixed (needs the Hessians)
  return config




def parse_pattern(pattern: str) -> dict:
  """'50%' -> {'sparsity': 0.5}; '2:4' -> {'nm': (2, 4)}."""
  pattern = pattern.strip()
  try:
    if pattern.endswith("%"):
      return {"sparsity": float(pattern[:-1]) / 100}
    n, m = pattern.split(":")
    return {"nm": (int(n), int(m))}
  except ValueError as e:
    raise ValueError(f"--config.patterns: {pattern!r} must look like '50%' or '2:4'.") from e


def compressed_bytes(model, report: dict) -> dict:
  """Measured bytes of the pruned matrices, dense (their dtype) and in the compressed storage of their pattern."""
  dense = compressed = 0
  for path, row in report.items():
    module = calibration.get_module(model, path)
    matrix = calibration.kernel_as_matrix(module)
    dense += storage.dense_nbytes(matrix.shape, matrix.dtype)
    if row["pattern"].count(":"):
      n, m = (int(v) for v in row["pattern"].split(":"))
      compressed += sparse.compress_nm(matrix, n, m).nbytes()
    else:
      compressed += sparse.compress_bitmask(np.asarray(matrix)).nbytes()
  return {"dense": dense, "compressed": compressed, "ratio": compressed / dense}


def quantize_nm_values(matrix, n: int, m: int, fmt: str, group_size: int, hessian=None):
  """N:M storage with quantized kept values for an N:M-sparse [in, out] `matrix`: the kept values [in*n/m, out]
  as a QArray with one scale per `group_size` kept values along the input axis (symmetric, so stored zeros stay
  zero) plus the packed positions. Without `hessian` the kept values are RTN-quantized; with it, GPTQ quantizes
  the matrix with its sparsity mask fixed (pruned entries stay exactly zero and their neighbours absorb the
  quantization error: SparseGPT's joint prune + quantize, run as a second pass). Returns the dense matrix the
  storage stands for and its measured bytes (packed codes + scales + packed positions)."""
  kept = matrix != 0
  stored = sparse.compress_nm(matrix, n, m, mask=kept)
  template = quant.quantize(stored.values, fmt, axis=0, group_size=group_size)
  if hessian is None:
    codes = template
  else:
    bits = quant.FORMATS[fmt].bits
    dense_codes = quant.gptq_quantize(matrix, hessian, bits=bits, group_size=group_size * m // n, mask=kept)
    stored = sparse.compress_nm(quant.dequantize(dense_codes, jnp.float32), n, m, mask=kept)
    # A group of group_size*m/n inputs holds group_size kept values: GPTQ's scales are the storage's scales.
    step = jnp.repeat(dense_codes.scale.astype(jnp.float32), group_size, axis=0)
    codes = dataclasses.replace(template, scale=dense_codes.scale, qvalue=calibrate_lib.encode_codes(
        jnp.round(stored.values / step), quant.FORMATS[fmt], True))
    if not bool(jnp.all(quant.dequantize(codes, jnp.float32) == stored.values)):
      raise AssertionError("the N:M storage does not reproduce GPTQ's weights exactly")
  restored = dataclasses.replace(stored, values=quant.dequantize(codes, stored.values.dtype)).todense()
  return restored, quant.nbytes(codes) + int(stored.indices.size)


def _quantized_nm_row(graphdef, pruned_state, report, pattern, config, eval_batches, dense_eval, hessians):
  """The pruned model's N:M matrices replaced by their quantized N:M storage (dequantized for evaluation);
  `hessians` given: by GPTQ with the mask fixed, else RTN."""
  model = nnx.merge(graphdef, jax.tree.map(lambda a: a, pruned_state))
  n, m = pattern["nm"]
  dense = compressed = 0
  t0 = time.perf_counter()
  for path in report:
    module = calibration.get_module(model, path)
    matrix = calibration.kernel_as_matrix(module)
    restored, nbytes = quantize_nm_values(matrix, n, m, config.quantize_nm, config.quantize_nm_group,
                                          None if hessians is None else hessians[path]["hessian"])
    module.kernel[...] = calibration.matrix_to_kernel(module, restored).astype(module.kernel[...].dtype)
    dense += storage.dense_nbytes(matrix.shape, matrix.dtype)
    compressed += nbytes
  quantize_seconds = time.perf_counter() - t0
  evaluation = train.evaluate(model, eval_batches)
  sparsities = [float(jnp.mean(calibration.kernel_as_matrix(calibration.get_module(model, p)) == 0))
                for p in report]
  return {"perplexity": evaluation["perplexity"], "loss": evaluation["loss"],
          "delta_perplexity": evaluation["perplexity"] - dense_eval["perplexity"],
          "sparsity": float(np.mean(sparsities)), "projections": len(report),
          "bytes": {"dense": dense, "compressed": compressed, "ratio": compressed / dense},
          "prune_seconds": quantize_seconds,
          "nm_valid": all(sparse.is_nm_sparse(calibration.kernel_as_matrix(calibration.get_module(model, p)), n, m)
                          for p in report)}


def _quantizers(config, pattern, hessians) -> list[str]:
  if "nm" not in pattern or not config.quantize_nm:
    return []
  chosen = common.config_list(config, "quantize_nm_methods")
  if unknown := [q for q in chosen if q not in ("rtn", "gptq")]:
    raise ValueError(f"--config.quantize_nm_methods: unknown {unknown}; choose from ['rtn', 'gptq'].")
  return [q for q in chosen if q == "rtn" or hessians is not None]  # GPTQ needs the calibration Hessians


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  workdir = common.prepare_workdir(workdir)
  methods = [m.strip() for m in config.methods.split(",") if m.strip()]
  unknown = [m for m in methods if m not in prune.METHODS]
  if unknown or not methods:
    raise ValueError(f"--config.methods: unknown {unknown or methods}; choose from {prune.METHODS}.")
  patterns = {p.strip(): parse_pattern(p) for p in config.patterns.split(",") if p.strip()}
  started = time.perf_counter()
  print(f"loading {config.model} ...", flush=True)
  loaded = models.load(config.model, dtype=jnp.float32)
  graphdef, dense_state = nnx.split(loaded.model)
  tokens_per_batch = config.eval_batch_size * config.seq_len
  validation = data.stdlib_dataset("validation", batch_size=config.eval_batch_size, seq_len=config.seq_len,
                                   tokenizer=loaded.tokenizer, shuffle=False,
                                   max_tokens=config.eval_batches * tokens_per_batch * 2)
  eval_batches = [validation.batch(step) for step in range(config.eval_batches)]
  calibration_set = data.stdlib_dataset(
      "train", batch_size=config.calibration_batch_size, seq_len=config.seq_len, tokenizer=loaded.tokenizer,
      shuffle=True, seed=0,
      max_tokens=config.calibration_batches * config.calibration_batch_size * config.seq_len * 4)
  calibration_batches = [calibration_set.batch(step) for step in range(config.calibration_batches)]

  dense_eval = train.evaluate(loaded.model, eval_batches)
  print(f"dense perplexity {dense_eval['perplexity']:.3f} on {dense_eval['tokens']} tokens", flush=True)
  hessians, capture_seconds = None, 0.0
  if any(m != "magnitude" for m in methods):
    print(f"capturing calibration Hessians on {len(calibration_batches)} x {config.calibration_batch_size} x "
          f"{config.seq_len} train tokens ...", flush=True)
    t0 = time.perf_counter()
    hessians = calibration.capture_hessians(loaded.model, calibration_batches, pattern=config.rule)
    capture_seconds = time.perf_counter() - t0

  rows = {}
  bar = common.progress(total=len(patterns) * len(methods), desc="prune", unit="variant")
  for pattern_name, pattern in patterns.items():
    for method in methods:
      name = f"{method} {pattern_name}"
      # A fresh dense copy: merge alone would share (and pruning would overwrite) the dense Variables; new
      # Variables around the same immutable arrays cost nothing.
      model = nnx.merge(graphdef, jax.tree.map(lambda a: a, dense_state))
      rule = prune.PruneConfig(method, block_size=config.block_size, damping=config.damping, **pattern)
      t0 = time.perf_counter()
      report = prune.prune_model(model, [(config.rule, rule)], hessians=hessians)
      jax.block_until_ready(nnx.state(model))
      prune_seconds = time.perf_counter() - t0
      evaluation = train.evaluate(model, eval_batches)
      nbytes = compressed_bytes(model, report)
      sparsities = [row["sparsity"] for row in report.values()]
      rows[name] = {"method": method, "pattern": pattern_name, "perplexity": evaluation["perplexity"],
                    "loss": evaluation["loss"], "delta_perplexity": evaluation["perplexity"] - dense_eval["perplexity"],
                    "sparsity": float(np.mean(sparsities)), "projections": len(report), "bytes": nbytes,
                    "prune_seconds": prune_seconds,
                    "nm_valid": all(sparse.is_nm_sparse(calibration.kernel_as_matrix(
                        calibration.get_module(model, p)), *pattern["nm"]) for p in report)
                    if "nm" in pattern else None}
      print(f"[{name}] ppl {evaluation['perplexity']:.3f} (Δ {rows[name]['delta_perplexity']:+.3f}), sparsity "
            f"{rows[name]['sparsity']:.3f}, {nbytes['compressed'] / 2**20:.1f} MiB vs {nbytes['dense'] / 2**20:.1f}"
            f" MiB dense, pruned in {prune_seconds:.1f} s", flush=True)
      for quantizer in _quantizers(config, pattern, hessians):
        quantized_name = f"{name} + {config.quantize_nm} {quantizer}"
        rows[quantized_name] = _quantized_nm_row(graphdef, nnx.state(model), report, pattern, config,
                                                 eval_batches, dense_eval, hessians if quantizer == "gptq" else None)
        rows[quantized_name].update(method=method, pattern=pattern_name, quantized=config.quantize_nm)
        print(f"[{quantized_name}] ppl {rows[quantized_name]['perplexity']:.3f}, "
              f"{rows[quantized_name]['bytes']['ratio']:.4f} of dense bytes", flush=True)
      bar.update()
  bar.close()

  claims = _claims(rows, patterns, methods)
  header = ("variant", "val ppl", "Δ ppl vs dense", "sparsity (pruned matrices)", "compressed MiB",
            "dense f32 MiB", "compressed / dense", "prune s")
  table = [("dense", f"{dense_eval['perplexity']:.3f}", "0", "0", "-",
            f"{next(iter(rows.values()))['bytes']['dense'] / 2**20:.1f}" if rows else "-", "1", "-")]
  table += [(name, f"{r['perplexity']:.3f}", f"{r['delta_perplexity']:+.3f}", f"{r['sparsity']:.3f}",
             f"{r['bytes']['compressed'] / 2**20:.1f}", f"{r['bytes']['dense'] / 2**20:.1f}",
             f"{r['bytes']['ratio']:.4f}", f"{r['prune_seconds']:.1f}") for name, r in rows.items()]
  results = {"dense": dense_eval, "rows": rows, "capture_seconds": capture_seconds,
             "calibration_tokens": None if hessians is None else next(iter(hessians.values()))["count"],
             "wall_seconds": time.perf_counter() - started}
  common.write_results(
      workdir, title="Pruning SmolLM2-135M: magnitude vs Wanda vs SparseGPT", config=config.to_dict(),
      results=results, claims=claims, tables={"Variants": (header, table)},
      notes=(f"Validation: first {config.eval_batches} batches of {config.eval_batch_size}x{config.seq_len} "
             f"tokens of the stdlib validation split ({dense_eval['tokens']} loss tokens). Calibration: "
             f"{results['calibration_tokens']} train-split tokens, Hessians captured once from the dense model "
             "(one-shot; the papers propagate pruned activations layer by layer). Pruned: every q/k/v/o/gate/up/"
             "down projection of the 30 blocks (the tied embedding is dense). Compressed bytes are measured from "
             "the stored arrays: 2:4 = f32 kept values + 2-bit positions; unstructured = f32 kept values + "
             "1-bit mask."), plots=[_plot(workdir, rows, dense_eval)])
  return results


def _plot(workdir, rows, dense_eval) -> str:
  """Validation perplexity against compressed bytes / dense f32 bytes of the pruned matrices, per variant."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, method in enumerate(dict.fromkeys(r["method"] for r in rows.values())):
    named = {name: r for name, r in rows.items() if r["method"] == method}
    ax.scatter([r["bytes"]["ratio"] for r in named.values()], [r["perplexity"] for r in named.values()],
               color=f"C{i}", label=method)
    for name, r in named.items():
      ax.annotate(name.removeprefix(f"{method} "), (r["bytes"]["ratio"], r["perplexity"]), fontsize=7,
                  xytext=(3, 3), textcoords="offset points")
  ax.axhline(dense_eval["perplexity"], color="k", lw=0.8, ls="--", label="dense")
  ax.axvline(1.0, color="k", lw=0.5, ls=":")
  ax.set_xlabel("compressed bytes / dense f32 bytes (pruned matrices)")
  ax.set_ylabel("validation perplexity")
  ax.set_title("Pruning SmolLM2-135M: size vs perplexity")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return common.save_figure(fig, workdir, "prune.png")


def _claims(rows: dict, patterns: dict, methods: list) -> list:
  claims = []
  for pattern in patterns:
    ppl = {m: rows[f"{m} {pattern}"]["perplexity"] for m in methods}
    if all(m in ppl for m in prune.METHODS):
      ordered = ppl["sparsegpt"] <= ppl["wanda"] < ppl["magnitude"]
      partly = ppl["sparsegpt"] < ppl["magnitude"] and ppl["wanda"] < ppl["magnitude"]
      claims.append(common.Claim(
          f"{pattern}: SparseGPT <= Wanda < magnitude in perplexity (Wanda/SparseGPT papers)",
          f"SparseGPT {ppl['sparsegpt']:.2f}, Wanda {ppl['wanda']:.2f}, magnitude {ppl['magnitude']:.2f}",
          "reproduced" if ordered else "partly (both beat magnitude)" if partly else "not reproduced"))
  structured = [p for p in patterns if ":" in p]
  unstructured = [p for p in patterns if p.endswith("%") and abs(patterns[p]["sparsity"] - 0.5) < 1e-9]
  for method in methods:
    if structured and unstructured:
      a, b = rows[f"{method} {unstructured[0]}"], rows[f"{method} {structured[0]}"]
      claims.append(common.Claim(
          f"{method}: 2:4 costs more perplexity than 50% unstructured (a stricter pattern at equal sparsity)",
          f"{a['perplexity']:.2f} ({unstructured[0]}) vs {b['perplexity']:.2f} ({structured[0]})",
          "reproduced" if b["perplexity"] > a["perplexity"] else "not reproduced"))
  for pattern in structured:
    row = rows[f"{methods[0]} {pattern}"]
    n, m = patterns[pattern]["nm"]
    itemsize_ratio = n / m + (storage.index_bits(m) * n / m) / 32
    claims.append(common.Claim(
        f"{pattern} storage of f32 weights is {itemsize_ratio:.4f} of dense (n/m values + packed positions)",
        f"measured {row['bytes']['ratio']:.4f} ({row['bytes']['compressed']:,} of {row['bytes']['dense']:,} bytes); "
        f"every pruned matrix {pattern}-valid: {row['nm_valid']}",
        "reproduced" if abs(row["bytes"]["ratio"] - itemsize_ratio) < 1e-3 and row["nm_valid"] else "not reproduced"))
  for name, row in rows.items():
    if row.get("quantized"):
      base = rows[f"{row['method']} {row['pattern']}"]
      cost = 100 * (row["perplexity"] / base["perplexity"] - 1)
      claims.append(common.Claim(
          f"{name}: sparsity and 4-bit quantization compose (Sparse-MARLIN's 2:4 + int4 format) at a small extra "
          "perplexity cost over the sparse model",
          f"ppl {row['perplexity']:.2f} vs {base['perplexity']:.2f} sparse-only ({cost:+.1f}%), "
          f"{row['bytes']['ratio']:.4f} of dense f32 bytes; still {row['pattern']}-valid: {row['nm_valid']}",
          ("reproduced" if cost < 5 else "partly (costs more than 5%)") if row["nm_valid"] else "not reproduced"))
  return claims


if __name__ == "__main__":
  common.run_program(run, default_config(), "workdir/prune")
