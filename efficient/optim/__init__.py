"""Memory-efficient optimizers as optax transformations (C15), for any NNX model (state named after its params).

- `adam_8bit` / `adamw_8bit`: bitsandbytes' block-wise dynamic 8-bit states, updated by the fused
  `pallas_kernels.lowbit_adam` op (reference on CPU; Pallas kernels on TPU / GPU, `implementation=` policy);
- `adam_4bit` (Li et al. 2023: B128 dynamic-exponent m, rank-1 normalized linear v) and `adam_4bit_naive`
  (the unstable zero-point baseline);
- `came` (confidence-guided factored), `galore` (SVD-projected Adam), `apollo` / `apollo_mini` (random-projection
  scaled SGD-like updates); `optax.adafactor` is used as it is;
- `mezo_step` / `make_mezo_step`: zeroth-order SPSA steps with the seed trick (no gradients, no state);
- `axes.named(tx)`: any transformation's state leaves named after their params (so they shard with them);
- `mup`: μP (Tensor Programs V, Table 8, Adam) by parameter-path rules: `mup.plan`, `mup.initialize`,
  `mup.scale_learning_rates` (per-parameter Adam-LR multipliers, chained after the optimizer);
- `registry.make(name, ...)` / `OPTIMIZERS`: what `efficient.train` builds from `TrainConfig.optimizer`;
- `state_bytes`, `state_bytes_per_param`, `compiled_memory`: measured, not modeled.
"""
from efficient.optim import axes, mup
from efficient.optim.axes import named
from efficient.optim.factored import came
from efficient.optim.lowbit import (adam_4bit, adam_4bit_naive, adam_8bit, adamw_8bit, dequantized_moments,
                                    embedding_fp32_state)
from efficient.optim.lowrank import apollo, apollo_mini, galore
from efficient.optim.memory import compiled_memory, state_bytes, state_bytes_per_param
from efficient.optim.registry import OPTIMIZERS, OptimizerOptions, make
from efficient.optim.zeroth_order import make_mezo_step, mezo_step

__all__ = ["OPTIMIZERS", "OptimizerOptions", "adam_4bit", "adam_4bit_naive", "adam_8bit", "adamw_8bit", "apollo",
           "apollo_mini", "axes", "came", "compiled_memory", "dequantized_moments", "embedding_fp32_state", "galore",
           "make", "make_mezo_step", "mezo_step", "mup", "named", "state_bytes", "state_bytes_per_param"]
