"""μP (efficient.optim.mup + efficient.models.parametrization): init std per kind and Adam-LR multipliers against
hand derivations in NumPy, the model's two forward multipliers, named and sharded optimizer state, bad input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efficient import train
from efficient.models import llama, parametrization
from efficient.optim import axes, mup
from tests import helpers

STD = 0.02


def _config(embed: int, mlp: int, layers: int = 1) -> llama.LlamaConfig:
  return llama.TINY.replace(embed_dim=embed, head_dim=embed // 4, mlp_dim=mlp, num_layers=layers)


# Embed and MLP widths scale differently, so each matrix's fan_in ratio is its own: gate/up/q/k/v read the embed
# width, o reads heads x head_dim (= embed), down reads the MLP width.
BASE = _config(64, 128)
WIDE = {"A": _config(128, 128), "B": _config(256, 512)}


def _hand_std(embed: int, mlp: int) -> dict:
  """Table 8 relative to BASE by hand: hidden std = 0.02 * sqrt(base fan_in / fan_in), embedding std = 0.02."""
  embed_ratio, mlp_ratio = np.sqrt(64 / embed), np.sqrt(128 / mlp)
  return {"embedding": STD, "blocks/0/attention/q/kernel": STD * embed_ratio,
          "blocks/0/attention/k/kernel": STD * embed_ratio, "blocks/0/attention/v/kernel": STD * embed_ratio,
          "blocks/0/attention/o/kernel": STD * embed_ratio, "blocks/0/mlp/gate/kernel": STD * embed_ratio,
          "blocks/0/mlp/up/kernel": STD * embed_ratio, "blocks/0/mlp/down/kernel": STD * mlp_ratio}


@pytest.mark.parametrize("name", sorted(WIDE))
def test_mup_init_std_and_multipliers_match_the_hand_derivation(name):
  config = WIDE[name]
  model, plan = parametrization.build(config, BASE, "mup", seed=0)
  params = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  params = {"/".join(map(str, k)): v for k, v in params.items()}
  for path, want in _hand_std(config.embed_dim, config.mlp_dim).items():
    got = params[path].std()
    assert abs(got / want - 1) < 0.04, (path, got, want)   # >= 8192 draws: the sample std is within ~1%
    assert abs(params[path].mean()) < 4 * want / np.sqrt(params[path].size), path
  for path in ("blocks/0/attention_norm/scale", "blocks/0/mlp_norm/scale", "final_norm/scale"):
    np.testing.assert_array_equal(params[path], 1.0)   # vectors keep their built value
  # Adam LR: x base fan_in / fan_in for hidden matrices, 1 elsewhere
  lr = mup.learning_rate_multipliers(plan)
  embed_ratio, mlp_ratio = 64 / config.embed_dim, 128 / config.mlp_dim
  assert lr["blocks/0/attention/q/kernel"] == pytest.approx(embed_ratio)
  assert lr["blocks/0/attention/o/kernel"] == pytest.approx(embed_ratio)
  assert lr["blocks/0/mlp/down/kernel"] == pytest.approx(mlp_ratio)
  assert lr["embedding"] == lr["final_norm/scale"] == 1.0
  # forward multipliers: readout x 1/width_mult, 1/d attention (head_dim 16 at the base)
  assert model.config.logits_multiplier == pytest.approx(64 / config.embed_dim)
  assert model.config.attention_multiplier == pytest.approx(math.sqrt(16 / config.head_dim))


def test_sp_equals_mup_at_the_base_width_and_has_unit_multipliers():
  sp, sp_plan = parametrization.build(BASE, BASE, "sp", seed=3)
  mu, mu_plan = parametrization.build(BASE, BASE, "mup", seed=3)
  assert sp.config == mu.config
  for a, b in zip(jax.tree.leaves(nnx.state(sp)), jax.tree.leaves(nnx.state(mu))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  wide_sp, wide_plan = parametrization.build(WIDE["B"], BASE, "sp", seed=3)
  assert set(mup.learning_rate_multipliers(wide_plan).values()) == {1.0}
  assert wide_sp.config.logits_multiplier == wide_sp.config.attention_multiplier == 1.0
  q = np.asarray(wide_sp.blocks[0].attention.q.kernel[...])
  assert abs(q.std() / STD - 1) < 0.04   # SP: the same std at every width


def test_scale_learning_rates_equals_a_hand_computed_adam_step_times_the_multiplier():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((6,)), jnp.float32)}
  multipliers = {"w": 0.125, "b": 1.0}
  lr, b1, b2, eps = 3e-3, 0.9, 0.95, 1e-8
  tx = optax.chain(optax.adam(lr, b1=b1, b2=b2, eps=eps), mup.scale_learning_rates(multipliers))
  state = tx.init(params)
  m = {k: np.zeros(v.shape) for k, v in params.items()}
  v = {k: np.zeros(v.shape) for k, v in params.items()}
  for t in range(1, 4):
    grads = {k: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) for k, p in params.items()}
    updates, state = jax.jit(tx.update)(grads, state, params)
    for k in params:
      g = np.asarray(grads[k], np.float64)
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      step = -lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      np.testing.assert_allclose(np.asarray(updates[k]), multipliers[k] * step, rtol=2e-5, err_msg=f"{k} t={t}")


def test_composes_with_train_make_optimizer_on_variables():
  model, plan = parametrization.build(WIDE["A"], BASE, "mup", seed=1)
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, params)
  config = train.TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, grad_clip_norm=None)
  plain = train.make_optimizer(config)
  scaled = optax.chain(train.make_optimizer(config), mup.scale_learning_rates(plan))
  u0, _ = plain.update(grads, plain.init(params), params)
  u1, _ = scaled.update(grads, scaled.init(params), params)
  multipliers = mup.learning_rate_multipliers(plan)
  for (path, a), (_, b) in zip(nnx.to_flat_state(u0), nnx.to_flat_state(u1)):
    key = "/".join(map(str, path))
    assert type(b) is nnx.Param and b.get_metadata()["out_sharding"] == a.get_metadata()["out_sharding"]
    np.testing.assert_allclose(np.asarray(b[...]), multipliers[key] * np.asarray(a[...]), rtol=1e-6, err_msg=key)


def test_named_state_and_sharded_run_equal_single_device():
  model, plan = parametrization.build(_config(64, 128), _config(32, 64), "mup", seed=2)
  params = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(4)
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
           for _ in range(3)]
  decay = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  tx = axes.named(optax.chain(optax.adamw(1e-2, weight_decay=0.1, mask=decay), mup.scale_learning_rates(plan)))
  state = tx.init(params)
  # every Adam moment is named after its param (the μP transform adds no state)
  q = state.inner[0][0].mu["blocks"][0]["attention"]["q"]["kernel"]
  assert isinstance(q, axes.OptimizerState) and q.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")
  assert state.inner[1] == optax.EmptyState()

  single, sharded = helpers.single_and_sharded_steps(lambda: tx, params, grads)
  leaves = jax.tree.leaves(sharded, is_leaf=axes.is_variable)
  assert any(len(leaf.get_value().sharding.device_set) > 1 for leaf in leaves)
  for (path, a), (_, b) in zip(nnx.to_flat_state(single), nnx.to_flat_state(sharded)):
    assert b.get_metadata()["out_sharding"] == a.get_metadata()["out_sharding"]
    np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), rtol=0, atol=2e-6, err_msg=str(path))
  # and the sharded hidden update really is scaled: q (m = 2) moves ~lr/2 per entry, the embedding ~lr
  moved = lambda get: np.abs(np.asarray(get(sharded)[...]) - np.asarray(get(params)[...])).mean()
  assert moved(lambda t: t["blocks"][0]["attention"]["q"]["kernel"]) < 0.7 * moved(lambda t: t["embedding"])


def test_attention_and_logits_multipliers_are_exact():
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, BASE.vocab_size)
  plain = llama.Llama(BASE, rngs=nnx.Rngs(0))
  scaled = llama.Llama(BASE.replace(attention_multiplier=0.5, logits_multiplier=0.25), rngs=nnx.Rngs(0))
  # multiplying q's kernel by 0.5 scales every logit q.k by 0.5, like the knob (RoPE is linear in q)
  for block in plain.blocks:
    block.attention.q.kernel[...] = block.attention.q.kernel[...] * 0.5
  np.testing.assert_allclose(np.asarray(scaled(tokens)), 0.25 * np.asarray(plain(tokens)), rtol=2e-5, atol=1e-6)
  assert "attention_multiplier" not in BASE.to_dict()   # defaults stay out of checkpoint signatures
  with pytest.raises(ValueError, match="attention_multiplier"):
    BASE.replace(attention_multiplier=0.0)
  with pytest.raises(ValueError, match=r"attention_multiplier=0.5 scales softmax logits; \['linear'\]"):
    BASE.replace(attention="linear", attention_multiplier=0.5)


def test_bad_rules_base_and_multipliers_are_clear_errors():
  model = llama.Llama(BASE, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"no rule matches parameters \[.*attention_norm/scale"):
    mup.plan(model, model, [("embedding", "embedding"), (r".*kernel", "hidden")])
  with pytest.raises(ValueError, match="kind 'matrix'"):
    mup.plan(model, model, [(".*", "matrix")])
  with pytest.raises(ValueError, match=r"rules\[1\] 'lm_head' matches no parameter path"):
    mup.plan(model, model, [(".*", None), ("lm_head", "output")])
  with pytest.raises(ValueError, match="'embedding' is kind 'hidden' but not the kernel of a linear layer"):
    mup.plan(model, model, [("embedding", "hidden"), (".*", None)])
  with pytest.raises(ValueError, match="base: its parameter paths differ"):
    mup.plan(model, llama.Llama(BASE.replace(num_layers=2), rngs=nnx.Rngs(0)), [(".*", None)])
  with pytest.raises(ValueError, match="base.num_layers=2 differs"):
    parametrization.build(BASE, BASE.replace(num_layers=2), "mup")
  with pytest.raises(ValueError, match="parametrization='ntk'"):
    parametrization.build(BASE, BASE, "ntk")
  with pytest.raises(ValueError, match="positive finite"):
    mup.scale_learning_rates({"w": 0.0})
  tx = mup.scale_learning_rates({"w": 0.5})
  with pytest.raises(ValueError, match="no multiplier for parameter 'b'"):
    tx.update({"w": jnp.ones(2), "b": jnp.ones(2)}, tx.init(None))
