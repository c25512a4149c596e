"""Computational invariance for pre-norm RMSNorm transformers (QuaRot / SliceGPT): Hadamard matrices, a fast
Walsh-Hadamard transform, RMSNorm-gain folding and an orthogonal rotation of the residual stream -- by path rules,
on any NNX model, without editing model code.

    model = rotation.rotate(nnx.clone(model))                  # Hadamard Q, default (Llama-family) rules
    model = rotation.rotate(model, hadamard_rotation(d, key=jax.random.key(0)))   # QuaRot's randomized Hadamard
    model = rotation.rotate(model, orthogonal_rotation(pca_basis))                 # any orthogonal Q (SliceGPT)

Hadamard matrices (`hadamard(n)`, orthonormal): n = m * 2^k with H_n = H_m (x) H_{2^k}, H_{2^k} Sylvester's and
H_m a Paley matrix -- Paley I for m = q + 1 (q prime, q = 3 mod 4: 12, 20, 24, 32, 44, ...), Paley II for
m = 2(q + 1) (q prime, q = 1 mod 4: 12, 28, 36, 60, ...). The smallest such m is used: 576 = 36 * 16
(Paley II, q = 17), 1536 = 12 * 128 (Paley I, q = 11). `fwht(x, axis)` is `x @ hadamard(n)` along `axis` in
O(n log n) for the 2^k factor (butterflies by reshapes) plus a dense m x m contraction. A size with no such
factorization (e.g. 6, 7, 18) is a ValueError naming the argument and the size.

The invariance (Ashkboos et al., SliceGPT; QuaRot). With x the residual stream (row vectors, Flax [in, out]
kernels) and an orthogonal Q (Q Q^T = I):
1. Fold: an RMSNorm's output is x_hat * g = x_hat diag(g); each linear reading it gets W <- diag(g) W and the
   gain becomes 1 (`fold_norms`): q/k/v after the attention norm, gate/up after the MLP norm, an untied head
   after the final norm.
2. Rotate (`rotate`, which folds first): embedding rows E <- E Q, every linear reading the stream W <- Q^T W
   (q/k/v, gate/up, an untied head), every linear writing into it W <- W Q and its bias b <- b Q (o, down).
   The stream becomes x Q everywhere; a unit-gain RMSNorm commutes with Q (||x Q|| = ||x||, eps included), so
   the logits are unchanged (exact in real arithmetic; f32 rounding gives ~1e-6 relative on SmolLM2).

Tied embeddings (SmolLM2): the head is the embedding transposed, logits = norm(x) diag(g) E^T. Rotation alone
keeps the tie exact: the rotated head Q^T E^T is the transpose of the rotated embedding E Q. The final
norm's gain cannot be folded into a tied head without untying it (diag(g) E^T is no longer the embedding's
transpose), and untying needs the model to read a separate head parameter -- a model-floor change (for
`efficient.models.llama`: build with `tie_embeddings=False` and copy E^T into `lm_head`, then these rules fold
it exactly). So for a tied head the final norm keeps its gain and, on rotation, is swapped for
`RotatedGainRMSNorm`: unit-gain RMSNorm, then y <- ((y Q^T) * g) Q -- un-rotate, scale, re-rotate -- which is
exact and keeps the embedding table shared (no extra vocab x d parameter). Its cost is two O(d log d) fast
Walsh-Hadamard transforms per token for a Hadamard Q (two d x d products for a dense Q), next to the d x vocab
head. The linears themselves all see unit-gain inputs, so QuaRot-style quantization of q/k/v/gate/up/o/down is
unaffected.

Rules (`ResidualRules`, full-match regexes on module / parameter paths, as `efficient.quant.quantize_model`):
which linear layers read the stream (`readers`), write into it (`writers`), or stay out of it (`ignore`); which
parameters are embedding tables (`embeddings`, [rows, d]) and the untied head (`head`, [d, vocab]; None: tied);
and which RMSNorm feeds which readers (`norms`). Every rule must match something, every linear layer and every
RMSNorm of the model must be covered (an uncovered one would silently break the invariance), and widths must
equal the rotation's size -- each a ValueError before anything is changed. The defaults are the paths of
`efficient.models.llama`, tied or not (the default head rule 'lm_head' means "tied" where no such parameter
exists).

Not here yet (issue 14 item 1): SliceGPT's PCA basis and slicing, and the online activation Hadamard that feeds
W4A4 / W8A8 matmuls where a rotation cannot be fused (down_proj's input, the attention values / heads).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient import calibration, nn
from pallas_kernels.rms_norm import rms_norm as rms_norm_op

HEAD = "<head>"
"""A `ResidualRules.norms` consumer meaning "the output head" (the `head` parameter, or the tied embedding)."""

DEFAULT_HEAD = "lm_head"
"""`ResidualRules.head`'s default: the parameter 'lm_head' where the model has one, else a tied head."""

