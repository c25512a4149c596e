"""Efficient Sequence Packing's claim: a train step on packed rows with segment ids (block-diagonal attention,
positions restarting per document) gives the loss and gradients of the unpacked, padded batch; dropping the
segment mask does not. Checked for the softmax Llama and for a hybrid (linear, Based, window) one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient.attention import BasedConfig, LinearAttentionConfig
from efficient.data import pack_documents
from efficient.models import llama
from efficient.train import batch_loss

MODELS = {
    "softmax": llama.TINY,
    "hybrid": llama.TINY.replace(
        num_layers=3, attention_schedule="linear,based,window", sliding_window=4,
        linear_attention=LinearAttentionConfig(feature_map="elu1", chunk_size=8),
        based=BasedConfig(linear=LinearAttentionConfig(feature_map="taylor", feature_dim=4, chunk_size=8))),
}


def _documents():
  rng = np.random.default_rng(0)
  return [rng.integers(1, 256, size=n).astype(np.int32) for n in (6, 10, 5)]  # 5 + 9 + 4 = 18 pairs


def _loss_and_grads(model, batch):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fn = lambda p, b: batch_loss(nnx.merge(graphdef, p, rest), b)[0]
  loss, grads = jax.jit(jax.value_and_grad(fn))(params, {k: jnp.asarray(v) for k, v in batch.items()})
  return float(loss), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))


def _max_rel_error(a, b):
  errors = jax.tree.leaves(jax.tree.map(lambda x, y: np.abs(x - y).max() / (np.abs(y).max() + 1e-12), a, b))
  return max(errors)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_step_equals_unpacked(name):
  model = llama.Llama(MODELS[name], rngs=nnx.Rngs(0))
  docs = _documents()
  packed = pack_documents(docs, seq_len=20)  # one row: 18 real pairs + 2 padding
  assert packed["tokens"].shape == (1, 20) and packed["segment_ids"].max() == 3
  rows = [pack_documents([d], seq_len=9) for d in docs]  # one document per row, right-padded
  unpacked = {k: np.concatenate([r[k] for r in rows]) for k in packed}
  assert packed["loss_mask"].sum() == unpacked["loss_mask"].sum() == 18

  loss_packed, grads_packed = _loss_and_grads(model, packed)
  loss_unpacked, grads_unpacked = _loss_and_grads(model, unpacked)
  assert abs(loss_packed - loss_unpacked) <= 1e-5 * abs(loss_unpacked)
  assert _max_rel_error(grads_packed, grads_unpacked) < 1e-4

  no_mask = dict(packed, segment_ids=np.where(packed["loss_mask"] > 0, 1, 0).astype(np.int32))
  loss_no_mask, grads_no_mask = _loss_and_grads(model, no_mask)
  assert abs(loss_no_mask - loss_unpacked) > 1e-3 * abs(loss_unpacked)  # documents leak into each other
  assert _max_rel_error(grads_no_mask, grads_unpacked) > 1e-2
