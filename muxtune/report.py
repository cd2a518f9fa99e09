"""report.html: one self-contained page (PNG plots embedded) plus the PNG files beside it."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from muxtune.spec import Plan, write_text_atomic  # noqa: E402


def plot_loss_curves(metrics: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, task in metrics["tasks"].items():
        ax.plot(range(1, len(task["loss"]) + 1), task["loss"], label=f"{name} ({task['method']})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over the task's tokens)")
    ax.set_title(f"{metrics['name']}: per-task loss, all tasks multiplexed on {metrics['model']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_throughput(metrics: dict, path: Path) -> Path:
    names = list(metrics["tasks"])
    values = [metrics["tasks"][n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3), dpi=110)
    ax.barh(names, values, color="tab:blue")
    ax.set_xlabel("tokens/s while active (shared fused steps)")
    ax.set_title(f"overall {metrics['tokens_per_s']:.0f} tokens/s, "
                 f"{100 * metrics['ineffective_token_fraction']:.1f}% of computed tokens were padding")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_table(metrics: dict) -> pd.DataFrame:
    rows = []
    for name, t in metrics["tasks"].items():
        rows.append({"task": name, "method": t["method"], "status": t["status"], "steps": t["steps"],
                     "final loss": t["final_loss"], "tokens": t["tokens"],
                     "tokens/s": round(t["tokens_per_s"], 1), "adapter": t["adapter_path"],
                     "reason": t.get("reason", "")})
    return pd.DataFrame(rows)


def write_report(out_dir: Path, metrics: dict, plan: Plan) -> Path:
    out_dir = Path(out_dir)
    figures = {
        "Per-task loss curves": plot_loss_curves(metrics, out_dir / "loss_curves.png"),
        "Throughput per task": plot_throughput(metrics, out_dir / "throughput.png"),
    }
    groups = "".join(f"<li>group {i}: {html.escape(', '.join(g.tasks))} on {html.escape(', '.join(g.devices))} "
                     f"(dp={g.layout.dp}, pp={g.layout.pp}, tp={g.layout.tp})</li>"
                     for i, g in enumerate(plan.groups))
    images = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(title)}</figcaption></figure>'
        for title, path in figures.items()
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>MuxTune report: {html.escape(metrics['name'])}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
figure{{margin:1.5em 0}}img{{max-width:100%}}</style></head><body>
<h1>MuxTune run <code>{html.escape(metrics['name'])}</code></h1>
<p>Backbone <code>{html.escape(metrics['model'])}</code> on <code>{html.escape(metrics['devices'])}</code>:
{len(metrics['tasks'])} tasks, {metrics['steps']} fused steps, {metrics['tokens']} tokens in
{metrics['train_time_s']:.1f} s ({metrics['tokens_per_s']:.0f} tokens/s);
ineffective (padding) tokens: {100 * metrics['ineffective_token_fraction']:.1f}% of those computed.</p>
<h2>Plan ({html.escape(plan.planner)})</h2><p>{html.escape(plan.explanation)}</p><ul>{groups}</ul>
<h2>Tasks</h2>{summary_table(metrics).to_html(index=False, float_format=lambda v: f"{v:.4f}")}
{images}
</body></html>
"""
    path = out_dir / "report.html"
    write_text_atomic(path, page)
    return path
