"""SmolLM2-135M on 8 fake CPU devices gives the transformers golden logits and greedy tokens
(tests/data/smollm2_golden.json), like the single-device model does, under the fsdp preset and under fsdp_tp (which
splits both the fsdp and the tensor axes; the dp and tp presets' partitioning is checked on the tiny models of
test_train / test_attention_flash, which keeps this ~40 s-per-preset real-model test to the two presets that
exercise every axis)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient import sharding
from tests.efficient.test_smollm2_golden import check_generation, check_logits, forward_logits

pytestmark = pytest.mark.slow

MESHES = {"dp": "data:8", "fsdp": "data:2,fsdp:4", "tp": "data:2,tensor:4", "fsdp_tp": "data:2,fsdp:2,tensor:2"}
# SmolLM2 has 9 query and 3 KV heads: no tensor axis of 2 or 4 divides them, so attention heads stay
# replicated while MLP, vocabulary and embed dimensions split.
EXPECTED_REPLICATED = {"dp": [], "fsdp": [], "tp": [("heads", 9, "tensor"), ("kv_heads", 3, "tensor")],
                       "fsdp_tp": [("heads", 9, "tensor"), ("kv_heads", 3, "tensor")]}


@pytest.mark.parametrize("preset", ["fsdp", "fsdp_tp"])
def test_sharded_smollm2_matches_golden(preset, smollm2, smollm2_golden):
  mesh = sharding.make_mesh(MESHES[preset])
  model = nnx.clone(smollm2.model)
  assert sharding.shard_model(model, mesh, preset) == EXPECTED_REPLICATED[preset]
  gate = model.blocks[0].mlp.gate.kernel[...]
  expected_gate = {"dp": (576, 1536), "fsdp": (144, 1536), "tp": (576, 384), "fsdp_tp": (288, 768)}[preset]
  assert gate.sharding.shard_shape(gate.shape) == expected_gate

  with jax.set_mesh(mesh):
    logits = forward_logits(model, smollm2_golden["text_ids"])
    check_logits(logits, smollm2_golden)
    # Greedy tokens: teacher-forced argmax over prompt + golden continuation equals the golden continuation,
    # which is exactly what greedy decoding must reproduce; one preset also decodes through the KV cache.
    generation = smollm2_golden["generation"]
    prompt, continuation = generation["prompt_ids"], generation["tokens"]
    forced = forward_logits(model, prompt + continuation[:-1])
    assert np.argmax(forced[len(prompt) - 1:], axis=-1).tolist() == continuation
    if preset == "fsdp_tp":
      check_generation(model, smollm2_golden)
