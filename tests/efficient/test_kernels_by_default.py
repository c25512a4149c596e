"""Kernels by default: a model run under `pallas_kernels.implementation("interpret_tpu")` goes through the TPU
kernels everywhere (counted as `pallas_call`s in its jaxpr, prefill and decode) and equals the default CPU run
(the XLA paths, no Pallas call)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from efficient.models import llama
from tests.helpers import assert_close


def count_pallas_calls(jaxpr) -> int:
  """`pallas_call` equations in a (closed) jaxpr, descending into every sub-jaxpr (jit, custom_vjp, scan...)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn.primitive.name == "pallas_call"
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          total += count_pallas_calls(sub)
  return total


CONFIG = llama.TINY.replace(num_layers=1)


def test_policy_runs_tpu_kernels_in_prefill_and_decode_and_equals_the_xla_run():
  model = llama.Llama(CONFIG, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, CONFIG.vocab_size, dtype=jnp.int32)
  forward = lambda t: model(t)

  def decode_step(token, cache):
    return model(token, cache=cache)

  cache = llama.init_cache(CONFIG, 2, 24)
  _, cache = model(tokens, cache=cache)
  token = tokens[:, -1:]
  assert count_pallas_calls(jax.make_jaxpr(forward)(tokens)) == 0  # CPU default: XLA paths
  expected_logits = model(tokens)
  expected_step, _ = decode_step(token, cache)
  with pallas_kernels.implementation("interpret_tpu"):
    # Per block: two RMSNorms + flash attention; then the final norm.
    assert count_pallas_calls(jax.make_jaxpr(forward)(tokens)) == 3 * CONFIG.num_layers + 1
    # A one-token step reads the cache through flash_decode instead of flash attention.
    assert count_pallas_calls(jax.make_jaxpr(decode_step)(token, cache)) == 3 * CONFIG.num_layers + 1
    logits = model(tokens)
    step, _ = decode_step(token, cache)
  assert_close("prefill logits", logits, expected_logits, 1e-5)
  assert_close("decode logits", step, expected_step, 1e-5)
  assert np.isfinite(np.asarray(step)).all()


def test_counter_sees_kernels_inside_jit_and_custom_vjp():
  x = jnp.ones((8, 128), jnp.float32)
  w = jnp.ones((128,), jnp.float32)
  f = jax.jit(lambda x: pallas_kernels.rms_norm(x, w, implementation="interpret_tpu"))
  assert count_pallas_calls(jax.make_jaxpr(f)(x)) == 1
  assert count_pallas_calls(jax.make_jaxpr(lambda x: jnp.sum(x))(x)) == 0


def test_decode_through_flash_decode_per_shard_equals_one_device():
  """Under a mesh the one-token steps run flash_decode inside shard_map (batch rows over data/fsdp, kv heads over
  tensor): greedy tokens and the decode logits equal one device's."""
  from efficient import sharding
  model = llama.Llama(CONFIG, rngs=nnx.Rngs(1))
  prompt = jax.random.randint(jax.random.key(3), (4, 6), 0, CONFIG.vocab_size, dtype=jnp.int32)
  expected = np.asarray(llama.generate(model, prompt, 5))
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  sharded = nnx.clone(model)
  assert sharding.shard_model(sharded, mesh, "fsdp_tp") == []
  with jax.set_mesh(mesh):
    tokens = llama.generate(sharded, jax.device_put(prompt, sharding.batch_sharding(mesh, "fsdp_tp")), 5)
    hlo = jax.jit(lambda t, c: sharded(t, cache=c)).lower(prompt[:, :1], llama.init_cache(CONFIG, 4, 8)).as_text()
  assert "shard_map" in hlo or "manual" in hlo.lower()
  np.testing.assert_array_equal(np.asarray(tokens), expected)
