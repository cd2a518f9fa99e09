"""A fusion group's step as micro-batches when its tasks accumulate gradients (FusionGroup.accumulation):
task t's batch is fed over k_t micro-steps (executor/accumulation.micro_steps), micro-step j holds each
task's j-th part, and each micro-step is split over the layout's dp replicas x micro-batches as a whole
step is (workload.split_micro_batches). The planner and the simulator both take a group's parts here."""

from __future__ import annotations

from dataclasses import replace

from muxtune.profiler.cost_model import MicroBatch
from muxtune.schedule import part_size
from muxtune.simulator.workload import TaskWork, split_micro_batches


def accumulated_parts(works: list[TaskWork], accumulation: dict[str, int], parts: int,
                      packed: bool, recompute: bool = False) -> list[MicroBatch]:
    """The step's micro-batches in part order: micro-step after micro-step, `parts` each; `recompute`
    marks them (MicroBatch.recompute: the CostModel's memory model then holds their blocks' inputs only)."""
    count = max((accumulation.get(w.name, 1) for w in works), default=1)
    if count == 1:
        return [replace(mb, recompute=recompute) for mb in split_micro_batches(works, parts, packed)]
    out = []
    for j in range(count):
        step = []
        for w in works:
            k = min(accumulation.get(w.name, 1), w.sequences)
            if j < k:
                step.append(replace(w, sequences=part_size(w.sequences, k, j)))
        if step:
            out.extend(replace(mb, recompute=recompute) for mb in split_micro_batches(step, parts, packed))
    return out
