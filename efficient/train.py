"""Training and evaluation of a causal LM on packed batches: AdamW with warmup + cosine, orbax checkpoints.

The jitted step is a pure function of the split model state (`nnx.split(model, nnx.Param, ...)`), so params and
optimizer state are explicit pytrees. Optimizer moments are built by `tx.init(params)` from the params' nnx
`Param` variables, so they carry the same logical axis names and `efficient.sharding.state_shardings` shards
them like their params. A run directory holds:

  WORKDIR/metrics.jsonl       one line per logged step: step, loss, lr, grad_norm, tokens_per_sec
  WORKDIR/checkpoints/<step>/ params, optimizer state (orbax) + meta JSON: step, data iterator state, model
                              config, parameter shapes, train config

`train(...)` resumes from the latest checkpoint in WORKDIR and refuses (ValueError naming the directory) one
written for a different model.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from efficient import sharding
from efficient.data.packing import BatchIterator, BatchSource

# Fields of a model config that change how a model runs, not what its parameters mean: a checkpoint may resume
# under another value (e.g. a TPU kernel on a TPU, the XLA path on a CPU).
EXECUTION_ONLY_CONFIG_FIELDS = ("norm_implementation",)
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  total_steps: int = 1000
  final_learning_rate_fraction: float = 0.1  # cosine decays to learning_rate * this at total_steps
  weight_decay: float = 0.1  # decoupled (AdamW), on matrices only: not on norm scales
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip_norm: float | None = 1.0  # global-norm clipping; None disables it
  batch_size: int = 8
  seq_len: int = 256
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  log_every: int = 10

  def __post_init__(self):
    for name in ("total_steps", "batch_size", "seq_len", "checkpoint_every", "keep_checkpoints", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if not 0 <= self.warmup_steps < self.total_steps:
      raise ValueError(f"TrainConfig.warmup_steps must be in [0, total_steps={self.total_steps}), "
                       f"got {self.warmup_steps}.")
    if self.learning_rate <= 0:
      raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}.")
    if not 0 <= self.final_learning_rate_fraction <= 1:
      raise ValueError(f"TrainConfig.final_learning_rate_fraction must be in [0, 1], "
                       f"got {self.final_learning_rate_fraction}.")
    if self.weight_decay < 0:
      raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}.")
    for name in ("b1", "b2"):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}.")
    if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
      raise ValueError(f"TrainConfig.grad_clip_norm must be > 0 or None, got {self.grad_clip_norm}.")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to its final fraction at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=config.total_steps, end_value=config.learning_rate * config.final_learning_rate_fraction)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (weight decay on parameters with >= 2 dims)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay, mask=decay_mask)
  if config.grad_clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)


def masked_cross_entropy(logits, targets, loss_mask):
  """(mean next-token cross-entropy over `loss_mask`, number of loss tokens); f32 throughout."""
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  mask = loss_mask.astype(jnp.float32)
  count = mask.sum()
  return (per_token * mask).sum() / jnp.maximum(count, 1.0), count


def batch_loss(model, batch: dict):
  """Forward a packed batch (segment ids keep documents apart, positions restart per chunk)."""
  logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
  return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])


@dataclasses.dataclass
class TrainState:
  """The split model and optimizer state a jitted step consumes (shardings are None without a mesh)."""
  graphdef: Any
  params: nnx.State
  rest: nnx.State
  opt_state: Any
  config: TrainConfig
  step: int = 0
  mesh: Mesh | None = None
  rules: sharding.Rules | None = None
  param_shardings: Any = None
  opt_shardings: Any = None
  batch_sharding: NamedSharding | None = None


def init_train_state(model: nnx.Module, config: TrainConfig, *, mesh: Mesh | None = None,
                     rules: str | sharding.Rules = "dp") -> TrainState:
  """Splits `model` and builds its optimizer state; with `mesh`, shards both by `rules` (model moved in place)."""
  optimizer = make_optimizer(config)
  if mesh is None:
    # Committed to one device, as restored checkpoints are, so a resumed run reuses the compiled step.
    device = jax.devices()[0]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = jax.device_put((params, rest), device)
    return TrainState(graphdef, params, rest, jax.device_put(optimizer.init(params), device), config)
  rules = sharding.rules_for(rules)
  sharding.shard_model(model, mesh, rules)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  param_shardings = sharding.state_shardings(params, mesh, rules)
  # Moments are `Param`s with their parameter's logical names, so the same rules place them.
  opt_state = optimizer.init(params)
  opt_shardings = sharding.state_shardings(opt_state, mesh, rules)
  opt_state = jax.device_put(opt_state, opt_shardings)
  return TrainState(graphdef, params, rest, opt_state, config, mesh=mesh, rules=rules,
                    param_shardings=param_shardings, opt_shardings=opt_shardings,
                    batch_sharding=sharding.batch_sharding(mesh, rules))


# (graphdef, config, mesh, rules) -> jitted step. A resumed or repeated run in the same process reuses the
# compiled step instead of tracing and compiling a new closure.
_STEP_CACHE: dict[tuple, Callable] = {}


def make_train_step(state: TrainState) -> Callable:
  """jit(params, opt_state, rest, batch, step) -> (params, opt_state, {'loss', 'grad_norm', 'lr', 'tokens'}).

  params and optimizer state are donated: the caller must use the returned ones.
  """
  key = (state.graphdef, state.config, state.mesh, state.rules)
  if key in _STEP_CACHE:
    return _STEP_CACHE[key]
  graphdef, optimizer, schedule = state.graphdef, make_optimizer(state.config), learning_rate_schedule(state.config)

  def loss_fn(params, rest, batch):
    return batch_loss(nnx.merge(graphdef, params, rest), batch)

  def step_fn(params, opt_state, rest, batch, step):
    (loss, tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(step), "tokens": tokens}
    return params, opt_state, metrics

  out_shardings = None
  if state.mesh is not None:
    out_shardings = (state.param_shardings, state.opt_shardings, NamedSharding(state.mesh, PartitionSpec()))
  _STEP_CACHE[key] = jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=out_shardings)
  return _STEP_CACHE[key]


def place_batch(batch: dict, state: TrainState) -> dict:
  """Device arrays of a numpy batch, split along batch by the mesh rules when the state is sharded."""
  if state.batch_sharding is None:
    return {key: jnp.asarray(value) for key, value in batch.items()}
  return {key: jax.device_put(value, state.batch_sharding) for key, value in batch.items()}


def apply_train_step(state: TrainState, step_fn: Callable, batch: dict) -> dict:
  """Runs one update in place on `state`; returns the step's metrics as device scalars."""
  state.params, state.opt_state, metrics = step_fn(state.params, state.opt_state, state.rest,
                                                    place_batch(batch, state), state.step)
  state.step += 1
  return metrics


