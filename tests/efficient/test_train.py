"""Training: bit-identical resume, loss decrease, metrics.jsonl, wrong-config refusal, evaluate, sharded steps."""
import dataclasses
import functools
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from efficient import data, sharding
from efficient import train as training
from efficient.models.llama import TINY, Llama

CONFIG = training.TrainConfig(learning_rate=3e-3, warmup_steps=3, total_steps=20, batch_size=4, seq_len=64,
                              checkpoint_every=5, keep_checkpoints=2, log_every=1)


def _corpus(seed=0):
  return data.stdlib_dataset("train", batch_size=4, seq_len=64, seed=seed, max_files=20)


def _params(model):
  return {"/".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@functools.partial(jax.jit, static_argnames="graphdef")
def _logits(state, batch, *, graphdef):
  model = nnx.merge(graphdef, state)
  return model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])


def _reference_loss(model, batch):
  """(sum, count) of the masked next-token cross-entropy in float64 numpy, from the model's logits."""
  graphdef, state = nnx.split(model)
  logits = np.asarray(_logits(state, batch, graphdef=graphdef), np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  per_token = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
  return (per_token * batch["loss_mask"]).sum(), batch["loss_mask"].sum()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  model = Llama(TINY, rngs=nnx.Rngs(0))
  result = training.train(model, _corpus(), CONFIG, workdir, progress=False)
  return workdir, model, result


def test_resume_is_bit_identical_to_a_straight_run(straight_run, tmp_path):
  _, straight_model, straight = straight_run
  first = training.train(Llama(TINY, rngs=nnx.Rngs(0)), _corpus(), CONFIG, tmp_path, until_step=10,
                         progress=False)
  assert first["step"] == 10
  # A new process in all but name: fresh model (other init, overwritten by the restore), data and manager.
  resumed_model = Llama(TINY, rngs=nnx.Rngs(123))
  second = training.train(resumed_model, _corpus(), CONFIG, tmp_path, progress=False)
  assert second["step"] == 20 and [h["step"] for h in second["history"]] == list(range(11, 21))
  straight_params, resumed_params = _params(straight_model), _params(resumed_model)
  assert straight_params.keys() == resumed_params.keys()
  for name in straight_params:
    np.testing.assert_array_equal(resumed_params[name], straight_params[name], err_msg=name)
  losses = [h["loss"] for h in first["history"] + second["history"]]
  assert losses == [h["loss"] for h in straight["history"]]
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged] == list(range(1, 21)) and [r["loss"] for r in logged] == losses
  # Saved at 5, 10, 15, 20; keep 2.
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [15, 20]


def test_loss_decreases(straight_run):
  losses = [h["loss"] for h in straight_run[2]["history"]]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5


