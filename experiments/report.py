"""Published results: the index of every kept experiment run, and re-running the default runs that feed it.

    python -m experiments.report                     # rebuild the index from the kept results (cheap, runs nothing)
    python -m experiments.report --run=prune,mup     # re-run those experiments' default configs, then rebuild
    python -m experiments.report --run=missing       # every experiment without a kept default run ('all': every one)

Kept results live in `experiments/results/<folder>/` (results.json, results.md, plots), where the folder is the
experiment's module name for its default run (`prune`) or a variant (`ptq_kv`, `bench_decode_h200`: the experiment
is read from the command stamped in results.json, else from the folder's name). The index is
`experiments/results/README.md` (every claim of every kept run with its verdict, date and machine, and the
experiments with no kept default run) and the table between `<!-- results:begin -->` and `<!-- results:end -->`
at the top of README.md's "## Results" section (inserted there the first time; the prose below stays as it is).
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import shutil
import tempfile

import jax
from absl import app, flags

import experiments
from experiments import common

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
README = os.path.join(os.path.dirname(os.path.dirname(RESULTS_DIR)), "README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SECTION = "## Results"


def experiment_names() -> list[str]:
  """Every module of experiments/ that is an experiment (it defines `default_config()` and `run()`), read from the
  source so that listing them imports none."""
  names = []
  for module in pkgutil.iter_modules(experiments.__path__):
    with open(os.path.join(experiments.__path__[0], f"{module.name}.py")) as f:
      source = f.read()
    if "\ndef default_config(" in source and "\ndef run(" in source:
      names.append(module.name)
  return sorted(names)


def experiment_of(folder: str, payload: dict, names: list[str]) -> str | None:
  """The experiment a kept run belongs to: the module in its stamped command, else the longest experiment name
  that is the folder's name or its prefix before '_' (`bench_decode_h200` -> bench_decode)."""
  stamped = re.search(r"-m experiments\.(\w+)", payload.get("command") or "")
  if stamped and stamped.group(1) in names:
    return stamped.group(1)
  matches = [name for name in names if folder == name or folder.startswith(name + "_")]
  return max(matches, key=len) if matches else None


def kept_results(results_dir: str, names: list[str]) -> list[dict]:
  """Every `<results_dir>/*/results.json`: {'folder', 'experiment', 'payload'}, sorted by folder."""
  kept = []
  for folder in sorted(os.listdir(results_dir)):
    path = os.path.join(results_dir, folder, "results.json")
    if not os.path.isfile(path):
      continue
    try:
      with open(path) as f:
        payload = json.load(f)
    except ValueError as e:
      raise ValueError(f"--results_dir={results_dir!r}: {path} is not valid JSON: {e}") from e
    kept.append({"folder": folder, "experiment": experiment_of(folder, payload, names), "payload": payload})
  return kept


def missing_default_runs(kept: list[dict], names: list[str]) -> list[str]:
  """Experiments with no folder of their own name (a kept variant is not their default run)."""
  folders = {k["folder"] for k in kept}
  return [name for name in names if name not in folders]


def _machine(environment: dict) -> str:
  backend = environment.get("jax_backend", "?")
  device = environment.get("device_kind") or (backend if backend == "cpu" else
                                               f"{backend} ({', '.join(environment.get('jax_devices', []))})")
  return f"{device}, {environment.get('cpu_count', '?')} CPU cores ({environment.get('machine', '?')})"


def _versions(environment: dict) -> str:
  versions = environment.get("versions", {})
  return f"Python {environment.get('python', '?')}, jax {versions.get('jax', '?')}, flax {versions.get('flax', '?')}"


def _command(kept_run: dict, results_dir: str) -> str:
  """The run's stamped command; for a run kept before commands were stamped, the equivalent one derived from its
  stored config (the fields that differ from today's default_config)."""
  payload = kept_run["payload"]
  if payload.get("command"):
    return f"`{payload['command']}`"
  if kept_run["experiment"] is None:
    return "?"
  importlib.import_module(f"experiments.{kept_run['experiment']}")  # command_line reads its default_config
  derived = common.command_line(kept_run["experiment"], payload.get("config", {}),
                                os.path.join(results_dir, kept_run["folder"]))
  return f"`{derived}` (not stamped: derived from its stored config)"


def _cell(text) -> str:
  return " ".join(str(text).split())  # a claim's line breaks would end its table row


