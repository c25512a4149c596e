"""The trainer with a frozen base: only adapters train (and get optimizer state), freezing by path, bit-identical
resume with adapter dropout (RNG counters checkpointed), sharded fsdp_tp fine-tuning = one device."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from efficient import data, nn, peft, sharding
from efficient import train as training
from efficient.models.llama import TINY, Llama

CONFIG = training.TrainConfig(learning_rate=3e-3, warmup_steps=0, total_steps=6, batch_size=4, seq_len=32,
                              checkpoint_every=3, keep_checkpoints=2, log_every=1, trainable="adapters",
                              weight_decay=0.0)
TARGETS = [(r"blocks/\d+/(attention/(q|v)|mlp/down)", peft.LoRAConfig(rank=4, alpha=8.0, dropout=0.1))]


def _corpus():
  return data.stdlib_dataset("train", batch_size=4, seq_len=32, seed=0, max_files=5)


def _adapted(seed=0):
  model = Llama(TINY, rngs=nnx.Rngs(0))
  peft.add_adapters(model, TARGETS, seed=seed)
  return model


def _arrays(model, kind):
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, kind))}


def _base(model):
  adapters = _arrays(model, nn.Adapter)
  return {k: v for k, v in _arrays(model, nnx.Param).items() if k not in adapters}


def test_only_adapters_train_and_hold_optimizer_state(tmp_path):
  model = _adapted()
  base_before, adapters_before = _base(model), _arrays(model, nn.Adapter)
  state = training.init_train_state(nnx.clone(model), CONFIG)
  trained_leaves = jax.tree.leaves(state.params)
  assert sum(x.size for x in trained_leaves) == peft.count_adapter_parameters(model)
  # AdamW's two moments per trained leaf and nothing else of parameter size.
  mu = state.opt_state.inner[1][0].mu
  assert sorted(jax.tree.map(np.shape, jax.tree.leaves(mu))) == sorted(np.shape(x) for x in trained_leaves)
  training.train(model, _corpus(), CONFIG, tmp_path, progress=False)
  for path, value in _base(model).items():
    np.testing.assert_array_equal(value, base_before[path], err_msg=path)
  moved = [p for p, v in _arrays(model, nn.Adapter).items() if not np.array_equal(v, adapters_before[p])]
  assert len(moved) == len(adapters_before)


def test_freeze_keeps_matched_params_exactly(tmp_path):
  config = dataclasses.replace(CONFIG, trainable="all", freeze=r"blocks/0/.*|embedding", total_steps=2)
  model = Llama(TINY, rngs=nnx.Rngs(0))
  before = _arrays(model, nnx.Param)
  training.train(model, _corpus(), config, tmp_path, progress=False)
  after = _arrays(model, nnx.Param)
  for path in before:
    frozen = path.startswith("blocks/0/") or path == "embedding"
    assert np.array_equal(after[path], before[path]) == frozen, path


def test_resume_with_adapter_dropout_is_bit_identical(tmp_path):
  straight = _adapted()
  training.train(straight, _corpus(), CONFIG, tmp_path / "straight", progress=False)
  first = _adapted()
  training.train(first, _corpus(), CONFIG, tmp_path / "resumed", until_step=3, progress=False)
  resumed = _adapted(seed=7)  # other adapter init: overwritten by the restore
  training.train(resumed, _corpus(), CONFIG, tmp_path / "resumed", progress=False)
  want, got = _arrays(straight, nn.Adapter), _arrays(resumed, nn.Adapter)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)
  # Dropout drew a new mask per step: the RNG counters advanced once per adapted layer per step.
  counts = [int(v) for v in jax.tree.leaves(nnx.state(resumed, nnx.RngCount))]
  assert counts and all(c == CONFIG.total_steps for c in counts)


def test_no_adapters_is_refused():
  with pytest.raises(ValueError, match="trainable='adapters'.*no efficient.nn.Adapter"):
    training.init_train_state(Llama(TINY, rngs=nnx.Rngs(0)), CONFIG)
  with pytest.raises(ValueError, match="TrainConfig.freeze"):
    training.init_train_state(_adapted(), dataclasses.replace(CONFIG, freeze="nothing/.*"))
  with pytest.raises(ValueError, match="TrainConfig.trainable"):
    dataclasses.replace(CONFIG, trainable="lora")


def test_sharded_lora_fine_tuning_equals_one_device():
  config = dataclasses.replace(CONFIG, batch_size=8, eps=1e-5)
  no_dropout = [(TARGETS[0][0], peft.LoRAConfig(rank=4, alpha=8.0))]
  batches = [data.stdlib_dataset("train", batch_size=8, seq_len=32, max_files=5).batch(i) for i in range(2)]

  def run(mesh):
    model = Llama(TINY, rngs=nnx.Rngs(0))
    peft.add_adapters(model, no_dropout, seed=1)
    state = training.init_train_state(model, config, mesh=mesh, rules="fsdp_tp")
    step = training.make_train_step(state)
    losses = [float(training.apply_train_step(state, step, b)["loss"]) for b in batches]
    return losses, {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state.params)}

  losses_one, adapters_one = run(None)
  losses_mesh, adapters_mesh = run(sharding.make_mesh("data:2,fsdp:2,tensor:2"))
  np.testing.assert_allclose(losses_mesh, losses_one, rtol=1e-5)
  for path, want in adapters_one.items():
    np.testing.assert_allclose(adapters_mesh[path], want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=path)


def test_adapters_train_with_8bit_adam_state():
  """QLoRA's recipe on the optimizer side: adapter moments held as 8-bit codes (bitsandbytes' layout)."""
  config = dataclasses.replace(CONFIG, optimizer="adam8bit", min_quantized_size=256, block_size=64)
  model = _adapted()
  state = training.init_train_state(model, config)
  leaves = jax.tree.leaves(state.opt_state)
  codes = [x for x in leaves if getattr(x, "dtype", None) == np.uint8]
  big = [x for x in jax.tree.leaves(state.params) if x.size >= 256]
  assert big and len(codes) == 2 * len(big)   # m and v codes for every adapter of >= 256 elements
  assert sum(x.nbytes for x in codes) == 2 * sum(x.size for x in big)
  batch = _corpus().batch(0)
  step = training.make_train_step(state)
  losses = [float(training.apply_train_step(state, step, batch)["loss"]) for _ in range(3)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_remat_is_execution_only_for_checkpoints():
  """A run may resume under another remat preset (same numbers), not under int8-saved activations."""
  plain = training.model_signature(Llama(TINY, rngs=nnx.Rngs(0)))
  assert training.model_signature(Llama(TINY.replace(remat="block"), rngs=nnx.Rngs(0))) == plain
  assert training.model_signature(Llama(TINY.replace(saved_activations="int8"), rngs=nnx.Rngs(0))) != plain
