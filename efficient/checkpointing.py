"""The run directory of `efficient.train`: verified orbax checkpoints, the workdir lock, metrics.jsonl repair.

  WORKDIR/checkpoints/<step>/                 orbax items `state` (params, optimizer state) and `meta` (JSON)
  WORKDIR/checkpoints/<step>/integrity.json   sha256 of every other file of the step; written last, atomically,
                                              once orbax has finalized the step (after an async save completes)
  WORKDIR/corrupt_checkpoints/<step>[.n]/     steps that failed verification, moved aside on resume
  WORKDIR/.lock                               fcntl lock held by the training process; holds its pid

A step without a valid integrity record is never restored: `Checkpoints.restore` walks the steps newest first,
skips (with a warning naming it) every step that fails verification or does not restore, and falls back to the
newest good one; none good is a ValueError naming every step tried.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
INTEGRITY_FILE = "integrity.json"
LOCK_FILE = ".lock"


# --- integrity records ----------------------------------------------------------------------------------------

def _file_digests(step_dir: Path) -> dict[str, str]:
  digests = {}
  for path in sorted(step_dir.rglob("*")):
    if path.is_file() and path.relative_to(step_dir).as_posix() != INTEGRITY_FILE:
      digest = hashlib.sha256()
      with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          digest.update(chunk)
      digests[path.relative_to(step_dir).as_posix()] = digest.hexdigest()
  return digests


def _write_atomically(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with tmp.open("w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_integrity_record(step_dir: Path, step: int) -> None:
  """Records the sha256 of every file of a finalized step (the step is then trusted on resume)."""
  digests = _file_digests(step_dir)
  if not digests:
    raise ValueError(f"checkpoint step {step} at {step_dir} holds no files; refusing to certify it.")
  _write_atomically(step_dir / INTEGRITY_FILE, json.dumps({"step": step, "sha256": digests}, indent=1))


def verify_integrity(step_dir: Path, step: int) -> None:
  """Raises ValueError saying what is wrong when the step's files differ from its integrity record."""
  record_path = step_dir / INTEGRITY_FILE
  if not record_path.is_file():
    raise ValueError(f"no {INTEGRITY_FILE} (an unfinished save, or not written by efficient.train)")
  try:
    record = json.loads(record_path.read_text())
    expected, recorded_step = dict(record["sha256"]), int(record["step"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"unreadable {INTEGRITY_FILE}: {e}") from e
  if recorded_step != step:
    raise ValueError(f"{INTEGRITY_FILE} is the record of step {recorded_step}")
  actual = _file_digests(step_dir)
  problems = [f"{name} missing" for name in sorted(set(expected) - set(actual))]
  problems += [f"{name} not in the record" for name in sorted(set(actual) - set(expected))]
  problems += [f"{name} sha256 differs" for name in sorted(set(expected) & set(actual))
               if expected[name] != actual[name]]
  if problems:
    raise ValueError("files differ from the integrity record: " + ", ".join(problems))


# --- model identity -------------------------------------------------------------------------------------------

def signature_differences(saved: dict, current: dict) -> list[str]:
  differences = []
  for section in ("model_config", "param_shapes"):
    old, new = saved.get(section, {}), current[section]
    for key in sorted(set(old) | set(new)):
      if old.get(key) != new.get(key):
        differences.append(f"{section}.{key}: checkpoint {old.get(key)!r} vs model {new.get(key)!r}")
  return differences


def _root_cause(error: BaseException) -> BaseException:
  seen = set()
  while id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError):
      return error
    following = error.__cause__ or error.__context__
    if following is None:
      break
    error = following
  return error


class CheckpointSaveError(RuntimeError):
  """A checkpoint save failed (e.g. a full disk); the run stops at once."""


# --- the checkpoints of a run ---------------------------------------------------------------------------------

