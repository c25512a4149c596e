"""Adam with 8-bit and 4-bit optimizer states, as optax transformations on plain arrays.

Adam keeps two f32 moments per parameter (8 B/param), more than the bf16 weights themselves. Quantizing them
block-wise, with a per-block f32 scale (absmax) that isolates outliers, keeps the update quality of f32 Adam:

- `adam_8bit` / `adamw_8bit`: bitsandbytes' 8-bit Adam (Dettmers et al. 2022): m with the signed dynamic (tree)
  map, v with the unsigned one, blocks of `block_size` (256, bitsandbytes' default); every step dequantizes,
  updates in f32 and requantizes, in one pass (`pallas_kernels.lowbit_adam.blockwise_adam_update`, which runs its
  Pallas kernel under the usual `implementation=` policy). ~2.03 B/param with block 256.
- `adam_4bit`: Li et al. 2023 ("Memory Efficient Optimizers with 4-bit States"): m block-wise (128) with the
  dynamic-exponent map, v with rank-1 normalization and a linear map WITHOUT zero (`_rank1_adam`), codes packed
  two per byte. ~1.03 B/param.
- `adam_4bit_naive`: the baseline the paper shows unstable: both moments block-wise, v with a linear map that
  includes zero. A small v rounds to 0, the update m / (sqrt(0) + eps) explodes ("zero-point problem").

Layout (so a state shards with its param, see `efficient.optim.axes.state_leaf_names`): codes [*lead, nb, B]
(uint8, one code per byte; 4-bit: [*lead, nb, B // 2], element 2j in the low nibble), absmax f32 [*lead, nb].
Blocks run along the param's last axis when its length is a multiple of B (the spec layout, *lead = all other
dims; no padding, and a state shards exactly with its param). Otherwise (tiny Llama's head_dim 16 or embed 64,
SmolLM2's embed 576, with B 256) padding every row would cost up to B / last times the bytes (16x for a
head_dim-16 kernel), so the run extends over the fewest trailing axes whose product is a multiple of B
(*lead = the dims before them), or over the whole flattened param with its tail zero-padded. Either way the
blocks are exactly bitsandbytes' flat blocks of the row-major flattened param. Padding elements get grad 0 and
param 0 and stay 0. Merged-axis states are named by the same rules (`state_leaf_names`) but need not split
like their param on every mesh (correct either way; XLA moves data where they differ).

Parameters with fewer than `min_8bit_size` (`min_4bit_size`) elements, and those for which
`fp32_state(path, shape)` is true (`embedding_fp32_state`: bitsandbytes' "stable embedding" advice to keep
embedding state in f32), keep f32 m, v and run plain f32 Adam in optax's formula order (bit-equal to optax.adam).

Non-finite gradients: nothing raises inside jit. When any gradient element of a step is NaN/inf, the update is
all zeros, every moment and the step count keep their old values (the state is never poisoned), and the state's
`skipped` counter is incremented; `count` counts applied steps only.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from efficient.optim import axes
from pallas_kernels.lowbit_adam import blockwise_adam_update, dequantize_blocks, maps, quantize_blocks

FP32StatePredicate = Callable[[str, tuple], bool]


class LowBitAdamState(NamedTuple):
  count: jax.Array    # int32 [], steps applied (the bias corrections use count + 1 at the next step)
  skipped: jax.Array  # int32 [], steps skipped because a gradient was not finite
  moments: Any        # the params' tree with each param replaced by one of the *Moments tuples below


class Fp32Moments(NamedTuple):
  m: jax.Array
  v: jax.Array


class Dynamic8Moments(NamedTuple):
  """bitsandbytes' 8-bit state: m 'dynamic_signed_8', v 'dynamic_unsigned_8'."""
  m_codes: jax.Array
  m_absmax: jax.Array
  v_codes: jax.Array
  v_absmax: jax.Array


