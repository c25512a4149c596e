"""Train a small Llama from scratch on the CPython stdlib corpus (bytes), with checkpoints and automatic resume.

    python -m experiments.train_lm --workdir=workdir/train_lm [--config.model=tiny] [--config.steps=300]
        [--mesh=data:2,fsdp:2,tensor:2 --config.sharding=fsdp_tp]
        [--config.optimizer=adamw|adam8bit|adam4bit|adam4bit_naive|adafactor|came|galore|apollo|apollo_mini|mezo]

Run it again with the same --workdir to continue from the latest checkpoint (parameters, optimizer state and
data position); a larger --config.steps extends the run (the cosine schedule is then the new run's). Writes metrics.jsonl, checkpoints/, results.json, results.md
and loss.png into --workdir.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from efficient import checkpointing, data, measure, sharding, train
from efficient.models import llama
from experiments import common

MODELS = {"tiny": llama.TINY, "small": llama.SMALL}


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = "tiny"        # one of MODELS; embed/layers overrides below change its size
  config.embed_dim = 0          # 0: the preset's value
  config.num_layers = 0
  config.steps = 300
  config.batch_size = 8
  config.seq_len = 256
  config.learning_rate = 3e-3
  config.warmup_steps = 30
  config.checkpoint_every = 100
  config.eval_batches = 4
  config.seed = 0
  config.sharding = "dp"        # rule preset used when --mesh is given
  config.optimizer = "adamw"    # one of efficient.optim.OPTIMIZERS; the fields below are read by some of them
  config.block_size = 0         # adam8bit / adam4bit(_naive) quantization block (0: 256 / 128)
  config.min_quantized_size = 4096  # low-bit: smaller params keep f32 state
  config.stable_embedding = False   # low-bit: embedding state in f32
  config.rank = 0               # galore (0: 128) / apollo (0: 256)
  config.update_proj_gap = 200  # galore / apollo projection refresh
  config.projection_scale = 0.0  # galore (0: 0.25) / apollo (0: 1) / apollo_mini (0: sqrt(128))
  config.mezo_eps = 1e-3
  config.skip_nonfinite_steps = False  # True: skip (and count) a non-finite update instead of stopping
  config.allow_config_change = False   # True: resume under other hyperparameters (logged to metrics.jsonl)
  return config


def model_config(config) -> llama.LlamaConfig:
  if config.model not in MODELS:
    raise ValueError(f"--config.model={config.model!r} is unknown; choose one of {sorted(MODELS)}.")
  model_config = MODELS[config.model].replace(max_seq_len=max(config.seq_len, MODELS[config.model].max_seq_len))
  if config.embed_dim:
    heads = model_config.num_heads
    if config.embed_dim % heads:
      raise ValueError(f"--config.embed_dim={config.embed_dim} must be a multiple of num_heads={heads}.")
    model_config = model_config.replace(embed_dim=config.embed_dim, head_dim=config.embed_dim // heads,
                                        mlp_dim=3 * config.embed_dim)
  if config.num_layers:
    model_config = model_config.replace(num_layers=config.num_layers)
  return model_config


def plot_loss(path: str, history: list[dict], eval_loss: float) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss")
  ax.axhline(eval_loss, color="C1", linestyle="--", label=f"validation loss {eval_loss:.3f}")
  ax.axhline(np.log(256), color="gray", linestyle=":", label="uniform over bytes (ln 256)")
  ax.set_xlabel("step")
  ax.set_ylabel("next-byte cross-entropy (nats)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str, mesh_spec: str = "") -> dict:
  common.check_finite_config(config)
  workdir = common.prepare_workdir(workdir)
  architecture = model_config(config)
  mesh = sharding.make_mesh(mesh_spec) if mesh_spec else None
  train_config = train.TrainConfig(
      learning_rate=config.learning_rate, warmup_steps=config.warmup_steps, total_steps=config.steps,
      batch_size=config.batch_size, seq_len=config.seq_len, checkpoint_every=config.checkpoint_every,
      skip_nonfinite_steps=config.skip_nonfinite_steps, optimizer=config.optimizer, block_size=config.block_size,
      min_quantized_size=config.min_quantized_size, stable_embedding=config.stable_embedding, rank=config.rank,
      update_proj_gap=config.update_proj_gap, projection_scale=config.projection_scale,
      optimizer_seed=config.seed, mezo_eps=config.mezo_eps)
  model = llama.Llama(architecture, rngs=nnx.Rngs(config.seed))
  dataset = data.stdlib_dataset("train", batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed)
  print(f"training {config.model} ({measure.parameter_count(model):,} parameters) for {config.steps} steps "
        f"with {config.optimizer} on {mesh_spec or 'one device'}", flush=True)
  started = time.perf_counter()
  outcome = train.train(model, dataset, train_config, workdir, mesh=mesh, rules=config.sharding,
                        allow_config_change=config.allow_config_change)
  wall = time.perf_counter() - started
  validation = data.stdlib_dataset("validation", batch_size=config.batch_size, seq_len=config.seq_len,
                                   shuffle=False)
  evaluation = train.evaluate(model, (validation.batch(s) for s in range(config.eval_batches)))
  with open(os.path.join(workdir, train.METRICS_FILE)) as f:
    history = [record for record in map(json.loads, f) if "loss" in record]  # not the config_change events
  plot_path = os.path.join(workdir, "loss.png")
  plot_loss(plot_path, history, evaluation["loss"])
  first_loss, last_loss = history[0]["loss"], history[-1]["loss"]
  results = {"model": architecture.to_dict(), "parameters": measure.parameter_count(model),
             "steps": outcome["step"],
             "wall_seconds_this_run": wall, "validation": evaluation, "history": history,
             "corpus": data.corpus_info(), "mesh": mesh_spec or None}
  claims = [common.Claim(
      "Training from scratch lowers next-byte loss below the uniform baseline ln 256 = 5.545",
      f"train loss {first_loss:.3f} (step {history[0]['step']}) -> {last_loss:.3f} (step {history[-1]['step']}); "
      f"validation {evaluation['loss']:.3f} nats, perplexity {evaluation['perplexity']:.2f}",
      "reproduced" if evaluation["loss"] < np.log(256) else "not reproduced")]
  common.write_results(workdir, title=f"Train a {config.model} Llama on the stdlib corpus", config=config.to_dict(),
                       results=results, claims=claims, plots=[plot_path],
                       tables={"Training": (("steps", "parameters", "final train loss", "validation loss",
                                             "validation ppl", "tokens/s (last log)"),
                                            [(outcome["step"], f"{results['parameters']:,}", f"{last_loss:.3f}",
                                              f"{evaluation['loss']:.3f}", f"{evaluation['perplexity']:.2f}",
                                              f"{history[-1]['tokens_per_sec']:.0f}")])})
  print(f"step {outcome['step']}: validation loss {evaluation['loss']:.3f} (ppl {evaluation['perplexity']:.2f}); "
        f"wrote {workdir}/results.md", flush=True)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MESH.value:
    # On a CPU host, give XLA as many (fake) CPU devices as the mesh needs; this only affects the CPU backend
    # and must happen before jax initializes it.
    jax.config.update("jax_num_cpu_devices", int(np.prod(list(sharding.parse_mesh(_MESH.value).values()))))
  try:
    run(_CONFIG.value, _WORKDIR.value, _MESH.value)
  except checkpointing.CheckpointSaveError:
    # orbax's abandoned background writes print a traceback each at interpreter shutdown, burying this one:
    # report it last and leave at once (metrics.jsonl is flushed, the workdir lock dies with the process).
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
  # Flags are defined only when run as a program, so tests can import several experiments in one process.
  _WORKDIR = flags.DEFINE_string("workdir", "workdir/train_lm", "Checkpoints, metrics.jsonl, results and plots.")
  _MESH = flags.DEFINE_string("mesh", "", "Mesh axes, e.g. 'data:2,fsdp:2,tensor:2' (empty: one device).")
  _CONFIG = config_flags.DEFINE_config_dict("config", default_config())
  app.run(main)
