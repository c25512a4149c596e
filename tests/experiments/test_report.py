"""experiments.report over fake kept results (index, README table, missing runs, bad input) and the shared stamp /
progress pieces of experiments.common it relies on."""
import json
import sys
import types

import pytest

from experiments import bench_sparse, common, report

README_TEXT = "# Project\n\n## Results\n\nProse that stays.\n\n| old | table |\n|---|---|\n\n## Next\n\nMore.\n"


def _write_fake_results(results_dir):
  """Two kept runs: `prune` (a default run, mapped by its folder) and `decode_on_gpu` (a variant, mapped by the
  command in its stamp)."""
  prune_dir, decode_dir = results_dir / "prune", results_dir / "decode_on_gpu"
  prune_dir.mkdir(parents=True)
  decode_dir.mkdir()
  common.write_results(str(prune_dir), title="fake prune", config={"a": 1}, results={"x": 1.0}, claims=[
      common.Claim("Wanda beats magnitude at 50%", "12.0 vs 15.0", "reproduced"),
      common.Claim("2:4 | costs more", "line one\nline two", "not reproduced")])
  common.write_results(str(decode_dir), title="fake decode", config={"b": 2}, results={}, claims=[
      common.Claim("fused int8 decode beats dequantize-all", "0.75x", "partly (at 8k only)")],
      command="python -m experiments.bench_decode --workdir=decode_on_gpu --config.batch=8")


def test_index_and_readme_table_from_kept_results(tmp_path):
  results_dir, readme = tmp_path / "results", tmp_path / "README.md"
  _write_fake_results(results_dir)
  readme.write_text(README_TEXT)
  report.report(results_dir=str(results_dir), readme=str(readme))

  index = (results_dir / "README.md").read_text()
  assert "| prune | Wanda beats magnitude at 50% | 12.0 vs 15.0 | reproduced | [prune](prune/results.md) |" in index
  assert "| prune | 2:4 \\| costs more | line one line two | not reproduced |" in index  # one row per claim
  assert ("| bench_decode | fused int8 decode beats dequantize-all | 0.75x | partly (at 8k only) | "
          "[decode_on_gpu](decode_on_gpu/results.md) |") in index
  assert "3 claims from 2 kept runs: 1 reproduced, 1 partly, 1 not reproduced, 0 other." in index
  missing = index.split("No kept default run yet: ")[1].split("\n")[0]
  assert "`ptq`" in missing and "`bench_decode` (variant kept: decode_on_gpu)" in missing
  assert "`prune`" not in missing  # it has a folder of its own name
  assert "`python -m experiments.bench_decode --workdir=decode_on_gpu --config.batch=8`" in index

  text = readme.read_text()
  assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
  assert text.index("## Results") < text.index(report.BEGIN) < text.index("Prose that stays.")
  assert text.endswith("Prose that stays.\n\n| old | table |\n|---|---|\n\n## Next\n\nMore.\n")
  assert "| [prune](results/prune/results.md) | Wanda beats magnitude at 50% | 12.0 vs 15.0 | reproduced |" in text
  assert "|  | 2:4 \\| costs more | line one line two | not reproduced |" in text
  report.report(results_dir=str(results_dir), readme=str(readme))  # again: the same files
  assert readme.read_text() == text and (results_dir / "README.md").read_text() == index


def test_readme_without_results_section_is_refused_before_any_run(tmp_path, monkeypatch):
  monkeypatch.setattr(report, "run_default", lambda *args: pytest.fail("ran before checking the README"))
  _write_fake_results(tmp_path / "results")
  (tmp_path / "README.md").write_text("# Project\n\nNo section.\n")
  for run in ("", "bench_sparse"):
    with pytest.raises(ValueError, match=r"--readme=.*has no '## Results' section"):
      report.report(run=run, results_dir=str(tmp_path / "results"), readme=str(tmp_path / "README.md"))


def test_unknown_run_name_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"--run: unknown experiment 'pruning'; choose from 'all', 'missing' or "
                                       r"\[.*'prune'.*\]"):
    report.report(run="prune,pruning", results_dir=str(tmp_path), readme=str(tmp_path / "README.md"))


