"""What every experiment shares: the workdir, version info and command stamp, side-by-side timing, progress bars,
results.json / results.md."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache as compilation_cache_lib
from tqdm.auto import tqdm

import pallas_kernels
from efficient.models import llama
from efficient.quant import kv_cache


@dataclasses.dataclass
class Claim:
  """One row of results.md: what the literature (or our spec) says, what we measured, and the verdict."""
  claim: str
  measured: str
  verdict: str  # 'reproduced', 'not reproduced', 'partly', 'n/a at our scale', ...


def prepare_workdir(workdir: str) -> str:
  if not workdir:
    raise ValueError("--workdir is required: the directory receiving results.json, results.md and plots.")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  return workdir


def environment() -> dict:
  """Versions and machine facts recorded with every result."""
  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "gguf", "tokenizers"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  return {
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "machine": platform.machine(),
      "cpu_count": os.cpu_count(),
      "jax_backend": jax.default_backend(),
      "jax_devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "versions": versions,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


@contextlib.contextmanager
def compilation_cache(directory: str):
  """JAX's persistent compilation cache in `directory` (removed afterwards) while the block runs: an experiment
  that compiles a step ahead of time to read its memory analysis (`lower().compile()`) and then runs the same
  jitted step gets the second compilation from the cache instead of compiling twice."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {name: getattr(jax.config, name) for name in names}
  # JAX opens its cache once, at the first compilation after the directory is set: reset on the way in and out so
  # this block gets its own cache and later compilations go back to none.
  compilation_cache_lib.reset_cache()
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  try:
    yield directory
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    compilation_cache_lib.reset_cache()
    shutil.rmtree(directory, ignore_errors=True)


def time_side_by_side(functions: Mapping[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1,
                      desc: str | None = None) -> dict:
  """Median wall seconds of each zero-argument function, run alternately (A B A B ...) after warm-up.

  Alternating makes the ratios robust to this shared CPU's drift; every result is block_until_ready'd. `desc`
  given: a progress bar over the rounds (for long timings).
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}.")
  for fn in functions.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  samples: dict[str, list[float]] = {name: [] for name in functions}
  for _ in range(repeats) if desc is None else progress(range(repeats), desc=desc, unit="round"):
    for name, fn in functions.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      samples[name].append(time.perf_counter() - start)
  return {name: {"median_s": statistics.median(times), "samples_s": times} for name, times in samples.items()}


def command_line(experiment: str | None, config: Mapping, workdir: str) -> str:
  """The command that reproduces a run of `experiments.<experiment>`: the exact one when this process is that
  program (`python -m experiments.<experiment>` + sys.argv's flags), else the equivalent one (a test's or
  `experiments.report`'s call of run(): --workdir plus every --config field that differs from the module's
  default_config()). Not an experiment (`experiment` None): this process's own command line."""
  main_module = getattr(sys.modules.get("__main__"), "__spec__", None)
  if experiment is None or (main_module is not None and main_module.name == f"experiments.{experiment}"):
    program = ["-m", main_module.name] if main_module is not None else [sys.argv[0]]
    return shlex.join(["python", *program, *sys.argv[1:]])
  module = sys.modules.get(f"experiments.{experiment}")
  defaults = _flat(module.default_config().to_dict()) if hasattr(module, "default_config") else {}
  changed = [f"--config.{name}={_flag_value(value)}" for name, value in _flat(dict(config)).items()
             if name not in defaults or defaults[name] != value]
  return shlex.join(["python", "-m", f"experiments.{experiment}", f"--workdir={_shown_path(workdir)}", *changed])


def _flat(config: Mapping, prefix: str = "") -> dict:
  flat = {}
  for name, value in config.items():
    if isinstance(value, Mapping):
      flat.update(_flat(value, f"{prefix}{name}."))
    else:
      flat[f"{prefix}{name}"] = value
  return flat


def _flag_value(value) -> str:
  # ml_collections parses tuples from '(a, b)' and bools from 'true'/'false'
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


def _shown_path(path: str) -> str:
  """`path` relative to the working directory when it lies below it (a repository-relative workdir), else as is."""
  relative = os.path.relpath(os.path.abspath(path))
  return path if relative.startswith(os.pardir) else relative


def _experiment_calling(frame) -> str | None:
  """'prune' when `frame` runs code of experiments/prune.py (imported, or as `python -m experiments.prune`)."""
  spec = frame.f_globals.get("__spec__")
  name = spec.name if spec is not None else frame.f_globals.get("__name__", "")
  return name.removeprefix("experiments.") if name.startswith("experiments.") else None


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "row"):
  """A tqdm bar with elapsed time and ETA on stderr for an experiment's main loop (iterate it, or `update()` it).

  On a terminal it redraws in place; in a log (stderr not a terminal) it writes one plain line at most every
  30 s instead of carriage-return redraws, so logs stay readable. EFFICIENT_NO_PROGRESS=1 turns bars off.
  """
  interactive = sys.stderr.isatty()
  return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=interactive,
              file=sys.stderr if interactive else _LogLines(sys.stderr), mininterval=0.1 if interactive else 30.0,
              bar_format=None if interactive else "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}]",
              disable=os.environ.get("EFFICIENT_NO_PROGRESS", "") not in ("", "0"))