class Checkpoints:
  """An orbax CheckpointManager whose steps carry integrity records; saves are async, failures stop the run."""

  def __init__(self, workdir: str | Path, *, keep: int):
    self.workdir = Path(workdir).absolute()
    self.directory = self.workdir / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.pending: int | None = None  # a step whose async save has not been confirmed yet
    self.last_good: int | None = None  # the newest step known to be saved and certified
    self._failed = False

  def _step_dir(self, step: int) -> Path:
    return self.directory / str(step)

  def save(self, step: int, tree: Any, meta: dict) -> None:
    self.finish_pending()
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    self.pending = step

  def poll(self) -> None:
    """Certifies a finished background save; raises CheckpointSaveError when it failed."""
    if self.pending is not None and not self.manager.is_saving_in_progress():
      self.finish_pending()

  def finish_pending(self) -> None:
    """Waits for the pending save; on success writes its integrity record, on failure raises one clear error."""
    if self.pending is None:
      return
    step, self.pending = self.pending, None
    try:
      self.manager.wait_until_finished()
      if not self._step_dir(step).is_dir():
        raise FileNotFoundError(errno.ENOENT, "orbax did not finalize the step directory",
                                str(self._step_dir(step)))
      write_integrity_record(self._step_dir(step), step)
    except Exception as e:  # the save's own error (disk full, permissions, ...), reported once, first
      self._failed = True
      good = f"step {self.last_good} is the newest good checkpoint" if self.last_good is not None else (
          "no good checkpoint was written")
      cause = _root_cause(e)
      text = f"{type(cause).__name__}: {cause}"
      disk_full = getattr(cause, "errno", None) == errno.ENOSPC or "No space left on device" in text
      head = "No space left on device" if disk_full else text.splitlines()[0][:500]
      raise CheckpointSaveError(f"{head} -- saving checkpoint step {step} under {self.directory} failed; "
                                f"training stopped ({good}). Cause: {text}") from e
    self.last_good = step

  def close(self, *, after_error: bool = False) -> None:
    """Finishes (and certifies) a pending save and closes the manager. After another error, a failure here is
    a warning, so the first error stays the one raised."""
    try:
      if not self._failed:
        self.finish_pending()
    except CheckpointSaveError as e:
      if not after_error:
        raise
      warnings.warn(str(e), RuntimeWarning, stacklevel=2)
    finally:
      try:
        self.manager.close()
      except Exception:
        if not self._failed:
          raise
        # A failed save is re-raised by every wait on orbax's finalize thread; it was reported above.

  def restore(self, target: Any, check_meta: Callable[[int, dict], None]) -> tuple[Any, dict, list[int]] | None:
    """(restored tree shaped like `target`, meta, steps skipped) of the newest good step; None without steps.

    `check_meta(step, meta)` raises (and the error propagates: that is no corruption) when a verified step
    belongs to another model. A step that fails verification or does not restore is skipped with a warning
    naming it, and moved to WORKDIR/corrupt_checkpoints/ once a good older one is found (the resumed run will
    save those steps again).
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    failures: list[tuple[int, str]] = []
    for step in steps:
      try:
        verify_integrity(self._step_dir(step), step)
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if int(meta["step"]) != step:
          raise ValueError(f"its meta says step {meta['step']}")
      except Exception as e:  # any way a step fails to come back: it is skipped, never half-restored
        failures.append((step, self._skip(step, e)))
        continue
      check_meta(step, meta)
      try:
        tree = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        tree = tree["state"]
      except Exception as e:
        failures.append((step, self._skip(step, e)))
        continue
      self._quarantine([s for s, _ in failures])
      self.last_good = step
      return tree, meta, [s for s, _ in failures]
    raise ValueError(f"no checkpoint in {self.directory} can be restored; tried steps "
                     f"{[s for s, _ in failures]}: " + "; ".join(f"step {s}: {r}" for s, r in failures)
                     + f". Move {self.directory} aside to start afresh.")

  def _skip(self, step: int, error: Exception) -> str:
    reason = (f"{type(error).__name__}: {error}".splitlines() or [type(error).__name__])[0][:300]
    warnings.warn(f"checkpoint step {step} in {self.directory} is skipped: {reason}", RuntimeWarning, stacklevel=3)
    return reason

  def _quarantine(self, steps: list[int]) -> None:
    if not steps:
      return
    corrupt = self.workdir / CORRUPT_DIR
    corrupt.mkdir(exist_ok=True)
    for step in steps:
      destination, n = corrupt / str(step), 1
      while destination.exists():
        destination, n = corrupt / f"{step}.{n}", n + 1
      shutil.move(str(self._step_dir(step)), str(destination))
      warnings.warn(f"moved the bad checkpoint step {step} to {destination}", RuntimeWarning, stacklevel=3)
    self.manager.reload()


# --- metrics.jsonl and the lock ---------------------------------------------------------------------------------

def truncate_metrics(path: Path, after_step: int) -> None:
  """Drops log lines past the resumed step (written after the last checkpoint) and a torn last line (a crash
  mid-write), with a warning; any other line that is not JSON is a ValueError naming it."""
  if not path.exists():
    return
  lines = path.read_text(errors="replace").splitlines()
  kept = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      step = int(record["step"])
    except (ValueError, KeyError, TypeError) as e:
      if all(not later.strip() for later in lines[number:]):
        warnings.warn(f"{path}: dropping the torn last line {number} ({line[:80]!r}).", RuntimeWarning,
                      stacklevel=2)
        continue
      raise ValueError(f"{path} line {number} is not a metrics record ({e}): {line[:80]!r}; fix or remove "
                       f"the line.") from e
    if step <= after_step:
      kept.append(line)
  _write_atomically(path, "".join(line + "\n" for line in kept))


class WorkdirLock:
  """An exclusive fcntl lock on WORKDIR/.lock holding this process's pid. The kernel drops it when its holder
  dies, so the lock file of a dead process is simply taken over."""

  def __init__(self, workdir: Path):
    self.path = Path(workdir) / LOCK_FILE
    self._file = None

  def __enter__(self) -> "WorkdirLock":
    f = self.path.open("a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      f.close()
      raise RuntimeError(f"workdir {self.path.parent} is in use by another training process (pid {holder}, "
                         f"lock {self.path}); wait for it to finish or use another workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc) -> None:
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()
    self._file = None


def save_with_manifest(directory: Path, tree: Any, record: dict, *, manifest_file: str, arrays_dir: str,
                       what: str, force: bool) -> dict:
  """Saves `tree` (orbax) under directory/arrays_dir, then `record` as directory/manifest_file -- the manifest last,
  so a checkpoint whose arrays did not finish has none and is refused on load. `what` names the checkpoint kind
  in the error for an existing one (overwritten only with `force`). Returns `record`."""
  if (directory / manifest_file).exists() and not force:
    raise ValueError(f"directory={str(directory)!r} already holds {what}; pass force=True to overwrite it.")
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / arrays_dir, tree, force=force)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    (directory / manifest_file).write_text(json.dumps(record, indent=1, sort_keys=True))
  return record
