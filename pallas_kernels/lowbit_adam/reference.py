"""Plain-jnp reference of the block-wise quantized Adam update: the semantics every kernel matches bit-for-bit.

Layout: states are [n_blocks, B] (B a power of two); one float32 absmax per block. 8-bit maps store one code per
byte ([n_blocks, B] uint8); 4-bit maps pack two codes per byte ([n_blocks, B // 2] uint8): element 2j in the LOW
nibble, element 2j+1 in the HIGH nibble.

Quantization of a block: absmax = max |x| over the block; code = nearest map value of x * (1 / absmax) (ties to the
lower code; the reciprocal once per block, see `normalize`), computed as the count of `maps.THRESHOLDS` below it.
A block whose absmax is 0 uses 1 instead (every x in it is 0), so it stores absmax 0 and the zero code, and
dequantizes to exactly 0, never NaN.

The never-zero rule of "dynamic_unsigned_8" (bitsandbytes' second-moment map): a positive normalized v never takes
the zero code, it takes the smallest positive code (3.25e-7 * absmax). With exact nearest rounding a v below half
of that would store 0, and a row whose gradient stays ~0 for a while (an unused embedding row) would then divide
its m by sqrt(0) + eps at the next step. bitsandbytes' CUDA kernels do NOT do this: `quantize_2D<0>` (the unsigned
state of kOptimizerStatic8bit2StateBlockwise, csrc/kernels.cu) and `dQuantize<0>` (kQuantizeBlockwise) both round
to the nearest code by a binary search plus a midpoint test, so a tiny v does round to code 0 there; the only guard
bitsandbytes has is for the SIGNED state (after `quantize_2D<1>` it moves a code whose value has the wrong sign
one step towards the value's sign). The rule here is this project's choice, made for the stability the issue asks
for; every other map is plain nearest. (bitsandbytes also breaks midpoint ties differently on the two sides of a
binary-search pivot; here every tie goes to the lower code.)

The Adam step, in float32, in this order (optax.adamw: scale_by_adam -> add_decayed_weights -> scale(-lr)):
    m = dequant(m_codes) ; v = dequant(v_codes)
    m = b1 * m + (1 - b1) * g ;  v = b2 * v + (1 - b2) * (g * g)       (constants rounded once to float32)
    m_hat = m * (1 / (1 - b1**t)) ;  v_hat = v * (1 / (1 - b2**t))      (corrections as optax; see step_scalars)
    u = m_hat / (sqrt(v_hat) + eps) ;  u = u + weight_decay * param  (only when weight_decay != 0, as optax.adam)
    update = (-learning_rate) * u
    absmax_m = max |m| per block, m_codes = quantize(m * (1 / absmax_m)); the same for v.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.lowbit_adam import maps


def constants(b1: float, b2: float, eps: float, weight_decay: float) -> dict[str, np.float32]:
  """The float32 constants of the step (Python floats rounded once, `1 - b` formed in float64 first)."""
  return {"b1": np.float32(b1), "one_minus_b1": np.float32(1.0 - b1), "b2": np.float32(b2),
          "one_minus_b2": np.float32(1.0 - b2), "eps": np.float32(eps), "weight_decay": np.float32(weight_decay)}


def step_scalars(count, learning_rate, b1: float, b2: float):
  """[1 / bias correction 1, 1 / bias correction 2, -learning_rate] as a float32 [3] array. The corrections are
  optax's `1 - b ** count` with the int32 count (optax.bias_correction); `-learning_rate` is
  optax.scale_by_learning_rate's step. Reciprocals, because XLA rewrites a division by a broadcast scalar into a
  multiplication by its reciprocal anyway (optax's `m / correction` included): writing it out makes every backend
  and the NumPy re-derivation compute the same product."""
  count = jnp.asarray(count, jnp.int32)
  correction1 = (1 - b1 ** count).astype(jnp.float32)
  correction2 = (1 - b2 ** count).astype(jnp.float32)
  lr = jnp.asarray(learning_rate, jnp.float32)
  return jnp.stack([1 / correction1, 1 / correction2, -lr])


def encode(x, map_name: str):
  """Codes (int32, unpacked) of the normalized values x: the number of the map's thresholds below x."""
  thresholds = jnp.asarray(maps.THRESHOLDS[map_name])
  return jnp.searchsorted(thresholds, x.astype(jnp.float32), side="left").astype(jnp.int32)


def decode(codes, map_name: str):
  """Map values (float32) of unpacked integer codes."""
  return jnp.asarray(maps.MAPS[map_name])[codes.astype(jnp.int32)]


def pack_nibbles(codes):
  """[..., B] codes in 0..15 -> [..., B // 2] uint8: element 2j in the low nibble, 2j+1 in the high nibble."""
  codes = codes.astype(jnp.uint8)
  return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed):
  """The inverse of `pack_nibbles`: [..., B // 2] uint8 -> [..., B] int32."""
  packed = packed.astype(jnp.int32)
  both = jnp.stack([packed & 15, packed >> 4], axis=-1)
  return both.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def block_absmax(x):
  return jnp.max(jnp.abs(x), axis=-1)


