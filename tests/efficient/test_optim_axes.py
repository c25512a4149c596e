"""efficient.optim.axes: optimizer-state leaves named after their params, for optax transformations as they are."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efficient import nn, sharding
from efficient.optim import axes


class TwoParams(nnx.Module):
  def __init__(self):
    key = jax.random.key(0)
    self.w = nn.logical_param(jax.random.normal(key, (256, 384)), ("embed", "mlp"))
    self.b = nn.logical_param(jnp.linspace(-1.0, 1.0, 384), ("mlp",))


@pytest.mark.parametrize("shape, expected", [
    ((256, 384), ("embed", "mlp")),            # a moment
    ((256, 3), ("embed", "mlp")),              # block scales [*lead, n_blocks] of blocks along the last axis
    ((256, 3, 128), ("embed", "mlp", None)),   # blocked codes [*lead, n_blocks, block]
    ((384,), ("mlp",)),                        # a row statistic: the embed dim removed
    ((256,), ("embed",)),                      # a column statistic: the mlp dim removed
    ((256, 8), ("embed", "mlp")),              # a same-rank projection [m, rank]: names by position
    ((8, 384, 2, 2), (None, "mlp", None, None)),  # anything else: equal sizes keep their names
    ((), ()),
])
def test_state_leaf_names_rules(shape, expected):
  assert axes.state_leaf_names(shape, (256, 384), ("embed", "mlp")) == expected


def _named_shapes(state):
  leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=axes.is_variable)[0]
  return {jax.tree_util.keystr(p): (leaf.get_value().shape, leaf.get_metadata()["out_sharding"])
          for p, leaf in leaves if axes.is_variable(leaf)}


def test_adafactor_state_gets_names_of_its_own_rank_and_shards():
  _, params = nnx.split(TwoParams(), nnx.Param)
  tx = axes.named(optax.adafactor(1e-2))
  state = tx.init(params)
  shapes = _named_shapes(state)
  # optax keeps the param's names on factored rows of another rank; named() derives them from the shapes
  row = next(v for k, v in shapes.items() if "v_row" in k and "'w'" in k)
  col = next(v for k, v in shapes.items() if "v_col" in k and "'w'" in k)
  assert row == ((256,), ("embed",)) and col == ((384,), ("mlp",))
  mesh = sharding.make_mesh("fsdp:2,tensor:4")
  shardings = sharding.state_shardings(state, mesh, "fsdp_tp")
  specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  assert specs[next(k for k in specs if "v_row" in k and "'w'" in k)] == jax.sharding.PartitionSpec("fsdp")


def test_named_updates_equal_the_plain_transformation_and_keep_the_tree():
  _, params = nnx.split(TwoParams(), nnx.Param)
  grads = jax.tree.map(lambda p: jnp.cos(p * 3.0), params)
  plain_params = axes.unwrap(params)
  plain_grads = axes.unwrap(grads)
  for tx in (optax.adafactor(1e-2), optax.adamw(1e-2, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))):
    named = axes.named(tx)
    state, plain_state = named.init(params), tx.init(plain_params)
    for _ in range(3):
      updates, new_state = jax.jit(named.update)(grads, state, params)
      assert jax.tree.structure(new_state) == jax.tree.structure(state)  # jit donation / out_shardings hold
      assert type(updates["w"]) is nnx.Param  # the grads' own variables: apply_updates(params, updates) works
      plain_updates, plain_state = jax.jit(tx.update)(plain_grads, plain_state, plain_params)
      for key in ("w", "b"):
        np.testing.assert_array_equal(np.asarray(updates[key].get_value()), np.asarray(plain_updates[key]))
      state = new_state
    moved = optax.apply_updates(params, updates)
    assert type(moved["w"]) is nnx.Param


def test_unnamed_params_leave_state_plain():
  params = {"w": jnp.ones((4, 4))}
  state = axes.named(optax.adam(1e-3)).init(params)
  assert not any(axes.is_variable(x) for x in jax.tree.leaves(state, is_leaf=axes.is_variable))
