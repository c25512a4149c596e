"""Llama with Mixture-of-Experts MLPs: the model-specific builder over `efficient.sparse.moe` (which knows no model).

    model = moe_llama(llama.TINY, MoEConfig(num_experts=8, top_k=2), rngs=nnx.Rngs(0))
"""
from __future__ import annotations

from typing import Iterable

from flax import nnx

from efficient.models import llama
from efficient.sparse.moe import MoEConfig, MoEMLP


def moe_llama(config: llama.LlamaConfig, moe: MoEConfig, *, rngs: nnx.Rngs,
              layers: Iterable[int] | None = None, **llama_kwargs) -> llama.Llama:
  """A `llama.Llama` whose blocks in `layers` (default: all) have an MoEMLP instead of the dense MLP."""
  chosen = range(config.num_layers) if layers is None else list(layers)
  for index in chosen:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < config.num_layers:
      raise ValueError(f"layers must hold block indices in [0, {config.num_layers}), got {index!r}.")
  model = llama.Llama(config, rngs=rngs, **llama_kwargs)
  for index in chosen:
    model.blocks[index].mlp = MoEMLP(config.embed_dim, config.mlp_dim, moe, rngs=rngs, name=f"blocks/{index}/mlp",
                                      param_dtype=config.param_dtype, compute_dtype=config.compute_dtype,
                                      init_std=config.init_std)
  return model


def active_and_total_mlp_parameters(config: llama.LlamaConfig, moe: MoEConfig | None) -> dict[str, int]:
  """MLP parameters per layer: total, and active per token (k experts + router for MoE; all for dense)."""
  d = config.embed_dim
  if moe is None:
    total = 3 * d * config.mlp_dim
    return {"total": total, "active": total}
  f = moe.expert_dim or config.mlp_dim
  expert = 3 * d * f
  return {"total": moe.num_experts * expert + d * moe.num_experts,
          "active": moe.top_k * expert + d * moe.num_experts}