class Naive4Moments(NamedTuple):
  """The naive 4-bit baseline: m 'de_signed_4', v 'linear_unsigned_4' (zero included)."""
  m_codes: jax.Array
  m_absmax: jax.Array
  v_codes: jax.Array
  v_absmax: jax.Array


class Li4BlockMoments(NamedTuple):
  """Li et al. 4-bit for a 1-D param: v block-wise too (their rank-1 code groups 1-D tensors by 128)."""
  m_codes: jax.Array
  m_absmax: jax.Array
  v_codes: jax.Array
  v_absmax: jax.Array


class Li4Rank1Moments(NamedTuple):
  """Li et al. 4-bit for a >= 2-D param: v codes of v / normalizer, `v_max[d]` = max of v over all dims but d
  (keepdims: the param's shape with every other dim 1); normalizer = min over d of v_max[d]."""
  m_codes: jax.Array
  m_absmax: jax.Array
  v_codes: jax.Array
  v_max: tuple


STATE_MAPS = {Dynamic8Moments: ("dynamic_signed_8", "dynamic_unsigned_8"),
              Naive4Moments: ("de_signed_4", "linear_unsigned_4"),
              Li4BlockMoments: ("de_signed_4", "linear_unsigned_4_nozero"),
              Li4Rank1Moments: ("de_signed_4", "linear_unsigned_4_nozero")}
_FOUR_BIT = (Naive4Moments, Li4BlockMoments, Li4Rank1Moments)


def embedding_fp32_state(path: str, shape) -> bool:
  """`fp32_state` predicate: True for params whose path contains 'embed' (e.g. "['embedding']"), so token
  embeddings keep f32 moments (bitsandbytes' "stable embedding" recommendation); matched case-insensitively."""
  del shape
  return "embed" in path.lower()


# ----------------------------------------------------------------------------------------------- layout

class Blocking(NamedTuple):
  lead: tuple   # the param dims kept in front of [nb, B]
  run: int      # elements per lead index (product of the merged trailing dims)
  nb: int       # blocks per lead index
  block: int


