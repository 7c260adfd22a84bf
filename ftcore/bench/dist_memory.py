"""Peak memory of each rank of a training run, 1 process vs 2 (FSDP2 on CPU, gloo): scripts/bench.py --dist-memory.

    parent (scripts/bench.py)                        each rank: python -m ftcore.bench.dist_memory OUT train.py ...
    --------------------------------------------     --------------------------------------------------------------
    python   -m ftcore.bench.dist_memory  ...          baseline = VmRSS after `import torch, ftcore.train.loop`;
        scripts/train.py dist=single ...               VmHWM reset there (/proc/self/clear_refs)
    torchrun --nproc_per_node=2 -m ... (same)          runpy: scripts/train.py as __main__, with
        scripts/train.py dist=fsdp ...                   loop.load, .adapt, .loop wrapped: VmHWM after each
    read OUT/rank<k>.json of each run                    loop.save_final wrapped: VmHWM before it (the train peak),
    -> criteria, .json + .md                             reset, VmHWM after it (the export peak; rank 0 only)
                                                       OUT/rank<RANK>.json at exit

Peak RSS growth: a VmHWM minus the baseline (load + train), or minus the RSS when save_final starts (the
export). Both runs see the same global batch: 1 process takes 2 micro-batches of 1 per step, each of 2 ranks one.
No ftcore library code changes for it: the probe wraps the functions of ftcore.train.loop that train() calls
(load, adapt, loop, save_final), as module attributes.
"""

import json
import os
import runpy
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ftcore.train.memory import reset_peak_rss

EXPORT_SLACK = 0.10  # rank 0's export peak growth <= the largest tensor + 10%
TRAIN_RATIO_GOAL = 0.65  # 2-process per-rank train peak (max over ranks) / 1-process train peak
RUNS = {"single": 1, "fsdp": 2}  # dist backend -> processes
# ftcore.train.loop's phases before the export, as train() calls them: the base and the data; the PEFT method,
# optimizer and (FSDP2) sharding; the steps and the last checkpoint. Then finish(): save_final (the export).
PHASES = ("load", "adapt", "loop")


def vm_bytes(status_text: str) -> dict[str, int]:
    """The Vm* and Rss* fields of a /proc/<pid>/status text, in bytes ("VmHWM:  1024 kB" -> {"VmHWM": 1048576})."""
    out = {}
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key.startswith(("Vm", "Rss")) and value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


def vm() -> dict[str, int]:
    """This process's VmRSS, VmHWM, RssAnon, RssFile... (one read: all of the same moment)."""
    return vm_bytes(Path("/proc/self/status").read_text())


def largest_tensor(model) -> dict:
    """The model's largest parameter or buffer (tied ones once): name, shape, dtype, bytes; and the parameter count."""
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    name, t = max(named.items(), key=lambda kv: kv[1].numel() * kv[1].element_size())
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "bytes": t.numel() * t.element_size(), "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def probe(out_dir: Path, script: str, argv: list[str]):
    """Run `script argv` (scripts/train.py, Hydra) as __main__ in this process, recording this rank's peaks."""
    import ftcore.train.loop as loop

    rank = int(os.environ.get("RANK", "0"))
    rec = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    reset_peak_rss()
    rec["baseline_rss"] = vm()["VmRSS"]
    rec["hwm_after"], rec["rss_after"] = {}, {}  # the phases' ends: VmHWM so far; RSS now, anonymous and file
    save_final = loop.save_final

    def mark(phase, fn):
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                now = vm()
                rec["hwm_after"][phase] = now["VmHWM"]
                rec["rss_after"][phase] = {"anon": now.get("RssAnon"), "file": now.get("RssFile")}

        return wrapped

    def save_wrapped(model, tokenizer, cfg, out, *rest):
        rec["train_hwm"] = vm()["VmHWM"]
        rec["largest_tensor"] = largest_tensor(model)
        reset_peak_rss()
        rec["export_start_rss"] = vm()["VmRSS"]
        try:
            return save_final(model, tokenizer, cfg, out, *rest)
        finally:
            rec["export_hwm"] = vm()["VmHWM"]
            rec["export_bytes"] = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())

    for phase in PHASES:
        setattr(loop, phase, mark(phase, getattr(loop, phase)))
    loop.save_final = save_wrapped
    sys.argv = [script, *argv]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as `python script` would (train.py imports hydra_schema)
    start = time.perf_counter()
    try:
        runpy.run_path(script, run_name="__main__")
        rec["exit"] = 0
    except SystemExit as e:
        rec["exit"] = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    finally:
        rec["seconds"] = time.perf_counter() - start
        rec["exit_hwm"] = vm()["VmHWM"]
        rec.setdefault("train_hwm", rec["exit_hwm"])  # a rank that never exports: its whole run
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"rank{rank}.json").write_text(json.dumps(rec, indent=2) + "\n")


