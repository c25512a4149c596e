"""Sparsity: masks (unstructured, global, N:M, block), compressed storage (N:M values + packed indices, bitmask,
block-sparse BSR for `pallas_kernels.block_sparse_matmul`), pruning (`sparse.prune`: magnitude, Wanda, SparseGPT by
full-match path rules over any linear layer), sparse layers (`sparse.layers`) and sparse training with RigL (`sparse.training`)."""
from efficient.sparse.masks import (SparsityMask, block_mask, global_masks, is_nm_sparse, mask_variable, nm_mask,
                                    sparsity_of, unstructured_mask)
from efficient.sparse.storage import BitmaskArray, NMArray, compress_bitmask, compress_blocks, compress_nm

__all__ = ["BitmaskArray", "NMArray", "compress_bitmask", "SparsityMask", "block_mask", "compress_blocks", "compress_nm", "global_masks",
           "is_nm_sparse", "mask_variable", "nm_mask", "sparsity_of", "unstructured_mask"]
