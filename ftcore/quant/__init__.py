"""Quantized frozen bases: blockwise 4-bit NF4/FP4 with double quantization (fourbit.py) and the frozen
linear layer that keeps its weight 4-bit (linear.py)."""

from ftcore.quant.fourbit import Quantized4bit, dequantize_4bit, quantize_4bit
from ftcore.quant.linear import Linear4bit

__all__ = ["Linear4bit", "Quantized4bit", "dequantize_4bit", "quantize_4bit"]
