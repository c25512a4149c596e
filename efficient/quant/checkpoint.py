"""Checkpoints of quantized models that know their format: `save_quantized(model, directory)` and
`load_quantized(model_like, directory)`.

A quantized layer's arrays alone do not say what they mean: int4 and NF4 codes are both packed uint8 with a
scale per group, and orbax casts int8 codes into an fp8 target without complaint, so a plain array checkpoint
restores into a model quantized differently and silently computes other numbers. Here the arrays go to
`directory/arrays` (orbax `StandardCheckpointer`, the model's `nnx.State` as stored: packed stays packed) and
beside them `directory/quant_manifest.json` records

  qarrays   for every quantized weight (a `layers.QuantizedEinsum` / `LLMInt8Einsum`, or any `QArray` held by a
            variable), by module path: fmt, group_size, granularity, axis, shape, dtype, logical_axes, and for
            layers the layer type and its static options (mode, outlier threshold)
  arrays    for every array of the state, by path: shape, dtype and variable type

`load_quantized` compares the model's own manifest with the saved one before restoring anything and refuses any
difference with one ValueError listing each mismatch by path and field, e.g.
"blocks/0/mlp/up: fmt is 'int4' in the checkpoint, 'nf4' in the model". It works on any NNX model (it walks the
graph and the state, nothing model-specific); a match restores bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from efficient.checkpointing import save_with_manifest
from efficient.quant import layers
from efficient.quant.qarray import QArray

MANIFEST_FILE = "quant_manifest.json"
ARRAYS_DIR = "arrays"
VERSION = 1
QARRAY_FIELDS = ("fmt", "group_size", "granularity", "axis", "shape", "dtype", "logical_axes")
LAYER_OPTIONS = ("mode", "threshold")  # static options of the quantized layers that change what they compute
MAX_LISTED = 20  # mismatches spelled out in the error (the rest are counted)


def _path(parts) -> str:
  return "/".join(str(p) for p in parts)


def _jsonable(value):
  """`value` as it reads back from JSON (tuples become lists), so saved and live manifests compare equal."""
  return json.loads(json.dumps(value))


def _qarray_entry(q: QArray) -> dict:
  return {field: getattr(q, field) for field in QARRAY_FIELDS}


def _leaf_entries(prefix: str, value, variable_type: str) -> dict:
  """{path: {shape, dtype, variable}} of every array in `value` (an array, or a pytree such as a QArray)."""
  out = {}
  for sub, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
    key = prefix + "".join(f"/{getattr(k, 'name', getattr(k, 'key', getattr(k, 'idx', k)))}" for k in sub)
    out[key] = {"shape": list(getattr(leaf, "shape", ())), "dtype": str(getattr(leaf, "dtype", type(leaf).__name__)),
                "variable": variable_type}
  return out


def manifest(model: nnx.Module) -> dict:
  """What `save_quantized` records about `model` (module docstring): {'version', 'qarrays', 'arrays'}."""
  qarrays = {}
  for parts, node in nnx.iter_graph(model):
    if isinstance(node, layers._QuantizedProjection):
      entry = _qarray_entry(node.qarray)
      entry["layer"] = type(node).__name__
      entry.update({option: getattr(node, option) for option in LAYER_OPTIONS if hasattr(node, option)})
      qarrays[_path(parts)] = entry
    elif isinstance(node, nnx.Variable) and isinstance(node.get_value(), QArray):
      qarrays[_path(parts)] = _qarray_entry(node.get_value())
    elif isinstance(node, QArray):
      qarrays[_path(parts)] = _qarray_entry(node)
  arrays = {}
  _, state = nnx.split(model)
  for parts, leaf in nnx.to_flat_state(state):
    if isinstance(leaf, nnx.Variable):
      arrays.update(_leaf_entries(_path(parts), leaf.get_value(), type(leaf).__name__))
    else:
      arrays.update(_leaf_entries(_path(parts), leaf, type(leaf).__name__))
  return _jsonable({"version": VERSION, "qarrays": qarrays, "arrays": arrays})


def mismatches(saved: dict, current: dict) -> list[str]:
  """Every difference between a checkpoint's manifest and a model's, as 'path: what differs' lines."""
  problems = []
  if saved.get("version") != VERSION:
    problems.append(f"manifest version is {saved.get('version')!r} in the checkpoint, {VERSION} here")
  for section, what in (("qarrays", "quantized"), ("arrays", "an array")):
    old, new = saved.get(section, {}), current[section]
    for path in sorted(set(old) | set(new)):
      if path not in new:
        problems.append(f"{path}: {what} in the checkpoint ({_describe(old[path])}), absent from the model")
      elif path not in old:
        problems.append(f"{path}: {what} in the model ({_describe(new[path])}), absent from the checkpoint")
      else:
        for field in sorted(set(old[path]) | set(new[path]), key=_field_order):
          if old[path].get(field) != new[path].get(field):
            problems.append(f"{path}: {field} is {old[path].get(field)!r} in the checkpoint, "
                            f"{new[path].get(field)!r} in the model")
  return problems


def _field_order(field: str):
  order = QARRAY_FIELDS + ("layer",) + LAYER_OPTIONS + ("shape", "dtype", "variable")
  return (order.index(field) if field in order else len(order), field)


def _describe(entry: dict) -> str:
  if "fmt" in entry:
    return f"fmt {entry['fmt']!r}, group_size {entry.get('group_size')}"
  return f"{entry.get('dtype')}{entry.get('shape')}"


def save_quantized(model: nnx.Module, directory, *, force: bool = False) -> dict:
  """Saves `model`'s state (orbax) and its manifest under `directory`; returns the manifest. `force`: overwrite
  an existing checkpoint there."""
  _, state = nnx.split(model)
  return save_with_manifest(Path(directory).absolute(), state, manifest(model), manifest_file=MANIFEST_FILE,
                            arrays_dir=ARRAYS_DIR, what="a quantized checkpoint", force=force)


def read_manifest(directory) -> dict:
  """The manifest `save_quantized` wrote under `directory`, or a ValueError naming the directory."""
  file = Path(directory).absolute() / MANIFEST_FILE
  if not file.exists():
    raise ValueError(f"directory={str(directory)!r} holds no {MANIFEST_FILE}: not a checkpoint written by "
                     f"save_quantized (or an interrupted one).")
  return json.loads(file.read_text())


def load_quantized(model_like: nnx.Module, directory) -> nnx.Module:
  """Restores the checkpoint under `directory` into `model_like` (in place; returned), which must be quantized
  exactly as the saved model was (same paths, formats, group sizes, granularities, axes, shapes, dtypes, logical
  axes, layer types and modes; its values do not matter). Any mismatch is a ValueError listing each one by module
  path and field; nothing is restored then."""
  directory = Path(directory).absolute()
  problems = mismatches(read_manifest(directory), manifest(model_like))
  if problems:
    listed = "; ".join(problems[:MAX_LISTED])
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise ValueError(f"the checkpoint in {str(directory)!r} does not match model_like ({len(problems)} "
                     f"mismatch{'es' if len(problems) > 1 else ''}): {listed}{more}.")
  _, state = nnx.split(model_like)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = ocp.StandardCheckpointer().restore(directory / ARRAYS_DIR, abstract)
  nnx.update(model_like, restored)
  return model_like


__all__ = ["ARRAYS_DIR", "MANIFEST_FILE", "load_quantized", "manifest", "mismatches", "read_manifest",
           "save_quantized"]