_HIGHEST = jax.lax.Precision.HIGHEST


# --- Hadamard matrices ------------------------------------------------------------------------------------------

def _is_prime(q: int) -> bool:
  return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> np.ndarray:
  """Q[i, j] = chi(j - i) over GF(q), q prime, chi the quadratic character (chi(0) = 0)."""
  chi = -np.ones(q, np.int64)
  chi[0] = 0
  chi[(np.arange(1, q) ** 2) % q] = 1
  idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
  return chi[idx]


def _paley_kind(m: int) -> str | None:
  """'sylvester', 'paley1', 'paley2' or None: how a +-1 Hadamard matrix of order m is built here."""
  if m >= 1 and m & (m - 1) == 0:
    return "sylvester"
  if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
    return "paley1"
  if m % 4 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
    return "paley2"
  return None


@functools.lru_cache(maxsize=None)
def _pm1_hadamard(m: int) -> np.ndarray:
  """The unnormalized (+-1) Hadamard matrix of order m (H H^T = m I), float64, read-only."""
  kind = _paley_kind(m)
  if kind == "sylvester":
    h = np.ones((1, 1))
    while h.shape[0] < m:
      h = np.block([[h, h], [h, -h]])
  elif kind == "paley1":  # q = m - 1 = 3 mod 4: Q antisymmetric, S = [[0, 1^T], [-1, Q]] skew, H = I + S
    q = m - 1
    s = np.zeros((m, m))
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    h = np.eye(m) + s
  elif kind == "paley2":  # q = m/2 - 1 = 1 mod 4: Q symmetric, S = [[0, 1^T], [1, Q]] symmetric conference matrix
    q = m // 2 - 1
    s = np.zeros((q + 1, q + 1))
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, 1, _jacobsthal(q)
    h = np.kron(s, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(q + 1), np.array([[1, -1], [-1, -1]]))
  else:
    raise ValueError(f"no Hadamard construction of order {m} here.")
  h = np.asarray(h, np.float64)
  h.setflags(write=False)
  return h


def hadamard_factors(n, *, name: str = "n") -> tuple[int, int]:
  """(m, k) with n = m * 2^k and a Paley (or trivial, m = 1) Hadamard matrix of order m, m as small as possible.
  ValueError naming `name` and the size when there is none."""
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"{name} must be a positive int (a Hadamard size), got {n!r}.")
  n = int(n)
  twos = (n & -n).bit_length() - 1
  odd = n >> twos
  if odd == 1:
    return 1, twos
  for j in range(2, twos + 1):
    if _paley_kind(odd << j) is not None:
      return odd << j, twos - j
  raise ValueError(f"{name}={n} (= {odd} * 2^{twos}) has no Hadamard factorization n = m * 2^k here: m must be a "
                   f"power of two, q + 1 (q prime, q = 3 mod 4) or 2(q + 1) (q prime, q = 1 mod 4), e.g. 12, 20, "
                   f"28, 36, 44, 60; 576 = 36 * 16 and 1536 = 12 * 128 work.")


