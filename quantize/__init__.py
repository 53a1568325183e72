"""Quantize stage: FP32 ONNX from the export stage → FP16 or INT4 (RTN / AWQ; standard QDQ or ORT MatMulNBits),
measured against FP32 and gated per deployment profile. `quantize_model` is the library entry point."""

from .config import Format, Method, QuantizeConfig, QuantizeResult, Sizes
from .stage import quantize_model

__all__ = ["Format", "Method", "QuantizeConfig", "QuantizeResult", "Sizes", "quantize_model"]