def blocking(shape, block: int) -> Blocking:
  """Blocks along the last axis when it is a multiple of `block`, else along the fewest trailing axes whose
  product is, else over the flattened param (tail padded). See the module docstring."""
  shape = tuple(shape)
  for k in range(1, len(shape) + 1):
    run = math.prod(shape[-k:])
    if run % block == 0 or k == len(shape):
      return Blocking(shape[:-k], run, -(-run // block), block)
  return Blocking((), 1, 1, block)  # a scalar param


def to_blocks(x: jax.Array, lay: Blocking) -> jax.Array:
  """[*shape] -> [*lead, nb, B] f32, zero padded."""
  x = x.astype(jnp.float32).reshape(lay.lead + (lay.run,))
  pad = lay.nb * lay.block - lay.run
  if pad:
    x = jnp.pad(x, [(0, 0)] * len(lay.lead) + [(0, pad)])
  return x.reshape(lay.lead + (lay.nb, lay.block))


def from_blocks(x: jax.Array, lay: Blocking, shape) -> jax.Array:
  x = x.reshape(lay.lead + (lay.nb * lay.block,))[..., :lay.run]
  return x.reshape(tuple(shape))


def quantize(x: jax.Array, lay: Blocking, map_name: str, absmax=None):
  """f32 param-shaped `x` -> (codes [*lead, nb, B or B//2], absmax [*lead, nb]) by the op's quantize_blocks."""
  codes, scale = quantize_blocks(to_blocks(x, lay).reshape(-1, lay.block), absmax, map_name)
  return codes.reshape(lay.lead + (lay.nb, codes.shape[-1])), scale.reshape(lay.lead + (lay.nb,))


def dequantize(codes, absmax, lay: Blocking, map_name: str, shape) -> jax.Array:
  x = dequantize_blocks(codes.reshape(-1, codes.shape[-1]), absmax.reshape(-1), map_name)
  return from_blocks(x, lay, shape)


# ----------------------------------------------------------------------------------------------- per param

def _adam_f32(g, p, st: Fp32Moments, *, t, lr, b1, b2, eps, wd):
  """optax.adam(w)'s math and formula order: scale_by_adam -> add_decayed_weights -> scale_by_learning_rate."""
  m = (1 - b1) * g + b1 * st.m
  v = (1 - b2) * (g * g) + b2 * st.v
  m_hat = m / (1 - b1 ** t).astype(m.dtype)
  v_hat = v / (1 - b2 ** t).astype(v.dtype)
  u = m_hat / (jnp.sqrt(v_hat) + eps)
  if wd:
    u = u + wd * p
  return -lr * u, Fp32Moments(m, v)


def _blockwise(g, p, st, *, t, lr, b1, b2, eps, wd, block):
  m_map, v_map = STATE_MAPS[type(st)]
  lay = blocking(g.shape, block)
  pb = jnp.zeros_like(to_blocks(g, lay)) if p is None else to_blocks(p, lay)
  upd, mc, ma, vc, va = blockwise_adam_update(
      to_blocks(g, lay).reshape(-1, block), pb.reshape(-1, block), st.m_codes.reshape(-1, st.m_codes.shape[-1]),
      st.m_absmax.reshape(-1), st.v_codes.reshape(-1, st.v_codes.shape[-1]), st.v_absmax.reshape(-1),
      count=t, learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, m_map=m_map, v_map=v_map)
  new = type(st)(mc.reshape(st.m_codes.shape), ma.reshape(st.m_absmax.shape), vc.reshape(st.v_codes.shape),
                 va.reshape(st.v_absmax.shape))
  return from_blocks(upd, lay, g.shape), new


def _zero_codes(lay: Blocking, map_name: str):
  """The state of an all-zero moment, as quantize_blocks makes it (absmax 0, every code the map's zero code),
  built directly: eager quantization of every param at init would compile a few ops per distinct shape."""
  code = maps.ZERO_CODE[map_name]
  if maps.BITS[map_name] == 4:
    code, width = code | (code << 4), lay.block // 2
  else:
    width = lay.block
  return (jnp.full(lay.lead + (lay.nb, width), code, jnp.uint8), jnp.zeros(lay.lead + (lay.nb,), jnp.float32))


def _init_leaf(kind, shape, block):
  if kind is Fp32Moments:
    return Fp32Moments(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
  m_map, v_map = STATE_MAPS[kind]
  lay = blocking(shape, block)
  if kind is Li4Rank1Moments:
    v_max = tuple(jnp.zeros(tuple(n if a == d else 1 for a, n in enumerate(shape)), jnp.float32)
                  for d in range(len(shape)))
    return Li4Rank1Moments(*_zero_codes(lay, m_map), _zero_codes(lay, v_map)[0], v_max)
  return kind(*_zero_codes(lay, m_map), *_zero_codes(lay, v_map))


def _update_leaf(g, p, st, *, block, **hyper):
  g32 = g.astype(jnp.float32)
  p32 = None if p is None else p.astype(jnp.float32)
  if isinstance(st, Fp32Moments):
    upd, new = _adam_f32(g32, p32, st, **hyper)
  elif isinstance(st, Li4Rank1Moments):
    upd, new = _rank1_adam(g32, p32, st, blocking(g.shape, block), **hyper)
  else:
    upd, new = _blockwise(g32, p32, st, block=block, **hyper)
  return upd.astype(g.dtype), new


# ----------------------------------------------------------------------------------------------- Li et al. v

def _rank1_normalizer(v_max: tuple) -> jax.Array:
  """min over d of v_max[d] (broadcast to the param's shape): Li et al.'s rank-1 (SM3-style) scale."""
  scale = v_max[0]
  for vm in v_max[1:]:
    scale = jnp.minimum(scale, vm)
  return scale


def _rank1_quantize(v: jax.Array, lay: Blocking, v_map: str):
  """v (>= 0, param-shaped) -> (codes in the block layout, v_max): the codes hold v / normalizer (<= 1 since
  each v is <= every max over a set containing it) quantized with absmax 1; a 0 normalizer (an all-zero row)
  stores 0, which dequantizes to exactly 0 whatever its code."""
  v_max = tuple(jnp.max(v, axis=tuple(a for a in range(v.ndim) if a != d), keepdims=True) for d in range(v.ndim))
  scale = _rank1_normalizer(v_max)
  normalized = jnp.where(scale > 0, v / jnp.where(scale > 0, scale, 1.0), 0.0)
  codes, _ = quantize(normalized, lay, v_map, absmax=jnp.ones((math.prod(lay.lead) * lay.nb,), jnp.float32))
  return codes, v_max


def _rank1_moments(st: Li4Rank1Moments, lay: Blocking, shape):
  m_map, v_map = STATE_MAPS[Li4Rank1Moments]
  m = dequantize(st.m_codes, st.m_absmax, lay, m_map, shape)
  ones = jnp.ones(st.v_codes.shape[:-1], jnp.float32)
  v = dequantize(st.v_codes, ones, lay, v_map, shape) * _rank1_normalizer(st.v_max)
  return m, v


def _rank1_adam(g, p, st: Li4Rank1Moments, lay: Blocking, *, t, lr, b1, b2, eps, wd):
  """Li et al.'s step in jnp, in the op's formula order. Not one fused pass: the new v's normalizer is a
  reduction over the whole new v (every row and column), needed before any element can be requantized; m's
  block-wise requantization uses the op's quantize_blocks."""
  m_map, v_map = STATE_MAPS[Li4Rank1Moments]
  m, v = _rank1_moments(st, lay, g.shape)
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * (g * g)
  m_hat = m / (1 - b1 ** t).astype(m.dtype)
  v_hat = v / (1 - b2 ** t).astype(v.dtype)
  u = m_hat / (jnp.sqrt(v_hat) + eps)
  if wd:
    u = u + wd * p
  return -lr * u, Li4Rank1Moments(*quantize(m, lay, m_map), *_rank1_quantize(v, lay, v_map))


# ----------------------------------------------------------------------------------------------- builder

def _check_block_size(block_size, name="block_size"):
  if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2 or (
      block_size & (block_size - 1)):
    raise ValueError(f"{name} must be a power of two >= 2 (blocks of codes per absmax); got {block_size!r}.")


def _check_hyper(b1, b2, eps, weight_decay):
  for name, value in (("b1", b1), ("b2", b2)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f"{name} must be in [0, 1); got {value!r}.")
  if eps < 0:
    raise ValueError(f"eps must be >= 0; got {eps!r}.")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0; got {weight_decay!r}.")


def _mask_leaves(mask, params, treedef):
  if mask is None:
    return [True] * treedef.num_leaves
  tree = mask(params) if callable(mask) else mask
  full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), tree, params)
  return [bool(m) for m in treedef.flatten_up_to(full)]


def lowbit_adam(kind_for: Callable[[tuple], type], learning_rate, *, b1, b2, eps, weight_decay, mask,
                block_size, min_size, fp32_state, min_size_name) -> optax.GradientTransformation:
  """The shared builder: `kind_for(shape)` names the *Moments type of a param that gets quantized state."""
  _check_block_size(block_size)
  _check_hyper(b1, b2, eps, weight_decay)
  if not isinstance(min_size, int) or min_size < 0:
    raise ValueError(f"{min_size_name} must be a non-negative int; got {min_size!r}.")
  b1, b2, eps, weight_decay = float(b1), float(b2), float(eps), float(weight_decay)

  def kind_of(path: str, shape, dtype):
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"params: {path} has dtype {jnp.dtype(dtype).name}; low-bit Adam needs real floating "
                       f"params (integer or complex params are not supported).")
    size = math.prod(shape)
    if size < min_size or (fp32_state is not None and fp32_state(path, tuple(shape))):
      return Fp32Moments
    if block_size > size:
      raise ValueError(f"block_size={block_size} exceeds the {size} elements of param {path} (shape "
                       f"{tuple(shape)}), which gets quantized state ({min_size_name}={min_size}); use a smaller "
                       f"block_size.")
    return kind_for(tuple(shape))

  def init(params):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    moments = [_init_leaf(kind_of(jax.tree_util.keystr(path), p.shape, p.dtype), tuple(p.shape), block_size)
               for path, p in leaves]
    zero = jnp.zeros([], jnp.int32)
    return LowBitAdamState(count=zero, skipped=zero, moments=jax.tree_util.tree_unflatten(treedef, moments))

  def update(updates, state, params=None):
    grads, treedef = jax.tree_util.tree_flatten(updates)
    states = treedef.flatten_up_to(state.moments)
    if params is None:
      if weight_decay:
        raise ValueError("params: weight_decay != 0 needs the params; call update(grads, state, params).")
      param_leaves, decay = [None] * len(grads), [False] * len(grads)
    else:
      param_leaves, decay = treedef.flatten_up_to(params), _mask_leaves(mask, params, treedef)
    t = optax.safe_int32_increment(state.count)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    lr = jnp.asarray(lr, jnp.float32)
    new_updates, new_states = [], []
    for g, p, st, dec in zip(grads, param_leaves, states, decay):
      u, s = _update_leaf(g, p, st, block=block_size, t=t, lr=lr, b1=b1, b2=b2, eps=eps,
                          wd=weight_decay if dec else 0.0)
      new_updates.append(u)
      new_states.append(s)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in grads])) if grads else jnp.asarray(True)
    new_updates = [jnp.where(finite, u, jnp.zeros_like(u)) for u in new_updates]
    new_states = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_states, states)
    new_state = LowBitAdamState(count=jnp.where(finite, t, state.count),
                                skipped=state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
                                moments=jax.tree_util.tree_unflatten(treedef, new_states))
    return jax.tree_util.tree_unflatten(treedef, new_updates), new_state

  return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------------------------- public

