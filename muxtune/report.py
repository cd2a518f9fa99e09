"""report.html: one self-contained page (PNG plots embedded) plus the PNG files beside it.

The report is a function of the run folder alone, so `muxtune report RUN_DIR` re-renders it:
plan.json (always); metrics.json (a run that trained); plans.csv, simulation.csv, memory.csv,
prediction.json (what plan-and-run predicted, for the chosen plan and the baselines). A section whose
inputs are missing is left out and the page says so.
"""

from __future__ import annotations

import base64
import html
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from muxtune.errors import MuxTuneError  # noqa: E402
from muxtune.spec import Plan, write_text_atomic  # noqa: E402

MEMORY_PARTS = ["backbone", "adapters", "optimizer", "activations"]


# --- figures --------------------------------------------------------------------------------------------


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_curves(metrics: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, task in metrics["tasks"].items():
        ax.plot(range(1, len(task["loss"]) + 1), task["loss"], label=f"{name} ({task['method']})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over the task's tokens)")
    ax.set_title(f"{metrics['name']}: per-task loss, all tasks multiplexed on {metrics['model']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_validation_curves(name: str, task: dict, path: Path) -> Path:
    """One task's training loss per step against its valid_loss at each evaluation, the best
    evaluation marked (where an early-stopped task's exported adapter comes from)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(1, len(task["loss"]) + 1), task["loss"], color="tab:blue", alpha=0.7, label="train_loss")
    steps = [e["step"] for e in task["evaluations"]]
    ax.plot(steps, [e["valid_loss"] for e in task["evaluations"]], color="tab:orange", marker="o", label="valid_loss")
    if task.get("best_step") is not None:
        ax.axvline(task["best_step"], color="tab:green", linestyle="--", alpha=0.7)
        ax.plot([task["best_step"]], [task["best_valid_loss"]], marker="*", markersize=14, color="tab:green",
                linestyle="none", label=f"best: step {task['best_step']}, {task['best_valid_loss']:.4g}")
    status = f", stopped early at step {task['stopped_early_at_step']}" if task.get("stopped_early_at_step") else ""
    ax.set(xlabel="optimizer step", ylabel="loss (mean over loss-bearing tokens)",
           title=f"{name} ({task['method']}): train vs validation{status}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def validation_table(metrics: dict) -> pd.DataFrame:
    """One row per task that was evaluated: its best evaluation and its last."""
    return pd.DataFrame([
        {"task": name, "status": t["status"], "steps": t["steps"], "evaluations": len(t["evaluations"]),
         "best step": t["best_step"], "best valid_loss": t["best_valid_loss"],
         "last valid_loss": t["evaluations"][-1]["valid_loss"],
         "last valid_mean_token_accuracy": t["evaluations"][-1]["valid_mean_token_accuracy"],
         "results": t.get("results_path", "")}
        for name, t in metrics["tasks"].items() if t.get("evaluations")])


def plot_throughput(metrics: dict, path: Path) -> Path:
    names = list(metrics["tasks"])
    values = [metrics["tasks"][n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(names, values, color="tab:blue")
    ax.set_xlabel("tokens/s while active (shared fused steps)")
    ax.set_title(f"overall {metrics['tokens_per_s']:.0f} tokens/s, "
                 f"{100 * metrics['ineffective_token_fraction']:.1f}% of computed tokens were padding")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_ineffective(metrics: dict, path: Path) -> Path:
    names = list(metrics["tasks"])
    values = [100 * metrics["tasks"][n]["ineffective_token_fraction"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(names + ["all"], values + [100 * metrics["ineffective_token_fraction"]],
            color=["tab:orange"] * len(names) + ["tab:red"])
    ax.set_xlabel("ineffective (padding) tokens, % of the backbone positions computed")
    ax.set_title(f"alignment: {metrics['alignment']['layout']} (chunk {metrics['alignment']['chunk_len']})")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_plans(comparison: pd.DataFrame, path: Path) -> Path:
    """MuxTune vs each baseline: predicted tokens/s and peak memory per device."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    colors = ["tab:green" if p == "muxtune" else "tab:gray" for p in comparison["plan"]]
    ax1.bar(comparison["plan"], comparison["tokens_per_s"], color=colors)
    ax1.set(ylabel="predicted useful tokens/s", title="throughput over the whole job (tokens / makespan)")
    ax2.bar(comparison["plan"], comparison["peak_memory_gib"], color=colors)
    ax2.set(ylabel="GiB", title="peak memory of the fullest device")
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_memory(memory: pd.DataFrame, path: Path) -> Path:
    """Memory per device, stacked: backbone / adapters / optimizer / activations."""
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(memory) + 1.8))
    left = pd.Series(0.0, index=memory.index)
    for part, color in zip(MEMORY_PARTS, ["tab:blue", "tab:green", "tab:purple", "tab:orange"]):
        values = memory[part] / 2**20
        ax.barh(memory["device"], values, left=left, color=color, label=part)
        left += values
    ax.set_xlabel("MiB at the step's peak (CostModel)")
    ax.invert_yaxis()
    ax.legend(fontsize=8, ncol=4, loc="lower right")
    return _save(fig, path)


