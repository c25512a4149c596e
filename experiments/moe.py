"""Mixture-of-Experts vs dense Llamas at equal active parameters, on the stdlib corpus (bytes).

    python -m experiments.moe --workdir=workdir/moe [--config.steps=600] [--config.num_experts=8]

Trains, on the same batches for the same steps: a dense Llama with MLP width F; an MoE Llama whose MLPs are
E experts of width F/k with top-k routing (so each token runs k * F/k = F hidden units: equal active MLP
parameters and FLOPs per token, plus a D x E router); and, unless --config.dense_total=False, a dense Llama
with MLP width E * F/k (equal TOTAL parameters, the MoE's upper reference). The MoE adds
load_balance_weight * (Switch load-balance loss) to its cross-entropy; unless --config.ablate_load_balance=False,
the same MoE is also trained with weight 0 ('moe_no_lb') to show what the loss does to routing. Reports validation loss / perplexity,
routing statistics (tokens per expert on validation, dropped fraction, the load-balance loss over training),
and, with >= 8 devices, the expert-parallel check: the trained MoE's loss gradient and logits on a
data:2,expert:4 mesh vs one device (run as a program, this module asks for 8 fake CPU devices).
Writes results.json, results.md and moe.png into --workdir.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from efficient import data, measure, sharding
from efficient.models import llama
from efficient.models import moe as moe_models
from efficient.sparse import moe
from efficient.train import TrainConfig, make_optimizer, masked_cross_entropy
from experiments import common

EP_MESH = "data:2,expert:4"


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Sized for a few minutes on a shared 2-core CPU.
  config.embed_dim = 64
  config.num_layers = 2
  config.num_heads = 4
  config.mlp_dim = 128          # dense width F; each expert gets F / top_k
  config.num_experts = 8
  config.top_k = 2
  config.capacity_factor = 1.25
  config.drop_overflow = True
  config.load_balance_weight = 0.01
  config.router_z_weight = 0.0
  config.steps = 300
  config.batch_size = 8
  config.seq_len = 64
  config.learning_rate = 3e-3
  config.warmup_steps = 30
  config.log_every = 25
  config.eval_batches = 8
  config.dense_total = True     # also train the dense model with the MoE's total parameters
  config.ablate_load_balance = True  # also train the MoE with load_balance_weight = 0 ('moe_no_lb')
  config.seed = 0
  return config


def configs(config) -> tuple[llama.LlamaConfig, moe.MoEConfig]:
  if config.mlp_dim % config.top_k:
    raise ValueError(f"--config.mlp_dim={config.mlp_dim} must be a multiple of --config.top_k={config.top_k} "
                     f"(experts of width mlp_dim / top_k keep the active parameters equal).")
  if config.embed_dim % config.num_heads:
    raise ValueError(f"--config.embed_dim={config.embed_dim} must be a multiple of num_heads={config.num_heads}.")
  base = llama.LlamaConfig(vocab_size=256, embed_dim=config.embed_dim, num_layers=config.num_layers,
                           num_heads=config.num_heads, num_kv_heads=config.num_heads,
                           head_dim=config.embed_dim // config.num_heads, mlp_dim=config.mlp_dim,
                           max_seq_len=config.seq_len)
  moe_config = moe.MoEConfig(num_experts=config.num_experts, top_k=config.top_k,
                             capacity_factor=config.capacity_factor, drop_overflow=config.drop_overflow,
                             load_balance_weight=config.load_balance_weight,
                             router_z_weight=config.router_z_weight, expert_dim=config.mlp_dim // config.top_k)
  return base, moe_config


def build(name: str, config) -> nnx.Module:
  base, moe_config = configs(config)
  rngs = nnx.Rngs(config.seed)
  if name == "moe":
    return moe_models.moe_llama(base, moe_config, rngs=rngs)
  if name == "moe_no_lb":
    return moe_models.moe_llama(base, dataclasses.replace(moe_config, load_balance_weight=0.0), rngs=rngs)
  if name == "dense_total":
    return llama.Llama(base.replace(mlp_dim=moe_config.num_experts * moe_config.expert_dim), rngs=rngs)
  return llama.Llama(base, rngs=rngs)


def _device_batch(batch: dict) -> dict:
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _layer_stats(aux: dict) -> dict:
  """Routing statistics averaged over layers (tokens_per_expert summed)."""
  layers = list(aux["layers"].values())
  if not layers:
    return {}
  mean = lambda name: float(np.mean([float(s[name]) for s in layers]))
  return {"load_balance_loss": mean("load_balance_loss"), "router_z_loss": mean("router_z_loss"),
          "dropped_fraction": mean("dropped_fraction"),
          "tokens_per_expert": np.sum([np.asarray(s["tokens_per_expert"]) for s in layers], axis=0).tolist()}


def train_one(name: str, config, dataset, validation) -> dict:
  """Trains one model with cross-entropy + (MoE) auxiliary loss; returns its numbers."""
  model = build(name, config)
  train_config = TrainConfig(learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
                             total_steps=config.steps)
  optimizer = make_optimizer(train_config)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = optimizer.init(params)

  def loss_fn(params, batch):
    return moe.batch_loss_with_aux(nnx.merge(graphdef, params, rest), batch)

  @jax.jit
  def step(params, opt_state, batch):
    (loss, (ce, _, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, ce, aux

  history = []
  started = time.perf_counter()
  for i in range(config.steps):
    params, opt_state, ce, aux = step(params, opt_state, _device_batch(dataset.batch(i)))
    if (i + 1) % config.log_every == 0 or i + 1 == config.steps:
      history.append({"step": i + 1, "loss": float(ce), **_layer_stats(aux)})
      print(f"  {name} step {i + 1}: loss {float(ce):.3f}", flush=True)
  train_seconds = time.perf_counter() - started

  evaluate = jax.jit(loss_fn)
  total, tokens, routing = 0.0, 0.0, []
  for i in range(config.eval_batches):
    _, (ce, count, aux) = evaluate(params, _device_batch(validation.batch(i)))
    total, tokens = total + float(ce) * float(count), tokens + float(count)
    routing.append(_layer_stats(aux))
  model = nnx.merge(graphdef, params, rest)
  loss = total / tokens
  result = {"validation_loss": loss, "validation_perplexity": float(np.exp(loss)), "history": history,
            "train_seconds": train_seconds, "seconds_per_step": train_seconds / config.steps,
            "parameters": measure.parameter_count(model), "model": model}
  if routing and routing[0]:
    result["validation_routing"] = {
        "tokens_per_expert": np.sum([r["tokens_per_expert"] for r in routing], axis=0).tolist(),
        "dropped_fraction": float(np.mean([r["dropped_fraction"] for r in routing])),
        "load_balance_loss": float(np.mean([r["load_balance_loss"] for r in routing]))}
  return result


def expert_parallel_check(model: nnx.Module, config, batch: dict) -> dict:
  """max |Δ| of logits, loss and every loss gradient between a data:2,expert:4 mesh and one device."""
  if jax.device_count() < 8:
    return {"skipped": f"needs 8 devices, have {jax.device_count()} (run as a program, or under pytest)"}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, batch):  # the training loss (cross-entropy + aux), returning the logits too
    with moe.capture_routing() as routing:
      logits = nnx.merge(graphdef, params, rest)(batch["tokens"], positions=batch["positions"],
                                                 segment_ids=batch["segment_ids"])
    ce = masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]
    return ce + moe.moe_aux_loss(routing)["loss"], logits

  run = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  batch = _device_batch(batch)
  one_device = jax.device_put((params, batch), jax.devices()[0])
  (loss, logits), grads = run(*one_device)
  mesh = sharding.make_mesh(EP_MESH)
  replicated = sharding.shard_model(model, mesh, "ep")
  _, sharded_params, _ = nnx.split(model, nnx.Param, ...)
  placed = {k: jax.device_put(v, sharding.batch_sharding(mesh, "ep")) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    (sharded_loss, sharded_logits), sharded_grads = run(sharded_params, placed)
  gate = model.blocks[0].mlp.gate[...]
  diff = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
  grad_diffs = jax.tree.leaves(jax.tree.map(lambda a, b: diff(a, b), grads, sharded_grads))
  return {"mesh": EP_MESH, "devices": len(sharded_logits.sharding.device_set), "replicated": replicated,
          "expert_shard_shape": list(gate.sharding.shard_shape(gate.shape)), "expert_shape": list(gate.shape),
          "max_abs_logits": diff(logits, sharded_logits), "abs_loss": diff(loss, sharded_loss),
          "max_abs_grad": max(grad_diffs), "max_abs_grad_scale": max(float(jnp.max(jnp.abs(g)))
                                                                     for g in jax.tree.leaves(grads))}


def plot(workdir: str, results: dict) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for i, (name, r) in enumerate(results.items()):
    axes[0].plot([h["step"] for h in r["history"]], [h["loss"] for h in r["history"]], color=f"C{i}",
                 label=f"{name} (val {r['validation_loss']:.3f})")
  axes[0].set(xlabel="step", ylabel="train cross-entropy (nats/byte)", title="training loss")
  axes[0].legend(fontsize=8)
  history = results["moe"]["history"]
  axes[1].plot([h["step"] for h in history], [h["load_balance_loss"] for h in history], label="load-balance loss")
  axes[1].plot([h["step"] for h in history], [h["dropped_fraction"] for h in history], label="dropped fraction")
  if "moe_no_lb" in results:
    off = results["moe_no_lb"]["history"]
    axes[1].plot([h["step"] for h in off], [h["load_balance_loss"] for h in off], "C0--",
                 label="LB loss, weight 0 (ablation)")
    axes[1].plot([h["step"] for h in off], [h["dropped_fraction"] for h in off], "C1--",
                 label="dropped, weight 0 (ablation)")
  axes[1].axhline(1.0, color="gray", linestyle=":", label="uniform routing (LB = 1)")
  axes[1].set(xlabel="step", title="MoE routing during training (mean over layers)")
  axes[1].legend(fontsize=8)
  counts = results["moe"]["validation_routing"]["tokens_per_expert"]
  axes[2].bar(range(len(counts)), counts)
  axes[2].axhline(np.mean(counts), color="gray", linestyle=":", label="uniform")
  axes[2].set(xlabel="expert", ylabel="(token, choice) pairs kept", title="validation tokens per expert "
              "(all layers)")
  axes[2].legend(fontsize=8)
  for ax in axes:
    ax.grid(alpha=0.3)
  return common.save_figure(fig, workdir, "moe.png")


def _balance(routing: dict) -> dict:
  counts = np.asarray(routing["tokens_per_expert"], float)
  return {"load_balance_loss": routing["load_balance_loss"], "dropped_fraction": routing["dropped_fraction"],
          "imbalance": counts.max() / counts.mean(), "idlest": counts.min() / counts.mean()}


def claims_for(results: dict, ep: dict, config) -> list[common.Claim]:
  dense, sparse = results["dense"], results["moe"]
  delta = sparse["validation_loss"] - dense["validation_loss"]
  claims = [common.Claim(
      "Switch Transformer / MoE: at equal active parameters (equal FLOPs per token) an MoE model reaches lower "
      "loss than the dense model",
      f"validation loss MoE {sparse['validation_loss']:.4f} (ppl {sparse['validation_perplexity']:.3f}) vs dense "
      f"{dense['validation_loss']:.4f} (ppl {dense['validation_perplexity']:.3f}): Δ {delta:+.4f} nats after "
      f"{config.steps} steps, one seed",
      "reproduced (one seed, tiny scale)" if delta < 0 else "not reproduced at this scale (one seed)")]
  if "dense_total" in results:
    total = results["dense_total"]
    claims.append(common.Claim(
        "An MoE does not beat a dense model with its total parameter count (Switch: the dense model of equal "
        "parameters is the stronger but E/k times costlier reference)",
        f"dense with equal total parameters {total['validation_loss']:.4f} vs MoE {sparse['validation_loss']:.4f}",
        "consistent" if total["validation_loss"] <= sparse["validation_loss"] else
        "not observed (MoE beat the equal-total dense model here)"))
  balance = {name: _balance(results[name]["validation_routing"]) for name in ("moe", "moe_no_lb")
             if name in results}
  describe = lambda b: (f"LB loss {b['load_balance_loss']:.3f}, busiest expert {b['imbalance']:.2f}x the mean "
                        f"(idlest {b['idlest']:.2f}x), {100 * b['dropped_fraction']:.2f}% of (token, choice) pairs "
                        f"dropped")
  measured = f"weight {config.load_balance_weight}: {describe(balance['moe'])}"
  if "moe_no_lb" in balance:
    on, off = balance["moe"], balance["moe_no_lb"]
    measured += f"; weight 0: {describe(off)}"
    better = on["imbalance"] < off["imbalance"] and on["dropped_fraction"] < off["dropped_fraction"]
    verdict = ("reproduced" if better and on["imbalance"] < 1.25 else
               "partly (more balanced than without it, not even)" if better else "not reproduced")
  else:
    verdict = "n/a without the ablation (--config.ablate_load_balance)"
  claims.append(common.Claim(
      "Switch/GShard: the load-balancing loss keeps routing balanced (LB loss → 1, busiest expert near the mean, "
      f"few pairs dropped at capacity factor {config.capacity_factor}) where an unregularized router collapses",
      measured + " (validation)", verdict))
  if "skipped" in ep:
    claims.append(common.Claim("Expert-parallel forward equals the single-device forward", ep["skipped"], "n/a"))
  else:
    ok = ep["max_abs_logits"] < 1e-4 and ep["max_abs_grad"] < 1e-4 * max(ep["max_abs_grad_scale"], 1.0)
    claims.append(common.Claim(
        f"Expert-parallel ({ep['mesh']}, experts split {ep['expert_shape'][0]} → {ep['expert_shard_shape'][0]} "
        "per device) forward and gradient equal the single-device ones",
        f"max |Δ logits| {ep['max_abs_logits']:.2e}, |Δ loss| {ep['abs_loss']:.2e}, max |Δ grad| "
        f"{ep['max_abs_grad']:.2e} (largest gradient {ep['max_abs_grad_scale']:.2e})",
        "reproduced" if ok else "not reproduced"))
  return claims


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  workdir = common.prepare_workdir(workdir)
  base, moe_config = configs(config)
  dataset = data.stdlib_dataset("train", batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed)
  validation = data.stdlib_dataset("validation", batch_size=config.batch_size, seq_len=config.seq_len,
                                   shuffle=False)
  names = (["dense", "moe"] + (["moe_no_lb"] if config.ablate_load_balance else [])
           + (["dense_total"] if config.dense_total else []))
  mlp = {"dense": moe_models.active_and_total_mlp_parameters(base, None),
         "moe": moe_models.active_and_total_mlp_parameters(base, moe_config),
         "moe_no_lb": moe_models.active_and_total_mlp_parameters(base, moe_config),
         "dense_total": moe_models.active_and_total_mlp_parameters(
             base.replace(mlp_dim=moe_config.num_experts * moe_config.expert_dim), None)}
  results = {}
  started = time.perf_counter()
  for name in common.progress(names, desc="moe", unit="model"):
    print(f"{name}: {config.steps} steps", flush=True)
    results[name] = train_one(name, config, dataset, validation)
    results[name]["mlp_parameters_per_layer"] = mlp[name]
    print(f"  validation loss {results[name]['validation_loss']:.4f} "
          f"({results[name]['train_seconds']:.0f} s)", flush=True)
  ep = expert_parallel_check(results["moe"]["model"], config, validation.batch(0))
  wall = time.perf_counter() - started
  for r in results.values():
    del r["model"]
  plot_path = plot(workdir, results)
  claims = claims_for(results, ep, config)
  rows = [(name, f"{r['parameters']:,}", f"{r['mlp_parameters_per_layer']['active']:,}",
           f"{r['mlp_parameters_per_layer']['total']:,}", f"{r['validation_loss']:.4f}",
           f"{r['validation_perplexity']:.3f}", f"{r['history'][-1]['loss']:.4f}", f"{r['seconds_per_step']:.3f}")
          for name, r in results.items()]
  routing = results["moe"]["validation_routing"]
  notes = (f"Byte-level stdlib corpus, {config.steps} steps of batch {config.batch_size} x {config.seq_len} "
           f"(lr {config.learning_rate}, AdamW), d {config.embed_dim}, {config.num_layers} layers, dense MLP "
           f"width {config.mlp_dim}; MoE: {config.num_experts} experts of width {moe_config.expert_dim}, top-"
           f"{config.top_k}, capacity factor {config.capacity_factor} (drop_overflow={config.drop_overflow}), "
           f"load-balance weight {config.load_balance_weight}; validation on {config.eval_batches} batches. "
           f"Validation tokens per expert (pairs kept, all layers): {routing['tokens_per_expert']}. "
           f"Total wall {wall:.0f} s.\n\n"
           "CPU time is not FLOPs: the MoE's experts run through pallas_kernels.grouped_matmul's XLA path "
           "(jax.lax.ragged_dot), which XLA:CPU executes as a dense product per group (E times the FLOPs of the "
           "routed rows), so its s/step here says nothing about an accelerator's grouped matmul.")
  common.write_results(workdir, title="Mixture-of-Experts vs dense Llama at equal active parameters",
                       config=config.to_dict(), claims=claims, plots=[plot_path], notes=notes,
                       results={"models": results, "expert_parallel": ep, "wall_seconds": wall,
                                "corpus": data.corpus_info()},
                       tables={"Models": (("model", "parameters", "active MLP params/layer",
                                           "total MLP params/layer", "validation loss", "validation ppl",
                                           "final train loss", "s/step (CPU)"), rows)})
  print(f"wrote {workdir}/results.md ({wall:.0f} s)", flush=True)
  return {"models": results, "expert_parallel": ep, "claims": claims, "wall_seconds": wall}


if __name__ == "__main__":
  # The expert-parallel check needs 8 devices: fake CPU ones, set before jax initializes its backends.
  jax.config.update("jax_num_cpu_devices", 8)
  common.run_program(run, default_config(), "workdir/moe")
