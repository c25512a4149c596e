"""Training and evaluation of a causal LM on packed batches: any optimizer by name, warmup + cosine, orbax
checkpoints.

The jitted step is a pure function of the split model state (`nnx.split(model, nnx.Param, ...)`), so params and
optimizer state are explicit pytrees. `TrainConfig.optimizer` names the optimizer (`efficient.optim.OPTIMIZERS`:
AdamW, 8-/4-bit Adam, Adafactor, CAME, GaLore, APOLLO(-Mini), or MeZO's zeroth-order step); its state is built by
`efficient.optim.axes.named(tx).init(params)`, so every state leaf (moments, codes, block scales, factored
rows/columns, projections) carries logical axis names derived from its param's and
`efficient.sharding.state_shardings` shards it with its param. A run directory holds:

  WORKDIR/metrics.jsonl       one line per logged step: step, loss, lr, grad_norm, tokens_per_sec
  WORKDIR/checkpoints/<step>/ params, optimizer state (orbax) + meta JSON: step, data iterator state, model
                              config, parameter shapes, train config; + integrity.json (`efficient.checkpointing`)
  WORKDIR/.lock               held while a process trains in WORKDIR (a second one is refused, naming the pid)

`train(...)` resumes from the newest checkpoint in WORKDIR that verifies (skipping corrupt ones with a warning),
refuses (ValueError naming the directory) one written for a different model, and one written under other
training hyperparameters (`RESUME_FIXED_FIELDS`) unless `allow_config_change=True`. A non-finite loss, gradient
norm or update is never applied: the run stops naming the step (or, with `skip_nonfinite_steps`, skips the
update and counts it); a failed checkpoint save stops the run at once.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from efficient import nn, sharding
from efficient.optim import axes as optim_axes
from efficient.optim import registry as optim_registry
from efficient.optim import zeroth_order
from efficient.checkpointing import CHECKPOINT_DIR, METRICS_FILE, Checkpoints, WorkdirLock, signature_differences
from efficient.checkpointing import truncate_metrics
from efficient.data.packing import BatchIterator, BatchSource

# Fields of a model config that change how a model runs, not what its parameters mean: a checkpoint may resume
# under another value (e.g. a TPU kernel on a TPU, the XLA path on a CPU).
EXECUTION_ONLY_CONFIG_FIELDS = ("norm_implementation", "remat")  # remat: same numbers, other memory/time
# TrainConfig fields a resumed run must share with its checkpoint (others -- total_steps extends a run, the
# checkpoint and log cadence, skip_nonfinite_steps -- may change freely).
RESUME_FIXED_FIELDS = ("learning_rate", "warmup_steps", "final_learning_rate_fraction", "weight_decay", "b1", "b2",
                       "eps", "grad_clip_norm", "batch_size", "seq_len", "optimizer", "block_size",
                       "min_quantized_size", "stable_embedding", "rank", "update_proj_gap", "projection_scale",
                       "optimizer_seed", "mezo_eps", "trainable", "freeze")
_INT_FIELDS = ("warmup_steps", "total_steps", "batch_size", "seq_len", "checkpoint_every", "keep_checkpoints",
               "log_every", "block_size", "min_quantized_size", "rank", "update_proj_gap", "optimizer_seed")
_BOOL_FIELDS = ("skip_nonfinite_steps", "stable_embedding")
_STR_FIELDS = ("optimizer", "trainable", "freeze")
# What the optimizer trains: every nnx.Param, or only PEFT adapters (`efficient.nn.Adapter`, frozen base).
TRAINABLE = ("all", "adapters")


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
  skip_nonfinite_steps: bool = False  # True: skip (and count) a non-finite update instead of stopping the run
  # The optimizer (efficient.optim.OPTIMIZERS) and what its method reads (registry.READS); 0 = method default.
  optimizer: str = "adamw"
  block_size: int = 0            # adam8bit / adam4bit(_naive): quantization block (0: 256 / 128)
  min_quantized_size: int = 4096  # low-bit: params with fewer elements keep f32 state
  stable_embedding: bool = False  # low-bit: embedding state in f32
  rank: int = 0                  # galore (0: 128) / apollo (0: 256) projection rank
  update_proj_gap: int = 200     # galore / apollo: steps between projection refreshes
  projection_scale: float = 0.0  # galore (0: 0.25) / apollo (0: 1) / apollo_mini (0: sqrt(128))
  optimizer_seed: int = 0        # apollo's random projections, mezo's perturbations
  mezo_eps: float = 1e-3         # mezo's perturbation scale
  # What is trained (TRAINABLE): 'all' params, or 'adapters' only (efficient.peft; the base stays frozen).
  trainable: str = "all"
  # A regex: parameters whose path ('blocks/0/mlp/up/kernel') it matches in full are frozen as well -- not
  # trained, no optimizer state (e.g. r"blocks/(0|1)/.*" freezes the first two blocks). '' freezes nothing.
  freeze: str = ""

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name in _STR_FIELDS:
        if not isinstance(value, str):
          raise ValueError(f"TrainConfig.{field.name} must be a string, got {value!r}.")
        if field.name == "optimizer" and value not in optim_registry.OPTIMIZERS:
          raise ValueError(f"TrainConfig.optimizer={value!r} is unknown; choose one of "
                           f"{optim_registry.OPTIMIZERS}.")
        if field.name == "trainable" and value not in TRAINABLE:
          raise ValueError(f"TrainConfig.trainable={value!r} is unknown; choose one of {TRAINABLE}.")
        if field.name == "freeze":
          try:
            re.compile(value)
          except re.error as e:
            raise ValueError(f"TrainConfig.freeze={value!r} is not a valid regular expression: {e}") from e
      elif field.name in _BOOL_FIELDS:
        if not isinstance(value, bool):
          raise ValueError(f"TrainConfig.{field.name} must be a bool, got {value!r}.")
      elif field.name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
          raise ValueError(f"TrainConfig.{field.name} must be an integer, got {value!r}.")
      elif not (value is None and field.name == "grad_clip_norm"):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
          raise ValueError(f"TrainConfig.{field.name} must be a finite number, got {value!r}.")
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
    for name in ("block_size", "rank", "projection_scale", "optimizer_seed", "min_quantized_size"):
      if getattr(self, name) < 0:
        raise ValueError(f"TrainConfig.{name} must be >= 0 (0: the method's default), got {getattr(self, name)}.")
    for name in ("update_proj_gap", "mezo_eps"):
      if getattr(self, name) <= 0:
        raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}.")
    for name in ("weight_decay", "eps"):
      if getattr(self, name) < 0:
        raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}.")
    for name in ("b1", "b2"):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}.")
    if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
      raise ValueError(f"TrainConfig.grad_clip_norm must be > 0 or None, got {self.grad_clip_norm}.")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def trainable_filter(config: TrainConfig):
  """The nnx filter of the parameters `config` trains: `nnx.Param` ('all') or `efficient.nn.Adapter`
  ('adapters'), minus those whose path `config.freeze` matches in full."""
  chosen = nnx.Param if config.trainable == "all" else nn.Adapter
  if not config.freeze:
    return chosen
  regex = re.compile(config.freeze)
  return nnx.All(chosen, lambda path, value: not regex.fullmatch("/".join(map(str, path))))


def split_trainable(model: nnx.Module, config: TrainConfig):
  """(graphdef, trained params, rest) of `model` under `trainable_filter(config)`; ValueError when the filter
  selects nothing (naming the field) or `freeze` matches no parameter."""
  if config.freeze:
    regex = re.compile(config.freeze)
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    if not any(regex.fullmatch(p) for p in paths):
      raise ValueError(f"TrainConfig.freeze={config.freeze!r} matches no parameter path in full; paths look like "
                       f"{paths[:3]}.")
  graphdef, params, rest = nnx.split(model, trainable_filter(config), ...)
  if not jax.tree.leaves(params):
    what = ("no efficient.nn.Adapter parameters: add adapters first (efficient.peft.add_adapters)"
            if config.trainable == "adapters" else "no parameters left to train")
    raise ValueError(f"TrainConfig.trainable={config.trainable!r}, freeze={config.freeze!r}: the model has {what}.")
  return graphdef, params, rest


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to its final fraction at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=config.total_steps, end_value=config.learning_rate * config.final_learning_rate_fraction)


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def optimizer_options(config: TrainConfig) -> optim_registry.OptimizerOptions:
  return optim_registry.OptimizerOptions(
      b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay, decay_mask=_decay_mask,
      block_size=config.block_size, min_quantized_size=config.min_quantized_size,
      stable_embedding=config.stable_embedding, rank=config.rank, update_proj_gap=config.update_proj_gap,
      projection_scale=config.projection_scale, seed=config.optimizer_seed, mezo_eps=config.mezo_eps)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then `config.optimizer` (weight decay on parameters with >= 2 dims), its state named
  after the params. MeZO has no gradient to transform: its 'optimizer' keeps a step counter only."""
  if config.optimizer == "mezo":
    return optax.GradientTransformation(lambda params: optax.ScaleByScheduleState(jnp.zeros([], jnp.int32)),
                                        None)
  tx = optim_registry.make(config.optimizer, learning_rate_schedule(config), optimizer_options(config))
  if config.grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return optim_axes.named(tx)


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


