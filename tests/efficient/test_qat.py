"""efficient.quant.qat: LSQ fake quantization starts at RTN, has STE gradients, and QAT beats RTN after training."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efficient import calibration, data, quant, train
from efficient.models import llama
from efficient.quant import QuantConfig, layers, qat


def test_fake_quant_starts_at_rtn_with_ste_gradients():
  model = llama.Llama(llama.TINY, rngs=nnx.Rngs(0))
  module = model.blocks[0].mlp.gate
  rtn = quant.dequantize(calibrate_rtn(module))
  fake = qat.FakeQuantEinsum(module, qat.QATConfig(bits=4, group_size=32))
  np.testing.assert_allclose(fake.quantized_matrix(), rtn, rtol=1e-6, atol=1e-7)
  w = jax.random.normal(jax.random.key(0), (64, 8))
  step = jnp.full((2, 8), 0.1)
  dw, dstep = jax.grad(lambda w, s: qat.fake_quant(w, s, bits=4, group_size=32).sum(), argnums=(0, 1))(w, step)
  inside = np.abs(np.asarray(w)) < 0.7  # |w / step| < qmax: identity gradient; clipped values: none
  np.testing.assert_array_equal(np.asarray(dw), inside.astype(np.float32))
  assert np.all(np.isfinite(dstep)) and np.any(dstep != 0)
  with pytest.raises(ValueError, match="bits"):
    qat.QATConfig(bits=5)


def calibrate_rtn(module):
  return quant.rtn_quantize(calibration.kernel_as_matrix(module), bits=4, group_size=32)


def _fit(model, batches, learning_rate):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(learning_rate)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda p: train.batch_loss(nnx.merge(graphdef, p, rest), batch)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  for batch in batches:
    params, opt_state, _ = step(params, opt_state, {k: jnp.asarray(v) for k, v in batch.items()})
  nnx.update(model, params)
  return model


def test_qat_beats_rtn_of_the_same_float_model():
  source = data.stdlib_dataset("train", batch_size=8, seq_len=64, max_tokens=200_000)
  batches = [source.batch(i) for i in range(60)]
  held_out = [source.batch(i) for i in range(60, 64)]
  float_model = _fit(llama.Llama(llama.TINY, rngs=nnx.Rngs(0)), batches[:40], 3e-3)
  rules = [(".*", QuantConfig(fmt="int3", group_size=32))]
  rtn_loss = train.evaluate(quant.quantize_model(nnx.clone(float_model), rules), held_out)["loss"]
  qat_model = qat.prepare_qat(nnx.clone(float_model), [(".*", qat.QATConfig(bits=3, group_size=32))])
  fake_loss = train.evaluate(qat_model, held_out)["loss"]
  np.testing.assert_allclose(fake_loss, rtn_loss, rtol=1e-4)  # QAT starts exactly at RTN
  _fit(qat_model, batches[40:], 1e-3)
  fake_loss = train.evaluate(qat_model, held_out)["loss"]
  converted = qat.convert_qat(qat_model)
  assert all(isinstance(m, layers.QuantizedEinsum)
             for m in calibration.einsum_modules(converted, types=(layers.QuantizedEinsum,)).values())
  qat_loss = train.evaluate(converted, held_out)["loss"]
  np.testing.assert_allclose(qat_loss, fake_loss, rtol=1e-4)  # the packed model computes what QAT trained
  assert qat_loss < rtn_loss - 0.01, (qat_loss, rtn_loss)
