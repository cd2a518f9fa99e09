"""Exhaustive search of the planner's space, for small instances (<= ~7 tasks): every assignment of
tasks to identical backbone instances, every partition of each instance's tasks into fusion groups
(not only the length-order runs the CP-SAT model considers), for every (instances, layout) pair.
Solutions are scored with the same group costs as the CP-SAT model; the best few are returned so
the caller can simulate them (the optimality-gap test and benchmark)."""

from __future__ import annotations

import heapq
import itertools

from muxtune.errors import MuxTuneError
from muxtune.planner.cpsat import Candidate, estimate, fits, knobs_of
from muxtune.planner.layouts import backbone_bytes, instance_configs, priced

MAX_TASKS = 7


def set_partitions(items: list, max_blocks: int | None = None):
    """Every partition of items into at most max_blocks non-empty blocks (blocks in first-item order)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest, max_blocks):
        for b in range(len(partition)):  # put `first` into an existing block ...
            yield partition[:b] + [[first] + partition[b]] + partition[b + 1:]
        if max_blocks is None or len(partition) < max_blocks:  # ... or into a block of its own
            yield [[first]] + partition


def search(works, steps, cm, devices: int, memory_bytes: int, objective: str, packed: bool = True,
           keep: int = 5, priority=None, per_layout: bool = False) -> list[Candidate]:
    """The `keep` best memory-feasible solutions by estimate, best first; with `per_layout`, also the
    best of every (instances, layout) pair (a pipeline's estimate is an upper bound of its simulated
    step, so a pp > 1 solution the estimate ranks low can still simulate best)."""
    n = len(works)
    if n > MAX_TASKS:
        raise MuxTuneError(f"exhaustive search: {n} tasks; it is meant for at most {MAX_TASKS}")
    best: list[tuple[float, int, Candidate]] = []
    layout_best: list[tuple[float, int, Candidate]] = []
    counter = itertools.count()
    names = [w.name for w in works]
    for instances, layout in instance_configs(devices, cm.shape.n_layers):
        costs = {}
        base = backbone_bytes(layout, cm)
        mine = None
        for placement in set_partitions(list(range(n)), instances):
            per_instance = [list(set_partitions(block)) for block in placement]
            for choice in itertools.product(*per_instance):
                solution = [[tuple(sorted(g)) for g in groups] for groups in choice]
                for groups in solution:
                    for g in groups:
                        priced(g, works, steps, layout, cm, packed, costs, memory_bytes - base)
                if not all(fits(groups, costs, base, memory_bytes) for groups in solution):
                    continue
                value = estimate(solution, costs, works, objective, steps, priority)
                item = (value, next(counter), Candidate(
                    "exhaustive", [[tuple(names[i] for i in g) for g in groups] for groups in solution],
                    layout, packed, value, "EXHAUSTIVE", notes={"instances": instances, "knobs": knobs_of(solution, costs, works)}))
                if len(best) < keep:
                    heapq.heappush(best, item)
                else:
                    heapq.heappushpop(best, item)
                if mine is None or value > mine[0]:
                    mine = item
        if per_layout and mine is not None:
            layout_best.append(mine)
    chosen = {t[1]: t for t in best + layout_best}.values()
    return [c for _, _, c in sorted(chosen, key=lambda t: (-t[0], t[1]))]
