"""Out-of-range token ids never pass as another token (issue 10, item 6).

Concrete ids outside the table are a ValueError naming the argument, the bad value and the valid range; traced
ids (under `jit`) read a row of NaN, so the bad row's outputs are NaN and every other row is untouched. Valid ids
give what a NumPy gather of the same tables followed by the model's own layers gives.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient import nn
from efficient.models import bert, llama

LLAMA = llama.TINY
BERT = bert.TINY_BERT

llama_forward = jax.jit(lambda model, tokens: model(tokens))
bert_forward = jax.jit(lambda model, ids, mask, **kwargs: model(ids, mask, **kwargs))


@pytest.fixture(scope="module")
def llama_model():
  return llama.Llama(LLAMA, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def bert_model():
  return bert.Bert(BERT, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
  return np.asarray(jax.random.randint(jax.random.key(1), (3, 12), 0, LLAMA.vocab_size, dtype=jnp.int32))


@pytest.fixture(scope="module")
def ids():
  return np.asarray(jax.random.randint(jax.random.key(2), (3, 10), 0, BERT.vocab_size, dtype=jnp.int32))


def with_value(array, index, value):
  out = np.array(array)
  out[index] = value
  return out


# --- the layer floor --------------------------------------------------------------------------------------------

def test_take_rows_matches_numpy_gather_and_rejects_out_of_range():
  table = np.asarray(jax.random.normal(jax.random.key(0), (7, 3)), np.float32)
  good = np.array([[0, 6, 3], [5, 5, 1]])
  for dtype in (np.int8, np.uint8, np.int32, np.uint32, np.int64):
    np.testing.assert_array_equal(np.asarray(nn.take_rows(table, good.astype(dtype))), table[good])
  for bad in (7, -1, -8, 100):
    with pytest.raises(ValueError, match=rf"^rows: value {bad} at index \(1, 2\) is out of range; valid values "
                                         rf"are \[0, num_rows=7\)"):
      nn.take_rows(table, with_value(good, (1, 2), bad), name="rows", bound="num_rows")
  with pytest.raises(ValueError, match="ids must be integer ids"):
    nn.take_rows(table, good.astype(np.float32))


def test_take_rows_under_jit_gives_nan_rows_for_every_out_of_range_id():
  table = np.asarray(jax.random.normal(jax.random.key(0), (7, 3)), np.float32)
  ids = np.array([0, 7, -1, 6, -8, 2**20, -(2**20), 3])
  out = np.asarray(jax.jit(nn.take_rows)(table, ids))
  bad = (ids < 0) | (ids >= 7)
  assert np.isnan(out[bad]).all()
  np.testing.assert_array_equal(out[~bad], table[ids[~bad]])
  # uint32 ids above int32's range are out of range too, not wrapped negative.
  big = np.array([1, 2**31 + 5, 2**32 - 1], np.uint32)
  out = np.asarray(jax.jit(nn.take_rows)(table, big))
  np.testing.assert_array_equal(out[0], table[1])
  assert np.isnan(out[1:]).all()


def test_embed_call_and_lookup_check_ids():
  embed = nn.Embed(5, 4, rngs=nnx.Rngs(0))
  table = np.asarray(embed.embedding[...])
  np.testing.assert_array_equal(np.asarray(embed(np.array([4, 0]))), table[[4, 0]])
  with pytest.raises(ValueError, match=r"^ids: value -1 at index \(1,\) .* valid values are \[0, 5\)"):
    embed(np.array([2, -1]))
  with pytest.raises(ValueError, match=r"^labels: value 5 .* \[0, classes=5\)"):
    embed.lookup(np.array([5]), name="labels", bound="classes")
  assert np.isnan(np.asarray(nnx.jit(lambda e, i: e(i))(embed, jnp.array([-1])))).all()


# --- Llama ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [LLAMA.vocab_size, -1])
def test_llama_rejects_out_of_range_tokens(llama_model, tokens, bad):
  with pytest.raises(ValueError, match=rf"^tokens: value {bad} at index \(1, 5\) is out of range; valid values "
                                       rf"are \[0, vocab_size={LLAMA.vocab_size}\)"):
    llama_model(with_value(tokens, (1, 5), bad))


@pytest.mark.parametrize("bad", [LLAMA.vocab_size, -1])
def test_generate_rejects_out_of_range_prompt(llama_model, tokens, bad):
  with pytest.raises(ValueError, match=rf"^prompt: value {bad} at index \(0, 2\) .* \[0, vocab_size=256\)"):
    llama.generate(llama_model, with_value(tokens[:, :4], (0, 2), bad), 2)
  with pytest.raises(ValueError, match=r"eos_id must be in \[0, vocab_size=256\), got 256"):
    llama.generate(llama_model, tokens[:, :4], 2, eos_id=LLAMA.vocab_size)


def test_llama_rejects_negative_positions(llama_model, tokens):
  positions = with_value(np.broadcast_to(np.arange(12), tokens.shape), (2, 0), -3)
  with pytest.raises(ValueError, match=r"^positions: value -3 at index \(2, 0\) .* valid values are \[0, "
                                       r"EMPTY_POSITION="):
    llama_model(tokens, positions=positions)


@pytest.mark.parametrize("bad", [LLAMA.vocab_size, -1, -LLAMA.vocab_size - 1])
def test_llama_under_jit_makes_the_bad_row_nan(llama_model, tokens, bad):
  clean = np.asarray(llama_forward(llama_model, tokens))
  out = np.asarray(llama_forward(llama_model, with_value(tokens, (1, 5), bad)))
  assert np.isnan(out[1, 5:]).all()  # the bad token and every later position that attends to it
  np.testing.assert_allclose(out[[0, 2]], clean[[0, 2]], rtol=1e-6, atol=1e-6)  # other rows untouched
  assert np.isfinite(out[[0, 2]]).all()


def test_llama_valid_tokens_match_numpy_gather(llama_model, tokens):
  """The model's logits equal its own layers run on a NumPy gather of the embedding table."""

  @jax.jit
  def from_embeddings(model, x):
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    for block in model.blocks:
      x, _ = block(x, positions=positions, segment_ids=None, attention_fn=model.attention_fn)
    x = model.final_norm(x)
    return jnp.einsum("btd,dv->btv", x, model.embedding[...].T, preferred_element_type=jnp.float32)

  gathered = np.asarray(llama_model.embedding[...])[tokens]
  expected = np.asarray(from_embeddings(llama_model, gathered))
  np.testing.assert_allclose(np.asarray(llama_forward(llama_model, tokens)), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(llama_model(tokens)), expected, rtol=1e-5, atol=1e-5)  # eager path


