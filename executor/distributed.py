"""Running a Plan on torch.distributed: process groups, launching, gathering results.

One process per device of the Plan's layout (rank = (replica * pp + stage) * tp + tensor rank; gloo on
CPU, NCCL on CUDA); every process runs the same step loop (executor/trainer.py) and the same run
(`muxtune.process.run_process`). A plan of one device is the world of one: no process is started and no
process group exists (`init_topology` and `from_rank0` then do nothing but return).
`launch` starts the processes on this machine with torch.multiprocessing; on several machines torchrun
starts them (muxtune/process.py). At the end every stage sends the adapter tensors it trained, and
every replica's stage 0 its token counts, to rank 0, which assembles the full adapters and writes the
same outputs as a one-process run.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from muxtune.errors import MuxTuneError
from muxtune.executor.pipeline import Topology
from muxtune.executor.tensor_parallel import assemble_state
from muxtune.schedule import process_rank
from muxtune.spec import Plan


def world_size(plan: Plan) -> int:
    layout = plan.groups[0].layout
    return layout.dp * layout.pp * layout.tp


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
    """Process groups of the layout; every process creates every group, in the same order (none in a
    world of one)."""
    layout = plan.groups[0].layout
    dp, pp, tp = layout.dp, layout.pp, layout.tp
    if world != dp * pp * tp:
        raise MuxTuneError(f"plan: layout needs dp*pp*tp = {dp * pp * tp} processes, got {world}")
    topo = Topology(rank=rank, dp=dp, pp=pp, tp=tp)
    if world == 1:
        return topo

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


def gather_to_rank0(trainer) -> list[dict] | None:
    """Every process's share of the results, on rank 0 (None elsewhere)."""
    topo = trainer.topo
    payload = {
        "rank": topo.rank, "replica": topo.replica, "stage": topo.stage, "first": topo.first, "last": topo.last,
        "tensor_rank": topo.tensor_rank,
        "split_dims": trainer.tensor_parallel.split_dims if trainer.tensor_parallel else {},
        "states": {name: trainer.stage.owned_state(run) for name, run in trainer.runs.items()},
        "losses": {name: run.losses for name, run in trainer.runs.items()},
        "accuracies": {name: run.accuracies for name, run in trainer.runs.items()},
        "tokens": {name: (run.tokens, run.computed_tokens) for name, run in trainer.runs.items()},
        "step_times": trainer.step_times, "step_tokens": trainer.step_tokens, "step_shapes": trainer.step_shapes,
        "task_step_tokens": trainer.task_step_tokens,
        "records": [(r.seconds, r.spans) for r in trainer.records],
    }
    gathered = [None] * topo.world if topo.rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    return gathered


def assemble(trainer, gathered: list[dict]) -> None:
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
        run.losses, run.accuracies = list(last["losses"][name]), list(last["accuracies"][name])
        run.tokens = sum(p["tokens"][name][0] for p in heads)
        run.computed_tokens = sum(p["tokens"][name][1] for p in heads)
        run.seconds = sum(trainer.step_times[: run.step])


def from_rank0(topo: Topology, produce):
    """`produce()` on rank 0, its result on every process (broadcast); a MuxTuneError raised there is
    raised on every process. In a world of one: `produce()`."""
    if topo.world == 1:
        return produce()
    message = [None]
    if topo.rank == 0:
        try:
            message = [("ok", produce())]
        except MuxTuneError as exc:
            message = [("error", str(exc))]
    dist.broadcast_object_list(message, src=0)
    if message[0][0] == "error":
        raise MuxTuneError(message[0][1])
    return message[0][1]


def distributed_metrics(trainer, gathered: list[dict]) -> dict:
    """metrics.json's `distributed` section of a multi-process run (on rank 0, from every process's share)."""
    layout = trainer.layout
    return {
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


def bubble_fraction(records: list[tuple[float, list]], skip: int = 0) -> float:
    """1 - compute time / wall time over the steps after `skip` warm-up steps."""
    records = records[skip:]
    wall = sum(seconds for seconds, _ in records)
    busy = sum(end - start for _, spans in records for *_, start, end in spans)
    return 1.0 - busy / wall if wall > 0 else 0.0


def start_process(device: str, rank: int, world: int) -> None:
    """This process's device (and CPU threads), and its process group when the world has several."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    elif world > 1:  # processes share the CPU cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=world)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def stop_process(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, target, args: tuple) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    target(rank, world, *args)


def launch(target, plan: Plan, args: tuple) -> dict:
    """Run `target(rank, world, result_file, *args)` in each of the Plan's processes on this machine
    (torch.multiprocessing) and return the metrics rank 0 writes to `result_file` (JSON). `target` and
    `args` are pickled to the spawned processes (a module-level function; callbacks in `args` too)."""
    import tempfile

    import torch.multiprocessing as mp

    check_plan(plan)
    world = world_size(plan)
    with tempfile.TemporaryDirectory(prefix="muxtune-dist-") as tmp:
        result_file = str(Path(tmp) / "metrics.json")
        try:
            mp.spawn(_spawned, args=(world, free_port(), target, (result_file, *args)), nprocs=world, join=True)
        except mp.ProcessRaisedException as exc:
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            message = next((l for l in reversed(lines) if "MuxTuneError" in l), None)
            if message is not None:
                raise MuxTuneError(message.split("MuxTuneError:", 1)[1].strip()) from None
            raise
        return json.loads(Path(result_file).read_text())