@functools.partial(jax.jit, static_argnames="graphdef")
def _eval_sums(state, batch, *, graphdef):
  loss, tokens = batch_loss(nnx.merge(graphdef, state), batch)
  return loss * tokens, tokens


def evaluate(model: nnx.Module, batches: Iterable[dict]) -> dict[str, float]:
  """Token-weighted mean loss over `batches`, its perplexity, and the number of loss tokens."""
  graphdef, state = nnx.split(model)
  total_loss, total_tokens = 0.0, 0.0
  for batch in batches:
    loss_sum, tokens = _eval_sums(state, {k: jnp.asarray(v) for k, v in batch.items()}, graphdef=graphdef)
    total_loss += float(loss_sum)
    total_tokens += float(tokens)
  if total_tokens == 0:
    raise ValueError("batches hold no loss tokens (every loss_mask is zero, or there were no batches).")
  loss = total_loss / total_tokens
  return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": int(total_tokens)}


# --- checkpoints ----------------------------------------------------------------------------------------------

def model_signature(model: nnx.Module) -> dict:
  """What must match for a checkpoint to belong to `model`: its config (if any) and its parameter shapes."""
  config = getattr(model, "config", None)
  config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
  for field in EXECUTION_ONLY_CONFIG_FIELDS:
    config_dict.pop(field, None)
  shapes = {"/".join(map(str, path)): [list(variable.shape), jnp.dtype(variable.dtype).name]
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  return json.loads(json.dumps({"model_config": config_dict, "param_shapes": shapes}, default=str))


def _signature_differences(saved: dict, current: dict) -> list[str]:
  differences = []
  for section in ("model_config", "param_shapes"):
    old, new = saved.get(section, {}), current[section]
    for key in sorted(set(old) | set(new)):
      if old.get(key) != new.get(key):
        differences.append(f"{section}.{key}: checkpoint {old.get(key)!r} vs model {new.get(key)!r}")
  return differences


def checkpoint_manager(workdir: str | Path, config: TrainConfig) -> ocp.CheckpointManager:
  directory = Path(workdir).absolute() / CHECKPOINT_DIR
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(directory, options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, iterator: BatchIterator, meta: dict):
  tree = {"params": state.params, "opt_state": state.opt_state}
  meta = dict(meta, step=state.step, data_state=iterator.state)
  manager.save(state.step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                   meta=ocp.args.JsonSave(meta)), force=True)


