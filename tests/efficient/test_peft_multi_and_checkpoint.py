"""Adapter checkpoints (`efficient.peft.checkpoint`) and batched multi-LoRA serving (`efficient.peft.multi`).

Checkpoints: a LoRA'd TINY Llama saved and loaded onto a freshly built base restores every adapter array bit for
bit and the same logits bit for bit; the directory holds the adapter arrays only; every way a load can go wrong
is one ValueError naming the file, with the model left as it was. Multi-LoRA: a batch whose rows pick different
adapters (or none) equals each adapter's own model run row by row, for every grouped_matmul implementation
(the interpret-mode kernels on a small plain nnx.Linear + nnx.Einsum model).
"""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient.models import llama
from efficient.peft import checkpoint, core, lora, multi, reft
from tests.helpers import assert_close

QV = r"blocks/\d+/attention/(q|v)"
IDS = [2, 0, -1, 1]
# One compilation per model structure (eager Llama forwards compile every small op, slowly on shared CPUs).
_logits = nnx.jit(lambda model, tokens: model(tokens))
TOKENS = jnp.asarray(np.random.default_rng(3).integers(0, llama.TINY.vocab_size, (4, 8)), jnp.int32)


def _normal(seed, shape, scale=1.0):
  """NumPy random values (eager jax.random ops would each compile for every new shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _randomize(wrappers, seed):
  """LoRA B is 0 at init (the adapter is then a no-op): give A and B random values."""
  for i, w in enumerate(wrappers.values()):
    w.lora_a.set_value(_normal(1000 * seed + 2 * i, w.lora_a.shape, 0.3))
    w.lora_b.set_value(_normal(1000 * seed + 2 * i + 1, w.lora_b.shape, 0.3))


def _array_leaves(model):
  return {p: np.asarray(v[...]) for p, v in checkpoint._adapter_variables(model).items()}


def _numpy_init(key, shape, dtype=jnp.float32):
  """A deterministic initializer without jax.random (whose eager ops compile per shape, slowly)."""
  del key
  return _normal(int(np.prod(shape)), shape, 1.0 / np.sqrt(shape[0])).astype(dtype)


class Plain(nnx.Module):
  """A user's model: nnx.Linear [B, T, D] -> [B, T, H] and an nnx.Einsum head [B, T, H] -> [B, T, 2, 8]."""

  def __init__(self, rngs: nnx.Rngs, d: int = 16, hidden: int = 24, init=_numpy_init):
    self.lin = nnx.Linear(d, hidden, kernel_init=init, rngs=rngs)
    self.head = nnx.Einsum("btd,dhk->bthk", (hidden, 2, 8), (2, 8), kernel_init=init, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.gelu(self.lin(x)))