def _init_state(optimizer: optax.GradientTransformation, params):
  """`optimizer.init(params)` with every array leaf in its own buffer: an init may return one zeros array for
  several leaves, and the jitted step donates the state (a buffer donated twice is refused)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x,
                      optimizer.init(params))


def init_train_state(model: nnx.Module, config: TrainConfig, *, mesh: Mesh | None = None,
                     rules: str | sharding.Rules = "dp") -> TrainState:
  """Splits `model` and builds its optimizer state; with `mesh`, shards both by `rules` (model moved in place)."""
  optimizer = make_optimizer(config)
  if mesh is None:
    # Committed to one device, as restored checkpoints are, so a resumed run reuses the compiled step.
    device = jax.devices()[0]
    graphdef, params, rest = split_trainable(model, config)
    # Own buffers (may_alias=False): the step donates params, and the model's arrays may be shared with another
    # model (an nnx.clone shares them) that must survive training this one.
    params, rest = jax.device_put((params, rest), device, may_alias=False)
    return TrainState(graphdef, params, rest, jax.device_put(_init_state(optimizer, params), device), config)
  rules = sharding.rules_for(rules)
  sharding.shard_model(model, mesh, rules)
  graphdef, params, rest = split_trainable(model, config)
  param_shardings = sharding.state_shardings(params, mesh, rules)
  params = jax.device_put(params, param_shardings, may_alias=False)
  # State leaves carry names derived from their params' (optim.named), so the same rules place them.
  opt_state = _init_state(optimizer, params)
  opt_shardings = sharding.state_shardings(opt_state, mesh, rules)
  opt_state = jax.device_put(opt_state, opt_shardings)
  return TrainState(graphdef, params, rest, opt_state, config, mesh=mesh, rules=rules,
                    param_shardings=param_shardings, opt_shardings=opt_shardings,
                    batch_sharding=sharding.batch_sharding(mesh, rules))


# (graphdef, config, mesh, rules) -> jitted step. A resumed or repeated run in the same process reuses the
# compiled step instead of tracing and compiling a new closure.
_STEP_CACHE: dict[tuple, Callable] = {}


def make_train_step(state: TrainState) -> Callable:
  """jit(params, opt_state, rest, batch, step) -> (params, opt_state, metrics, rng_counts).

  metrics: 'loss', 'grad_norm', 'lr', 'tokens' and 'finite' (loss, gradient norm and update norm all finite).
  A non-finite step returns the params and optimizer state it was given: a bad update is never applied.
  params and optimizer state are donated: the caller must use the returned ones. rng_counts: the model's
  `nnx.RngCount` state after the forward (empty for a model without RNG streams; `apply_train_step` writes it
  back into `rest`, so dropout draws a new mask every step).
  """
  # Fields the step does not read (cadence, the non-finite policy) stay out of the key.
  step_config = dataclasses.replace(state.config, checkpoint_every=1, keep_checkpoints=1, log_every=1,
                                    skip_nonfinite_steps=False)
  key = (state.graphdef, step_config, state.mesh, state.rules)
  if key in _STEP_CACHE:
    return _STEP_CACHE[key]
  graphdef, optimizer, schedule = state.graphdef, make_optimizer(state.config), learning_rate_schedule(state.config)

  def loss_fn(params, rest, batch):
    loss, tokens = batch_loss(nnx.merge(graphdef, params, rest), batch)
    return loss, tokens

  def counted_loss_fn(params, rest, batch):
    """The loss, and the RNG counters the forward advanced (dropout in adapters draws a fresh mask per step)."""
    # copy=True: fresh variables at this trace level, which the RNG streams may then advance (rest is not
    # differentiated, so its variables would otherwise be the caller's, from another trace).
    model = nnx.merge(graphdef, params, rest, copy=True)
    loss, tokens = batch_loss(model, batch)
    return loss, (tokens, nnx.state(model, nnx.RngCount))

  def mezo_step_fn(params, opt_state, rest, batch, step):
    config = state.config
    params, mezo_metrics = zeroth_order.mezo_step(
        lambda p, b: loss_fn(p, rest, b)[0], params, batch, key=jax.random.key(config.optimizer_seed), step=step,
        learning_rate=schedule, eps=config.mezo_eps, weight_decay=config.weight_decay,
        weight_decay_mask=_decay_mask)
    tokens = batch["loss_mask"].astype(jnp.float32).sum()
    metrics = {"loss": mezo_metrics["loss"], "grad_norm": jnp.abs(mezo_metrics["projected_grad"]),
               "lr": schedule(step), "tokens": tokens, "finite": mezo_metrics["finite"]}
    return params, optax.ScaleByScheduleState(opt_state.count + 1), metrics, nnx.filter_state(rest, nnx.RngCount)

  def step_fn(params, opt_state, rest, batch, step):
    (loss, (tokens, rng_counts)), grads = jax.value_and_grad(counted_loss_fn, has_aux=True)(params, rest, batch)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, optax.apply_updates(params, updates), params)
    opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(step), "tokens": tokens, "finite": finite}
    return params, opt_state, metrics, rng_counts

  out_shardings = None
  if state.mesh is not None:
    replicated = NamedSharding(state.mesh, PartitionSpec())
    rng_shardings = jax.tree.map(lambda _: replicated, nnx.filter_state(state.rest, nnx.RngCount))
    out_shardings = (state.param_shardings, state.opt_shardings, replicated, rng_shardings)
  step = mezo_step_fn if state.config.optimizer == "mezo" else step_fn
  _STEP_CACHE[key] = jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)
  return _STEP_CACHE[key]


def place_batch(batch: dict, state: TrainState) -> dict:
  """Device arrays of a numpy batch, split along batch by the mesh rules when the state is sharded."""
  if state.batch_sharding is None:
    return {key: jnp.asarray(value) for key, value in batch.items()}
  return {key: jax.device_put(value, state.batch_sharding) for key, value in batch.items()}


def apply_train_step(state: TrainState, step_fn: Callable, batch: dict) -> dict:
  """Runs one update in place on `state`; returns the step's metrics as device scalars."""
  state.params, state.opt_state, metrics, rng_counts = step_fn(state.params, state.opt_state, state.rest,
                                                                place_batch(batch, state), state.step)
  if jax.tree.leaves(rng_counts):
    state.rest = nnx.merge_state(state.rest, rng_counts)
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


