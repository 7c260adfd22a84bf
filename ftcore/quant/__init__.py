"""Quantized frozen bases: blockwise 4-bit NF4/FP4 with double quantization (fourbit.py)."""

from ftcore.quant.fourbit import Quantized4bit, dequantize_4bit, quantize_4bit

__all__ = ["Quantized4bit", "dequantize_4bit", "quantize_4bit"]
