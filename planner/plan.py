"""The planner's entry point: tasks + cluster + CostModel -> a Plan (muxtune/spec.py) and a comparison
of that plan with the baseline planners, every figure from the simulator.

    result = plan(config.tasks, cluster, cost_model, objective="throughput", time_limit=10)
    result.plan.save("plan.json"); print(result.table); print(result.plan.explanation)

Steps: (1) every (instances, layout) pair (layouts.instance_configs) is screened by the greedy solution
(cpsat.greedy); on the `solve` best pairs the CP-SAT model (cpsat.solve) chooses the fusion groups
and their instance, sharing half the time limit (the best-screened pair a double share; what one leaves unused
goes to the next);
(2) the `top` best solutions by their estimate are simulated (simulator/iteration.py), each with both
pipeline schedules when it has several stages, and the best simulated one that fits memory on every
device is the plan; (3) the baselines are simulated the same way; (4) explain.py writes why.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pandas as pd

from muxtune.errors import MuxTuneError
from muxtune.planner import baselines, cpsat
from muxtune.planner.layouts import CachedCostModel, instance_configs
from muxtune.simulator.iteration import simulate_step
from muxtune.simulator.workload import TaskWork, estimate_params, method_rank, split_micro_batches, task_work
from muxtune.spec import Alignment, Cluster, FusionGroup, Layout, Plan

GIB = 2**30
CHUNK_LENGTHS = (16, 32, 64, 128)


@dataclass
class Evaluation:
    """A candidate as the simulator sees it."""

    candidate: cpsat.Candidate
    schedule: str
    plan: Plan
    throughput: float  # useful tokens/s, all instances together
    makespan: float  # s to finish every task's steps: each group's share of the step (its compute time) x its steps
    peak_memory: int  # bytes, the most on any device
    fits: bool


@dataclass
class PlanResult:
    plan: Plan
    table: pd.DataFrame  # one row per planner: the plan, then each baseline
    chosen: Evaluation
    baselines: list[Evaluation]
    solver_status: list[str] = field(default_factory=list)
    solve_seconds: float = 0.0  # wall time of the whole search (CP-SAT + simulation)


def device_labels(cluster: Cluster, cost_model) -> list[str]:
    if str(cost_model.device).startswith("cpu"):
        return ["cpu"] if cluster.devices == 1 else [f"cpu:{i}" for i in range(cluster.devices)]
    return [f"cuda:{i}" for i in range(cluster.devices)]


def works_of(tasks, cost_model, params: dict[str, int] | None = None) -> list[TaskWork]:
    """Each task's step (batch_size sequences of max_seq_len tokens: the worst case); parameters from
    `params` (exact counts) or estimated from method and rank on the cost model's shape."""
    out = []
    for t in tasks:
        count = params[t.name] if params and t.name in params else estimate_params(
            t.peft.method, method_rank(t.peft), cost_model.shape)
        out.append(task_work(t, count))
    return out


def to_plan(candidate: cpsat.Candidate, labels: list[str], schedule: str, works: list[TaskWork]) -> Plan:
    """A Candidate as a Plan: instance s takes devices [s*d, (s+1)*d), replica-major."""
    layout, d = candidate.layout, candidate.layout.devices
    by_name = {w.name: w for w in works}
    groups, budget = [], 1
    for s, instance in enumerate(candidate.instances):
        devices = labels[s * d:(s + 1) * d]
        for names in instance:
            groups.append(FusionGroup(tasks=list(names), devices=devices, micro_batches=layout.micro_batches,
                                      layout=Layout(dp=layout.dp, pp=layout.pp, stage_layers=list(layout.stage_layers))))
            parts = split_micro_batches([by_name[n] for n in names], layout.dp * layout.micro_batches, candidate.packed)
            budget = max(budget, max(mb.tokens for mb in parts))
    if candidate.packed:
        alignment = Alignment(layout="chunked", chunk_len=_chunk_len(works), token_budget=budget)
    else:
        alignment = Alignment(layout="padded", token_budget=budget)
    return Plan(planner=candidate.planner, groups=groups, schedule=schedule, alignment=alignment)


def _chunk_len(works: list[TaskWork]) -> int:
    """The chunk length that pads the tasks' sequences least (ties: the longer chunk, fewer rows)."""
    waste = {c: sum(w.sequences * (math.ceil(w.seq_len / c) * c - w.seq_len) for w in works) for c in CHUNK_LENGTHS}
    return min(CHUNK_LENGTHS, key=lambda c: (waste[c], -c))


