"""`quant_decode(q, k_codes, ..., lengths)`: one decoding step of attention read straight from the quantized
(KIVI) KV cache of `efficient.quant.kv_cache.QuantizedKVCache`, never dequantizing the cache as a whole.

The arrays are exactly the cache's (G = group size, S = max_len, n = ceil(S / G), Dp = D * bits / 8):
  k_codes     uint8 [B, n, G * bits / 8, H_kv, D]  keys per channel over groups of G slots, codes packed planar
                                                  along the group's slots (`pallas_kernels.packing`)
  k_scale     f32   [B, n, 1, H_kv, D]            key = (code - zero) * scale
  k_zero      uint8 [B, n, 1, H_kv, D]
  k_residual  float [B, G, H_kv, D]               the open group's keys: row r is slot C + r, C = (len // G) * G
  v_codes     uint8 [B, S, H_kv, Dp]              values per token and kv head, packed planar along head_dim
  v_scale     f32   [B, S, H_kv, 1]
  v_zero      uint8 [B, S, H_kv, 1]
A query sees slots [0, lengths[b]): those of complete groups (s < C) with quantized keys, the open group's
(C <= s < length, at most G - 1) with float keys from k_residual; values are always the quantized ones.

Implementations:
  reference      dequantizes everything, one masked softmax (readable jnp).
  xla            `lax.while_loop` over chunks of `block_groups` groups, online softmax, each chunk dequantized
                 on its own; stops at the longest sequence's last complete group (the CPU default).
  pallas_tpu     Mosaic: lengths scalar-prefetched into SMEM drive the index maps; each grid step DMAs one
                 block of `block_groups` groups (codes, scales, zeros of K and V) and dequantizes it in VMEM;
                 blocks past a sequence's last complete group are neither fetched nor computed.
  pallas_gpu     Triton: a program per (sequence, kv head, split) walks its complete groups, dequantizing each
                 in registers.
  interpret_*    the kernels in Pallas interpret mode (CPU tests).
Every path: GQA without repeating K/V, f32 logits / softmax / accumulation, split-K partials merged with
`flash_attention._common.combine_splits`; the open group (<= G keys) is one small jnp step merged the same way.

return_key_logits=True (reference and xla) also returns each key's logit [B, H, S] (-inf past the length) and
the log-sum-exp [B, H], so exp(logit - lse) is each key's attention mass (what a budgeted cache accumulates).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _dispatch, _util, packing
from pallas_kernels.quant_decode import _common, gpu, reference, tpu, xla

IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu", "interpret_tpu", "interpret_gpu")
KEY_LOGITS_IMPLEMENTATIONS = ("reference", "xla")
_MODULES = _dispatch.kernel_modules(tpu=tpu, gpu=gpu)
BITS = (8, 4)
DEFAULT_SPLITS = 4  # split-K programs per (sequence[, kv head]): parallelism when B * H_kv is small


def quant_decode(q, k_codes, k_scale, k_zero, k_residual, v_codes, v_scale, v_zero, lengths, *, bits, scale=None,
                 return_key_logits=False, implementation=None, block_groups=None, num_splits=None):
  """q [B, H, D] attends to slots [0, lengths[b]) of a quantized KV cache (layout in the module docstring).

  Returns out [B, H, D] in q.dtype (zeros for length 0), or with return_key_logits (out, logits [B, H, S] f32,
  lse [B, H]). lengths [B] ints are clipped to [0, S]. `block_groups`: groups per chunk (xla) or per grid step
  (TPU; must divide S // G; default about 512 slots); `num_splits`: split-K programs (kernels; default
  DEFAULT_SPLITS).
  """
  _check(q, k_codes, k_scale, k_zero, k_residual, v_codes, v_scale, v_zero, lengths, bits, scale, block_groups,
         num_splits)
  implementation = _dispatch.choose(implementation, IMPLEMENTATIONS, op="quant_decode")
  if return_key_logits and implementation not in KEY_LOGITS_IMPLEMENTATIONS:
    raise ValueError(f"return_key_logits=True is supported by implementation in {KEY_LOGITS_IMPLEMENTATIONS}; "
                     f"got implementation={implementation!r}.")
  return _run(q, k_codes, k_scale, k_zero, k_residual, v_codes, v_scale, v_zero, lengths, implementation=implementation,
              bits=bits, scale=None if scale is None else float(scale), return_key_logits=bool(return_key_logits),
              block_groups=block_groups, num_splits=num_splits)


@functools.partial(jax.jit, static_argnames=("implementation", "bits", "scale", "return_key_logits", "block_groups",
                                             "num_splits"))
def _run(q, k_codes, k_scale, k_zero, k_residual, v_codes, v_scale, v_zero, lengths, *, implementation, bits,
         scale=None, return_key_logits=False, block_groups=None, num_splits=None):
  """`quant_decode` without validation or dispatch (the lowering tests export the kernels through it)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  max_len, group_size = v_codes.shape[1], k_residual.shape[1]
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_len)
  arrays = (q, k_codes, k_scale, k_zero, k_residual, v_codes, v_scale, v_zero, lengths)
  if implementation == "reference":
    return reference.quant_decode(*arrays, bits=bits, scale=scale, return_key_logits=return_key_logits)
  if implementation == "xla":
    return xla.quant_decode(*arrays, bits=bits, scale=scale, block_groups=block_groups,
                            return_key_logits=return_key_logits)
  module = _MODULES[implementation]
  full_groups = max_len // group_size
  residual = _common.residual_partial(q, k_residual, v_codes, v_scale, v_zero, lengths, bits=bits, scale=scale)
  if full_groups == 0:  # no group can ever be complete: the residual is the whole cache
    return _common.with_residual(q, None, residual, False)
  module.check_shapes(q.shape[-1], group_size, bits)
  block, splits = resolve_blocks(implementation, full_groups, group_size, block_groups, num_splits)
  # The resolved blocks are those of this implementation's own kernel, so they go to the model as they are.
  estimate = _util.cost_estimate(cost, q.shape, v_codes.shape[:3] + (q.shape[-1],), implementation=implementation,
                                 transcendentals=q.shape[0] * q.shape[1] * max_len, group_size=group_size,
                                 dtype=q.dtype, bits=bits, block_groups=block, num_splits=splits)
  parts = module.decode(*arrays, bits=bits, scale=scale, block_groups=block, num_splits=splits,
                        interpret=_dispatch.interpret_params(implementation), cost_estimate=estimate)
  return _common.with_residual(q, parts, residual, False)


