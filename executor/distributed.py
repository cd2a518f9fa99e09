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
from muxtune.schedule import process_rank
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

    def rank_of(r, s, t):  # the order of FusionGroup.devices
        return process_rank(r, s, t, pp, tp)

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


def load_task_data(backbone, spec):
    from muxtune.executor.data import DataOptions, load_examples

    return load_examples(spec.data, backbone.tokenizer, spec.max_seq_len, key=f"{spec.name}.data",
                         options=DataOptions.of(spec))


def from_rank0(rank: int, produce):
    """`produce()` on rank 0, its result on every process (broadcast); a MuxTuneError raised there is
    raised on every process."""
    message = [None]
    if rank == 0:
        try:
            message = [("ok", produce())]
        except MuxTuneError as exc:
            message = [("error", str(exc))]
    dist.broadcast_object_list(message, src=0)
    if message[0][0] == "error":
        raise MuxTuneError(message[0][1])
    return message[0][1]


def resumed_tasks(rank: int, backbone, config: RunConfig, plan: Plan, out_dir: Path):
    """The tasks that joined the checkpointed run through the spool (rank 0 reads the manifest and their
    data, every process gets them) and the plan with the checkpoint's groups, which list them."""
    from muxtune.executor import checkpoint

    def read():
        manifest = checkpoint.load_manifest(out_dir)
        joined = checkpoint.joined_tasks(manifest, {t.name for t in config.tasks}, out_dir)
        checkpoint.check_layout(manifest, out_dir, plan, joined={s.name for s in joined})
        return [(spec, *load_task_data(backbone, spec)) for spec in joined], manifest["groups"]

    joined, groups = from_rank0(rank, read)
    if joined:
        plan = plan.model_copy(update={"groups": [g.model_copy(update={"tasks": list(tasks)})
                                                  for g, tasks in zip(plan.groups, groups)]})
    return joined, plan


def poll_spool(trainer: PipelineTrainer, run_dir: Path, config: RunConfig, device: str, memory: dict,
               after_step=None) -> list[dict]:
    """Tenants come and go in a multi-process run. Called by every process at each step boundary (a
    collective): rank 0 runs `after_step`, reads the spool and the submitted tasks' data
    (muxtune/spool.decide) and broadcasts the decided events; every process then applies them in the
    same order (spool.apply): admission per device for each submission (admission.admit_processes, its
    own collective), the task joins the group spool.join_group picks, cancellations detach. Rank 0
    answers the files (`.rejected`, done/) and returns the events (empty elsewhere). `memory`: the
    CostModel and adapter-size cache of the run's admission."""
    from muxtune import admission, spool

    topo = trainer.topo

    def decide():
        if after_step is not None:
            after_step(trainer)
        return spool.decide(run_dir, set(trainer.runs), lambda spec: load_task_data(trainer.inner.backbone, spec))

    events = from_rank0(topo.rank, decide)
    if not events:
        return []

    def admit(trainer, spec, group):
        groups = spool.trainer_groups(trainer)
        groups[group].append(spec.name)
        plan = trainer.plan.model_copy(update={"groups": [g.model_copy(update={"tasks": tasks})
                                                          for g, tasks in zip(trainer.plan.groups, groups)]})
        specs = [run.spec for run in trainer.active] + [spec]
        estimates = admission.plan_estimates(trainer.model, specs, plan, memory["cost_model"], memory["params"])
        admission.admit_processes(estimates, topo.rank, device, trainer.model, config.memory_limit_gib,
                                  what=f"submit {spec.name}")

    spool.apply(trainer, events, admit)
    if topo.rank != 0:
        return []
    return spool.answer(run_dir, events, len(trainer.step_times))


def worker(rank: int, world: int, config: RunConfig, plan: Plan, out_dir: str | None, progress: bool,
           result_file: str | None = None, resume: bool = False, after_step=None) -> dict | None:
    """One process of the job (torch.multiprocessing or torchrun): train its stage, gather to rank 0,
    which writes the run folder. Returns the metrics on rank 0. With `out_dir`, every process takes part
    in a checkpoint every `config.checkpoint_every` steps and at the end (rank 0 writes it,
    executor/checkpoint.py), and in reading the spool at every step boundary (tasks submitted and
    cancelled mid-run, `poll_spool`); `resume` continues from the last checkpoint. `after_step(trainer)`
    runs on rank 0 at each step boundary, before the spool is read."""
    from muxtune import admission, spool
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
        specs, run_plan = list(config.tasks), plan
        if resume:  # tasks submitted before the kill are in the checkpoint (and in its groups), not the config
            joined, run_plan = resumed_tasks(rank, backbone, config, plan, Path(out_dir))
            for spec, data, data_stats in joined:
                specs.append(spec)
                examples[spec.name], stats[spec.name] = data, data_stats
        # priced on the whole model, checked once each stage has dropped the other stages' weights
        memory = {"cost_model": admission.cost_model_of(backbone.model), "params": {}}
        estimates = admission.plan_estimates(backbone.model, specs, run_plan, memory["cost_model"], memory["params"])
        trainer = PipelineTrainer(backbone, specs, examples, run_plan, topo)
        admission.admit_processes(estimates, rank, local.devices, backbone.model, config.memory_limit_gib)
        manifest, resumed_from, events = None, None, []
        if resume:
            manifest = checkpoint.restore_distributed(trainer, Path(out_dir), config.model,
                                                      {t.name: t for t in config.tasks})
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
            for event in poll_spool(trainer, Path(out_dir), config, local.devices, memory, after_step):
                if event["event"] == "submitted":  # rank 0 read its data: the metrics list its stats
                    stats[event["task"]] = event["stats"]
                events.append(event)
            if config.checkpoint_every and len(trainer.step_times) % config.checkpoint_every == 0:
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
            metrics["events"] = [{k: v for k, v in e.items() if k != "stats"} for e in events]
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


def _spawned(rank: int, world: int, port: int, config, plan, out_dir, progress, result_file, resume,
             after_step) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    worker(rank, world, config, plan, out_dir, progress, result_file, resume, after_step)


def launch(config: RunConfig, plan: Plan, out_dir: Path | None, progress: bool = True,
           resume: bool = False, after_step=None) -> dict:
    """Run the Plan's processes on this machine (torch.multiprocessing) and return rank 0's metrics.
    `after_step(trainer)` runs on rank 0 at each step boundary; it is pickled to the spawned processes
    (a module-level function, or a functools.partial of one)."""
    import tempfile

    import torch.multiprocessing as mp

    check_plan(plan)
    world = world_size(plan)
    with tempfile.TemporaryDirectory(prefix="muxtune-dist-") as tmp:
        result_file = str(Path(tmp) / "metrics.json")
        try:
            mp.spawn(_spawned, args=(world, free_port(), config, plan, None if out_dir is None else str(out_dir),
                                     progress, result_file, resume, after_step), nprocs=world, join=True)
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
