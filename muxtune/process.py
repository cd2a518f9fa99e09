"""One process of a run: `run_process` trains its share of the Plan (the whole run in a world of one,
in the caller's process; a (replica, stage, tensor rank) of a multi-process plan otherwise), takes part
in checkpoints and in reading the spool at every step boundary, and on rank 0 gathers the results and
writes the run folder (muxtune/run.py: `execute` starts it, `prepare`, `collect_metrics`, `write_run`).

On several machines every node starts its processes with torchrun (rank 0's node writes `runs/<name>/`):

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m muxtune.process CONFIG --plan PLAN.json [--out DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from muxtune import allocator
from muxtune.errors import MuxTuneError
from muxtune.run import collect_metrics, prepare, write_run
from muxtune.spec import Plan, RunConfig


def run_process(rank: int, world: int, result_file: str | None, config: RunConfig, plan: Plan,
                out_dir: str | None, progress: bool, resume: bool = False, after_step=None) -> dict | None:
    """One process of the run (of `world`; 1: the whole run, in this process): train its share, gather
    to rank 0, which writes the run folder. Returns the metrics on rank 0. With `out_dir`, every
    process takes part in a checkpoint every `config.checkpoint_every` steps and at the end (rank 0
    writes it, executor/checkpoint.py), and in reading the spool at every step boundary (tasks submitted
    and cancelled mid-run, `poll_spool`); `resume` continues from the last checkpoint. `after_step(trainer)`
    runs on rank 0 at each step boundary, before the spool is read."""
    from muxtune import admission, admission_knobs, spool
    from muxtune.executor import checkpoint, distributed
    from muxtune.executor.trainer import MultiplexedTrainer

    device, local = plan.groups[0].devices[rank], config
    if world > 1:
        if device.startswith("cuda") and "LOCAL_RANK" in os.environ:  # torchrun: this node's device of the rank
            device = f"cuda:{os.environ['LOCAL_RANK']}"
        local = config.model_copy(update={"devices": device if device.startswith("cuda") else "cpu"})
    else:
        device = config.device_list()[0]
    distributed.start_process(device, rank, world)
    try:
        topo = distributed.init_topology(plan, rank, world)
        validation: dict = {}
        backbone, plan, examples, stats = prepare(local, plan, validation=validation)
        specs, run_plan = list(config.tasks), plan
        manifest, resumed_from, events = None, None, []
        if resume:  # tasks submitted before the kill are in the checkpoint (and in its groups), not the config
            manifest, joined, run_plan = distributed.from_rank0(
                topo, lambda: resumed_tasks(backbone, config, plan, Path(out_dir), world))
            for spec, data, valid, data_stats in joined:
                specs.append(spec)
                examples[spec.name], stats[spec.name] = data, data_stats
                if valid is not None:
                    validation[spec.name] = valid
        memory = {"cost_model": admission.cost_model_of(backbone.model), "params": {}}
        # priced on the whole model (tensor parallelism replaces its ops), checked once each stage has
        # dropped the other stages' weights: the adapter sizes are counted now, into the cache
        admission.plan_estimates(backbone.model, specs, run_plan, memory["cost_model"], memory["params"])
        trainer = MultiplexedTrainer(backbone, specs, examples, validation=validation, plan=run_plan, topology=topo)
        # admitted with recomputation / gradient accumulation where it fits only with them
        admitted = admission_knobs.admit(backbone.model, specs, run_plan, config.memory_limit_gib,
                                         params=memory["params"], rank=rank, world=world,
                                         cost_model=memory["cost_model"])
        trainer.recompute, trainer.accumulation = admitted.recompute, admitted.accumulation
        if manifest is not None:
            checkpoint.restore(trainer, Path(out_dir), manifest)
            resumed_from = manifest["steps"]
            for name, run in trainer.runs.items():  # cancelled before the kill: detached again
                if run.status == "cancelled":
                    trainer.cancel(name, run.reason)
        elif rank == 0 and out_dir is not None:  # a fresh run: earlier checkpoints and submissions are not its own
            shutil.rmtree(checkpoint.checkpoint_dir(Path(out_dir)), ignore_errors=True)
            shutil.rmtree(spool.spool_dir(Path(out_dir)), ignore_errors=True)
        if rank == 0 and out_dir is not None:
            spool.spool_dir(Path(out_dir)).mkdir(parents=True, exist_ok=True)

        def at_step_boundary(trainer):
            nonlocal manifest
            if out_dir is None:  # no run folder: no spool, no checkpoints
                if rank == 0 and after_step is not None:
                    after_step(trainer)
                return
            for event in poll_spool(trainer, Path(out_dir), config, memory, after_step):
                if event["event"] == "submitted":  # rank 0 read its data: the metrics list its stats
                    stats[event["task"]] = event["stats"]
                events.append(event)
            if config.checkpoint_every and len(trainer.step_times) % config.checkpoint_every == 0:
                manifest = checkpoint.save(trainer, Path(out_dir), config.model, manifest)

        started = time.perf_counter()
        trainer.train(progress=progress, after_step=at_step_boundary)
        wall = time.perf_counter() - started
        if out_dir is not None:
            manifest = checkpoint.save(trainer, Path(out_dir), config.model, manifest)
        gathered = distributed.gather_to_rank0(trainer) if world > 1 else None
        metrics = None
        if rank == 0:
            if gathered is not None:
                distributed.assemble(trainer, gathered)
            metrics = collect_metrics(config, trainer, stats, wall)
            if gathered is not None:
                metrics["distributed"] = distributed.distributed_metrics(trainer, gathered)
            metrics["resumed_from_step"] = resumed_from
            metrics["events"] = [{k: v for k, v in e.items() if k != "stats"} for e in events]
            if out_dir is not None:  # the final checkpoints stay with the outputs
                write_run(config, plan, trainer, backbone, stats, metrics, Path(out_dir),
                          checkpoints=checkpoint.checkpoint_dir(Path(out_dir)))
            if result_file is not None:
                Path(result_file).write_text(json.dumps(metrics))
        distributed.barrier(world)
        return metrics
    finally:
        distributed.stop_process(world)


def resumed_tasks(backbone, config: RunConfig, plan: Plan, out_dir: Path, world: int):
    """(manifest, the tasks that joined the checkpointed run through the spool with their data, the plan
    with the checkpoint's groups, which list them; a task added to the config since joins the first
    group of a one-process run)."""
    from muxtune.executor import checkpoint
    from muxtune.executor.validation import load_task_data

    manifest = checkpoint.load_manifest(out_dir)
    checkpoint.check_manifest(manifest, out_dir, config.model, {t.name: t for t in config.tasks})
    joined = checkpoint.joined_tasks(manifest, {t.name for t in config.tasks}, out_dir)
    checkpoint.check_layout(manifest, out_dir, plan, groups=world > 1, joined={s.name for s in joined})
    groups = [list(g) for g in manifest["groups"]]
    for spec in config.tasks:
        if not any(spec.name in g for g in groups):
            groups[0].append(spec.name)
    plan = plan.model_copy(update={"groups": [g.model_copy(update={"tasks": tasks})
                                              for g, tasks in zip(plan.groups, groups)]})
    return manifest, [(spec, *load_task_data(spec, backbone.tokenizer, spec.name)) for spec in joined], plan


def poll_spool(trainer, run_dir: Path, config: RunConfig, memory: dict, after_step=None) -> list[dict]:
    """Tenants come and go. Called by every process at each step boundary (with several, a collective):
    rank 0 runs `after_step`, reads the spool and the submitted tasks' data (muxtune/spool.decide) and
    sends the decided events to every process, which applies them in the same order (spool.apply):
    admission for each submission (admission.admit, its own collective), the task joins the group
    spool.join_group picks, cancellations detach. Rank 0 answers the files (`.rejected`, done/) and
    returns the events (empty elsewhere). `memory`: the CostModel and adapter-size cache of the run's
    admission."""
    from muxtune import admission_knobs, spool
    from muxtune.executor.distributed import from_rank0
    from muxtune.executor.validation import load_task_data

    topo = trainer.topo

    def decide():
        if after_step is not None:
            after_step(trainer)
        return spool.decide(run_dir, set(trainer.runs),
                            lambda spec: _reordered(load_task_data(spec, trainer.backbone.tokenizer, spec.name)))

    events = from_rank0(topo, decide)
    if not events:
        return []

    def admit(trainer, spec, group):
        groups = [list(g) for g in trainer.groups]
        groups[group].append(spec.name)
        base = trainer.plan.groups[0]
        plan = trainer.plan.model_copy(update={"groups": [base.model_copy(update={
            "tasks": tasks, "micro_batches": trainer.micro_batch_count(g), "recompute": trainer.recomputed(g),
            "accumulation": {t: k for t, k in trainer.accumulation.items() if t in tasks}})
            for g, tasks in enumerate(groups)]})
        specs = [run.spec for run in trainer.active] + [spec]
        joined = admission_knobs.admit(trainer.model, specs, plan, config.memory_limit_gib, what=f"submit {spec.name}",
                                       params=memory["params"], rank=topo.rank, world=topo.world,
                                       cost_model=memory["cost_model"])
        # the knobs change how a step runs, never what it computes
        trainer.recompute, trainer.accumulation = joined.recompute, joined.accumulation

    spool.apply(trainer, events, admit)
    if topo.rank != 0:
        return []
    return spool.answer(run_dir, events, len(trainer.step_times))


def _reordered(loaded: tuple) -> tuple:
    """validation.load_task_data's (examples, validation, stats) as spool.decide takes them."""
    examples, valid, data_stats = loaded
    return examples, data_stats, valid


def main(argv: list[str] | None = None) -> int:
    """torchrun entry, one process of a multi-process plan on several machines:
    `torchrun ... -m muxtune.process CONFIG --plan PLAN [--out DIR] [--resume]`."""
    import argparse

    from muxtune.executor.distributed import check_plan
    from muxtune.spec import load_config

    parser = argparse.ArgumentParser(prog="python -m muxtune.process",
                                     description="one process of a multi-process plan (start with torchrun)")
    parser.add_argument("config")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoints")
    args = parser.parse_args(argv)
    if argv is None:  # under torchrun: train on tcmalloc where installed (muxtune/allocator.py)
        allocator.reexec()
    try:
        config, plan = load_config(args.config), Plan.load(args.plan)
        plan.check_against(config, args.plan)
        check_plan(plan)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        out = args.out or str(Path("runs") / config.name)
        run_process(rank, world, None, config, plan, out, not args.no_progress, resume=args.resume)
    except MuxTuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