class LinOnly(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.lin = nnx.Linear(16, 24, rngs=rngs)

  def __call__(self, x):
    return self.lin(x)


PLAIN_RULES = [("lin|head", lora.LoRAConfig(rank=4, alpha=8.0))]


def _plain_lora(seed, rank=4, alpha=8.0, rules=None):
  model = Plain(nnx.Rngs(0))
  _randomize(core.add_adapters(model, rules or [("lin|head", lora.LoRAConfig(rank=rank, alpha=alpha))],
                               seed=seed), seed)
  return model


# --- checkpoints --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_base():
  return llama.Llama(llama.TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def saved(tiny_base, tmp_path_factory):
  """(source model: TINY + LoRA rank 4 on q/v, randomized; its checkpoint directory)."""
  model = nnx.clone(tiny_base)
  _randomize(core.add_adapters(model, [(QV, lora.LoRAConfig(rank=4, alpha=8.0))]), seed=1)
  directory = tmp_path_factory.mktemp("adapters") / "ckpt"
  checkpoint.save_adapters(model, directory)
  return model, directory


@pytest.fixture(scope="module")
def plain_saved(tmp_path_factory):
  model = _plain_lora(seed=3)
  directory = tmp_path_factory.mktemp("plain") / "ckpt"
  checkpoint.save_adapters(model, directory)
  return model, directory


def test_round_trip_onto_fresh_base_is_bit_exact(saved):
  source, directory = saved
  base = llama.Llama(llama.TINY, rngs=nnx.Rngs(0))  # the base "loaded from its own file": rebuilt from the seed
  loaded = checkpoint.load_adapters(base, directory, rngs=nnx.Rngs(7))  # other init values: all overwritten
  assert sorted(loaded) == sorted(core.adapters(source)) and len(loaded) == 4
  assert all(type(w) is lora.LoRAEinsum and w.rank == 4 and w.scaling == 2.0 for w in loaded.values())
  expected, actual = _array_leaves(source), _array_leaves(base)
  assert sorted(actual) == sorted(expected)
  for path in expected:
    np.testing.assert_array_equal(actual[path], expected[path], err_msg=path)
  np.testing.assert_array_equal(np.asarray(_logits(base, TOKENS)), np.asarray(_logits(source, TOKENS)))


def test_checkpoint_holds_only_the_adapters(saved, tiny_base):
  source, directory = saved
  record = json.loads((directory / checkpoint.MANIFEST_FILE).read_text())
  assert sorted(record["adapters"]) == sorted(core.adapters(source))
  assert all(p.rsplit("/", 1)[1] in ("lora_a", "lora_b") for p in record["arrays"])
  entry = record["adapters"]["blocks/0/attention/v"]
  assert entry["config"] == "LoRAConfig" and entry["fields"]["rank"] == 4 and entry["wrapper"] == "LoRAEinsum"
  assert entry["geometry"] == {"equation": "btd,dhk->bthk", "kernel_shape": [64, 2, 16], "in_features": 64,
                               "out_features": 32, "quantized": False}
  assert record["model_config"] == json.loads(json.dumps(llama.TINY.to_dict()))
  adapter_bytes = 4 * core.count_adapter_parameters(source)
  assert sum(4 * int(np.prod(a["shape"])) for a in record["arrays"].values()) == adapter_bytes
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(tiny_base, nnx.Param)))
  on_disk = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
  assert on_disk < base_bytes / 4, (on_disk, base_bytes)  # the base (~370 KB) is not in it


def test_round_trip_plain_model_with_nested_reft(tmp_path):
  """A plain nnx model, and any adapter module with a registered config: LoReFT around the LoRA'd `lin` (the
  LoRA then lives at lin/inner, rebuilt inside the rebuilt intervention)."""
  model = _plain_lora(seed=2)
  reft.add_interventions(model, [("lin", reft.ReFTConfig(rank=2, dim=24))], seed=5)
  checkpoint.save_adapters(model, tmp_path / "ckpt")
  base = Plain(nnx.Rngs(0))
  loaded = checkpoint.load_adapters(base, tmp_path / "ckpt")
  assert sorted(loaded) == ["head", "lin", "lin/inner"] and type(loaded["lin"]) is reft.LoReFTIntervention
  expected = _array_leaves(model)
  assert sorted(_array_leaves(base)) == sorted(expected) and len(expected) == 7
  for path, value in expected.items():
    np.testing.assert_array_equal(_array_leaves(base)[path], value, err_msg=path)
  x = _normal(0, (4, 3, 16))
  np.testing.assert_array_equal(np.asarray(_logits(base, x)), np.asarray(_logits(model, x)))


def _copy(directory, tmp_path):
  target = tmp_path / "copy"
  shutil.copytree(directory, target)
  return target


def _edit(directory, change):
  file = directory / checkpoint.MANIFEST_FILE
  record = json.loads(file.read_text())
  change(record)
  file.write_text(json.dumps(record))


def _assert_refused(model, directory, match):
  modules = dict(nnx.iter_graph(model))
  with pytest.raises(ValueError, match=match) as info:
    checkpoint.load_adapters(model, directory)
  assert str(directory) in str(info.value)
  assert not checkpoint.adapter_modules(model)  # nothing placed, or everything put back
  after = dict(nnx.iter_graph(model))
  assert set(after) == set(modules) and all(after[p] is modules[p] for p in modules)


def test_missing_directory(tmp_path):
  _assert_refused(Plain(nnx.Rngs(0)), tmp_path / "nowhere", "does not exist")


def test_missing_manifest(plain_saved, tmp_path):
  directory = _copy(plain_saved[1], tmp_path)
  (directory / checkpoint.MANIFEST_FILE).unlink()
  _assert_refused(Plain(nnx.Rngs(0)), directory, "adapters.json is missing")


def test_corrupt_manifest(plain_saved, tmp_path):
  directory = _copy(plain_saved[1], tmp_path)
  (directory / checkpoint.MANIFEST_FILE).write_text('{"version": 1, "adapters": {')
  _assert_refused(Plain(nnx.Rngs(0)), directory, "corrupt: not JSON")


