"""Issue 10 ("No silent wrong numbers"), quantization: zero/tiny MX blocks stay zero, non-finite inputs are refused
by name (eagerly, and under jit through checkify), and quantized checkpoints refuse a model quantized differently."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

from efficient import calibration, quant
from efficient.models import llama
from efficient.quant import QuantConfig, calibrate, checkpoint, layers


def _mxfp8_reference(x):
  """OCP MX v1.0 mxfp8 along axis 0 in NumPy: per block of 32, e = floor(log2(absmax)) - 8 clipped to [-127, 127]
  (absmax 0: e = -127), elements x / 2^e saturated to 448 and rounded to E4M3 (ml_dtypes), times 2^e; in f64."""
  x = np.asarray(x, np.float64)
  blocks = x.reshape(x.shape[0] // 32, 32, -1)
  absmax = np.abs(blocks).max(axis=1, keepdims=True)
  e = np.where(absmax > 0, np.floor(np.log2(np.where(absmax > 0, absmax, 1.0))) - 8, -127).clip(-127, 127)
  elements = np.clip(blocks * 2.0 ** -e, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  return (elements * 2.0 ** e).reshape(x.shape)


# --- 1. all-zero and tiny blocks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nf4", "int8", "int4", "fp8_e4m3"])
@pytest.mark.parametrize("value", [0.0, 1e-40, -1e-38])
def test_zero_and_tiny_blocks_dequantize_to_near_zero(fmt, value):
  x = jnp.full((64, 2), value, jnp.float32)
  out = np.asarray(quant.dequantize(quant.quantize(x, fmt)))
  assert np.isfinite(out).all()
  if value == 0.0:
    np.testing.assert_array_equal(out, 0.0)  # exactly zero
  else:
    assert np.abs(out).max() <= 2 * abs(value)


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_mx_zero_block_leaves_its_neighbours_exact(fmt):
  """A [96, 3] weight whose middle block of 32 rows is zero: that block dequantizes to 0, the others as before."""
  x = np.array(jax.random.normal(jax.random.key(1), (96, 3)), np.float32)
  x[32:64] = 0.0
  out = np.asarray(quant.dequantize(quant.quantize(jnp.asarray(x), fmt)))
  np.testing.assert_array_equal(out[32:64], 0.0)
  alone = np.asarray(quant.dequantize(quant.quantize(jnp.asarray(x[:32]), fmt)))
  np.testing.assert_array_equal(out[:32], alone)
  if fmt == "mxfp8":
    np.testing.assert_array_equal(out, _mxfp8_reference(x).astype(np.float32))


def test_nf4_zero_block_keeps_absmax_zero_and_exact_zeros():
  x = np.array(jax.random.normal(jax.random.key(2), (128, 4)), np.float32)
  x[:64, 1] = 0.0
  q = quant.quantize(jnp.asarray(x), "nf4", double_quant=False)
  np.testing.assert_array_equal(np.asarray(q.scale)[0, 1], 0.0)  # not a placeholder 1.0
  np.testing.assert_array_equal(np.abs(x).reshape(2, 64, 4).max(axis=1), np.asarray(q.scale))
  out = np.asarray(quant.dequantize(quant.quantize(jnp.asarray(x), "nf4")))  # double quantized
  np.testing.assert_array_equal(out[:64, 1], 0.0)


def test_model_with_zeroed_block_stays_finite_under_mxfp8(tiny, tokens):
  model = nnx.clone(tiny)
  up = model.blocks[0].mlp.up
  up.kernel[...] = up.kernel[...].at[:32].set(0.0)  # a pruned block of 32 input rows
  reference = np.asarray(model(tokens), np.float64)
  quantized = quant.quantize_model(nnx.clone(model), [(r".*/mlp/up", QuantConfig(fmt="mxfp8")), (r".*", None)])
  logits = np.asarray(quantized(tokens), np.float64)
  assert np.isfinite(logits).all()
  rel = np.linalg.norm(logits - reference) / np.linalg.norm(reference)
  assert rel < 0.02, rel
  # The stored weight is OCP mxfp8 of the float kernel, block for block (zero block included).
  matrix = np.asarray(calibration.kernel_as_matrix(model.blocks[0].mlp.up))
  np.testing.assert_array_equal(np.asarray(quantized.blocks[0].mlp.up.weight_matrix()),
                                _mxfp8_reference(matrix).astype(np.float32))


# --- 2. non-finite inputs are refused by name --------------------------------------------------------------------

@pytest.mark.parametrize("fmt,kwargs", [("int8", {}), ("int4", dict(group_size=16)), ("nf4", {}),
                                        ("fp8_e4m3", {}), ("mxfp8", {}), ("mxfp4", {}),
                                        ("int4", dict(group_size=16, symmetric=False))])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_refuses_non_finite_naming_the_tensor(fmt, kwargs, bad):
  x = np.array(jax.random.normal(jax.random.key(3), (64, 8)), np.float32)
  x[5, 3] = bad
  kind = "1 NaN, 0 Inf" if np.isnan(bad) else "0 NaN, 1 Inf"
  with pytest.raises(ValueError, match=rf"^layer7/w: 1 of 512 values are not finite \({kind}; the first at index "
                                       rf"\(5, 3\), shape \(64, 8\)\); refusing to quantize"):
    quant.quantize(jnp.asarray(x), fmt, name="layer7/w", **kwargs)


def test_check_finite_under_jit_through_checkify():
  def f(x):
    quant.check_finite(x, "acts")
    return x * 2

  checked = checkify.checkify(jax.jit(f))
  err, out = checked(jnp.asarray([1.0, 2.0]))
  assert err.get() is None
  np.testing.assert_array_equal(out, [2.0, 4.0])
  err, _ = checked(jnp.asarray([1.0, jnp.nan]))
  assert err.get() is not None and err.get().startswith("acts: holds NaN or Inf values")
  with pytest.raises(ValueError, match="without functionalizing"):  # never silently dropped under plain jit
    jax.jit(f)(jnp.ones(2))
  with pytest.raises(ValueError, match=r"^acts: 1 of 2 values are not finite \(0 NaN, 1 Inf"):
    quant.check_finite(jnp.asarray([1.0, jnp.inf]), "acts")  # eager: a plain ValueError


def test_quantize_model_names_the_module_and_changes_nothing(tiny):
  model = nnx.clone(tiny)
  model.blocks[0].mlp.up.kernel[...] = model.blocks[0].mlp.up.kernel[...].at[2, 9].set(jnp.nan)
  with pytest.raises(ValueError, match=r"^blocks/0/mlp/up\.kernel: 1 of 8192 values are not finite \(1 NaN"):
    quant.quantize_model(model, [(r".*/mlp/.*", QuantConfig(fmt="nf4"))])
  assert not any(isinstance(m, layers._QuantizedProjection) for _, m in nnx.iter_graph(model))  # checked first


def test_gptq_refuses_non_finite_hessian_and_weight_by_name():
  w = jax.random.normal(jax.random.key(4), (32, 8))
  x = jax.random.normal(jax.random.key(5), (64, 32))
  hessian = 2 * x.T @ x / 64
  with pytest.raises(ValueError, match=r"^blocks/0/mlp/up: hessian: 1 of 1024 values are not finite .*"
                                       r"\(non-finite calibration activations\?\)$"):
    calibrate.gptq_quantize(w, hessian.at[3, 4].set(jnp.nan), bits=4, group_size=16, name="blocks/0/mlp/up")
  with pytest.raises(ValueError, match=r"^blocks/0/mlp/up: w: 1 of 256 values are not finite \(0 NaN, 1 Inf"):
    calibrate.gptq_quantize(w.at[0, 0].set(jnp.inf), hessian, bits=4, group_size=16, name="blocks/0/mlp/up")


def test_gptq_through_quantize_model_names_the_layer_of_a_non_finite_hessian(tiny):
  k = llama.TINY.embed_dim
  hessian = jnp.eye(k).at[0, 1].set(jnp.inf)  # e.g. reused statistics from an overflowing calibration pass
  model = nnx.clone(tiny)
  with pytest.raises(ValueError, match=r"^blocks/1/mlp/gate: hessian: 1 of 4096 values are not finite \(0 NaN, 1 Inf"):
    quant.quantize_model(model, [(r"blocks/1/mlp/gate", QuantConfig(fmt="int4", group_size=16, method="gptq")),
                                 (r".*", None)], statistics={"blocks/1/mlp/gate": {"hessian": hessian}})


# --- 4. quantized checkpoints record and check their format ------------------------------------------------------

MIXED = [(r".*/mlp/up", QuantConfig(fmt="int4", group_size=16)), (r".*/mlp/gate", QuantConfig(fmt="nf4")),
         (r".*/mlp/down", QuantConfig(fmt="mxfp4")), (r".*/attention/o", QuantConfig(fmt="fp8_e4m3")),
         (r".*", QuantConfig(mode="w8a8"))]


def _rules(config):
  return [(r".*/mlp/up", config), (r".*", None)]


def test_save_load_round_trip_is_bit_exact(tiny, tokens, tmp_path):
  quantized = quant.quantize_model(nnx.clone(tiny), MIXED)
  record = quant.save_quantized(quantized, tmp_path / "q")
  assert record["qarrays"]["blocks/0/mlp/up"] == {
      "fmt": "int4", "group_size": 16, "granularity": "group", "axis": 0, "shape": [64, 128], "dtype": "float32",
      "logical_axes": ["embed", "mlp"], "layer": "QuantizedEinsum", "mode": "weight_only"}
  assert record["arrays"]["blocks/0/mlp/up/qvalue"] == {"shape": [32, 128], "dtype": "uint8",
                                                        "variable": "QuantizedWeight"}
  assert record["qarrays"]["blocks/1/attention/q"]["mode"] == "w8a8"
  skeleton = quant.quantize_model(llama.Llama(llama.TINY, rngs=nnx.Rngs(7)), MIXED)  # other values, same layout
  assert not np.array_equal(skeleton(tokens), quantized(tokens))
  restored = quant.load_quantized(skeleton, tmp_path / "q")
  assert restored is skeleton
  np.testing.assert_array_equal(restored(tokens), quantized(tokens))


@pytest.mark.parametrize("saved,wanted,message", [
    (QuantConfig(fmt="int4", group_size=16), QuantConfig(fmt="nf4", group_size=16),
     r"blocks/0/mlp/up: fmt is 'int4' in the checkpoint, 'nf4' in the model"),
    (QuantConfig(fmt="int8"), QuantConfig(fmt="fp8_e4m3"),
     r"blocks/0/mlp/up: fmt is 'int8' in the checkpoint, 'fp8_e4m3' in the model"),
    (QuantConfig(fmt="int4", group_size=16), QuantConfig(fmt="int4", group_size=32),
     r"blocks/0/mlp/up: group_size is 16 in the checkpoint, 32 in the model"),
    (QuantConfig(fmt="int8"), QuantConfig(mode="w8a8"),
     r"blocks/0/mlp/up: mode is 'weight_only' in the checkpoint, 'w8a8' in the model"),
    (QuantConfig(fmt="int4", group_size=16), None,
     r"blocks/0/mlp/up: quantized in the checkpoint \(fmt 'int4', group_size 16\), absent from the model"),
])
def test_load_refuses_a_differently_quantized_model(tiny, tmp_path, saved, wanted, message):
  quant.save_quantized(quant.quantize_model(nnx.clone(tiny), _rules(saved)), tmp_path / "q")
  target = nnx.clone(tiny) if wanted is None else quant.quantize_model(nnx.clone(tiny), _rules(wanted))
  before = jax.tree.map(np.asarray, nnx.state(target))
  with pytest.raises(ValueError, match=r"^the checkpoint in .* does not match model_like \(\d+ mismatch(es)?\): "
                                       + message):
    quant.load_quantized(target, tmp_path / "q")
  after = jax.tree.map(np.asarray, nnx.state(target))  # nothing restored
  jax.tree.map(np.testing.assert_array_equal, before, after)


class _TwoLinear(nnx.Module):
  """A user's own model (flax nnx.Linear layers, no efficient.models code)."""

  def __init__(self, rngs):
    self.first = nnx.Linear(64, 32, rngs=rngs)
    self.second = nnx.Linear(32, 16, rngs=rngs)

  def __call__(self, x):
    return self.second(jax.nn.relu(self.first(x)))


