"""Candidate layouts of a backbone instance, and what a fusion group costs on one (from the CostModel).

The planner splits the cluster's devices into `instances` equal backbone instances (every divisor of
the device count); each instance runs one pipeline with a layout (dp replicas x pp stages x tp tensor
ranks, an even layer split, m micro-batches per replica). These few (instances, layout) pairs are
enumerated here, outside the CP-SAT model; for each one the model decides which tasks fuse and where
groups go. Tensor parallelism (tp > 1) is offered only where the executor carries it out and it can pay
(tp_degrees: LLaMA-family model, LoRA-only tasks, tp dividing the heads and MLP width, a fast
intra-node link, at most TP_MAX devices); a tp stage's work adds the all-reduces each of its ops waits
for, and its memory is the rank's shard.

A group's cost on a layout is the 1F1B time of its micro-batches on the slowest stage plus the
pipeline's fill and drain, the transfers of its boundary activations, the all-reduce of its
gradients, its tasks' optimizer steps and the step's host work (once per micro-batch: what fusing
pays once for all its tasks, and each task's own): an upper bound of what it adds to the pipeline's step
when groups take turns (1f1b). When groups interleave in one pipeline they fill each other's bubbles
and the fill and drain is paid once per step, so the fill part is kept apart (`fill_seconds`): an
instance costs the sum of its groups' other parts plus the largest fill (cpsat.instance_seconds). The
simulator, which overlaps these and tries both schedules, ranks the final candidates.
Every number comes from the CostModel; nothing here has its own timing formula.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections import Counter
from dataclasses import dataclass

from muxtune.profiler.cost_model import GRAD_BYTES_PER_PARAM
from muxtune.profiler import memory_knobs
from muxtune.schedule import one_f_one_b, replica_parts, stage_split
from muxtune.simulator.knobs import accumulated_parts
from muxtune.simulator.workload import TaskWork, device_params, host_load

TP_MAX = 8  # tensor ranks of one stage: the GPUs of one node (NVLink); TP's per-layer all-reduces stay inside it


@dataclass(frozen=True)
class LayoutChoice:
    """One backbone instance's parallel layout."""

    dp: int
    pp: int
    micro_batches: int
    stage_layers: tuple[int, ...]
    tp: int = 1

    @property
    def devices(self) -> int:
        return self.dp * self.pp * self.tp

    def label(self) -> str:
        tp = f" x tp{self.tp}" if self.tp > 1 else ""
        return f"dp{self.dp} x pp{self.pp}{tp}, {self.micro_batches} micro-batch{'es' * (self.micro_batches > 1)}"


