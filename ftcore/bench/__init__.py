"""The parts of scripts/bench.py that are plain ftcore: random-weight shapes, packed batches, the worker
protocol, ftcore's arm and the results. The HF transformers + PEFT arm lives in scripts/bench_hf.py."""