class _LogLines:
  """A stream for tqdm that turns its '\r' redraws into one line per refresh."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    line = text.replace("\r", "").rstrip()
    if line:
      self.stream.write(line + "\n")

  def flush(self) -> None:
    self.stream.flush()


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill(graphdef, state, prompt, cache):
  logits, cache = nnx.merge(graphdef, state)(prompt, cache=cache)
  return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def _greedy_steps(graphdef, state, token, cache, *, steps):
  """`steps` greedy decode steps from a prefilled cache: [B, steps + 1] tokens (the first is `token`)."""
  model = nnx.merge(graphdef, state)

  def step(carry, _):
    token, cache = carry
    logits, cache = model(token[:, None], cache=cache)
    return (jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache), token

  (last, _), tokens = jax.lax.scan(step, (token, cache), None, length=steps)
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def greedy_decode_rates(variants, *, prompt_len: int, steps: int, repeats: int,
                        kv_group_size: int = kv_cache.DEFAULT_GROUP_SIZE) -> dict:
  """Greedy decode tokens/s of each variant, side by side. `variants`: name -> (model, kv_format, policy), where
  policy is a `pallas_kernels.implementation` name or None. Each variant's cache is prefilled once with the same
  random prompt (untimed); the timed call is `steps` greedy steps from that cache, all variants alternating
  (`time_side_by_side`), so prefill noise does not enter the per-token time. Returns tokens/s, the timings and each
  variant's greedy continuation (`tokens`). Quantized caches use `kv_group_size` slots per K scale."""
  vocab = next(iter(variants.values()))[0].config.vocab_size
  prompt = jax.random.randint(jax.random.key(1), (1, prompt_len), 0, vocab, dtype=jnp.int32)
  calls, tokens = {}, {}
  for name, (model, fmt, policy) in variants.items():
    graphdef, state = nnx.split(model)
    with pallas_kernels.implementation(policy):
      cache = llama.init_cache(model.config, 1, prompt_len + steps, kv_format=fmt,
                               kv_group_size=None if fmt is None else kv_group_size)
      first, cache = _prefill(graphdef, state, prompt, cache)

    def run(graphdef=graphdef, state=state, first=first, cache=cache, policy=policy):
      with pallas_kernels.implementation(policy):  # part of the jit cache key: each policy has its own trace
        return _greedy_steps(graphdef, state, first, cache, steps=steps)
    calls[name] = run
    tokens[name] = np.asarray(run())[0].tolist()
  timings = time_side_by_side(calls, repeats=repeats)
  return {"tokens_per_s": {name: steps / t["median_s"] for name, t in timings.items()}, "timings": timings,
          "tokens": tokens, "prompt_len": prompt_len, "steps": steps}


