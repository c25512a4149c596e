"""Decode attention side by side: one query step over a long cache stored as float, int8 / int4 (KIVI layout),
or in pages (float, int8, int4) -- each kernel checked against its reference and timed alternately in one run.

    python -m experiments.bench_decode [--workdir=workdir/bench_decode] [--config.cache_lens=1024,8192]

Rows, per cache length S (SmolLM2's head layout by default: 9 query heads over 3 kv heads of 64):
  float              `flash_decode` over k/v [B, S, H_kv, D] (the float cache's one-token step)
  int8 / int4        `quant_decode` over a `QuantizedKVCache`'s arrays (per-channel K in groups, per-token V,
                     the open group float): the quantized cache's one-token step
  ... dequantize-all `quant_decode`'s reference: dequantizes the whole cache, then one softmax -- what the
                     quantized cache's step did before the fused path (the 'before' of the issue)
  paged float/int8/int4  `paged_decode` over a shuffled page pool
Part 2 (config.model_layers > 0): greedy `llama.generate` tokens/s of a randomly initialised SmolLM2-135M-shaped
Llama (first `model_layers` blocks) after a `model_prompt_len`-token prompt, per kv_format (float, int8, int4,
PagedKV float/int4): the extra time of `model_new_tokens`+1 tokens over 1, as `experiments.ptq` measures it.

Every row runs its default implementation for this backend (CPU: the XLA / reference paths; GPU/TPU: the Pallas
kernels), is compared with its reference (relative RMS error) and timed with `common.time_side_by_side`.
`modeled bytes` are each op's cost model (the TPU kernel's HBM traffic); `packed bytes` what the cache stores
for the valid tokens. On CPU, times are XLA CPU times; a GPU/TPU row is only claimed when measured there.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flax import nnx

from efficient.attention import cache as cache_lib
from efficient.attention.paged import PagedKV
from efficient.models import llama
from efficient.quant import kv_cache
from experiments import common
from pallas_kernels import paged_decode as paged_op
from pallas_kernels import quant_decode as quant_op
from pallas_kernels.flash_attention import cost_decode, flash_decode

FORMATS = {"int8": 8, "int4": 4}


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.batch = 1
  config.num_heads = 9
  config.num_kv_heads = 3
  config.head_dim = 64
  config.cache_lens = "1024,4096"
  config.dtype = "auto"          # float32 on CPU, bfloat16 on GPU / TPU
  config.group_size = kv_cache.DEFAULT_GROUP_SIZE
  config.page_size = 32          # int8 pages need 32-token pages on TPU (uint8 sublane tile)
  config.open_tokens = 5         # valid length = S - open_tokens: the open group holds float keys
  config.repeats = 5
  config.model_layers = 4        # 0 skips part 2
  config.model_prompt_len = 512
  config.model_new_tokens = 32
  return config


def _dtype(config):
  if config.dtype == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(config.dtype)


def quantized_inputs(k, v, length: int, kv_format: str, group_size: int, dtype):
  """A `QuantizedKVCache` holding k/v [B, S, H_kv, D] as the cache stores them after `length` tokens: complete
  groups quantized, the open group's keys float in k_residual."""
  batch, max_len = k.shape[:2]
  layer = kv_cache.init_layer_cache(batch, max_len, k.shape[2], k.shape[3], kv_format=kv_format,
                                    group_size=group_size, dtype=dtype)
  complete = (length // group_size) * group_size
  keys = kv_cache.quantize_keys(jnp.pad(k, ((0, 0), (0, -max_len % group_size), (0, 0), (0, 0))), group_size,
                                kv_format)
  return layer.replace(k=keys, v=kv_cache.quantize_values(v, kv_format),
                       k_residual=k[:, complete:complete + group_size].astype(dtype) if complete < max_len
                       else layer.k_residual)


def paged_inputs(k, v, page_size: int, storage: str, rng):
  """A shuffled pool holding each sequence's tokens in pages, and its page table."""
  batch, max_len = k.shape[:2]
  pages_per_seq = -(-max_len // page_size)
  table = rng.permutation(batch * pages_per_seq).reshape(batch, pages_per_seq)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, pages_per_seq * page_size - max_len), (0, 0), (0, 0)))
  stored = cache_lib.token_format(storage).encode(pad(k), pad(v), k.dtype)
  order = np.argsort(table.reshape(-1))  # pool page p holds (sequence, page) table.flat[p]'s tokens
  pool = {name: x.reshape(batch * pages_per_seq, page_size, *x.shape[2:])[order] for name, x in stored.items()}
  return pool, jnp.asarray(table, jnp.int32)