def block_reciprocal(absmax):
  """1 / absmax per block, 1 for a zero block (its values are all 0)."""
  return 1 / jnp.where(absmax > 0, absmax, jnp.float32(1))


def normalize(x, absmax):
  """x * (1 / absmax) per block ([n]: the reciprocal once per block, as XLA rewrites a division by a broadcast
  anyway, and as bitsandbytes' quantize_blockwise does), or x / normalizer per element ([n, B]); a zero normalizer
  counts as 1 (its x are all 0)."""
  if absmax.ndim == x.ndim - 1:
    return x * block_reciprocal(absmax)[..., None]
  return x / jnp.where(absmax > 0, absmax, jnp.float32(1))


def quantize(x, absmax, map_name: str):
  """x [n, B] f32 and its normalizer -> stored codes (uint8, packed for 4-bit maps)."""
  codes = encode(normalize(x, absmax), map_name)
  return pack_nibbles(codes) if maps.BITS[map_name] == 4 else codes.astype(jnp.uint8)


def dequantize(codes, absmax, map_name: str):
  """Stored codes and their normalizer ([n] or [n, B]) -> float32 [n, B]: map value * absmax."""
  codes = unpack_nibbles(codes) if maps.BITS[map_name] == 4 else codes.astype(jnp.int32)
  absmax = absmax[..., None] if absmax.ndim == codes.ndim - 1 else absmax
  return decode(codes, map_name) * absmax.astype(jnp.float32)


def pin_rounding(product):
  """`product` unchanged (a NaN stays NaN), but behind a select: a multiply feeding an add is contracted into one
  fused multiply-add (one rounding instead of two) by XLA's CPU backend wherever both land in one fusion, and its
  fusion choices differ between programs; LLVM does not contract through a select, so every product is rounded to
  float32 on its own -- the reference, the kernels and a NumPy re-derivation compute the same bits.
  (An `optimization_barrier` does not help: XLA's CPU pipeline removes it before fusion.)"""
  return jnp.where(jnp.isnan(product), jnp.float32(jnp.nan), product)


def adam_math(grad, param, m, v, inv_correction1, inv_correction2, neg_lr, c, weight_decay: float):
  """The float32 update of dequantized moments; returns (update, new m, new v). `c`: `constants(...)`.

  `param` is an array or a zero-argument callable returning it (a kernel loads it only when weight_decay != 0).
  Every product that feeds a sum goes through `pin_rounding` (no fused multiply-adds anywhere).
  """
  m = pin_rounding(c["b1"] * m) + pin_rounding(c["one_minus_b1"] * grad)
  v = pin_rounding(c["b2"] * v) + pin_rounding(c["one_minus_b2"] * (grad * grad))
  u = (m * inv_correction1) / (jnp.sqrt(v * inv_correction2) + c["eps"])
  if weight_decay != 0.0:
    u = u + pin_rounding(c["weight_decay"] * (param() if callable(param) else param))
  return neg_lr * u, m, v


def blockwise_adam_update(grad, param, m_codes, m_absmax, v_codes, v_absmax, scalars, *, b1, b2, eps,
                          weight_decay, m_map, v_map):
  """The whole step on [n_blocks, B] arrays; `scalars` from `step_scalars`."""
  c = constants(b1, b2, eps, weight_decay)
  m = dequantize(m_codes, m_absmax, m_map)
  v = dequantize(v_codes, v_absmax, v_map)
  update, m, v = adam_math(grad, param, m, v, scalars[0], scalars[1], scalars[2], c, weight_decay)
  new_m_absmax, new_v_absmax = block_absmax(m), block_absmax(v)
  return (update, quantize(m, new_m_absmax, m_map), new_m_absmax, quantize(v, new_v_absmax, v_map), new_v_absmax)