def relative_rms_error(actual, expected) -> float:
  """RMS(actual - expected) / RMS(expected), in float64 (the benchmarks' agreement column)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.sqrt(np.mean((actual - expected) ** 2)) / max(np.sqrt(np.mean(expected ** 2)), 1e-30))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def write_results(workdir: str, *, title: str, config: Mapping, results: Mapping, claims: Sequence[Claim],
                  tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence[Any]]]] = (),
                  notes: str = "", plots: Sequence[str] = (), command: str | None = None) -> tuple[str, str]:
  """Writes results.json (config, environment, the command that reproduces it, every number) and results.md
  (stamp, claims table, other tables). `command` defaults to `command_line` for the calling experiment."""
  env = environment()
  if command is None:
    command = command_line(_experiment_calling(sys._getframe(1)), config, workdir)
  payload = {"title": title, "command": command, "config": dict(config), "environment": env,
             "results": dict(results), "claims": [dataclasses.asdict(c) for c in claims], "plots": list(plots)}
  json_path = os.path.join(workdir, "results.json")
  with open(json_path, "w") as f:
    json.dump(payload, f, indent=2, default=_json_default)
  parts = [f"# {title}", "",
           f"Python {env['python']}, jax {env['versions']['jax']}, flax {env['versions']['flax']}, "
           f"{env['cpu_count']} CPU cores ({env['machine']}), backend {env['jax_backend']}"
           + (f" ({env['device_kind']})" if env["device_kind"] != env["jax_backend"] else "")
           + f", {env['date']}.", "", f"Command: `{command}`", "",
           "## Claims", "", markdown_table(("seed claim", "measured", "verdict"),
                                            [(c.claim, c.measured, c.verdict) for c in claims])]
  for name, (header, rows) in dict(tables).items():
    parts += ["", f"## {name}", "", markdown_table(header, rows)]
  for plot in plots:
    parts += ["", f"![{os.path.basename(plot)}]({os.path.basename(plot)})"]
  if notes:
    parts += ["", notes]
  md_path = os.path.join(workdir, "results.md")
  with open(md_path, "w") as f:
    f.write("\n".join(parts) + "\n")
  return json_path, md_path


def _json_default(value):
  if hasattr(value, "tolist"):
    return value.tolist()
  if dataclasses.is_dataclass(value):
    return dataclasses.asdict(value)
  return str(value)


def config_list(config, name: str, cast: Callable[[str], Any] = str) -> list:
  """`--config.<name>`, a comma-separated list, as a list of `cast(item)` (blank items dropped); a value that is
  empty or does not parse raises a ValueError naming the flag."""
  text = str(config[name])
  try:
    values = [cast(item.strip()) for item in text.split(",") if item.strip()]
  except ValueError as e:
    raise ValueError(f"--config.{name}={text!r}: {e}; expected a comma-separated list of {cast.__name__}.") from e
  if not values:
    raise ValueError(f"--config.{name} is empty; expected a comma-separated list of {cast.__name__}.")
  return values


def learning_rates(config, field: str, names: Sequence[str], *, what: str) -> dict[str, float]:
  """`--config.<field>` = 'name=lr,...' (blank: none) as {name: lr}: every name one of `names` (`what` says what a
  name is, e.g. 'optimizer'), every rate a positive finite number; a ValueError naming the flag otherwise."""
  rates = {}
  for item in config_list(config, field) if str(config[field]).strip() else []:
    name, _, value = item.partition("=")
    if name not in names or not value:
      raise ValueError(f"--config.{field}: {item!r} must be '{what}=learning_rate' with a {what} of "
                       f"{tuple(names)}.")
    try:
      rates[name] = float(value)
    except ValueError:
      raise ValueError(f"--config.{field}: {item!r}: {value!r} is not a number.") from None
    if not (math.isfinite(rates[name]) and rates[name] > 0):
      raise ValueError(f"--config.{field}: {item!r}: the learning rate must be a positive finite number.")
  return rates


def small_llama(config) -> llama.LlamaConfig:
  """`llama.SMALL` on bytes (vocab 256) at `--config.embed_dim` / `num_layers` (MLP 3x wide, head_dim from the
  heads), long enough for `--config.seq_len`: the from-scratch model of the training experiments."""
  heads = llama.SMALL.num_heads
  if config.embed_dim % heads:
    raise ValueError(f"--config.embed_dim={config.embed_dim} must be a multiple of {heads} heads.")
  return llama.SMALL.replace(vocab_size=256, embed_dim=config.embed_dim, head_dim=config.embed_dim // heads,
                             mlp_dim=3 * config.embed_dim, num_layers=config.num_layers,
                             max_seq_len=max(config.seq_len, 128))


def check_finite_config(config, prefix: str = "") -> None:
  """Raises a ValueError naming `--config.<name>` for any NaN or infinite float in `config` (nested too)."""
  for name, value in config.items():
    if hasattr(value, "items"):
      check_finite_config(value, f"{prefix}{name}.")
    elif isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"--config.{prefix}{name}={value} is not a finite number.")


def save_figure(fig, workdir: str, filename: str, *, dpi: int = 120) -> str:
  """Lays out `fig`, writes it to workdir/filename, closes it and returns the path."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  path = os.path.join(workdir, filename)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def run_program(run: Callable[[Any, str], Any], default_config, default_workdir: str) -> None:
  """The entrypoint of `python -m experiments.<name>`: defines --workdir and --config, then calls
  `run(config, workdir)` under absl. Flags are defined only here, when an experiment runs as a program, so tests
  can import several experiments in one process."""
  from absl import app, flags
  from ml_collections import config_flags

  workdir = flags.DEFINE_string("workdir", default_workdir, "Directory for results.json, results.md and plots.")
  config = config_flags.DEFINE_config_dict("config", default_config)

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run(config.value, workdir.value)

  app.run(main)
