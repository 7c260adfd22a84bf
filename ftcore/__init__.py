"""ftcore: readable PyTorch fine-tuning for Llama-family models."""

from ftcore.formats.gguf import import_gguf
from ftcore.formats.hf import load_pretrained, save_pretrained

__all__ = ["load_pretrained", "save_pretrained", "import_gguf"]
