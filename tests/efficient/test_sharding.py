"""Sharding presets: a tiny Llama forward on 8 fake devices equals the single-device forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from efficient import sharding
from efficient.models import llama

MESHES = {"dp": "data:4,fsdp:2", "fsdp": "data:2,fsdp:4", "tp": "data:4,tensor:2", "fsdp_tp": "data:2,fsdp:2,tensor:2"}


def test_parse_mesh():
  assert sharding.parse_mesh("data:2,fsdp:2,tensor:2") == {"data": 2, "fsdp": 2, "tensor": 2}
  for bad, message in [("model:2", "unknown axis"), ("data:0", "positive"), ("data:2,data:2", "twice"),
                       ("data", "positive"), ("", "no axes")]:
    with pytest.raises(ValueError, match=message):
      sharding.parse_mesh(bad)
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh("data:16")
  with pytest.raises(ValueError, match="unknown sharding preset"):
    sharding.rules_for("zero3")


def test_logical_to_spec_drops_indivisible_axes():
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  rules = sharding.PRESETS["fsdp_tp"]
  replicated = []
  spec = sharding.logical_to_spec(("embed", "heads", "head_dim"), rules, shape=(576, 9, 64), mesh=mesh,
                                  replicated=replicated)
  assert spec == P("fsdp", None, None)
  assert replicated == [("heads", 9, "tensor")]
  assert sharding.logical_to_spec(("batch", "length"), rules, shape=(8, 3), mesh=mesh) == P(("data", "fsdp"), None)


@pytest.mark.parametrize("preset", sorted(MESHES))
def test_sharded_forward_equals_single_device(preset):
  config = llama.TINY
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, config.vocab_size, dtype=jnp.int32)
  single = llama.Llama(config, rngs=nnx.Rngs(0))
  expected = np.asarray(jax.jit(lambda m, t: m(t))(single, tokens))

  mesh = sharding.make_mesh(MESHES[preset])
  model = llama.Llama(config, rngs=nnx.Rngs(0))
  assert sharding.shard_model(model, mesh, preset) == []
  mlp_gate = model.blocks[0].mlp.gate.kernel[...]
  embed_shards = {"dp": 1, "fsdp": 4, "tp": 1, "fsdp_tp": 2}[preset]
  mlp_shards = {"dp": 1, "fsdp": 1, "tp": 2, "fsdp_tp": 2}[preset]
  shard_shape = mlp_gate.sharding.shard_shape(mlp_gate.shape)
  assert shard_shape == (config.embed_dim // embed_shards, config.mlp_dim // mlp_shards)
  q = model.blocks[0].attention.q.kernel[...]
  assert q.sharding.shard_shape(q.shape)[1] == config.num_heads // mlp_shards

  sharded_tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, preset))
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda m, t: m(t))(model, sharded_tokens)
  assert len(logits.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5, rtol=1e-5)
