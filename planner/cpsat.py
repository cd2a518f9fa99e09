"""The CP-SAT model: which tasks fuse into groups and which backbone instance each group runs on.

For one (instances k, layout) pair from layouts.instance_configs:
- candidate groups: every subset of up to `max_group` tasks on small instances (<= 64 subsets);
  otherwise tasks sorted by sequence length (then method shape) and every run of up to `max_group`
  neighbours in that order (fusing tasks of similar length wastes the least padding); each priced by
  the CostModel (layouts.priced), in integer ticks;
- booleans x[g, s]: candidate group g runs on instance s; every task in exactly one chosen group;
- memory per device of instance s: backbone shard + the states of its tasks + the activations of
  its largest group <= device memory (one constraint per (g, s), enforced when x[g, s]);
- the time of instance s (one step, or its whole job): its groups' costs without their pipeline fill
  and drain, plus the largest fill among them (interleaved groups fill each other's bubbles; pp = 1
  has none): instance_seconds;
- objective `throughput` (default): the useful tokens of the whole job (every task's steps) per second
  of the job. Those tokens are fixed by the tasks, so this minimises the makespan: the longest instance's
  time to finish all its tasks, the sum over its groups of their job time (a group runs in phases,
  losing each task when its steps are done: layouts.priced). Counting the job, not one step, is what
  makes an instance that idles after its short task ended cost what it costs.
- objective `steady`: the steady-state rate with every task present (no task ever finishes, e.g. a
  service that refills finished tenants): maximise sum_s tokens of one step of s / step time of s (an
  integer division per instance, AddDivisionEquality); priorities weight a task's tokens here.
The instances are interchangeable: their loads are ordered to break the symmetry. A greedy solution
(length-sorted groups dealt to the least loaded instance) is given as a hint, so the incumbent at the
time limit is never worse than it.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from muxtune.planner.layouts import LayoutChoice, backbone_bytes, priced
from muxtune.simulator.workload import TaskWork
from muxtune.spec import method_card

OBJECTIVES = ("throughput", "steady")
TICKS = 1_000_000  # n x the costliest group's time is this many integer ticks (an upper bound of any load)


@dataclass
class Candidate:
    """A solution in the planner's space: groups (task names) on each of `len(instances)` identical
    backbone instances with one layout."""

    planner: str
    instances: list[list[tuple[str, ...]]]
    layout: LayoutChoice
    packed: bool
    estimate: float = 0.0  # objective value under the group-cost estimate (tokens/s)
    status: str = ""
    solve_seconds: float = 0.0
    notes: dict = field(default_factory=dict)


def length_order(works: list[TaskWork]) -> list[int]:
    """Task indices by sequence length, then method shape (tasks that pad each other least side by side)."""
    return sorted(range(len(works)), key=lambda i: (works[i].seq_len, method_card(works[i].method).shape, i))


def candidate_groups(works: list[TaskWork], max_group: int, all_subsets_up_to: int = 64) -> list[tuple[int, ...]]:
    """Every subset of up to max_group tasks when there are at most `all_subsets_up_to` of them (small
    instances: the model then covers every partition), else runs of up to max_group neighbours in
    length order (indices into works)."""
    n = len(works)
    if sum(math.comb(n, k) for k in range(1, min(max_group, n) + 1)) <= all_subsets_up_to:
        return [g for k in range(1, min(max_group, n) + 1) for g in itertools.combinations(range(n), k)]
    order = length_order(works)
    groups = []
    for start in range(len(order)):
        for size in range(1, max_group + 1):
            if start + size <= len(order):
                groups.append(tuple(sorted(order[start:start + size])))
    return groups


def estimate(instances: list[list[tuple[int, ...]]], costs: dict, works: list[TaskWork], objective: str,
             steps: list[int], priority: list[float] | None = None) -> float:
    """The objective of a solution under group costs (the figures the CP-SAT model uses, unrounded):
    `throughput`: the job's useful tokens / its makespan; `steady`: sum over instances of one step's
    tokens / the step time."""
    weight = priority or [1.0] * len(works)
    if objective == "throughput":
        makespan = max((instance_seconds(groups, costs, objective) for groups in instances if groups), default=0.0)
        tokens = sum(works[i].tokens * steps[i] * weight[i] for groups in instances for g in groups for i in g)
        return tokens / makespan if makespan > 0 else 0.0
    total = 0.0
    for groups in instances:
        if groups:
            tokens = sum(works[i].tokens * weight[i] for g in groups for i in g)
            total += tokens / instance_seconds(groups, costs, objective)
    return total


def load(cost, objective: str) -> float:
    """What a group adds to its instance under the objective: its whole job, or one step."""
    return cost.job_seconds if objective == "throughput" else cost.seconds


def fill(cost, objective: str) -> float:
    """The pipeline fill and drain inside load(): paid once per step by groups that interleave."""
    return cost.job_fill_seconds if objective == "throughput" else cost.fill_seconds


def instance_seconds(groups, costs: dict, objective: str) -> float:
    """An instance's time (its whole job, or one step) with its groups interleaved in one pipeline: each
    group's work without its fill and drain, plus the largest fill (0 when pp = 1)."""
    return (sum(load(costs[g], objective) - fill(costs[g], objective) for g in groups)
            + max(fill(costs[g], objective) for g in groups))