def test_metrics_jsonl(straight_run):
  workdir, _, result = straight_run
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert records == result["history"]
  assert [r["step"] for r in records] == list(range(1, 21))
  assert all(set(r) == {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} for r in records)
  assert all(r["grad_norm"] > 0 and r["tokens_per_sec"] > 0 for r in records)
  peak, end, warmup, total = 3e-3, 3e-4, 3, 20
  for record in records:
    count = record["step"] - 1  # updates applied before this one
    if count < warmup:
      expected = peak * count / warmup
    else:
      expected = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (count - warmup) / (total - warmup)))
    assert record["lr"] == pytest.approx(expected, rel=1e-5, abs=1e-9)
  # The first logged loss is the untrained model's loss on batch 0.
  loss_sum, tokens = _reference_loss(Llama(TINY, rngs=nnx.Rngs(0)), _corpus().batch(0))
  assert records[0]["loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)


def test_checkpoint_of_another_config_is_refused(straight_run):
  workdir = straight_run[0]
  other = Llama(TINY.replace(mlp_dim=96), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"(?s)checkpoints.*different model.*mlp_dim"):
    training.train(other, _corpus(), CONFIG, workdir, progress=False)
  with pytest.raises(ValueError, match="seed"):
    training.train(Llama(TINY, rngs=nnx.Rngs(0)), _corpus(seed=1), CONFIG, workdir, progress=False)


def test_argument_errors(tmp_path):
  with pytest.raises(ValueError, match="warmup_steps"):
    training.TrainConfig(warmup_steps=10, total_steps=10)
  with pytest.raises(ValueError, match="learning_rate"):
    training.TrainConfig(learning_rate=0.0)
  with pytest.raises(ValueError, match="until_step"):
    training.train(Llama(TINY, rngs=nnx.Rngs(0)), _corpus(), CONFIG, tmp_path, until_step=21, progress=False)
  wrong_shape = data.stdlib_dataset("train", batch_size=2, seq_len=64, max_files=20)
  with pytest.raises(ValueError, match="batch_size, seq_len"):
    training.train(Llama(TINY, rngs=nnx.Rngs(0)), wrong_shape, CONFIG, tmp_path / "b", progress=False)


def test_evaluate_is_token_weighted():
  model = Llama(TINY, rngs=nnx.Rngs(0))
  validation = data.stdlib_dataset("validation", batch_size=4, seq_len=64, max_tokens=1500)
  batches = list(validation.epoch_batches())
  assert len(batches) == 6 and batches[-1]["loss_mask"].sum() < batches[0]["loss_mask"].sum()
  sums = [_reference_loss(model, b) for b in batches]
  expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
  result = training.evaluate(model, batches)
  assert result["tokens"] == validation.tokens_per_epoch == sum(n for _, n in sums)
  assert result["loss"] == pytest.approx(expected, rel=1e-5)
  assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
  with pytest.raises(ValueError, match="no loss tokens"):
    training.evaluate(model, [])


# --- 8 fake devices -------------------------------------------------------------------------------------------

# One layer: every parameter kind of TINY at a third of the compile time.
ONE_LAYER = TINY.replace(num_layers=1)
# Adam's first update is lr * g / (|g| + eps): for a gradient entry near eps (a few k entries here are ~1e-9),
# reduction-order noise moves the update by a visible fraction, at any mesh. eps 1e-5 bounds that amplification;
# gradients themselves are compared through Adam's first moment.
MESH_CONFIG = dataclasses.replace(CONFIG, batch_size=8, seq_len=32, warmup_steps=0, eps=1e-5)


@pytest.fixture(scope="module")
def single_device_step():
  batch = data.stdlib_dataset("train", batch_size=8, seq_len=32, max_files=5).batch(0)
  state = training.init_train_state(Llama(ONE_LAYER, rngs=nnx.Rngs(0)), MESH_CONFIG)
  metrics = training.apply_train_step(state, training.make_train_step(state), batch)
  return batch, state, jax.device_get(metrics)


# Expected per-device shard shapes on data:2,fsdp:2,tensor:2 of: MLP gate [64,128], q [64,4,16], embedding
# [256,64] -- the embed dim splits over fsdp, heads/mlp/vocab over tensor.
SHARD_SHAPES = {
    "dp": {"gate": (64, 128), "q": (64, 4, 16), "embedding": (256, 64)},
    "fsdp": {"gate": (32, 128), "q": (32, 4, 16), "embedding": (256, 32)},
    "tp": {"gate": (64, 64), "q": (64, 2, 16), "embedding": (128, 64)},
    "fsdp_tp": {"gate": (32, 64), "q": (32, 2, 16), "embedding": (128, 32)},
}


@pytest.mark.parametrize("preset", sorted(SHARD_SHAPES))
def test_sharded_step_matches_one_device(single_device_step, preset):
  assert len(jax.devices()) >= 8, "tests/conftest.py must configure 8 CPU devices"
  batch, reference, reference_metrics = single_device_step
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  state = training.init_train_state(Llama(ONE_LAYER, rngs=nnx.Rngs(0)), MESH_CONFIG, mesh=mesh, rules=preset)
  metrics = jax.device_get(training.apply_train_step(state, training.make_train_step(state), batch))
  np.testing.assert_allclose(metrics["loss"], reference_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], reference_metrics["grad_norm"], rtol=1e-5)
  # named((clip, (adam, masked decay, schedule))); mu = (1 - b1) g
  first_moment = lambda s: s.opt_state.inner[1][0].mu
  for tree in (lambda s: s.params, first_moment):
    pairs = zip(nnx.to_flat_state(tree(state)), nnx.to_flat_state(tree(reference)))
    for (path, got), (_, want) in pairs:
      want = np.asarray(want[...])
      np.testing.assert_allclose(np.asarray(got[...]), want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                 err_msg=str(path))

  expected = SHARD_SHAPES[preset]
  layer = state.params["blocks"][0]
  params = {"gate": layer["mlp"]["gate"]["kernel"], "q": layer["attention"]["q"]["kernel"], "embedding": state.params["embedding"]}
  adam = state.opt_state.inner[1][0]
  moments = {"gate": adam.mu["blocks"][0]["mlp"]["gate"]["kernel"], "q": adam.nu["blocks"][0]["attention"]["q"]["kernel"],
             "embedding": adam.mu["embedding"]}
  for name, variable in params.items():
    array = variable[...]
    assert array.sharding.shard_shape(array.shape) == expected[name], name
    assert {s.data.shape for s in array.addressable_shards} == {expected[name]}, name
    # Optimizer moments carry their parameter's logical names, hence its sharding.
    assert moments[name][...].sharding.is_equivalent_to(array.sharding, array.ndim), name
  tokens = training.place_batch(batch, state)["tokens"]
  assert tokens.sharding.shard_shape(tokens.shape) == (2, 32)  # batch 8 over data x fsdp = 4