def test_save_load_works_for_any_nnx_model(tmp_path):
  rules = [(r"first", QuantConfig(fmt="int4", group_size=16, symmetric=False)),
           (r"second", QuantConfig(fmt="nf4", group_size=16))]
  model = quant.quantize_model(_TwoLinear(nnx.Rngs(0)), rules)
  quant.save_quantized(model, tmp_path / "m")
  with pytest.raises(ValueError, match=r"already holds a quantized checkpoint; pass force=True"):
    quant.save_quantized(model, tmp_path / "m")
  x = jax.random.normal(jax.random.key(6), (3, 64))
  restored = quant.load_quantized(quant.quantize_model(_TwoLinear(nnx.Rngs(1)), rules), tmp_path / "m")
  np.testing.assert_array_equal(restored(x), model(x))
  assert "first/zero_point" in checkpoint.read_manifest(tmp_path / "m")["arrays"]
  symmetric = quant.quantize_model(_TwoLinear(nnx.Rngs(1)), [(r"first", QuantConfig(fmt="int4", group_size=16)),
                                                            (r"second", rules[1][1])])
  with pytest.raises(ValueError, match=r"first/zero_point: an array in the checkpoint \(uint8\[4, 32\]\), absent "
                                       r"from the model"):
    quant.load_quantized(symmetric, tmp_path / "m")


def test_load_without_manifest_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"^directory=.* holds no quant_manifest\.json"):
    quant.load_quantized(_TwoLinear(nnx.Rngs(0)), tmp_path)
