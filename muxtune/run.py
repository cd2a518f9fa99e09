"""One multiplexed run, from a validated config to `runs/<name>/`.

Everything that can be wrong with the input (config, model, data files, plan) is checked before the
first output is written; outputs are assembled in a hidden staging folder and renamed into place at the
end, so a failed or interrupted run never leaves a half-written run folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from muxtune import allocator
from muxtune.errors import MuxTuneError
from muxtune.spec import DTYPE_BYTES, Plan, RunConfig, method_card, staged_directory, write_text_atomic

DTYPES = {name: getattr(torch, name) for name in DTYPE_BYTES}  # spec.DTYPE_BYTES's names as torch dtypes


def check_devices(config: RunConfig) -> list[str]:
    devices = config.device_list()
    if devices[0].startswith("cuda"):
        if not torch.cuda.is_available():
            raise MuxTuneError(f"devices: {config.devices!r} requested but no CUDA device is available here")
        count = torch.cuda.device_count()
        for d in devices:
            if int(d.split(":")[1]) >= count:
                raise MuxTuneError(f"devices: {d} does not exist (this machine has {count} CUDA devices)")
    return devices


def prepare(config: RunConfig, plan: Plan | None = None, validation: dict | None = None):
    """Load the backbone and every task's data; raise MuxTuneError on any bad input.
    Returns (backbone, plan, training examples, data stats); `validation`, when given, receives the
    validating tasks' validation examples (a split's examples are never among the training ones)."""
    from muxtune.executor.backbone import load_backbone
    from muxtune.executor.validation import load_task_data

    devices = check_devices(config)
    plan = plan or Plan.trivial(config)
    plan.check_against(config)
    backbone = load_backbone(config.model, device=devices[0], dtype=DTYPES[config.dtype])
    examples, stats, validation = {}, {}, validation if validation is not None else {}
    for i, task in enumerate(config.tasks):
        examples[task.name], valid, stats[task.name] = load_task_data(task, backbone.tokenizer, f"tasks[{i}]")
        if valid is not None:
            validation[task.name] = valid
    return backbone, plan, examples, stats


def execute(config: RunConfig, out_dir: Path | None, plan: Plan | None = None, progress: bool = True,
            resume: bool = False, after_step=None) -> dict:
    """Validate, train every task multiplexed, export adapters, write plan/metrics/report. Returns metrics.

    A plan of one device runs here (muxtune/process.py `run_process` as the world of one); a parallel
    layout runs one process per device (executor/distributed.launch), each `run_process`, with the same outputs (rank 0
    writes them). While training, `out_dir` holds `checkpoints/` (every `config.checkpoint_every`
    steps, see executor/checkpoint.py) and `spool/` (tasks submitted or cancelled mid-run, see
    muxtune/spool.py); the finished outputs replace it in one rename. `resume=True` continues from the
    checkpoints. `after_step(trainer)` runs at every step boundary, before the spool is read; for a
    multi-process plan it runs on rank 0 and must be picklable (a module-level function or a partial).
    `out_dir` None: nothing is written (no checkpoints, no spool; metrics only)."""
    from muxtune.executor import checkpoint
    from muxtune.executor.distributed import launch, world_size
    from muxtune.process import run_process

    folder = None if out_dir is None else str(out_dir)
    plan = plan or Plan.trivial(config)
    plan.check_against(config)
    check_devices(config)
    if world_size(plan) == 1:
        if any(g.devices != plan.groups[0].devices for g in plan.groups):
            raise MuxTuneError("plan: every fusion group of a one-device plan must name the same device")
        return run_process(0, 1, None, config, plan, folder, progress, resume, after_step)
    if resume:
        out_dir = Path(out_dir)  # checked here too, so a wrong plan or model is refused before any process starts
        manifest = checkpoint.load_manifest(out_dir)
        checkpoint.check_manifest(manifest, out_dir, config.model, {t.name: t for t in config.tasks})
        joined = checkpoint.joined_tasks(manifest, {t.name for t in config.tasks}, out_dir)
        checkpoint.check_layout(manifest, out_dir, plan, joined={s.name for s in joined})
    return launch(run_process, plan, (config, plan, folder, progress, resume, after_step))


def write_run(config: RunConfig, plan: Plan, trainer, backbone, stats: dict, metrics: dict, out_dir: Path,
              checkpoints: Path | None = None) -> None:
    """runs/<name>/: plan.json, adapters/<task>/, metrics.json, report.html, and a copy of `checkpoints`
    (staged, then renamed into place in one step)."""
    from muxtune.executor.checkpoint import checkpoint_dir
    from muxtune.executor.export import export_adapter
    from muxtune.report import write_report

    with staged_directory(Path(out_dir)) as staging:
        if checkpoints is not None and Path(checkpoints).exists():
            shutil.copytree(checkpoints, checkpoint_dir(staging))
        plan.save(staging / "plan.json")
        for name, run in trainer.runs.items():
            # a task stopped early holds its best weights again (executor/validation.py): those are exported
            export_adapter(run.adapter, backbone.model, backbone.name, staging / "adapters" / name)
            write_text_atomic(staging / "results" / f"{name}.csv", results_csv(run))
        write_text_atomic(staging / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_report(staging)


RESULTS_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")


def results_csv(run) -> str:
    """A task's results as fine-tuning APIs give them: one row per step, the validation columns filled
    at the steps it was evaluated."""
    import csv
    import io

    evaluations = {e["step"]: e for e in run.evaluations}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULTS_COLUMNS)
    for step, loss in enumerate(run.losses, start=1):
        e = evaluations.get(step, {})
        # (a multi-process run counts no accuracy: its column stays empty)
        accuracy = repr(run.accuracies[step - 1]) if step <= len(run.accuracies) else ""
        writer.writerow([step, repr(loss), accuracy, repr(e["valid_loss"]) if e else "",
                         repr(e["valid_mean_token_accuracy"]) if e else ""])
    return out.getvalue()


def collect_metrics(config: RunConfig, trainer, stats: dict, wall: float) -> dict:
    computed = sum(rows * seq for rows, seq in trainer.step_shapes)
    real = sum(trainer.step_tokens)
    tasks = {}
    for name, run in trainer.runs.items():
        tasks[name] = {
            "method": run.spec.peft.method,
            "status": run.status,
            "steps": run.step,
            "reason": run.reason,
            "stopped_at_step": run.stopped_at,
            "bad_examples_skipped": run.bad_examples,
            "loss": run.losses,
            "final_loss": run.losses[-1] if run.losses else None,
            "total_steps": run.total_steps,
            "train_mean_token_accuracy": run.accuracies,
            "train_examples": len(run.sampler.examples),
            "validation_examples": len(run.validation) if run.validation is not None else 0,
            "eval_every": run.eval_interval,
            "evaluations": run.evaluations,  # [{step, valid_loss, valid_mean_token_accuracy}]
            "best_step": run.best_step,
            "best_valid_loss": run.best_loss,
            "stopped_early_at_step": run.step if run.status == "stopped_early" else None,
            "results_path": f"results/{name}.csv",
            "tokens": run.tokens,
            "computed_tokens": run.computed_tokens,
            # backbone positions spent on padding: the ineffective tokens of this task's rows
            "ineffective_token_fraction": 1.0 - run.tokens / run.computed_tokens if run.computed_tokens else 0.0,
            "tokens_per_s": run.tokens / run.seconds if run.seconds else 0.0,
            "trainable_params": sum(p.numel() for p in run.parameters()),
            "adapter_path": f"adapters/{name}",
            "data": asdict(stats[name]),
        }
    return {
        "name": config.name,
        "model": config.model,
        "devices": config.devices,
        "alignment": trainer.alignment.model_dump(),
        "malloc": allocator.in_use(),  # tcmalloc: peak memory is the tensors' (muxtune/allocator.py)
        "steps": len(trainer.step_times),
        "wall_time_s": wall,
        "train_time_s": sum(trainer.step_times),
        "tokens": real,
        "tokens_per_s": real / sum(trainer.step_times) if trainer.step_times else 0.0,
        "computed_tokens": computed,
        "ineffective_token_fraction": 1.0 - real / computed if computed else 0.0,
        "skipped_bad_lines": sum(s.skipped_bad_lines for s in stats.values()),
        "truncated": sum(s.truncated for s in stats.values()),
        "dropped_too_long": sum(s.dropped_too_long for s in stats.values()),
        "step_time_s": trainer.step_times,
        # fused evaluations: after which global step, how long, how many tokens (not in train_time_s)
        "evaluations": [{"after_step": step, "seconds": seconds, "tokens": tokens}
                        for step, seconds, tokens in trainer.eval_times],
        "eval_time_s": sum(seconds for _, seconds, _ in trainer.eval_times),
        "tasks": tasks,
    }


# --- plan-and-run: profile -> plan -> simulate -> execute -> report --------------------------------------
#
# Each phase is one function taking and returning plain objects; `plan_and_run` chains them and writes
# the run folder. `--dry-run` stops after simulate (hardware that is not here: an analytic CostModel).

@dataclass
class Prediction:
    """What the simulate phase predicts for the chosen plan and every baseline, as saved in the run folder:
    plans.csv (comparison), simulation.csv (the chosen plan's step timeline, and the timeline of its first
    step with evaluations when tasks validate), memory.csv, prediction.json."""

    plans: dict  # name -> Plan; "muxtune" is the chosen one
    comparison: Any  # pandas DataFrame, one row per plan
    timeline: Any  # simulator Timeline of the chosen plan
    memory: Any  # pandas DataFrame: device, backbone, adapters, optimizer, activations (bytes)
    info: dict  # cost model, hardware, gpus, predicted step time and tokens/s
    evaluation_timeline: Any = None  # Timeline of the chosen plan's first step with evaluations, or None


def profile_needs(config: RunConfig) -> tuple[list[str], list[str]]:
    """The PEFT methods the config's tasks use and the op names their LoRA/DoRA tasks target: all a
    profile measured for this config needs (any other method or op is skipped)."""
    methods = sorted({task.peft.method for task in config.tasks})
    targets = set()
    for task in config.tasks:
        if method_card(task.peft.method).targeted:
            targets |= set(task.peft.target_modules)
    return methods, sorted(targets)


def profile_sizes(config: RunConfig) -> list[tuple[int, int]]:
    """(tokens, seq_len) of the steps a plan of `config` can run, padded: each task alone and all of them
    in one group. A profile measured for the config reaches these (a curve that stops short of them is
    extended: a llama-100m quickstart step of 9216 tokens was priced 45% low from curves up to 512)."""
    alone = [(t.batch_size * t.max_seq_len, t.max_seq_len) for t in config.tasks]
    longest = max(t.max_seq_len for t in config.tasks)
    return sorted(set(alone) | {(sum(t.batch_size for t in config.tasks) * longest, longest)})


def profile_phase(config: RunConfig, profile: str | None = None, hardware: str | None = None,
                  progress: bool = True):
    """The CostModel: `hardware` (a catalog GPU, analytic), else the profile CSV `profile`, else a stored
    profile that passes the calibration check on this device (profiler/calibration.py); if none does, a
    quick one of what the config's tasks need is measured now (within the profiler's default budget) by
    `muxtune profile` in a fresh process: its all-reduce workers fork, which is only safe from a process
    that has not started thread pools yet (this one has loaded data by now)."""
    import subprocess
    import sys

    from muxtune.profiler.cost_model import CostModel, ModelShape
    from muxtune.profiler.profile import trusted_profile

    dtype = DTYPES[config.dtype]
    if hardware:
        return CostModel.analytic(hardware, ModelShape.from_config(model_config(config.model), dtype)), \
            f"analytic {hardware}"
    if profile:
        return CostModel.from_profile(profile), f"profile {profile}"
    device = check_devices(config)[0]
    threads = torch.get_num_threads()  # part of the fingerprint: the child measures with ours
    methods, targets = profile_needs(config)
    say = (lambda line: print(line, file=sys.stderr)) if progress else (lambda line: None)
    found = trusted_profile(config.model, device, "quick", dtype, methods, targets, say=say)
    if found is not None:
        stored, path, check = found
        return CostModel.from_profile(stored), f"profile {path} (calibration: {check.verdict})"
    command = [sys.executable, "-m", "muxtune.cli", "profile", "--model", config.model, "--devices", device,
               "--mode", "quick", "--dtype", config.dtype, "--threads", str(threads), "--refresh",
               "--methods", ",".join(methods),
               "--sizes", ",".join(f"{t}x{s}" for t, s in profile_sizes(config))] + \
        (["--targets", ",".join(targets)] if targets else [])
    done = subprocess.run(command + ([] if progress else ["--no-progress"]), text=True,
                          stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE)
    path = next((line.split(" ", 1)[1] for line in (done.stdout or "").splitlines() if line.startswith("wrote ")), None)
    if done.returncode != 0 or path is None:
        raise MuxTuneError(f"profile: measuring {config.model} on {device} failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout or '').strip()[-500:]}")
    return CostModel.from_profile(path), f"profile {path} (measured now)"


def model_config(model: str):
    """The model's transformers config (executor/backbone.py: a builtin preset's, or a local dir's / hub id's)."""
    from muxtune.executor.backbone import model_config as config_of

    return config_of(model)


def task_works(config: RunConfig, cost_model, backbone=None, stats: dict | None = None) -> dict:
    """Each task's per-step work for the simulator: exact adapter sizes and mean data lengths when the
    backbone and data are loaded, else estimates from method and rank at max_seq_len (worst case)."""
    from muxtune.simulator.workload import count_trainable_params, estimate_params, method_rank, task_work

    works = {}
    for t in config.tasks:
        if backbone is not None:
            params = count_trainable_params(t, backbone.model)
        else:
            params = estimate_params(t.peft.method, method_rank(t.peft), cost_model.shape)
        mean = None
        if stats and stats.get(t.name) and stats[t.name].examples:
            mean = stats[t.name].tokens / stats[t.name].examples
        works[t.name] = task_work(t, params, mean_seq_len=mean)
        if t.validates:  # its evaluations are priced too (a forward over its validation set)
            works[t.name] = replace(works[t.name], eval_sequences=validation_sequences(t, stats),
                                    eval_every=t.eval_interval(t.steps))
    return works


def validation_sequences(task, stats: dict | None) -> int:
    """A validating task's validation examples: its held-out share, or the validation file's records."""
    if task.validation_split is not None:
        n = stats[task.name].examples if stats and stats.get(task.name) else _records(task.data)
        return task.held_out(n)
    return _records(task.validation_data)


def _records(path) -> int:
    from muxtune.executor.sources import read_records, source_kind

    return sum(1 for _ in read_records(Path(path), source_kind(Path(path))))


def plan_phase(config: RunConfig, cost_model, devices: list[str], works: dict) -> dict[str, Plan]:
    """The plan to run ("muxtune", chosen by the OR-Tools planner, muxtune.planner.plan) and the planner's
    baselines it is compared with (dedicated, spatial, temporal: planner/baselines.py), as Plans for a
    cluster of `devices` (this machine's, or catalog GPUs in a dry run). The planner prices the tasks as
    `works` says (exact adapter sizes and the data's mean lengths once they are loaded)."""
    from muxtune.planner.baselines import DESCRIPTIONS
    from muxtune.planner.plan import plan as search
    from muxtune.planning import free_memory_gib
    from muxtune.spec import Cluster

    if cost_model.profile is None and cost_model.hw is not None:  # a catalog GPU, priced analytically
        hardware, memory = cost_model.hw["name"], cost_model.hw["memory_gb"] * 1e9 / 2**30
    else:  # this machine
        hardware, memory = "this", config.memory_limit_gib or free_memory_gib(devices[0])
    cluster = Cluster(devices=len(devices), memory_gib=memory, hardware=hardware)
    result = search(config.tasks, cluster, cost_model, params={n: w.params for n, w in works.items()},
                    seq_lens={n: w.seq_len for n, w in works.items()})
    plans = {"muxtune": result.plan}
    for b in result.baselines:
        plans[b.candidate.planner] = b.plan.model_copy(update={"explanation": DESCRIPTIONS[b.candidate.planner]})
    if hardware == "this" and len(devices) == 1:  # the planner names this machine's device generically
        plans = {name: p.model_copy(update={"groups": [g.model_copy(update={"devices": devices}) for g in p.groups]})
                 for name, p in plans.items()}
    return plans


def simulate_phase(plans: dict[str, Plan], works: dict, steps: dict[str, int], cost_model, progress: bool = True):
    """Simulate every plan's whole job (planner.plan.simulate_job: each task for its own steps, leaving
    its group when done) and one step with every task present; returns (comparison table, the chosen
    plan's Timeline of that step, its memory)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from muxtune.planner.plan import simulate_job
    from muxtune.simulator.iteration import memory_breakdown, simulate_step

    rows, chosen = [], None
    for name, plan in tqdm(plans.items(), desc="simulating plans", unit="plan", disable=not progress):
        packed = plan.alignment.layout == "chunked"
        job = simulate_job(plan, works, steps, cost_model, packed)
        timeline = simulate_step(plan, works, cost_model, packed=packed)
        memory = memory_breakdown(plan, works, cost_model, timeline)
        if name == "dedicated":  # every instance holds its own backbone copy, also when it shares a device
            copies = pd.Series([sum(d in g.devices for g in plan.groups) for d in memory["device"]])
            memory["backbone"] = memory["backbone"] * copies.clip(lower=1)
        total = memory[["backbone", "adapters", "optimizer", "activations"]].sum(axis=1)
        rows.append({"plan": name, "groups": len(plan.groups),
                     "devices": len({d for g in plan.groups for d in g.devices}),
                     "tokens_per_s": job.throughput, "makespan_s": job.makespan,
                     "steady_tokens_per_s": job.steady, "step_s": timeline.step_seconds,
                     "bubble": max(0.0, *timeline.bubble_fraction.values()),  # float noise can dip below 0
                     "peak_memory_gib": float(total.max()) / 2**30})
        if name == "muxtune":
            chosen = (timeline, memory, job)
    comparison = pd.DataFrame(rows)
    comparison["vs_muxtune"] = comparison["tokens_per_s"] / comparison.loc[comparison["plan"] == "muxtune",
                                                                             "tokens_per_s"].iloc[0]
    return comparison, chosen[0], chosen[1], chosen[2]


def evaluation_step(plan: Plan, works: dict, steps: dict[str, int], cost_model):
    """(global step, Timeline) of the plan's first step after which tasks are evaluated, simulated with
    the tasks still training then and the evaluation forwards after it; None when no task validates.
    Beside the plain step's timeline, it shows what an evaluation adds to a step."""
    from muxtune.simulator.iteration import simulate_step
    from muxtune.simulator.workload import evaluation_schedule

    schedule = evaluation_schedule(works, steps)
    if not schedule:
        return None
    step, due = schedule[0]
    active = [g.model_copy(update={"tasks": [t for t in g.tasks if steps[t] >= step]}) for g in plan.groups]
    phase = plan.model_copy(update={"groups": [g for g in active if g.tasks]})
    return step, simulate_step(phase, works, cost_model, packed=plan.alignment.layout == "chunked", evaluating=due)


def predict(config: RunConfig, cost_model, cost_model_name: str, devices: list[str], plan: Plan | None = None,
            backbone=None, stats: dict | None = None, progress: bool = True) -> Prediction:
    """plan + simulate: a `plan` given by the user replaces the planner's choice, baselines stay."""
    config = with_step_counts(config, stats)
    works = task_works(config, cost_model, backbone, stats)
    steps = {t.name: t.steps for t in config.tasks}
    plans = plan_phase(config, cost_model, devices, works)
    if plan is not None:
        plan.check_against(config)
        plans["muxtune"] = plan
    comparison, timeline, memory, job = simulate_phase(plans, works, steps, cost_model, progress)
    info = {"name": config.name, "model": config.model, "cost_model": cost_model_name, "devices": devices,
            "gpus": len(devices), "tokens_per_s": job.throughput, "makespan_s": job.makespan,
            "evaluation_s": job.evaluation,  # validation forwards, within makespan_s
            "steady_tokens_per_s": job.steady, "step_s": timeline.step_seconds,
            "task_tokens_per_s": timeline.tokens_per_second, "bubble_fraction": timeline.bubble_fraction,
            "step_tokens": {n: w.tokens for n, w in works.items()},
            "job_tokens": sum(w.tokens * steps[n] for n, w in works.items()),
            "why": why(comparison)}
    evaluated = evaluation_step(plans["muxtune"], works, steps, cost_model)
    if evaluated is not None:
        step, evaluation = evaluated
        info["evaluation_step"] = {"after_step": step, "tasks": list(evaluation.evaluating),
                                   "step_s": evaluation.step_seconds, "evaluation_s": evaluation.evaluation_seconds}
    return Prediction(plans, comparison, timeline, memory, info, evaluated[1] if evaluated else None)


def with_step_counts(config: RunConfig, stats: dict | None) -> RunConfig:
    """The config as the planner and simulator count it: every epochs task's step count filled in, from
    its loaded data's training examples, or (a dry run, nothing loaded) its data file's non-empty lines."""
    tasks = []
    for t in config.tasks:
        if t.steps is None:
            n = stats[t.name].examples if stats and stats.get(t.name) else _records(t.data)
            t = t.model_copy(update={"steps": t.step_count(max(1, n - t.held_out(n)))})
        tasks.append(t)
    return config.model_copy(update={"tasks": tasks})


def why(comparison) -> str:
    """How the chosen plan compares with the best baseline, in numbers (the plan's own explanation, in
    plan.json, says which tasks fuse and why)."""
    mine = comparison[comparison["plan"] == "muxtune"].iloc[0]
    others = comparison[comparison["plan"] != "muxtune"]
    if others.empty:
        return ""
    best = others.sort_values("tokens_per_s", ascending=False).iloc[0]
    ratio = mine["tokens_per_s"] / best["tokens_per_s"] if best["tokens_per_s"] else float("inf")
    verdict = "ahead of" if ratio > 1 else "level with" if ratio == 1 else "behind"
    return (f"predicted {mine['tokens_per_s']:,.0f} useful tokens/s over the whole job (every task's steps, "
            f"{mine['makespan_s']:.3g} s): {ratio:.2f}x the best baseline ({best['plan']}, "
            f"{best['tokens_per_s']:,.0f} tokens/s), so {verdict} it; peak memory {mine['peak_memory_gib']:.3g} GiB "
            f"per device vs {best['peak_memory_gib']:.3g} GiB")


def write_prediction(prediction: Prediction, run_dir: Path) -> None:
    """plans.csv, simulation.csv, memory.csv, prediction.json, plans/<name>.json into `run_dir`."""
    import pandas as pd

    run_dir = Path(run_dir)
    write_text_atomic(run_dir / "plans.csv", prediction.comparison.to_csv(index=False))
    # one table for both simulated steps, told apart by `timeline`: the plain step, then (tasks validating)
    # the first step with evaluations, its `eval` events after the step
    events = [prediction.timeline.events.assign(timeline="step")]
    if prediction.evaluation_timeline is not None:
        events.append(prediction.evaluation_timeline.events.assign(timeline="evaluation step"))
    write_text_atomic(run_dir / "simulation.csv", pd.concat(events).to_csv(index=False))
    write_text_atomic(run_dir / "memory.csv", prediction.memory.to_csv(index=False))
    write_text_atomic(run_dir / "prediction.json", json.dumps(prediction.info, indent=2) + "\n")
    for name, plan in prediction.plans.items():
        (run_dir / "plans").mkdir(parents=True, exist_ok=True)
        plan.save(run_dir / "plans" / f"{name}.json")


def dry_run_devices(hardware: str, gpus: int) -> list[str]:
    if gpus < 1:
        raise MuxTuneError(f"--gpus: need at least 1, got {gpus}")
    return [f"{hardware}:{i}" for i in range(gpus)]


def plan_and_run(config: RunConfig, out_dir: Path, plan: Plan | None = None, profile: str | None = None,
                 dry_run: bool = False, hardware: str | None = None, gpus: int = 1,
                 progress: bool = True, resume: bool = False) -> tuple[Prediction, dict | None]:
    """The whole chain. Returns the prediction and the measured metrics (None for a dry run)."""
    from tqdm.auto import tqdm

    from muxtune.report import write_report

    out_dir = Path(out_dir)
    if hardware and not dry_run:
        raise MuxTuneError("--hardware: a catalog GPU that is not here can only be planned for: add --dry-run")
    phases = ["profile", "plan + simulate"] + ([] if dry_run else ["execute"]) + ["report"]
    with tqdm(total=len(phases), desc="plan-and-run", unit="phase", disable=not progress, position=0) as bar:
        def phase(name):
            bar.set_postfix_str(name)
        phase("profile")
        if not dry_run:  # every input is checked before the (possibly long) profile
            backbone, _, examples, stats = prepare(config, plan)
        cost_model, source = profile_phase(config, profile, hardware, progress)
        bar.update(1)
        phase("plan + simulate")
        if dry_run:
            devices = dry_run_devices(hardware, gpus) if hardware else config.device_list()[:1]
            prediction = predict(config, cost_model, source, devices, plan, progress=progress)
        else:
            devices = config.device_list()[:1] if plan is None else sorted({d for g in plan.groups for d in g.devices})
            prediction = predict(config, cost_model, source, devices, plan, backbone, stats, progress)
            del backbone, examples
        bar.update(1)
        metrics = None
        if dry_run:
            with staged_directory(out_dir) as staging:
                prediction.plans["muxtune"].save(staging / "plan.json")
                write_prediction(prediction, staging)
                phase("report")
                write_report(staging)
        else:
            phase("execute")
            # a bar per task beside the trainer's: tasks of different lengths finish at different steps
            counted = with_step_counts(config, stats)
            task_bars = {t.name: tqdm(total=t.steps, desc=f"{t.name} ({t.peft.method})", unit="step",
                                      disable=not progress, leave=False) for t in counted.tasks}

            def advance_task_bars(trainer):
                for name, run in trainer.runs.items():
                    if name in task_bars:
                        task_bars[name].update(run.step - task_bars[name].n)

            try:
                from muxtune.executor.distributed import world_size

                chosen = prediction.plans["muxtune"]
                # a multi-process run cannot call back into this process: its bars stay as they are
                metrics = execute(config, out_dir, plan=chosen, progress=progress, resume=resume,
                                  after_step=None if world_size(chosen) > 1 else advance_task_bars)
            finally:
                for task_bar in task_bars.values():
                    task_bar.close()
            bar.update(1)
            phase("report")
            write_prediction(prediction, out_dir)
            write_report(out_dir)
        bar.update(1)
    return prediction, metrics
