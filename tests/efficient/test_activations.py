"""efficient.activations: Mesa-style int8-saved SiLU/GELU/softmax against NumPy re-derivations, and the remat
presets on the tiny Llama (same loss and gradients, fewer saved bytes)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special

from efficient import activations, measure, train
from efficient.models import llama

try:
  from jax.ad_checkpoint import saved_residuals
except ImportError:  # jax 0.10 keeps the list form private
  from jax._src.ad_checkpoint import saved_residuals


# --- NumPy re-derivations -------------------------------------------------------------------------------------

def _np_dequantized(x, levels, low):
  """Per-row (last axis) absmax codes -> dequantized values, in float64."""
  x = np.asarray(x, np.float64)
  absmax = np.abs(x.astype(np.float32)).max(-1, keepdims=True).astype(np.float64)
  scale = np.where(absmax > 0, absmax / levels, 1.0).astype(np.float32).astype(np.float64)
  codes = np.clip(np.round((x / scale).astype(np.float32)), low, levels)
  return codes * scale


def _np_silu_grad(x):
  s = 1 / (1 + np.exp(-x))
  return s * (1 + x * (1 - s))


def _np_gelu_grad(x):
  return 0.5 * (1 + special.erf(x / np.sqrt(2))) + x * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)


def _np_gelu_tanh_grad(x):
  c = np.sqrt(2 / np.pi)
  t = np.tanh(c * (x + 0.044715 * x ** 3))
  return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


ELEMENTWISE = {
    "silu": (activations.int8_saved_silu, jax.nn.silu, _np_silu_grad),
    "gelu": (activations.int8_saved_gelu, lambda x: jax.nn.gelu(x, approximate=False), _np_gelu_grad),
    "gelu_tanh": (lambda x: activations.int8_saved_gelu(x, approximate=True),
                  lambda x: jax.nn.gelu(x, approximate=True), _np_gelu_tanh_grad),
}


def _inputs(shape=(3, 8, 96), seed=0):
  kx, kg = jax.random.split(jax.random.key(seed))
  return 3.0 * jax.random.normal(kx, shape, jnp.float32), jax.random.normal(kg, shape, jnp.float32)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_int8_saved_elementwise_forward_exact_gradient_at_dequantized_input(name):
  saved_fn, float_fn, np_grad = ELEMENTWISE[name]
  x, g = _inputs()
  x = x.at[0, 0].set(0.0)  # an all-zero row: scale 1, codes 0, gradient f'(0)
  np.testing.assert_array_equal(jax.jit(saved_fn)(x), jax.jit(float_fn)(x))
  y, vjp = jax.vjp(saved_fn, x)
  np.testing.assert_array_equal(y, float_fn(x))
  (dx,) = vjp(g)
  expected = np.asarray(g, np.float64) * np_grad(_np_dequantized(x, 127.0, -127.0))
  np.testing.assert_allclose(dx, expected, rtol=2e-5, atol=1e-5)  # f32 tails (tanh saturates)
  exact = np.asarray(g, np.float64) * np_grad(np.asarray(x, np.float64))
  assert _rel(dx, exact) <= 2e-2
  assert _rel(dx, exact) > 0  # the residual really is quantized


@pytest.mark.parametrize("axis", [-1, 1])
def test_int8_saved_softmax_saves_quantized_output_probabilities(axis):
  x, g = _inputs((3, 40, 24), seed=1)
  saved = lambda v: activations.int8_saved_softmax(v, axis=axis)
  np.testing.assert_array_equal(jax.jit(saved)(x), jax.jit(lambda v: jax.nn.softmax(v, axis=axis))(x))
  (dx,) = jax.vjp(saved, x)[1](g)
  y = np.moveaxis(np.asarray(jax.nn.softmax(x, axis=axis), np.float64), axis, -1)
  y_hat = np.moveaxis(_np_dequantized(y, 255.0, 0.0), -1, axis)
  g64 = np.asarray(g, np.float64)
  expected = y_hat * (g64 - (g64 * y_hat).sum(axis, keepdims=True))
  np.testing.assert_allclose(dx, expected, rtol=1e-4, atol=1e-6)
  y = np.moveaxis(y, -1, axis)
  exact = y * (g64 - (g64 * y).sum(axis, keepdims=True))
  assert 0 < _rel(dx, exact) <= 2e-2


@pytest.mark.parametrize("name", ["silu", "gelu", "softmax"])
def test_int8_saved_residual_is_one_byte_per_element(name):
  saved_fn = activations.int8_saved_softmax if name == "softmax" else ELEMENTWISE[name][0]
  float_fn = jax.nn.softmax if name == "softmax" else ELEMENTWISE[name][1]
  x, _ = _inputs((4, 16, 128))
  loss = lambda f: (lambda v: jnp.sum(f(v)))  # a plain sum needs no residual: every one is f's own
  saved, floated = measure.saved_residual_bytes(loss(saved_fn), x), measure.saved_residual_bytes(loss(float_fn), x)
  rows = x.size // x.shape[-1]
  # codes (1 B/elem) + one f32 scale per row + a scalar carrying the dtype
  assert saved["activations"] == x.size + 4 * rows + 4
  assert floated["activations"] >= 4 * x.size
  assert saved["activations"] / floated["activations"] < 0.27


def test_int8_saved_keeps_bf16_dtype():
  x = jnp.linspace(-4, 4, 256, dtype=jnp.bfloat16).reshape(2, 128)
  dx = jax.grad(lambda v: activations.int8_saved_silu(v).astype(jnp.float32).sum())(x)
  assert dx.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dx, np.float32), _np_silu_grad(_np_dequantized(np.asarray(x, np.float32),
                                                                                       127.0, -127.0)), atol=2e-2)


# --- the tiny Llama -------------------------------------------------------------------------------------------

BATCH, LENGTH = 2, 16


@pytest.fixture(scope="module")
def batch():
  tokens = jax.random.randint(jax.random.key(3), (BATCH, LENGTH + 1), 0, llama.TINY.vocab_size, dtype=jnp.int32)
  # two packed documents in row 0, so positions and segment ids travel through the remat'd blocks
  segments = jnp.asarray([[1] * 9 + [2] * 7, [1] * LENGTH], jnp.int32)
  positions = jnp.asarray([list(range(9)) + list(range(7)), list(range(LENGTH))], jnp.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions, "segment_ids": segments,
          "loss_mask": jnp.ones((BATCH, LENGTH), jnp.int32)}


def _loss_and_params(config, batch):
  graphdef, params, rest = nnx.split(llama.Llama(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
  return (lambda p: train.batch_loss(nnx.merge(graphdef, p, rest), batch)[0]), params


@pytest.fixture(scope="module")
def runs(batch):
  """{(remat, saved): (loss, grads, saved-residual bytes, residual list)} of the tiny Llama (loss and grads
  compiled only where a test compares them: each compile costs seconds)."""
  out = {}
  for remat, saved in [("none", "float"), ("block", "float"), ("dots_saveable", "float"), ("names", "float"),
                       ("none", "int8")]:
    loss_fn, params = _loss_and_params(llama.TINY.replace(remat=remat, saved_activations=saved), batch)
    loss, grads = (None, None) if remat in ("dots_saveable", "names") else jax.jit(jax.value_and_grad(loss_fn))(params)
    out[remat, saved] = (loss, grads, measure.saved_residual_bytes(loss_fn, params),
                         saved_residuals(loss_fn, params))
  return out


def test_remat_presets_keep_loss_and_grads_and_save_less(runs):
  loss, grads, base, _ = runs["none", "float"]
  for remat in ("block",):
    other_loss, other_grads, _, _ = runs[remat, "float"]
    assert float(other_loss) == float(loss), remat  # remat changes only what the backward recomputes
    for a, b in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=remat)
  block = runs["block", "float"][2]["activations"]
  for remat in ("dots_saveable", "names"):
    assert block < runs[remat, "float"][2]["activations"] < base["activations"], remat
  assert block < 0.5 * base["activations"]


def test_block_remat_saves_only_block_inputs(runs):
  """Under 'block' a layer keeps its input hidden state [B, T, D] and nothing else of size B*T*F (mlp width)."""
  residuals = runs["block", "float"][3]
  c = llama.TINY
  mlp_sized = [aval for aval, source in residuals if aval.shape == (BATCH, LENGTH, c.mlp_dim)]
  assert mlp_sized == []
  named = [source for _, source in runs["names", "float"][3] if source.startswith("named")]
  assert sum(activations.MLP_HIDDEN in s for s in named) == c.num_layers
  assert sum(activations.ATTENTION_OUT in s for s in named) == c.num_layers


def test_int8_saved_silu_in_tiny_llama(runs):
  c = llama.TINY
  float_loss, float_grads, float_bytes, _ = runs["none", "float"]
  int8_loss, int8_grads, int8_bytes, residuals = runs["none", "int8"]
  assert float(int8_loss) == float(float_loss)  # the forward is exact
  for a, b in zip(jax.tree.leaves(int8_grads), jax.tree.leaves(float_grads)):
    assert _rel(a, b) <= 2e-2
  codes = [aval for aval, _ in residuals if aval.dtype == jnp.int8]
  assert [tuple(a.shape) for a in codes] == [(BATCH, LENGTH, c.mlp_dim)] * c.num_layers
  scales = [aval for aval, _ in residuals if tuple(aval.shape) == (BATCH, LENGTH, 1) and aval.dtype == jnp.float32]
  assert len(scales) >= c.num_layers
  # float SiLU keeps at least two f32 [B, T, F] tensors a layer (its input and sigmoid); int8 keeps 1 B/elem
  elements = BATCH * LENGTH * c.mlp_dim
  saving = float_bytes["activations"] - int8_bytes["activations"]
  assert saving >= c.num_layers * (2 * 4 * elements - elements - 4 * BATCH * LENGTH - 4)


@pytest.mark.parametrize("field, value", [("remat", "full"), ("remat", None), ("saved_activations", "int4")])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"LlamaConfig.{field}="):
    llama.TINY.replace(**{field: value})


def test_bad_arguments_and_signatures():
  with pytest.raises(ValueError, match="remat="):
    activations.checkpoint_policy("everything")
  with pytest.raises(ValueError, match="axis"):
    activations.int8_saved_softmax(jnp.ones((2, 3)), axis=2)
  assert "remat" not in llama.TINY.to_dict() and "saved_activations" not in llama.TINY.to_dict()
  assert llama.TINY.replace(remat="names").to_dict()["remat"] == "names"
  assert activations.checkpoint_policy("none") is None


def test_bert_int8_saved_gelu_same_forward_int8_residual():
  from efficient.models import bert
  base = bert.TINY_BERT.replace(attention_implementation="reference")  # the fastest path run eagerly
  config = base.replace(saved_activations="int8")
  models = [bert.Bert(base, rngs=nnx.Rngs(0)), nnx.eval_shape(lambda: bert.Bert(config, rngs=nnx.Rngs(0)))]
  nnx.update(models[1], nnx.state(models[0]))  # the same weights, without a second (slow, eager) init
  ids = jax.random.randint(jax.random.key(5), (2, 8), 0, config.vocab_size, dtype=jnp.int32)
  np.testing.assert_array_equal(models[1](ids), models[0](ids))
  graphdef, params, rest = nnx.split(models[1], nnx.Param, ...)
  residuals = saved_residuals(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(ids)), params)
  codes = [tuple(aval.shape) for aval, _ in residuals if aval.dtype == jnp.int8]
  assert codes == [(2, 8, config.mlp_dim)] * config.num_layers
  assert "saved_activations" not in bert.TINY_BERT.to_dict()
  with pytest.raises(ValueError, match="BertConfig.saved_activations"):
    bert.TINY_BERT.replace(activation="relu", saved_activations="int8")
