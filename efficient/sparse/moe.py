"""Mixture-of-Experts MLP: a top-k softmax router with a capacity factor, SwiGLU experts run by a grouped matmul,
and the Switch/GShard load-balancing loss (plus an optional router z-loss).

    moe = MoEConfig(num_experts=8, top_k=2, capacity_factor=1.25, drop_overflow=True, load_balance_weight=0.01)
    model = moe_llama(llama.TINY, moe, rngs=nnx.Rngs(0))  # efficient.models.moe: every block gets an MoEMLP
    with capture_routing() as routing:
      logits = model(tokens)
    loss = cross_entropy + moe_aux_loss(routing)["loss"]          # weighted aux losses of this forward

Dispatch ("dropless shapes"): the N tokens' N*k (token, choice) pairs are sorted by expert and the experts run as
three grouped matmuls over those N*k rows (`pallas_kernels.grouped_matmul`, group sizes = tokens kept per
expert). Shapes never depend on the routing, so everything jits once.

Capacity: capacity = ceil(capacity_factor * N * k / E) pairs per expert. Pairs claim slots in priority order
choice-major (every token's first choice before any second choice; within a choice rank, by token index, as in
GShard). With `drop_overflow=True` the pairs beyond an expert's capacity are dropped: they contribute zero (the
residual path carries the token) and are counted. With `drop_overflow=False` the layer is dropless: capacity is
not enforced (nothing is ever dropped, so an imbalanced router costs compute, never tokens); the pairs that would
have overflowed are still counted as `overflow`. Choosing this over raising keeps jitted and eager calls alike.

Routing statistics: inside `with capture_routing() as routing:` every MoE layer appends its statistics (tokens
per expert, dropped count and fraction, load-balance and z losses) to `routing`; `moe_aux_loss(routing)` turns
them into the weighted auxiliary loss a training step adds. They are a record rather than nnx variables mutated
in place because flax refuses to mutate a variable of `nnx.merge(graphdef, params, rest)` under `jax.grad`
(TraceContextError), which is how every training step here builds its model.

Expert parallelism: expert weights carry the logical axis 'expert' (router: ('embed', 'expert')), which the
sharding preset 'ep' maps to the mesh axis 'expert' (batch on 'data'); XLA partitions the dispatch.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from efficient import nn, train
from pallas_kernels.grouped_matmul import IMPLEMENTATIONS as GROUPED_MATMUL_IMPLEMENTATIONS
from pallas_kernels.grouped_matmul import grouped_matmul as grouped_matmul_op


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """num_experts E, top_k k (gates renormalized over the chosen k), capacity_factor (capacity =
  ceil(cf * tokens * k / E)), drop_overflow (drop pairs beyond capacity, else dropless), the aux-loss weights,
  expert_dim (hidden width of each expert; None: the Llama config's mlp_dim) and the
  `pallas_kernels.grouped_matmul` implementation (None: by backend)."""
  num_experts: int = 8
  top_k: int = 2
  capacity_factor: float = 1.25
  drop_overflow: bool = True
  load_balance_weight: float = 0.01
  router_z_weight: float = 0.0
  expert_dim: int | None = None
  implementation: str | None = None

  def __post_init__(self):
    if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1:
      raise ValueError(f"MoEConfig.num_experts must be an int >= 1, got {self.num_experts!r}.")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"MoEConfig.top_k must be an int in [1, num_experts={self.num_experts}], got {self.top_k!r}.")
    if not self.capacity_factor > 0:
      raise ValueError(f"MoEConfig.capacity_factor must be > 0, got {self.capacity_factor!r}.")
    for name in ("load_balance_weight", "router_z_weight"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)!r}.")
    if self.expert_dim is not None and (not isinstance(self.expert_dim, int) or self.expert_dim < 1):
      raise ValueError(f"MoEConfig.expert_dim must be an int >= 1 or None, got {self.expert_dim!r}.")
    if self.implementation is not None and self.implementation not in GROUPED_MATMUL_IMPLEMENTATIONS:
      raise ValueError(f"MoEConfig.implementation={self.implementation!r} must be None or one of "
                       f"{GROUPED_MATMUL_IMPLEMENTATIONS}.")

  def capacity(self, num_tokens: int) -> int:
    """Pair slots per expert for a call over `num_tokens` tokens."""
    return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# --- the math, without Flax -----------------------------------------------------------------------------------

def _grouped_matmul_fn(implementation: str | None = None) -> Callable:
  """The expert product: [M, K] rows sorted by expert x [E, K, N] -> [M, N] f32 (rows past the groups: 0)."""
  return functools.partial(grouped_matmul_op, implementation=implementation, out_dtype=jnp.float32)


def route(x, router_kernel, *, top_k: int):
  """Router logits [N, E] (f32), softmax probabilities, and the top-k (gates renormalized over k, experts)."""
  logits = jnp.einsum("nd,de->ne", x, router_kernel.astype(x.dtype), preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  top_probs, experts = jax.lax.top_k(probs, top_k)
  gates = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
  return logits, probs, gates, experts


def dispatch_plan(experts, *, num_experts: int, capacity: int, drop_overflow: bool):
  """Where every (token, choice) pair goes. `experts` [N, k] int. Returns a dict of
  order [N*k]        pair ids (choice-major: pair c*N + n is token n's c-th choice) sorted by expert, kept
                     pairs first (dropped pairs after every group, outside the grouped matmul's groups)
  kept [N*k]         per pair (choice-major), whether it fits its expert's capacity (all True if dropless)
  group_sizes [E]    kept pairs per expert (int32), routed [E] pairs routed per expert before dropping
  overflow []        pairs beyond capacity (dropped iff drop_overflow)."""
  num_tokens, top_k = experts.shape
  expert_of_pair = experts.T.reshape(-1)  # choice-major priority: first choices claim slots first
  by_expert = jnp.argsort(expert_of_pair, stable=True)
  routed = jnp.bincount(expert_of_pair, length=num_experts).astype(jnp.int32)
  group_start = jnp.cumsum(routed) - routed
  rank_sorted = jnp.arange(num_tokens * top_k) - group_start[expert_of_pair[by_expert]]
  rank = jnp.zeros_like(rank_sorted).at[by_expert].set(rank_sorted)  # slot each pair claims in its expert
  overflow = jnp.sum(jnp.maximum(routed - capacity, 0))
  kept = rank < capacity if drop_overflow else jnp.ones_like(rank, dtype=bool)
  # Dropped pairs sort behind every expert (key E), so they fall outside all groups.
  key = jnp.where(kept, expert_of_pair, num_experts)
  order = jnp.argsort(key, stable=True)
  group_sizes = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  return {"order": order, "kept": kept, "group_sizes": group_sizes, "routed": routed, "overflow": overflow}


def load_balance_loss(probs, routed_per_expert):
  """Switch/GShard auxiliary loss E * sum_e f_e * P_e: f_e the fraction of (token, choice) pairs routed to
  expert e (before capacity), P_e the mean router probability of e. 1 for perfectly uniform routing."""
  num_experts = probs.shape[-1]
  fraction = routed_per_expert.astype(jnp.float32) / jnp.maximum(jnp.sum(routed_per_expert), 1)
  return num_experts * jnp.sum(jax.lax.stop_gradient(fraction) * jnp.mean(probs, axis=0))


def router_z_loss(logits):
  """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2 (keeps router logits small)."""
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def moe_forward(x, router_kernel, gate_kernel, up_kernel, down_kernel, *, top_k: int, capacity: int,
                drop_overflow: bool, grouped_matmul: Callable | None = None):
  """x [N, D] -> (y [N, D], stats). Experts: SwiGLU with gate/up [E, D, F], down [E, F, D]; y_n is the sum over
  the kept choices c of gate_nc * expert_c(x_n). stats: tokens_per_expert (kept), routed_per_expert, dropped,
  overflow, dropped_fraction, load_balance_loss, router_z_loss."""
  grouped_matmul = grouped_matmul or _grouped_matmul_fn()
  num_tokens = x.shape[0]
  num_experts = gate_kernel.shape[0]
  logits, probs, gates, experts = route(x, router_kernel, top_k=top_k)
  plan = dispatch_plan(experts, num_experts=num_experts, capacity=capacity, drop_overflow=drop_overflow)
  order, group_sizes = plan["order"], plan["group_sizes"]
  token_of_pair = jnp.tile(jnp.arange(num_tokens), top_k)
  sorted_tokens = token_of_pair[order]
  x_sorted = x[sorted_tokens]
  dtype = x.dtype
  gate_h = grouped_matmul(x_sorted, gate_kernel.astype(dtype), group_sizes)
  up_h = grouped_matmul(x_sorted, up_kernel.astype(dtype), group_sizes)
  hidden = (jax.nn.silu(gate_h) * up_h).astype(dtype)
  out_sorted = grouped_matmul(hidden, down_kernel.astype(dtype), group_sizes).astype(jnp.float32)
  weight_sorted = gates.T.reshape(-1)[order]
  kept_sorted = plan["kept"][order]
  # `where`, not a multiply: rows outside every group are not guaranteed to be finite by a grouped matmul.
  contribution = jnp.where(kept_sorted[:, None], out_sorted * weight_sorted[:, None], 0.0)
  y = jnp.zeros((num_tokens, x.shape[1]), jnp.float32).at[sorted_tokens].add(contribution)
  pairs = num_tokens * top_k
  dropped = pairs - jnp.sum(group_sizes)
  stats = {"tokens_per_expert": group_sizes, "routed_per_expert": plan["routed"], "dropped": dropped,
           "overflow": plan["overflow"], "dropped_fraction": dropped / pairs,
           "load_balance_loss": load_balance_loss(probs, plan["routed"]), "router_z_loss": router_z_loss(logits)}
  return y.astype(dtype), stats


# --- the module -------------------------------------------------------------------------------------------------

STAT_NAMES = ("tokens_per_expert", "routed_per_expert", "dropped", "overflow", "dropped_fraction",
              "load_balance_loss", "router_z_loss")
# The open `capture_routing()` record, if any: MoE layers append their statistics to it during a forward.
_ROUTING_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar("moe_routing_record", default=None)


class MoEMLP(nnx.Module):
  """Drop-in replacement of a SwiGLU MLP: x [B, T, D] -> [B, T, D] through top-k routed SwiGLU experts of width
  `moe.expert_dim` (default `mlp_dim`)."""

  def __init__(self, embed_dim: int, mlp_dim: int, moe: MoEConfig, *, rngs: nnx.Rngs, name: str = "moe",
               param_dtype=jnp.float32, compute_dtype=jnp.float32, init_std: float = nn.DEFAULT_INIT_STD):
    self.moe = moe
    self.name = name  # labels this layer's statistics in `capture_routing` records
    self.compute_dtype = compute_dtype
    e, d, f = moe.num_experts, embed_dim, moe.expert_dim or mlp_dim
    init = nn.normal_init(init_std)

    def param(shape, names):
      return nn.logical_param(init(rngs.params(), shape, param_dtype), names)

    self.router = param((d, e), ("embed", "expert"))
    self.gate = param((e, d, f), ("expert", "embed", "mlp"))
    self.up = param((e, d, f), ("expert", "embed", "mlp"))
    self.down = param((e, f, d), ("expert", "mlp", "embed"))

  def __call__(self, x):
    batch, length, dim = x.shape
    x2 = x.astype(self.compute_dtype).reshape(batch * length, dim)
    y, stats = moe_forward(x2, self.router[...], self.gate[...], self.up[...], self.down[...],
                           top_k=self.moe.top_k, capacity=self.moe.capacity(batch * length),
                           drop_overflow=self.moe.drop_overflow,
                           grouped_matmul=_grouped_matmul_fn(self.moe.implementation))
    record = _ROUTING_RECORD.get()
    if record is not None:
      record.append({"name": self.name, "moe": self.moe, **stats})
    return y.reshape(batch, length, dim)


@contextlib.contextmanager
def capture_routing():
  """Collects the routing statistics of every MoE layer called inside the block (in call order):

      with capture_routing() as routing:
        logits = model(tokens)
      aux = moe_aux_loss(routing)

  A record, not module state: it works inside jit/grad (the arrays are the traced values of that forward), and
  models built from split state (`nnx.merge`) need no mutable variables."""
  record: list = []
  token = _ROUTING_RECORD.set(record)
  try:
    yield record
  finally:
    _ROUTING_RECORD.reset(token)


def moe_aux_loss(routing: list) -> dict:
  """The auxiliary loss of a captured forward: sum over its MoE layer calls of load_balance_weight * LB +
  router_z_weight * z ('loss'; 0 when no MoE layer ran), and {'layers': {name: stats}}."""
  loss = jnp.zeros((), jnp.float32)
  layers = {}
  for entry in routing:
    loss = loss + entry["moe"].load_balance_weight * entry["load_balance_loss"]
    loss = loss + entry["moe"].router_z_weight * entry["router_z_loss"]
    layers[entry["name"]] = {name: entry[name] for name in STAT_NAMES}
  return {"loss": loss, "layers": layers}


def batch_loss_with_aux(model: nnx.Module, batch: dict):
  """`efficient.train.batch_loss` plus the MoE auxiliary loss: (ce + aux, (ce, loss tokens, routing stats))."""
  with capture_routing() as routing:
    ce, tokens = train.batch_loss(model, batch)
  aux = moe_aux_loss(routing)
  return ce + aux["loss"], (ce, tokens, aux)


def moe_layers(model: nnx.Module) -> dict[str, MoEMLP]:
  """{path: MoEMLP} of every MoE layer in `model`, in module order."""
  return {"/".join(map(str, path)): module for path, module in nnx.iter_modules(model)
          if isinstance(module, MoEMLP)}


__all__: Sequence[str] = ("MoEConfig", "MoEMLP", "STAT_NAMES",
                          "batch_loss_with_aux", "capture_routing", "dispatch_plan", "load_balance_loss", "moe_aux_loss", "moe_forward", "moe_layers",
                          "route", "router_z_loss")
