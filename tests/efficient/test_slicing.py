"""efficient.quant.slicing: SliceGPT (one global PCA basis) and the magnitude-slicing baseline on the tiny Llama --
invariance without slicing, really smaller arrays, a synthetic low-rank stream that PCA slicing keeps exactly
and magnitude slicing does not, the PCA basis against numpy, and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient import calibration, measure, nn
from efficient.models import llama
from efficient.quant import rotation, slicing
from tests.helpers import random_norm_gains, rel_rms_error

F32_REL = 1e-4  # issue 14's bar for a rotation without slicing
D = llama.TINY.embed_dim  # 64


@pytest.fixture(scope="module")
def tiny_gains():
  return random_norm_gains(llama.Llama(llama.TINY, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def batches():
  return [jax.random.randint(jax.random.key(10 + i), (2, 16), 0, llama.TINY.vocab_size, dtype=jnp.int32)
          for i in range(2)]


def test_sliced_width_and_bad_fraction(tiny_gains, batches):
  assert [slicing.sliced_width(576, f) for f in (0.1, 0.2, 0.3)] == [520, 464, 400]
  assert [slicing.sliced_width(576, f, multiple=16) for f in (0.1, 0.2, 0.3)] == [512, 464, 400]
  assert slicing.sliced_width(64, 0.01) == 64 and slicing.sliced_width(64, 0.125) == 56
  for bad in (0, 0.0, 1, 1.0, -0.1, 1.5, float("nan"), True, "0.1", None):
    with pytest.raises(ValueError, match="fraction must be a number in"):
      slicing.sliced_width(64, bad)
  model = nnx.clone(tiny_gains)
  for fn in (slicing.slice_gpt, slicing.slice_by_magnitude):
    with pytest.raises(ValueError, match="fraction"):
      fn(model, batches, 1.0)
  with pytest.raises(ValueError, match=r"ResidualRules.readers\[0\] 'nope' matches no"):
    slicing.slice_gpt(model, batches, 0.2, rules=rotation.ResidualRules(readers=("nope",)))
  with pytest.raises(ValueError, match="d_small must be an int"):
    slicing.slice_model(model, np.eye(D), D + 1)
  with pytest.raises(ValueError, match="not orthogonal"):
    slicing.slice_model(model, 1.5 * np.eye(D), 8)
  assert model.embedding[...].shape == (llama.TINY.vocab_size, D)  # every refusal left the model as it was


@pytest.mark.parametrize("tied", [True, False])
def test_no_slice_keeps_logits(tied, batches, tokens):
  model = random_norm_gains(llama.Llama(llama.TINY.replace(tie_embeddings=tied), rngs=nnx.Rngs(1)), seed=1)
  reference = np.asarray(model(tokens))
  kept = slicing.slice_gpt(nnx.clone(model), batches, 0.01)  # d_small rounds to d: a pure PCA rotation
  assert kept.embedding[...].shape == (llama.TINY.vocab_size, D)
  assert rel_rms_error(kept(tokens), reference) < F32_REL
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(D, D)))
  assert rel_rms_error(slicing.slice_model(nnx.clone(model), q, D)(tokens), reference) < F32_REL
  assert rel_rms_error(slicing.slice_by_magnitude(nnx.clone(model), batches, 0.01)(tokens), reference) < F32_REL


def test_sliced_model_has_really_smaller_arrays(tiny_gains, batches, tokens):
  c, s = llama.TINY, 56
  model = slicing.slice_gpt(nnx.clone(tiny_gains), batches, 0.125)
  assert model.embedding[...].shape == (c.vocab_size, s)
  for block in model.blocks:
    a, m = block.attention, block.mlp
    assert a.q.kernel[...].shape == (s, c.num_heads, c.head_dim)
    assert a.k.kernel[...].shape == a.v.kernel[...].shape == (s, c.num_kv_heads, c.head_dim)
    assert a.o.kernel[...].shape == (c.num_heads, c.head_dim, s)
    assert m.gate.kernel[...].shape == m.up.kernel[...].shape == (s, c.mlp_dim)
    assert m.down.kernel[...].shape == (c.mlp_dim, s)
    for norm in (block.attention_norm, block.mlp_norm):
      assert isinstance(norm, nn.RMSNorm) and norm.scale[...].shape == (s,)
      np.testing.assert_allclose(np.asarray(norm.scale[...]), np.sqrt(D / s), rtol=1e-6)
      assert norm.eps == pytest.approx(c.norm_eps * D / s)
  assert isinstance(model.final_norm, slicing.SlicedGainRMSNorm)  # tied head: the gain as a [s, s] matrix
  assert model.final_norm.matrix[...].shape == (s, s)
  assert model.config.embed_dim == s
  per_block = s * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * s \
      + 3 * s * c.mlp_dim + 2 * s
  elements = c.vocab_size * s + c.num_layers * per_block + s * s
  assert measure.parameter_bytes(model)["total"] == 4 * elements == 328832
  assert measure.parameter_bytes(tiny_gains)["total"] == 361728
  logits = model(tokens)
  assert logits.shape == (2, 16, c.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
  # Magnitude slicing keeps a permutation of coordinates: the tied final norm stays a plain RMSNorm.
  naive = slicing.slice_by_magnitude(nnx.clone(tiny_gains), batches, 0.125)
  assert isinstance(naive.final_norm, nn.RMSNorm) and naive.final_norm.scale[...].shape == (s,)
  assert measure.parameter_bytes(naive)["total"] == 4 * (elements - s * s + s)


def _low_rank_stream(model, rank: int, seed: int = 0):
  """Confines the residual stream to a random `rank`-dim subspace U: E <- E U U^T, writers W <- W U U^T."""
  u, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(D, rank)))
  proj = jnp.asarray(u @ u.T, jnp.float32)
  model.embedding[...] = model.embedding[...] @ proj
  for path, module in calibration.einsum_modules(model).items():
    if path.endswith(("attention/o", "mlp/down")):
      w = calibration.kernel_as_matrix(module)
      module.kernel[...] = calibration.matrix_to_kernel(module, w @ proj)
  return model, u


def test_low_rank_stream_pca_slicing_is_exact_magnitude_is_not(tiny_gains, batches, tokens):
  model, _ = _low_rank_stream(nnx.clone(tiny_gains), 56)
  reference = np.asarray(model(tokens))
  values, _ = slicing.pca_basis(slicing.global_covariance(slicing.residual_covariances(model, batches)))
  assert values[55] > 1e-3 * values[0] and np.all(np.abs(values[56:]) < 1e-6 * values[0])
  sliced = slicing.slice_gpt(nnx.clone(model), batches, 0.125)
  assert sliced.embedding[...].shape[-1] == 56
  assert rel_rms_error(sliced(tokens), reference) < F32_REL  # measured ~1e-6: only unused directions were dropped
  naive = slicing.slice_by_magnitude(nnx.clone(model), batches, 0.125)
  assert rel_rms_error(naive(tokens), reference) > 0.05  # measured ~0.3: every coordinate carries signal


def test_covariances_and_pca_basis_match_numpy(tiny_gains, batches):
  covs = slicing.residual_covariances(tiny_gains, batches)
  assert list(covs) == [f"blocks/{i}/{n}" for i in range(2) for n in ("attention_norm", "mlp_norm")] + \
      ["final_norm"]
  assert all(entry["count"] == 64 for entry in covs.values())
  rows = np.asarray(tiny_gains.embedding[...], np.float64)[np.concatenate([np.asarray(b).ravel() for b in batches])]
  np.testing.assert_allclose(covs["blocks/0/attention_norm"]["covariance"], rows.T @ rows / 64, rtol=1e-5,
                             atol=1e-9)  # the first boundary's input is the embedded tokens
  total = slicing.global_covariance(covs)
  np.testing.assert_allclose(np.trace(total), 5.0, rtol=1e-9)  # five trace-normalized boundaries
  values, vectors = slicing.pca_basis(total)
  want_values, want_vectors = np.linalg.eigh(total)
  np.testing.assert_allclose(values, want_values[::-1], rtol=1e-9, atol=1e-12)
  assert np.all(np.diff(values) <= 0)
  np.testing.assert_allclose(np.abs(np.sum(vectors * want_vectors[:, ::-1], axis=0)), 1.0, atol=1e-6)
  np.testing.assert_allclose(vectors.T @ vectors, np.eye(D), atol=1e-10)
  # Magnitude: the basis is the permutation to descending RMS; the sliced embedding keeps those columns.
  order = np.argsort(-np.diag(total), kind="stable")
  np.testing.assert_array_equal(slicing.magnitude_basis(total), np.eye(D)[:, order])
  naive = slicing.slice_by_magnitude(nnx.clone(tiny_gains), batches, 0.125)
  np.testing.assert_array_equal(np.asarray(naive.embedding[...]),
                                np.asarray(tiny_gains.embedding[...])[:, order[:56]])


# --- the per-boundary variant (one Q per RMSNorm input, skip matrices) ------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_per_block_no_slice_keeps_logits_and_low_rank_slice_is_exact(tied, batches, tokens):
  model = random_norm_gains(llama.Llama(llama.TINY.replace(tie_embeddings=tied), rngs=nnx.Rngs(2)), seed=2)
  reference = np.asarray(model(tokens))
  kept = slicing.slice_gpt_per_block(nnx.clone(model), batches, 0.01)  # d_small = d: per-boundary rotations
  assert all(isinstance(block, slicing.ShortcutBlock) for block in kept.blocks)
  assert rel_rms_error(kept(tokens), reference) < F32_REL  # measured ~5e-7
  low, _ = _low_rank_stream(model, 56, seed=2)
  reference = np.asarray(low(tokens))
  sliced = slicing.slice_gpt_per_block(nnx.clone(low), batches, 0.125)
  assert rel_rms_error(sliced(tokens), reference) < F32_REL  # measured ~2e-6
  c, s = llama.TINY, 56
  block = sliced.blocks[1]
  assert block.block.attention.q.kernel[...].shape == (s, c.num_heads, c.head_dim)
  assert block.block.mlp.down.kernel[...].shape == (c.mlp_dim, s)
  assert [m[...].shape for m in block.shortcuts] == [(s, s), (s, s)]
  final = s * s if tied else s * c.vocab_size + s  # tied: the final norm's [s, s] matrix; untied: head + gain
  per_block = s * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * s \
      + 3 * s * c.mlp_dim + 2 * s + 2 * s * s
  elements = c.vocab_size * s + c.num_layers * per_block + final
  assert measure.parameter_bytes(sliced)["total"] == 4 * elements


def test_per_block_bases_must_name_every_norm(tiny_gains):
  with pytest.raises(ValueError, match="bases must map exactly the RMSNorm paths"):
    slicing.slice_model_per_block(nnx.clone(tiny_gains), {"final_norm": np.eye(D)}, 56)
  bases = {p: np.eye(D) for p in rotation.plan(tiny_gains).norms}
  with pytest.raises(ValueError, match="blocks='nope' must cover"):
    slicing.slice_model_per_block(nnx.clone(tiny_gains), bases, 56, blocks="nope")