def plot_step_times(metrics: dict, predicted_s: float, path: Path) -> Path:
    """Measured step times against the simulator's prediction for the chosen plan."""
    fig, ax = plt.subplots(figsize=(7, 3))
    times = metrics["step_time_s"]
    ax.plot(range(1, len(times) + 1), times, marker=".", label="measured")
    ax.axhline(predicted_s, color="tab:red", linestyle="--", label=f"predicted {predicted_s:.3g} s (all tasks)")
    ax.set(xlabel="step", ylabel="seconds", title="step time: predicted vs measured")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# --- tables ---------------------------------------------------------------------------------------------


def summary_table(metrics: dict) -> pd.DataFrame:
    return pd.DataFrame([
        {"task": name, "method": t["method"], "status": t["status"], "steps": t["steps"], "final loss": t["final_loss"],
         "tokens": t["tokens"], "tokens/s": round(t["tokens_per_s"], 1), "adapter": t["adapter_path"],
         "reason": t.get("reason", "")}
        for name, t in metrics["tasks"].items()])


def measured_step_seconds(metrics: dict) -> float | None:
    """Median step time while every task was still active (the step the simulator predicts), after the
    first (warm-up) step."""
    together = min((t["steps"] for t in metrics["tasks"].values()), default=0)
    times = metrics["step_time_s"][1:together] or metrics["step_time_s"][:together]
    return statistics.median(times) if times else None


def predicted_vs_measured(metrics: dict, prediction: dict) -> pd.DataFrame:
    measured_step = measured_step_seconds(metrics)
    busy = metrics["train_time_s"] + metrics.get("eval_time_s", 0.0)  # training steps and evaluations
    # tokens the predicted step carries / measured step time: the same work priced two ways (a run folder
    # written before the job figures existed has no steady_tokens_per_s or makespan_s: those rows stay blank)
    step_tokens = sum(prediction.get("step_tokens", {}).values())
    rows = [{"figure": "step time, every task present (s)", "predicted": prediction["step_s"],
             "measured": measured_step},
            {"figure": "tokens/s, every task present", "predicted": prediction.get("steady_tokens_per_s"),
             "measured": step_tokens / measured_step if measured_step else None},
            {"figure": "time to train every task (s)", "predicted": prediction.get("makespan_s"),
             "measured": busy},
            {"figure": "tokens/s over the whole run", "predicted": prediction["tokens_per_s"],
             "measured": metrics["tokens"] / busy if busy else 0.0}]
    if metrics.get("eval_time_s"):  # the tasks validated: their forward-only passes, priced and measured
        rows.insert(3, {"figure": "of which validation forwards (s)", "predicted": prediction.get("evaluation_s"),
                        "measured": metrics["eval_time_s"]})
    table = pd.DataFrame(rows)
    error = (table["predicted"] - table["measured"]) / table["measured"]
    table["error"] = [f"{100 * e:+.0f}%" if pd.notna(e) else "" for e in error]  # predicted vs measured
    return table


