"""Small helpers shared by the tests: relative RMS error checks and exporting kernels for TPU/GPU from a CPU host."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

# Relative RMS error allowed for a kernel vs an f32 reference, keyed by the kernel's compute dtype
# (bf16 keeps 8 mantissa bits: rounding alone costs ~2e-3).
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}


def rel_rms_error(actual, expected) -> float:
  """RMS(actual - expected) / RMS(expected), computed in float64 (0 when both are all zeros)."""
  actual = np.asarray(actual, dtype=np.float64)
  expected = np.asarray(expected, dtype=np.float64)
  scale = np.sqrt(np.mean(expected ** 2))
  error = np.sqrt(np.mean((actual - expected) ** 2))
  return float(error / scale) if scale > 0 else float(error)


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
