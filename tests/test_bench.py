"""scripts/bench.py end to end on a tiny model (both arms run, the JSON and markdown results are written);
ftcore.bench's random batches and the memory readings."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ftcore.data.format import IGNORE
from ftcore.formats.hf import save_pretrained
from ftcore.model import ModelConfig, Transformer

ROOT = Path(__file__).parents[1]


def test_bench_tiny(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      tie_word_embeddings=True)  # fmt: skip
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_pretrained(model, tmp_path / "tiny")
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--model", str(tmp_path / "tiny"), "--data", "random",
           "--batch", "2", "--seq-len", "64", "--steps", "2", "--warmup", "0", "--threads", "1", "--device", "cpu",
           "--arms", "ftcore,hf", "--fused-lora", "--out", str(tmp_path / "results"), "--note", "a test"]  # fmt: skip
    assert bench.main(argv) == 0  # this process is the parent; the two arms run in worker processes
    (json_path,) = (tmp_path / "results").glob("*.json")
    (md_path,) = (tmp_path / "results").glob("*.md")
    result = json.loads(json_path.read_text())
    assert result["device_type"] == "cpu" and result["device"] and result["versions"]["torch"]
    assert result["versions"]["transformers"] and result["versions"]["peft"]
    assert (result["batch"], result["seq_len"], result["dtype"]) == (2, 64, "fp32")
    assert result["flops"]["per_token"] > 4 * result["flops"]["matmul_params_N"] > 0
    assert set(result["arms"]) == {"ftcore", "hf"} and result["switches"]["fused_lora"] is True
    for arm in result["arms"].values():
        assert len(arm["step_times_s"]) == 2 and arm["step_time_s"] > 0 and arm["tokens_per_s"] > 0
        assert len(arm["cpu_times_s"]) == 2 and arm["cpu_time_s"] > 0
        assert arm["peak_mem_mb"] > 0 and arm["mem_kind"] == "RSS" and arm["achieved_tflops"] > 0
        assert arm["mfu"] is None  # no known CPU peak
        assert arm["trainable_params"] == result["arms"]["hf"]["trainable_params"]  # same LoRA on both
    # same weights, same batch, adapters zero at first: the first losses agree
    first = [arm["losses"][0] for arm in result["arms"].values()]
    assert max(first) - min(first) < 1e-4
    assert result["comparisons"]["ftcore_vs_hf"]["tokens_per_s"] > 0
    assert result["notes"][0] == "a test"
    table = md_path.read_text()
    assert "| HF transformers + PEFT |" in table and "FLOPs per token: 4N" in table
    assert result["command"].startswith("python scripts/bench.py --model ")


def test_random_batches_and_memory():
    from ftcore.bench.batches import random_batches
    from ftcore.train.memory import memory_mb, peak_rss_gb, reset_peak_rss

    batches = random_batches(vocab=97, B=2, T=64, n=3)
    assert len(batches) == 3 and batches[0]["input_ids"].shape == (2, 64)
    again = random_batches(vocab=97, B=2, T=64, n=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))  # seeded
    assert int(batches[0]["input_ids"].max()) < 97 and (batches[0]["targets"] != IGNORE).any()
    reset_peak_rss()
    now, kind = memory_mb(torch.device("cpu"))
    peak, _ = memory_mb(torch.device("cpu"), peak=True)
    if Path("/proc/self/status").is_file():
        assert kind == "RSS" and 0 < now <= peak + 1 and abs(peak_rss_gb() * 1024 - peak) < 64


def test_memory_mode_bytes_per_parameter(tmp_path):
    """scripts/bench.py --memory's measurements on a small linear-heavy shape: fp32 4 bytes and bf16 2 bytes per
    base parameter exactly; nf4 about half a byte for the decoder's linears plus bf16 embeddings; each format's
    loading peak near what it keeps."""
    from ftcore.bench.memory import memory_markdown, memory_rows, write_random_checkpoint

    shape = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 256,
             "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": True}  # fmt: skip
    rows = {r["format"]: r for r in memory_rows(write_random_checkpoint(shape, tmp_path / "m"))}
    linears = 4 * (4 * 256 * 256 + 3 * 256 * 768)
    params = linears + 256 * 256 + 9 * 256  # + tied embedding, 9 norms
    assert {r["params"] for r in rows.values()} == {params}
    assert rows["float32"]["bytes_per_param"] == pytest.approx(4.0, abs=1e-3)  # (+ RoPE's inv_freq buffer)
    assert rows["bfloat16"]["bytes_per_param"] == pytest.approx(2.0, abs=1e-3)
    nf4 = linears * (0.5 + 1 / 64) + (params - linears) * 2  # codes, absmax codes; the rest bf16
    assert rows["nf4"]["stored_bytes"] == pytest.approx(nf4, rel=0.01)
    assert "| nf4 | " in memory_markdown(list(rows.values()), "tiny", "test")


def test_dist_memory_status_parser_and_criteria():
    """--dist-memory's pure parts: /proc/self/status's Vm* fields in bytes; the criteria from rank records."""
    from ftcore.bench.dist_memory import summarize, vm_bytes

    status = "Name:\tpython\nVmPeak:\t  2048 kB\nVmHWM:\t    1024 kB\nVmRSS:\t     512 kB\nRssAnon:\t  384 kB\n"
    assert vm_bytes(status + "Threads:\t4\n") == {"VmPeak": 2 << 20, "VmHWM": 1 << 20, "VmRSS": 512 << 10,
                                                  "RssAnon": 384 << 10}  # fmt: skip
    big = {"name": "embed_tokens.weight", "bytes": 100, "params": 1000}

    def rank(r, train, **kw):
        return {"rank": r, "baseline_rss": 10, "train_hwm": train, "hwm_after": {"loop": train}, **kw}

    runs = {"single": {"ranks": [rank(0, 1010, largest_tensor=big, export_start_rss=500, export_hwm=520)]},
            "fsdp": {"ranks": [rank(0, 610, export_start_rss=300, export_hwm=411), rank(1, 660)]}}  # fmt: skip
    c = summarize(runs)
    assert c["train_ratio"]["got"] == pytest.approx(0.65) and c["train_ratio"]["met"]
    assert c["export"]["got"] == 111 and not c["export"]["met"]  # limit 110: the largest tensor + 10%
    assert runs["fsdp"]["ranks"][1]["train_growth"] == 650 and "export_growth" not in runs["fsdp"]["ranks"][1]
