"""The benchmark's results on disk: bench/results/<time>-<device>-<model>.json and the same as a markdown table."""

import json
from datetime import datetime
from pathlib import Path


def markdown(r: dict) -> str:
    """A header (model, batch, device, versions, switches), one table row per arm, FLOPs, ratios, targets, notes."""
    random = ", random weights" if r["random_weights"] else ""
    lines = [
        (f"**{Path(r['model']).name}** ({r['params'] / 1e6:.3g}M params{random}), LoRA r={r['lora']['r']} on "
         f"{r['lora']['targets']}, batch {r['batch']} x seq {r['seq_len']} packed ({r['data']}, "
         f"{100 * r['target_fraction']:.0f}% target tokens), {r['dtype']}, median of {r['steps']} steps after "
         f"{r['warmup']} warmup"),
        (f"on {r['device']}, {r['threads']} thread(s), torch {r['versions']['torch']}, transformers "
         f"{r['versions']['transformers']}, peft {r['versions']['peft']}; ftcore switches: {r['switches']}"),
        "",
        "| arm | step time (s) | CPU time (s) | tokens/s | vs HF+PEFT | peak memory (MiB) | vs HF+PEFT | TFLOP/s "
        "| MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    hf = r["arms"].get("hf")
    for name, a in r["arms"].items():
        speed = f"{a['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
        mem = f"{a['peak_mem_mb'] / hf['peak_mem_mb']:.2f}x" if hf else "-"
        mfu = f"{100 * a['mfu']:.1f}%" if a["mfu"] is not None else "n/a"
        label = {"hf": "HF transformers + PEFT"}.get(name, name)
        lines.append(f"| {label} | {a['step_time_s']:.3f} | {a['cpu_time_s']:.3f} | {a['tokens_per_s']:.0f} "
                     f"| {speed} | {a['peak_mem_mb']:.0f} ({a['mem_kind']}) | {mem} | {a['achieved_tflops']:.3f} "
                     f"| {mfu} |")  # fmt: skip
    lines += ["", f"FLOPs per token: {r['flops']['formula']}."]
    if "ftcore_vs_hf" in r["comparisons"]:
        c = r["comparisons"]["ftcore_vs_hf"]
        lines.append(f"ftcore vs HF+PEFT: {c['tokens_per_s']:.2f}x tokens/s (ratio of median step times), "
                     f"{c['tokens_per_s_paired_median']:.2f}x (median of per-step ratios, the arms alternating), "
                     f"{c['tokens_per_cpu_s']:.2f}x by CPU time (the work each step did; other processes' load "
                     "barely moves it).")  # fmt: skip
    for quant, what in (("gguf", "GGUF-native (ftcore-gguf)"), ("nf4", "NF4 base, QLoRA (ftcore-nf4)")):
        if f"{quant}_vs_ftcore" in r["comparisons"]:
            c = r["comparisons"][f"{quant}_vs_ftcore"]
            lines.append(f"{what} vs the unquantized base (ftcore): {c['tokens_per_s']:.2f}x tokens/s, "
                         f"{c['tokens_per_s_paired_median']:.2f}x (median of per-step ratios), {c['tokens_per_cpu_s']:.2f}x "
                         f"by CPU time; peak memory {c['peak_mem']:.2f}x.")  # fmt: skip
    if r["targets"]:
        met = ", ".join(f"{k} {v['got']:.3g} (goal {v['goal']}: {'met' if v['met'] else 'MISSED'})"
                        for k, v in r["targets"].items())  # fmt: skip
        lines.append(f"Targets: {met}.")
    lines += [f"- {n}" for n in r["notes"]]
    lines.append(f"\n`{r['command']}`")
    return "\n".join(lines) + "\n"


def write_results(result: dict, out: Path) -> tuple[Path, Path]:
    """out/<time>-<device slug>-<model>.json and .md; their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in result["device"].split("(")[0].strip()).strip("-").lower()
    model = "".join(c if c.isalnum() or c in "-." else "-" for c in Path(result["model"]).name.split(".gguf")[0])
    stem = f"{datetime.now():%Y%m%d-%H%M%S}-{slug}-{model}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    return out / f"{stem}.json", out / f"{stem}.md"
