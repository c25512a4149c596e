"""Sparse-IFT's claim at tiny scale: at equal FLOPs, a wider sparse MLP beats the dense one.

    python -m experiments.sparse_iso_flop --workdir=workdir/sparse_iso_flop [--config.steps=300]
        [--config.seeds=0,1,2] [--config.widths=1,2,4] [--config.methods=static,rigl]

Tiny Llamas (byte vocabulary, d = embed_dim) trained from scratch on the stdlib corpus. Only the MLP projections
(gate, up, down of every block) are sparsified; attention, embeddings and norms stay dense and identical. A model of
width factor w has MLP width w * mlp_dim with every MLP matrix at density 1/w (sparsity 1 - 1/w), so its sparse
MLP FLOPs equal the dense model's. Masks are drawn uniformly at random per matrix at init (ERK gives every MLP
matrix the same density here: all have the same fan-in + fan-out over fan-in x fan-out), then either kept fixed
('static') or evolved by RigL (`efficient.sparse.training.sparse_updates(rigl_every=...)`). FLOPs are counted
per token: 2 x (density x size) for every projection matrix, 2 x d x vocab for the tied head, 4 x heads x head_dim
x (mean causal keys) for attention; a training step counts 3 x forward (backward = 2 x forward) x tokens.
Also prints the optimizer-state bytes of a PockEngine-style sparse update of SmolLM2-135M (shapes only).
Writes results.json, results.md and loss_vs_sparsity.png into --workdir.
"""
from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from efficient import calibration, data, measure, sparse, train
from efficient.models import llama
from efficient.sparse import training as sparse_training
from experiments import common

_MLP = r".*/mlp/(gate|up|down)"  # full match on the path


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Sized for ~6 minutes on a shared 2-core CPU (Sparse-IFT: ResNets / GPT-3 small at full training budgets).
  config.embed_dim = 64
  config.num_layers = 2
  config.num_heads = 4
  config.mlp_dim = 128          # h: the dense model's MLP width
  config.widths = "1,2,4"       # width factors w: MLP width w*h at density 1/w
  config.methods = "static,rigl"
  config.seeds = "0,1,2"
  config.steps = 200
  config.batch_size = 16
  config.seq_len = 64
  config.learning_rate = 3e-3
  config.warmup_steps = 20
  config.rigl_every = 20
  config.drop_fraction = 0.3
  config.rigl_end_fraction = 0.75  # RigL stops updating masks at this fraction of training
  config.eval_batches = 8
  # Sparse update of SmolLM2-135M (bytes from shapes only): in the last blocks, mlp/down whole and this fraction
  # of gate/up output channels train; everything else is frozen.
  config.sparse_update_blocks = 4
  config.sparse_update_channel_fraction = 0.25
  return config


def parse(config) -> tuple[list[int], list[str], list[int]]:
  widths, seeds = common.config_list(config, "widths", int), common.config_list(config, "seeds", int)
  if any(seed < 0 for seed in seeds):
    raise ValueError(f"--config.seeds={config.seeds!r} must be non-negative integers.")
  if any(w < 1 for w in widths) or 1 not in widths:
    raise ValueError(f"--config.widths={config.widths!r} must be positive and include 1 (the dense baseline).")
  methods = common.config_list(config, "methods")
  if any(m not in ("static", "rigl") for m in methods):
    raise ValueError(f"--config.methods={config.methods!r} must list 'static' and/or 'rigl'.")
  return widths, methods, seeds


def model_config(config, width: int) -> llama.LlamaConfig:
  heads = config.num_heads
  return llama.LlamaConfig(vocab_size=256, embed_dim=config.embed_dim, num_layers=config.num_layers,
                           num_heads=heads, num_kv_heads=heads, head_dim=config.embed_dim // heads,
                           mlp_dim=width * config.mlp_dim, max_seq_len=config.seq_len)


def random_masks(model, density: float, seed: int) -> dict[str, jax.Array]:
  """Kernel-shaped masks keeping exactly ceil(size * density) random entries of every MLP matrix."""
  key = jax.random.key(seed + 1000)
  masks = {}
  for path, module in calibration.einsum_modules(model, _MLP).items():
    key, sub = jax.random.split(key)
    scores = jax.random.uniform(sub, module.kernel[...].shape).reshape(-1, 1)
    masks[path] = sparse.unstructured_mask(scores, 1 - density).reshape(module.kernel[...].shape)
  return masks