def overrides(model_dir: Path, tmp: Path, method: str, dtype: str, world: int, freeze=()) -> list[str]:
    """scripts/train.py's Hydra overrides: a tiny demo run (2 steps, a global batch of 2 micro-batches of 1).
    freeze: full fine-tuning's frozen globs (the export still writes every parameter)."""
    backend = "single" if world == 1 else "fsdp"
    return [f"model.path={model_dir}", f"model.dtype={dtype}", f"peft={method}", f"dist={backend}",
            *([f"peft.freeze=[{','.join(freeze)}]"] if freeze else []),
            "data=arithmetic", f"data.cache_dir={tmp / 'data'}", "data.max_length=128",
            "train.device=cpu", "train.max_steps=2", "train.batch_size=1", f"train.grad_accum={2 // world}",
            "train.eval_every=0", "train.eval_batches=1", "train.keep_checkpoints=1",
            *(["train.precision=bf16"] if dtype == "bfloat16" else []),
            "eval.baseline=false", "eval.max_examples=2", "eval.max_new_tokens=2", "eval.batch_size=2",
            "logger.wandb.mode=disabled", "logger.progress=false",
            f"hydra.run.dir={tmp / 'runs' / backend}"]  # fmt: skip


def launcher(world: int) -> list[str]:
    if world == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]


def run_both(model_dir: Path, train_script: Path, tmp: Path, method: str, dtype: str, freeze=(),
             mmap_threshold: int = 0) -> tuple[dict, list[str]]:  # fmt: skip
    """The 1-process and the 2-process run, each rank probed; ({backend: {ranks, wall_s}}, the commands).

    mmap_threshold > 0: both runs under glibc's MALLOC_MMAP_THRESHOLD_ (bytes): allocations from that size up are
    mapped and unmapped when freed. By default glibc raises the threshold to each freed mapping's size (up to
    32 MiB), after which freed 1-32 MiB tensors stay in the heap, in the RSS, as much as they are reused.
    """
    paths = [str(Path(__file__).resolve().parents[2]), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}  # the ranks import this module by name
    malloc = {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold else {}
    env.update(malloc)
    runs, commands = {}, []
    for backend, world in RUNS.items():
        out = tmp / "probe" / backend
        cmd = [*launcher(world), "-m", "ftcore.bench.dist_memory", str(out), str(train_script),
               *overrides(model_dir, tmp, method, dtype, world, freeze)]  # fmt: skip
        commands.append(" ".join([*(f"{k}={v}" for k, v in malloc.items()), shlex.join(cmd)]))
        start = time.perf_counter()
        r = subprocess.run(cmd, env=env, cwd=train_script.parents[1], capture_output=True, text=True)
        if r.returncode:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"the {backend} run failed (exit {r.returncode}):\n{tail}")
        ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda x: x["rank"])
        if len(ranks) != world:
            raise RuntimeError(f"the {backend} run wrote {len(ranks)} rank files, expected {world}")
        runs[backend] = {"world_size": world, "wall_s": time.perf_counter() - start, "ranks": ranks}
    return runs, commands


def summarize(runs: dict) -> dict:
    """The criteria: rank 0's export peak vs the largest tensor; 2-process / 1-process train peak. Adds each
    rank's growths (bytes) to `runs`."""
    for run in runs.values():
        for r in run["ranks"]:
            r["train_growth"] = r["train_hwm"] - r["baseline_rss"]
            r["growth_after"] = {k: v - r["baseline_rss"] for k, v in r["hwm_after"].items()}
            r["loop_growth"] = r["growth_after"].get("loop", r["train_growth"])
            if "export_hwm" in r:
                r["export_growth"] = r["export_hwm"] - r["export_start_rss"]
    single = runs["single"]["ranks"][0]
    dist = runs["fsdp"]["ranks"]
    largest = single["largest_tensor"]
    export = next(r for r in dist if r["rank"] == 0)["export_growth"]
    limit = largest["bytes"] * (1 + EXPORT_SLACK)
    train = max(r["train_growth"] for r in dist) / single["train_growth"]
    loop = max(r["loop_growth"] for r in dist) / single["loop_growth"]
    return {"largest_tensor": largest,
            "export": {"got": export, "limit": limit, "met": export <= limit},
            "train_ratio": {"got": train, "goal": TRAIN_RATIO_GOAL, "met": train <= TRAIN_RATIO_GOAL},
            "loop_ratio": {"got": loop, "goal": TRAIN_RATIO_GOAL, "met": loop <= TRAIN_RATIO_GOAL}}  # fmt: skip