def hadamard(n: int, *, dtype=jnp.float32) -> jax.Array:
  """The orthonormal Hadamard matrix of order n (H H^T = I): H_m (x) H_{2^k} / sqrt(n), see `hadamard_factors`."""
  m, k = hadamard_factors(n, name="n")
  return jnp.asarray(np.kron(_pm1_hadamard(m), _pm1_hadamard(2 ** k)) / math.sqrt(n), dtype)


def fwht(x, axis: int = -1, *, transpose: bool = False) -> jax.Array:
  """`x @ hadamard(n)` along `axis` (n = x.shape[axis]; `transpose`: `x @ hadamard(n).T`, the inverse), in
  O(n log n): Sylvester butterflies over the 2^k factor, a dense m x m contraction for the Paley factor.
  Float x keeps its dtype (f32 accumulation in the dense part); integer x is computed in f32."""
  x = jnp.asarray(x)
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"fwht: axis={axis} is out of range for x of shape {x.shape}.")
  axis = axis % x.ndim
  hadamard_factors(x.shape[axis], name=f"fwht: x.shape[{axis}]")
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(jnp.float32)
  return _fwht(x, axis=axis, transpose=bool(transpose))


@functools.partial(jax.jit, static_argnames=("axis", "transpose"))
def _fwht(x, *, axis: int, transpose: bool):
  n = x.shape[axis]
  m, k = hadamard_factors(n)
  y = jnp.moveaxis(x, axis, -1)
  lead = y.shape[:-1]
  p = 2 ** k
  for i in range(k):  # one H_2 per bit of the 2^k index; the order does not matter (Kronecker factors commute)
    y = y.reshape(lead + (m, 2 ** i, 2, p >> (i + 1)))
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2)
  y = y.reshape(lead + (m, p))
  if m > 1:
    h = _pm1_hadamard(m)
    h = jnp.asarray(h.T if transpose else h, jnp.float32)  # Sylvester's factor is symmetric; Paley's need not be
    y = jnp.einsum("...ab,ac->...cb", y, h, precision=_HIGHEST,
                   preferred_element_type=jnp.float32).astype(x.dtype)
  y = (y * (1.0 / math.sqrt(n))).astype(x.dtype).reshape(lead + (n,))
  return jnp.moveaxis(y, -1, axis)


# --- orthogonal rotations ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Rotation:
  """An orthogonal d x d matrix Q, applied as `x @ Q` along an axis: a (randomized) Hadamard Q = diag(signs) H,
  applied by `fwht`, or a dense `matrix`. Build with `hadamard_rotation` or `orthogonal_rotation`."""
  size: int
  signs: jax.Array | None = None
  matrix: jax.Array | None = None

  def apply(self, x, axis: int = -1) -> jax.Array:
    """x @ Q along `axis` (f32)."""
    return self._apply(x, axis, transpose=False)

  def apply_transpose(self, x, axis: int = -1) -> jax.Array:
    """x @ Q^T along `axis` (f32) -- the inverse of `apply`."""
    return self._apply(x, axis, transpose=True)

  def _apply(self, x, axis: int, *, transpose: bool) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if not -x.ndim <= axis < x.ndim or x.shape[axis] != self.size:
      raise ValueError(f"Rotation of size {self.size}: x of shape {x.shape} has no axis {axis} of that size.")
    axis = axis % x.ndim
    if self.matrix is not None:
      return _apply_dense(x, self.matrix, axis=axis, transpose=transpose)
    return _apply_hadamard(x, self.signs, axis=axis, transpose=transpose)

  def dense(self) -> jax.Array:
    """Q as a [d, d] f32 array."""
    return self.apply(jnp.eye(self.size, dtype=jnp.float32))


@functools.partial(jax.jit, static_argnames=("axis", "transpose"))
def _apply_dense(x, q, *, axis: int, transpose: bool):
  y = jnp.matmul(jnp.moveaxis(x, axis, -1), q.T if transpose else q, precision=_HIGHEST)
  return jnp.moveaxis(y, -1, axis)