_DOC_ARGS = """
  learning_rate: a float or an optax schedule of the step count (called with the count of applied steps).
  b1, b2, eps: Adam's (optax.adam's) hyperparameters.
  weight_decay: decoupled weight decay, as optax.adamw: update = -lr * (m_hat / (sqrt(v_hat) + eps) + wd * p).
  block_size: elements per absmax block, a power of two (ValueError naming block_size otherwise, and at init when
    it exceeds the size of a param that gets quantized state).
  fp32_state: optional predicate(path: str, shape: tuple) -> True keeps that param's moments in f32
    (e.g. `embedding_fp32_state`). Params with fewer than the minimum size keep f32 moments anyway.
  Integer or complex params: ValueError at init. Non-finite gradients: the step is skipped (zero update, state
  unchanged, `skipped` incremented), see the module docstring."""


def adamw_8bit(learning_rate, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, mask=None, block_size=256,
               min_8bit_size=4096, fp32_state: FP32StatePredicate | None = None) -> optax.GradientTransformation:
  """bitsandbytes' 8-bit AdamW (block-wise dynamic quantization of m and v; see the module docstring).
  mask: as optax.adamw's: a tree of bools (or a function of the params returning one) selecting the params that
  are decayed."""
  return lowbit_adam(lambda shape: Dynamic8Moments, learning_rate, b1=b1, b2=b2, eps=eps,
                     weight_decay=weight_decay, mask=mask, block_size=block_size, min_size=min_8bit_size,
                     fp32_state=fp32_state, min_size_name="min_8bit_size")


