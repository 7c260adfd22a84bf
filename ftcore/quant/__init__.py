"""Quantized frozen bases: blockwise 4-bit NF4/FP4 with double quantization (fourbit.py), the frozen linear
layer over quantized storage and the weight tensor it shows adapters (weight.py), its 4-bit form (linear.py),
and a GGUF file's blocks kept as they are (gguf.py: LinearGGUF, EmbeddingGGUF, model.quantize=gguf)."""

from ftcore.quant.fourbit import Quantized4bit, dequantize_4bit, quantize_4bit
from ftcore.quant.gguf import EmbeddingGGUF, LinearGGUF
from ftcore.quant.linear import Linear4bit
from ftcore.quant.weight import QuantizedWeight, QuantLinear, QuantStorage

__all__ = ["EmbeddingGGUF", "Linear4bit", "LinearGGUF", "QuantLinear", "QuantStorage", "QuantizedWeight", "Quantized4bit",
           "dequantize_4bit", "quantize_4bit"]
