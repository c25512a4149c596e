"""Sparse layers and sparse training: masked Einsum (forward, masked gradient, logical axes), block-sparse Einsum in
a Llama equal to the dense masked model, the optax wrapper keeping pruned weights at zero, RigL drop/grow."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efficient import calibration, sparse
from efficient.models import llama
from efficient.sparse import layers, training
from tests.helpers import assert_close


def _model():
  return llama.Llama(llama.TINY, rngs=nnx.Rngs(0))


def _tokens(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (2, 16)), jnp.int32)


def _masks(model, pattern=r".*/mlp/(gate|up|down)", sparsity=0.5):
  """Kernel-shaped magnitude masks (chosen on each kernel's [in, out] matrix view)."""
  return {path: calibration.matrix_to_kernel(m, sparse.unstructured_mask(jnp.abs(calibration.kernel_as_matrix(m)),
                                                                         sparsity))
          for path, m in calibration.einsum_modules(model, pattern).items()}


def test_sparse_einsum_matches_dense_masked_and_masks_gradients():
  model, reference = _model(), _model()
  masks = _masks(model)
  layers.apply_masks(model, masks)
  for path, mask in masks.items():  # the reference: plain Einsums holding the masked kernels
    module = calibration.get_module(reference, path)
    module.kernel[...] = jnp.where(mask, module.kernel[...], 0)
  tokens = _tokens()
  assert_close("logits", model(tokens), reference(tokens), 1e-6)
  gate = calibration.get_module(model, "blocks/0/mlp/gate")
  assert isinstance(gate, layers.SparseEinsum)
  assert gate.mask.get_metadata()["out_sharding"] == ("embed", "mlp")  # shards with its kernel
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grads = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens) ** 2))(params)
  gate_grad = np.asarray(grads["blocks"][0]["mlp"]["gate"]["kernel"][...])
  assert np.all(gate_grad[~np.asarray(masks["blocks/0/mlp/gate"])] == 0) and np.any(gate_grad != 0)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_block_sparse_einsum_in_a_llama_equals_the_masked_dense_model(implementation):
  model = _model()
  reference = _model()
  block_masks = {}
  for path, module in calibration.einsum_modules(model, r".*/mlp/.*").items():
    matrix = calibration.kernel_as_matrix(module)
    mask, blocks = sparse.block_mask(jnp.abs(matrix), (32, 32), 0.5, return_blocks=True)
    block_masks[path] = blocks
    for target in (module, calibration.get_module(reference, path)):
      target.kernel[...] = calibration.matrix_to_kernel(target, jnp.where(mask, matrix, 0))
  swapped = layers.to_block_sparse(model, r".*/mlp/.*", (32, 32), implementation=implementation)
  assert len(swapped) == 6
  for path, module in swapped.items():
    assert module.matrix().nnz_blocks == int(np.asarray(block_masks[path]).sum())
    assert module.nbytes() < 0.6 * 64 * 128 * 4  # half the blocks plus small tables
  tokens = _tokens(1)
  assert_close("logits", model(tokens), reference(tokens), 1e-5)
  graphdef, state = nnx.split(model)  # and through jit, as a split state
  assert_close("jit logits", jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens), reference(tokens), 1e-5)


def _train(model, optimizer, steps=5):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = optimizer.init(params)
  loss = lambda p, t: jnp.mean(nnx.merge(graphdef, p, rest)(t) ** 2)
  step = jax.jit(lambda p, s, t: (lambda g: (lambda u, s: (optax.apply_updates(p, u), s, g))(
      *optimizer.update(g, s, p)))(jax.grad(loss)(p, t)))
  grads = None
  for i in range(steps):
    params, opt_state, grads = step(params, opt_state, _tokens(i))
  return params, opt_state, grads


def test_sparse_updates_keep_pruned_weights_at_zero_under_adamw():
  model = _model()
  masks = _masks(model)
  for path, mask in masks.items():
    module = calibration.get_module(model, path)
    module.kernel[...] = jnp.where(mask, module.kernel[...], 0)
  before = {p: np.asarray(calibration.get_module(model, p).kernel[...]) for p in masks}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  mask_tree = training.masks_for(params, masks)
  optimizer = training.sparse_updates(optax.adamw(1e-2, weight_decay=0.1), mask_tree)
  params, _, _ = _train(model, optimizer)
  for path, mask in masks.items():
    kernel = np.asarray(calibration.get_module(nnx.merge(graphdef, params, rest), path).kernel[...])
    assert np.all(kernel[~np.asarray(mask)] == 0)
    assert np.mean(kernel[np.asarray(mask)] != before[path][np.asarray(mask)]) > 0.9  # the rest trains
  # Plain AdamW would have moved the pruned weights (weight decay alone keeps zeros; Adam's update does not).
  plain, _, _ = _train(_model_with(masks), optax.adamw(1e-2, weight_decay=0.1))
  kernel = np.asarray(plain["blocks"][0]["mlp"]["gate"]["kernel"][...])
  assert np.mean(kernel[~np.asarray(masks["blocks/0/mlp/gate"])] != 0) > 0.9


def _model_with(masks):
  model = _model()
  for path, mask in masks.items():
    module = calibration.get_module(model, path)
    module.kernel[...] = jnp.where(mask, module.kernel[...], 0)
  return model


