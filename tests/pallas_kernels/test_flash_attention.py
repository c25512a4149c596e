"""flash_attention / flash_decode: every implementation runnable here vs a plain f32 jnp attention written here
(full T x S masks), forward and every gradient; bad inputs; cost model.

Measured (jax 0.10.2, CPU, this file's cases), relative RMS error vs the plain f32 attention: f32 <= 4e-7 for
out/dq/dk/dv on every implementation (reference <= 2.5e-7); bf16 1.6e-3 (reference) to 2.6e-3 (xla and both
kernels: P is rounded to bf16 before the PV and dS matmuls, as on hardware). Decode: f32 2.3e-7.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.flash_attention import (DECODE_IMPLEMENTATIONS, IMPLEMENTATIONS, cost, cost_decode,
                                           flash_attention, flash_decode)
from tests.helpers import TOLERANCE, assert_close


def _segments(batch, length, bounds):
  """[batch, length] int32 segment ids: segment n covers [bounds[n-1], bounds[n]) (row b shifted by b)."""
  ids = np.searchsorted(np.asarray(bounds), np.arange(length), side="right") + 1
  return jnp.asarray(np.stack([np.roll(ids, b) for b in range(batch)]), jnp.int32)


# name -> dict(shape=(B, T, S, H, H_kv, D), dtype, options for flash_attention). Block sizes are legal for both
# kernel styles (TPU: block_q % 8, block_kv % 128; GPU: powers of two >= 16). Each case combines several
# features, because every interpret-mode case compiles three kernels (forward, dq, dk/dv).
CASES = {
    # T = S = 300 ragged for (32, 128) blocks: 10 x 3 tiles; causal skipping of the upper tiles, the 160-key
    # window skips kv block 0 for query block 9, and tiles such as (4, 0) are fully visible (the TPU kernels'
    # mask-free path). GQA group 2, head_dim 64 (padded to 128 on TPU).
    "causal_window_gqa_ragged": dict(shape=(1, 300, 300, 4, 2, 64), dtype=jnp.float32,
                                     options=dict(sliding_window=160, block_q=32, block_kv=128)),
    # T = 40 < S = 168 (the last query sees the last key: offset 128), MQA, soft cap, (q, kv) segment pair in
    # which queries 20..22 have no visible key of their segment (their output and gradients are zero).
    "prefill_segments_softcap_mqa": dict(
        shape=(2, 40, 168, 2, 1, 32), dtype=jnp.float32,
        options=dict(logit_soft_cap=5.0, block_q=16, block_kv=128),
        segments=((20,), (100, 151)), segment_values=((1, 2), (1, 3, 2))),
    # Non-causal, bf16, head_dim 128, default blocks (one whole tile, mask-free on TPU), explicit scale.
    "noncausal_bf16": dict(shape=(1, 64, 64, 2, 2, 128), dtype=jnp.bfloat16, options=dict(causal=False, scale=0.1)),
}


def test_one_segment_ids_array_means_the_same_ids_for_queries_and_keys():
  q, k, v = (jnp.asarray(np.random.default_rng(2).standard_normal((1, 16, 2, 8)), jnp.float32) for _ in range(3))
  ids = _segments(1, 16, (5, 11))
  one, pair = (flash_attention(q, k, v, segment_ids=s, implementation="xla", block_q=8, block_kv=8)
               for s in (ids, (ids, ids)))
  np.testing.assert_array_equal(one, pair)


def test_xla_path_memory_is_linear_in_sequence_length():
  # T = S = 4096 (one T x S f32 buffer per head is 64 MiB): the chunked path's forward + backward temporaries
  # stay a few MiB (measured 6.5 MiB; the reference needs 641 MiB). Compiled only, never run.
  length = 4096
  q = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, length, 1, 32), jnp.float32)
  op = functools.partial(flash_attention, implementation="xla", block_q=256, block_kv=256)

  def forward_and_grads(q, k, v, do):
    out, vjp = jax.vjp(op, q, k, v)
    return out, vjp(do)

  memory = jax.jit(forward_and_grads).lower(q, kv, kv, q).compile().memory_analysis()
  assert memory.temp_size_in_bytes < length * length * 4 // 4


def _case_segments(case, batch, q_len, kv_len):
  if "segments" not in case:
    return None
  if len(case["segments"]) == 1:
    return _segments(batch, q_len, case["segments"][0])
  (q_bounds, kv_bounds), (q_values, kv_values) = case["segments"], case["segment_values"]
  q_seg = jnp.asarray(np.asarray(q_values)[np.searchsorted(q_bounds, np.arange(q_len), side="right")])
  kv_seg = jnp.asarray(np.asarray(kv_values)[np.searchsorted(kv_bounds, np.arange(kv_len), side="right")])
  return (jnp.broadcast_to(q_seg, (batch, q_len)).astype(jnp.int32),
          jnp.broadcast_to(kv_seg, (batch, kv_len)).astype(jnp.int32))


def plain_attention(q, k, v, *, causal=True, sliding_window=None, segment_ids=None, logit_soft_cap=None,
                    scale=None, **unused_blocks):
  """Textbook attention in f32 at HIGHEST precision with an explicit [B, T, S] mask and repeated kv heads."""
  del unused_blocks
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  batch, q_len, num_heads, head_dim = q.shape
  kv_len = k.shape[1]
  k, v = (jnp.repeat(x, num_heads // x.shape[2], axis=2) for x in (k, v))
  s = jnp.einsum("bthd,bshd->bhts", q, k, precision=jax.lax.Precision.HIGHEST)
  s = s * (head_dim ** -0.5 if scale is None else scale)
  if logit_soft_cap:
    s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
  query_position = np.arange(q_len)[:, None] + kv_len - q_len  # last query aligned with the last key
  key_position = np.arange(kv_len)[None, :]
  ok = np.ones((q_len, kv_len), bool)
  if causal:
    ok &= key_position <= query_position
  if sliding_window:
    ok &= key_position > query_position - sliding_window
  ok = jnp.asarray(ok)[None]
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    ok = ok & (q_seg[:, :, None] == kv_seg[:, None, :])
  ok = ok[:, None]  # [B, 1, T, S]
  p = jax.nn.softmax(jnp.where(ok, s, -1e30), axis=-1)
  p = jnp.where(ok.any(-1, keepdims=True), p, 0.0)  # no visible key: zeros
  return jnp.einsum("bhts,bshd->bthd", p, v, precision=jax.lax.Precision.HIGHEST)


def _inputs(case, seed=0):
  batch, q_len, kv_len, num_heads, num_kv_heads, head_dim = case["shape"]
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), case["dtype"])
  q, k, v = (normal(batch, q_len, num_heads, head_dim), normal(batch, kv_len, num_kv_heads, head_dim),
             normal(batch, kv_len, num_kv_heads, head_dim))
  return q, k, v, normal(batch, q_len, num_heads, head_dim), _case_segments(case, batch, q_len, kv_len)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("implementation", _dispatch.runnable(IMPLEMENTATIONS))
def test_flash_attention_matches_plain_attention(implementation, case):
  case = CASES[case]
  q, k, v, do, segment_ids = _inputs(case)
  options = dict(case["options"], segment_ids=segment_ids)
  op = functools.partial(flash_attention, implementation=implementation, **options)

  @jax.jit  # one compilation for the forward and both backward kernels
  def forward_and_grads(q, k, v, do):
    out, vjp = jax.vjp(op, q, k, v)
    return out, vjp(do)

  @jax.jit  # jitted: eager op-by-op dispatch of the plain attention would cost more than the kernels
  def expected(q, k, v, do, segment_ids):
    upcast = [x.astype(jnp.float32) for x in (q, k, v)]  # expected gradients in f32 even for bf16 inputs
    plain = functools.partial(plain_attention, **dict(case["options"], segment_ids=segment_ids))
    expected_out, vjp = jax.vjp(plain, *upcast)
    return expected_out, vjp(do.astype(jnp.float32))

  out, grads = forward_and_grads(q, k, v, do)
  expected_out, expected_grads = expected(q, k, v, do, segment_ids)
  tol = TOLERANCE[jnp.dtype(case["dtype"])]
  assert out.dtype == q.dtype and all(g.dtype == q.dtype for g in grads)
  assert_close("out", out, expected_out, tol)
  for name, grad, expected in zip(("dq", "dk", "dv"), grads, expected_grads):
    assert_close(name, grad, expected, tol)


# name -> (B, S_max, H, H_kv, D, dtype, lengths, options): lengths include an empty and a full cache row.
DECODE_CASES = {
    # 6 key blocks of 16 over 3 splits; GQA group 3; soft cap; rows past each length hold NaN.
    "gqa_softcap_splits_f32": (3, 96, 6, 2, 32, jnp.float32, (0, 50, 96),
                               dict(logit_soft_cap=3.0, block_kv=16, num_splits=3)),
    # MQA, bf16, D = 64, default block and splits.
    "mqa_bf16_defaults": (2, 128, 4, 1, 64, jnp.bfloat16, (1, 77), {}),
}


def plain_decode(q, k_cache, v_cache, lengths, *, logit_soft_cap=None, **unused):
  """One query per sequence over its first lengths[b] cache rows, f32, explicit repeated kv heads."""
  del unused
  q, k, v = (x.astype(jnp.float32) for x in (q, k_cache, v_cache))
  group = q.shape[1] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  s = jnp.einsum("bhd,bshd->bhs", q, k, precision=jax.lax.Precision.HIGHEST) * q.shape[-1] ** -0.5
  if logit_soft_cap:
    s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
  ok = (jnp.arange(k.shape[1])[None, :] < jnp.asarray(lengths)[:, None])[:, None, :]
  p = jnp.where(ok, jax.nn.softmax(jnp.where(ok, s, -1e30), axis=-1), 0.0)
  return jnp.einsum("bhs,bshd->bhd", p, jnp.where(ok[:, 0, :, None, None], v, 0.0),
                    precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("implementation", _dispatch.runnable(DECODE_IMPLEMENTATIONS))
def test_flash_decode_matches_plain_decode(implementation, case):
  batch, max_len, num_heads, num_kv_heads, head_dim, dtype, lengths, options = DECODE_CASES[case]
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((batch, num_heads, head_dim)), dtype)
  valid = (np.arange(max_len)[None, :] < np.asarray(lengths)[:, None])[:, :, None, None]
  k_cache, v_cache = (jnp.asarray(np.where(valid, rng.standard_normal((batch, max_len, num_kv_heads, head_dim)),
                                           np.nan), dtype) for _ in range(2))
  lengths = jnp.asarray(lengths, jnp.int32)
  out = flash_decode(q, k_cache, v_cache, lengths, implementation=implementation, **options)
  assert out.dtype == q.dtype
  expected = jax.jit(functools.partial(plain_decode, **options))(q, k_cache, v_cache, lengths)
  assert_close("out", out, expected, TOLERANCE[jnp.dtype(dtype)])


_Q, _KV = jnp.ones((1, 16, 4, 32)), jnp.ones((1, 16, 2, 32))
BAD_INPUTS = {  # name -> (keyword arguments, regex the ValueError must match: it names the argument)
    "q_rank_3": (dict(q=jnp.ones((16, 4, 32))), r"^q must be a non-empty 4-D array"),
    "v_shape": (dict(v=jnp.ones((1, 8, 2, 32))), r"^v must have k's shape"),
    "k_head_dim": (dict(k=jnp.ones((1, 16, 2, 16)), v=jnp.ones((1, 16, 2, 16))), r"^k must be \[B=1, S, H_kv, D=32\]"),
    "heads_not_multiple": (dict(k=jnp.ones((1, 16, 3, 32)), v=jnp.ones((1, 16, 3, 32))),
                           r"^num_heads: q has H=4 heads, which is not a multiple of k/v's H_kv=3"),
    "k_dtype_differs": (dict(k=_KV.astype(jnp.bfloat16)), r"^k, v: dtypes bfloat16, float32 must equal"),
    "q_int": (dict(q=jnp.ones((1, 16, 4, 32), jnp.int32)), r"^q: dtype int32"),
    "window_zero": (dict(sliding_window=0), r"^sliding_window=0 must be an int >= 1"),
    "window_float": (dict(sliding_window=4.0), r"^sliding_window=4.0 must be an int >= 1"),
    "window_not_causal": (dict(sliding_window=4, causal=False), r"^sliding_window is a left window"),
    "soft_cap_zero": (dict(logit_soft_cap=0.0), r"^logit_soft_cap=0.0 must be a positive number"),
    "soft_cap_negative": (dict(logit_soft_cap=-30), r"^logit_soft_cap=-30 must be a positive number"),
    "scale_nan": (dict(scale=float("nan")), r"^scale=nan must be a positive number"),
    "segment_ids_wrong_length": (dict(segment_ids=jnp.ones((1, 15), jnp.int32)),
                                 r"^segment_ids: q_segment_ids must have shape \(B, T\) = \(1, 16\); got \(1, 15\)"),
    "kv_segment_ids_wrong_batch": (dict(segment_ids=(jnp.ones((1, 16), jnp.int32), jnp.ones((2, 16), jnp.int32))),
                                   r"^segment_ids: kv_segment_ids must have shape \(B, S\) = \(1, 16\)"),
    "segment_ids_float": (dict(segment_ids=jnp.ones((1, 16))), r"^segment_ids: q_segment_ids must be integers"),
    "segment_ids_single_array_t_ne_s": (dict(k=jnp.ones((1, 24, 2, 32)), v=jnp.ones((1, 24, 2, 32)),
                                             segment_ids=jnp.ones((1, 16), jnp.int32)),
                                        r"^segment_ids: one array needs T == S"),
    "block_q_zero": (dict(block_q=0), r"^block_q=0 must be a positive int"),
    "tpu_block_q_unaligned": (dict(q=jnp.ones((1, 64, 4, 32)), block_q=12, implementation="interpret_tpu"),
                              r"^block_q=12 is illegal for the TPU kernel"),
    "tpu_block_kv_unaligned": (dict(k=jnp.ones((1, 256, 2, 32)), v=jnp.ones((1, 256, 2, 32)), block_kv=64,
                                    implementation="interpret_tpu"), r"^block_kv=64 is illegal for the TPU kernel"),
    "gpu_block_kv_not_power_of_2": (dict(block_kv=24, implementation="interpret_gpu"),
                                    r"^block_kv=24 is illegal for the GPU \(Triton\) kernel"),
    "tpu_head_dim_too_large": (dict(q=jnp.ones((1, 16, 4, 384)), k=jnp.ones((1, 16, 2, 384)),
                                    v=jnp.ones((1, 16, 2, 384)), implementation="interpret_tpu"),
                               r"^head_dim=384 is not supported by the TPU kernel"),
    "gpu_head_dim_too_large": (dict(q=jnp.ones((1, 16, 4, 384)), k=jnp.ones((1, 16, 2, 384)),
                                    v=jnp.ones((1, 16, 2, 384)), implementation="interpret_gpu"),
                               r"^head_dim=384 is not supported by the GPU \(Triton\) kernel"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_flash_attention_rejects_bad_input(bad):
  overrides, message = BAD_INPUTS[bad]
  kwargs = dict(q=_Q, k=_KV, v=_KV, implementation="reference") | overrides
  with pytest.raises(ValueError, match=message):
    flash_attention(**kwargs)


_DQ, _CACHE, _LENGTHS = jnp.ones((2, 4, 32)), jnp.ones((2, 96, 2, 32)), jnp.array([3, 96])
DECODE_BAD_INPUTS = {
    "q_rank_4": (dict(q=jnp.ones((2, 1, 4, 32))), r"^q must be a non-empty 3-D array \[B, H, D\]"),
    "k_cache_batch": (dict(k_cache=jnp.ones((1, 96, 2, 32))), r"^k_cache must be \[B=2, S_max, H_kv, D=32\]"),
    "heads_not_multiple": (dict(k_cache=jnp.ones((2, 96, 3, 32)), v_cache=jnp.ones((2, 96, 3, 32))),
                           r"^num_heads: q has H=4 heads"),
    "lengths_shape": (dict(lengths=jnp.array([3])), r"^lengths must be an integer array of shape \(B,\) = \(2,\)"),
    "lengths_float": (dict(lengths=jnp.array([3.0, 4.0])), r"^lengths must be an integer array"),
    "soft_cap_negative": (dict(logit_soft_cap=-1.0), r"^logit_soft_cap=-1.0 must be a positive number"),
    "num_splits_zero": (dict(num_splits=0), r"^num_splits=0 must be a positive int"),
    "block_not_dividing_cache": (dict(block_kv=64, implementation="interpret_tpu"),
                                 r"^block_kv=64 must divide the cache length S_max=96"),
    "tpu_block_unaligned": (dict(block_kv=12, implementation="interpret_tpu"),
                            r"^block_kv=12 is illegal for the TPU decode kernel"),
    "gpu_block_not_power_of_2": (dict(block_kv=48, implementation="interpret_gpu"),
                                 r"^block_kv=48 is illegal for the GPU \(Triton\) decode kernel"),
    "gpu_head_dim_not_power_of_2": (dict(q=jnp.ones((2, 4, 48)), k_cache=jnp.ones((2, 96, 2, 48)),
                                         v_cache=jnp.ones((2, 96, 2, 48)), implementation="interpret_gpu"),
                                    r"^head_dim=48 is not supported by the GPU \(Triton\) decode kernel"),
}


@pytest.mark.parametrize("bad", DECODE_BAD_INPUTS)
def test_flash_decode_rejects_bad_input(bad):
  overrides, message = DECODE_BAD_INPUTS[bad]
  kwargs = dict(q=_DQ, k_cache=_CACHE, v_cache=_CACHE, lengths=_LENGTHS, implementation="reference") | overrides
  with pytest.raises(ValueError, match=message):
    flash_decode(**kwargs)


def test_flash_attention_cost_counts_skipped_tiles():
  # T = S = 256, D = 128, f32, (128, 128) blocks, one head: causal visits 3 of the 4 tiles.
  # Forward bytes: q read + o written (2 x 256 x 128), k and v per visited tile (3 x 2 x 128 x 128), the
  # lane-replicated lse (256 x 128); flops: two 128^3 matmuls per visited tile.
  causal = cost((1, 256, 1, 128), (1, 256, 1, 128), dtype=jnp.float32)
  assert causal == {"flops": 3 * 2 * 2 * 128 ** 3,
                    "hbm_bytes": 4 * (2 * 256 * 128 + 3 * 2 * 128 * 128 + 256 * 128),
                    "ideal_bytes": 4 * 4 * 256 * 128}
  full = cost((1, 256, 1, 128), (1, 256, 1, 128), dtype=jnp.float32, causal=False)
  assert full["flops"] == 4 * causal["flops"] // 3
  # A 128-key window at T = S = 1024: every query block sees its diagonal tile and the one before.
  window = cost((1, 1024, 1, 128), (1, 1024, 1, 128), dtype=jnp.float32, sliding_window=128)
  assert window["flops"] == (1 + 7 * 2) * 2 * 2 * 128 ** 3
  # D = 64 is padded to 128 lanes: twice the modelled traffic of q, k, v, o against the ideal.
  narrow = cost((1, 256, 1, 64), (1, 256, 1, 64), dtype=jnp.bfloat16, backward=True)
  assert narrow["hbm_bytes"] > 2 * narrow["ideal_bytes"] and narrow["flops"] == 3 * 9 * 2 * 256 * 128 * 128 // 2


def test_flash_decode_cost_reads_only_valid_blocks():
  # S_max = 1024 in blocks of 512 (the largest candidate dividing it), a single split; length 100 reads one block.
  short, full = (cost_decode((1, 8, 128), (1, 1024, 2, 128), dtype=jnp.bfloat16, lengths=n,
                                        num_splits=1) for n in (100, 1024))
  assert full["hbm_bytes"] - short["hbm_bytes"] == 2 * 512 * 2 * 128 * 2  # one more K and V block, bf16
  assert short["ideal_bytes"] == 2 * 8 * 128 * 2 + 2 * 100 * 2 * 128 * 2
