"""Iteration level: what one training step of a Plan looks like, as a SimPy event simulation.

Every device has a compute stream and a communication channel. Groups on the same devices share one
pipeline. Each device runs its stage's forward/backward of every micro-batch in the pipeline schedule's
order, each op waiting for its input: the previous stage's activations (forward) or the next stage's
gradients (backward), delivered by point-to-point transfers on full-duplex links between neighbouring
stages. Transfers and data-parallel all-reduces run on the communication side while compute goes on
(the executor overlaps them). At the start of the step the first stage of each replica does the
step's host work (kind `host`: CostModel.batch_host_seconds per micro-batch for fusing, routing and
loss bookkeeping; host_seconds per task for sampling its rows, its schedule, its gradient norm); at
the end each task's optimizer runs on every stage that holds its adapter, after its gradients are
all-reduced across replicas.

A step at which tasks are evaluated (`simulate_step(..., evaluating=tasks)`): after the step, the due
tasks' validation sets go through the backbone forward only, as MultiplexedTrainer.evaluate runs them:
fusion group after fusion group, each group's due tasks fused into micro-batches of the Plan's token
budget (workload.evaluation_passes), one event of kind `eval` per micro-batch on the group's first
device, priced by CostModel.evaluation_seconds. (Only single-process plans evaluate; the whole model's
forward runs where the executor's one process runs it.)

Schedules (Plan.schedule), per pipeline of p stages over units (group, micro-batch):
  1f1b         groups one after another, each its own 1F1B with a flush: bubble (p-1)/(m+p-1) per group
  interleaved  the groups' micro-batches alternate (g0 mb0, g1 mb0, g0 mb1, ...) in ONE 1F1B, so the
               groups fill each other's bubbles: bubble (p-1)/(M+p-1) with M micro-batches in all

Tensor parallelism (Layout.tp > 1): the tp devices of a stage run the same ops in lock step, each on its
shard of the layers (CostModel.forward_seconds / backward_seconds with tp), and between the compute
segments of every layer the all-reduces the executor waits for (CostModel.tp_collectives: 2 per layer
forward, up to 5 backward), each an event of kind `tp_allreduce` on every tensor rank's comm stream
while its compute stream idles. After the backward (and the data-parallel all-reduce) each task's
replicated adapter gradients are all-reduced over the tensor ranks (kind `tp_allreduce`, per task) before
its optimizer. Pipeline sends go between the same tensor rank of neighbouring stages; the data-parallel
all-reduce runs per tensor rank over its shard of the gradients.

Every duration and byte count comes from the CostModel; nothing here knows how long an op takes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import simpy

from muxtune.errors import MuxTuneError
from muxtune.profiler import memory_knobs
from muxtune.profiler.cost_model import GRAD_BYTES_PER_PARAM
from muxtune.schedule import blocks, one_f_one_b, process_rank, replica_parts, stage_of, stage_split
from muxtune.simulator.knobs import accumulated_parts
from muxtune.simulator.workload import MicroBatch, TaskWork, device_params, evaluation_passes, host_load

EVENT_COLUMNS = ["device", "stream", "group", "micro_batch", "kind", "start", "end", "task", "replica", "stage"]


@dataclass
class Timeline:
    """One simulated step. `events` has a row per op: device, stream (compute|comm), group (index in the
    plan), micro_batch (-1 for per-step ops), kind (host|fwd|recompute|bwd|send|recv|allreduce|tp_allreduce|
    optim|eval; `recompute`: a group with FusionGroup.recompute runs its blocks' forward again before each
    backward),
    start, end (s); with tp > 1 a fwd/bwd is several compute segments between its tp_allreduce events,
    task (host, optim and the replicated gradients' tp_allreduce), replica, stage. bubble_fraction counts
    waiting for a tp all-reduce as idle (the executor's measured bubble times it inside its fwd/bwd)."""

    events: pd.DataFrame
    step_seconds: float
    tokens_per_second: dict[str, float]  # real (non-padding) tokens of each task per second
    bubble_fraction: dict[str, float]  # per device: share of the step its compute stream is idle
    peak_memory: dict[str, int]  # per device, bytes: backbone part + task states + activations in flight
    schedule: str = "1f1b"
    evaluating: tuple[str, ...] = ()  # the tasks evaluated after this step (its `eval` events)
    evaluation_seconds: float = 0.0  # of step_seconds, the evaluation forwards'

    def summary(self) -> dict:
        return {"step_seconds": self.step_seconds, "tokens_per_second": self.tokens_per_second,
                "bubble_fraction": self.bubble_fraction, "peak_memory": self.peak_memory,
                "schedule": self.schedule, "evaluating": list(self.evaluating),
                "evaluation_seconds": self.evaluation_seconds}

    def gantt(self, path: Path, title: str = "") -> Path:
        from muxtune.simulator.plots import gantt

        evaluated = f" with evaluations of {', '.join(self.evaluating)}" if self.evaluating else ""
        title = title or f"one step ({self.schedule}){evaluated}: {self.step_seconds:.4g} s"
        return gantt(self.events, Path(path), title)


@dataclass
class _Pipeline:
    groups: list[int]  # plan group indices on these devices, in plan order
    devices: list[str]  # unique labels, replica-major: devices[(r * pp + s) * tp + t]
    dp: int
    pp: int
    stage_layers: list[int]
    tp: int = 1
    micro_batches: dict[int, list[list[MicroBatch]]] = field(default_factory=dict)  # group -> [replica][k]


def _pipelines(plan, works: dict[str, TaskWork], cost_model, packed: bool) -> list[_Pipeline]:
    n_layers = cost_model.shape.n_layers
    by_devices: dict[tuple[str, ...], _Pipeline] = {}
    owner: dict[str, tuple[str, ...]] = {}
    for gi, group in enumerate(plan.groups):
        key = tuple(group.devices)
        layout = group.layout
        where = f"plan: groups[{gi}]"
        for name in group.tasks:
            if name not in works:
                raise MuxTuneError(f"{where}: task {name!r} has no workload (not in the config)")
        if layout.tp > 1:  # what the executor would refuse is not priced either
            why = cost_model.tp_refusal(layout.tp, {works[t].method for t in group.tasks})
            if why:
                raise MuxTuneError(f"{where}: layout.tp={layout.tp}: {why}")
        for device in set(key):
            if device in owner and owner[device] != key:
                raise MuxTuneError(f"{where}: device {device!r} is shared with a group on other devices "
                                   f"{list(owner[device])}; groups share a pipeline only on the same device list")
            owner[device] = key
        split = stage_split(n_layers, layout.pp, layout.stage_layers, where)
        if key not in by_devices:
            labels = [d if key.count(d) == 1 else f"{d}#{i}" for i, d in enumerate(key)]
            by_devices[key] = _Pipeline([], labels, layout.dp, layout.pp, split, layout.tp)
        pipe = by_devices[key]
        if (pipe.dp, pipe.pp, pipe.tp, pipe.stage_layers) != (layout.dp, layout.pp, layout.tp, split):
            raise MuxTuneError(f"{where}: groups on the same devices need the same layout (dp, pp, tp, stage_layers)")
        pipe.groups.append(gi)
        parts = accumulated_parts([works[t] for t in group.tasks], group.accumulation, layout.dp * group.micro_batches,
                                  packed, group.recompute)
        pipe.micro_batches[gi] = [replica_parts(parts, r, layout.dp) for r in range(layout.dp)]
    return list(by_devices.values())


def _units(pipe: _Pipeline, replica: int, schedule: str) -> list[list[tuple[int, int]]]:
    """Blocks of (group, micro-batch) units; each block is one 1F1B (a flush between blocks)."""
    return blocks([[(g, k) for k in range(len(pipe.micro_batches[g][replica]))] for g in pipe.groups], schedule)


def simulate_step(plan, works: dict[str, TaskWork], cost_model, packed: bool = False,
                  evaluating=()) -> Timeline:
    """Simulate one optimizer step of every task in `plan` (a muxtune.spec.Plan). `works` gives each
    task's per-step work (see workload.task_work); packed=True counts real tokens only (chunk-aligned
    batches), else rows are padded to the group's longest sequence as the executor's `fuse` does.
    `evaluating`: tasks evaluated after this step (their eval_sequences): their forward-only passes
    follow the step (module docstring)."""
    n_layers = cost_model.shape.n_layers
    pipes = _pipelines(plan, works, cost_model, packed)
    env = simpy.Environment()
    rows: list[tuple] = []
    # device -> what CostModel.peak_bytes needs of it besides its order: (its tasks' parameters on it,
    # its stage's layers, first, last, tp)
    device_memory: dict[str, tuple] = {}
    mb_of: dict[tuple, object] = {}  # (device, group, micro_batch) -> the MicroBatch it holds from fwd start to bwd end

    def log(device, stream, group, mb, kind, start, task=None, replica=0, stage=0):
        rows.append((device, stream, group, mb, kind, start, env.now, task, replica, stage))

    def compute(delay):
        return env.timeout(max(0.0, float(delay)))

    def add_pipeline(pipe):  # a function, so each pipeline's closures see its own events and devices
        p, tp = pipe.pp, pipe.tp
        tp_kw = {"tp": tp} if tp > 1 else {}  # tp = 1: the CostModel interface as before
        first_last = [(s == 0, s == p - 1) for s in range(p)]
        links = {(r, s, d): simpy.Resource(env, 1) for r in range(pipe.dp) for s in range(p) for d in ("fwd", "bwd")}
        dp_channel = {(r, s): simpy.Resource(env, 1) for r in range(pipe.dp) for s in range(p)}
        ready = defaultdict(env.event)  # ("fwd"|"bwd", r, s, g, k) -> input arrived at that stage
        done = defaultdict(env.event)  # ("fwd"|"bwd", r, s, g, k) -> compute finished
        group_done = defaultdict(env.event)  # (r, block) -> the block's pipeline flushed
        reduced = defaultdict(env.event)  # (s, g) -> the group's gradients all-reduced on stage s

        def devices_of(r, s, _pipe=pipe):
            """The tensor ranks of replica r's stage s: they run the same ops in lock step."""
            first_device = process_rank(r, s, 0, _pipe.pp, _pipe.tp)
            return _pipe.devices[first_device:first_device + _pipe.tp]

        def log_all(r, s, stream, g, k, kind, start, task=None):
            for device in devices_of(r, s):
                log(device, stream, g, k, kind, start, task, r, s)

        def run_op(r, s, g, k, kind, mb, layers, first, last):
            """One forward/backward; with tp > 1 its compute segments and the all-reduces between them."""
            seconds = (cost_model.forward_seconds if kind == "fwd" else cost_model.backward_seconds)(
                mb, layers, first, last, **tp_kw)
            if kind == "bwd" and plan.groups[g].recompute:  # the blocks' forward again, before their backward
                start = env.now
                yield compute(memory_knobs.recompute_seconds(cost_model, mb, layers, tp))
                log_all(r, s, "compute", g, k, "recompute", start)
            if tp == 1:
                start = env.now
                yield compute(seconds)
                log_all(r, s, "compute", g, k, kind, start)
                return
            counts = cost_model.tp_collectives(mb, layers, first, kind) or [0]  # a stage of 0 layers: 1 segment
            reduce_seconds = cost_model.tp_allreduce_seconds(mb, tp)
            for count in counts:
                start = env.now
                yield compute(seconds / len(counts))
                log_all(r, s, "compute", g, k, kind, start)
                for _ in range(count):
                    start = env.now
                    yield compute(reduce_seconds)
                    log_all(r, s, "comm", g, k, "tp_allreduce", start)

        def transfer(direction, r, s_from, s_to, g, k, mb, _pipe=pipe, _links=links):
            yield done[(direction, r, s_from, g, k)]
            with _links[(r, min(s_from, s_to), direction)].request() as req:
                yield req
                start = env.now
                yield compute(cost_model.p2p_seconds(cost_model.boundary_bytes(mb)))
                log_all(r, s_from, "comm", g, k, "send", start)  # tensor rank t sends to tensor rank t
                log_all(r, s_to, "comm", g, k, "recv", start)
            ready[(direction, r, s_to, g, k)].succeed()

        def allreduce(s, g, nbytes, _pipe=pipe, _channels=dp_channel):
            last = [done[("bwd", r, s, g, len(_pipe.micro_batches[g][r]) - 1)] for r in range(_pipe.dp)
                    if _pipe.micro_batches[g][r]]
            yield env.all_of(last)
            requests = [_channels[(r, s)].request() for r in range(_pipe.dp)]
            yield env.all_of(requests)
            start = env.now
            yield compute(cost_model.allreduce_seconds(nbytes, _pipe.dp))
            for r, req in enumerate(requests):
                log_all(r, s, "comm", g, -1, "allreduce", start)  # each tensor rank over its shard
                _channels[(r, s)].release(req)
            reduced[(s, g)].succeed()

        def stage_process(r, s, blocks, _pipe=pipe):
            layers = _pipe.stage_layers[s]
            first, last = first_last[s]
            devices = devices_of(r, s)
            if s == 0:  # the step's host work: drawing and fusing the batches comes before any forward
                for g in _pipe.groups:
                    for k, mb in enumerate(_pipe.micro_batches[g][r]):
                        start = env.now
                        yield compute(cost_model.batch_host_seconds(mb))
                        log_all(r, s, "compute", g, k, "host", start)
                    for name in plan.groups[g].tasks:
                        start = env.now
                        yield compute(cost_model.host_seconds(
                            host_load(works[name], [works[t] for t in plan.groups[g].tasks], _pipe.dp, packed)))
                        log_all(r, s, "compute", g, -1, "host", start, name)
            for b, units in enumerate(blocks):
                if b > 0:
                    yield group_done[(r, b - 1)]
                for kind, (g, k) in one_f_one_b(units, s, p):
                    mb = _pipe.micro_batches[g][r][k]
                    if not (kind == "fwd" and s == 0):
                        yield ready[(kind, r, s, g, k)]
                    if kind == "fwd":
                        for device in devices:
                            mb_of[(device, g, k)] = mb
                    yield from run_op(r, s, g, k, kind, mb, layers, first, last)
                    done[(kind, r, s, g, k)].succeed()
                    if kind == "fwd" and s == p - 1:
                        ready[("bwd", r, s, g, k)].succeed()
                if s == 0:
                    group_done[(r, b)].succeed()
            if _pipe.tp > 1:  # after every data-parallel all-reduce: each task's replicated adapter gradients
                if _pipe.dp > 1:
                    yield env.all_of([reduced[(s, g)] for g in _pipe.groups])
                for g in _pipe.groups:
                    for name in plan.groups[g].tasks:
                        _, replicated = device_params(works[name], s, layers, n_layers, _pipe.tp, cost_model)
                        if replicated:
                            start = env.now
                            yield compute(cost_model.allreduce_seconds(replicated * GRAD_BYTES_PER_PARAM, _pipe.tp))
                            log_all(r, s, "comm", g, -1, "tp_allreduce", start, name)
            for g in _pipe.groups:  # each task's optimizer, once its gradients are complete everywhere
                if _pipe.dp > 1:
                    yield reduced[(s, g)]
                for name in plan.groups[g].tasks:
                    params, _ = device_params(works[name], s, layers, n_layers, _pipe.tp, cost_model)
                    if params:
                        start = env.now
                        yield compute(cost_model.optimizer_seconds(params))
                        log_all(r, s, "compute", g, -1, "optim", start, name)

        for s in range(p):
            layers = pipe.stage_layers[s]
            first, last = first_last[s]
            tasks = [t for g in pipe.groups for t in plan.groups[g].tasks]
            params = [device_params(works[t], s, layers, n_layers, tp, cost_model)[0] for t in tasks]
            for r in range(pipe.dp):
                for device in devices_of(r, s):
                    device_memory[device] = (params, layers, first, last, tp)
            if pipe.dp > 1:
                for g in pipe.groups:
                    grads = sum(device_params(works[t], s, layers, n_layers, tp, cost_model)[0]
                                for t in plan.groups[g].tasks)
                    env.process(allreduce(s, g, grads * GRAD_BYTES_PER_PARAM))
        for r in range(pipe.dp):
            blocks = _units(pipe, r, plan.schedule)
            for units in blocks:
                for g, k in units:
                    mb = pipe.micro_batches[g][r][k]
                    for s in range(p - 1):
                        env.process(transfer("fwd", r, s, s + 1, g, k, mb))
                        env.process(transfer("bwd", r, s + 1, s, g, k, mb))
            for s in range(p):
                env.process(stage_process(r, s, blocks))
    for pipe in pipes:
        add_pipeline(pipe)
    env.run()
    evaluation = 0.0
    if evaluating:  # after the whole step (env.now: its last event), as the executor evaluates
        first_device = {g: pipe.devices[0] for pipe in pipes for g in pipe.groups}
        start = env.now
        for g, mbs in evaluation_passes([list(group.tasks) for group in plan.groups], works, set(evaluating),
                                        plan.alignment.token_budget, plan.alignment.layout == "padded"):
            for k, mb in enumerate(mbs):
                began = env.now
                env.run(until=env.timeout(max(0.0, float(cost_model.evaluation_seconds([mb])))))
                log(first_device[g], "compute", g, k, "eval", began)
        evaluation = env.now - start

    events = pd.DataFrame(rows, columns=EVENT_COLUMNS)
    step = float(events["end"].max()) if len(events) else 0.0
    busy = events[events["stream"] == "compute"].assign(d=lambda e: e["end"] - e["start"]).groupby("device")["d"].sum()
    bubble = {d: (1.0 - float(busy.get(d, 0.0)) / step if step > 0 else 0.0) for d in device_memory}
    scheduled = {t for g in plan.groups for t in g.tasks}
    tokens = {t: (works[t].tokens / step if step > 0 else 0.0) for t in scheduled}
    return Timeline(events, step, tokens, bubble, _peak_memory(rows, device_memory, mb_of, cost_model), plan.schedule,
                    tuple(evaluating), evaluation)


def _peak_memory(rows: list[tuple], device_memory: dict[str, tuple], mb_of: dict[tuple, object],
                 cost_model) -> dict[str, int]:
    """CostModel.peak_bytes of every device, its micro-batches in the order the timeline holds them: from the
    start of a micro-batch's forward (first segment) to the end of its backward (last segment)."""
    held_from, held_to = {}, {}
    for device, _stream, group, mb, kind, start, end, *_ in rows:
        key = (device, group, mb)
        if kind == "fwd":
            held_from[key] = min(start, held_from.get(key, start))
        elif kind == "bwd":
            held_to[key] = max(end, held_to.get(key, end))
    changes = defaultdict(list)
    for key, start in held_from.items():
        changes[key[0]].append((start, 1, "fwd", key))
    for key, end in held_to.items():
        changes[key[0]].append((end, 0, "bwd", key))
    peak = {}
    for device, (params, layers, first, last, tp) in device_memory.items():
        # at equal times a release (0) comes before an allocation (1)
        order = [(kind, mb_of[key]) for _, _, kind, key in sorted(changes[device])]
        peak[device] = cost_model.peak_bytes(order, params, layers, first, last, tp)
    return peak


def memory_breakdown(plan, works: dict[str, TaskWork], cost_model, timeline: Timeline) -> pd.DataFrame:
    """Bytes per device at the step's peak, split the way an operator asks about them: the backbone part
    of the stage, adapter weights + gradients, AdamW's two moments, and activations in flight (the
    timeline's peak less the static part). One row per device of the plan."""
    n_layers = cost_model.shape.n_layers
    rows: dict[str, dict] = {}
    for group in plan.groups:
        layout = group.layout
        split = stage_split(n_layers, layout.pp, layout.stage_layers)
        for i, device in enumerate(group.devices):
            stage = stage_of(i, layout.pp, layout.tp)
            layers = split[stage]
            tp_kw = {"tp": layout.tp} if layout.tp > 1 else {}
            row = rows.setdefault(device, {"device": device, "backbone": cost_model.backbone_bytes(
                layers, stage == 0, stage == layout.pp - 1, **tp_kw), "adapters": 0, "optimizer": 0})
            params = sum(device_params(works[t], stage, layers, n_layers, layout.tp, cost_model)[0]
                         for t in group.tasks)
            state = cost_model.task_state_bytes(params)
            row["adapters"] += 2 * GRAD_BYTES_PER_PARAM * params  # fp32 weights + gradients
            row["optimizer"] += state - 2 * GRAD_BYTES_PER_PARAM * params  # the moments
    table = pd.DataFrame(list(rows.values()), columns=["device", "backbone", "adapters", "optimizer"])
    static = table[["backbone", "adapters", "optimizer"]].sum(axis=1)
    peak = table["device"].map(lambda d: timeline.peak_memory.get(d, 0))
    table["activations"] = (peak - static).clip(lower=0)
    return table
