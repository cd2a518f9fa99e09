"""One multiplexed run, from a validated config to `runs/<name>/`.

Everything that can be wrong with the input (config, model, data files, plan) is checked before the
first output is written; outputs are assembled in a hidden staging folder and renamed into place at the
end, so a failed or interrupted run never leaves a half-written run folder.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from muxtune.errors import MuxTuneError
from muxtune.spec import Plan, RunConfig, staged_directory, write_text_atomic

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def prepare(config: RunConfig, plan: Plan | None = None, distributed: bool = False):
    """Load the backbone and every task's data; raise MuxTuneError on any bad input. `distributed`:
    the caller is one process of a multi-process plan (executor/distributed.py checks its layout)."""
    from muxtune.executor.backbone import load_backbone
    from muxtune.executor.data import DataOptions, load_examples

    devices = check_devices(config)
    plan = plan or Plan.trivial(config)
    plan.check_against(config)
    if not distributed and any(g.layout.dp * g.layout.pp * g.layout.tp > 1 or g.devices != plan.groups[0].devices
           for g in plan.groups):
        raise MuxTuneError("plan: the single-process executor runs fusion groups one after another on one "
                           "device; parallel layouts run in the distributed executor (muxtune.run.execute)")
    backbone = load_backbone(config.model, device=devices[0], dtype=DTYPES[config.dtype])
    examples, stats = {}, {}
    for i, task in enumerate(config.tasks):
        examples[task.name], stats[task.name] = load_examples(task.data, backbone.tokenizer, task.max_seq_len,
                                                              key=f"tasks[{i}].data", options=DataOptions.of(task))
    return backbone, plan, examples, stats


def execute(config: RunConfig, out_dir: Path, plan: Plan | None = None, progress: bool = True,
            resume: bool = False, after_step=None) -> dict:
    """Validate, train every task multiplexed, export adapters, write plan/metrics/report. Returns metrics.

    While training, `out_dir` holds `checkpoints/` (every `config.checkpoint_every` steps, see
    executor/checkpoint.py) and `spool/` (tasks submitted or cancelled mid-run, see muxtune/spool.py);
    the finished outputs replace it in one rename. `resume=True` continues from the checkpoints."""
    from muxtune import admission, spool
    from muxtune.executor import checkpoint
    from muxtune.executor.data import DataOptions, load_examples
    from muxtune.executor.trainer import MultiplexedTrainer
    from muxtune.spec import TaskSpec

    out_dir = Path(out_dir)
    if plan is not None:
        from muxtune.executor.distributed import launch, needs_processes

        if needs_processes(plan):  # one process per device of the layout, same outputs (rank 0 writes them)
            if resume:
                raise MuxTuneError("--resume: multi-process plans do not checkpoint yet (docs/distributed.md)")
            plan.check_against(config)
            check_devices(config)
            return launch(config, plan, out_dir, progress)
    backbone, plan, examples, stats = prepare(config, plan)
    specs, groups = list(config.tasks), [list(g.tasks) for g in plan.groups]
    manifest, resumed_from = None, None

    def load_data(spec: TaskSpec):
        data, data_stats = load_examples(spec.data, backbone.tokenizer, spec.max_seq_len, key=f"{spec.name}.data",
                                         options=DataOptions.of(spec))
        stats[spec.name] = data_stats
        return data, data_stats

    if resume:
        manifest = checkpoint.load_manifest(out_dir)
        checkpoint.check_manifest(manifest, out_dir, config.model, {t.name: t for t in config.tasks})
        resumed_from = manifest["steps"]
        for name, entry in manifest["tasks"].items():  # tasks submitted while the run went on
            if name not in examples:
                spec = TaskSpec.model_validate(entry["spec"])
                examples[name], _ = load_data(spec)
                specs.append(spec)
        groups = [list(g) for g in manifest["groups"]]
        for spec in config.tasks:  # a task added to the config since: joins the first group
            if not any(spec.name in g for g in groups):
                groups[0].append(spec.name)
    estimate = admission.admit(backbone.model, specs, groups, plan.alignment, config.memory_limit_gib)
    if not resume:
        shutil.rmtree(checkpoint.checkpoint_dir(out_dir), ignore_errors=True)
        shutil.rmtree(spool.spool_dir(out_dir), ignore_errors=True)
    trainer = MultiplexedTrainer(backbone, specs, examples, groups=groups, alignment=plan.alignment)
    if manifest is not None:
        checkpoint.restore(trainer, out_dir, manifest)
        for name, run in trainer.runs.items():
            if run.status == "cancelled":
                trainer.cancel(name, run.reason)
    spool.spool_dir(out_dir).mkdir(parents=True, exist_ok=True)
    events: list[dict] = []
    adapter_sizes = dict(estimate.adapters)

    def admit_submitted(trainer, spec):
        active = [r.spec for r in trainer.active] + [spec]
        admitted = admission.admit(backbone.model, active, [[s.name for s in active]], plan.alignment,
                                   config.memory_limit_gib, what=f"submit {spec.name}", adapters=adapter_sizes)
        adapter_sizes.update(admitted.adapters)

    def at_step_boundary(trainer):
        nonlocal manifest
        if after_step is not None:
            after_step(trainer)
        events.extend(spool.poll(trainer, out_dir, load_data, admit_submitted))
        if config.checkpoint_every and len(trainer.step_times) % config.checkpoint_every == 0:
            manifest = checkpoint.save(trainer, out_dir, config.model, manifest)

    started = time.perf_counter()
    trainer.train(progress=progress, after_step=at_step_boundary)
    wall = time.perf_counter() - started
    manifest = checkpoint.save(trainer, out_dir, config.model, manifest)
    metrics = collect_metrics(config, trainer, stats, wall)
    metrics["events"] = [{k: v for k, v in e.items() if k != "stats"} for e in events]
    metrics["resumed_from_step"] = resumed_from
    # the final checkpoints stay with the outputs (a copy: until the rename the old folder is intact)
    write_run(config, plan, trainer, backbone, stats, metrics, out_dir,
              checkpoints=checkpoint.checkpoint_dir(out_dir))
    return metrics


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
            export_adapter(run.adapter, backbone.model, backbone.name, staging / "adapters" / name)
        write_text_atomic(staging / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_report(staging, metrics, plan)


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
        "tasks": tasks,
    }
