"""No silent wrong numbers in training: verified checkpoints with fallback, a torn metrics line, non-finite
configs and steps, the workdir lock, config changes on resume, and a failed (disk-full) checkpoint save."""
import errno
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx
import orbax.checkpoint as ocp

from efficient import checkpointing, data
from efficient import train as training
from efficient.models.llama import TINY, Llama
from experiments import common, train_lm

MODEL = TINY.replace(num_layers=1)
CONFIG = training.TrainConfig(learning_rate=3e-3, warmup_steps=1, total_steps=6, batch_size=2, seq_len=32,
                              checkpoint_every=2, keep_checkpoints=3, log_every=1)


def _corpus():
  return data.stdlib_dataset("train", batch_size=2, seq_len=32, seed=0, max_files=5)


def _train(workdir, config=CONFIG, source=None, **kwargs):
  return training.train(Llama(MODEL, rngs=nnx.Rngs(0)), source or _corpus(), config, workdir, progress=False,
                        **kwargs)


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def run_to_4(tmp_path_factory):
  """A workdir trained to step 4 (checkpoints 2 and 4) and its metrics; tests copy it before changing it."""
  workdir = tmp_path_factory.mktemp("run4")
  _train(workdir, until_step=4)
  return workdir, _metrics(workdir)


@pytest.fixture
def workdir(run_to_4, tmp_path):
  copy = tmp_path / "w"
  shutil.copytree(run_to_4[0], copy)
  return copy


def test_every_saved_step_carries_a_verified_integrity_record(workdir):
  assert _steps(workdir) == [2, 4]
  for step in (2, 4):
    record = json.loads((workdir / "checkpoints" / str(step) / "integrity.json").read_text())
    assert record["step"] == step and any(name.startswith("state/") for name in record["sha256"])
    checkpointing.verify_integrity(workdir / "checkpoints" / str(step), step)


def _largest_data_file(step_dir):
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_bytes(step_dir):
  path = _largest_data_file(step_dir)
  raw = bytearray(path.read_bytes())
  for i in range(64):
    raw[len(raw) // 2 + i] ^= 0xFF
  path.write_bytes(bytes(raw))


def _truncate(step_dir):
  path = _largest_data_file(step_dir)
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty_meta(step_dir):
  (step_dir / "meta" / "metadata").write_text("")


def _stray_empty_step(step_dir):
  (step_dir.parent / "6").mkdir()  # a newer, empty step folder; step 4 itself is intact


CORRUPTIONS = {"flip": (_flip_bytes, 4), "truncate": (_truncate, 4), "empty_meta": (_empty_meta, 4),
               "stray_empty_step": (_stray_empty_step, 6)}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_newest_step_is_skipped_for_the_newest_good_one(run_to_4, workdir, kind):
  corrupt, bad_step = CORRUPTIONS[kind]
  corrupt(workdir / "checkpoints" / "4")
  good_step = 4 if kind == "stray_empty_step" else 2
  with pytest.warns(RuntimeWarning, match=rf"checkpoint step {bad_step} in .* is skipped"):
    result = _train(workdir)
  assert result["step"] == 6 and [h["step"] for h in result["history"]] == list(range(good_step + 1, 7))
  # Resumed from exactly the good step's weights: the re-run steps repeat the first run's losses.
  first_losses = {r["step"]: r["loss"] for r in run_to_4[1]}
  assert [h["loss"] for h in result["history"] if h["step"] in first_losses] == [
      first_losses[s] for s in range(good_step + 1, 5)]
  assert [r["step"] for r in _metrics(workdir)] == list(range(1, 7))
  assert (workdir / "corrupt_checkpoints" / str(bad_step)).is_dir()
  assert _steps(workdir) == [2, 4, 6]
  for step in (4, 6):
    checkpointing.verify_integrity(workdir / "checkpoints" / str(step), step)


def test_no_good_step_is_an_error_naming_every_step_tried(workdir):
  _flip_bytes(workdir / "checkpoints" / "4")
  _empty_meta(workdir / "checkpoints" / "2")
  with pytest.warns(RuntimeWarning, match="skipped"), pytest.raises(
      ValueError, match=r"(?s)no checkpoint in .*checkpoints can be restored; tried steps \[4, 2\]: step 4: .*sha256"
                        r".*step 2: .*meta/metadata"):
    _train(workdir)


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(workdir):
  with (workdir / "metrics.jsonl").open("a") as f:
    f.write('{"step": 5, "loss": 4.')
  with pytest.warns(RuntimeWarning, match="torn last line 5"):
    result = _train(workdir, until_step=5)
  assert result["step"] == 5 and [r["step"] for r in _metrics(workdir)] == [1, 2, 3, 4, 5]
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  lines.insert(1, "garbage")
  (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics record"):
    _train(workdir)


# --- non-finite numbers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("learning_rate", math.nan), ("learning_rate", math.inf),
                                         ("b1", math.nan), ("grad_clip_norm", math.inf), ("eps", math.nan),
                                         ("weight_decay", -math.inf), ("total_steps", math.inf),
                                         ("final_learning_rate_fraction", math.nan)])
def test_config_rejects_non_finite_numbers(field, value):
  with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be"):
    training.TrainConfig(**{field: value})


