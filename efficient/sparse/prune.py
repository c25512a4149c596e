"""Pruning [in, out] weight matrices (Flax layout) and whole models by path rules.

- `magnitude`: prune the smallest |W| of the layer (per-layer threshold, the baseline of Wanda/SparseGPT).
- `wanda` (Sun et al. 2023): score |W_ij| * ||X_i||, compared per output (the paper's per-output-row group;
  an output is a column of a Flax [in, out] kernel). ||X_i|| comes from the calibration Hessian's diagonal
  (H = 2XᵀX/n, so sqrt(H_ii) is ||X_i|| up to a constant that does not change any ranking).
- `sparsegpt` (Frantar & Alistarh 2023): OBS reconstruction. Inputs are processed in order; pruning input i's
  weights adds err_i * U[i, i:] to the later inputs' weights (U the upper Cholesky factor of H⁻¹, i.e. the
  row of H⁻¹ after eliminating inputs < i), which keeps X W close to the dense output. The mask is chosen per
  block of `block_size` inputs from w² / U_ii² (adaptive mask selection), or per group of m inputs for N:M;
  updates to later blocks are batched once per block (lazy batch updates), which is exact.
- `prune_model(model, rules, calibration_data)`: rules (regex matching a path like 'blocks/3/mlp/gate' in full
  -> PruneConfig, or None to keep the layer dense; first match wins) choose a method per linear layer -- any
  `efficient.nn.Einsum`, `nnx.Linear` or `nnx.Einsum`, so a user's NNX model works unchanged; the kernel is
  pruned in place and a bias is left as it is (y = x (W * mask) + b); Hessians are captured once by `efficient.calibration.capture_hessians` (the same code
  GPTQ uses) from the dense model ("one-shot": every layer sees dense-model inputs, not its pruned
  predecessors' -- the papers feed pruned activations forward layer by layer, which we do not do here).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from efficient import calibration
from efficient.sparse import masks as masks_lib

METHODS = ("magnitude", "wanda", "sparsegpt")
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """How to prune one projection: `method`, unstructured `sparsity` or an N:M pattern `nm=(n, m)`."""
  method: str = "magnitude"
  sparsity: float = 0.5         # unstructured fraction pruned (ignored when nm is set)
  nm: tuple[int, int] | None = None
  block_size: int = 128         # SparseGPT: inputs per mask-selection block and lazy update
  damping: float = 0.01         # SparseGPT: added to H's diagonal, as a fraction of its mean

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r} is unknown; choose one of {METHODS}.")
    masks_lib.check_sparsity(self.sparsity)
    if self.nm is not None:
      if not isinstance(self.nm, (tuple, list)) or len(self.nm) != 2:
        raise ValueError(f"nm={self.nm!r} must be a pair (n, m), e.g. (2, 4).")
      masks_lib.check_nm(*self.nm)
      object.__setattr__(self, "nm", (int(self.nm[0]), int(self.nm[1])))
    if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
      raise ValueError(f"block_size={self.block_size!r} must be a positive int.")
    if self.nm is not None and self.block_size % self.nm[1]:
      raise ValueError(f"block_size={self.block_size} must be a multiple of m={self.nm[1]} for N:M SparseGPT.")
    if not 0 <= self.damping:
      raise ValueError(f"damping={self.damping!r} must be >= 0.")

  @property
  def needs_calibration(self) -> bool:
    return self.method != "magnitude"

  @property
  def pattern(self) -> str:
    return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity:.0%}"


def _check_weight(w) -> None:
  if w.ndim != 2 or 0 in w.shape:
    raise ValueError(f"w must be a non-empty [in, out] matrix; got shape {tuple(w.shape)}.")


def _check_hessian(hessian, in_features: int) -> None:
  if tuple(hessian.shape) != (in_features, in_features):
    raise ValueError(f"hessian must be [in, in] = {(in_features, in_features)}; got {tuple(hessian.shape)}.")


@functools.partial(jax.jit, static_argnames=("sparsity", "nm", "per_output"))  # one dispatch per layer shape
def _mask_from_scores(scores, sparsity, nm, *, per_output: bool):
  if nm is not None:
    return masks_lib.nm_mask(scores, *nm)
  return masks_lib.unstructured_mask(scores, sparsity, per_output=per_output)


def _nm_key(nm):
  """nm as a hashable (n, m) for jit's static arguments (validated by the mask functions)."""
  if nm is None:
    return None
  if not isinstance(nm, (tuple, list)) or len(nm) != 2:
    raise ValueError(f"nm={nm!r} must be a pair (n, m), e.g. (2, 4).")
  return tuple(nm)