def dist_markdown(result: dict) -> str:
    """The report: one row per rank of each run, then the criteria and the commands."""
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    c, t = result["criteria"], result["criteria"]["largest_tensor"]
    lines = [f"# Per-rank memory, 1 process vs 2 (FSDP2): {result['model']}, {result['method']}, {result['dtype']}",
             "", f"Machine: {result['machine']}; {result['date']}; torch {result['torch']}. `scripts/bench.py "
             "--dist-memory`: scripts/train.py (2 steps, global batch 2, micro-batches of 1, arithmetic demo) run "
             "once in 1 process and once in 2 (torchrun, gloo), each rank under ftcore.bench.dist_memory's probe. "
             "Peak growth: VmHWM minus the rank's RSS after `import torch, ftcore.train.loop`; the export's: VmHWM "
             "after `save_final` minus the RSS when it starts (VmHWM reset there through /proc/self/clear_refs). "
             "'load + train' ends where save_final starts (every rank takes part in the export; rank 0 writes). "
             "'After load' (the base, or under FSDP2 its meta-device skeleton, and the data), 'after adapt' (PEFT, "
             "FSDP2 sharding and each rank's shards read, optimizer) and 'after the loop' (steps, last checkpoint) "
             "are the peak so far at each phase's end.",
             "", f"Model: {t['params']:,} parameters; largest tensor {t['name']} {t['shape']} {t['dtype']}, "
             f"{mib(t['bytes'])}.", "",
             "| run | rank | baseline RSS | peak growth: load + train | so far after load | after adapt | after the "
             "loop | export peak growth | final/ written | wall (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for backend, run in result["runs"].items():
        for r in run["ranks"]:
            export = (mib(r["export_growth"]), mib(r["export_bytes"])) if "export_growth" in r else ("-", "-")
            phases = " | ".join(mib(r["growth_after"][p]) if p in r["growth_after"] else "-" for p in PHASES)
            lines.append(f"| {backend} ({run['world_size']} proc) | {r['rank']} | {mib(r['baseline_rss'])} | "
                         f"{mib(r['train_growth'])} | {phases} | {export[0]} | {export[1]} | {r['seconds']:.0f} |")
    lines += ["", "RSS at each phase's end, anonymous + file-backed (a file-backed page, e.g. of the mmap'd "
              "checkpoint, is in the RSS of every process that maps it but in memory once):", "",
              "| run | rank | after load | after adapt | after the loop |", "| --- | ---: | ---: | ---: | ---: |"]
    for backend, run in result["runs"].items():
        for r in run["ranks"]:
            split = [" + ".join(map(mib, r["rss_after"][p].values())) if p in r["rss_after"] else "-" for p in PHASES]
            lines.append(f"| {backend} | {r['rank']} | " + " | ".join(split) + " |")
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    e, tr, lo = c["export"], c["train_ratio"], c["loop_ratio"]
    lines += ["", f"- Export: rank 0's export peak growth {mib(e['got'])} <= largest tensor + "
              f"{100 * EXPORT_SLACK:.0f}% ({mib(e['limit'])}): {met(e['met'])}.",
              f"- Train: per-rank peak growth of load + train, 2 processes (max over ranks) / 1 process = "
              f"{tr['got']:.2f}x (goal <= {tr['goal']}): {met(tr['met'])}. Up to the end of the loop: "
              f"{lo['got']:.2f}x "
              f"({met(lo['met'])}).", *[f"- {n}" for n in result["notes"]], "", "Commands ($TMP: the run's "
              "temporary directory, removed after):", "", f"    {result['command']}",
              *[f"    {cmd}" for cmd in result["commands"]]]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m ftcore.bench.dist_memory OUT_DIR SCRIPT [ARGS...]: one probed rank
    probe(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