def fits(groups: list[tuple[int, ...]], costs: dict, base: int, memory: int) -> bool:
    return not groups or base + sum(costs[g].state_bytes for g in groups) + max(costs[g].activation_bytes for g in groups) <= memory


def solve(works: list[TaskWork], instances: int, layout: LayoutChoice, cm, memory_bytes: int, objective: str,
          time_limit: float, steps: list[int], packed: bool = True, max_group: int = 8,
          priority: list[float] | None = None, workers: int = 2, alternatives: int = 0) -> Candidate | None:
    """Best solution found within time_limit for one (instances, layout); None when nothing fits memory
    or no solution was found in time. `alternatives` > 0: after an optimal solution, the model is solved
    again that many times, each time excluding the solutions found so far; the next-best ones are in
    `notes["alternatives"]` (for pipelines, whose estimate ranks close solutions less surely than the
    simulator)."""
    started = time.perf_counter()
    n = len(works)
    slots = min(instances, n)
    groups = candidate_groups(works, max_group)
    costs: dict = {}
    for g in groups:
        priced(g, works, steps, layout, cm, packed, costs)
    base = backbone_bytes(layout, cm)
    # a group that cannot fit alone can never be chosen
    groups = [g for g in groups if base + costs[g].state_bytes + costs[g].activation_bytes <= memory_bytes]
    if not all(any(i in g for g in groups) for i in range(n)):
        return None
    unit = max(load(costs[g], objective) for g in groups) * n / TICKS  # seconds per tick
    fills = {g: round(fill(costs[g], objective) / unit) for g in groups}
    ticks = {g: max(1, round(load(costs[g], objective) / unit) - fills[g]) for g in groups}  # without the fill
    weight = priority or [1.0] * n

    m = cp_model.CpModel()
    x = {(g, s): m.NewBoolVar(f"x{gi}_{s}") for gi, g in enumerate(groups) for s in range(slots)}
    for i in range(n):
        m.AddExactlyOne(x[g, s] for g in groups if i in g for s in range(slots))
    busy = []  # per instance: its step (steady) or its whole job (throughput), in ticks
    horizon = sum(ticks.values()) + max(fills.values())
    kib = lambda b: -(-int(b) // 1024)  # bytes -> KiB, rounded up (small integer domains)
    room = (memory_bytes - base) // 1024
    for s in range(slots):
        states = m.NewIntVar(0, room, f"states{s}")
        m.Add(states == sum(kib(costs[g].state_bytes) * x[g, s] for g in groups))
        activations = m.NewIntVar(0, room, f"activations{s}")  # the instance's largest group's
        for g in groups:
            m.Add(activations >= kib(costs[g].activation_bytes) * x[g, s])
        m.Add(states + activations <= room)
        widest = m.NewIntVar(0, max(fills.values()), f"fill{s}")  # interleaved groups share one fill and drain
        for g in groups:
            if fills[g]:
                m.Add(widest >= fills[g] * x[g, s])
        t = m.NewIntVar(0, horizon, f"busy{s}")
        m.Add(t == sum(ticks[g] * x[g, s] for g in groups) + widest)
        busy.append(t)
    for s in range(slots - 1):
        m.Add(busy[s] >= busy[s + 1])  # interchangeable instances: symmetry breaking

    if objective == "steady":
        # rate_s = tokens_s * scale // step_s; tokens in units so the largest rate has ~1e6 resolution
        token_unit = max(1.0, sum(w.tokens * p for w, p in zip(works, weight)) / 100_000)
        tok = {g: round(sum(works[i].tokens * weight[i] for i in g) / token_unit) for g in groups}
        scale = TICKS * 10
        rates = []
        for s in range(slots):
            tokens = m.NewIntVar(0, sum(tok.values()), f"tokens{s}")
            m.Add(tokens == sum(tok[g] * x[g, s] for g in groups))
            scaled = m.NewIntVar(0, sum(tok.values()) * scale, f"scaled{s}")
            m.Add(scaled == tokens * scale)
            denominator = m.NewIntVar(1, horizon + 1, f"den{s}")
            m.Add(denominator == busy[s] + 1)
            rate = m.NewIntVar(0, sum(tok.values()) * scale, f"rate{s}")
            m.AddDivisionEquality(rate, scaled, denominator)
            rates.append(rate)
        m.Maximize(sum(rates))
    else:  # throughput of the job = its fixed tokens / the makespan
        longest = m.NewIntVar(0, horizon, "makespan")
        m.AddMaxEquality(longest, busy)
        m.Minimize(longest)

    start = greedy(works, slots, layout, cm, memory_bytes, objective, steps, packed, max_group, priority, costs)
    if start is not None:
        hint = {(g, s) for s, gs in enumerate(start[0]) for g in gs}
        for (g, s), var in x.items():
            m.AddHint(var, (g, s) in hint)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.05, time_limit - (time.perf_counter() - started))
    solver.parameters.num_workers = workers
    status = solver.Solve(m)
    name = [w.name for w in works]
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        chosen = [[g for g in groups if solver.Value(x[g, s])] for s in range(slots)]
        value, how = estimate(chosen, costs, works, objective, steps, priority), solver.StatusName(status)
    elif start is not None:  # the solver found nothing in time: the greedy start is the incumbent
        chosen, _, value = start
        how = f"{solver.StatusName(status)} in time: greedy start kept"
    else:
        return None

    def candidate(solution, value, how):
        return Candidate("muxtune", [[tuple(name[i] for i in g) for g in c] for c in solution if c], layout, packed,
                         value, how, time.perf_counter() - started, {"instances": instances})

    found = candidate(chosen, value, how)
    found.notes["alternatives"] = []
    solution = chosen
    while status == cp_model.OPTIMAL and len(found.notes["alternatives"]) < alternatives:
        picked = [x[g, s] for s, gs in enumerate(solution) for g in gs]
        m.Add(sum(picked) <= len(picked) - 1)  # not this solution again
        m.ClearHints()
        solver.parameters.max_time_in_seconds = max(0.05, time_limit - (time.perf_counter() - started))
        status = solver.Solve(m)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            break
        solution = [[g for g in groups if solver.Value(x[g, s])] for s in range(slots)]
        found.notes["alternatives"].append(candidate(solution, estimate(solution, costs, works, objective, steps,
                                                                        priority), "alternative"))
    return found


