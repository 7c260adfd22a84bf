"""A PNG of a run's monitoring history (monitor.jsonl; matplotlib, imported lazily: the checks work without it).

Top: each check's score (red where it failed), the stored test score, the failing line (stored - max_drop) and
the base model's score. Bottom: each drift score over its threshold (log scale; above 1: over), one line a score.
"""

from pathlib import Path

from ftcore.monitor.drift import SCORES


def plot_history(records: list[dict], path: Path) -> Path | None:
    """Write the plot; None (with a one-line note) when matplotlib is not installed."""
    try:
        import logging

        import matplotlib

        matplotlib.use("Agg")
        logging.getLogger("matplotlib").setLevel(logging.WARNING)
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("monitor: matplotlib is not installed, no plot (pip install 'ftcore[plots]')", flush=True)
        return None
    if not records:
        return None
    x = list(range(1, len(records) + 1))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    top.plot(x, [r["score"] for r in records], "o-", color="tab:blue", label="score on the fresh file")
    failed = [(i, r["score"]) for i, r in zip(x, records) if not r["passed"]]
    if failed:
        top.plot(*zip(*failed), "o", color="tab:red", label="failed")
    last = records[-1]
    top.axhline(last["stored_score"], color="black", lw=1, label="stored test score")
    top.axhline(last["stored_score"] - last["max_drop"], color="tab:red", ls="--", lw=1, label="fails below")
    if last.get("base_score") is not None:
        top.axhline(last["base_score"], color="gray", ls=":", lw=1, label="base model")
    top.set_ylabel(last["metric"])
    top.set_title(f"{Path(last['run_dir']).name}: monitoring checks")
    top.legend(fontsize=8, loc="best")
    for name in SCORES:
        points = [(i, max(r["drift"][name] / r["drift_thresholds"][name], 1e-3)) for i, r in zip(x, records)
                  if r.get("drift") and name in r["drift"] and r["drift_thresholds"].get(name)]  # fmt: skip
        if points:
            bottom.plot(*zip(*points), "o-", ms=3, label=name)
    bottom.axhline(1.0, color="tab:red", ls="--", lw=1)
    bottom.set_yscale("log")
    bottom.set_ylabel("drift / threshold")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("check")
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
