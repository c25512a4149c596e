"""paged_decode kernels exported for TPU (Mosaic) and CUDA (Triton) from a CPU host at the canonical shapes:
SmolLM2 heads (H 9, H_kv 3, D 64) and a D = 128 case (H 8, H_kv 2); batch 4, 2048-token page tables of
32-token pages over a shared pool; float (bf16) and int8 / int4 pages."""
import functools

import jax
import jax.numpy as jnp
import pytest

# No dispatch: `_run` forces 'pallas_tpu'/'pallas_gpu' on a CPU host.
from pallas_kernels.paged_decode import _run
from tests.helpers import LOWERING_TARGETS, export_lowered, kernel_calls

BATCH, PAGE_SIZE, MAX_PAGES = 4, 32, 64  # 2048 tokens per sequence
NUM_PAGES = BATCH * MAX_PAGES


def _args(num_heads, num_kv_heads, head_dim, bits, page_size=PAGE_SIZE):
  pool = lambda last, dtype: jax.ShapeDtypeStruct((NUM_PAGES, page_size, num_kv_heads, last), dtype)
  if bits is None:
    pages = {"k": pool(head_dim, jnp.bfloat16), "v": pool(head_dim, jnp.bfloat16)}
  else:
    pages = {}
    for name in ("k", "v"):
      pages |= {name: pool(head_dim * bits // 8, jnp.uint8), f"{name}_scale": pool(1, jnp.float32),
                f"{name}_zero": pool(1, jnp.uint8)}
  return [jax.ShapeDtypeStruct((BATCH, num_heads, head_dim), jnp.bfloat16), pages,
          jax.ShapeDtypeStruct((BATCH, MAX_PAGES), jnp.int32), jax.ShapeDtypeStruct((BATCH,), jnp.int32)]


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 2, 128)], ids=["smollm2_d64", "d128"])
@pytest.mark.parametrize("platform", LOWERING_TARGETS)
def test_paged_decode_lowers(platform, heads, bits):
  implementation, marker = LOWERING_TARGETS[platform]
  op = functools.partial(_run, implementation=implementation, bits=bits)
  exported = export_lowered(op, platform, *_args(*heads, bits))
  assert exported.out_avals[0].shape == (BATCH, heads[0], heads[2]) and kernel_calls(exported, marker) == 1


@pytest.mark.parametrize("platform", LOWERING_TARGETS)
def test_paged_decode_lowers_with_pages_per_block_and_splits(platform):
  implementation, marker = LOWERING_TARGETS[platform]
  op = functools.partial(_run, implementation=implementation, bits=4, pages_per_block=4, num_splits=8)
  assert kernel_calls(export_lowered(op, platform, *_args(9, 3, 64, 4)), marker) == 1


@pytest.mark.parametrize("platform, bits, page_size, message", [
    ("tpu", None, 8, r"page_size=8 does not fit the TPU tiling: .* multiple of 16"),  # bf16 pages: 16 rows
    ("tpu", 8, 16, r"page_size=16 does not fit the TPU tiling: .* multiple of 32"),  # uint8 codes: 32 rows
    ("cuda", None, 8, r"page_size=8 does not fit the GPU \(Triton\) kernel"),
])
def test_paged_decode_rejects_pages_that_do_not_tile(platform, bits, page_size, message):
  implementation, _ = LOWERING_TARGETS[platform]
  op = functools.partial(_run, implementation=implementation, bits=bits)
  with pytest.raises(ValueError, match=message):
    export_lowered(op, platform, *_args(9, 3, 64, bits, page_size=page_size))