def greedy(works: list[TaskWork], slots: int, layout: LayoutChoice, cm, memory_bytes: int, objective: str,
           steps: list[int], packed: bool = True, max_group: int = 8, priority=None, costs: dict | None = None):
    """Length-sorted tasks cut into runs of `size` (max_group, half of it, ... 1), the runs dealt to the
    least loaded instance they fit on; the best of those sizes by estimate: (solution, costs, value),
    or None when no size fits. Screens the (instances, layout) pairs and hints the solver."""
    costs = {} if costs is None else costs
    base = backbone_bytes(layout, cm)
    order = length_order(works)
    best = None
    size = max_group
    while size >= 1:
        runs = [tuple(sorted(order[i:i + size])) for i in range(0, len(order), size)]
        for g in runs:
            priced(g, works, steps, layout, cm, packed, costs)
        busy, placed = [0.0] * slots, [[] for _ in range(slots)]
        for g in sorted(runs, key=lambda g: -load(costs[g], objective)):
            where = [s for s in sorted(range(slots), key=lambda s: busy[s]) if fits(placed[s] + [g], costs, base, memory_bytes)]
            if not where:
                break
            placed[where[0]].append(g)
            busy[where[0]] += load(costs[g], objective)
        else:
            placed.sort(key=lambda gs: -instance_seconds(gs, costs, objective) if gs else 0.0)  # the solver's order
            value = estimate(placed, costs, works, objective, steps, priority)
            if best is None or value > best[2]:
                best = (placed, costs, value)
        size //= 2
    return best
