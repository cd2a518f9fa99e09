"""Baseline planners in the planner's own terms (Candidate), priced by the same CostModel and
simulator, each with the best layout for it by the same group-cost estimate:

- dedicated: one backbone instance per task (HF-PEFT / NeMo style): the devices are cut into the
  fewest equal instances that give every task its own; with more tasks than devices, the tasks of a
  device take turns, each with its own backbone copy in memory.
- spatial: every task fused in one padded micro-batch stream (mLoRA style) on one instance over all devices.
- temporal: every task its own group, all on one instance over all devices, their micro-batches
  interleaved round-robin in one pipeline (no fusion).
"""

from __future__ import annotations

from muxtune.planner.cpsat import Candidate, estimate, fits, knobs_of
from muxtune.planner.layouts import backbone_bytes, divisors, layouts, priced

BASELINES = ("dedicated", "spatial", "temporal")
DESCRIPTIONS = {  # one line each, for tables and reports
    "dedicated": "one backbone instance per task (HF-PEFT / NeMo style), nothing shared",
    "spatial": "every task fused in one padded micro-batch stream on one instance (mLoRA style)",
    "temporal": "every task its own group, interleaved in one pipeline over all devices (no fusion)",
}


def _best(name, works, steps, cm, devices, instances, arrange, memory_bytes, objective, packed, schedule,
          backbone_copies=False):
    """The best layout for a fixed arrangement (groups per instance, as indices)."""
    better = None
    for layout in layouts(devices // instances, cm.shape.n_layers):
        solution = arrange(instances)
        costs, plain = {}, {}
        base = backbone_bytes(layout, cm)
        copies = max(len(gs) for gs in solution) if backbone_copies else 1
        for g in (g for gs in solution for g in gs):
            priced(g, works, steps, layout, cm, packed, plain)  # the states (the knobs do not change them)
        for gs in solution:  # the same memory knobs as the plan's groups get, beside their device's states
            states = sum(plain[g].state_bytes for g in gs)
            for g in gs:
                priced(g, works, steps, layout, cm, packed, costs,
                       memory_bytes - base * copies - (states - plain[g].state_bytes))
        fit = all(fits(gs, costs, base * copies, memory_bytes) for gs in solution)
        value = estimate(solution, costs, works, objective, steps)
        key = (fit, value)
        if better is None or key > better[0]:
            names = [w.name for w in works]
            better = (key, Candidate(name, [[tuple(names[i] for i in g) for g in gs] for gs in solution if gs],
                                     layout, packed, value, "baseline" if fit else "baseline (does not fit memory)",
                                     notes={"instances": instances, "schedule": schedule,
                                            "backbone_copies": backbone_copies,
                                            "knobs": knobs_of(solution, costs, works)}))
    return better[1]


def dedicated(works, steps, cm, devices, memory_bytes, objective):
    n = len(works)
    instances = min((k for k in divisors(devices) if k >= n), default=devices)

    def arrange(k):
        return [[(i,) for i in range(n) if i % k == s] for s in range(k)]

    return _best("dedicated", works, steps, cm, devices, instances, arrange, memory_bytes, objective,
                 packed=True, schedule="1f1b", backbone_copies=n > instances)


def spatial(works, steps, cm, devices, memory_bytes, objective):
    return _best("spatial", works, steps, cm, devices, 1, lambda k: [[tuple(range(len(works)))]], memory_bytes,
                 objective, packed=False, schedule="1f1b")


def temporal(works, steps, cm, devices, memory_bytes, objective):
    return _best("temporal", works, steps, cm, devices, 1, lambda k: [[(i,) for i in range(len(works))]],
                 memory_bytes, objective, packed=True, schedule="interleaved")


def all_baselines(works, steps, cm, devices, memory_bytes, objective) -> list[Candidate]:
    return [fn(works, steps, cm, devices, memory_bytes, objective) for fn in (dedicated, spatial, temporal)]
