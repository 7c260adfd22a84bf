#!/usr/bin/env bash
# Compile-check the kernels without a GPU: nvcc -c each .cu and g++ -fsyntax-only the bindings against
# the installed torch's headers (no link; runs with a CPU-only torch wheel too). Usage: kernels/check_build.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
py_inc="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# CPU wheels ship c10/cuda headers but not this generated one; an empty stand-in is enough to compile.
if [ ! -f "$torch_dir/include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$work/stub/c10/cuda/impl" && echo '#pragma once' > "$work/stub/c10/cuda/impl/cuda_cmake_macros.h"
fi
inc=(-I"$work/stub" -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" -I"$py_inc"
     -DTORCH_EXTENSION_NAME=ftcore_kernels)
for src in "$here"/*.cu; do
  nvcc -std=c++17 -O3 -c "$src" -o "$work/$(basename "$src").o" "${inc[@]}" --expt-relaxed-constexpr \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -Xcompiler -fPIC \
    -diag-suppress 3306 -Xcompiler -Wno-c++20-extensions
  echo "ok  $(basename "$src")"
done
g++ -std=c++17 -fsyntax-only -Wno-c++20-extensions "${inc[@]}" "$here/ftcore_kernels.cpp"
echo "ok  ftcore_kernels.cpp"