def _link(folder: str, results_dir: str, from_dir: str) -> str:
  target = os.path.relpath(os.path.join(results_dir, folder, "results.md"), from_dir)
  return f"[{folder}]({target.replace(os.sep, '/')})"


def _tally(kept: list[dict]) -> str:
  verdicts = [c["verdict"].strip().lower() for k in kept for c in k["payload"].get("claims", [])]
  counts = {"reproduced": 0, "partly": 0, "not reproduced": 0, "other": 0}
  for verdict in verdicts:
    kind = next((v for v in ("reproduced", "partly", "not reproduced") if verdict.startswith(v)), "other")
    counts[kind] += 1
  return (f"{len(verdicts)} claims from {len(kept)} kept runs: " +
          ", ".join(f"{count} {kind}" for kind, count in counts.items()) + ".")


def _missing_line(kept: list[dict], names: list[str]) -> str:
  missing = missing_default_runs(kept, names)
  if not missing:
    return "Every experiment has a kept default run."
  variants = {name: [k["folder"] for k in kept if k["experiment"] == name] for name in missing}
  listed = ", ".join(f"`{name}`" + (f" (variant kept: {', '.join(variants[name])})" if variants[name] else "")
                     for name in missing)
  return (f"No kept default run yet: {listed}. `python -m experiments.report --run=missing` produces them (each "
          f"at its full default config: long on a CPU).")


def index_markdown(kept: list[dict], names: list[str], results_dir: str) -> str:
  """experiments/results/README.md: every claim row of every kept run, then the experiments without one."""
  rows = []
  for k in kept:
    environment = k["payload"].get("environment", {})
    for i, claim in enumerate(k["payload"].get("claims", [])):
      first = i == 0  # the run's link, date and machine once, on its first claim
      rows.append((k["experiment"] or "?", _cell(claim["claim"]), _cell(claim["measured"]),
                   _cell(claim["verdict"]), _link(k["folder"], results_dir, results_dir) if first else "",
                   (environment.get("date") or "?")[:10] if first else "",
                   _machine(environment) if first else ""))
  commands = [(k["folder"], _versions(k["payload"].get("environment", {})), _command(k, results_dir))
              for k in kept]
  return "\n".join([
      "# Kept results", "",
      "Generated by `python -m experiments.report` from every `*/results.json` in this folder: do not edit by "
      "hand (re-run an experiment with `python -m experiments.report --run=<name>`). Each folder's results.md "
      "holds the full tables, plots, versions and notes.", "",
      _tally(kept), "",
      common.markdown_table(("experiment", "seed claim", "measured", "verdict", "results", "date", "machine"),
                            rows), "",
      _missing_line(kept, names), "",
      "## Versions and commands", "",
      common.markdown_table(("results", "versions", "command"), commands), ""])


def readme_block(kept: list[dict], names: list[str], results_dir: str, readme: str) -> str:
  """The table README.md's Results section opens with, between the markers."""
  rows = []
  for k in kept:
    for i, claim in enumerate(k["payload"].get("claims", [])):
      rows.append((_link(k["folder"], results_dir, os.path.dirname(readme)) if i == 0 else "",
                   _cell(claim["claim"]), _cell(claim["measured"]), _cell(claim["verdict"])))
  index = os.path.relpath(os.path.join(results_dir, "README.md"), os.path.dirname(readme)).replace(os.sep, "/")
  return "\n".join([
      BEGIN,
      f"Every kept experiment run, claim by claim (generated by `python -m experiments.report`; dates, machines "
      f"and commands in [{index}]({index})). {_tally(kept)}", "",
      common.markdown_table(("results", "seed claim", "measured", "verdict"), rows), "",
      _missing_line(kept, names),
      END])


def with_readme_block(text: str, block: str, readme: str) -> str:
  """`text` with the block between the markers replaced, or inserted right below the '## Results' heading."""
  if BEGIN in text and END in text:
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + block + text[stop:]
  heading = re.search(rf"^{re.escape(SECTION)}[ \t]*\n", text, flags=re.MULTILINE)
  if heading is None:
    raise ValueError(f"--readme={readme!r} has no '{SECTION}' section to put the results table in.")
  return text[:heading.end()] + "\n" + block + "\n" + text[heading.end():]


