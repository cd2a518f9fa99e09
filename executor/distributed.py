"""Running a multi-process Plan on torch.distributed: process groups, launching, gathering results.

One process per device of the Plan's layout (rank = (replica * pp + stage) * tp + tensor rank; gloo on
CPU, NCCL on CUDA).
`launch` starts them on this machine with torch.multiprocessing; on several machines start them with
torchrun (every node runs the same line; rank 0's node writes `runs/<name>/`):

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m muxtune.executor.distributed CONFIG --plan PLAN.json [--out DIR]

At the end every stage sends the adapter tensors it trained, and every replica's stage 0 its token
counts, to rank 0, which assembles the full adapters and writes the same outputs as a one-process run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from muxtune.errors import MuxTuneError
from muxtune.executor.pipeline import PipelineTrainer, Topology
from muxtune.executor.tensor_parallel import assemble_state
from muxtune.spec import Plan, RunConfig


def world_size(plan: Plan) -> int:
    layout = plan.groups[0].layout
    return layout.dp * layout.pp * layout.tp


def needs_processes(plan: Plan) -> bool:
    return any(g.layout.dp * g.layout.pp * g.layout.tp > 1 for g in plan.groups)


def check_plan(plan: Plan) -> None:
    """What the distributed executor carries out: every group on the same devices with the same
    layout (one pipeline shared by all groups, temporally multiplexed). Tensor parallelism's own limits
    (model family, LoRA only) are checked when the model and tasks are built (tensor_parallel.py)."""
    first = plan.groups[0]
    for i, group in enumerate(plan.groups):
        if group.devices != first.devices or group.layout != first.layout:
            raise MuxTuneError(f"plan: groups[{i}]: every group must use the same devices and layout as "
                               "groups[0] (one shared pipeline); separate pipelines are not implemented")
    kinds = {d.split(":")[0] for d in first.devices}
    if len(kinds) > 1:
        raise MuxTuneError(f"plan: groups[0].devices mixes device kinds {sorted(kinds)}")
    if "cuda" in kinds and not torch.cuda.is_available():
        raise MuxTuneError("plan: CUDA devices requested but no CUDA device is available here")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_topology(plan: Plan, rank: int, world: int) -> Topology:
    """Process groups of the layout; every process creates every group, in the same order."""
    layout = plan.groups[0].layout
    dp, pp, tp = layout.dp, layout.pp, layout.tp
    if world != dp * pp * tp:
        raise MuxTuneError(f"plan: layout needs dp*pp*tp = {dp * pp * tp} processes, got {world}")
    topo = Topology(rank=rank, dp=dp, pp=pp, tp=tp)
    rank_of = lambda r, s, t: (r * pp + s) * tp + t  # noqa: E731  (the order of FusionGroup.devices)
    for r in range(dp):
        group = dist.new_group([rank_of(r, s, t) for s in range(pp) for t in range(tp)])
        if r == topo.replica:
            topo.pipeline_group = group
    for s in range(pp):
        for t in range(tp):
            group = dist.new_group([rank_of(r, s, t) for r in range(dp)])
            if (s, t) == (topo.stage, topo.tensor_rank):
                topo.replica_group = group
    if tp > 1:
        for r in range(dp):
            for s in range(pp):
                group = dist.new_group([rank_of(r, s, t) for t in range(tp)])
                if (r, s) == (topo.replica, topo.stage):
                    topo.tensor_group = group
    return topo


def gather_to_rank0(trainer: PipelineTrainer) -> list[dict] | None:
    """Every process's share of the results, on rank 0 (None elsewhere)."""
    topo = trainer.topo
    payload = {
        "rank": topo.rank, "replica": topo.replica, "stage": topo.stage, "first": topo.first, "last": topo.last,
        "tensor_rank": topo.tensor_rank,
        "split_dims": trainer.tensor_parallel.split_dims if trainer.tensor_parallel else {},
        "states": {name: trainer.owned_state(run) for name, run in trainer.runs.items()},
        "losses": {name: run.losses for name, run in trainer.runs.items()},
        "tokens": {name: (run.tokens, run.computed_tokens) for name, run in trainer.runs.items()},
        "step_times": trainer.step_times, "step_tokens": trainer.step_tokens, "step_shapes": trainer.step_shapes,
        "task_step_tokens": trainer.task_step_tokens,
        "records": [(r.seconds, r.spans) for r in trainer.records],
    }
    gathered = [None] * topo.world if topo.rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    return gathered


