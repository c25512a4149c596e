"""The trainer takes every optimizer by name: bit-identical resume, named state leaves that shard with their
params, a sharded (fsdp, 8 devices) step equal to one device, and a checkpoint of another optimizer refused."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from efficient import data, optim, sharding
from efficient import train as training
from efficient.models.llama import TINY, Llama
from efficient.optim import axes

MODEL = TINY.replace(num_layers=1)
# Small quantization blocks and threshold so TINY's matrices get quantized (not fp32-fallback) state; a rank
# below the 64-wide embed so GaLore / APOLLO project; a short projection gap so a refresh happens within 4 steps.
CONFIG = training.TrainConfig(learning_rate=3e-3, warmup_steps=1, total_steps=4, batch_size=2, seq_len=32,
                              checkpoint_every=2, keep_checkpoints=2, log_every=1, block_size=64,
                              min_quantized_size=1024, rank=8, update_proj_gap=2)
FIRST_ORDER = [name for name in optim.OPTIMIZERS if name != "mezo"]


def _corpus(batch_size=2, seq_len=32):
  return data.stdlib_dataset("train", batch_size=batch_size, seq_len=seq_len, seed=0, max_files=5)


def _params(model):
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_resume_is_bit_identical_with_every_optimizer(name, tmp_path):
  config = dataclasses.replace(CONFIG, optimizer=name)
  straight = Llama(MODEL, rngs=nnx.Rngs(0))
  straight_run = training.train(straight, _corpus(), config, tmp_path / "straight", progress=False)
  training.train(Llama(MODEL, rngs=nnx.Rngs(0)), _corpus(), config, tmp_path / "split", until_step=2,
                 progress=False)
  resumed = Llama(MODEL, rngs=nnx.Rngs(7))  # overwritten by the restore
  second = training.train(resumed, _corpus(), config, tmp_path / "split", progress=False)
  assert second["step"] == 4
  want, got = _params(straight), _params(resumed)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")
  assert [h["loss"] for h in second["history"]] == [h["loss"] for h in straight_run["history"]][2:]
  # it trained: the parameters moved
  initial = _params(Llama(MODEL, rngs=nnx.Rngs(0)))
  assert any(not np.array_equal(initial[k], want[k]) for k in want), name


@pytest.mark.parametrize("name", FIRST_ORDER)
def test_every_state_leaf_of_a_param_carries_logical_names(name):
  state = training.init_train_state(Llama(MODEL, rngs=nnx.Rngs(0)), dataclasses.replace(CONFIG, optimizer=name))
  named, plain = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state, is_leaf=axes.is_variable)[0]:
    value = leaf.get_value() if axes.is_variable(leaf) else leaf
    if axes.is_variable(leaf):
      names = leaf.get_metadata()["out_sharding"]
      assert len(names) == value.ndim, (name, jax.tree_util.keystr(path), names, value.shape)
      named.append(value.size)
    else:
      plain.append((jax.tree_util.keystr(path), np.shape(value)))
  assert named, name
  # what stays unnamed (replicated) is bookkeeping: step counters, skip counters, seeds
  assert all(np.prod(shape) <= 2 for _, shape in plain), (name, plain)


def test_a_checkpoint_of_another_optimizer_is_refused(tmp_path):
  training.train(Llama(MODEL, rngs=nnx.Rngs(0)), _corpus(), CONFIG, tmp_path, until_step=2, progress=False)
  other = dataclasses.replace(CONFIG, optimizer="adam8bit")
  with pytest.raises(ValueError, match=r"optimizer 'adamw' but TrainConfig.optimizer='adam8bit'"):
    training.train(Llama(MODEL, rngs=nnx.Rngs(0)), _corpus(), other, tmp_path, progress=False,
                   allow_config_change=True)


def test_unknown_optimizer_is_refused():
  with pytest.raises(ValueError, match=r"TrainConfig.optimizer='sgd8bit' is unknown"):
    dataclasses.replace(CONFIG, optimizer="sgd8bit")


# eps 1e-5: Adam-like first updates g / (|g| + eps) amplify reduction-order noise of near-zero gradient entries
# (see tests/efficient/test_train.py); the sharded step is otherwise the same computation.
MESH_CONFIG = dataclasses.replace(CONFIG, batch_size=8, seq_len=32, warmup_steps=0, eps=1e-5, total_steps=2)


# The trainer's sharded path with one optimizer per family of state: block-quantized codes + absmax, SVD
# projections, and no state at all (each transformation's own sharded test covers the rest:
# tests/efficient/test_optim_lowbit.py, test_optim_lowrank.py; AdamW: tests/efficient/test_train.py).
SHARDED = ("adam8bit", "galore", "mezo")


@pytest.mark.parametrize("name", SHARDED)
def test_fsdp_sharded_steps_equal_one_device(name):
  config = dataclasses.replace(MESH_CONFIG, optimizer=name)
  batches = [_corpus(8, 32).batch(s) for s in range(2)]
  mesh = sharding.make_mesh("fsdp:8")
  states = {"one device": training.init_train_state(Llama(MODEL, rngs=nnx.Rngs(0)), config),
            "fsdp:8": training.init_train_state(Llama(MODEL, rngs=nnx.Rngs(0)), config, mesh=mesh, rules="fsdp")}
  losses = {}
  for key, state in states.items():
    step = training.make_train_step(state)
    losses[key] = [float(training.apply_train_step(state, step, batch)["loss"]) for batch in batches]
  np.testing.assert_allclose(losses["fsdp:8"], losses["one device"], rtol=1e-5, err_msg=name)
  # the sharded state really is sharded: the embedding's optimizer state splits its embed dim over fsdp
  shardings = sharding.state_shardings(states["fsdp:8"].opt_state, mesh, "fsdp")
  specs = [s.spec for s in jax.tree.leaves(shardings)]
  if name != "mezo":
    assert any("fsdp" in tuple(spec) for spec in specs), name
  for (path, got), (_, want) in zip(nnx.to_flat_state(states["fsdp:8"].params),
                                    nnx.to_flat_state(states["one device"].params)):
    np.testing.assert_allclose(np.asarray(got[...]), np.asarray(want[...]), rtol=1e-4, atol=2e-5,
                               err_msg=f"{name}: {path}")


def test_training_a_clone_leaves_the_original_intact(tmp_path):
  """The step donates its params: the trainer must own them, not donate buffers an nnx.clone shares."""
  original = Llama(MODEL, rngs=nnx.Rngs(0))
  before = _params(original)
  config = dataclasses.replace(CONFIG, total_steps=2)
  training.train(nnx.clone(original), _corpus(), config, tmp_path, progress=False)
  after = _params(original)  # raised "Array has been deleted" when the clone's training donated shared buffers
  for key in before:
    np.testing.assert_array_equal(after[key], before[key], err_msg=key)
