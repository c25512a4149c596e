"""Parameter-efficient fine-tuning by path rules on any NNX model, without editing model code.

    peft.add_adapters(model, [(r"blocks/\\d+/attention/(q|v)", peft.LoRAConfig(rank=8, alpha=16))])
    peft.qlora(model, r"blocks/\\d+/.*")                  # NF4 base (packed, through quant_matmul) + LoRA
    train.train(model, data, TrainConfig(trainable="adapters", ...), workdir)   # only nn.Adapter params train

- `core`: adapter geometry over float and quantized layers, `add_adapters(model, rules)`, adapter state.
- `lora`: LoRA / rsLoRA, DoRA, QLoRA (`qlora`); `road`: RoAd; `ether`: ETHER / ETHER+; `reft`: LoReFT
  interventions on any submodule's hidden state (`add_interventions`).
- `merge`: `merge_adapters` (export: one plain layer per adapter; a quantized base is 'dequantize'd or
  're-quantize'd) and `unmerge_adapters` (bit-exact).
- `checkpoint`: `save_adapters` / `load_adapters` (small orbax checkpoint + manifest onto a base from its own file).
- `multi`: batched multi-LoRA inference (each sequence its own adapter, through `grouped_matmul`).
"""
from efficient.nn import Adapter
from efficient.peft.core import (ADAPTABLE_TYPES, AdaptedLinear, AdapterConfig, Geometry, add_adapters,
                                 adapter_state, adapters, count_adapter_parameters, geometry)
from efficient.peft.lora import DoRAEinsum, LoRAConfig, LoRAEinsum, qlora
from efficient.peft.road import RoAdConfig, RoAdEinsum
from efficient.peft.ether import ETHERConfig, ETHEREinsum
from efficient.peft.reft import LoReFTIntervention, ReFTConfig, add_interventions, interventions
from efficient.peft.merge import merge_adapters, unmerge_adapters
from efficient.peft.checkpoint import load_adapters, loaded_adapters, save_adapters
from efficient.peft.multi import MultiLoRAEinsum, add_multi_lora, set_adapter_ids, stack_lora

__all__ = ["ADAPTABLE_TYPES", "Adapter", "AdaptedLinear", "AdapterConfig", "DoRAEinsum", "ETHERConfig",
           "ETHEREinsum", "Geometry", "LoRAConfig", "LoRAEinsum", "LoReFTIntervention", "MultiLoRAEinsum",
           "ReFTConfig", "RoAdConfig", "RoAdEinsum", "add_adapters", "add_interventions", "add_multi_lora",
           "adapter_state", "adapters", "count_adapter_parameters", "geometry", "interventions", "load_adapters",
           "loaded_adapters", "merge_adapters", "qlora", "save_adapters", "set_adapter_ids", "stack_lora",
           "unmerge_adapters"]