def assemble(trainer: PipelineTrainer, gathered: list[dict]) -> None:
    """On rank 0: put the whole job's results into rank 0's trainer (full adapters from replica 0's
    stages and tensor ranks, losses from its last stage, tokens of every replica, a step's time = its
    slowest process). Tensor ranks hold the same losses and tokens: those come from tensor rank 0."""
    replica0 = [p for p in gathered if p["replica"] == 0]
    last = next(p for p in replica0 if p["last"] and p["tensor_rank"] == 0)
    heads = [p for p in gathered if p["first"] and p["tensor_rank"] == 0]
    trainer.step_times = [max(times) for times in zip(*(p["step_times"] for p in gathered))]
    trainer.step_tokens = [sum(t) for t in zip(*(p["step_tokens"] for p in heads))]
    trainer.step_shapes = [shape for p in heads for shape in p["step_shapes"]]
    for name, run in trainer.runs.items():
        state = {}
        for stage in sorted({p["stage"] for p in replica0}):
            ranks = sorted((p for p in replica0 if p["stage"] == stage), key=lambda p: p["tensor_rank"])
            state.update(assemble_state([(p["states"][name], p["split_dims"].get(name, {})) for p in ranks]))
        if trainer.tensor_parallel is not None:  # rank 0's slices become whole tensors again
            trainer.tensor_parallel.make_whole(run, state)
        run.adapter.load_export_state({k: v.to(trainer.device) for k, v in state.items()})
        run.losses = list(last["losses"][name])
        run.tokens = sum(p["tokens"][name][0] for p in heads)
        run.computed_tokens = sum(p["tokens"][name][1] for p in heads)
        run.seconds = sum(trainer.step_times[: run.step])


def worker(rank: int, world: int, config: RunConfig, plan: Plan, out_dir: str | None, progress: bool,
           result_file: str | None = None, resume: bool = False) -> dict | None:
    """One process of the job (torch.multiprocessing or torchrun): train its stage, gather to rank 0,
    which writes the run folder. Returns the metrics on rank 0. With `out_dir`, every process takes part
    in a checkpoint every `config.checkpoint_every` steps and at the end (rank 0 writes it,
    executor/checkpoint.py); `resume` continues from the last one."""
    from muxtune import admission
    from muxtune.executor import checkpoint
    from muxtune.run import prepare, write_run

    device = plan.groups[0].devices[rank]
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:  # torchrun: this node's device of the rank
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    else:  # processes share the CPU cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=world)
    try:
        topo = init_topology(plan, rank, world)
        local = config.model_copy(update={"devices": device if device.startswith("cuda") else "cpu"})
        backbone, plan, examples, stats = prepare(local, plan, distributed=True)
        # priced on the whole model, checked once each stage has dropped the other stages' weights
        estimates = admission.plan_estimates(backbone.model, config.tasks, plan)
        trainer = PipelineTrainer(backbone, config.tasks, examples, plan, topo)
        admission.admit_processes(estimates, rank, local.devices, backbone.model, config.memory_limit_gib)
        manifest, resumed_from = None, None
        if resume:
            manifest = checkpoint.restore_distributed(trainer, Path(out_dir), config.model,
                                                      {t.name: t for t in config.tasks})
            resumed_from = manifest["steps"]
        elif rank == 0 and out_dir is not None:  # a fresh run: earlier checkpoints are not its own
            shutil.rmtree(checkpoint.checkpoint_dir(Path(out_dir)), ignore_errors=True)

        def at_step_boundary(trainer):
            nonlocal manifest
            if out_dir is not None and config.checkpoint_every and \
                    len(trainer.step_times) % config.checkpoint_every == 0:
                manifest = checkpoint.save_distributed(trainer, Path(out_dir), config.model, manifest)

        dist.barrier()
        started = time.perf_counter()
        trainer.train(progress=progress, after_step=at_step_boundary)
        wall = time.perf_counter() - started
        if out_dir is not None:
            manifest = checkpoint.save_distributed(trainer, Path(out_dir), config.model, manifest)
        gathered = gather_to_rank0(trainer)
        metrics = None
        if rank == 0:
            assemble(trainer, gathered)
            metrics = collect(trainer, config, stats, wall, gathered)
            metrics["resumed_from_step"] = resumed_from
            if out_dir is not None:  # the final checkpoints stay with the outputs (as in one process)
                write_run(config, plan, trainer, backbone, stats, metrics, Path(out_dir),
                          checkpoints=checkpoint.checkpoint_dir(Path(out_dir)))
            if result_file is not None:
                Path(result_file).write_text(json.dumps(metrics))
        dist.barrier()
        return metrics
    finally:
        dist.destroy_process_group()