def test_unwritable_results_folder_is_refused_before_any_run(tmp_path, monkeypatch):
  monkeypatch.setattr(report, "run_default", lambda *args: pytest.fail("ran before checking the folder"))
  (tmp_path / "README.md").write_text(README_TEXT)
  (tmp_path / "a_file").write_text("")
  results_dir = tmp_path / "a_file" / "results"  # below a file: no one (root included) can create it
  with pytest.raises(ValueError, match=r"--run=bench_sparse with --results_dir=.*a_file/results.*: cannot write"):
    report.report(run="bench_sparse", results_dir=str(results_dir), readme=str(tmp_path / "README.md"))
  (tmp_path / "results" / "README.md").mkdir(parents=True)  # the index's path is taken by a folder
  with pytest.raises(ValueError, match=r"--results_dir=.*: cannot write .*README.md"):
    report.report(results_dir=str(tmp_path / "results"), readme=str(tmp_path / "README.md"))


def test_run_writes_the_default_run_and_drops_its_scratch(tmp_path, monkeypatch):
  tiny = bench_sparse.default_config()
  tiny.update(m=16, k=256, n=256, block=64, densities="0.25,1.0", repeats=1)
  original_run = bench_sparse.run

  def run_leaving_scratch(config, workdir):
    (tmp_path / "results" / "bench_sparse" / "scratch").mkdir()
    return original_run(config, workdir)

  monkeypatch.setattr(bench_sparse, "default_config", lambda: tiny.copy_and_resolve_references())
  monkeypatch.setattr(bench_sparse, "run", run_leaving_scratch)
  (tmp_path / "results" / "bench_sparse").mkdir(parents=True)
  (tmp_path / "results" / "bench_sparse" / "notes.txt").write_text("kept")  # was there before: stays
  (tmp_path / "README.md").write_text(README_TEXT)
  report.report(run="bench_sparse", results_dir=str(tmp_path / "results"), readme=str(tmp_path / "README.md"))
  folder = tmp_path / "results" / "bench_sparse"
  assert sorted(p.name for p in folder.iterdir()) == ["bench_sparse.png", "notes.txt", "results.json",
                                                      "results.md"]
  saved = json.loads((folder / "results.json").read_text())
  assert saved["command"].startswith("python -m experiments.bench_sparse --workdir=")
  assert "[bench_sparse](bench_sparse/results.md)" in (tmp_path / "results" / "README.md").read_text()


def test_command_stamp_is_the_program_line_or_its_equivalent(monkeypatch):
  config = bench_sparse.default_config()
  config.update(m=16, densities="0.5")
  # called from a test: the equivalent command, with the fields that differ from the default config
  assert common.command_line("bench_sparse", config.to_dict(), "/elsewhere/out") == (
      "python -m experiments.bench_sparse --workdir=/elsewhere/out --config.densities=0.5 --config.m=16")
  # run as `python -m experiments.bench_sparse ...`: exactly its command line
  monkeypatch.setitem(sys.modules, "__main__",
                      types.SimpleNamespace(__spec__=types.SimpleNamespace(name="experiments.bench_sparse")))
  monkeypatch.setattr(sys, "argv", ["/repo/experiments/bench_sparse.py", "--workdir=w", "--config.m=16"])
  assert common.command_line("bench_sparse", config.to_dict(), "w") == (
      "python -m experiments.bench_sparse --workdir=w --config.m=16")


def test_progress_writes_log_lines_with_an_eta_or_nothing(monkeypatch, capsys):
  monkeypatch.delenv("EFFICIENT_NO_PROGRESS", raising=False)
  assert list(common.progress(range(3), desc="rows", unit="row")) == [0, 1, 2]
  lines = capsys.readouterr().err.splitlines()  # stderr is not a terminal here: plain lines, no '\r' redraws
  assert lines[0] == "rows: 0/3 row [00:00<?]" and lines[-1].startswith("rows: 3/3 row [00:00<00:00")
  assert not any("\r" in line for line in lines)
  monkeypatch.setenv("EFFICIENT_NO_PROGRESS", "1")
  assert list(common.progress(range(3), desc="rows")) == [0, 1, 2]
  assert capsys.readouterr().err == ""