@functools.partial(jax.jit, static_argnames=("axis", "transpose"))
def _apply_hadamard(x, signs, *, axis: int, transpose: bool):
  y = jnp.moveaxis(x, axis, -1)
  last = y.ndim - 1
  if transpose:  # x Q^T = (x H^T) diag(s)
    y = _fwht(y, axis=last, transpose=True) * signs
  else:  # x Q = (x diag(s)) H
    y = _fwht(y * signs, axis=last, transpose=False)
  return jnp.moveaxis(y, -1, axis)


def hadamard_rotation(size: int, *, key=None) -> Rotation:
  """Q = diag(s) H_size: s = 1 (plain Hadamard) or, with a jax `key`, random signs (QuaRot's randomized
  Hadamard, whose incoherence holds with high probability for any weights)."""
  hadamard_factors(size, name="size")
  signs = jnp.ones((size,), jnp.float32) if key is None else \
      jax.random.rademacher(key, (size,), dtype=jnp.float32)
  return Rotation(size=int(size), signs=signs)


def orthogonal_rotation(matrix, *, atol: float = 1e-4) -> Rotation:
  """A dense orthogonal Q (e.g. SliceGPT's PCA basis); ValueError unless square with max|Q^T Q - I| <= atol."""
  q = jnp.asarray(matrix, jnp.float32)
  if q.ndim != 2 or q.shape[0] != q.shape[1]:
    raise ValueError(f"orthogonal_rotation: matrix must be square [d, d], got shape {tuple(q.shape)}.")
  error = float(jnp.max(jnp.abs(jnp.matmul(q.T, q, precision=_HIGHEST) - jnp.eye(q.shape[0]))))
  if not error <= atol:
    raise ValueError(f"orthogonal_rotation: matrix is not orthogonal: max|Q^T Q - I| = {error:.3g} > atol={atol}.")
  return Rotation(size=int(q.shape[0]), matrix=q)


def incoherence(w) -> float:
  """max|w| / rms(w) over the whole array (QuaRot's / QuIP's incoherence measure: lower is easier to quantize)."""
  w = np.asarray(w, np.float64)
  return float(np.abs(w).max() / np.sqrt(np.mean(w ** 2)))


# --- the tied head's final norm ---------------------------------------------------------------------------------

class RotationState(nnx.Variable):
  """A fixed rotation inside a module (signs of a Hadamard, or a dense Q): not a trainable parameter."""


def rotated_gain_rms_norm(x, scale, *, eps: float, implementation=None, signs=None, matrix=None):
  """RMSNorm with unit gain, then the gain `scale` applied in the un-rotated basis: ((y Q^T) * scale) Q, with
  Q = diag(signs) H (a Hadamard, by `fwht`) or the dense `matrix`."""
  dtype = x.dtype
  y = rms_norm_op(x, jnp.ones(x.shape[-1:], dtype), eps=eps, implementation=implementation)
  rotation = Rotation(size=x.shape[-1], signs=signs, matrix=matrix)
  y = rotation.apply(rotation.apply_transpose(y) * scale.astype(jnp.float32))
  return y.astype(dtype)


class RotatedGainRMSNorm(nnx.Module):
  """What `rotate` puts in place of an RMSNorm whose gain cannot be folded (the final norm of a tied head):
  the same function of the rotated stream as the original norm of the un-rotated one, followed by Q.
  `scale` keeps the original gain (in the un-rotated basis)."""

  def __init__(self, norm: "nn.RMSNorm | RotatedGainRMSNorm", rotation: Rotation):
    self.eps = norm.eps
    self.implementation = norm.implementation
    names = tuple(norm.scale.get_metadata().get("out_sharding") or ("embed",))
    self.scale = nn.logical_param(jnp.array(norm.scale[...]), names)
    self.signs = None if rotation.signs is None else RotationState(jnp.asarray(rotation.signs))
    self.matrix = None if rotation.matrix is None else RotationState(jnp.asarray(rotation.matrix))

  def rotation(self) -> Rotation:
    """The Q this norm re-rotates by."""
    return Rotation(size=self.scale[...].shape[0], signs=None if self.signs is None else self.signs[...],
                    matrix=None if self.matrix is None else self.matrix[...])

  def __call__(self, x):
    return rotated_gain_rms_norm(x, self.scale[...], eps=self.eps, implementation=self.implementation,
                                 signs=None if self.signs is None else self.signs[...],
                                 matrix=None if self.matrix is None else self.matrix[...])


