#!/usr/bin/env bash
# Everything in issue 8 that needs a GPU: the CUDA parity tests (kernels, fused LoRA, 20 replayed graph
# steps against eager), then the two benchmarks behind the GPU targets. Needs torch with CUDA, nvcc
# (kernels/ builds on first use), transformers and peft; not hydra or wandb. Results and logs go to
# $OUT (the device tool brings that folder back), else bench/results/.
#   bash scripts/gpu_check.sh [all|tests|bench|graph]   # one stage per call fits a 10-minute limit
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$out/gpu.txt"
status=0
if [[ $stage == all || $stage == tests ]]; then
  python3 -m pytest -q -rs -m cuda tests/test_ops.py tests/test_lora_fused.py tests/test_cuda_graph.py \
    tests/test_activation_offload.py tests/test_vocab_stream.py \
    2>&1 | tee "$out/cuda_tests.log" || status=1
fi
if [[ $stage == all || $stage == bench ]]; then
  # 1B-class Llama shape, random weights: tokens/s, memory and MFU against HF+PEFT; ftcore-plain = no switches
  python3 scripts/bench.py --model llama-1b --batch 8 --seq-len 2048 --data random --steps 10 --warmup 3 \
    --fused-kernels --arms ftcore,ftcore-plain,hf --out "$out" 2>&1 | tee "$out/bench_llama1b.log" || status=1
fi
if [[ $stage == all || $stage == graph ]]; then
  # small model: the CUDA-graph step against the same step run eagerly, and HF for reference
  python3 scripts/bench.py --model smollm2-135m --batch 8 --seq-len 512 --data random --steps 20 --warmup 3 \
    --fused-kernels --cuda-graph --arms ftcore,ftcore-nograph,hf --out "$out" \
    2>&1 | tee "$out/bench_graph.log" || status=1
fi
exit $status
