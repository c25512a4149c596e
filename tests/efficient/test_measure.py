"""measure.py against hand calculations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient import measure
from efficient.models.llama import SMOLLM2_135M, TINY, Llama
from efficient.train import batch_loss


def _llama_parameter_count(c):
  """Embedding (tied head) + per layer q, k, v, o, gate, up, down and two norm scales + the final norm."""
  attention = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = 3 * c.embed_dim * c.mlp_dim
  return c.vocab_size * c.embed_dim + c.num_layers * (attention + mlp + 2 * c.embed_dim) + c.embed_dim


def test_parameter_bytes_of_tiny_llama():
  count = _llama_parameter_count(TINY)
  assert count == 256 * 64 + 2 * (4096 + 4096 + 4096 + 24576 + 128) + 64 == 90432
  assert _llama_parameter_count(SMOLLM2_135M) == 134_515_008  # the formula against the published size
  model = Llama(TINY, rngs=nnx.Rngs(0))
  result = measure.parameter_bytes(model)
  assert result == {"total": 4 * count, "count": count, "by_dtype": {"float32": 4 * count}}
  assert measure.parameter_count(model) == count


def test_parameter_bytes_by_dtype_and_rng_state_excluded():
  tree = {"a": jnp.zeros((3, 4), jnp.bfloat16), "b": np.zeros(5, np.int8), "c": [jnp.zeros(2, jnp.float32)]}
  assert measure.parameter_bytes(tree) == {"total": 24 + 5 + 8, "count": 19,
                                           "by_dtype": {"bfloat16": 24, "float32": 8, "int8": 5}}

  class WithDropout(nnx.Module):
    def __init__(self):
      self.linear = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      self.dropout = nnx.Dropout(0.1, rngs=nnx.Rngs(1))  # holds RNG key and count: not parameters

  assert measure.parameter_bytes(WithDropout())["total"] == (3 * 4 + 4) * 4


def _matmul_tanh(w, x):
  return jnp.sum(jnp.tanh(x @ w))


def test_saved_residuals_of_matmul_tanh():
  w, x = jnp.ones((16, 32)), jnp.ones((8, 16))
  result = measure.saved_residual_bytes(_matmul_tanh, w, x)
  # The matmul's backward needs x (for dw) and w (for dx); tanh's JVP, g (1 + y)(1 - y), keeps y and 1 - y.
  assert result["arguments"] == (16 * 32 + 8 * 16) * 4
  assert result["activations"] == 2 * 8 * 32 * 4
  assert result["total"] == result["arguments"] + result["activations"] and result["count"] == 4
  assert result["largest"][0][:2] == (1024, "float32[8, 32]")
  # Full remat saves nothing computed: only the inputs.
  remat = measure.saved_residual_bytes(jax.checkpoint(_matmul_tanh), w, x)
  assert remat["activations"] == 0 and remat["arguments"] == result["arguments"]


def test_saved_residuals_of_a_llama_step_grow_linearly_with_batch():
  model = Llama(TINY, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def activations(batch_size):
    tokens = jnp.zeros((batch_size, 32), jnp.int32)
    batch = {"tokens": tokens, "targets": tokens, "positions": tokens, "segment_ids": tokens + 1,
             "loss_mask": jnp.ones(tokens.shape)}
    loss = lambda p: batch_loss(nnx.merge(graphdef, p), batch)[0]
    return measure.saved_residual_bytes(loss, params)

  one, two, three = (activations(b) for b in (1, 2, 3))
  # Argument residuals are weights the backward reads directly: batch-independent, at most all parameters
  # (the tied head saves embedding.T, an activation, instead of the embedding).
  assert one["arguments"] == three["arguments"] <= measure.parameter_bytes(model)["total"]
  assert two["activations"] - one["activations"] == three["activations"] - two["activations"] > 0
  # At least the [B, T, V] f32 logits' softmax is kept per example.
  assert two["activations"] - one["activations"] >= 32 * 256 * 4


def test_compiled_cost_of_a_matmul():
  x, w = jnp.ones((8, 16)), jnp.ones((16, 32))
  cost = measure.compiled_cost(lambda a, b: a @ b, x, w)
  assert cost["flops"] == 2 * 8 * 16 * 32
  assert cost["bytes_accessed"] == (8 * 16 + 16 * 32 + 8 * 32) * 4
  assert cost["argument_bytes"] == (8 * 16 + 16 * 32) * 4
  assert cost["output_bytes"] == 8 * 32 * 4


def test_kernel_cost_of_forward_by_formula():
  batch, seq_len, c = 4, 64, TINY
  tokens = batch * seq_len
  cost = measure.kernel_cost_of_forward(c, batch, seq_len)
  # Matmul flops are 2 x tokens x matmul weights (no block padding at these sizes); attention is two
  # [T, T] x head_dim products per head; RMSNorm 4 flops per element, 2 per layer + the final one.
  matmul_weights = _llama_parameter_count(c) - (2 * c.num_layers + 1) * c.embed_dim
  attention = c.num_layers * 4 * batch * c.num_heads * seq_len**2 * c.head_dim
  norms = (2 * c.num_layers + 1) * 4 * tokens * c.embed_dim
  assert cost["flops"] == 2 * tokens * matmul_weights + attention + norms
  assert cost["by_kernel"]["attention"]["flops"] == attention
  assert cost["by_kernel"]["lm_head"]["flops"] == 2 * tokens * 64 * 256
  # Ideal bytes of the matmuls: each weight read once, each [tokens, k] input and [tokens, n] output once.
  io = {"q": 64 + 64, "k": 64 + 32, "v": 64 + 32, "o": 64 + 64, "gate": 64 + 128, "up": 64 + 128, "down": 128 + 64}
  for name, elements in io.items():
    weights = {"q": 64 * 64, "k": 64 * 32, "v": 64 * 32, "o": 64 * 64}.get(name, 64 * 128)
    assert cost["by_kernel"][name]["ideal_bytes"] == c.num_layers * 4 * (weights + tokens * elements), name
  assert cost["ideal_bytes"] <= cost["hbm_bytes"]
  assert measure.kernel_cost_of_forward(c, batch, seq_len, dtype=jnp.bfloat16)["ideal_bytes"] * 2 == \
      cost["ideal_bytes"]
  with pytest.raises(ValueError, match="seq_len"):
    measure.kernel_cost_of_forward(c, 1, 0)


def test_kernel_flops_agree_with_xla_on_the_real_forward():
  """XLA counts every op of the compiled forward: at least the kernels' flops, and not much more."""
  model = Llama(TINY, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jnp.zeros((2, 64), jnp.int32)
  xla = measure.compiled_cost(lambda s, t: nnx.merge(graphdef, s)(t), state, tokens)
  kernels = measure.kernel_cost_of_forward(TINY, 2, 64)
  assert kernels["flops"] <= xla["flops"] <= 1.3 * kernels["flops"]