def _config_differences(saved: dict, config: TrainConfig) -> dict[str, list]:
  current = config.to_dict()
  return {name: [saved.get(name), current[name]] for name in RESUME_FIXED_FIELDS
          if saved.get(name) != current[name]}


class _FiniteGuard:
  """Checks each step's 'finite' flag: stops the run naming the step, or counts the skipped update."""

  def __init__(self, config: TrainConfig, checkpoints: Checkpoints, skipped: int = 0):
    self.config, self.checkpoints, self.skipped = config, checkpoints, skipped

  def check(self, step: int, metrics: dict) -> None:
    if bool(metrics["finite"]):
      return
    values = f"loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])}"
    if self.config.skip_nonfinite_steps:
      self.skipped += 1
      warnings.warn(f"step {step}: non-finite update ({values}) skipped; {self.skipped} skipped so far.",
                    RuntimeWarning, stacklevel=2)
      return
    kept = self.checkpoints.pending if self.checkpoints.pending is not None else self.checkpoints.last_good
    kept = f"the newest checkpoint, step {kept}, is kept" if kept is not None else "no checkpoint was written"
    raise FloatingPointError(
        f"step {step}: non-finite loss, gradient norm or update ({values}); training stopped without saving "
        f"this state ({kept} in {self.checkpoints.directory}). Lower the learning rate, or set "
        f"TrainConfig.skip_nonfinite_steps=True to skip such updates.")


