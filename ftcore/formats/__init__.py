"""Files in and out: HF layout (config.json <-> ModelConfig, safetensors, hub), GGUF with its quants, tokenizers.

hf.py (load_pretrained, save_pretrained, name maps), safetensors.py (our mmap reader/writer), gguf.py
(reader and HF-layout import), quants.py (GGUF block dequantization), tokenizer.py (tokenizer + chat template).
"""
