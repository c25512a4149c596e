"""Quantization: `QArray` formats (int8, packed int4/int3/int2, NF4, fp8, MX), RTN quantize/dequantize, SQNR,
and `matmul(x, q)` through the weight-only Pallas kernels."""
from efficient.quant.formats import FORMATS, Format
from efficient.quant.qarray import QArray, bytes_per_param, dequantize, matmul, nbytes, quantize, sqnr_db

__all__ = ["FORMATS", "Format", "QArray", "bytes_per_param", "dequantize", "matmul", "nbytes", "quantize", "sqnr_db"]