def cache_arrays(layer_cache) -> tuple:
  """The positional arrays of `quant_decode` after q, (k_codes, k_scale, k_zero, k_residual, v_codes, v_scale,
  v_zero), of an `efficient.quant.kv_cache.QuantizedKVCache` (read by attribute: K and V are QArrays with
  qvalue / scale / zero_point; this package does not import `efficient`)."""
  k, v = layer_cache.k, layer_cache.v
  return (k.qvalue, k.scale, k.zero_point, layer_cache.k_residual, v.qvalue, v.scale, v.zero_point)


def resolve_blocks(implementation, full_groups: int, group_size: int, block_groups=None, num_splits=None):
  """(block_groups, num_splits) a kernel runs with. TPU: block_groups divides S // G (default: the largest
  divisor with at most tpu.TOKENS_PER_STEP slots); GPU walks one group per loop step (block_groups 1)."""
  if not _dispatch.tpu_style(implementation):
    return 1, min(num_splits or DEFAULT_SPLITS, full_groups)
  if block_groups is None:
    target = max(1, tpu.TOKENS_PER_STEP // group_size)
    block_groups = max(b for b in range(1, min(target, full_groups) + 1) if full_groups % b == 0)
  elif full_groups % block_groups:
    raise ValueError(f"block_groups={block_groups} must divide the number of groups that can be complete, "
                     f"S // G = {full_groups}, for the TPU kernel (the cache is read in place, not padded).")
  return block_groups, min(num_splits or DEFAULT_SPLITS, full_groups // block_groups)


def _expected(batch, max_len, group_size, num_kv_heads, head_dim, bits, dtype):
  """name -> (shape, dtype) of every cache array."""
  groups = -(-max_len // group_size)
  return {"k_codes": ((batch, groups, group_size * bits // 8, num_kv_heads, head_dim), jnp.uint8),
          "k_scale": ((batch, groups, 1, num_kv_heads, head_dim), jnp.float32),
          "k_zero": ((batch, groups, 1, num_kv_heads, head_dim), jnp.uint8),
          "k_residual": ((batch, group_size, num_kv_heads, head_dim), dtype),
          "v_codes": ((batch, max_len, num_kv_heads, head_dim * bits // 8), jnp.uint8),
          "v_scale": ((batch, max_len, num_kv_heads, 1), jnp.float32),
          "v_zero": ((batch, max_len, num_kv_heads, 1), jnp.uint8)}


def _check(q, k_codes, k_scale, k_zero, k_residual, v_codes, v_scale, v_zero, lengths, bits, scale, block_groups,
           num_splits):
  """Raises one `ValueError` naming the first bad argument of `quant_decode`."""
  if not hasattr(q, "ndim") or q.ndim != 3 or 0 in q.shape:
    raise ValueError(f"q must be a non-empty 3-D array [B, H, D] (one query step); got {getattr(q, 'shape', q)}.")
  _util.check_float_dtype("q", q.dtype)
  if bits not in BITS:
    raise ValueError(f"bits={bits!r} must be one of {BITS}.")
  batch, num_heads, head_dim = q.shape
  packing.check_packable(head_dim, bits, name="head_dim")
  if not hasattr(k_residual, "ndim") or k_residual.ndim != 4 or 0 in k_residual.shape:
    raise ValueError(f"k_residual must be [B, G, H_kv, D]; got {getattr(k_residual, 'shape', k_residual)}.")
  if not hasattr(v_codes, "ndim") or v_codes.ndim != 4 or 0 in v_codes.shape:
    raise ValueError(f"v_codes must be [B, S, H_kv, D * bits / 8]; got {getattr(v_codes, 'shape', v_codes)}.")
  group_size, num_kv_heads = k_residual.shape[1], k_residual.shape[2]
  packing.check_packable(group_size, bits, name="group_size (k_residual.shape[1])")
  expected = _expected(batch, v_codes.shape[1], group_size, num_kv_heads, head_dim, bits, q.dtype)
  arrays = dict(k_codes=k_codes, k_scale=k_scale, k_zero=k_zero, k_residual=k_residual, v_codes=v_codes,
                v_scale=v_scale, v_zero=v_zero)
  for name, (shape, dtype) in expected.items():
    array = arrays[name]
    if tuple(getattr(array, "shape", ())) != shape:
      raise ValueError(f"{name} must have shape {shape} (B, S = v_codes.shape[1], G = k_residual.shape[1], H_kv, "
                       f"D, bits={bits}); got {tuple(getattr(array, 'shape', ()))}.")
    if name == "k_residual":
      _util.check_float_dtype(name, array.dtype)
    elif jnp.dtype(array.dtype) != jnp.dtype(dtype):
      raise ValueError(f"{name}: dtype {jnp.dtype(array.dtype).name} must be {jnp.dtype(dtype).name}.")
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads: q has H={num_heads} heads, which is not a multiple of the cache's "
                     f"H_kv={num_kv_heads} (GQA needs H % H_kv == 0).")
  _util.check_lengths(lengths, batch)
  _util.check_logit_scale(scale)
  _util.check_block_arg("block_groups", block_groups)
  _util.check_block_arg("num_splits", num_splits)


def packed_cache_bytes(batch: int, max_len: int, num_kv_heads: int, head_dim: int, group_size: int, *, bits: int,
                       residual_itemsize: int = 4, lengths=None) -> int:
  """Bytes of the cache a step must read for sequences of `lengths` slots (default S): codes, scales and zero
  points of K (complete groups) and V (valid slots), and the open group's float keys."""
  lengths = np.clip(np.broadcast_to(np.asarray(max_len if lengths is None else lengths), (batch,)), 0, max_len)
  total = 0
  for length in lengths:
    complete = int(length) // group_size * group_size
    total += complete * num_kv_heads * head_dim * bits // 8 + complete // group_size * num_kv_heads * head_dim * 5
    total += int(length) * num_kv_heads * (head_dim * bits // 8 + 5)
    total += (int(length) - complete) * num_kv_heads * head_dim * residual_itemsize
  return total


def cost(q_shape, v_shape, *, group_size: int, bits: int, dtype, lengths=None, block_groups=None,
         num_splits=None) -> dict:
  """Modelled cost of the TPU kernel (plus the jnp open-group step) for q [B, H, D] over a quantized cache whose
  values have the logical shape v_shape = [B, S, H_kv, D] (`QuantizedKVCache.v.shape`), keys in groups of
  `group_size`, the open group's keys in `dtype`, sequences holding `lengths` slots (B ints, one int; default S).

  `hbm_bytes`: the block-diagonal q once; per sequence the blocks the pipeline fetches (whole blocks of
  `block_groups` groups up to the last complete one: K codes, scales, zeros, V codes, scales, zeros); the open
  group's float keys and its G value rows; the f32 partial results of every split. `ideal_bytes`: q and the
  output once plus `packed_bytes`. `packed_bytes`: what the cache stores for the valid slots
  (`packed_cache_bytes`: codes, scales, zeros, the open group's float keys). `flops`: the matmuls on fetched blocks (with the H_kv-fold
  block-diagonal redundancy) and the open group's.
  """
  batch, num_heads, head_dim = q_shape
  max_len, num_kv_heads = v_shape[1], v_shape[2]
  if tuple(v_shape) != (batch, max_len, num_kv_heads, head_dim):
    raise ValueError(f"v_shape={tuple(v_shape)} must be [B, S, H_kv, D] with q_shape's B and D {tuple(q_shape)}.")
  itemsize = jnp.dtype(dtype).itemsize
  full_groups = max_len // group_size
  block, splits = resolve_blocks("pallas_tpu", max(full_groups, 1), group_size, block_groups, num_splits)
  lengths = np.clip(np.broadcast_to(np.asarray(max_len if lengths is None else lengths), (batch,)), 0, max_len)
  lanes = num_kv_heads * head_dim
  per_group = lanes * (group_size * bits // 8 + 5) + group_size * num_kv_heads * (head_dim * bits // 8 + 5)
  residual_bytes = group_size * num_kv_heads * (head_dim * itemsize + head_dim * bits // 8 + 5)
  moved = flops = 0
  for length in lengths:
    complete_groups = int(length) // group_size
    fetched_groups = max(1, -(-complete_groups // block)) * block if full_groups else 0
    moved += fetched_groups * per_group + residual_bytes
    moved += splits * num_heads * (lanes + 2 * tpu.LANES) * 4 if full_groups else 0
    flops += 4 * num_heads * lanes * fetched_groups * group_size + 4 * num_heads * head_dim * group_size
  moved += batch * num_heads * (lanes + head_dim) * itemsize  # q_bd in, out
  packed = packed_cache_bytes(batch, max_len, num_kv_heads, head_dim, group_size, bits=bits,
                              residual_itemsize=itemsize, lengths=lengths)
  ideal = batch * 2 * num_heads * head_dim * itemsize + packed
  return {"flops": int(flops), "hbm_bytes": int(moved), "ideal_bytes": int(ideal), "packed_bytes": int(packed)}