def choose_runs(text: str, names: list[str], kept: list[dict]) -> list[str]:
  """--run's names: comma-separated experiments, 'missing' (no kept default run) or 'all'."""
  chosen = []
  for item in (item.strip() for item in text.split(",")):
    if item == "all":
      chosen += names
    elif item == "missing":
      chosen += missing_default_runs(kept, names)
    elif item in names:
      chosen.append(item)
    elif item:
      raise ValueError(f"--run: unknown experiment {item!r}; choose from 'all', 'missing' or {names}.")
  return list(dict.fromkeys(chosen))


def check_writable(folder: str, flag: str) -> None:
  """Creates `folder` and a file in it, or raises a ValueError naming `flag` (up front, before a long run)."""
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as e:
    raise ValueError(f"{flag}: cannot write results into {folder!r}: {e.strerror or e}.") from e


def run_default(name: str, results_dir: str) -> None:
  """Runs `experiments.<name>` at its default config into results_dir/<name>, keeping only what is published
  there (results.json, results.md, the plots): scratch the run left behind (checkpoints, per-row run folders)
  is removed, but nothing that was in the folder before."""
  module = importlib.import_module(f"experiments.{name}")
  folder = os.path.join(results_dir, name)
  before = set(os.listdir(folder))
  print(f"[report] running experiments.{name} (default config) into {folder}", flush=True)
  module.run(module.default_config(), folder)
  with open(os.path.join(folder, "results.json")) as f:
    published = {"results.json", "results.md"} | {os.path.basename(p) for p in json.load(f).get("plots", []) if p}
  for entry in sorted(set(os.listdir(folder)) - before - published):
    path = os.path.join(folder, entry)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)


def _readme_text(readme: str) -> str:
  """README's text, checked to have the section the table goes in (a ValueError naming --readme otherwise)."""
  try:
    with open(readme) as f:
      text = f.read()
  except OSError as e:
    raise ValueError(f"--readme={readme!r}: cannot read it: {e.strerror or e}.") from e
  with_readme_block(text, "", readme)
  return text


def rebuild(results_dir: str, readme: str) -> tuple[str, str]:
  """Regenerates the index and README.md's table from the kept results; returns both paths."""
  if not os.path.isdir(results_dir):
    raise ValueError(f"--results_dir={results_dir!r} is not a directory.")
  text = _readme_text(readme)
  names = experiment_names()
  kept = kept_results(results_dir, names)
  index_path = os.path.join(results_dir, "README.md")
  try:
    with open(index_path, "w") as f:
      f.write(index_markdown(kept, names, results_dir))
  except OSError as e:
    raise ValueError(f"--results_dir={results_dir!r}: cannot write {index_path}: {e.strerror or e}.") from e
  updated = with_readme_block(text, readme_block(kept, names, results_dir, readme), readme)
  if updated != text:
    try:
      with open(readme, "w") as f:
        f.write(updated)
    except OSError as e:
      raise ValueError(f"--readme={readme!r}: cannot write it: {e.strerror or e}.") from e
  return index_path, readme


def report(run: str = "", results_dir: str = RESULTS_DIR, readme: str = README) -> tuple[str, str]:
  """The program: re-runs `run`'s experiments (none by default), then rebuilds the index."""
  results_dir, readme = os.path.abspath(results_dir), os.path.abspath(readme)
  names = experiment_names()
  chosen = choose_runs(run, names, kept_results(results_dir, names) if os.path.isdir(results_dir) else [])
  if chosen:  # every bad argument refused before the first (long) run starts
    _readme_text(readme)
  for name in chosen:
    check_writable(os.path.join(results_dir, name), f"--run={name} with --results_dir={results_dir!r}")
  for name in common.progress(chosen, desc="report runs", unit="experiment") if chosen else []:
    run_default(name, results_dir)
  return rebuild(results_dir, readme)


if __name__ == "__main__":
  # As the experiments' own programs do (moe's expert-parallel check): 8 CPU devices, set before JAX starts.
  jax.config.update("jax_num_cpu_devices", 8)
  _RUN = flags.DEFINE_string("run", "", "Experiments to re-run at their default config first: comma-separated "
                             "names, 'missing' (no kept default run) or 'all'. Default: none (rebuild only).")
  _RESULTS_DIR = flags.DEFINE_string("results_dir", RESULTS_DIR, "Folder of the kept results, one per run.")
  _README = flags.DEFINE_string("readme", README, "README whose '## Results' section gets the table.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for path in report(_RUN.value, _RESULTS_DIR.value, _README.value):
      print(f"wrote {path}", flush=True)

  app.run(main)