def collect(trainer: PipelineTrainer, config: RunConfig, stats: dict, wall: float, gathered: list[dict]) -> dict:
    from muxtune.run import collect_metrics

    metrics = collect_metrics(config, trainer, stats, wall)
    layout = trainer.plan.groups[0].layout
    metrics["distributed"] = {
        "dp": layout.dp, "pp": layout.pp, "tp": layout.tp, "schedule": trainer.plan.schedule,
        "devices": trainer.plan.groups[0].devices,
        "step_tokens": trainer.step_tokens,  # real tokens of each step, all replicas
        # per step: each task's computed tokens (chunk padding included), all replicas: the step's shapes
        "task_computed_tokens": [
            {name: sum(step.get(name, 0) for step in steps) for name in trainer.runs if any(name in s for s in steps)}
            for steps in zip(*(p["task_step_tokens"] for p in gathered if p["first"] and p["tensor_rank"] == 0))],
        # per process: share of the steps (after the first, warm-up one) its compute was idle: pipeline
        # bubbles and waits for transfers
        "bubble_fraction": {str(p["rank"]): bubble_fraction(p["records"], skip=1 if len(p["records"]) > 1 else 0)
                            for p in gathered},
        # per process: the last step's compute ops (kind, group, micro-batch, start s, end s), in order
        "last_step": {str(p["rank"]): p["records"][-1][1] if p["records"] else [] for p in gathered},
    }
    return metrics


def bubble_fraction(records: list[tuple[float, list]], skip: int = 0) -> float:
    """1 - compute time / wall time over the steps after `skip` warm-up steps."""
    records = records[skip:]
    wall = sum(seconds for seconds, _ in records)
    busy = sum(end - start for _, spans in records for *_, start, end in spans)
    return 1.0 - busy / wall if wall > 0 else 0.0


def _spawned(rank: int, world: int, port: int, config, plan, out_dir, progress, result_file, resume) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    worker(rank, world, config, plan, out_dir, progress, result_file, resume)


def launch(config: RunConfig, plan: Plan, out_dir: Path | None, progress: bool = True,
           resume: bool = False) -> dict:
    """Run the Plan's processes on this machine (torch.multiprocessing) and return rank 0's metrics."""
    import tempfile

    import torch.multiprocessing as mp

    check_plan(plan)
    world = world_size(plan)
    with tempfile.TemporaryDirectory(prefix="muxtune-dist-") as tmp:
        result_file = str(Path(tmp) / "metrics.json")
        try:
            mp.spawn(_spawned, args=(world, free_port(), config, plan, None if out_dir is None else str(out_dir),
                                     progress, result_file, resume), nprocs=world, join=True)
        except mp.ProcessRaisedException as exc:
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            message = next((l for l in reversed(lines) if "MuxTuneError" in l), None)
            if message is not None:
                raise MuxTuneError(message.split("MuxTuneError:", 1)[1].strip()) from None
            raise
        return json.loads(Path(result_file).read_text())


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: `torchrun ... -m muxtune.executor.distributed CONFIG --plan PLAN [--out DIR]`."""
    from muxtune.spec import load_config

    parser = argparse.ArgumentParser(prog="python -m muxtune.executor.distributed",
                                     description="one process of a multi-process plan (start with torchrun)")
    parser.add_argument("config")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoints")
    args = parser.parse_args(argv)
    try:
        config, plan = load_config(args.config), Plan.load(args.plan)
        plan.check_against(config, args.plan)
        check_plan(plan)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        out = args.out or str(Path("runs") / config.name)
        worker(rank, world, config, plan, out, not args.no_progress, resume=args.resume)
    except MuxTuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
