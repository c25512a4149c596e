"""flash_attention / flash_decode: every CPU-runnable implementation vs a plain f32 jnp attention written here
(full T x S masks), forward and every gradient; bad inputs; cost model.

Measured (jax 0.10.2, CPU, this file's cases): f32 relative RMS errors <= 1e-6 for out/dq/dk/dv on every
implementation; bf16 ~2e-3 (rounding of the bf16 output and of P before the PV matmul).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.flash_attention import IMPLEMENTATIONS, cost, flash_attention
from tests.helpers import TOLERANCE, assert_close


def _segments(batch, length, bounds):
  """[batch, length] int32 segment ids: segment n covers [bounds[n-1], bounds[n]) (row b shifted by b)."""
  ids = np.searchsorted(np.asarray(bounds), np.arange(length), side="right") + 1
  return jnp.asarray(np.stack([np.roll(ids, b) for b in range(batch)]), jnp.int32)


# name -> dict(shape=(B, T, S, H, H_kv, D), dtype, options for flash_attention). Block sizes are legal for both
# kernel styles (TPU: block_q % 8, block_kv % 128; GPU: powers of two >= 16). Each case combines several
# features, because every interpret-mode case compiles three kernels (forward, dq, dk/dv).
CASES = {
    # T = S = 260 ragged for (32, 128) blocks: 9 x 3 tiles; the causal diagonal skips upper tiles and the
    # 64-key window skips kv block 0 for the last query blocks. GQA group 2, head_dim 64 (padded to 128 on TPU).
    "causal_window_gqa_ragged": dict(shape=(1, 260, 260, 4, 2, 64), dtype=jnp.float32,
                                     options=dict(sliding_window=64, block_q=32, block_kv=128)),
    # T = 40 < S = 168 (the last query sees the last key: offset 128), MQA, soft cap, (q, kv) segment pair in
    # which queries 20..22 have no visible key of their segment (their output and gradients are zero).
    "prefill_segments_softcap_mqa": dict(
        shape=(2, 40, 168, 2, 1, 32), dtype=jnp.float32,
        options=dict(logit_soft_cap=5.0, block_q=16, block_kv=128),
        segments=((20,), (100, 151)), segment_values=((1, 2), (1, 3, 2))),
    # Non-causal with one segment_ids array (T == S), bf16, head_dim 128, default blocks, explicit scale.
    "noncausal_segments_bf16": dict(shape=(1, 64, 64, 2, 2, 128), dtype=jnp.bfloat16,
                                    options=dict(causal=False, scale=0.1), segments=((24, 40),)),
}


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
@pytest.mark.parametrize("implementation", _dispatch.cpu_runnable(IMPLEMENTATIONS))
def test_flash_attention_matches_plain_attention(implementation, case):
  case = CASES[case]
  q, k, v, do, segment_ids = _inputs(case)
  options = dict(case["options"], segment_ids=segment_ids)
  op = functools.partial(flash_attention, implementation=implementation, **options)

  @jax.jit  # one compilation for the forward and both backward kernels
  def forward_and_grads(q, k, v, do):
    out, vjp = jax.vjp(op, q, k, v)
    return out, vjp(do)

  out, grads = forward_and_grads(q, k, v, do)
  upcast = [x.astype(jnp.float32) for x in (q, k, v)]  # expected gradients in f32 even for bf16 inputs
  expected_out, vjp = jax.vjp(functools.partial(plain_attention, **options), *upcast)
  expected_grads = vjp(do.astype(jnp.float32))
  tol = TOLERANCE[jnp.dtype(case["dtype"])]
  assert out.dtype == q.dtype and all(g.dtype == q.dtype for g in grads)
  assert_close("out", out, expected_out, tol)
  for name, grad, expected in zip(("dq", "dk", "dv"), grads, expected_grads):
    assert_close(name, grad, expected, tol)