def simulate(candidate: cpsat.Candidate, works: list[TaskWork], steps: dict[str, int], cm, labels: list[str],
             memory_bytes: int, schedule: str) -> Evaluation:
    """Simulate every instance of the candidate on its own (instances run independently)."""
    plan = to_plan(candidate, labels, schedule, works)
    by_name = {w.name: w for w in works}
    d = candidate.layout.devices
    throughput, makespan, peak = 0.0, 0.0, 0
    for s, instance in enumerate(candidate.instances):
        groups = [g for g in plan.groups if g.devices == labels[s * d:(s + 1) * d]]
        sub = plan.model_copy(update={"groups": groups})
        timeline = simulate_step(sub, by_name, cm, packed=candidate.packed)
        throughput += sum(by_name[t].tokens for g in groups for t in g.tasks) / timeline.step_seconds
        copies = len(groups) if candidate.notes.get("backbone_copies") else 1
        extra = (copies - 1) * max(cm.backbone_bytes(k, i == 0, i == candidate.layout.pp - 1)
                                   for i, k in enumerate(candidate.layout.stage_layers))
        peak = max(peak, max(timeline.peak_memory.values()) + extra)
        # makespan: a group leaves the pipeline when its tasks are done; the simulated step is split
        # among the groups by their compute time on the instance, and each share lasts the group's steps
        compute = timeline.events[timeline.events["stream"] == "compute"]
        busy = (compute["end"] - compute["start"]).groupby(compute["group"]).sum()
        total = float(busy.sum())
        makespan = max(makespan, sum(timeline.step_seconds * float(busy.get(i, 0.0)) / total
                                     * max(steps[t] for t in g.tasks) for i, g in enumerate(groups)))
    return Evaluation(candidate, schedule, plan, throughput, makespan, peak, peak <= memory_bytes)


def _better(a: Evaluation, b: Evaluation | None, objective: str) -> bool:
    if b is None:
        return True
    if a.fits != b.fits:
        return a.fits
    return a.throughput > b.throughput if objective == "throughput" else a.makespan < b.makespan


def plan(tasks, cluster: Cluster, cost_model, objective: str = "throughput", time_limit: float = 10.0,
         params: dict[str, int] | None = None, priority: dict[str, float] | None = None, top: int = 3, solve: int = 4,
         max_group: int = 8, workers: int = 2) -> PlanResult:
    """Plan `tasks` (TaskSpec list) on `cluster` (see the module docstring). priority: a weight per
    task name on its tokens in the throughput objective (default 1)."""
    from muxtune.planner.explain import comparison_table, explain

    if objective not in cpsat.OBJECTIVES:
        raise MuxTuneError(f"planner: objective {objective!r}: choose from {', '.join(cpsat.OBJECTIVES)}")
    if time_limit <= 0:
        raise MuxTuneError(f"planner: time limit must be > 0 s, got {time_limit}")
    started = time.perf_counter()
    cm = CachedCostModel(cost_model)
    works = works_of(tasks, cm, params)
    steps = [t.steps for t in tasks]
    weights = [float((priority or {}).get(t.name, 1.0)) for t in tasks]
    memory = int(cluster.memory_gib * GIB)
    labels = device_labels(cluster, cm)
    configs = instance_configs(cluster.devices, cm.shape.n_layers)
    # screen: the greedy solution of every (instances, layout) pair; CP-SAT on the `solve` best of them
    sign = 1 if objective == "throughput" else -1
    screened = []
    for instances, layout in configs:
        start = cpsat.greedy(works, min(instances, len(works)), layout, cm, memory, objective, steps,
                             max_group=max_group, priority=weights if priority else None)
        screened.append((start is not None, sign * start[2] if start else 0.0, instances, layout))
    screened.sort(key=lambda t: (t[0], t[1]), reverse=True)
    candidates, statuses = [], []
    budget = time_limit * 0.5  # the rest: pricing, simulation, baselines
    chosen_configs = screened[:solve]
    for index, (_, _, instances, layout) in enumerate(chosen_configs):
        # the best-screened pair gets a double share; time a pair proves optimal early goes to the rest
        weights = [2 if i == 0 else 1 for i in range(index, len(chosen_configs))]
        share = max(0.05, (started + budget - time.perf_counter()) * weights[0] / sum(weights))
        found = cpsat.solve(works, instances, layout, cm, memory, objective, share, steps, max_group=max_group,
                            priority=weights if priority else None, workers=workers)
        statuses.append(f"{instances} x ({layout.label()}): {found.status if found else 'no solution fits memory'}")
        if found is not None:
            candidates.append(found)
    if not candidates:
        raise MuxTuneError(f"planner: no plan fits {cluster.memory_gib} GiB per device on {cluster.devices} "
                           f"device(s) (the backbone and the tasks' activations need more)")
    candidates.sort(key=lambda c: -c.estimate if objective == "throughput" else c.estimate)
    step_of = {t.name: t.steps for t in tasks}
    chosen = None
    for candidate in candidates[:top]:
        for schedule in (("1f1b", "interleaved") if candidate.layout.pp > 1 else ("1f1b",)):
            evaluation = simulate(candidate, works, step_of, cm, labels, memory, schedule)
            if _better(evaluation, chosen, objective):
                chosen = evaluation
    if not chosen.fits:
        raise MuxTuneError(f"planner: the best candidates exceed {cluster.memory_gib} GiB per device when simulated "
                           f"(predicted {chosen.peak_memory / GIB:.2f} GiB)")
    base = []
    for candidate in baselines.all_baselines(works, steps, cm, cluster.devices, memory, objective):
        base.append(simulate(candidate, works, step_of, cm, labels, memory, candidate.notes["schedule"]))
    final = chosen.plan.model_copy(update={"planner": f"muxtune (cp-sat, {objective})"})
    result = PlanResult(final, pd.DataFrame(), chosen, base, statuses, time.perf_counter() - started)
    result.table = comparison_table(result, memory)
    result.plan = final.model_copy(update={"explanation": explain(result, works, cluster, objective)})
    return result
