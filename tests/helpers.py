"""Small helpers shared by the tests: relative RMS error checks, exporting kernels for TPU/GPU from a CPU host, and
an optimizer's steps on one device and on a mesh."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import export

from efficient import calibration, nn, sharding

# Relative RMS error allowed for a kernel vs an f32 reference, keyed by the kernel's compute dtype
# (bf16 keeps 8 mantissa bits: rounding alone costs ~2e-3).
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}


def interpreted(implementation: str) -> str:
  """The interpret mode of a compiled kernel ('pallas_gpu' -> 'interpret_gpu'), any other name unchanged. Tests
  key kernel-specific options (blocks legal for one kernel style) by the interpret name; the compiled kernel runs
  the same kernel code on its chip, so it takes the same options."""
  return implementation.replace("pallas_", "interpret_", 1)


def rel_rms_error(actual, expected) -> float:
  """RMS(actual - expected) / RMS(expected), computed in float64 (0 when both are all zeros)."""
  actual = np.asarray(actual, dtype=np.float64)
  expected = np.asarray(expected, dtype=np.float64)
  scale = np.sqrt(np.mean(expected ** 2))
  error = np.sqrt(np.mean((actual - expected) ** 2))
  return float(error / scale) if scale > 0 else float(error)


def random_norm_gains(model, seed: int = 0):
  """Gives every RMSNorm of `model` non-trivial gains 1 + 0.5 N(0, 1), in place (a fresh Llama's gains are 1,
  which would make folding them into the next layer a no-op). Returns the model."""
  norms = calibration.einsum_modules(model, types=(nn.RMSNorm,))
  keys = jax.random.split(jax.random.key(seed), len(norms))
  for key, module in zip(keys, norms.values()):
    module.scale[...] = 1.0 + 0.5 * jax.random.normal(key, module.scale[...].shape)
  return model


def assert_close(name: str, actual, expected, tol: float) -> None:
  """Asserts equal shapes and a relative RMS error <= tol, with a message naming `name`."""
  assert tuple(np.shape(actual)) == tuple(np.shape(expected)), (
      f"{name}: shape {np.shape(actual)} != expected {np.shape(expected)}")
  error = rel_rms_error(actual, expected)
  assert error <= tol, f"{name}: relative RMS error {error:.3g} > tolerance {tol:.3g}"


def export_lowered(fn, platform: str, *args) -> export.Exported:
  """`jax.export` of `jax.jit(fn)` for 'tpu' or 'cuda' (Triton kernels allowed); args may be ShapeDtypeStructs."""
  # Exported modules must not contain custom calls whose ABI is not stable; Triton's is declared unstable.
  disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if platform == "cuda" else []
  return export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)(*args)


# platform -> (the implementation whose compiled kernel `export_lowered` lowers there, that kernel's custom call)
LOWERING_TARGETS = {"tpu": ("pallas_tpu", "@tpu_custom_call"), "cuda": ("pallas_gpu", "@__gpu$xla.gpu.triton")}


def kernel_calls(exported: export.Exported, marker: str) -> int:
  """How many kernel calls (custom calls named by `marker`, see LOWERING_TARGETS) an exported module holds."""
  return exported.mlir_module().count(marker)


def single_and_sharded_steps(make_tx, params, grads, *, mesh: str = "fsdp:2,tensor:4", rules: str = "fsdp_tp"):
  """(params after one `make_tx()` step per entry of `grads` on one device, the same with params, grads and
  optimizer state placed on `mesh` by `rules`): the "sharded == single device" check of an optimizer."""
  def apply(tx, g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  def run(p, gs, place):
    tx = make_tx()
    s = tx.init(p)
    out_shardings = None
    if place is not None:  # outputs pinned to the inputs' shardings: one compile for all steps
      s = jax.device_put(s, place(s))
      out_shardings = (place(p), place(s))
    step = jax.jit(lambda g, s, p: apply(tx, g, s, p), out_shardings=out_shardings)
    for g in gs:
      p, s = step(g, s, p)
    return p

  single = run(params, grads, None)
  placed = sharding.make_mesh(mesh)
  place = lambda tree: sharding.state_shardings(tree, placed, rules)
  shardings = place(params)
  return single, run(jax.device_put(params, shardings), [jax.device_put(g, shardings) for g in grads], place)