# --- rules ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ResidualRules:
  """Where the residual stream is read and written, as full-match regexes (re.fullmatch) on paths.

  embeddings  parameter paths of tables [rows, d] whose rows enter the stream (E <- E Q)
  readers     linear-layer paths whose input is the (normed) stream, contracted over d (W <- Q^T W)
  writers     linear-layer paths whose output is added to the stream, d the output (W <- W Q, b <- b Q)
  head        parameter path of an untied output head [d, vocab] (W <- Q^T W), or None: the head is the first
              embedding table transposed (tied), rotated with it. The default, `DEFAULT_HEAD` ('lm_head'), is
              the untied head where the model has that parameter and a tied head where it has none; any other
              regex must match exactly one parameter
  norms       (RMSNorm path regex, consumers) pairs: consumers is a regex (backreferences to the norm's groups
              allowed) of the reader paths the norm feeds, or `HEAD`; the first matching pair wins
  ignore      module paths (linear layers or RMSNorms) outside the residual stream, left as they are
  Defaults: `efficient.models.llama`'s paths.
  """
  embeddings: tuple[str, ...] = ("embedding",)
  readers: tuple[str, ...] = (r".*/attention/(q|k|v)", r".*/mlp/(gate|up)")
  writers: tuple[str, ...] = (r".*/attention/o", r".*/mlp/down")
  head: str | None = DEFAULT_HEAD
  norms: tuple[tuple[str, str], ...] = ((r"(.*)/attention_norm", r"\1/attention/(q|k|v)"),
                                        (r"(.*)/mlp_norm", r"\1/mlp/(gate|up)"),
                                        ("final_norm", HEAD))
  ignore: tuple[str, ...] = ()




@dataclasses.dataclass
class _Plan:
  width: int
  embeddings: dict          # path -> nnx.Variable
  readers: dict             # path -> module
  writers: dict             # path -> module
  head: tuple | None        # (path, nnx.Variable) or None (tied)
  norms: dict               # norm path -> (module, [reader paths] or HEAD)


def _compile_all(patterns, what: str):
  if isinstance(patterns, str):
    raise ValueError(f"ResidualRules.{what} must be a tuple of regexes, got the string {patterns!r}.")
  out = []
  for i, pattern in enumerate(patterns):
    try:
      out.append((pattern, re.compile(pattern)))
    except (re.error, TypeError) as e:
      raise ValueError(f"ResidualRules.{what}[{i}] {pattern!r} is not a valid regular expression: {e}") from e
  return out


def _match(compiled, paths, what: str, kind: str) -> list[str]:
  """Paths matched in full by any regex; a regex matching none is a ValueError naming it."""
  paths = list(paths)
  hit = []
  for i, (pattern, regex) in enumerate(compiled):
    found = [p for p in paths if regex.fullmatch(p)]
    if not found:
      raise ValueError(f"ResidualRules.{what}[{i}] {pattern!r} matches no {kind} path in full (re.fullmatch); "
                       f"the model's {kind} paths look like {paths[:4]}.")
    hit.extend(p for p in found if p not in hit)
  return sorted(hit, key=calibration.natural_key)


