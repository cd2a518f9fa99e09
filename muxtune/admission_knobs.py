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
from muxtune.spec import Alignment, Plan, TaskSpec

LADDER = ((False, 1), (False, 2), (False, 4), (True, 1), (True, 2), (True, 4), (False, 8), (True, 8),
          (False, 16), (True, 16))


@dataclass
class Admitted:
    estimate: admission.MemoryEstimate
    recompute: list[bool]  # per group
    accumulation: dict[str, int]  # per task (absent: 1)

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


def admit(model, specs: list[TaskSpec], groups: list[list[str]], alignment: Alignment, limit_gib: float | None,
          what: str = "plan", params: dict | None = None, recompute: list[bool] | None = None,
          accumulation: dict[str, int] | None = None) -> Admitted:
    """admission.admit with the knobs (module docstring): the first LADDER setting (on top of the plan's
    own `recompute` / `accumulation`) whose estimate fits; MuxTuneError naming the closest when none does."""
    device = next(model.parameters()).device
    available = admission.available_bytes(device, model, limit_gib)
    cm = admission.cost_model_of(model)
    params = params if params is not None else {}
    # (a resumed run's groups may differ from the plan's: a group without a recorded choice has none)
    own_recompute = [bool(recompute and g < len(recompute) and recompute[g]) for g in range(len(groups))]
    own_accumulation = dict(accumulation or {})
    tried = []
    for on, k in LADDER:
        knobs_recompute = [own or on for own in own_recompute]
        knobs_accumulation = {s.name: max(k, own_accumulation.get(s.name, 1)) for s in specs}
        found = admission.estimate(model, specs, groups, alignment, available, params, cost_model=cm,
                                   recompute=knobs_recompute, accumulation=knobs_accumulation)
        found.device = str(device)
        result = Admitted(found, knobs_recompute, {n: k for n, k in knobs_accumulation.items() if k > 1})
        if found.needed <= found.available:
            return result
        tried.append(result)
    closest = min(tried, key=lambda r: r.estimate.needed)
    plain = tried[0].estimate
    raise MuxTuneError(f"{what}: refused, predicted not to fit in {device} memory even with recomputation and "
                       f"gradient accumulation: as it is it {plain.describe()}; with {closest.describe()} it "
                       f"{closest.estimate.describe()}; lower batch_size / max_seq_len, or split the tasks")
