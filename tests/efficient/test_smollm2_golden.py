"""SmolLM2-135M loaded from its GGUF against transformers (torch, f32) on the same file: logits, a greedy
continuation and tokenizer ids (tests/data/smollm2_golden.json, written by scripts/make_golden.py).

`check_against_golden(model, tokenizer, golden)` is the reusable part: the sharded variant of this test calls
it on a model placed on a mesh.
"""
from __future__ import annotations

import functools
import unicodedata

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient.models import llama

pytestmark = pytest.mark.slow

# Measured max |Δlogit| against transformers: 4.9e-5 (f32, CPU, jax 0.10.2; the golden file stores 5
# decimals, i.e. ±5e-6 of rounding). The bound leaves 10x for other summation orders (XLA thread counts,
# sharded matmuls) while still catching any layout or numerics bug, which moves logits by O(0.1..10).
LOGIT_TOLERANCE = 5e-4


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def forward_logits(model: llama.Llama, ids) -> np.ndarray:
  """[T, V] float64 logits of one sequence (jitted over the split state, so it works on sharded models too)."""
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, jnp.asarray([ids], jnp.int32))[0], np.float64)


def check_logits(logits: np.ndarray, golden: dict, *, tolerance: float = LOGIT_TOLERANCE) -> float:
  """Asserts every stored logit statistic is within `tolerance`; returns the max |Δ| seen."""
  vocab_sample = np.asarray(golden["vocab_sample"])
  positions = np.arange(len(golden["text_ids"]))
  row_max = logits.max(-1)
  logsumexp = row_max + np.log(np.exp(logits - row_max[:, None]).sum(-1))
  deltas = {
      "max logit (every position)": row_max - golden["max_logit"],
      "logit at the golden argmax (every position)": logits[positions, golden["argmax"]] - golden["max_logit"],
      "logsumexp (every position)": logsumexp - golden["logsumexp"],
  }
  for entry in golden["positions"]:
    p = entry["position"]
    deltas[f"top-{len(entry['top_ids'])} logits at position {p}"] = logits[p, entry["top_ids"]] - entry["top_logits"]
    deltas[f"sampled vocab logits at position {p}"] = logits[p, vocab_sample] - entry["sample_logits"]
  worst = {name: float(np.abs(delta).max()) for name, delta in deltas.items()}
  bad = {name: value for name, value in worst.items() if not value <= tolerance}
  assert not bad, f"logits differ from transformers by more than {tolerance}: {bad}"
  return max(worst.values())


def check_generation(model: llama.Llama, golden: dict) -> None:
  """Asserts `llama.generate` greedily produces the golden continuation token for token."""
  generation = golden["generation"]
  tokens = llama.generate(model, jnp.asarray([generation["prompt_ids"]], jnp.int32), len(generation["tokens"]))
  tokens = np.asarray(tokens[0]).tolist()
  if tokens != generation["tokens"]:
    step = next(i for i, (a, b) in enumerate(zip(tokens, generation["tokens"])) if a != b)
    raise AssertionError(f"greedy continuation differs from step {step} (golden top-2 margin there: "
                         f"{generation['top2_margins'][step]}): got {tokens}, expected {generation['tokens']}")


def expected_ids(case: dict) -> list[int]:
  """The ids our tokenizer must give: transformers' ids, or llama.cpp's where the golden file records that
  transformers' GGUF tokenizer lacks SmolLM2's per-numeral split (see scripts/make_golden.py)."""
  return case.get("llama_cpp_ids", case["ids"])


def check_tokenizer(tokenizer, golden: dict) -> None:
  """Asserts ids (and decode round trips) on every golden text, the golden text's ids and the special ids."""
  for case in golden["tokenizer"]:
    if "llama_cpp_ids" in case:  # Only a non-ASCII numeral may explain a difference from transformers.
      assert any(unicodedata.category(ch)[0] == "N" and not ch.isascii() for ch in case["text"]), case["text"]
    ids = tokenizer.encode(case["text"])
    assert ids == expected_ids(case), f"token ids differ for {case['text']!r}"
    assert tokenizer.decode(ids) == case["text"]
  assert tokenizer.encode(golden["text"]) == golden["text_ids"]
  assert tokenizer.encode(golden["generation"]["prompt"]) == golden["generation"]["prompt_ids"]
  special = golden["special_ids"]
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id) == (
      special["bos"], special["eos"], special["pad"], special["unk"])
  assert tokenizer.vocab_size == golden["vocab_size"]


def check_against_golden(model: llama.Llama, tokenizer, golden: dict, *,
                         logit_tolerance: float = LOGIT_TOLERANCE) -> dict:
  """Tokenizer ids, logits and the greedy continuation against the golden file. Returns {'max_abs_dlogit'}."""
  check_tokenizer(tokenizer, golden)
  max_delta = check_logits(forward_logits(model, golden["text_ids"]), golden, tolerance=logit_tolerance)
  check_generation(model, golden)
  return {"max_abs_dlogit": max_delta}


def test_config_is_smollm2_135m(smollm2):
  assert smollm2.config == llama.SMOLLM2_135M
  assert smollm2.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
  # Parameters keep their logical axes (needed for sharding presets).
  assert smollm2.model.blocks[0].attention.q.kernel.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")


def test_tokenizer_matches_transformers(smollm2, smollm2_golden):
  check_tokenizer(smollm2.tokenizer, smollm2_golden)


def test_logits_match_transformers(smollm2, smollm2_golden):
  logits = forward_logits(smollm2.model, smollm2_golden["text_ids"])
  assert logits.shape == (len(smollm2_golden["text_ids"]), smollm2_golden["vocab_size"])
  check_logits(logits, smollm2_golden)


def test_greedy_generation_matches_transformers(smollm2, smollm2_golden):
  check_generation(smollm2.model, smollm2_golden)


def test_check_against_golden_helper(smollm2, smollm2_golden):
  """The all-in-one helper the sharded variant uses (compiles are cached by now, so this is cheap)."""
  stats = check_against_golden(smollm2.model, smollm2.tokenizer, smollm2_golden)
  print(f"SmolLM2-135M vs transformers: max |dlogit| = {stats['max_abs_dlogit']:.2e}")
  assert stats["max_abs_dlogit"] <= LOGIT_TOLERANCE
