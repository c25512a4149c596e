"""efficient.sparse.moe against an independent dense reference (every token through each of its k experts by a
loop over experts, weighted by its renormalized gate), capacity dropping by hand, the load-balance loss, bad
input, and expert-parallel (data:2, expert:4) == single device."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient import sharding
from efficient.models import llama
from efficient.models import moe as moe_models
from efficient.sparse import moe
from efficient.train import masked_cross_entropy
from tests.helpers import TOLERANCE, assert_close

F32 = TOLERANCE[jnp.dtype(jnp.float32)]


def _swiglu(x, gate, up, down):
  return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def reference_kept(experts: np.ndarray, num_experts: int, capacity: int | None) -> np.ndarray:
  """[N, k] bool: pairs take slots choice-major (all first choices, then second, ...), by token within a rank."""
  num_tokens, top_k = experts.shape
  kept = np.zeros(experts.shape, bool)
  used = [0] * num_experts
  for choice in range(top_k):
    for token in range(num_tokens):
      e = experts[token, choice]
      if capacity is None or used[e] < capacity:
        kept[token, choice] = True
        used[e] += 1
  return kept


def reference_moe(x, router, gate, up, down, *, experts, kept):
  """Dense MoE: every expert runs on every token; the combine weights select the kept top-k choices. `experts`
  and `kept` are concrete (routing is piecewise constant, so gradients need only the gate values)."""
  num_experts = gate.shape[0]
  probs = jax.nn.softmax(x @ router, axis=-1)
  chosen = jnp.take_along_axis(probs, jnp.asarray(experts), axis=1)
  gates = chosen / chosen.sum(-1, keepdims=True) * jnp.asarray(kept)
  combine = jnp.einsum("nk,nke->ne", gates, jax.nn.one_hot(experts, num_experts))
  y = jnp.zeros_like(x)
  for e in range(num_experts):
    y = y + combine[:, e:e + 1] * _swiglu(x, gate[e], up[e], down[e])
  return y


@functools.partial(jax.jit, static_argnames=("top_k", "capacity", "drop_overflow"))
def _moe_forward(*args, top_k, capacity, drop_overflow):
  return moe.moe_forward(*args, top_k=top_k, capacity=capacity, drop_overflow=drop_overflow)


def _weights(key, n, d, e, f):
  ks = jax.random.split(key, 5)
  return (jax.random.normal(ks[0], (n, d)), jax.random.normal(ks[1], (d, e)),
          jax.random.normal(ks[2], (e, d, f)) / d**0.5, jax.random.normal(ks[3], (e, d, f)) / d**0.5,
          jax.random.normal(ks[4], (e, f, d)) / f**0.5)


def test_forward_and_gradients_match_dense_reference():
  drop_overflow = True  # the dropless path is checked against the reference in the hand-built case below
  n, d, e, f, k, capacity = 48, 16, 4, 8, 2, 20  # 96 pairs over 4 experts, 20 slots each: some overflow
  args = _weights(jax.random.key(0), n, d, e, f)
  experts = np.asarray(jax.lax.top_k(jax.nn.softmax(args[0] @ args[1]), k)[1])
  kept = reference_kept(experts, e, capacity if drop_overflow else None)
  routed = np.bincount(experts.ravel(), minlength=e)
  assert routed.max() > capacity  # the case exercises overflow
  run = lambda *a: _moe_forward(*a, top_k=k, capacity=capacity, drop_overflow=drop_overflow)
  y, stats = run(*args)
  assert_close("moe forward", y, reference_moe(*args, experts=experts, kept=kept), F32)
  overflow = int(np.maximum(routed - capacity, 0).sum())
  assert int(stats["overflow"]) == overflow
  assert int(stats["dropped"]) == (overflow if drop_overflow else 0) == n * k - kept.sum()
  np.testing.assert_array_equal(stats["routed_per_expert"], routed)
  np.testing.assert_array_equal(stats["tokens_per_expert"], [kept[experts == i].sum() for i in range(e)])
  probs = np.asarray(jax.nn.softmax(args[0] @ args[1]))  # E * sum_e f_e P_e over the routed pairs
  assert float(stats["load_balance_loss"]) == pytest.approx(e * np.sum(routed / (n * k) * probs.mean(0)), rel=1e-5)

  # bf16 compute (f32 accumulation) against the f32 reference on the bf16-rounded inputs (same routing).
  args16 = [a.astype(jnp.bfloat16) for a in args]
  y16, _ = run(*args16)
  assert y16.dtype == jnp.bfloat16
  rounded = [a.astype(jnp.float32) for a in args16]
  experts16 = np.asarray(jax.lax.top_k(jax.nn.softmax(rounded[0] @ rounded[1]), k)[1])
  assert_close("moe forward bf16", y16.astype(jnp.float32),
               reference_moe(*rounded, experts=experts16, kept=reference_kept(experts16, e, capacity)),
               TOLERANCE[jnp.dtype(jnp.bfloat16)])

  cotangent = jax.random.normal(jax.random.key(1), (n, d))
  ours = jax.jit(jax.grad(lambda *a: jnp.sum(run(*a)[0] * cotangent), argnums=range(5)))(*args)
  theirs = jax.jit(jax.grad(lambda *a: jnp.sum(reference_moe(*a, experts=experts, kept=kept) * cotangent),
                            argnums=range(5)))(*args)
  for name, a, b in zip(("x", "router", "gate", "up", "down"), ours, theirs):
    assert_close(f"d{name}", a, b, F32)


def test_capacity_drops_by_choice_major_priority_and_empty_experts_work():
  # Router = identity, so token logits are the rows below: tokens 0, 1 prefer expert 0 then 1; tokens 2, 3
  # prefer 1 then 0; experts 2 and 3 get nothing. capacity = ceil(1.0 * 4 tokens * 2 / 4) = 2: expert 0 fills
  # with the first choices of tokens 0, 1 before the second choices of tokens 2, 3 arrive (and vice versa), so
  # every token keeps exactly its first choice and 4 pairs are dropped.
  x = jnp.array([[3.0, 2.0, 0, 0], [2.5, 1.0, 0, 0], [2.0, 3.0, 0, 0], [1.0, 2.5, 0, 0]])
  router = jnp.eye(4)
  _, _, gate, up, down = _weights(jax.random.key(2), 4, 4, 4, 3)
  config = moe.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, drop_overflow=True)
  assert config.capacity(4) == 2
  y, stats = _moe_forward(x, router, gate, up, down, top_k=2, capacity=2, drop_overflow=True)
  probs = np.asarray(jax.nn.softmax(x, axis=-1))
  first, second = [0, 0, 1, 1], [1, 1, 0, 0]
  expected = np.stack([probs[t, first[t]] / (probs[t, first[t]] + probs[t, second[t]]) *
                       np.asarray(_swiglu(x[t], gate[first[t]], up[first[t]], down[first[t]])) for t in range(4)])
  assert_close("capacity-dropped forward", y, expected, F32)
  np.testing.assert_array_equal(stats["tokens_per_expert"], [2, 2, 0, 0])
  np.testing.assert_array_equal(stats["routed_per_expert"], [4, 4, 0, 0])
  assert int(stats["dropped"]) == 4 and float(stats["dropped_fraction"]) == 0.5
  # Empty experts receive zero-row groups: finite output and zero weight gradients.
  grads = jax.jit(jax.grad(lambda g: moe.moe_forward(x, router, g, up, down, top_k=2, capacity=2,
                                                     drop_overflow=True)[0].sum()))(gate)
  assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads[2:]) == 0) and np.any(np.asarray(grads[:2]) != 0)
  # Dropless: nothing dropped, the same overflow counted, every choice contributes.
  y_all, stats_all = _moe_forward(x, router, gate, up, down, top_k=2, capacity=2, drop_overflow=False)
  assert int(stats_all["dropped"]) == 0 and int(stats_all["overflow"]) == 4
  experts = np.array([first, second]).T
  assert_close("dropless forward", y_all,
               reference_moe(x, router, gate, up, down, experts=experts, kept=np.ones((4, 2), bool)), F32)


def test_load_balance_and_z_loss_values():
  # Two experts, every pair routed to expert 0 (f = [1, 0]) with mean probabilities P = [0.75, 0.25]:
  # E * sum f P = 2 * 0.75 = 1.5. Uniform routing gives exactly 1.
  probs = jnp.array([[0.9, 0.1], [0.6, 0.4]])
  assert float(moe.load_balance_loss(probs, jnp.array([2, 0]))) == pytest.approx(1.5)
  assert float(moe.load_balance_loss(jnp.full((4, 2), 0.5), jnp.array([2, 2]))) == pytest.approx(1.0)
  logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0]])  # logsumexp: ln 2, ln 4
  assert float(moe.router_z_loss(logits)) == pytest.approx((np.log(2) ** 2 + np.log(4) ** 2) / 2, rel=1e-6)


def test_bad_config_and_layers_raise():
  for kwargs, name in [(dict(num_experts=0), "num_experts"), (dict(num_experts=4, top_k=5), "top_k"),
                       (dict(top_k=0), "top_k"), (dict(capacity_factor=0.0), "capacity_factor"),
                       (dict(capacity_factor=-1.0), "capacity_factor"), (dict(load_balance_weight=-1.0),
                                                                          "load_balance_weight"),
                       (dict(router_z_weight=-0.1), "router_z_weight"), (dict(expert_dim=0), "expert_dim"),
                       (dict(implementation="cuda"), "implementation")]:
    with pytest.raises(ValueError, match=f"MoEConfig.{name}"):
      moe.MoEConfig(**kwargs)
  with pytest.raises(ValueError, match="layers"):
    moe_models.moe_llama(llama.TINY, moe.MoEConfig(num_experts=2, top_k=1), rngs=nnx.Rngs(0), layers=[5])


def _tiny_moe_llama():
  config = llama.TINY.replace(num_layers=1, mlp_dim=32)
  return moe_models.moe_llama(config, moe.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, router_z_weight=1e-3),
                       rngs=nnx.Rngs(0))


def test_moe_llama_swaps_only_the_chosen_blocks():
  # Abstract (eval_shape): the structure is what matters here, and eager initialization costs seconds.
  model = nnx.eval_shape(lambda: moe_models.moe_llama(llama.TINY, moe.MoEConfig(num_experts=2, top_k=1),
                                               rngs=nnx.Rngs(0), layers=[1]))
  assert isinstance(model.blocks[0].mlp, llama.MLP) and isinstance(model.blocks[1].mlp, moe.MoEMLP)
  assert list(moe.moe_layers(model)) == ["blocks/1/mlp"]
  assert model.blocks[1].mlp.gate.shape == (2, llama.TINY.embed_dim, llama.TINY.mlp_dim)


def test_expert_parallel_forward_and_gradient_equal_single_device():
  tokens = jax.random.randint(jax.random.key(4), (4, 16), 0, llama.TINY.vocab_size, dtype=jnp.int32)
  targets = jnp.roll(tokens, -1, axis=1)

  def loss_logits_and_grads(model, tokens, targets):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def fn(params):
      with moe.capture_routing() as routing:
        logits = nnx.merge(graphdef, params, rest)(tokens)
      ce = masked_cross_entropy(logits, targets, jnp.ones(targets.shape))[0]
      aux = moe.moe_aux_loss(routing)
      return ce + aux["loss"], (logits, ce, aux)

    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

  single = _tiny_moe_llama()
  (loss, (logits, ce, aux)), grads = loss_logits_and_grads(single, tokens, targets)
  stats = aux["layers"]["blocks/0/mlp"]
  assert float(loss) == pytest.approx(float(ce) + 0.01 * float(stats["load_balance_loss"])
                                      + 1e-3 * float(stats["router_z_loss"]), rel=1e-6)

  mesh = sharding.make_mesh("data:2,expert:4")
  model = nnx.clone(single)
  assert sharding.shard_model(model, mesh, "ep") == []
  gate = model.blocks[0].mlp.gate[...]
  assert gate.sharding.shard_shape(gate.shape) == (1,) + gate.shape[1:]  # one expert per device column
  batch_sharding = sharding.batch_sharding(mesh, "ep")
  with jax.set_mesh(mesh):
    (sharded_loss, (sharded_logits, _, sharded_aux)), sharded_grads = loss_logits_and_grads(
        model, jax.device_put(tokens, batch_sharding), jax.device_put(targets, batch_sharding))
  assert len(sharded_logits.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded_logits), np.asarray(logits), atol=2e-5, rtol=1e-5)
  assert float(sharded_loss) == pytest.approx(float(loss), rel=1e-6)
  np.testing.assert_array_equal(sharded_aux["layers"]["blocks/0/mlp"]["tokens_per_expert"],
                                stats["tokens_per_expert"])
  flat, sharded_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(sharded_grads))
  for path, value in flat:
    assert_close("grad " + "/".join(map(str, path)), sharded_flat[path][...], value[...], F32)
