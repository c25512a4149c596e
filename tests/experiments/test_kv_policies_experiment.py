"""experiments.kv_policies: the per-row policy batch equals one cache per policy (random: same law, other draws), and the experiment end to end
on the tiny random-init model with a few MQAR steps (the SmolLM2 run is the experiment itself)."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from efficient.attention import budget
from efficient.models import llama
from experiments import kv_policies


def test_per_row_batch_equals_one_cache_per_policy():
  config = llama.TINY.replace(num_layers=1)
  model = llama.Llama(config, rngs=nnx.Rngs(0))
  text = np.asarray(jax.random.randint(jax.random.key(1), (2, 13), 0, config.vocab_size))
  tokens, targets = text[:, :-1], text[:, 1:]
  names = ("window", "h2o", "kvmerger")  # position, score and merge plans; random: the same law, other draws
  nll, predicted = kv_policies.budgeted_stream(model, tokens, targets, names, budget=4, storage="int4", sinks=1,
                                               chunk=2, share_prefix=True)
  assert nll.shape == predicted.shape == (len(names), 2, 12)
  for i, name in enumerate(names[1:], 1):
    cache = llama.init_cache(config, 2, 12, kv_format=budget.BudgetedKV(name, 4, sinks=1, storage="int4"))
    alone, alone_predicted, _ = kv_policies.stream(model, tokens, targets, cache, 2)
    np.testing.assert_allclose(nll[i], alone, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(predicted[i], alone_predicted, err_msg=name)
  assert np.abs(nll[0] - nll[1]).max() > 1e-4  # the policies did differ


def test_kv_policies_writes_results_on_tiny(tmp_path):
  config = kv_policies.default_config()
  config.update(model="tiny", seq_len=64, chunk=8, num_files=1, mqar_steps=20, mqar_eval_rows=8,
                mqar_batch_size=8, mqar_warmup_steps=2, mqar_seq_len=16, mqar_num_kv_pairs=2, budgets="0.5", int4_budgets="",
                perplexity_int4=False, policies="window,sinks,h2o")  # every policy's numbers: test_kv_budget
  results = kv_policies.run(config, str(tmp_path))
  ppl, mqar = results["perplexity"], results["mqar"]
  assert set(mqar["cells"]) == {"float@0.5", "int4@0.5"} and set(ppl["cells"]) == {"float@0.5"}  # int4: MQAR only
  for cell in ppl["cells"].values():
    assert set(cell["perplexity"]) == {"window", "sinks", "h2o"} and all(np.isfinite(list(cell["perplexity"].values())))
  for cell in mqar["cells"].values():
    assert all(0 <= c["accuracy"] <= 1 for c in cell["accuracy"].values())
  for name in ("results.json", "results.md", "kv_policies.png"):
    assert (tmp_path / name).exists(), name
  markdown = (tmp_path / "results.md").read_text()
  assert "| seed claim | measured | verdict |" in markdown and "attention sinks rescue" in markdown
  assert json.loads((tmp_path / "results.json").read_text())["results"]["policies"] == ["window", "sinks", "h2o"]


@pytest.mark.parametrize("change,match", [(dict(policies="window,lru"), "lru"), (dict(budgets="0.3"), "budgets"),
                                          (dict(storages="float,fp3"), "storage")])
def test_bad_flags_are_refused(tmp_path, change, match):
  config = kv_policies.default_config()
  config.update(**change)
  with pytest.raises(ValueError, match=match):
    kv_policies.run(config, str(tmp_path))