def forward_flops_per_token(model_config: llama.LlamaConfig, densities: dict[str, float], seq_len: int) -> dict:
  """Modeled forward FLOPs per token: projections at their measured density, attention, tied head."""
  c = model_config
  model = nnx.eval_shape(lambda: llama.Llama(c, rngs=nnx.Rngs(0)))
  projections = {path: 2 * densities.get(path, 1.0) * float(np.prod(module.kernel.shape))
                 for path, module in calibration.einsum_modules(model).items()}
  mlp = sum(f for path, f in projections.items() if re.fullmatch(_MLP, path))
  attention = c.num_layers * 4 * c.num_heads * c.head_dim * (seq_len + 1) / 2  # scores + values, mean causal keys
  head = 2 * c.embed_dim * c.vocab_size
  total = sum(projections.values()) + attention + head
  return {"total": total, "sparsified_mlp": mlp, "dense_rest": total - mlp}


def _run_one(config, width, method, seed, step_for, validation_batches) -> dict:
  architecture = model_config(config, width)
  model = llama.Llama(architecture, rngs=nnx.Rngs(seed))
  density = 1.0 / width
  masks = random_masks(model, density, seed) if width > 1 else {}
  for path, mask in masks.items():  # the forward is a plain Einsum holding zeros where pruned (RigL needs it)
    module = calibration.get_module(model, path)
    module.kernel[...] = jnp.where(mask, module.kernel[...], 0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  step, optimizer = step_for(width, method, graphdef, params, masks)
  opt_state = optimizer.init(params)
  if masks:  # the compiled step is shared by seeds; the masks of this seed enter through the optimizer state
    opt_state = opt_state._replace(masks=sparse_training.masks_for(params, masks))
  dataset = data.stdlib_dataset("train", batch_size=config.batch_size, seq_len=config.seq_len, seed=seed)
  started = time.perf_counter()
  losses = []
  for i in range(config.steps):
    params, opt_state, loss = step(params, opt_state, rest, {k: jnp.asarray(v) for k, v in dataset.batch(i).items()})
    losses.append(loss)
  losses = [float(x) for x in losses]
  seconds = time.perf_counter() - started
  trained = nnx.merge(graphdef, params, rest)
  evaluation = train.evaluate(trained, validation_batches)
  densities, check = {}, {}
  for path, mask in masks.items():
    final = np.asarray(_leaf(opt_state.masks, path))
    kernel = np.asarray(calibration.get_module(trained, path).kernel[...])
    densities[path] = float(final.mean())
    check[path] = {"active_before": int(np.asarray(mask).sum()), "active_after": int(final.sum()),
                   "changed": int(np.sum((final > 0) != np.asarray(mask))),
                   "nonzero_outside_mask": int(np.sum(kernel[final == 0] != 0))}
  flops = forward_flops_per_token(architecture, densities, config.seq_len)
  tokens = config.steps * config.batch_size * config.seq_len
  return {"validation_loss": evaluation["loss"], "validation_perplexity": evaluation["perplexity"],
          "final_train_loss": float(np.mean(losses[-10:])), "train_seconds": seconds,
          "forward_flops_per_token": flops, "train_flops": 3 * flops["total"] * tokens,
          "mask_checks": check, "densities": densities}


def _leaf(tree, path: str):
  """The 'kernel' leaf of module `path` ('blocks/0/mlp/gate') in a params-structured state."""
  node = tree
  for part in path.split("/") + ["kernel"]:
    node = node[int(part) if part.isdigit() else part]
  return node[...] if isinstance(node, nnx.Variable) else node


def make_step_factory(config):
  """(width, method) -> (jitted step, optimizer), built once per model shape and method and reused by seeds."""
  train_config = train.TrainConfig(learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
                                   total_steps=config.steps, batch_size=config.batch_size, seq_len=config.seq_len)
  cache = {}

  def step_for(width, method, graphdef, params, masks):
    key = (width, method if width > 1 else "dense")
    if key in cache:
      return cache[key]
    optimizer = train.make_optimizer(train_config)
    if width > 1:
      rigl = dict(rigl_every=config.rigl_every, drop_fraction=config.drop_fraction,
                  rigl_end_step=int(config.rigl_end_fraction * config.steps)) if method == "rigl" else {}
      optimizer = sparse_training.sparse_updates(optimizer, sparse_training.masks_for(params, masks), **rigl)

    def step(params, opt_state, rest, batch):
      loss_fn = lambda p: train.batch_loss(nnx.merge(graphdef, p, rest), batch)[0]
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    cache[key] = (jax.jit(step, donate_argnums=(0, 1)), optimizer)
    return cache[key]

  return step_for


def sparse_update_bytes(blocks: int, channel_fraction: float, model_config=llama.SMOLLM2_135M) -> dict:
  """AdamW state bytes of full fine-tuning vs `sparse_training.sparse_update` of the last `blocks` blocks (mlp/down
  whole, the first channel_fraction of gate/up output channels), from the parameters' shapes (no weights)."""
  c = model_config
  if not 1 <= blocks <= c.num_layers or not 0 < channel_fraction <= 1:
    raise ValueError(f"sparse_update_blocks={blocks} must be in [1, {c.num_layers}] and "
                     f"sparse_update_channel_fraction={channel_fraction} in (0, 1].")
  _, params, _ = nnx.split(nnx.eval_shape(lambda: llama.Llama(c, rngs=nnx.Rngs(0))), nnx.Param, ...)
  channels = np.arange(max(1, int(channel_fraction * c.mlp_dim)))
  trainable = {}
  for layer in range(c.num_layers - blocks, c.num_layers):
    trainable |= {f"blocks/{layer}/mlp/down": None, f"blocks/{layer}/mlp/gate": channels,
                  f"blocks/{layer}/mlp/up": channels}
  adamw = train.make_optimizer(train.TrainConfig())
  full = measure.parameter_bytes(jax.eval_shape(adamw.init, params))["total"]
  sliced = jax.eval_shape(sparse_training.sparse_update(adamw, trainable).init, params)
  subset = jax.eval_shape(lambda p: sparse_training.trainable_subset(p, trainable), params)
  return {"parameters": measure.parameter_count(params), "trainable": measure.parameter_count(subset),
          "trainable_bytes": measure.parameter_bytes(subset)["total"], "full_adamw_state_bytes": full,
          "sparse_update_state_bytes": measure.parameter_bytes(sliced)["total"], "blocks": blocks,
          "channels": len(channels)}


def _summary(runs: list[dict]) -> dict:
  losses = np.asarray([r["validation_loss"] for r in runs])
  return {"validation_loss_mean": float(losses.mean()), "validation_loss_std": float(losses.std(ddof=1))
          if len(losses) > 1 else 0.0, "validation_perplexity_mean": float(np.mean(np.exp(losses))),
          "forward_flops_per_token": runs[0]["forward_flops_per_token"]["total"],
          "sparsified_mlp_flops_per_token": runs[0]["forward_flops_per_token"]["sparsified_mlp"],
          "train_flops": runs[0]["train_flops"], "seeds": len(runs)}


def verdict(dense: dict, other: dict) -> str:
  """Lower loss than dense by more than two standard errors of the difference: reproduced; higher: contradicted."""
  n = min(dense["seeds"], other["seeds"])
  gain = dense["validation_loss_mean"] - other["validation_loss_mean"]
  standard_error = np.sqrt((dense["validation_loss_std"] ** 2 + other["validation_loss_std"] ** 2) / max(n, 1))
  if n < 2:
    return "inconclusive (one seed)"
  if gain > 2 * standard_error:
    return "reproduced"
  if gain < -2 * standard_error:
    return "not reproduced (sparse wide is worse)"
  return "not reproduced (within noise)"


def _label(width: int, method: str) -> str:
  return "dense" if width == 1 else f"{width}x wide, {100 * (1 - 1 / width):.0f}% sparse, {method}"


def plot(workdir: str, summary: dict, widths, methods) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  dense = summary[_label(1, "")]
  ax.axhline(dense["validation_loss_mean"], color="gray", linestyle=":", label="dense (mean)")
  for i, method in enumerate(methods):
    xs = [0.0] + [1 - 1 / w for w in widths if w > 1]
    rows = [dense] + [summary[_label(w, method)] for w in widths if w > 1]
    ax.errorbar(np.asarray(xs) * 100 + 0.6 * i, [r["validation_loss_mean"] for r in rows],
                yerr=[r["validation_loss_std"] for r in rows], marker="o", capsize=4, color=f"C{i}",
                label=f"{method} masks (width 1/(1-sparsity) x h)")
  ax.set_xlabel("MLP sparsity (%) at equal FLOPs (MLP width grows as 1/density)")
  ax.set_ylabel("validation loss (nats/byte), mean ± std over seeds")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return common.save_figure(fig, workdir, "loss_vs_sparsity.png")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  workdir = common.prepare_workdir(workdir)
  widths, methods, seeds = parse(config)
  validation = data.stdlib_dataset("validation", batch_size=config.batch_size, seq_len=config.seq_len,
                                   shuffle=False)
  validation_batches = [validation.batch(s) for s in range(config.eval_batches)]
  step_for = make_step_factory(config)
  runs, summary = {}, {}
  started = time.perf_counter()
  runs_total = len(seeds) * sum(len(methods) if width > 1 else 1 for width in widths)
  bar = common.progress(total=runs_total, desc="sparse_iso_flop", unit="run")
  for width in sorted(widths):
    for method in (methods if width > 1 else [""]):
      label = _label(width, method)
      runs[label] = []
      for seed in seeds:
        result = _run_one(config, width, method, seed, step_for, validation_batches)
        runs[label].append(result)
        print(f"{label}, seed {seed}: validation loss {result['validation_loss']:.4f}, "
              f"{result['forward_flops_per_token']['total']:,.0f} FLOPs/token, {result['train_seconds']:.0f} s",
              flush=True)
        bar.update()
      summary[label] = _summary(runs[label])
  bar.close()
  wall = time.perf_counter() - started
  plot_path = plot(workdir, summary, sorted(widths), methods)
  dense = summary[_label(1, "")]
  flops = {label: s["forward_flops_per_token"] for label, s in summary.items()}
  flops_equal = max(flops.values()) - min(flops.values()) <= 1e-9 * max(flops.values())
  fmt = lambda s: f"{s['validation_loss_mean']:.4f} ± {s['validation_loss_std']:.4f}"
  claims = [common.Claim("Configs compared at equal FLOPs (sparse FLOPs = density x dense FLOPs)",
                         f"forward FLOPs/token: {', '.join(f'{k}: {v:,.0f}' for k, v in flops.items())}",
                         "equal by construction and by count" if flops_equal else "NOT equal")]
  for label, s in summary.items():
    if label != _label(1, ""):
      claims.append(common.Claim(f"Sparse-IFT: {label} beats dense at equal FLOPs",
                                 f"validation loss {fmt(s)} vs dense {fmt(dense)} ({len(seeds)} seeds)",
                                 verdict(dense, s)))
  update = sparse_update_bytes(config.sparse_update_blocks, config.sparse_update_channel_fraction)
  print(f"sparse update of SmolLM2-135M: AdamW state {update['sparse_update_state_bytes']:,} B vs "
        f"{update['full_adamw_state_bytes']:,} B for full fine-tuning", flush=True)
  moments_only = update["sparse_update_state_bytes"] - 2 * update["trainable_bytes"]  # step counters
  claims.append(common.Claim(
      "Sparse update (On-Device Training Under 256KB, PockEngine): optimizer state only for what trains",
      f"SmolLM2-135M, last {update['blocks']} blocks' mlp/down + {update['channels']} of {llama.SMOLLM2_135M.mlp_dim}"
      f" gate/up channels: {update['trainable']:,} of {update['parameters']:,} parameters train; AdamW state "
      f"{update['sparse_update_state_bytes']:,} B = 2 moments x {update['trainable_bytes']:,} B + {moments_only} B "
      f"of counters, vs {update['full_adamw_state_bytes']:,} B for full fine-tuning "
      f"({100 * update['sparse_update_state_bytes'] / update['full_adamw_state_bytes']:.1f}%)",
      "as designed (bytes of the state's own arrays, from shapes)"))
  rows = [(label, f"{s['validation_loss_mean']:.4f} ± {s['validation_loss_std']:.4f}",
           f"{s['validation_perplexity_mean']:.3f}", f"{s['forward_flops_per_token']:,.0f}",
           f"{s['sparsified_mlp_flops_per_token']:,.0f}", f"{s['train_flops']:.3e}",
           f"{np.mean([r['train_seconds'] for r in runs[label]]):.0f}") for label, s in summary.items()]
  notes = (f"Scale: TINY. d={config.embed_dim}, {config.num_layers} layers, {config.num_heads} heads, dense MLP "
           f"width h={config.mlp_dim}, byte vocabulary, {config.steps} steps of {config.batch_size} x "
           f"{config.seq_len} tokens, AdamW lr {config.learning_rate}; validation loss on {config.eval_batches} "
           f"fixed validation batches; seeds {seeds} (init, masks and data order). Sparsified: gate/up/down of "
           f"every block (attention, embeddings, norms dense). RigL every {config.rigl_every} steps, drop fraction "
           f"{config.drop_fraction} (cosine) until step {int(config.rigl_end_fraction * config.steps)}. FLOPs are "
           "modeled (the CPU runs the wide matrices densely, so wall time is not iso-FLOP); RigL's occasional dense "
           "gradient is not counted. Sparse-IFT's results are at ImageNet/GPT scale with full training budgets: "
           f"a verdict here says what happens at this tiny budget, nothing more. Total wall {wall:.0f} s.")
  results = {"summary": summary, "runs": runs, "flops_equal": flops_equal, "wall_seconds": wall,
             "sparse_update_smollm2": update,
             "corpus": data.corpus_info()}
  common.write_results(workdir, title="Sparse-IFT at tiny scale: wide sparse MLPs vs dense at equal FLOPs",
                       config=config.to_dict(), results=results, claims=claims, plots=[plot_path], notes=notes,
                       tables={"Validation loss at equal FLOPs": (
                           ("config", "val loss (mean ± std)", "val ppl (mean)", "fwd FLOPs/token",
                            "of which sparse MLP", "train FLOPs", "train s/seed"), rows)})
  print(f"wrote {workdir}/results.md ({wall:.0f} s)", flush=True)
  return results


if __name__ == "__main__":
  common.run_program(run, default_config(), "workdir/sparse_iso_flop")
