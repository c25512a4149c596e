"""Adapter checkpoints: `save_adapters(model, directory)` writes the adapter parameters alone (not the frozen base)
and `load_adapters(base_model, directory)` puts the same adapters back onto a base loaded from its own files.

An adapter's arrays alone do not say how to rebuild it (which wrapper, which rank and scaling, around which
layer), so beside the arrays (`directory/arrays`, orbax `StandardCheckpointer`, a small tree keyed by the
parameters' model paths) `directory/adapters.json` records

  model_config  `model.config.to_dict()` when the model has one (checked against the base on load)
  adapters      per adapter module path: its config class (`efficient.peft.core.register_config`) and fields,
                the wrapper class, and for a wrapped linear layer (`core.AdaptedLinear`) the base's geometry
                (equation, kernel shape, in/out features, quantized or not)
  arrays        per adapter parameter path: shape and dtype

An adapter module is every `core.AdaptedLinear` and every other module (e.g. a ReFT intervention) that holds
`efficient.nn.Adapter` parameters and a registered config as its `config` attribute. `load_adapters` rebuilds each
one with `config.wrap(module at path, rngs, path)` (outer paths first, so an adapter inside another adapter's
wrapped module works), checks every path, geometry, array shape and dtype, then restores the values bit for bit.
Anything wrong -- a missing or corrupt manifest, an unknown config class, another model config, a missing path,
another base shape, another array shape -- is one ValueError naming the file and the mismatch, and leaves the
model exactly as it was (the wrapped modules are put back).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Iterator

import orbax.checkpoint as ocp
from flax import nnx

from efficient import calibration, nn
from efficient.checkpointing import save_with_manifest
from efficient.peft import core

MANIFEST_FILE = "adapters.json"
ARRAYS_DIR = "arrays"
VERSION = 1
GEOMETRY_FIELDS = ("equation", "kernel_shape", "in_features", "out_features", "quantized")
MAX_LISTED = 20  # mismatches spelled out in an error (the rest are counted)


def _jsonable(value):
  """`value` as it reads back from JSON (tuples become lists), so saved and live records compare equal."""
  return json.loads(json.dumps(value))


def _tuples(value):
  """JSON lists back to tuples (config fields are hashable in frozen dataclasses)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _config_of(module):
  """The module's registered adapter config (its `config` attribute), or None."""
  config = getattr(module, "config", None)
  registered = tuple(core.CONFIGS.values())
  return config if registered and isinstance(config, registered) else None


def _adapter_variables(node, prefix: str = "") -> dict[str, nnx.Variable]:
  """{path: variable} of every `nn.Adapter` under `node` (paths from `node`, joined to `prefix`)."""
  found = {}
  for parts, leaf in nnx.iter_graph(node):
    if isinstance(leaf, nn.Adapter):
      found[calibration.path_str((prefix,) + tuple(parts) if prefix else parts)] = leaf
  return found


def adapter_modules(model: nnx.Module) -> dict[str, nnx.Module]:
  """{path: module} of every adapter module (module docstring), in natural path order."""
  found = {}
  for parts, node in nnx.iter_graph(model):
    if isinstance(node, core.AdaptedLinear) or (
        isinstance(node, nnx.Module) and _config_of(node) is not None and _adapter_variables(node)):
      found[calibration.path_str(parts)] = node
  return {p: found[p] for p in sorted(found, key=calibration.natural_key)}


def _owner(path: str, owners) -> str | None:
  """The deepest of `owners` (module paths) that `path` lies under."""
  inside = [o for o in owners if path.startswith(o + "/")]
  return max(inside, key=len) if inside else None


def _owned_arrays(model: nnx.Module, owners) -> dict[str, nnx.Variable]:
  """{path: variable} of the adapter parameters lying under the module paths `owners`."""
  return {p: v for p, v in _adapter_variables(model).items() if _owner(p, owners) is not None}


