"""The planner's entry point: tasks + cluster + CostModel -> a Plan (muxtune/spec.py) and a comparison
of that plan with the baseline planners, every figure from the simulator.

    result = plan(config.tasks, cluster, cost_model, objective="throughput", time_limit=10)
    result.plan.save("plan.json"); print(result.table); print(result.plan.explanation)

Steps: (1) every (instances, layout) pair (layouts.instance_configs) is screened by the greedy solution
(cpsat.greedy); on the `solve` best pairs the CP-SAT model (cpsat.solve) chooses the fusion groups
and their instance, sharing half the time limit (the best-screened pair a double share; what one leaves unused
goes to the next);
(2) the `top` best solutions by their estimate are simulated over the whole job (simulate_job), each
with both pipeline schedules when it has several stages, and the best simulated one that fits memory on
every device is the plan (once 80% of the time limit is spent, no further candidate is simulated);
(3) the baselines are simulated the same way; (4) explain.py writes why.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pandas as pd

from muxtune.errors import MuxTuneError
from muxtune.planner import baselines, cpsat
from muxtune.planner.layouts import CachedCostModel, instance_configs, tp_degrees
from muxtune.simulator.iteration import simulate_step
from muxtune.simulator.knobs import accumulated_parts
from muxtune.simulator.workload import (TaskWork, estimate_params, evaluation_counts, evaluation_passes,
                                       method_rank, task_work)
from muxtune.spec import Alignment, Cluster, FusionGroup, Layout, Plan, method_card

GIB = 2**30
PIPELINE_ALTERNATIVES = 4  # next-best CP-SAT solutions simulated for a pp > 1 pair (close estimates, see cpsat.solve)
CHUNK_LENGTHS = (16, 32, 64, 128)


@dataclass
class Evaluation:
    """A candidate as the simulator sees it."""

    candidate: cpsat.Candidate
    schedule: str
    plan: Plan
    throughput: float  # useful tokens of the whole job (every task's steps) / makespan
    steady: float  # useful tokens/s while every task is present (sum over instances)
    makespan: float  # s until every task has done its steps
    peak_memory: int  # bytes, the most on any device
    fits: bool


@dataclass
class PlanResult:
    plan: Plan
    table: pd.DataFrame  # one row per planner: the plan, then each baseline
    chosen: Evaluation
    baselines: list[Evaluation]
    solver_status: list[str] = field(default_factory=list)
    solve_seconds: float = 0.0  # wall time of choosing the plan (screening, pricing, CP-SAT, simulating candidates)
    compare_seconds: float = 0.0  # wall time of pricing and simulating the baselines after that


def device_labels(cluster: Cluster, cost_model) -> list[str]:
    if str(cost_model.device).startswith("cpu"):
        return ["cpu"] if cluster.devices == 1 else [f"cpu:{i}" for i in range(cluster.devices)]
    return [f"cuda:{i}" for i in range(cluster.devices)]


def works_of(tasks, cost_model, params: dict[str, int] | None = None,
             seq_lens: dict[str, float] | None = None) -> list[TaskWork]:
    """Each task's step: batch_size sequences of its data's mean length (`seq_lens`, when the data was
    read) or of max_seq_len tokens (the worst case); parameters from `params` (exact counts) or
    estimated from method and rank on the cost model's shape."""
    out = []
    for t in tasks:
        count = params[t.name] if params and t.name in params else estimate_params(
            t.peft.method, method_rank(t.peft), cost_model.shape)
        out.append(task_work(t, count, (seq_lens or {}).get(t.name)))
    return out


def to_plan(candidate: cpsat.Candidate, labels: list[str], schedule: str, works: list[TaskWork]) -> Plan:
    """A Candidate as a Plan: instance s takes devices [s*d, (s+1)*d), replica-major."""
    layout, d = candidate.layout, candidate.layout.devices
    by_name = {w.name: w for w in works}
    groups, budget = [], 1
    knobs = candidate.notes.get("knobs", {})
    for s, instance in enumerate(candidate.instances):
        devices = labels[s * d:(s + 1) * d]
        for names in instance:
            recompute, k = knobs.get(tuple(names), (False, 1))
            accumulation = {n: k for n in names} if k > 1 else {}
            groups.append(FusionGroup(tasks=list(names), devices=devices, micro_batches=layout.micro_batches,
                                      layout=Layout(dp=layout.dp, pp=layout.pp, tp=layout.tp,
                                                    stage_layers=list(layout.stage_layers)),
                                      recompute=recompute, accumulation=accumulation))
            parts = accumulated_parts([by_name[n] for n in names], accumulation, layout.dp * layout.micro_batches,
                                      candidate.packed)
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


