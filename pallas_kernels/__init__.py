"""Pallas kernels with plain-jnp references, one folder per op (see the README, "Design").

Note: `pallas_kernels.matmul` below is the *function*; reach an op's other parts with
`from pallas_kernels.matmul import tpu, cost, IMPLEMENTATIONS` (which reads the submodule).
`implementation(name)` is the policy context for every op called with `implementation=None` (see `_dispatch`).
"""
from pallas_kernels._dispatch import ALL_IMPLEMENTATIONS, current_implementation, implementation
from pallas_kernels.block_sparse_matmul import block_sparse_matmul
from pallas_kernels.flash_attention import flash_attention, flash_decode
from pallas_kernels.grouped_matmul import grouped_matmul, transposed_grouped_matmul
from pallas_kernels.int8_matmul import int8_matmul
from pallas_kernels.linear_attention import linear_attention
from pallas_kernels.lowbit_adam import blockwise_adam_update
from pallas_kernels.matmul import matmul
from pallas_kernels.quant_matmul import quant_matmul
from pallas_kernels.rms_norm import rms_norm

__all__ = ["ALL_IMPLEMENTATIONS", "block_sparse_matmul", "blockwise_adam_update", "current_implementation",
           "flash_attention", "flash_decode", "grouped_matmul", "implementation", "int8_matmul", "linear_attention",
           "matmul", "quant_matmul", "rms_norm", "transposed_grouped_matmul"]