def adam_8bit(learning_rate, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, block_size=256,
              min_8bit_size=4096, fp32_state: FP32StatePredicate | None = None) -> optax.GradientTransformation:
  """bitsandbytes' 8-bit Adam (as `adamw_8bit` with weight_decay 0 by default; decay, if set, is decoupled and
  applies to every param, as in bitsandbytes' Adam8bit)."""
  return adamw_8bit(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=None,
                    block_size=block_size, min_8bit_size=min_8bit_size, fp32_state=fp32_state)


def adam_4bit(learning_rate, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, mask=None, block_size=128,
              min_4bit_size=4096, fp32_state: FP32StatePredicate | None = None) -> optax.GradientTransformation:
  """Li et al. 2023 4-bit Adam(W): m block-wise (`block_size`, 128 as the paper) with the dynamic-exponent map;
  v of a >= 2-D param with rank-1 normalization and the linear map without zero, computed in jnp (the
  normalizer is a max over the whole NEW v, so dequantize-update-requantize cannot be one block-local pass; see
  `_rank1_adam`); v of a 1-D param block-wise (as their code). mask: as `adamw_8bit`'s."""
  return lowbit_adam(lambda shape: Li4Rank1Moments if len(shape) >= 2 else Li4BlockMoments, learning_rate,
                     b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask, block_size=block_size,
                     min_size=min_4bit_size, fp32_state=fp32_state, min_size_name="min_4bit_size")