@dataclass
class JobFigures:
    """A Plan's whole job as the simulator predicts it (every task for its own number of steps)."""

    throughput: float  # useful tokens of every task's steps / makespan
    steady: float  # useful tokens/s with every task present: sum over instances of a step's tokens / its step
    makespan: float  # s until the last task has done its steps
    peak_memory: dict[str, int]  # per device, bytes, the most over the job's phases
    evaluation: float = 0.0  # s of validation forwards within the makespan (the slowest instance's)
    finish: dict[str, float] = field(default_factory=dict)  # per task: s until its last step (and evaluations) are done


def simulate_job(plan: Plan, works: dict[str, TaskWork], steps: dict[str, int], cm, packed: bool) -> JobFigures:
    """Simulate every backbone instance of `plan` (its groups on one set of devices) through the job's
    phases: a task leaves the fused batch when its steps are done (the executor drops finished tasks),
    so an instance runs all its tasks for the fewest steps, then the rest, and so on; each phase is one
    simulated step (simulator/iteration.py) times its number of steps. Instances run independently.
    `finish`: when each task is done (the service's estimated_finish, muxtune/service/planning.py)."""
    instances: dict[tuple[str, ...], list] = {}
    for g in plan.groups:
        instances.setdefault(tuple(g.devices), []).append(g)
    steady, makespan, peak, evaluation, finish = 0.0, 0.0, {}, 0.0, {}

    def evaluation_seconds(groups, due) -> float:
        """One evaluation of the `due` tasks: forward-only passes between steps, the due tasks of a group fused."""
        tasks = [list(g.tasks) for g in groups]
        passes = evaluation_passes(tasks, works, due, plan.alignment.token_budget, plan.alignment.layout == "padded")
        return cm.evaluation_seconds([mb for _, mbs in passes for mb in mbs])

    for groups in instances.values():
        names = [t for g in groups for t in g.tasks]
        elapsed, done = 0.0, 0
        for boundary in sorted({steps[t] for t in names}):
            active = [g.model_copy(update={"tasks": [t for t in g.tasks if steps[t] >= boundary]}) for g in groups]
            phase = plan.model_copy(update={"groups": [g for g in active if g.tasks]})
            timeline = simulate_step(phase, works, cm, packed=packed)
            if done == 0:
                steady += sum(works[t].tokens for t in names) / timeline.step_seconds
            for device, used in timeline.peak_memory.items():
                peak[device] = max(peak.get(device, 0), used)
            elapsed += (boundary - done) * timeline.step_seconds
            done = boundary
            # the tasks that end here are done once this phase's steps and every evaluation until then are
            # (a task still training counts an evaluation at the boundary too: within one of the executor's)
            leaving = [t for t in names if steps[t] == boundary]
            until = {t: min(steps[t], boundary) for t in names}
            before = sum(count * evaluation_seconds(groups, due)
                         for due, count in evaluation_counts({t: works[t] for t in names}, until).items())
            finish.update({t: elapsed + before for t in leaving})
        evaluating = sum(count * evaluation_seconds(groups, due)
                         for due, count in evaluation_counts({t: works[t] for t in names}, steps).items())
        if elapsed + evaluating > makespan:
            makespan, evaluation = elapsed + evaluating, evaluating
    tokens = sum(works[t].tokens * steps[t] for g in plan.groups for t in g.tasks)
    return JobFigures(tokens / makespan if makespan > 0 else 0.0, steady, makespan, peak, evaluation, finish)


def simulate(candidate: cpsat.Candidate, works: list[TaskWork], steps: dict[str, int], cm, labels: list[str],
             memory_bytes: int, schedule: str) -> Evaluation:
    """A candidate's whole job in the simulator (simulate_job)."""
    plan = to_plan(candidate, labels, schedule, works)
    job = simulate_job(plan, {w.name: w for w in works}, steps, cm, candidate.packed)
    peak = max(job.peak_memory.values())
    if candidate.notes.get("backbone_copies"):  # tasks taking turns on a device, each with its own backbone copy
        copies = max(len(i) for i in candidate.instances)
        peak += (copies - 1) * max(cm.backbone_bytes(k, i == 0, i == candidate.layout.pp - 1)
                                   for i, k in enumerate(candidate.layout.stage_layers))
    return Evaluation(candidate, schedule, plan, job.throughput, job.steady, job.makespan, peak, peak <= memory_bytes)


def _better(a: Evaluation, b: Evaluation | None, objective: str) -> bool:
    if b is None:
        return True
    if a.fits != b.fits:
        return a.fits
    return a.throughput > b.throughput if objective == "throughput" else a.steady > b.steady