# --- BERT -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argument,bad,bound", [
    ("ids", BERT.vocab_size, f"vocab_size={BERT.vocab_size}"), ("ids", -1, f"vocab_size={BERT.vocab_size}"),
    ("token_type_ids", BERT.type_vocab_size, f"type_vocab_size={BERT.type_vocab_size}"),
    ("token_type_ids", -1, f"type_vocab_size={BERT.type_vocab_size}"),
    ("positions", BERT.max_positions, f"max_positions={BERT.max_positions}"),
    ("positions", -1, f"max_positions={BERT.max_positions}")])
def test_bert_rejects_out_of_range_inputs(bert_model, ids, argument, bad, bound):
  kwargs = {"token_type_ids": np.zeros_like(ids), "positions": np.broadcast_to(np.arange(10), ids.shape)}
  inputs = dict(kwargs, ids=ids)
  inputs[argument] = with_value(inputs[argument], (2, 3), bad)
  with pytest.raises(ValueError, match=rf"^{argument}: value {bad} at index \(2, 3\) is out of range; valid "
                                       rf"values are \[0, {bound}\)"):
    bert_model(inputs.pop("ids"), **inputs)


@pytest.mark.parametrize("argument,bad", [("ids", -1), ("ids", BERT.vocab_size), ("token_type_ids", -1),
                                          ("positions", BERT.max_positions)])
def test_bert_under_jit_makes_the_bad_row_nan(bert_model, ids, argument, bad):
  mask = np.ones_like(ids)
  mask[:, 7:] = 0
  kwargs = {"token_type_ids": np.zeros_like(ids), "positions": np.broadcast_to(np.arange(10), ids.shape)}
  clean = np.asarray(bert_forward(bert_model, ids, mask, **kwargs))
  inputs = dict(kwargs, ids=ids)
  inputs[argument] = with_value(inputs[argument], (1, 3), bad)
  out = np.asarray(bert_forward(bert_model, inputs.pop("ids"), mask, **inputs))
  assert np.isnan(out[1, :7]).all()  # every real token of the bad token's segment
  np.testing.assert_allclose(out[[0, 2]], clean[[0, 2]], rtol=1e-6, atol=1e-6)
  assert np.isfinite(out[[0, 2]]).all()


def test_bert_valid_inputs_match_numpy_gather(bert_model, ids):
  """The encoder equals its own blocks run on a NumPy gather of the three embedding tables."""
  mask = np.ones_like(ids)
  mask[0, 6:] = 0
  token_type_ids = (np.arange(10)[None] >= 5).astype(np.int32) * np.ones_like(ids)
  positions = np.broadcast_to(np.arange(10) + 3, ids.shape)

  @jax.jit
  def from_embeddings(model, x, segment_ids):
    x = model.embeddings.norm(x)
    for block in model.blocks:
      x = block(x, positions=positions, segment_ids=segment_ids, attention_fn=model.attention_fn)
    return x

  e = bert_model.embeddings
  gathered = (np.asarray(e.word.embedding[...])[ids] + np.asarray(e.position.embedding[...])[positions]
              + np.asarray(e.token_type.embedding[...])[token_type_ids])
  expected = np.asarray(from_embeddings(bert_model, gathered, mask.astype(np.int32)))
  got = bert_forward(bert_model, ids, mask, token_type_ids=token_type_ids, positions=positions)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
  eager = bert_model(ids, mask, token_type_ids=token_type_ids, positions=positions)
  np.testing.assert_allclose(np.asarray(eager), expected, rtol=1e-5, atol=1e-5)