# --- the loop -------------------------------------------------------------------------------------------------

def train(model: nnx.Module, data: BatchSource, config: TrainConfig, workdir: str | Path, *,
          mesh: Mesh | None = None, rules: str | sharding.Rules = "dp", until_step: int | None = None,
          progress: bool = True, allow_config_change: bool = False) -> dict[str, Any]:
  """Trains `model` in place on `data.batch(step)` up to `until_step` (default `config.total_steps`).

  Resumes from the newest good checkpoint under `workdir` (params, optimizer state, step, data iterator state);
  saves every `checkpoint_every` steps and at the end; appends to `workdir/metrics.jsonl` every `log_every`
  steps. A checkpoint trained under other `RESUME_FIXED_FIELDS` is refused unless `allow_config_change` (the
  change is then logged to metrics.jsonl as {'step', 'event': 'config_change', 'changes'}). Returns {'step',
  'history'} where history holds this call's logged metric dicts.
  """
  until_step = config.total_steps if until_step is None else until_step
  if not 0 <= until_step <= config.total_steps:
    raise ValueError(f"until_step must be in [0, total_steps={config.total_steps}], got {until_step}.")
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with WorkdirLock(workdir):
    return _train_locked(model, data, config, workdir, mesh, rules, until_step, progress, allow_config_change)


