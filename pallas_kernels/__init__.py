"""Pallas kernels with plain-jnp references, one folder per op (see DESIGN.md, "pallas_kernels/").

Note: `pallas_kernels.matmul` below is the *function*; reach an op's other parts with
`from pallas_kernels.matmul import tpu, cost, IMPLEMENTATIONS` (which reads the submodule).
"""
from pallas_kernels.matmul import matmul
from pallas_kernels.rms_norm import rms_norm

__all__ = ["matmul", "rms_norm"]