# --- the page -------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MuxTuneError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def _table(frame: pd.DataFrame) -> str:
    table = frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")
    return f'<div class="wide">{table}</div>'  # scrolls sideways on a narrow window instead of being cut off


def write_report(run_dir: Path) -> Path:
    """Render report.html and its PNGs from what the run folder holds."""
    run_dir = Path(run_dir)
    if not (run_dir / "plan.json").exists():
        raise MuxTuneError(f"{run_dir}: not a run folder (no plan.json)")
    plan = Plan.load(run_dir / "plan.json")
    metrics = _read_json(run_dir / "metrics.json")
    prediction = _read_json(run_dir / "prediction.json")
    comparison = _read_csv(run_dir / "plans.csv")
    memory = _read_csv(run_dir / "memory.csv")
    events = _read_csv(run_dir / "simulation.csv")

    figures: dict[str, tuple[str, Path]] = {}  # section -> (title, png)
    # the run's name, not the folder's: a dry run is rendered in its staging folder
    name = metrics["name"] if metrics else (prediction or {}).get("name", run_dir.name)
    parts = [f"<h1>MuxTune run <code>{html.escape(name)}</code></h1>"]
    if metrics:
        parts.append(
            f"<p>Backbone <code>{html.escape(metrics['model'])}</code> on <code>{html.escape(metrics['devices'])}</code>:"
            f" {len(metrics['tasks'])} tasks, {metrics['steps']} fused steps, {metrics['tokens']} tokens in"
            f" {metrics['train_time_s']:.1f} s ({metrics['tokens_per_s']:.0f} tokens/s); ineffective (padding)"
            f" tokens: {100 * metrics['ineffective_token_fraction']:.1f}% of those computed.</p>")
    else:
        model = html.escape((prediction or {}).get("model", "?"))
        parts.append(f"<p><b>Dry run</b> of <code>{model}</code>: planned and simulated only, nothing was trained.</p>")

    groups = "".join(f"<li>group {i}: {html.escape(', '.join(g.tasks))} on {html.escape(', '.join(g.devices))} "
                     f"(dp={g.layout.dp}, pp={g.layout.pp}, tp={g.layout.tp}, micro-batches={g.micro_batches})</li>"
                     for i, g in enumerate(plan.groups))
    align = plan.alignment
    explanation = "".join(f"<li>{html.escape(line)}</li>" for line in plan.explanation.splitlines() if line.strip())
    parts.append(f"<h2>Plan ({html.escape(plan.planner)})</h2><ul>{explanation}</ul><p>Fusion groups:</p><ul>{groups}</ul>"
                 f"<p>Schedule {plan.schedule}; alignment {align.layout}, chunk size {align.chunk_len} tokens, "
                 f"token budget {align.token_budget} per micro-batch.</p>")
    if prediction:
        parts.append(f"<p><b>Verdict:</b> {html.escape(prediction['why'])}.</p>"
                     f"<p>Cost model: {html.escape(prediction['cost_model'])}; {prediction['gpus']} device(s).</p>")

    if comparison is not None:
        figures["plans"] = ("MuxTune vs baselines (predicted)", plot_plans(comparison, run_dir / "plans.png"))
        parts.append(f"<h2>MuxTune vs baselines</h2>{_table(comparison)}{{fig:plans}}")
    if prediction and metrics:
        parts.append(f"<h2>Predicted vs measured</h2>{_table(predicted_vs_measured(metrics, prediction))}"
                     "<p>Measured: median step while every task was active, after the first step. Timing on a "
                     "shared machine is noisy.</p>{fig:steps}")
        figures["steps"] = ("Step time: predicted vs measured",
                            plot_step_times(metrics, prediction["step_s"], run_dir / "step_times.png"))
    if events is not None:
        from muxtune.simulator.plots import gantt

        # simulation.csv holds the plain step and, where tasks validate, a step with evaluations
        # (column `timeline`; files written before it hold the plain step only)
        step = events[events["timeline"] == "step"] if "timeline" in events else events
        title = f"simulated step ({plan.schedule}): {step['end'].max():.4g} s"
        figures["gantt"] = ("Simulated timeline of one step", gantt(step, run_dir / "gantt.png", title))
        parts.append("<h2>Simulated timeline of one step</h2><p>Per device: compute and communication, "
                     "coloured by fusion group; gaps are bubbles.</p>{fig:gantt}")
        evaluated = events[events["timeline"] == "evaluation step"] if "timeline" in events else events.iloc[:0]
        if not evaluated.empty:
            at = (prediction or {}).get("evaluation_step", {})
            forwards = evaluated[evaluated["kind"] == "eval"]
            seconds = float((forwards["end"] - forwards["start"]).sum())
            title = (f"simulated step {at.get('after_step', '')} with evaluations: {evaluated['end'].max():.4g} s, "
                     f"of which {seconds:.4g} s evaluation")
            figures["gantt_eval"] = ("Simulated timeline of a step with evaluations",
                                     gantt(evaluated, run_dir / "gantt_eval.png", title))
            parts.append("<h2>Simulated timeline of a step with evaluations</h2><p>The first step after which "
                         f"tasks are evaluated ({html.escape(', '.join(at.get('tasks', [])))}): the step, then "
                         "their forward-only validation passes (<code>eval</code>, one per fusion group and "
                         "micro-batch, priced by the cost model).</p>{fig:gantt_eval}")
    if memory is not None:
        figures["memory"] = ("Memory per device", plot_memory(memory, run_dir / "memory.png"))
        shown = memory.assign(**{p: memory[p] / 2**20 for p in MEMORY_PARTS}).rename(
            columns={p: f"{p} MiB" for p in MEMORY_PARTS})
        parts.append(f"<h2>Memory per device</h2>{{fig:memory}}{_table(shown)}")
    if metrics:
        figures["loss"] = ("Per-task loss curves", plot_loss_curves(metrics, run_dir / "loss_curves.png"))
        figures["throughput"] = ("Throughput per task", plot_throughput(metrics, run_dir / "throughput.png"))
        figures["ineffective"] = ("Ineffective-token fraction",
                                  plot_ineffective(metrics, run_dir / "ineffective_tokens.png"))
        parts.append(f"<h2>Tasks</h2>{_table(summary_table(metrics))}{{fig:loss}}{{fig:throughput}}"
                     "<h2>Ineffective tokens</h2>{fig:ineffective}")
        validated = validation_table(metrics)
        if not validated.empty:
            keys = []
            for i, task in enumerate(validated["task"]):
                keys.append(f"valid{i}")
                figures[keys[-1]] = (f"{task}: train vs validation loss",
                                     plot_validation_curves(task, metrics["tasks"][task], run_dir / f"validation_{i}.png"))
            parts.append(f"<h2>Validation</h2><p>Evaluated multiplexed, forward only; the star marks each task's "
                         f"lowest valid_loss (an early-stopped task exports that adapter).</p>{_table(validated)}"
                         + "".join("{fig:" + key + "}" for key in keys))
        stopped = {n: t for n, t in metrics["tasks"].items() if t["status"] in ("failed", "cancelled")}
        items = "".join(f"<li><b>{html.escape(n)}</b>: {t['status']} at step {t.get('stopped_at_step')}: "
                        f"{html.escape(str(t['reason']))}</li>" for n, t in stopped.items())
        parts.append(f"<h2>Failed or cancelled tasks</h2><ul>{items}</ul>" if stopped
                     else "<h2>Failed or cancelled tasks</h2><p>none</p>")

    body = "\n".join(parts)
    for key, (title, path) in figures.items():
        data = base64.b64encode(path.read_bytes()).decode()
        body = body.replace("{fig:" + key + "}", f'<figure id="fig-{key}"><img alt="{html.escape(title)}" '
                            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(title)}</figcaption></figure>')
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>MuxTune report: {html.escape(name)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
figure{{margin:1.5em 0}}img{{max-width:100%}}.wide{{overflow-x:auto}}table{{font-size:0.9em}}</style></head><body>
{body}
</body></html>
"""
    path = run_dir / "report.html"
    write_text_atomic(path, page)
    return path