def magnitude(w, *, sparsity: float = 0.5, nm=None):
  """(pruned w, kept mask): the smallest |w| of the whole layer (or of each N:M group) set to zero."""
  _check_weight(w)
  mask = _mask_from_scores(jnp.abs(w.astype(jnp.float32)), sparsity, _nm_key(nm), per_output=False)
  return jnp.where(mask, w, 0).astype(w.dtype), mask


def wanda(w, hessian, *, sparsity: float = 0.5, nm=None):
  """(pruned w, kept mask) by Wanda's score |w_ij| * ||X_i||, compared within each output (column)."""
  _check_weight(w)
  _check_hessian(hessian, w.shape[0])
  norms = jnp.sqrt(jnp.maximum(jnp.diag(hessian.astype(jnp.float32)), 0))
  scores = jnp.abs(w.astype(jnp.float32)) * norms[:, None]
  mask = _mask_from_scores(scores, sparsity, _nm_key(nm), per_output=True)
  return jnp.where(mask, w, 0).astype(w.dtype), mask


def sparsegpt(w, hessian, *, sparsity: float = 0.5, nm=None, block_size: int = 128, damping: float = 0.01):
  """(pruned and reconstructed w, kept mask) by SparseGPT with the [in, in] calibration `hessian`."""
  _check_weight(w)
  _check_hessian(hessian, w.shape[0])
  config = PruneConfig("sparsegpt", sparsity, nm, block_size, damping)  # validates
  if nm is not None:
    masks_lib.check_nm(*config.nm, w.shape[0])
  n, m = config.nm if config.nm else (0, 0)
  pruned, mask = _sparsegpt(w.astype(jnp.float32), hessian.astype(jnp.float32), sparsity=config.sparsity, n=n,
                            m=m, block_size=min(block_size, _round_up(w.shape[0], max(m, 1))),
                            damping=float(damping))
  return pruned.astype(w.dtype), mask


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def inverse_hessian_factor(hessian, damping: float):
  """(U, dead): U upper-triangular with U.T @ U = (H + damping * mean(diag H) * I)⁻¹, after giving inputs that
  never fire (H_ii = 0) a unit diagonal; `dead` marks those inputs (their weights are zeroed)."""
  dead = jnp.diag(hessian) == 0
  h = hessian + jnp.diag(dead.astype(hessian.dtype))
  h = h + damping * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
  identity = jnp.eye(h.shape[0], dtype=h.dtype)
  h_inv = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(h), True), identity)
  return jnp.linalg.cholesky((h_inv + h_inv.T) / 2).T, dead


