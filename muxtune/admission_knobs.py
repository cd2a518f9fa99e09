"""Admission with the memory knobs: a plan or a submitted task that does not fit as it is is admitted
with activation recomputation and/or gradient accumulation when that makes it fit, and refused only
when nothing does, with the numbers of what came closest.

The knobs change how a step runs, never what it computes (tests/test_memory_knobs.py), so admission may
choose them on its own. Which: the first setting of LADDER that fits, cheapest first. Accumulation over
2 or 4 micro-steps costs only their fixed per-micro-batch work; recomputation runs every block's forward
once more (about a third of a step); more micro-steps shrink the batches until the fixed work shows. (The
planner, which has a timing model, prices every setting instead: planner/layouts.fitting_group_cost.)
The plan's own knobs are a floor: admission only adds to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from muxtune import admission
from muxtune.errors import MuxTuneError
from muxtune.spec import Plan, TaskSpec

LADDER = ((False, 1), (False, 2), (False, 4), (True, 1), (True, 2), (True, 4), (False, 8), (True, 8),
          (False, 16), (True, 16))


@dataclass
class Admitted:
    estimates: dict[str, admission.MemoryEstimate]  # per device, as admission.per_device sums them
    recompute: list[bool]  # per group
    accumulation: dict[str, int]  # per task (absent: 1)

    @property
    def estimate(self) -> admission.MemoryEstimate:
        """The device closest to its limit."""
        return max(self.estimates.values(), key=lambda e: e.needed - e.available)

    def describe(self) -> str:
        knobs = [f"recompute in group(s) {[g for g, on in enumerate(self.recompute) if on]}"] if any(self.recompute) else []
        steps = sorted(set(self.accumulation.values()) - {1})
        knobs += [f"gradient accumulation over {steps[-1]} micro-steps"] if steps else []
        return ", ".join(knobs) or "no memory knobs"

    def apply(self, plan: Plan) -> Plan:
        """`plan` with these knobs recorded in its groups."""
        groups = [g.model_copy(update={"recompute": on, "accumulation": {t: k for t, k in self.accumulation.items()
                                                                          if t in g.tasks and k > 1}})
                  for g, on in zip(plan.groups, self.recompute)]
        return plan.model_copy(update={"groups": groups})


def admit(model, specs: list[TaskSpec], plan: Plan, limit_gib: float | None, what: str = "plan",
          params: dict | None = None, rank: int = 0, world: int = 1, cost_model=None) -> Admitted:
    """admission.admit with the knobs (module docstring): the first LADDER setting (on top of the plan's
    own `recompute` / `accumulation`) whose estimates fit on every device; MuxTuneError naming the
    closest when none does. Every process of the plan calls it (with several, a collective: the device
    reports are gathered once, and every process walks the same ladder to the same answer)."""
    cm = cost_model or admission.cost_model_of(model)
    params = params if params is not None else {}
    reports = admission.device_reports(model, rank, world)
    own_accumulation = {t: k for g in plan.groups for t, k in g.accumulation.items()}
    tried = []
    for on, k in LADDER:
        knobs = Admitted({}, [g.recompute or on for g in plan.groups],
                         {s.name: max(k, own_accumulation.get(s.name, 1)) for s in specs
                          if max(k, own_accumulation.get(s.name, 1)) > 1})
        estimates = admission.plan_estimates(model, specs, knobs.apply(plan), cm, params)
        knobs.estimates, refused = admission.device_totals(estimates, reports, limit_gib)
        if not refused:
            return knobs
        tried.append((knobs, refused))
    closest, refused = min(tried, key=lambda t: sum(max(0, e.needed - e.available) for e in t[0].estimates.values()))
    raise MuxTuneError(f"{what}: refused, predicted not to fit in device memory even with recomputation and "
                       f"gradient accumulation: as it is: {'; '.join(tried[0][1])}; with {closest.describe()} "
                       f"(closest): {'; '.join(refused)}; lower batch_size / max_seq_len, or split the tasks")