def _geometry_entry(geo: core.Geometry) -> dict:
  return _jsonable({field: getattr(geo, field) for field in GEOMETRY_FIELDS})


def _model_config(model):
  to_dict = getattr(getattr(model, "config", None), "to_dict", None)
  return _jsonable(to_dict()) if callable(to_dict) else None


def _config_entry(path: str, module) -> dict:
  config = _config_of(module)
  if config is None:
    raise ValueError(f"{path}: the {type(module).__name__} has no registered adapter config as its `config` "
                     f"attribute (efficient.peft.core.register_config), so a checkpoint could not rebuild it.")
  cls = type(config)
  try:
    fields = _jsonable(dataclasses.asdict(config))
  except TypeError as e:
    raise ValueError(f"{path}: the fields of {cls.__name__} are not JSON-serializable ({e}).") from e
  if _jsonable(dataclasses.asdict(cls(**_tuples(fields)))) != fields:
    raise ValueError(f"{path}: {cls.__name__} does not rebuild from its JSON fields {fields}.")
  entry = {"config": cls.__name__, "config_module": cls.__module__, "fields": fields,
           "wrapper": type(module).__name__}
  if isinstance(module, core.AdaptedLinear):
    entry["geometry"] = _geometry_entry(module.geometry)
  return entry


def _array_entries(variables: dict[str, nnx.Variable]) -> dict:
  return {p: {"shape": list(v[...].shape), "dtype": str(v[...].dtype)} for p, v in variables.items()}


def manifest(model: nnx.Module) -> dict:
  """What `save_adapters` records about `model` (module docstring); ValueError when it has nothing to save or an
  adapter parameter that no adapter module owns."""
  modules = adapter_modules(model)
  if not modules:
    raise ValueError(f"model ({type(model).__name__}) holds no adapters to save (efficient.peft.add_adapters).")
  entries = {path: _config_entry(path, module) for path, module in modules.items()}
  variables = _adapter_variables(model)
  orphans = [p for p in variables if _owner(p, modules) is None]
  if orphans:
    raise ValueError(f"adapter parameters {orphans[:5]} belong to no adapter module (an AdaptedLinear or a module "
                     f"with a registered `config`); a checkpoint could not rebuild them.")
  return {"version": VERSION, "model_config": _model_config(model), "adapters": entries,
          "arrays": _array_entries(variables)}


def _tree(variables: dict[str, nnx.Variable], leaf) -> dict:
  """The nested {str: ...} tree orbax stores: one level per path part, `leaf(variable)` at the ends."""
  tree: dict = {}
  for path, variable in variables.items():
    *parents, name = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = leaf(variable)
  return tree


def _lookup(tree: dict, path: str):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def save_adapters(model: nnx.Module, directory, *, force: bool = False) -> dict:
  """Saves `model`'s adapter parameters (only those) and their manifest under `directory`; returns the manifest.
  `force`: overwrite an adapter checkpoint already there."""
  directory = Path(directory).absolute()
  record = manifest(model)
  tree = _tree(_owned_arrays(model, record["adapters"]), lambda v: v[...])
  return save_with_manifest(directory, tree, record, manifest_file=MANIFEST_FILE, arrays_dir=ARRAYS_DIR,
                            what="an adapter checkpoint", force=force)