def _train_locked(model, data, config, workdir, mesh, rules, until_step, progress, allow_config_change):
  state = init_train_state(model, config, mesh=mesh, rules=rules)
  signature = model_signature(model)
  iterator = BatchIterator(data)
  metrics_path = workdir / METRICS_FILE
  history: list[dict] = []
  checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints)

  def check_model(step, meta):
    saved_optimizer = meta.get("train_config", {}).get("optimizer", "adamw")
    if saved_optimizer != config.optimizer:  # another state layout: no allow_config_change can resume it
      raise ValueError(f"checkpoint step {step} in {checkpoints.directory} holds the state of optimizer "
                       f"{saved_optimizer!r} but TrainConfig.optimizer={config.optimizer!r}; resume with "
                       f"optimizer={saved_optimizer!r} or use another workdir.")
    differences = signature_differences(meta, signature)
    if differences:
      raise ValueError(f"checkpoint directory {checkpoints.directory} holds step {step} of a different model; "
                       f"use another workdir or the same model config. Differences: " + "; ".join(differences))

  try:
    restored = checkpoints.restore(_checkpoint_tree(state), check_model)
    changes, skipped = {}, 0
    if restored is not None:
      tree, meta, _ = restored
      changes = _config_differences(meta.get("train_config", {}), config)
      if changes and not allow_config_change:
        raise ValueError(f"checkpoint step {meta['step']} in {checkpoints.directory} was trained under another "
                         f"TrainConfig: " + "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}"
                                                     for k, (a, b) in changes.items())
                         + ". Use the same values, another workdir, or allow_config_change=True.")
      iterator.restore(meta["data_state"])
      state.params, state.opt_state, state.step = tree["params"], tree["opt_state"], int(meta["step"])
      if "rngs" in tree:
        state.rest = _with_rng_state(state.rest, tree["rngs"])
      skipped = int(meta.get("skipped_nonfinite_steps", 0))
    truncate_metrics(metrics_path, state.step)  # a fresh start (step 0) clears a crashed run's log
    if changes:
      with metrics_path.open("a") as f:
        f.write(json.dumps({"step": state.step, "event": "config_change", "changes": changes}) + "\n")
    guard = _FiniteGuard(config, checkpoints, skipped)
    _loop(state, iterator, config, until_step, progress, checkpoints, guard, metrics_path, history,
          dict(signature, train_config=config.to_dict()))
  except BaseException:
    checkpoints.close(after_error=True)
    raise
  checkpoints.close()
  nnx.update(model, state.params, state.rest)
  return {"step": state.step, "history": history}