def test_unknown_config_class(plain_saved, tmp_path):
  directory = _copy(plain_saved[1], tmp_path)
  _edit(directory, lambda r: r["adapters"]["head"].update(config="NoSuchConfig"))
  _assert_refused(Plain(nnx.Rngs(0)), directory, "'NoSuchConfig'.*not registered")


def test_other_model_config(saved):
  other = llama.Llama(llama.TINY.replace(init_std=0.05), rngs=nnx.Rngs(0))
  _assert_refused(other, saved[1], "another config: init_std: 0.02 in the checkpoint, 0.05 in the model")


def test_missing_path(plain_saved):
  _assert_refused(LinOnly(nnx.Rngs(0)), plain_saved[1], "no module at head")


def test_other_base_shape(plain_saved):
  other = Plain(nnx.Rngs(0), hidden=32, init=nnx.initializers.zeros_init())
  _assert_refused(other, plain_saved[1], r"base layer at head differs: kernel_shape \[24")


def test_array_shape_mismatch(plain_saved, tmp_path):
  directory = _copy(plain_saved[1], tmp_path)  # the manifest says rank 2, the arrays are rank 4
  _edit(directory, lambda r: r["adapters"]["lin"]["fields"].update(rank=2))
  _assert_refused(Plain(nnx.Rngs(0)), directory, r"lin/lora_a: float32\[16, 4\] in the checkpoint, float32\[16, 2\]")


def test_save_refuses_nothing_to_save_and_overwrite(plain_saved, tmp_path):
  with pytest.raises(ValueError, match="holds no adapters"):
    checkpoint.save_adapters(Plain(nnx.Rngs(0)), tmp_path / "empty")
  with pytest.raises(ValueError, match="force=True"):
    checkpoint.save_adapters(plain_saved[0], plain_saved[1])


# --- multi-adapter serving -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sources(tiny_base):
  """3 LoRA models on the same TINY base and 4 rows of tokens (one alpha: the scaling is static, so the three
  share one compilation; per-adapter scalings are tested on the plain model)."""
  sources = []
  for s in range(3):
    model = nnx.clone(tiny_base)
    _randomize(core.add_adapters(model, [(QV, lora.LoRAConfig(rank=4, alpha=8.0))], seed=s), seed=10 + s)
    sources.append(model)
  tokens = TOKENS
  per_adapter = [np.asarray(_logits(m, tokens)) for m in sources] + [np.asarray(_logits(tiny_base, tokens))]
  return sources, tokens, per_adapter


def _check_rows(out, per_adapter, ids=IDS):
  for row, i in enumerate(ids):
    assert_close(f"row {row} (adapter {i})", np.asarray(out)[row], per_adapter[i][row], 1e-5)
    if i >= 0:  # the adapter is really applied (the test would pass for a no-op otherwise)
      assert np.abs(per_adapter[i][row] - per_adapter[-1][row]).max() > 1e-2


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_multi_lora_equals_per_adapter_runs_tiny(tiny_base, tiny_sources, implementation):
  sources, tokens, per_adapter = tiny_sources
  base = nnx.clone(tiny_base)
  layers = multi.add_multi_lora(base, sources, implementation=implementation)
  assert sorted(layers) == sorted(core.adapters(sources[0]))
  v = layers["blocks/0/attention/v"]
  assert v.lora_a.shape == (3, 64, 4) and v.lora_b.shape == (3, 4, 32)
  np.testing.assert_array_equal(np.asarray(layers["blocks/1/attention/q"].scaling[...]), [2.0, 2.0, 2.0])
  assert core.count_adapter_parameters(base) == 0  # stacked arrays are frozen StackedAdapter, not nn.Adapter
  if implementation == "reference":
    multi.set_adapter_ids(base, jnp.array(IDS))
    out = _logits(base, tokens)
  else:  # ids set inside jit (traced) travel in the model state
    out = nnx.jit(lambda m, t, ids: (multi.set_adapter_ids(m, ids), m(t))[1])(base, tokens, jnp.array(IDS))
  _check_rows(out, per_adapter)