def test_rigl_drops_smallest_and_grows_largest_gradients():
  param = jnp.asarray([[0.5, -0.1, 0.0, 0.0], [0.3, 0.05, 0.0, 0.0]])
  mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 0, 0]], jnp.float32)
  grad = jnp.asarray([[0.0, 0.0, 0.2, -0.9], [0.0, 0.0, 0.1, 0.3]])
  new = np.asarray(training.rigl_mask(param, grad, mask, 0.5))  # k = 2 of 4 active
  np.testing.assert_array_equal(new, [[1, 0, 0, 1], [1, 0, 0, 1]])  # drop 0.05, -0.1; grow -0.9, 0.3


def test_sparse_updates_with_rigl_keep_the_active_count_and_zero_dropped_weights():
  model = _model_with(_masks(_model(), r"blocks/0/mlp/gate"))
  masks = _masks(model, r"blocks/0/mlp/gate")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  optimizer = training.sparse_updates(optax.sgd(1e-2), training.masks_for(params, masks), rigl_every=2,
                                      drop_fraction=0.3, rigl_end_step=100)
  params, opt_state, _ = _train(model, optimizer, steps=3)  # the step-2 update ran drop/grow
  new_mask = np.asarray(opt_state.masks["blocks"][0]["mlp"]["gate"]["kernel"][...])
  old_mask = np.asarray(masks["blocks/0/mlp/gate"], np.float32)
  assert new_mask.sum() == old_mask.sum() and np.sum(new_mask != old_mask) > 0
  kernel = np.asarray(params["blocks"][0]["mlp"]["gate"]["kernel"][...])
  assert np.all(kernel[new_mask == 0] == 0)


def test_bad_input():
  model = _model()
  _, params, _ = nnx.split(model, nnx.Param, ...)
  with pytest.raises(ValueError, match=r"^masks\['blocks/0/mlp/gate'\] has shape \(3, 3\)"):
    training.masks_for(params, {"blocks/0/mlp/gate": jnp.ones((3, 3))})
  with pytest.raises(ValueError, match=r"^masks_by_path: no parameter 'kernel' at \['nowhere'\]"):
    training.masks_for(params, {"nowhere": jnp.ones((3, 3))})
  with pytest.raises(ValueError, match=r"^rigl_every=0 must be a positive int"):
    training.sparse_updates(optax.sgd(1.0), {}, rigl_every=0)
  with pytest.raises(ValueError, match=r"^masks: no linear layer at \['blocks/9/mlp/gate'\]"):
    layers.apply_masks(model, {"blocks/9/mlp/gate": jnp.ones((64, 128))})
  with pytest.raises(ValueError, match=r"^mask has shape \(3, 3\); the weight it masks has shape \(64, 128\)"):
    layers.apply_masks(model, {"blocks/0/mlp/gate": jnp.ones((3, 3))})


def test_masked_model_sharded_fsdp_tp_equals_single_device():
  from efficient import sharding
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, llama.TINY.vocab_size, dtype=jnp.int32)
  single = _model()
  masks = _masks(single, r".*/(mlp/.*|attention/q)")
  layers.apply_masks(single, masks)
  expected = np.asarray(jax.jit(lambda m, t: m(t))(single, tokens))
  model = _model()
  layers.apply_masks(model, masks)
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  assert sharding.shard_model(model, mesh, "fsdp_tp") == []
  gate = model.blocks[0].mlp.gate
  kernel, mask = gate.kernel[...], gate.mask[...]
  assert mask.sharding.shard_shape(mask.shape) == kernel.sharding.shard_shape(kernel.shape) == (32, 64)
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda m, t: m(t))(model, jax.device_put(tokens, sharding.batch_sharding(mesh, "fsdp_tp")))
  assert len(logits.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5, rtol=1e-5)


def test_block_sparse_model_sharded_fsdp_tp_equals_single_device():
  from efficient import sharding
  tokens = jax.random.randint(jax.random.key(2), (8, 16), 0, llama.TINY.vocab_size, dtype=jnp.int32)

  def build():  # MLPs at 50% block sparsity, stored block-sparse; attention/o has a flattened (heads, head_dim) side
    model = _model()
    layers.apply_masks(model, {path: calibration.matrix_to_kernel(m, sparse.block_mask(
        jnp.abs(calibration.kernel_as_matrix(m)), (16, 16), 0.5)) for path, m in
        calibration.einsum_modules(model, r".*/(mlp/.*|attention/o)").items()})
    layers.to_block_sparse(model, r".*/(mlp/.*|attention/o)", (16, 16), implementation="xla")
    return model

  expected = np.asarray(jax.jit(lambda m, t: m(t))(build(), tokens))
  model = build()
  gate, down, out = model.blocks[0].mlp.gate, model.blocks[0].mlp.down, model.blocks[0].attention.o
  assert gate.values.get_metadata()["out_sharding"] == (None, "embed", "mlp")
  assert down.values.get_metadata()["out_sharding"] == (None, "mlp", "embed")
  assert out.values.get_metadata()["out_sharding"] == (None, None, "embed")  # rows flatten heads x head_dim
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  assert sharding.shard_model(model, mesh, "fsdp_tp") == []
  values = gate.values[...]
  assert values.sharding.shard_shape(values.shape) == (values.shape[0], 8, 8)  # embed on fsdp, mlp on tensor
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda m, t: m(t))(model, jax.device_put(tokens, sharding.batch_sharding(mesh, "fsdp_tp")))
  assert len(logits.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5, rtol=1e-5)