def _checkpoint_tree(state: TrainState) -> dict:
  """What a checkpoint holds: trained params, optimizer state and (when the model has RNG streams, e.g. adapter
  dropout) their keys and counters, so a resumed run draws the masks the uninterrupted one would."""
  tree = {"params": state.params, "opt_state": state.opt_state}
  rngs = _rng_state(state.rest)
  if jax.tree.leaves(rngs):
    tree["rngs"] = rngs
  return tree


def _is_key(x) -> bool:
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _rng_state(rest):
  """The model's RNG streams (keys as their raw uint32 data, which orbax stores) and counters."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, nnx.filter_state(rest, nnx.RngState))


def _with_rng_state(rest, saved):
  """`rest` with its RNG streams replaced by a checkpoint's (`_rng_state`'s layout)."""
  current = nnx.filter_state(rest, nnx.RngState)
  restored = jax.tree.map(lambda now, new: jax.random.wrap_key_data(new, impl=jax.random.key_impl(now))
                          if _is_key(now) else new, current, saved)
  return nnx.merge_state(rest, restored)


def _loop(state, iterator, config, until_step, progress, checkpoints, guard, metrics_path, history, meta):
  step_fn = make_train_step(state)
  bar = tqdm(total=until_step, initial=state.step, desc="train", disable=not progress, dynamic_ncols=True)
  last_time, last_step = time.perf_counter(), state.step
  unchecked = None  # (step, metrics) of the newest step, checked one step late so the device keeps busy
  while state.step < until_step:
    if iterator.step != state.step:
      raise ValueError(f"data iterator at step {iterator.step} but the model at step {state.step}.")
    batch = next(iterator)
    if batch["tokens"].shape != (config.batch_size, config.seq_len):
      raise ValueError(f"data gives batches of shape {batch['tokens'].shape} but TrainConfig says "
                       f"(batch_size, seq_len) = {(config.batch_size, config.seq_len)}.")
    metrics = apply_train_step(state, step_fn, batch)
    if unchecked is not None:
      guard.check(*unchecked)
    unchecked = (state.step, metrics)
    checkpoints.poll()
    bar.update(1)
    if state.step % config.log_every == 0 or state.step == until_step:
      guard.check(*unchecked)
      unchecked = None
      now = time.perf_counter()  # the first interval includes compilation
      record = {"step": state.step, **{k: float(metrics[k]) for k in ("loss", "lr", "grad_norm")},
                "tokens_per_sec": (state.step - last_step) * batch["tokens"].size / (now - last_time)}
      if config.skip_nonfinite_steps:
        record["skipped_steps"] = guard.skipped
      last_time, last_step = now, state.step
      history.append(record)
      with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
      bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
    if state.step % config.checkpoint_every == 0 or state.step == until_step:
      if unchecked is not None:
        guard.check(*unchecked)
        unchecked = None
      checkpoints.save(state.step, _checkpoint_tree(state), dict(meta, step=state.step, data_state=iterator.state,
                                              skipped_nonfinite_steps=guard.skipped))
  if unchecked is not None:
    guard.check(*unchecked)
  bar.close()