def bench_length(config, max_len: int, dtype, rng) -> list[dict]:
  batch, heads, kv_heads, head_dim = config.batch, config.num_heads, config.num_kv_heads, config.head_dim
  q = jnp.asarray(rng.standard_normal((batch, heads, head_dim)), dtype)
  k = jnp.asarray(rng.standard_normal((batch, max_len, kv_heads, head_dim)), dtype)
  v = jnp.asarray(rng.standard_normal((batch, max_len, kv_heads, head_dim)), dtype)
  length = max_len - config.open_tokens
  lengths = jnp.full((batch,), length, jnp.int32)
  itemsize = jnp.dtype(dtype).itemsize
  rows = {}  # name -> (call, reference call, modeled bytes, packed bytes)
  float_bytes = 2 * batch * length * kv_heads * head_dim * itemsize
  rows["float"] = (jax.jit(lambda: flash_decode(q, k, v, lengths)),
                   jax.jit(lambda: flash_decode(q, k, v, lengths, implementation="reference")),
                   cost_decode(q.shape, k.shape, dtype=dtype, lengths=length)["hbm_bytes"], float_bytes)
  for fmt, bits in FORMATS.items():
    layer = quantized_inputs(k, v, length, fmt, config.group_size, dtype)
    arrays = quant_op.cache_arrays(layer)
    call = functools.partial(quant_op.quant_decode, q, *arrays, lengths, bits=bits)
    model = quant_op.cost(q.shape, layer.v.shape, group_size=config.group_size, bits=bits, dtype=dtype,
                          lengths=length)
    rows[fmt] = (jax.jit(call), jax.jit(functools.partial(call, implementation="reference")),
                 model["hbm_bytes"], model["packed_bytes"])
    rows[f"{fmt} dequantize-all"] = (rows[fmt][1], rows[fmt][1], None, model["packed_bytes"])
  for storage in ("float", "int8", "int4"):
    pool, table = paged_inputs(k, v, config.page_size, storage, rng)
    bits = FORMATS.get(storage)
    call = functools.partial(paged_op.paged_decode, q, pool, table, lengths, bits=bits)
    model = paged_op.cost(q.shape, (pool["k"].shape[0], config.page_size, kv_heads, head_dim), table.shape[1],
                          dtype=dtype, bits=bits, lengths=length)
    rows[f"paged {storage}"] = (jax.jit(call), jax.jit(functools.partial(call, implementation="reference")),
                                model["hbm_bytes"], model["ideal_bytes"])
  timings = common.time_side_by_side({name: row[0] for name, row in rows.items()}, repeats=config.repeats)
  float_s = timings["float"]["median_s"]
  results = []
  for name, (call, reference, modeled, packed) in rows.items():
    out = call()
    if not np.all(np.isfinite(np.asarray(out, np.float32))):
      raise FloatingPointError(f"{name}: non-finite decode output at S={max_len}.")
    seconds = timings[name]["median_s"]
    results.append({"cache_len": max_len, "row": name, "median_us": seconds * 1e6,
                    "vs_float": float_s / seconds, "error_vs_reference": common.relative_rms_error(out, reference()),
                    "modeled_bytes": modeled, "packed_bytes": packed,
                    "modeled_over_packed": None if modeled is None else modeled / packed})
  return results


