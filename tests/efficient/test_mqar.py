"""MQAR batches: layout, determinism, and that every target is recallable from the key-value prefix."""
import numpy as np
import pytest

from efficient.data import MQARDataset, recall_accuracy


def test_layout_keys_values_and_queries():
  task = MQARDataset(vocab_size=128, num_kv_pairs=6, seq_len=64, batch_size=16, seed=3)
  batch = task.batch(0)
  assert batch["tokens"].shape == (16, 64) and batch["tokens"].dtype == np.int32
  np.testing.assert_array_equal(batch["segment_ids"], 1)
  np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(64), (16, 64)))
  for tokens, targets, mask in zip(batch["tokens"], batch["targets"], batch["loss_mask"]):
    keys, values = tokens[0:12:2], tokens[1:12:2]
    assert len(set(keys)) == 6 and len(set(values)) == 6
    assert ((1 <= keys) & (keys < 64)).all() and ((64 <= values) & (values < 128)).all()
    query_positions = np.flatnonzero(mask)
    assert len(query_positions) == 6
    assert (query_positions >= 12).all() and ((query_positions - 12) % 2 == 0).all()
    # Independent check: the answer at each query is the value that followed that key in the prefix.
    pairs = dict(zip(keys.tolist(), values.tolist()))
    assert sorted(tokens[query_positions].tolist()) == sorted(keys.tolist())
    for position in query_positions:
      assert targets[position] == pairs[tokens[position]]
    assert (targets[mask == 0] == 0).all()


def test_deterministic_per_seed_and_step():
  task = MQARDataset(vocab_size=64, num_kv_pairs=4, seq_len=32, batch_size=4, seed=1)
  later = task.batch(9)
  again = MQARDataset(vocab_size=64, num_kv_pairs=4, seq_len=32, batch_size=4, seed=1)
  for key in later:
    np.testing.assert_array_equal(again.batch(9)[key], later[key])
  assert not np.array_equal(task.batch(8)["tokens"], later["tokens"])
  other = MQARDataset(vocab_size=64, num_kv_pairs=4, seq_len=32, batch_size=4, seed=2)
  assert not np.array_equal(other.batch(9)["tokens"], later["tokens"])


def test_gaps_follow_the_power_law():
  task = MQARDataset(vocab_size=512, num_kv_pairs=8, seq_len=256, batch_size=256)
  p = task.gap_probabilities()
  np.testing.assert_allclose(p, np.arange(1, 121) ** -0.99 / (np.arange(1, 121) ** -0.99).sum())
  gaps = (np.flatnonzero(task.batch(0)["loss_mask"].reshape(-1)) % 256 - 16) // 2
  # Short gaps are much likelier than long ones (a uniform draw would put ~4% in the first 5 slots).
  assert np.mean(gaps < 5) > 0.15
  assert np.mean(gaps) < 0.5 * task.query_slots


def test_non_query_slots_are_noise_or_zero():
  noisy = MQARDataset(vocab_size=64, num_kv_pairs=4, seq_len=64, batch_size=8).batch(0)
  quiet = MQARDataset(vocab_size=64, num_kv_pairs=4, seq_len=64, batch_size=8, random_non_queries=False).batch(0)
  filler = quiet["tokens"][:, 8:][quiet["loss_mask"][:, 8:] == 0]
  assert (filler == 0).all()
  assert (noisy["tokens"][:, 8:] != 0).mean() > 0.9


def test_recall_accuracy():
  batch = MQARDataset(vocab_size=32, num_kv_pairs=2, seq_len=16, batch_size=4).batch(0)
  perfect = np.eye(32)[batch["targets"]]
  assert recall_accuracy(perfect, batch) == 1.0
  assert recall_accuracy(np.eye(32)[np.zeros_like(batch["targets"])], batch) == 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(vocab_size=8, num_kv_pairs=4), "vocab_size"),
    (dict(seq_len=15, num_kv_pairs=4), "seq_len"),
    (dict(batch_size=0), "batch_size"),
    (dict(power_a=0.0), "power_a"),
    (dict(seed=-1), "seed"),
])
def test_argument_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    MQARDataset(**kwargs)
  with pytest.raises(ValueError, match="step"):
    MQARDataset().batch(-2)
