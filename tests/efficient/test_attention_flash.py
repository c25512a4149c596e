"""A tiny Llama with `flash_attention_fn` gives the logits and gradients of the positional reference attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient.attention import flash_attention_fn, reference_attention_fn
from efficient.models import llama
from tests.helpers import assert_close


def _logits_and_grads(attention_fn, tokens, positions, segment_ids):
  model = llama.Llama(llama.TINY, rngs=nnx.Rngs(0), attention_fn=attention_fn)
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params):
    def loss(params):
      logits = nnx.merge(graphdef, params)(tokens, positions=positions, segment_ids=segment_ids)
      log_probs = jax.nn.log_softmax(logits[:, :-1])
      return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)), logits
    return jax.value_and_grad(loss, has_aux=True)(params)

  (_, logits), grads = run(params)
  return logits, grads


@pytest.mark.parametrize("implementation", ["xla", "interpret_gpu"])
def test_llama_with_flash_attention_matches_softmax_attention(implementation):
  batch, length = 2, 24
  tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, llama.TINY.vocab_size, dtype=jnp.int32)
  # Two packed documents per row (no padding): positions restart at each segment, as packing produces them.
  boundary = np.array([[10], [15]])
  index = np.arange(length)[None, :]
  segment_ids = jnp.asarray(np.where(index < boundary, 1, 2), jnp.int32)
  positions = jnp.asarray(np.where(index < boundary, index, index - boundary), jnp.int32)
  expected_logits, expected_grads = _logits_and_grads(reference_attention_fn(), tokens, positions, segment_ids)
  logits, grads = _logits_and_grads(flash_attention_fn(implementation, block_q=16, block_kv=16), tokens,
                                    positions, segment_ids)
  assert_close("logits", logits, expected_logits, 1e-5)
  flat, expected_flat = jax.tree.leaves(grads), jax.tree.leaves(expected_grads)
  assert len(flat) == len(expected_flat)
  for index, (grad, expected) in enumerate(zip(flat, expected_flat)):
    assert_close(f"grad leaf {index}", grad, expected, 1e-5)


def test_flash_attention_fn_refuses_cache_decoding():
  model = llama.Llama(llama.TINY, rngs=nnx.Rngs(0), attention_fn=flash_attention_fn("xla"))
  cache = llama.init_cache(llama.TINY, 1, 8)
  with pytest.raises(ValueError, match=r"flash_attention_fn: queries \(3\) and keys \(8\) must be the same"):
    model(jnp.zeros((1, 3), jnp.int32), cache=cache)


def test_flash_attention_fn_refuses_unknown_keywords():
  with pytest.raises(ValueError, match=r"unexpected keyword arguments \['window'\]"):
    flash_attention_fn("xla", window=4)


def test_llama_with_flash_attention_sharded_fsdp_tp_equals_single_device():
  """Under a mesh the adapter runs the kernel in shard_map (batch on data/fsdp, heads on tensor): logits and
  gradients equal one device's, and the attention output stays split by heads (no gather onto each device)."""
  from efficient import sharding
  from efficient.attention.flash import activation_spec
  batch, length = 4, 16
  tokens = jax.random.randint(jax.random.key(2), (batch, length), 0, llama.TINY.vocab_size, dtype=jnp.int32)
  segment_ids = jnp.asarray(np.where(np.arange(length)[None] < np.array([[4], [9], [16], [7]]), 1, 2), jnp.int32)
  positions = jnp.asarray(np.where(segment_ids == 1, np.arange(length), np.arange(length) - [[4], [9], [16], [7]]),
                          jnp.int32)
  attention_fn = flash_attention_fn("xla", block_q=8, block_kv=8)
  expected_logits, expected_grads = _logits_and_grads(attention_fn, tokens, positions, segment_ids)

  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  assert activation_spec(mesh, (batch, length, 4, 16), (batch, length, 2, 16)) == \
      jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
  # 3 kv heads are not divisible by tensor=2: heads stay whole for q and k/v alike (GQA grouping intact).
  assert activation_spec(mesh, (batch, length, 6, 16), (batch, length, 3, 16))[2] is None
  model = llama.Llama(llama.TINY, rngs=nnx.Rngs(0), attention_fn=attention_fn)
  assert sharding.shard_model(model, mesh, "fsdp_tp") == []
  graphdef, params = nnx.split(model)
  place = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, "fsdp_tp"))

  def loss(params, tokens, positions, segment_ids):
    logits = nnx.merge(graphdef, params)(tokens, positions=positions, segment_ids=segment_ids)
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)), logits

  with jax.set_mesh(mesh):
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, logits), grads = step(params, place(tokens), place(positions), place(segment_ids))
    hlo = step.lower(params, place(tokens), place(positions), place(segment_ids)).as_text()
  assert "shard_map" in hlo or "manual" in hlo.lower()  # the kernel ran per shard
  assert len(logits.sharding.device_set) == 8
  assert_close("logits", logits, expected_logits, 1e-5)
  for index, (grad, expected) in enumerate(zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads))):
    assert_close(f"grad leaf {index}", grad, expected, 1e-5)
