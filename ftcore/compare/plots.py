"""PNG plots of a comparison (matplotlib, imported lazily: the CSV and markdown work without it).

val_loss.png: training loss (smoothed) and validation loss against step, one colour per arm,
a thin line per seed and a bold one for the mean over seeds.
metric_vs_params.png: the test metric (mean over seeds, with its 95% bootstrap interval; ± std without one) against
trainable parameters (log x), with the base model's score as a dashed line in its interval's band.
"""

from pathlib import Path

from ftcore.train.log import read_metrics


def write_plots(out_dir: Path, arms, finals, table, baseline, sig=None) -> list[Path]:
    try:
        import logging

        import matplotlib

        matplotlib.use("Agg")
        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # Hydra's logging would show its INFO lines
        import matplotlib.pyplot as plt
    except ImportError:
        print("compare: matplotlib is not installed, no plots (pip install 'ftcore[plots]')", flush=True)
        return []
    return [loss_curves(plt, out_dir, arms, finals), metric_vs_params(plt, out_dir, table, baseline, sig)]


def smooth(values: list[float], alpha: float = 0.3) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else alpha * v + (1 - alpha) * avg
        out.append(avg)
    return out


def mean_curve(curves: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, [sum(c[s] for c in curves) / len(curves) for s in steps]


def loss_curves(plt, out_dir: Path, arms, finals) -> Path:
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    for i, arm in enumerate(arms):
        color = f"C{i % 10}"
        train_curves, val_curves = [], []
        for run in (r for r in finals if r.arm is arm):
            events = read_metrics(run.run_dir)
            train = {e["step"]: e["loss"] for e in events if e.get("loss") is not None and "lr" in e}
            val = {e["step"]: e["val_loss"] for e in events if e.get("val_loss") is not None}
            if train:
                train = dict(zip(train, smooth(list(train.values()))))
                ax_train.plot(list(train), list(train.values()), color=color, alpha=0.3, lw=0.8)
                train_curves.append(train)
            if val:
                ax_val.plot(list(val), list(val.values()), color=color, alpha=0.3, lw=0.8, marker=".")
                val_curves.append(val)
        for ax, curves in ((ax_train, train_curves), (ax_val, val_curves)):
            steps, mean = mean_curve(curves)
            if steps:
                ax.plot(steps, mean, color=color, lw=2, label=f"{arm.name} ({arm.sized.trainable:,})",
                        marker="o" if ax is ax_val else None)  # fmt: skip
    ax_train.set(title="training loss (smoothed)", xlabel="step", ylabel="loss")
    ax_val.set(title="validation loss", xlabel="step", ylabel="loss")
    ax_val.legend(fontsize=8)
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "val_loss.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def metric_vs_params(plt, out_dir: Path, table, baseline, sig=None) -> Path:
    """Error bars: the 95% bootstrap interval where the results have one (sig), else ± std over seeds."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, row in enumerate(table):
        if row["score_mean"] is None:
            continue
        if row.get("ci_low") is not None:
            yerr = [[row["score_mean"] - row["ci_low"]], [row["ci_high"] - row["score_mean"]]]
        else:
            yerr = row["score_std"] or 0
        ax.errorbar(row["trainable_params"], row["score_mean"], yerr=yerr, fmt="o", capsize=4,
                    color=f"C{i % 10}", label=row["arm"])  # fmt: skip
    if baseline:
        ax.axhline(baseline["score"], color="gray", ls="--", lw=1, label="base model")
        base_ci = sig["arms"].get("base model", {}).get("ci") if sig else None
        if base_ci:
            ax.axhspan(*base_ci, color="gray", alpha=0.15, lw=0)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor log ticks would overlap
    for i, row in enumerate(table):
        if row["score_mean"] is not None:
            ax.annotate(row["arm"], (row["trainable_params"], row["score_mean"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=8, color=f"C{i % 10}")  # fmt: skip
    bars = "95% CI" if any(r.get("ci_low") is not None for r in table) else "± std over seeds"
    ax.set(xlabel="trainable parameters", ylabel=f"test {table[0]['metric']} (mean, {bars})",
           title="metric vs trainable parameters")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "metric_vs_params.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