def read_manifest(directory) -> dict:
  """The manifest `save_adapters` wrote under `directory`; ValueError naming the file when it is missing, not
  JSON, or not an adapter manifest of this version."""
  directory = Path(directory).absolute()
  file = directory / MANIFEST_FILE
  if not directory.is_dir():
    raise ValueError(f"directory={str(directory)!r} does not exist (no adapter checkpoint there).")
  if not file.is_file():
    raise ValueError(f"{file} is missing: {str(directory)!r} is not a checkpoint written by save_adapters (or an "
                     f"interrupted one).")
  try:
    record = json.loads(file.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{file} is corrupt: not JSON ({e}).") from e
  if not isinstance(record, dict) or record.get("version") != VERSION:
    version = record.get("version") if isinstance(record, dict) else None
    raise ValueError(f"{file} is not an adapter manifest of version {VERSION} (version {version!r}).")
  for key in ("adapters", "arrays"):
    if not isinstance(record.get(key), dict) or not record[key]:
      raise ValueError(f"{file} is corrupt: its {key!r} entry is missing or empty.")
  for path, entry in record["adapters"].items():
    if (not isinstance(entry, dict) or not isinstance(entry.get("config"), str)
        or not isinstance(entry.get("fields"), dict) or not isinstance(entry.get("geometry", {}), dict)):
      raise ValueError(f"{file} is corrupt: the entry of {path} needs a config name, its fields and (for a linear "
                       f"layer) the base geometry; got {entry!r}.")
  for path, entry in record["arrays"].items():
    if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) or not isinstance(
        entry.get("dtype"), str):
      raise ValueError(f"{file} is corrupt: the array entry of {path} needs a shape and a dtype; got {entry!r}.")
  return record


def _rebuild_config(file: Path, path: str, entry: dict) -> core.AdapterConfig:
  name, fields = entry["config"], entry["fields"]  # present: read_manifest checked the structure
  cls = core.CONFIGS.get(name)
  if cls is None:
    raise ValueError(f"{file}: {path} uses the adapter config class {name!r} (from {entry.get('config_module')!r}), "
                     f"which is not registered; import the module defining it first (registered: "
                     f"{sorted(core.CONFIGS)}).")
  try:
    return cls(**_tuples(fields))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{file}: {path}: {name}({fields}) cannot be rebuilt: {e}") from e


def _wrap(model: nnx.Module, file: Path, path: str, entry: dict, rngs: nnx.Rngs) -> nnx.Module:
  """The rebuilt adapter module for `path` (not yet placed in the model), after checking the module there."""
  config = _rebuild_config(file, path, entry)
  try:
    module = calibration.get_module(model, path)
  except (AttributeError, IndexError, KeyError, TypeError) as e:
    raise ValueError(f"{file}: the model has no module at {path} ({type(e).__name__}: {e}).") from None
  if isinstance(module, core.AdaptedLinear) or _config_of(module) is not None:
    raise ValueError(f"{file}: {path} already holds an adapter ({type(module).__name__}); load onto a base model.")
  if "geometry" in entry:
    try:
      geometry = _geometry_entry(core.geometry(module))
    except TypeError as e:
      raise ValueError(f"{file}: {path} is a {type(module).__name__} in the model, not the linear layer the "
                       f"adapter wrapped ({e}).") from None
    diffs = [f"{field} {entry['geometry'].get(field)!r} in the checkpoint, {geometry[field]!r} in the model"
             for field in GEOMETRY_FIELDS if entry["geometry"].get(field) != geometry[field]]
    if diffs:
      raise ValueError(f"{file}: the base layer at {path} differs: " + "; ".join(diffs) + ".")
  try:
    wrapper = config.wrap(module, rngs, path)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{file}: {path}: {type(config).__name__}.wrap fails on the model's "
                     f"{type(module).__name__}: {e}") from e
  if type(wrapper).__name__ != entry.get("wrapper"):
    raise ValueError(f"{file}: {path}: {type(config).__name__} builds a {type(wrapper).__name__} here, the "
                     f"checkpoint holds a {entry.get('wrapper')!r}.")
  return wrapper


def _array_mismatches(saved: dict, current: dict) -> list[str]:
  problems = []
  for path in sorted(set(saved) | set(current), key=calibration.natural_key):
    if path not in current:
      problems.append(f"{path}: in the checkpoint, absent from the rebuilt adapters")
    elif path not in saved:
      problems.append(f"{path}: in the rebuilt adapters, absent from the checkpoint")
    elif saved[path] != current[path]:
      problems.append(f"{path}: {saved[path]['dtype']}{saved[path]['shape']} in the checkpoint, "
                      f"{current[path]['dtype']}{current[path]['shape']} in the rebuilt adapter")
  return problems