@dataclass(frozen=True)
class GroupCost:
    seconds: float  # what the group adds to its pipeline's step (upper bound, see module docstring)
    activation_bytes: int  # worst stage: activations this group keeps in flight
    state_bytes: int  # worst stage: its tasks' adapter weights, gradients and AdamW moments
    job_seconds: float = 0.0  # what it adds until all its tasks finished their steps (see priced)
    fill_seconds: float = 0.0  # the part of `seconds` that fills and drains the pipeline (0 when pp = 1)
    job_fill_seconds: float = 0.0  # the same over all its tasks' steps
    recompute: bool = False  # memory knobs it was priced with (FusionGroup.recompute / .accumulation)
    accumulation: int = 1  # micro-steps every task of the group feeds its batch over


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(devices: int, n_layers: int, micro_batch_factors=(1, 4), tp_options=(1,)) -> list[LayoutChoice]:
    """Every dp x pp x tp = devices (pp <= layers, tp in tp_options), even layer split, m = pp x factor
    micro-batches (a larger m shortens the fill and drain and holds fewer activations; with pp = 1 it is
    gradient accumulation)."""
    out = []
    for tp in tp_options:
        if devices % tp:
            continue
        for pp in divisors(devices // tp):
            if pp > n_layers:
                continue
            split = tuple(stage_split(n_layers, pp, None))
            for factor in micro_batch_factors:
                out.append(LayoutChoice(devices // (pp * tp), pp, pp * factor, split, tp))
    return out


def tp_degrees(cm, works, devices: int) -> tuple[int, ...]:
    """The tensor-parallel degrees worth planning: 1, and every tp > 1 dividing `devices` (up to TP_MAX)
    that the executor carries out for these tasks on this model (CostModel.tp_refusal) on hardware with a
    fast intra-node link (CostModel.tp_fast_link: not CPU processes over gloo, not PCIe-only GPUs).
    A cost model without tensor-parallel pricing plans tp = 1."""
    if not getattr(cm, "tp_fast_link", lambda: False)():
        return (1,)
    methods = {w.method for w in works}
    return (1,) + tuple(tp for tp in divisors(devices) if 1 < tp <= TP_MAX and cm.tp_refusal(tp, methods) is None)


def instance_configs(devices: int, n_layers: int, tp_options=(1,)) -> list[tuple[int, LayoutChoice]]:
    """(instances, layout of each): every way to cut `devices` into equal instances, every layout of one."""
    return [(k, layout) for k in divisors(devices) for layout in layouts(devices // k, n_layers, tp_options=tp_options)]


class CachedCostModel:
    """Memoizes a CostModel's pure methods (MicroBatch is frozen and hashable): the planner prices the
    same micro-batches many times. Anything else is passed through."""

    CACHED = ("forward_seconds", "backward_seconds", "activation_bytes", "p2p_seconds", "allreduce_seconds",
              "optimizer_seconds", "boundary_bytes", "backbone_bytes", "task_state_bytes",
              "tp_comm_seconds", "tp_params", "held_bytes", "head_bytes", "host_seconds", "batch_host_seconds")
    # compositions of the cached methods, run over this object so their parts hit the cache
    COMPOSED = ("in_flight_bytes", "peak_bytes", "fill_seconds")

    def __init__(self, cost_model):
        self.inner = cost_model
        for name in self.CACHED:
            setattr(self, name, functools.lru_cache(maxsize=None)(getattr(cost_model, name)))
        for name in self.COMPOSED:
            setattr(self, name, types.MethodType(getattr(cost_model, name).__func__, self))

    def __getattr__(self, name):
        return getattr(self.inner, name)


def group_cost(works: tuple[TaskWork, ...], layout: LayoutChoice, cm, packed: bool, recompute: bool = False,
               accumulation: int = 1) -> GroupCost:
    """What one fusion group costs on `layout` (see the module docstring), with its memory knobs:
    recomputation adds the blocks' forward to every backward and keeps only their inputs
    (profiler/memory_knobs.py); accumulation feeds each task's batch over that many micro-steps."""
    n_layers, pp, tp = cm.shape.n_layers, layout.pp, layout.tp
    tp_kw = {"tp": tp} if tp > 1 else {}
    parts = accumulated_parts(list(works), {w.name: accumulation for w in works}, layout.dp * layout.micro_batches,
                              packed, recompute)
    mine = replica_parts(parts, 0, layout.dp)  # replica 0 gets the most sequences (earlier parts take the rest)
    distinct = Counter(mine)  # the even split makes most micro-batches alike: price each kind once
    stage_work, stage_act = [], []
    for s, layers in enumerate(layout.stage_layers):
        first, last = s == 0, s == pp - 1
        stage_work.append(sum(count * (cm.forward_seconds(mb, layers, first, last, **tp_kw)
                                       + cm.backward_seconds(mb, layers, first, last, **tp_kw)
                                       + (cm.tp_comm_seconds(mb, layers, first, tp) if tp > 1 else 0.0)
                                       + (memory_knobs.recompute_seconds(cm, mb, layers, tp) if recompute else 0.0))
                              for mb, count in distinct.items()))
        # 1F1B: stage s holds at most pp - s micro-batches (the CostModel's memory model, as admission's)
        order = [(kind, mine[i]) for kind, i in one_f_one_b(list(range(len(mine))), s, pp)]
        stage_act.append(cm.in_flight_bytes(order, layers, first, last, tp))
    fill = cm.fill_seconds(stage_work, mine)
    widest = max(layout.stage_layers)
    held = [device_params(w, 0, widest, n_layers, tp, cm) for w in works]  # (on a device, replicated)
    grads = sum(mine for mine, _ in held) * GRAD_BYTES_PER_PARAM
    allreduce = cm.allreduce_seconds(grads, layout.dp) if layout.dp > 1 else 0.0
    # tp: each task's replicated adapter gradients summed over the tensor ranks before its optimizer
    allreduce += sum(cm.allreduce_seconds(rep * GRAD_BYTES_PER_PARAM, tp) for _, rep in held if rep)
    optim = max(sum(cm.optimizer_seconds(p) for p in (device_params(w, s, layers, n_layers, tp, cm)[0] for w in works) if p)
                for s, layers in enumerate(layout.stage_layers))
    state = max(sum(cm.task_state_bytes(device_params(w, s, layers, n_layers, tp, cm)[0]) for w in works)
                for s, layers in enumerate(layout.stage_layers))
    # the step's host work on the first stage before its forwards, as the simulator has it: once per micro-batch
    # (drawing, fusing, routing the batch: what fusing pays once for all its tasks) and each task's own
    host = (sum(count * cm.batch_host_seconds(mb) for mb, count in distinct.items())
            + sum(cm.host_seconds(host_load(w, list(works), layout.dp, packed)) for w in works))
    return GroupCost(max(stage_work) + fill + allreduce + optim + host, int(max(stage_act)), int(state),
                     fill_seconds=fill, recompute=recompute, accumulation=accumulation)


def fitting_group_cost(works: tuple[TaskWork, ...], layout: LayoutChoice, cm, packed: bool,
                       room: int | None) -> GroupCost:
    """The group's cost with the fastest memory knobs (memory_knobs.KNOBS) whose states and activations
    fit in `room` bytes (a device's memory less its backbone part); when none fits, the one that needs the
    least (the caller's memory check then refuses it with that figure). room None: no knobs."""
    plain = group_cost(works, layout, cm, packed)
    if room is None or plain.state_bytes + plain.activation_bytes <= room:
        return plain
    options = [plain] + [group_cost(works, layout, cm, packed, r, k) for r, k in memory_knobs.KNOBS[1:]]
    fitting = [c for c in options if c.state_bytes + c.activation_bytes <= room]
    if fitting:
        return min(fitting, key=lambda c: c.seconds)
    return min(options, key=lambda c: (c.activation_bytes, c.seconds))


def backbone_bytes(layout: LayoutChoice, cm) -> int:
    """The largest backbone shard of a device (a stage's layers, their tp shard when tp > 1)."""
    pp, tp_kw = layout.pp, ({"tp": layout.tp} if layout.tp > 1 else {})
    return max(cm.backbone_bytes(layers, s == 0, s == pp - 1, **tp_kw) for s, layers in enumerate(layout.stage_layers))


def priced(g: tuple[int, ...], works: list[TaskWork], steps: list[int], layout: LayoutChoice, cm, packed: bool,
           costs: dict, room: int | None = None) -> GroupCost:
    """group_cost of the tasks `g` (indices into works), memoized in `costs`, with job_seconds: the time
    the group adds to its pipeline over all its tasks' steps. A task leaves the fused batch when its
    steps are done (the executor drops finished tasks), so the group runs in phases: all its tasks for
    the fewest steps, then the rest (priced as a group of their own) for their remaining steps.
    `room`: the bytes a device has for states and activations; the group gets the fastest memory knobs
    that fit it (fitting_group_cost), the same for one `costs` dict."""
    if g in costs:
        return costs[g]
    step = fitting_group_cost(tuple(works[i] for i in g), layout, cm, packed, room)
    first = min(steps[i] for i in g)
    rest = tuple(i for i in g if steps[i] > first)
    job, job_fill = step.seconds * first, step.fill_seconds * first
    if rest:
        later = priced(rest, works, steps, layout, cm, packed, costs, room)
        job += later.job_seconds - later.seconds * first  # the rest's phases after step `first`
        job_fill += later.job_fill_seconds - later.fill_seconds * first
    costs[g] = dataclasses.replace(step, job_seconds=job, job_fill_seconds=job_fill)
    return costs[g]
