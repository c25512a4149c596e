"""Quantization: `QArray` formats (int8, packed int4/int3/int2, NF4, fp8, MX), RTN quantize/dequantize, SQNR,
`matmul(x, q)` through the weight-only Pallas kernels, PTQ methods (`gptq_quantize`, SmoothQuant) and
`quantize_model(model, rules, calibration_data)` (full-match path rules over any linear layer: `efficient.nn.Einsum`,
`nnx.Linear`, `nnx.Einsum`) with quantized replacement layers, basic QAT (LSQ), `check_finite` (quantizers refuse
NaN/Inf) and format-checked checkpoints (`save_quantized` / `load_quantized`)."""
from efficient.quant.formats import FORMATS, Format
from efficient.quant.qarray import (QArray, bytes_per_param, check_finite, dequantize, matmul, nbytes, quantize,
                                    sqnr_db)
from efficient.quant.calibrate import gptq_quantize, rtn_quantize, smoothquant_scales
from efficient.quant.layers import LLMInt8Einsum, QuantizedEinsum, QuantizedWeight
from efficient.quant.rules import QuantConfig, quantize_model
from efficient.quant.qat import QATConfig, convert_qat, prepare_qat
from efficient.quant.checkpoint import load_quantized, save_quantized

__all__ = ["FORMATS", "Format", "LLMInt8Einsum", "QArray", "QATConfig", "QuantConfig", "QuantizedEinsum",
           "QuantizedWeight", "bytes_per_param", "check_finite", "convert_qat", "dequantize", "gptq_quantize",
           "load_quantized", "matmul", "nbytes", "prepare_qat", "quantize", "quantize_model", "rtn_quantize",
           "save_quantized", "smoothquant_scales", "sqnr_db"]
