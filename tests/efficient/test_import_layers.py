"""The floors of the README's Design section hold: parsed from the source (every import, function-local ones included), the
transforms and the attention core never import `efficient.models`, `pallas_kernels` never imports `efficient`,
and `efficient/` has no import cycle."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL_FREE = ("efficient.quant", "efficient.sparse", "efficient.attention", "efficient.calibration",
              "efficient.nn", "efficient.sharding", "efficient.train", "efficient.measure", "efficient.data",
              "efficient.optim", "efficient.scaling")


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules=frozenset(), package: str | None = None) -> set[str]:
  """Every module `path` imports, anywhere in the file. `from a import b` yields a.b when that is one of
  `modules` (a submodule), else a (a name from a's __init__)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  if package is None:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
      for alias in node.names:
        found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
  return found


def _graph(top: str) -> dict[str, set[str]]:
  files = sorted((ROOT / top).rglob("*.py"))
  modules = {_module_name(f): f for f in files}
  return {name: {m for m in _imports(f, frozenset(modules)) if m in modules and m != name}
          for name, f in modules.items()}


def test_transforms_and_attention_core_never_import_models():
  graph = _graph("efficient")
  offenders = {name: sorted(m for m in deps if m == "efficient.models" or m.startswith("efficient.models."))
               for name, deps in graph.items() if name.startswith(MODEL_FREE)}
  assert graph and not {k: v for k, v in offenders.items() if v}


def test_kernels_never_import_efficient_or_flax():
  for path in sorted((ROOT / "pallas_kernels").rglob("*.py")):
    bad = sorted(m for m in _imports(path) if m.split(".")[0] in ("efficient", "experiments", "flax"))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A module cycle of `graph` (a package counts as importing its parent package's __init__ only if it says so)."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == 1:
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_efficient_has_no_import_cycle():
  graph = _graph("efficient")
  assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("source,expected", [
    ("from efficient.models import llama\n", {"efficient.models.llama"}),
    ("from efficient.models import load\n", {"efficient.models"}),
    ("def f():\n  import efficient.models.zoo\n", {"efficient.models.zoo"}),
    ("from . import core\n", {"efficient.attention.core"}),
])
def test_import_parser_sees_every_import(tmp_path, source, expected):
  path = tmp_path / "probe.py"
  path.write_text(source)
  modules = frozenset({"efficient.models.llama", "efficient.models.zoo", "efficient.attention.core"})
  assert _imports(path, modules, package="efficient.attention") == expected