@functools.partial(jax.jit, static_argnames=("sparsity", "n", "m", "block_size", "damping"))
def _sparsegpt(w, hessian, *, sparsity, n, m, block_size, damping):
  k, out = w.shape
  u, dead = inverse_hessian_factor(hessian, damping)
  w = jnp.where(dead[:, None], 0.0, w)
  padded = _round_up(k, block_size)
  # Padding inputs: zero weights, an identity block in U (no coupling), excluded from mask selection.
  w = jnp.pad(w, ((0, padded - k), (0, 0)))
  u = jnp.pad(u, ((0, padded - k), (0, padded - k))) + jnp.diag((jnp.arange(padded) >= k).astype(u.dtype))
  real = jnp.arange(padded) < k
  columns = jnp.arange(padded)

  def block_step(b, carry):
    w, mask = carry
    start = b * block_size
    w1 = jax.lax.dynamic_slice(w, (start, 0), (block_size, out))
    u1 = jax.lax.dynamic_slice(u, (start, start), (block_size, block_size))
    d2 = jnp.diag(u1)[:, None] ** 2
    if n:
      mask1 = jnp.zeros((block_size, out), bool)
    else:  # adaptive mask selection: the lowest w^2 / U_ii^2 of this block (real inputs only)
      real1 = jax.lax.dynamic_slice(real, (start,), (block_size,))
      scores = jnp.where(real1[:, None], w1 ** 2 / d2, jnp.inf)
      pruned_count = jnp.floor(jnp.sum(real1) * out * sparsity).astype(jnp.int32)
      mask1 = masks_lib.keep_top(scores, pruned_count, axis=None)

    def column_step(i, inner):
      w1, mask1, errors = inner
      if n:  # N:M: choose the group's mask from the updated weights when reaching its first input
        start_group = (i // m) * m
        group = jax.lax.dynamic_slice(w1, (start_group, 0), (m, out)) ** 2 / jax.lax.dynamic_slice(
            d2, (start_group, 0), (m, 1))
        chosen = jax.lax.dynamic_update_slice(mask1, masks_lib.keep_top(group, m - n, axis=0), (start_group, 0))
        mask1 = jnp.where(i % m == 0, chosen, mask1)
      row = w1[i]
      q = jnp.where(mask1[i], row, 0.0)
      err = (row - q) / u1[i, i]
      # U1[i, j] = 0 for j < i, and U1[i, i] * err turns row i into q: one rank-1 update does both.
      w1 = w1 - u1[i][:, None] * err[None, :]
      return w1, mask1, errors.at[i].set(err)

    w1, mask1, errors = jax.lax.fori_loop(0, block_size, column_step,
                                          (w1, mask1, jnp.zeros((block_size, out), w.dtype)))
    w = jax.lax.dynamic_update_slice(w, w1, (start, 0))
    mask = jax.lax.dynamic_update_slice(mask, mask1, (start, 0))
    # Lazy batch update: the later inputs' weights absorb this block's errors at once.
    u_rows = jax.lax.dynamic_slice(u, (start, 0), (block_size, padded))
    u_rows = jnp.where(columns[None, :] >= start + block_size, u_rows, 0.0)
    return w - jnp.matmul(u_rows.T, errors, precision=_HIGHEST), mask

  w, mask = jax.lax.fori_loop(0, padded // block_size, block_step, (w, jnp.zeros((padded, out), bool)))
  mask = mask[:k] & ~dead[:, None]
  return jnp.where(mask, w[:k], 0.0), mask


def prune_matrix(w, config: PruneConfig, hessian=None):
  """(pruned w, mask) for one [in, out] matrix by `config`."""
  if config.needs_calibration and hessian is None:
    raise ValueError(f"hessian is required for method={config.method!r}.")
  if config.nm is not None:
    masks_lib.check_nm(*config.nm, w.shape[0])
  if config.method == "magnitude":
    return magnitude(w, sparsity=config.sparsity, nm=config.nm)
  if config.method == "wanda":
    return wanda(w, hessian, sparsity=config.sparsity, nm=config.nm)
  return sparsegpt(w, hessian, sparsity=config.sparsity, nm=config.nm, block_size=config.block_size,
                   damping=config.damping)


def reconstruction_error(x, w, w_hat) -> float:
  """||x w - x w_hat||_F^2 / ||x w||_F^2, the layer objective SparseGPT minimises (relative)."""
  x, w, w_hat = (np.asarray(a, np.float64) for a in (x, w, w_hat))
  return float(np.sum((x @ (w - w_hat)) ** 2) / np.sum((x @ w) ** 2))


Rules = Sequence[tuple[str, "PruneConfig | None"]] | Mapping[str, "PruneConfig | None"]


def prune_model(model, rules: Rules, calibration_data: Iterable[dict] | None = None, *,
                hessians: Mapping[str, dict] | None = None, progress=None) -> dict[str, dict]:
  """Prunes the model's projections in place by `rules`; returns {path: {'method', 'pattern', 'sparsity',
  'mask' (kernel-shaped bool)}}.

  Wanda and SparseGPT need the inputs' Hessians: captured here from `calibration_data` (batches as
  `capture_hessians` takes them) for the matched paths, or passed precomputed as `hessians` (reuse one capture
  across several pruning runs of the same dense model). `progress(path)` is called per projection.
  """
  matched = calibration.match_rules(model, rules, config_type=PruneConfig)
  needs = [path for path, (_, config) in matched.items() if config.needs_calibration]
  if needs and hessians is None:
    if calibration_data is None:
      raise ValueError(f"calibration_data is required: rules use "
                       f"{sorted({matched[p][1].method for p in needs})} on {len(needs)} projections.")
    hessians = calibration.capture_hessians(model, calibration_data, pattern=calibration.exact_pattern(needs))
  missing = [p for p in needs if p not in hessians]
  if missing:
    raise ValueError(f"hessians lacks {len(missing)} matched projections, e.g. {missing[:3]}.")
  report = {}
  for path, (module, config) in matched.items():
    if progress is not None:
      progress(path)
    matrix = calibration.kernel_as_matrix(module)
    hessian = hessians[path]["hessian"] if config.needs_calibration else None
    pruned, mask = prune_matrix(matrix, config, hessian)
    module.kernel[...] = calibration.matrix_to_kernel(module, pruned).astype(module.kernel[...].dtype)
    report[path] = {"method": config.method, "pattern": config.pattern,
                    "sparsity": masks_lib.sparsity_of(pruned),
                    "mask": calibration.matrix_to_kernel(module, mask)}
  return report