def adam_4bit_naive(learning_rate, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, mask=None, block_size=128,
                    min_4bit_size=4096, fp32_state: FP32StatePredicate | None = None) -> optax.GradientTransformation:
  """The naive 4-bit baseline of Li et al.: m as `adam_4bit`, v block-wise with the linear map that INCLUDES
  zero (unstable by design: the zero-point problem). mask: as `adamw_8bit`'s."""
  return lowbit_adam(lambda shape: Naive4Moments, learning_rate, b1=b1, b2=b2, eps=eps,
                     weight_decay=weight_decay, mask=mask, block_size=block_size, min_size=min_4bit_size,
                     fp32_state=fp32_state, min_size_name="min_4bit_size")


for _public in (adamw_8bit, adam_8bit, adam_4bit, adam_4bit_naive):
  if _public.__doc__:  # None under python -OO
    _public.__doc__ += _DOC_ARGS


def _find_state(state) -> LowBitAdamState:
  found = jax.tree.leaves(axes.unwrap(state), is_leaf=lambda x: isinstance(x, LowBitAdamState))
  found = [s for s in found if isinstance(s, LowBitAdamState)]
  if len(found) != 1:
    raise ValueError(f"state: expected exactly one LowBitAdamState inside it, found {len(found)}.")
  return found[0]


def dequantized_moments(state, params):
  """(m, v): f32 trees shaped like `params` from a low-bit Adam state (or any tree holding exactly one, e.g.
  a chain's or `axes.named`'s state), m and v as the next step will read them. For inspection and tests."""
  st = _find_state(state)
  leaves, treedef = jax.tree_util.tree_flatten(axes.unwrap(params))
  ms, vs = [], []
  for p, mom in zip(leaves, treedef.flatten_up_to(st.moments)):
    shape = tuple(p.shape)
    if not isinstance(mom, Fp32Moments):
      block_size = mom.m_codes.shape[-1] * (2 if isinstance(mom, _FOUR_BIT) else 1)
    if isinstance(mom, Fp32Moments):
      m, v = mom.m, mom.v
    elif isinstance(mom, Li4Rank1Moments):
      m, v = _rank1_moments(mom, blocking(shape, block_size), shape)
    else:
      m_map, v_map = STATE_MAPS[type(mom)]
      lay = blocking(shape, block_size)
      m = dequantize(mom.m_codes, mom.m_absmax, lay, m_map, shape)
      v = dequantize(mom.v_codes, mom.v_absmax, lay, v_map, shape)
    ms.append(m)
    vs.append(v)
  return jax.tree_util.tree_unflatten(treedef, ms), jax.tree_util.tree_unflatten(treedef, vs)