@pytest.mark.parametrize("implementation", ["reference", "interpret_tpu", "interpret_gpu"])
def test_multi_lora_plain_model(implementation):
  """nnx.Linear and nnx.Einsum layers; the interpret-mode kernels (slow) on the nnx.Linear alone."""
  rules = "lin|head" if implementation == "reference" else "lin"
  sources = [_plain_lora(seed=s, rules=[(rules, lora.LoRAConfig(rank=4, alpha=4.0 * (s + 1)))]) for s in range(3)]
  x = _normal(0, (4, 3, 16))
  base = Plain(nnx.Rngs(0))
  per_adapter = [np.asarray(_logits(m, x)) for m in sources] + [np.asarray(_logits(base, x))]
  layers = multi.add_multi_lora(base, sources, implementation=implementation)
  np.testing.assert_array_equal(np.asarray(layers["lin"].scaling[...]), [1.0, 2.0, 3.0])  # alpha / rank per adapter
  multi.set_adapter_ids(base, np.array(IDS))
  _check_rows(_logits(base, x), per_adapter)


def test_multi_lora_from_directories_and_traced_bad_id(plain_saved, tmp_path):
  sources = [_plain_lora(seed=5), plain_saved[1]]  # a model and a save_adapters directory
  x = _normal(1, (4, 3, 16))
  base = Plain(nnx.Rngs(0))
  per_adapter = [np.asarray(_logits(m, x)) for m in (sources[0], plain_saved[0], base)]
  multi.add_multi_lora(base, sources)  # the directory's LoRA was rebuilt on `base` and taken off again
  assert {p: type(w) for p, w in core.adapters(base).items()} == {p: multi.MultiLoRAEinsum for p in ("head", "lin")}
  multi.set_adapter_ids(base, [1, -1, 0, 1])
  _check_rows(_logits(base, x), per_adapter, ids=[1, -1, 0, 1])
  out = np.asarray(nnx.jit(lambda m, ids: (multi.set_adapter_ids(m, ids), m(x))[1])(base, jnp.array([0, 7, -1, 1])))
  assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2, 3]]).all()  # a bad traced id: NaN, never another row


def test_bad_ids():
  base = Plain(nnx.Rngs(0))
  multi.add_multi_lora(base, [_plain_lora(seed=s) for s in range(3)])
  x = jnp.ones((4, 3, 16))
  with pytest.raises(ValueError, match="no adapter ids set"):
    base(x)
  for bad in ([0, 3, -1, 1], [-2, 0, 0, 0]):
    with pytest.raises(ValueError, match=r"ids: \[(3|-2)\] \(at rows \[(1|0)\]\) are out of range; valid ids are "
                                         r"\[-1, 3\)"):
      multi.set_adapter_ids(base, bad)
  with pytest.raises(ValueError, match="ids must be a non-empty 1-D integer array"):
    multi.set_adapter_ids(base, [[0, 1]])
  with pytest.raises(ValueError, match="ids must be a non-empty 1-D integer array"):
    multi.set_adapter_ids(base, [0.0, 1.0])
  multi.set_adapter_ids(base, [0, 1])
  with pytest.raises(ValueError, match="ids hold 2 adapter ids but the input's batch"):
    base(x)
  with pytest.raises(ValueError, match="holds no MultiLoRAEinsum"):
    multi.set_adapter_ids(Plain(nnx.Rngs(0)), [0])


def test_stack_refuses_mismatched_adapters():
  good = _plain_lora(seed=0)
  with pytest.raises(ValueError, match=r"sources\[1\]: head has rank 2 .*sources\[0\] has rank 4"):
    multi.stack_lora([good, _plain_lora(seed=1, rank=2)])
  only_lin = _plain_lora(seed=1, rules=[("lin", lora.LoRAConfig(rank=4))])
  with pytest.raises(ValueError, match=r"sources\[1\] adapts other paths than sources\[0\]: missing \['head'\]"):
    multi.stack_lora([good, only_lin])
  dora = _plain_lora(seed=1, rules=[("lin|head", lora.LoRAConfig(rank=4, dora=True))])
  with pytest.raises(ValueError, match=r"sources\[1\]: .*plain LoRA.*DoRAEinsum"):
    multi.stack_lora([good, dora])
  with pytest.raises(ValueError, match=r"base_model already holds an adapter at head"):
    multi.add_multi_lora(_plain_lora(seed=2), [good])
  with pytest.raises(ValueError, match="give base_model"):
    multi.stack_lora(["some/directory"])