def restore_checkpoint(manager: ocp.CheckpointManager, state: TrainState, signature: dict) -> dict | None:
  """Loads the latest checkpoint into `state` (onto its shardings); returns its meta, or None when none exist."""
  step = manager.latest_step()
  if step is None:
    return None
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  differences = _signature_differences(meta, signature)
  if differences:
    raise ValueError(f"checkpoint directory {manager.directory} holds step {step} of a different model; use "
                     f"another workdir or the same model config. Differences: " + "; ".join(differences))
  target = {"params": state.params, "opt_state": state.opt_state}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
  state.params, state.opt_state, state.step = restored["params"], restored["opt_state"], int(meta["step"])
  return meta


def _truncate_metrics(path: Path, after_step: int) -> None:
  """Drops log lines past the resumed step (they were written after the last checkpoint)."""
  if path.exists():
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in lines))


# --- the loop -------------------------------------------------------------------------------------------------

def train(model: nnx.Module, data: BatchSource, config: TrainConfig, workdir: str | Path, *,
          mesh: Mesh | None = None, rules: str | sharding.Rules = "dp", until_step: int | None = None,
          progress: bool = True) -> dict[str, Any]:
  """Trains `model` in place on `data.batch(step)` up to `until_step` (default `config.total_steps`).

  Resumes from the latest checkpoint under `workdir` (params, optimizer state, step, data iterator state);
  saves every `checkpoint_every` steps and at the end; appends to `workdir/metrics.jsonl` every `log_every`
  steps. Returns {'step', 'history'} where history holds this call's logged metric dicts.
  """
  until_step = config.total_steps if until_step is None else until_step
  if not 0 <= until_step <= config.total_steps:
    raise ValueError(f"until_step must be in [0, total_steps={config.total_steps}], got {until_step}.")
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  state = init_train_state(model, config, mesh=mesh, rules=rules)
  signature = model_signature(model)
  iterator = BatchIterator(data)
  metrics_path = workdir / METRICS_FILE
  history: list[dict] = []
  with checkpoint_manager(workdir, config) as manager:
    meta = restore_checkpoint(manager, state, signature)
    if meta is not None:
      iterator.restore(meta["data_state"])
    _truncate_metrics(metrics_path, state.step)  # a fresh start (step 0) clears a crashed run's log
    step_fn = make_train_step(state)
    meta = dict(signature, train_config=config.to_dict())
    bar = tqdm(total=until_step, initial=state.step, desc="train", disable=not progress, dynamic_ncols=True)
    last_time, last_step = time.perf_counter(), state.step
    while state.step < until_step:
      if iterator.step != state.step:
        raise ValueError(f"data iterator at step {iterator.step} but the model at step {state.step}.")
      batch = next(iterator)
      if batch["tokens"].shape != (config.batch_size, config.seq_len):
        raise ValueError(f"data gives batches of shape {batch['tokens'].shape} but TrainConfig says "
                         f"(batch_size, seq_len) = {(config.batch_size, config.seq_len)}.")
      metrics = apply_train_step(state, step_fn, batch)
      bar.update(1)
      if state.step % config.log_every == 0 or state.step == until_step:
        now = time.perf_counter()  # the first interval includes compilation
        record = {"step": state.step, **{k: float(metrics[k]) for k in ("loss", "lr", "grad_norm")},
                  "tokens_per_sec": (state.step - last_step) * batch["tokens"].size / (now - last_time)}
        last_time, last_step = now, state.step
        history.append(record)
        with metrics_path.open("a") as f:
          f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
      if state.step % config.checkpoint_every == 0 or state.step == until_step:
        save_checkpoint(manager, state, iterator, meta)
    bar.close()
    manager.wait_until_finished()
  nnx.update(model, state.params, state.rest)
  return {"step": state.step, "history": history}