def plan(model: nnx.Module, rules: ResidualRules | None = None, *, width: int | None = None) -> _Plan:
  """Resolves `rules` against `model` and checks everything `fold_norms` / `rotate` rely on (nothing changed)."""
  rules = ResidualRules() if rules is None else rules
  if not isinstance(rules, ResidualRules):
    raise ValueError(f"rules must be a ResidualRules, got {type(rules).__name__}.")
  params = calibration.param_paths(model)
  linears = calibration.einsum_modules(model)
  norm_modules = calibration.einsum_modules(model, types=(nn.RMSNorm, RotatedGainRMSNorm))
  if not linears:
    raise ValueError(f"model ({type(model).__name__}) has no linear layer for the rotation rules to match.")
  emb_paths = _match(_compile_all(rules.embeddings, "embeddings"), params, "embeddings", "parameter")
  reader_paths = _match(_compile_all(rules.readers, "readers"), linears, "readers", "linear layer")
  writer_paths = _match(_compile_all(rules.writers, "writers"), linears, "writers", "linear layer")
  ignore = _compile_all(rules.ignore, "ignore")
  ignored = _match(ignore, list(linears) + list(norm_modules), "ignore", "linear layer or RMSNorm") if ignore else []
  both = sorted(set(reader_paths) & set(writer_paths))
  if both:
    raise ValueError(f"linear layers {both} are matched by both ResidualRules.readers and .writers.")
  unclassified = [p for p in linears if p not in reader_paths and p not in writer_paths and p not in ignored]
  if unclassified:
    raise ValueError(f"linear layers {unclassified} are neither readers nor writers of the residual stream under "
                     f"the rules (nor ignored): rotating around them would change the model. Add them to "
                     f"ResidualRules.readers / writers / ignore.")
  embeddings = {p: params[p] for p in emb_paths}
  shapes = {p: tuple(v[...].shape) for p, v in embeddings.items()}
  model_width = shapes[emb_paths[0]][-1]
  if width is None:
    width = model_width
  elif width != model_width:
    raise ValueError(f"the rotation has size {width}; the residual width is {model_width} (embedding "
                     f"{emb_paths[0]!r} of shape {shapes[emb_paths[0]]}).")
  for p, shape in shapes.items():
    if len(shape) != 2 or shape[-1] != width:
      raise ValueError(f"embedding {p!r} has shape {shape}; a table [rows, {width}] (the residual width) is needed.")
  for p in reader_paths:
    if calibration.matrix_shape(linears[p])[0] != width:
      raise ValueError(f"reader {p!r} contracts {calibration.matrix_shape(linears[p])[0]} features (kernel "
                       f"{calibration.kernel_shape(linears[p])}, equation {calibration.equation_of(linears[p])!r}); "
                       f"the residual width is {width}.")
  for p in writer_paths:
    out = calibration.matrix_shape(linears[p])[1]
    bias = calibration.bias_of(linears[p])
    if out != width or (bias is not None and int(np.prod(bias[...].shape)) != width):
      raise ValueError(f"writer {p!r} outputs {out} features (kernel {calibration.kernel_shape(linears[p])}); the "
                       f"residual width is {width}.")
  head = None
  if rules.head is not None and not (rules.head == DEFAULT_HEAD and DEFAULT_HEAD not in params):
    found = _match(_compile_all((rules.head,), "head"), params, "head", "parameter")
    if len(found) != 1:
      raise ValueError(f"ResidualRules.head {rules.head!r} matches {len(found)} parameters {found}; one is needed.")
    shape = tuple(params[found[0]][...].shape)
    if len(shape) != 2 or shape[0] != width:
      raise ValueError(f"head {found[0]!r} has shape {shape}; a matrix [{width}, vocab] is needed.")
    head = (found[0], params[found[0]])
  # Norms: every RMSNorm is fed by a rule (or ignored); consumers resolve to readers, each fed at most once.
  norm_rules = list(rules.norms)
  compiled = []
  for i, rule in enumerate(norm_rules):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ValueError(f"ResidualRules.norms[{i}] must be a (norm path regex, consumers) pair; got {rule!r}.")
    compiled.append(_compile_all((rule[0],), f"norms[{i}]")[0] + (rule[1],))
  norms, fed_by, used = {}, {}, set()
  for path, module in norm_modules.items():
    if path in ignored:
      continue
    for i, (pattern, regex, consumers) in enumerate(compiled):
      found = regex.fullmatch(path)
      if not found:
        continue
      used.add(i)
      if consumers == HEAD:
        if isinstance(module, RotatedGainRMSNorm) and head is not None:
          raise ValueError(f"{path!r} is a RotatedGainRMSNorm (the final norm of a tied head, rotated before), "
                           f"but the rules name an untied head {head[0]!r}.")
        norms[path] = (module, HEAD)
        break
      if isinstance(module, RotatedGainRMSNorm):
        raise ValueError(f"{path!r} is a RotatedGainRMSNorm (a tied head's final norm after a rotation); "
                         f"ResidualRules.norms[{i}] maps it to readers {consumers!r}, but it can only feed the "
                         f"tied head (HEAD).")
      target = found.expand(consumers)
      regex_c = _compile_all((target,), f"norms[{i}] consumers")[0][1]
      readers = [p for p in reader_paths if regex_c.fullmatch(p)]
      others = [p for p in linears if regex_c.fullmatch(p) and p not in reader_paths]
      if not readers or others:
        raise ValueError(f"ResidualRules.norms[{i}]: norm {path!r} feeds {target!r}, which matches readers "
                         f"{readers} and non-readers {others}; it must match readers only (at least one).")
      for p in readers:
        if p in fed_by:
          raise ValueError(f"reader {p!r} is fed by two norms, {fed_by[p]!r} and {path!r}.")
        fed_by[p] = path
      norms[path] = (module, readers)
      break
    else:
      raise ValueError(f"RMSNorm {path!r} is matched by no ResidualRules.norms pattern (nor ignored): its gain "
                       f"would not commute with the rotation.")
    if module.scale[...].shape != (width,):
      raise ValueError(f"RMSNorm {path!r} has a gain of shape {module.scale[...].shape}; the residual width is "
                       f"{width}.")
  for i, (pattern, _, _) in enumerate(compiled):
    if i not in used:
      raise ValueError(f"ResidualRules.norms[{i}] {pattern!r} matches no RMSNorm path in full (re.fullmatch); the "
                       f"model's RMSNorm paths look like {list(norm_modules)[:4]}.")
  return _Plan(width=width, embeddings=embeddings, readers={p: linears[p] for p in reader_paths},
               writers={p: linears[p] for p in writer_paths}, head=head, norms=norms)


