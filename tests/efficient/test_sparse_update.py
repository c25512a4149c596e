"""Sparse update (train a chosen subset of parameters/channels): frozen parameters stay bit-identical, the subset
trains exactly as it would alone under plain optax, and the optimizer state holds moments only for the subset."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efficient import measure
from efficient.models import llama
from efficient.sparse import training
from tests.helpers import assert_close

CHANNELS = np.asarray([3, 17, 64, 100, 127])  # output channels of blocks/0/mlp/up (of 128) that train
TRAINABLE = {"blocks/1/mlp/down": None, "blocks/0/mlp/up": CHANNELS}


def _setup():
  graphdef, params, rest = nnx.split(llama.Llama(llama.TINY, rngs=nnx.Rngs(0)), nnx.Param, ...)
  loss = lambda p, tokens: jnp.mean(nnx.merge(graphdef, p, rest)(tokens) ** 2)
  batches = [jax.random.randint(jax.random.key(i), (2, 16), 0, 256, dtype=jnp.int32) for i in range(3)]
  return params, loss, batches


def _kernel(params, path):
  node = params
  for part in path.split("/"):
    node = node[int(part) if part.isdigit() else part]
  return node["kernel"][...]


def test_sparse_update_trains_only_the_subset_like_optax_alone_with_sliced_state():
  params, loss, batches = _setup()
  initial = jax.tree.map(np.asarray, params)
  optimizer = training.sparse_update(optax.adam(1e-2), TRAINABLE)
  opt_state = optimizer.init(params)
  step = jax.jit(lambda p, s, t: (lambda u, s: (optax.apply_updates(p, u), s))(
      *optimizer.update(jax.grad(loss)(p, t), s, p)))
  trained = params
  for tokens in batches:
    trained, opt_state = step(trained, opt_state, tokens)

  # (a) Everything outside the subset is bit-identical: other leaves, and up's untrained channels.
  frozen_up = np.setdiff1d(np.arange(128), CHANNELS)
  flat_before = dict(jax.tree_util.tree_flatten_with_path(initial)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(trained)[0]:
    name = jax.tree_util.keystr(path)
    before = flat_before[path]
    if "[1]['mlp']['down']" in name:
      assert not np.array_equal(np.asarray(leaf), before), name
    elif "[0]['mlp']['up']" in name:
      np.testing.assert_array_equal(np.asarray(leaf)[:, frozen_up], before[:, frozen_up])
      assert np.all(np.asarray(leaf)[:, CHANNELS] != before[:, CHANNELS])
    else:
      np.testing.assert_array_equal(np.asarray(leaf), before, err_msg=name)

  # (b) Reference: the same channels trained alone by plain optax.adam, the rest held as constants.
  def with_subset(sub):
    full = jax.tree.map(lambda x: x, params)
    full["blocks"][1]["mlp"]["down"]["kernel"][...] = sub["down"]
    up = full["blocks"][0]["mlp"]["up"]["kernel"]
    up[...] = up[...].at[:, CHANNELS].set(sub["up"])
    return full

  sub = {"down": initial["blocks"][1]["mlp"]["down"]["kernel"], "up": initial["blocks"][0]["mlp"]["up"]["kernel"][:, CHANNELS]}
  sub = jax.tree.map(jnp.asarray, sub)
  reference = optax.adam(1e-2)
  ref_state = reference.init(sub)
  @jax.jit
  def reference_step(sub, ref_state, tokens):
    updates, ref_state = reference.update(jax.grad(lambda s: loss(with_subset(s), tokens))(sub), ref_state, sub)
    return optax.apply_updates(sub, updates), ref_state

  for tokens in batches:
    sub, ref_state = reference_step(sub, ref_state, tokens)
  # Two differently fused f32 programs: gradients agree to rounding, which Adam's 1/sqrt(v) scaling amplifies.
  assert_close("down", _kernel(trained, "blocks/1/mlp/down"), sub["down"], 2e-5)
  assert_close("up channels", _kernel(trained, "blocks/0/mlp/up")[:, CHANNELS], sub["up"], 2e-5)

  # (c) State bytes: Adam's two f32 moments of the subset (128x64 down + 64x5 up channels) + its int32 count.
  subset_elements = 128 * 64 + 64 * len(CHANNELS)
  assert measure.parameter_bytes(opt_state)["total"] == 2 * 4 * subset_elements + 4 == 68100
  full_adam = measure.parameter_bytes(optax.adam(1e-2).init(params))["total"]
  assert full_adam == 2 * 4 * measure.parameter_count(params) + 4
  moments = opt_state.inner[0].mu
  assert moments["blocks/0/mlp/up"][...].shape == (64, 5)
  assert moments["blocks/0/mlp/up"].get_metadata()["out_sharding"] == ("embed", "mlp")  # shards like its kernel


def test_sparse_update_bad_input():
  params, _, _ = _setup()
  with pytest.raises(ValueError, match=r"^trainable is empty"):
    training.sparse_update(optax.sgd(1.0), {})
  with pytest.raises(ValueError, match=r"^trainable: no parameter at 'blocks/7/mlp/up'"):
    training.sparse_update(optax.sgd(1.0), {"blocks/7/mlp/up": None}).init(params)
  with pytest.raises(ValueError, match=r"^trainable\['blocks/0/mlp/up'\]: channel indices must be distinct ints in \[0, 128\)"):
    training.sparse_update(optax.sgd(1.0), {"blocks/0/mlp/up": [1, 1]}).init(params)
  with pytest.raises(ValueError, match=r"^trainable\['blocks/0/mlp/up'\]: channel indices"):
    training.sparse_update(optax.sgd(1.0), {"blocks/0/mlp/up": [128]}).init(params)
  with pytest.raises(ValueError, match=r"^trainable\['blocks/0/mlp/up'\]: axis=2 is not an axis"):
    training.sparse_update(optax.sgd(1.0), {"blocks/0/mlp/up": training.Channels([0], axis=2)}).init(params)