def test_train_lm_rejects_non_finite_config(tmp_path):
  config = train_lm.default_config()
  config.learning_rate = math.nan
  with pytest.raises(ValueError, match=r"--config\.learning_rate=nan is not a finite number"):
    train_lm.run(config, str(tmp_path))
  nested = ml_collections.ConfigDict({"a": {"b": math.inf}})
  with pytest.raises(ValueError, match=r"--config\.a\.b=inf"):
    common.check_finite_config(nested)


class _PoisonedSource:
  """The corpus with float loss masks, NaN in the batch of one step: that step's loss and gradients are NaN."""

  def __init__(self, step):
    self.corpus, self.step, self.seed = _corpus(), step, 0

  def batch(self, index):
    batch = dict(self.corpus.batch(index))
    batch["loss_mask"] = batch["loss_mask"].astype(np.float32)
    if index + 1 == self.step:  # batch(index) is consumed by step index + 1
      batch["loss_mask"][0, 0] = np.nan
    return batch


def test_a_non_finite_step_stops_the_run_keeping_the_last_good_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError, match=r"step 5: non-finite loss.*loss=nan.*newest checkpoint, step 4"):
    _train(tmp_path, source=_PoisonedSource(5))
  assert _steps(tmp_path) == [2, 4]
  assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4]
  for step in (2, 4):
    checkpointing.verify_integrity(tmp_path / "checkpoints" / str(step), step)


def test_skip_nonfinite_steps_skips_the_update_and_counts_it(tmp_path):
  config = training.TrainConfig(**dict(CONFIG.to_dict(), skip_nonfinite_steps=True))
  with pytest.warns(RuntimeWarning, match=r"step 5: non-finite update .* skipped; 1 skipped so far"):
    result = _train(tmp_path, config, source=_PoisonedSource(5))
  assert result["step"] == 6
  assert [r["skipped_steps"] for r in _metrics(tmp_path)] == [0, 0, 0, 0, 1, 1]
  assert math.isfinite(_metrics(tmp_path)[-1]["loss"])
  meta = json.loads((tmp_path / "checkpoints" / "6" / "meta" / "metadata").read_text())
  assert meta["skipped_nonfinite_steps"] == 1


# --- one run per workdir, one config per run ----------------------------------------------------------------------

_HOLD_LOCK = """
import fcntl, os, sys, time
f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); f.write(str(os.getpid())); f.flush()
print('locked', flush=True); time.sleep(60)
"""


def test_a_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path / ".lock")], stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RuntimeError, match=rf"workdir .* is in use by another training process \(pid {holder.pid}"):
      _train(tmp_path)
  finally:
    holder.kill()
    holder.wait()
  assert not (tmp_path / "metrics.jsonl").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(workdir):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  (workdir / ".lock").write_text(dead.stdout)
  assert _train(workdir, until_step=5)["step"] == 5
  assert (workdir / ".lock").read_text().strip() == str(os.getpid())
  with open(workdir / ".lock") as f:  # released when the run ends
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_changed_config_on_resume_is_refused_unless_allowed(workdir):
  changed = training.TrainConfig(**dict(CONFIG.to_dict(), learning_rate=1e-3, batch_size=4))
  with pytest.raises(ValueError, match=r"(?s)step 4 .*another TrainConfig: learning_rate: checkpoint 0.003 vs "
                                       r"now 0.001; batch_size: checkpoint 2 vs now 4.*allow_config_change"):
    _train(workdir, changed)
  lower_lr = training.TrainConfig(**dict(CONFIG.to_dict(), learning_rate=1e-3))
  assert _train(workdir, lower_lr, allow_config_change=True)["step"] == 6
  # Extending the run (total_steps) or changing the cadence or the non-finite policy is no change.
  other = training.TrainConfig(**dict(CONFIG.to_dict(), total_steps=8, log_every=2, checkpoint_every=3,
                                      keep_checkpoints=1, skip_nonfinite_steps=True))
  assert training._config_differences(CONFIG.to_dict(), other) == {}
  events = [r for r in _metrics(workdir) if r.get("event") == "config_change"]
  assert events == [{"step": 4, "event": "config_change", "changes": {"learning_rate": [3e-3, 1e-3]}}]
  assert [r["step"] for r in _metrics(workdir) if "loss" in r] == list(range(1, 7))


# --- a failed save ------------------------------------------------------------------------------------------------

def test_a_failed_checkpoint_save_stops_the_run_with_its_error_first(tmp_path, monkeypatch):
  original = ocp.handlers.JsonCheckpointHandler._save_fn

  async def disk_full_at_step_4(self, x, directory):
    if directory.parent.name.split(".")[0] == "4":
      raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))
    return await original(self, x, directory)

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", disk_full_at_step_4)
  with pytest.raises(checkpointing.CheckpointSaveError,
                     match=r"^No space left on device -- saving checkpoint step 4 under .* failed; training "
                           r"stopped \(step 2 is the newest good checkpoint\)\. Cause: OSError: \[Errno 28\]"):
    _train(tmp_path)
  assert _steps(tmp_path) == [2]  # stopped before the next save
  checkpointing.verify_integrity(tmp_path / "checkpoints" / "2", 2)