def _set(variable: nnx.Variable, value) -> None:
  variable[...] = jnp.asarray(value).astype(variable[...].dtype)


class _KernelSpec(NamedTuple):
  """What `calibration`'s matrix view needs of a layer (its equation and kernel shape), hashable, so one jitted
  update serves every layer of that shape."""
  equation: str
  kernel_shape: tuple


def _kernel_spec(module) -> _KernelSpec:
  return _KernelSpec(calibration.equation_of(module), tuple(calibration.kernel_shape(module)))


@functools.partial(jax.jit, static_argnames=("spec", "axis"))
def _update_kernel(kernel, gain, signs, matrix, *, spec: _KernelSpec, axis: int):
  """The kernel as its [in, out] matrix, rows times `gain` (None: as is), then `@ Q` along `axis` of the matrix
  (no rotation when `signs` and `matrix` are None), back in the kernel's shape and dtype: one dispatch per layer."""
  w = calibration.kernel_as_matrix(spec, kernel).astype(jnp.float32)
  if gain is not None:
    w = w * gain.astype(jnp.float32)[:, None]
  if signs is not None or matrix is not None:
    w = Rotation(size=w.shape[axis], signs=signs, matrix=matrix).apply(w, axis=axis)
  return calibration.matrix_to_kernel(spec, w).astype(kernel.dtype)