def _install(model: nnx.Module, directory, rngs: nnx.Rngs | None):
  """Places the checkpoint's adapters in `model` and restores their values; returns [(path, original module,
  wrapper)]. On any error every original module is put back before the ValueError propagates."""
  directory = Path(directory).absolute()
  record = read_manifest(directory)
  file = directory / MANIFEST_FILE
  saved_config, model_config = record.get("model_config"), _model_config(model)
  if saved_config is not None and model_config is not None and saved_config != model_config:
    diffs = [f"{k}: {saved_config.get(k)!r} in the checkpoint, {model_config.get(k)!r} in the model"
             for k in sorted(set(saved_config) | set(model_config)) if saved_config.get(k) != model_config.get(k)]
    raise ValueError(f"{file} was saved from a model with another config: " + "; ".join(diffs) + ".")
  rngs = rngs if rngs is not None else nnx.Rngs(0)
  placed: list[tuple[str, nnx.Module, nnx.Module]] = []
  try:
    # Outer paths first: an adapter inside another adapter's wrapped module is found through its wrapper.
    for path in sorted(record["adapters"], key=lambda p: (p.count("/"), calibration.natural_key(p))):
      wrapper = _wrap(model, file, path, record["adapters"][path], rngs)
      placed.append((path, calibration.get_module(model, path), wrapper))
      calibration.set_module(model, path, wrapper)
    variables = _owned_arrays(model, record["adapters"])
    problems = _array_mismatches(record["arrays"], _array_entries(variables))
    if problems:
      more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
      raise ValueError(f"{file}: the adapter arrays do not match ({len(problems)} mismatch"
                       f"{'es' if len(problems) > 1 else ''}): " + "; ".join(problems[:MAX_LISTED]) + more + ".")
    abstract = _tree(variables, lambda v: ocp.utils.to_shape_dtype_struct(v[...]))
    try:
      restored = ocp.StandardCheckpointer().restore(directory / ARRAYS_DIR, abstract)
    except Exception as e:  # orbax's own errors (missing or damaged array files)
      raise ValueError(f"{directory / ARRAYS_DIR}: the adapter arrays do not restore ({type(e).__name__}: "
                       f"{str(e)[:300]}).") from e
    for path, variable in variables.items():
      variable.set_value(_lookup(restored, path))
  except BaseException:
    for path, original, _ in reversed(placed):
      calibration.set_module(model, path, original)
    raise
  return placed


def load_adapters(model: nnx.Module, directory, *, rngs: nnx.Rngs | None = None) -> dict[str, nnx.Module]:
  """Re-creates the adapters saved under `directory` in `model` (a base model: same config, the same layers at
  the saved paths, no adapters there) and restores their values exactly; returns {path: adapter module}. Any
  mismatch is one ValueError naming the file; the model is then unchanged. `rngs` only seeds the throwaway
  initial values of the rebuilt adapters (default `nnx.Rngs(0)`)."""
  return {path: wrapper for path, _, wrapper in _install(model, directory, rngs)}


@contextlib.contextmanager
def loaded_adapters(model: nnx.Module, directory, *, rngs: nnx.Rngs | None = None) -> Iterator[dict]:
  """`load_adapters` for the duration of a `with` block: the model's original modules come back afterwards."""
  placed = _install(model, directory, rngs)
  try:
    yield {path: wrapper for path, _, wrapper in placed}
  finally:
    for path, original, _ in reversed(placed):
      calibration.set_module(model, path, original)


__all__ = ["ARRAYS_DIR", "MANIFEST_FILE", "adapter_modules", "load_adapters", "loaded_adapters", "manifest",
           "read_manifest", "save_adapters"]