def model_decode(config, dtype) -> list[dict]:
  """Greedy generate tokens/s per kv_format on a random SmolLM2-shaped model (part 2)."""
  max_len = config.model_prompt_len + config.model_new_tokens + 1
  model_config = llama.SMOLLM2_135M.replace(num_layers=config.model_layers, max_seq_len=max(max_len, 2048),
                                            compute_dtype=dtype)
  model = llama.Llama(model_config, rngs=nnx.Rngs(0))
  prompt = jax.random.randint(jax.random.key(1), (config.batch, config.model_prompt_len), 0,
                              model_config.vocab_size, dtype=jnp.int32)
  pages = -(-max_len // config.page_size) * config.batch
  formats = {"float": None, "int8": "int8", "int4": "int4",
             "paged float": PagedKV(page_size=config.page_size, num_pages=pages),
             "paged int4": PagedKV(page_size=config.page_size, num_pages=pages, storage="int4")}
  n = config.model_new_tokens
  calls = {(name, count): functools.partial(llama.generate, model, prompt, count, kv_format=fmt)
           for name, fmt in formats.items() for count in (1, n + 1)}
  reference_tokens = np.asarray(calls[("float", n + 1)]())
  timings = common.time_side_by_side(calls, repeats=config.repeats)
  rows = []
  for name in formats:
    per_token = (timings[(name, n + 1)]["median_s"] - timings[(name, 1)]["median_s"]) / n
    tokens = np.asarray(calls[(name, n + 1)]())
    rows.append({"kv_format": name, "tokens_per_s": config.batch / per_token if per_token > 0 else float("nan"),
                 "same_tokens_as_float": float(np.mean(tokens == reference_tokens))})
  float_rate = rows[0]["tokens_per_s"]
  for row in rows:
    row["vs_float"] = row["tokens_per_s"] / float_rate
  return rows


def claims(results, backend: str) -> list[common.Claim]:
  longest = max(r["cache_len"] for r in results)
  at = {r["row"]: r for r in results if r["cache_len"] == longest}
  out = []
  for fmt in FORMATS:
    ratio = at[f"{fmt} dequantize-all"]["median_us"] / at[fmt]["median_us"]
    out.append(common.Claim(
        f"{fmt} cache: dequantizing per chunk inside the online softmax beats dequantizing the whole cache",
        f"S={longest}: fused {at[fmt]['median_us']:.0f} us vs dequantize-all "
        f"{at[f'{fmt} dequantize-all']['median_us']:.0f} us ({ratio:.2f}x) on {backend}",
        "reproduced" if ratio > 1.0 else "not reproduced"))
    traffic = at[fmt]["modeled_over_packed"]
    out.append(common.Claim(f"{fmt} decode kernel moves <= 1.15x the packed cache bytes (modeled)",
                            f"modeled / packed = {traffic:.3f} at S={longest}",
                            "reproduced" if traffic <= 1.15 else "not reproduced"))
  speedups = {fmt: at[fmt]["vs_float"] for fmt in FORMATS}
  measured = ", ".join(f"{fmt} {s:.2f}x" for fmt, s in speedups.items())
  if backend == "cpu":
    verdict = "n/a on CPU (compute-bound here; the claim is about HBM-bound accelerators)"
  else:
    verdict = "reproduced" if min(speedups.values()) > 1.0 else "partly" if max(speedups.values()) > 1 else \
        "not reproduced"
  out.append(common.Claim("a quantized KV cache decodes faster than the float cache (fewer bytes per step)",
                          f"S={longest}, speed vs float flash_decode: {measured} ({backend})", verdict))
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  workdir = common.prepare_workdir(workdir)
  cache_lens = common.config_list(config, "cache_lens", int)
  for name in ("batch", "num_heads", "num_kv_heads", "head_dim", "group_size", "page_size", "repeats",
               "model_prompt_len", "model_new_tokens"):
    if int(config[name]) < 1:
      raise ValueError(f"config.{name}={config[name]!r} must be a positive int.")
  if not 0 <= config.open_tokens < config.group_size:
    raise ValueError(f"config.open_tokens={config.open_tokens!r} must be in [0, group_size).")
  if any(s <= config.open_tokens or s % config.group_size for s in cache_lens):
    raise ValueError(f"config.cache_lens={config.cache_lens!r}: each must be a multiple of group_size "
                     f"{config.group_size} above open_tokens.")
  dtype = _dtype(config)
  rng = np.random.default_rng(0)
  results = [r for s in cache_lens for r in bench_length(config, s, dtype, rng)]
  backend = jax.default_backend()
  model_rows = model_decode(config, dtype) if config.model_layers > 0 else []
  header = ("S", "row", "median us", "speed vs float", "rel err vs reference", "modeled bytes", "modeled/packed")
  table = [(r["cache_len"], r["row"], f"{r['median_us']:.1f}", f"{r['vs_float']:.2f}x",
            f"{r['error_vs_reference']:.1e}", "-" if r["modeled_bytes"] is None else r["modeled_bytes"],
            "-" if r["modeled_over_packed"] is None else f"{r['modeled_over_packed']:.3f}") for r in results]
  notes = (f"Backend {backend}, dtype {jnp.dtype(dtype).name}, B={config.batch}, H={config.num_heads}, "
           f"H_kv={config.num_kv_heads}, D={config.head_dim}, K groups of {config.group_size}, pages of "
           f"{config.page_size}; valid length S - {config.open_tokens}. Medians of {config.repeats} alternating "
           f"runs. 'modeled bytes' are the TPU kernels' HBM traffic models, not measurements.")
  tables = {"Decode step": (header, table)}
  if model_rows:
    tables[f"Greedy generate, SmolLM2 shape, {config.model_layers} blocks, random weights"] = (
        ("kv_format", "tokens/s", "vs float", "tokens equal to the float cache's"),
        [(r["kv_format"], f"{r['tokens_per_s']:.1f}", f"{r['vs_float']:.2f}x", f"{r['same_tokens_as_float']:.2f}")
         for r in model_rows])
  common.write_results(workdir, title=f"Decode attention over float, quantized and paged caches ({backend})",
                       config=config.to_dict(), results={"rows": results, "model_rows": model_rows},
                       claims=claims(results, backend), tables=tables, notes=notes,
                       plots=[_plot(workdir, results, backend)])
  return {"rows": results, "model_rows": model_rows}


def _plot(workdir, results, backend: str) -> str:
  """Median decode-step time of every row against the cache length (log-log): the fused and paged rows beside
  float flash_decode and the dequantize-all references."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name in dict.fromkeys(r["row"] for r in results):
    points = sorted((r["cache_len"], r["median_us"]) for r in results if r["row"] == name)
    style = "--" if "dequantize-all" in name else (":" if name.startswith("paged") else "-")
    ax.plot(*zip(*points), style, marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("cache length S (slots)")
  ax.set_ylabel(f"decode step, median us ({backend})")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  return common.save_figure(fig, workdir, "bench_decode.png")


if __name__ == "__main__":
  common.run_program(run, default_config(), "workdir/bench_decode")
