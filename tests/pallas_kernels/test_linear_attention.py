"""linear_attention: every form runnable here (recurrent, XLA chunk, TPU- and GPU-style interpret kernels) vs the
naive quadratic form in f32 -- outputs, final states and every gradient (q, k, v, log_decay / log_gates, initial
state); recurrent_step continuation; bad inputs; cost model.

Shapes are tiny but cover every path: T = 37 is ragged for every chunk (TPU/XLA chunk 8: 5 chunks; GPU chunk 16:
3 chunks of two gate sub-chunks; chunk 32 for strong gates), K = 6 and V = 5 are padded by both kernels (TPU to
128 lanes, GPU to 16), B * H = 4 grid programs, and every case starts from a non-zero initial state. Tolerances:
relative RMS error 1e-5 in f32, 1e-2 in bf16 (inputs, outputs and dq/dk/dv rounded to bf16: ~2-4e-3 measured).
Each case jits forward + backward together: one compilation of each of a kernel's two pallas_calls.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.linear_attention import (IMPLEMENTATIONS, common, cost, linear_attention, recurrent_step,
                                             reference)
from tests.helpers import TOLERANCE, assert_close, interpreted

B, T, H, K, V = 2, 37, 2, 6, 5
# name -> (feature_map, gating (None / 'decay' / 'gates' / 'strong_gates'), normalize, dtype)
# (Plain, ungated linear attention is the taylor case; the identity map is the GLA cases'.)
CASES = {
    "elu1_decay_normalized": ("elu1", "decay", True, jnp.float32),   # TransNormer-style: decay + normalizer
    "taylor_normalized": ("taylor", None, True, jnp.float32),        # Based: K' = 1 + 6 + 36 = 43
    "relu_gla": ("relu", "gates", False, jnp.float32),
    # log gates ~ U(-12, 0) with chunk 32 (two sub-chunks of 16 per chunk): a single factorization around the
    # chunk's middle would need e^(16 * 6) > f32 max; the sub-chunked one stays finite.
    "gla_strong_gates_chunk32": ("identity", "strong_gates", False, jnp.float32),
    "gla_bf16": ("identity", "gates", False, jnp.bfloat16),      # backward matmuls in f32 (gate identity)
    "relu_bf16": ("relu", None, False, jnp.bfloat16),             # backward matmuls in bf16
}
CHUNK_OVERRIDES = {"gla_strong_gates_chunk32": 32}
# (implementation, form, chunk_size): the forms checked against `naive`. Chunks are legal for each kernel.
FORMS = [("reference", "recurrent", None), ("xla", "chunk", 8)] + [
    (name, "chunk", 16 if interpreted(name) == "interpret_gpu" else 8)
    for name in _dispatch.runnable(IMPLEMENTATIONS) if interpreted(name).startswith("interpret")]
GRADIENTS = ("dq", "dk", "dv", "d_log_decay", "d_log_gates", "d_initial_state")


def _inputs(case):
  """(q, k, v, log_decay, log_gates, initial_state, cotangents of (o, final state)) for `case`."""
  feature_map, gating, normalize, dtype = CASES[case]
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, k, v = normal(B, T, H, K).astype(dtype), normal(B, T, H, K).astype(dtype), normal(B, T, H, V).astype(dtype)
  key_dim = common.feature_dim(feature_map, K)
  log_decay = jnp.log(jnp.asarray([0.9, 0.6], jnp.float32)) if gating == "decay" else None
  # GLA's gates: log-sigmoid, leaning towards 1 like trained models (which divide by a temperature).
  log_gates = jax.nn.log_sigmoid(normal(B, T, H, key_dim) + 2.0) if gating == "gates" else None
  if gating == "strong_gates":
    log_gates = jnp.asarray(rng.uniform(-12.0, 0.0, (B, T, H, key_dim)), jnp.float32)
  if normalize:
    # A state that a real prefix leaves behind, so normalizers q . z stay positive: sum_s phi(k_s) [v_s, 1]^T.
    prefix_k, prefix_v = common.apply_feature_map(normal(B, 4, H, K), feature_map), normal(B, 4, H, V)
    prefix_v = jnp.concatenate([prefix_v, jnp.ones_like(prefix_v[..., :1])], -1)
    initial_state = jnp.einsum("bshk,bshv->bhkv", prefix_k, prefix_v)
  else:
    initial_state = 0.5 * normal(B, H, key_dim, V)
  cotangents = (normal(B, T, H, V).astype(dtype), normal(*initial_state.shape))
  return q, k, v, log_decay, log_gates, initial_state, cotangents


def _forward_and_grads(case, implementation, form, chunk_size, upcast=False):
  feature_map, _, normalize, _ = CASES[case]
  q, k, v, log_decay, log_gates, initial_state, (d_out, d_final) = _inputs(case)
  if upcast:  # the f32 reference sees exactly the (bf16-rounded) inputs the kernels see
    q, k, v, d_out = (x.astype(jnp.float32) for x in (q, k, v, d_out))
  op = functools.partial(linear_attention, feature_map=feature_map, normalize=normalize, return_final_state=True,
                         implementation=implementation, form=form, chunk_size=chunk_size)

  @jax.jit  # one compilation for the forward and backward kernels
  def run(q, k, v, log_decay, log_gates, initial_state, d_out, d_final):
    primals = (q, k, v, log_decay, log_gates, initial_state)
    outputs, vjp = jax.vjp(lambda *args: op(*args[:3], log_decay=args[3], log_gates=args[4],
                                             initial_state=args[5]), *primals)
    return outputs, vjp((d_out, d_final))

  return run(q, k, v, log_decay, log_gates, initial_state, d_out, d_final)


@functools.cache
def _expected(case):
  return jax.device_get(_forward_and_grads(case, "reference", "naive", None, upcast=True))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("implementation, form, chunk_size", FORMS, ids=[f"{i}-{f}" for i, f, _ in FORMS])
def test_linear_attention_matches_naive(implementation, form, chunk_size, case):
  dtype = jnp.dtype(CASES[case][3])
  if chunk_size is not None:
    chunk_size = CHUNK_OVERRIDES.get(case, chunk_size)
  (out, final), grads = _forward_and_grads(case, implementation, form, chunk_size)
  (expected_out, expected_final), expected_grads = _expected(case)
  tol = TOLERANCE[dtype]
  assert out.dtype == dtype and final.dtype == jnp.float32
  assert_close("o", out, expected_out, tol)
  assert_close("final_state", final, expected_final, tol)
  for name, grad, expected in zip(GRADIENTS, grads, expected_grads):
    if expected is None:
      assert grad is None, name
      continue
    assert_close(name, grad, expected, tol)


@pytest.mark.parametrize("case", ["elu1_decay_normalized", "relu_gla"])
def test_recurrent_step_continues_a_sequence(case):
  """Prefix with the chunk form + return_final_state, then decode step by step == the whole sequence at once."""
  feature_map, gating, normalize, _ = CASES[case]
  q, k, v, log_decay, log_gates, _, _ = _inputs(case)
  kwargs = dict(feature_map=feature_map, normalize=normalize, log_decay=log_decay)
  split = 30
  whole = linear_attention(q, k, v, log_gates=log_gates, implementation="reference", **kwargs)
  prefix_gates = None if log_gates is None else log_gates[:, :split]
  _, state = linear_attention(q[:, :split], k[:, :split], v[:, :split], log_gates=prefix_gates,
                              return_final_state=True, implementation="xla", chunk_size=8, **kwargs)
  for t in range(split, T):
    out, state = recurrent_step(state, q[:, t], k[:, t], v[:, t],
                                log_gates=None if log_gates is None else log_gates[:, t], **kwargs)
    assert_close(f"o[{t}]", out, whole[:, t], TOLERANCE[jnp.dtype(jnp.float32)])


def test_padded_steps_leave_the_state_unchanged():
  """T = 37 with chunk 8 pads 3 steps: the final state equals the recurrence stopped at step 37, even with gates."""
  q, k, v, _, log_gates, initial_state, _ = _inputs("relu_gla")
  final = linear_attention(q, k, v, feature_map="relu", log_gates=log_gates, initial_state=initial_state,
                           return_final_state=True, implementation="xla", chunk_size=8)[1]
  q_core, k_core, _ = common.prepare(q, k, v, feature_map="relu", scale=K ** -0.5, normalize=False)
  expected = reference.recurrent(q_core, k_core, v, log_gates, initial_state)[1]
  assert_close("final_state", final, expected, TOLERANCE[jnp.dtype(jnp.float32)])


_Q, _V = jnp.ones((1, 16, 2, 8)), jnp.ones((1, 16, 2, 4))
BAD_INPUTS = {  # name -> (keyword arguments, regex the ValueError must match: it names the argument)
    "q_rank_3": (dict(q=jnp.ones((16, 2, 8))), r"^q must be a non-empty array \[B, T, H, K\]"),
    "k_shape": (dict(k=jnp.ones((1, 16, 2, 4))), r"^k must have q's shape"),
    "v_heads": (dict(v=jnp.ones((1, 16, 3, 4))), r"^v must have shape \[B, T, H, V\]"),
    "q_int": (dict(q=jnp.ones((1, 16, 2, 8), jnp.int32)), r"^q: dtype int32"),
    "v_dtype_differs": (dict(v=jnp.ones((1, 16, 2, 4), jnp.bfloat16)), r"^v: dtype bfloat16 must equal"),
    "feature_map": (dict(feature_map="softmax"), r"^feature_map='softmax' is unknown"),
    "decay_and_gates": (dict(log_decay=-jnp.ones(2), log_gates=-jnp.ones((1, 16, 2, 8))),
                        r"^log_decay and log_gates: pass at most one"),
    "log_decay_shape": (dict(log_decay=-jnp.ones(3)), r"^log_decay must have shape \[H\] = \(2,\)"),
    "log_decay_positive": (dict(log_decay=jnp.asarray([-0.1, 0.2])), r"^log_decay must be <= 0"),
    "log_gates_shape": (dict(log_gates=-jnp.ones((1, 16, 2, 4))), r"^log_gates must have shape"),
    "log_gates_taylor_width": (dict(feature_map="taylor", log_gates=-jnp.ones((1, 16, 2, 8))),
                               r"^log_gates must have shape .* = \(1, 16, 2, 73\)"),
    "log_gates_positive": (dict(log_gates=jnp.full((1, 16, 2, 8), 0.5)), r"^log_gates must be <= 0"),
    "initial_state_shape": (dict(initial_state=jnp.zeros((1, 2, 8, 4)), normalize=True),
                            r"^initial_state must have shape .* = \(1, 2, 8, 5\)"),
    "scale": (dict(scale=0.0), r"^scale=0.0 must be a positive number"),
    "eps": (dict(eps=-1.0), r"^eps=-1.0 must be a positive number"),
    "form_for_kernel": (dict(form="naive", implementation="xla"), r"^form='naive' is not available"),
    "form_unknown": (dict(form="fused"), r"^form='fused' is not available"),
    "chunk_zero": (dict(chunk_size=0, implementation="xla"), r"^chunk_size=0 must be a positive int"),
    "tpu_chunk_unaligned": (dict(chunk_size=12, implementation="interpret_tpu"),
                            r"^chunk_size=12 is illegal for the TPU kernel: it must be a multiple of 8"),
    "gpu_chunk_not_power_of_2": (dict(chunk_size=24, implementation="interpret_gpu"),
                                 r"^chunk_size=24 is illegal for the GPU \(Triton\) kernel: it must be a power"),
    "gpu_chunk_below_16": (dict(chunk_size=8, implementation="interpret_gpu"),
                           r"^chunk_size=8 is illegal for the GPU \(Triton\) kernel"),
    "implementation": (dict(implementation="triton"), r"unknown implementation='triton'; choose one of"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_linear_attention_rejects_bad_input(bad):
  overrides, message = BAD_INPUTS[bad]
  kwargs = dict(q=_Q, k=_Q, v=_V, implementation="reference") | overrides
  with pytest.raises(ValueError, match=message):
    linear_attention(**kwargs)


@pytest.mark.parametrize("feature_map, k_dim, chunk_size, message", [
    # Taylor on K = 64: K' = 4161, padded 4224; a [4224, 128] f32 state is 2 MiB, ~21 MiB with every tile.
    ("taylor", 64, 8, r"^chunk_size=8 with q/k feature dim K'=4224 and v dim V=128 \(padded\) needs ~2\d\.\d MiB"),
    # K = V = 128 is fine at chunk 64 (under 2 MiB) but chunk 1024 needs ~37 MiB, mostly [C, C] temporaries.
    ("identity", 128, 1024, r"^chunk_size=1024 .* over the TPU kernel's 16 MiB budget; use a smaller chunk_size"),
])
def test_tpu_kernel_refuses_tiles_too_large_for_vmem(feature_map, k_dim, chunk_size, message):
  q = jnp.ones((1, 8, 1, k_dim))
  with pytest.raises(ValueError, match=message):
    linear_attention(q, q, jnp.ones((1, 8, 1, 128)), feature_map=feature_map, chunk_size=chunk_size,
                     implementation="interpret_tpu")


def test_linear_attention_cost_matches_hand_count():
  # B 1, T 100, H 2, K = V = 128, bf16, GLA gates, chunk 64: T padded to 128 (2 chunks), grid (2, 2).
  rows = 2 * 128
  moved = rows * ((2 * 128 + 128) * 2 + 128 * 2 + 128 * 4) + 2 * 2 * 128 * 128 * 4
  ideal = 2 * 100 * ((2 * 128 + 128) * 2 + 128 * 2) + 2 * 100 * 128 * 4 + 2 * 2 * 128 * 128 * 4
  flops = rows * (2 * 64 * 256 + 4 * 128 * 128 + 2 * 64 * 128)
  assert cost((1, 100, 2, 128), (1, 100, 2, 128), dtype=jnp.bfloat16, log_gates=True) == {
      "flops": flops, "hbm_bytes": moved, "ideal_bytes": ideal}
  # K = 64 is padded to 128 lanes: modeled traffic above ideal.
  padded = cost((1, 128, 2, 64), (1, 128, 2, 64), dtype=jnp.float32)
  assert padded["hbm_bytes"] > padded["ideal_bytes"]