def _transform(model: nnx.Module, p: _Plan, rotation: Rotation | None) -> list[str]:
  """Folds every foldable gain (and with `rotation`, rotates) in one pass over the planned layers."""
  signs, matrix = (None, None) if rotation is None else (rotation.signs, rotation.matrix)
  gains, folded = {}, []
  for path, (norm, consumers) in p.norms.items():
    if consumers == HEAD and p.head is None:
      continue  # a tied head's final norm keeps its gain (see the module docstring)
    gain = norm.scale[...].astype(jnp.float32)
    if bool(jnp.all(gain == 1)):
      continue  # nothing to fold (e.g. folded before)
    for reader in ([HEAD] if consumers == HEAD else consumers):
      gains[reader] = gain
    folded.append(path)
  for path, module in p.readers.items():
    if path in gains or rotation is not None:
      module.kernel[...] = _update_kernel(module.kernel[...], gains.get(path), signs, matrix,
                                          spec=_kernel_spec(module), axis=0)
  if p.head is not None and (HEAD in gains or rotation is not None):
    head = p.head[1][...].astype(jnp.float32)
    head = head * gains[HEAD][:, None] if HEAD in gains else head
    _set(p.head[1], head if rotation is None else rotation.apply(head, axis=0))
  if rotation is not None:
    for variable in p.embeddings.values():
      _set(variable, rotation.apply(variable[...], axis=-1))
    for module in p.writers.values():
      module.kernel[...] = _update_kernel(module.kernel[...], None, signs, matrix, spec=_kernel_spec(module),
                                          axis=1)
      bias = calibration.bias_of(module)
      if bias is not None:
        shape = bias[...].shape
        _set(bias, rotation.apply(bias[...].reshape(-1), axis=0).reshape(shape))
    for path, (norm, consumers) in p.norms.items():
      if consumers != HEAD or p.head is not None:
        continue
      if isinstance(norm, RotatedGainRMSNorm):  # rotated before by Q1: the stream is now x Q1 Q
        composed = rotation.apply(norm.rotation().dense(), axis=-1)
        calibration.set_module(model, path, RotatedGainRMSNorm(norm, Rotation(size=p.width, matrix=composed)))
      elif not bool(jnp.all(norm.scale[...] == 1)):
        calibration.set_module(model, path, RotatedGainRMSNorm(norm, rotation))
  for path in folded:
    norm = p.norms[path][0]
    _set(norm.scale, jnp.ones(norm.scale[...].shape, jnp.float32))
  return folded


def fold_norms(model: nnx.Module, rules: ResidualRules | None = None) -> list[str]:
  """Folds every RMSNorm gain into the readers it feeds (W <- diag(g) W, g <- 1), in place; the logits are
  unchanged. Returns the paths of the norms folded (those with a gain other than 1). A tied head's final norm
  keeps its gain (see the module docstring).
  `rules`: `ResidualRules` (None: the defaults)."""
  return _transform(model, plan(model, rules), None)


def rotate(model: nnx.Module, rotation: Rotation | jax.Array | np.ndarray | None = None, *,
           rules: ResidualRules | None = None) -> nnx.Module:
  """Folds the RMSNorm gains, then rotates the residual stream by Q (in place; returns `model`): E <- E Q,
  readers W <- Q^T diag(g) W, writers W <- W Q (bias b <- b Q), an untied head W <- Q^T diag(g) W; a tied
  head's final norm is swapped for `RotatedGainRMSNorm`. The logits are unchanged. `rotation`: a `Rotation`, a
  dense orthogonal [d, d] array, or None (the plain Hadamard of the residual width d). Every check runs before
  any change."""
  if rotation is None:
    p = plan(model, rules)
    rotation = hadamard_rotation(p.width)
  else:
    if not isinstance(rotation, Rotation):
      rotation = orthogonal_rotation(rotation)
    p = plan(model, rules, width=rotation.size)
  _transform(model, p, rotation)
  return model


__all__ = ["HEAD", "ResidualRules", "Rotation", "RotatedGainRMSNorm", "RotationState", "DEFAULT_HEAD", "fold_norms",
           "fwht", "hadamard", "hadamard_factors", "hadamard_rotation", "incoherence", "orthogonal_rotation", "plan",
           "rotate", "rotated_gain_rms_norm"]
