"""Sparsity: masks (unstructured, global, N:M, block), compressed storage (N:M values + packed indices, block-sparse
BSR for `pallas_kernels.block_sparse_matmul`), pruning (magnitude, Wanda, SparseGPT) applied by path rules."""
from efficient.sparse.masks import (SparsityMask, block_mask, global_masks, is_nm_sparse, mask_variable, nm_mask,
                                    sparsity_of, unstructured_mask)
from efficient.sparse.storage import BitmaskArray, NMArray, compress_bitmask, compress_blocks, compress_nm

__all__ = ["BitmaskArray", "NMArray", "compress_bitmask", "SparsityMask", "block_mask", "compress_blocks", "compress_nm", "global_masks",
           "is_nm_sparse", "mask_variable", "nm_mask", "sparsity_of", "unstructured_mask"]