def plan(tasks, cluster: Cluster, cost_model, objective: str = "throughput", time_limit: float = 10.0,
         params: dict[str, int] | None = None, priority: dict[str, float] | None = None, top: int = 3, solve: int = 4,
         max_group: int = 8, workers: int = 2, seq_lens: dict[str, float] | None = None) -> PlanResult:
    """Plan `tasks` (TaskSpec list) on `cluster` (see the module docstring). priority: a weight per
    task name on its tokens in the `steady` objective (default 1; the `throughput` objective counts the
    whole job, whose tokens are fixed, so weights do not change what it prefers)."""
    from muxtune.planner.explain import comparison_table, explain

    if objective not in cpsat.OBJECTIVES:
        raise MuxTuneError(f"planner: objective {objective!r}: choose from {', '.join(cpsat.OBJECTIVES)}")
    if time_limit <= 0:
        raise MuxTuneError(f"planner: time limit must be > 0 s, got {time_limit}")
    started = time.perf_counter()
    cm = CachedCostModel(cost_model)
    works = works_of(tasks, cm, params, seq_lens)
    steps = [t.steps for t in tasks]
    weights = [float((priority or {}).get(t.name, 1.0)) for t in tasks]
    memory = int(cluster.memory_gib * GIB)
    labels = device_labels(cluster, cm)
    configs = instance_configs(cluster.devices, cm.shape.n_layers, tp_degrees(cm, works, cluster.devices))
    if not all(method_card(w.method).pipeline_stages for w in works):  # the executor would refuse pp > 1
        configs = [(k, layout) for k, layout in configs if layout.pp == 1]
    # screen: the greedy solution of every (instances, layout) pair; CP-SAT on the `solve` best of them
    screened = []
    for instances, layout in configs:
        start = cpsat.greedy(works, min(instances, len(works)), layout, cm, memory, objective, steps,
                             max_group=max_group, priority=weights if priority else None)
        screened.append((start is not None, start[2] if start else 0.0, instances, layout))
    screened.sort(key=lambda t: (t[0], t[1]), reverse=True)
    candidates, statuses = [], []
    budget = time_limit * 0.5  # the rest: pricing, simulation, baselines
    chosen_configs = screened[:solve]
    for index, (_, _, instances, layout) in enumerate(chosen_configs):
        # the best-screened pair gets a double share; time a pair proves optimal early goes to the rest
        shares = [2 if i == 0 else 1 for i in range(index, len(chosen_configs))]
        share = max(0.05, (started + budget - time.perf_counter()) * shares[0] / sum(shares))
        found = cpsat.solve(works, instances, layout, cm, memory, objective, share, steps, max_group=max_group,
                            priority=weights if priority else None, workers=workers,
                            alternatives=PIPELINE_ALTERNATIVES if layout.pp > 1 else 0)
        statuses.append(f"{instances} x ({layout.label()}): {found.status if found else 'no solution fits memory'}")
        if found is not None:
            candidates.append(found)
    if not candidates:
        raise MuxTuneError(f"planner: no plan fits {cluster.memory_gib} GiB per device on {cluster.devices} "
                           f"device(s) (the backbone and the tasks' activations need more)")
    candidates.sort(key=lambda c: -c.estimate)
    # the `top` best, and the next-best solutions of the pipelined ones among them
    ranked = [c for candidate in candidates[:top] for c in [candidate] + candidate.notes.pop("alternatives", [])]
    step_of = {t.name: t.steps for t in tasks}
    chosen = None
    for candidate in ranked:
        if chosen is not None and chosen.fits and time.perf_counter() - started > 0.8 * time_limit:
            statuses.append(f"simulated {ranked.index(candidate)} of {len(ranked)} candidates within the time limit")
            break  # the rest of the limit is the baselines' (a whole job simulates phase by phase)
        for schedule in (("1f1b", "interleaved") if candidate.layout.pp > 1 else ("1f1b",)):
            evaluation = simulate(candidate, works, step_of, cm, labels, memory, schedule)
            if _better(evaluation, chosen, objective):
                chosen = evaluation
    if not chosen.fits:
        raise MuxTuneError(f"planner: the best candidates exceed {cluster.memory_gib} GiB per device when simulated "
                           f"(predicted {chosen.peak_memory / GIB:.2f} GiB)")
    solved = time.perf_counter()
    base = []
    for candidate in baselines.all_baselines(works, steps, cm, cluster.devices, memory, objective):
        base.append(simulate(candidate, works, step_of, cm, labels, memory, candidate.notes["schedule"]))
    final = chosen.plan.model_copy(update={"planner": f"muxtune (cp-sat, {objective})"})
    result = PlanResult(final, pd.DataFrame(), chosen, base, statuses, solved - started, time.perf_counter() - solved)
    result.table = comparison_table(result, memory)
    result.plan = final.model_copy(update={"explanation": explain(result, works, cluster, objective)})
    return result
