"""Matplotlib figures of the simulator's outputs (PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

KIND_STYLE = {"fwd": dict(alpha=0.95), "bwd": dict(alpha=0.55, hatch="//"), "optim": dict(alpha=0.9, hatch=".."),
              "send": dict(alpha=0.7), "recv": dict(alpha=0.35), "allreduce": dict(alpha=0.8, hatch="xx"),
              "tp_allreduce": dict(alpha=0.8, hatch="++"),
              "recompute": dict(alpha=0.75, hatch="--"),  # a block's forward run again in its backward
              "eval": dict(alpha=0.75, hatch="oo")}  # a validation forward (no backward follows it)


def gantt(events: pd.DataFrame, path: Path, title: str) -> Path:
    """One row per (device, stream); a bar per op, coloured by fusion group, styled by kind."""
    lanes = sorted({(d, s) for d, s in zip(events["device"], events["stream"])},
                   key=lambda ds: (list(events["device"]).index(ds[0]), ds[1] != "compute"))
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(lanes) + 1.5))
    for y, (device, stream) in enumerate(lanes):
        lane = events[(events["device"] == device) & (events["stream"] == stream)]
        for op in lane.itertuples():
            ax.barh(y, op.end - op.start, left=op.start, height=0.8, color=colors(int(op.group) % 10),
                    edgecolor="black", linewidth=0.3, **KIND_STYLE.get(op.kind, {}))
            if op.micro_batch >= 0 and stream == "compute":
                ax.text(op.start + (op.end - op.start) / 2, y, str(op.micro_batch), ha="center", va="center",
                        fontsize=6)
    ax.set_yticks(range(len(lanes)), [f"{d} {s}" for d, s in lanes])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    legend = "solid fwd, hatched bwd, dotted optim" + (", circled eval" if (events["kind"] == "eval").any() else "") \
        + (", dashed recompute" if (events["kind"] == "recompute").any() else "")
    ax.set_title(f"{title}   (colour: group; {legend})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cluster(results: dict, path: Path) -> Path:
    """Policies side by side on the same arrivals: JCT and queueing CDFs, utilisation, GPU-hours."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for name, result in results.items():
        for ax, column in ((axes[0, 0], "jct"), (axes[0, 1], "queueing")):
            values = result.jobs[column].sort_values().to_numpy()
            ax.step(values / 3600, (1 + pd.RangeIndex(len(values))) / len(values), where="post", label=name)
    axes[0, 0].set(xlabel="job completion time (h)", ylabel="share of jobs", title="JCT")
    axes[0, 1].set(xlabel="queueing delay (h)", ylabel="share of jobs", title="queueing")
    names = list(results)
    axes[1, 0].bar(names, [results[n].metrics["gpu_utilisation"] for n in names])
    axes[1, 0].set(ylabel="GPU time allocated / available", title="GPU utilisation")
    axes[1, 1].bar(names, [results[n].metrics["gpu_hours"] for n in names])
    axes[1, 1].set(ylabel="GPU-hours", title="cost")
    axes[0, 0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(table: pd.DataFrame, target_p95_s: float, path: Path) -> Path:
    """p95 queueing against the number of GPUs, per policy, with the target line."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in table.groupby("policy", sort=False):
        ax.plot(rows["gpus"], rows["queueing_p95_s"], marker="o", label=name)
    ax.axhline(target_p95_s, color="grey", linestyle="--", label=f"target {target_p95_s:g} s")
    ax.set(xlabel="GPUs", ylabel="p95 queueing delay (s)", title="how many GPUs for this arrival rate?")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
