"""The planner fuses only where the CostModel prices fusing cheaper than running the tasks one after another
(issue 26): 8 LoRA tenants of 512 tokens each on one device, priced from a profile table whose layer cost
per token grows with the fused batch's tokens (what caches and attention do on a CPU). Flat enough, the
fused step is cheaper (one pass over the weights, one batch's host work) and the plan fuses; steep
enough, the 4096-token fused step costs more than 8 steps of 512 and the plan keeps the tasks apart.
Either way the plan's simulated step is no slower than the 8 tasks one after another."""

from pathlib import Path

import pandas as pd
import pytest
from test_profiler import SHAPE, synthetic_profile

from muxtune.planner.layouts import LayoutChoice, group_cost
from muxtune.planner.plan import plan, works_of
from muxtune.profiler import profile as prof
from muxtune.profiler.cost_model import CostModel
from muxtune.simulator.iteration import simulate_step
from muxtune.spec import Cluster, FusionGroup, Plan, TaskSpec

LLAMA_OPS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # a layer's targets

SEQ, ROWS, TASKS = 256, 2, 8  # 512 tokens per task, as mux_vs_separate's largest sweep point
HOST_FIXED = 1e-3  # s of host work per fused micro-batch (drawing, fusing, routing it), whatever its tasks


def layer_seconds(tokens: int, phase: str, growth: float) -> float:
    """One layer: a fixed part, and a cost per token that grows by `growth` per 4096 tokens in the batch."""
    return (1e-4 + 2e-6 * tokens * (1 + growth * tokens / 4096) + 3e-9 * tokens * SEQ) * (2 if phase == "bwd" else 1)


def superlinear_profile(growth: float, points=(256, 512, 1024, 2048, 4096, 8192)) -> prof.Profile:
    """The tests' synthetic profile with its backbone rows (layer, stem, whole model) measured at SEQ at
    `points` tokens on the curve above, and the step's fixed host work: as the profiler writes them."""
    base = synthetic_profile()
    rows = []
    for t in points:
        stem, head = 1e-5 * t / 64, 4e-7 * t
        for phase in ("fwd", "bwd"):
            rows.append(prof._row("layer", phase, layer_seconds(t, phase, growth), t, SEQ, saved=1000 * t))
            whole = SHAPE.n_layers * layer_seconds(t, phase, growth) + (stem if phase == "fwd" else 0) + head + 5e-4
            rows.append(prof._row("model", phase, whole, t, SEQ))
        rows.append(prof._row("stem", "fwd", stem, t, SEQ))
    rows += [prof._row("step", "host_fixed", HOST_FIXED, t, SEQ) for t in (256, 4096)]
    kept = base.table[~base.table["op"].isin(["layer", "model", "stem"])]
    return prof.Profile(pd.concat([kept, pd.DataFrame(rows, columns=prof.COLUMNS)], ignore_index=True), base.meta)


def tenants() -> list[TaskSpec]:
    return [TaskSpec(name=f"t{i}", data=Path("synthetic"), batch_size=ROWS, max_seq_len=SEQ, steps=10,
                     peft={"method": "lora", "r": (8, 12, 16)[i % 3], "alpha": 16, "dropout": 0.0,
                           "target_modules": ["q_proj", "v_proj"]})
            for i in range(TASKS)]


def step_seconds(groups: list[list[str]], works, cm) -> float:
    """The simulator's step of `groups` run one after another on one device (one micro-batch each)."""
    plan_ = Plan(groups=[FusionGroup(tasks=g, devices=["cpu"]) for g in groups])
    return simulate_step(plan_, {w.name: w for w in works}, cm, packed=True).step_seconds


def one_device() -> LayoutChoice:
    return LayoutChoice(dp=1, pp=1, micro_batches=1, stage_layers=(SHAPE.n_layers,))


def fused_and_sequential(works, cm) -> tuple[float, float]:
    """The planner's cost of all tasks in one group, and of each task its own group, one after another."""
    return (group_cost(tuple(works), one_device(), cm, packed=True).seconds,
            sum(group_cost((w,), one_device(), cm, packed=True).seconds for w in works))


# growth 0.05: two groups of 4 tasks price their layers ~0.5% below the one fused group, but each pays the
# step's host work for its batch: the one group is cheaper, and the planner sees it only because a group's
# cost holds that host work (without it, it planned the two groups: a step 0.5% slower than all fused)
@pytest.mark.parametrize("growth, fused_is_cheaper", [(0.0, True), (0.05, True), (1.0, False)])
def test_the_planner_fuses_only_where_the_cost_model_prices_fusing_cheaper(growth, fused_is_cheaper):
    cm = CostModel.from_profile(superlinear_profile(growth))
    tasks = tenants()
    works = works_of(tasks, cm)
    fused, sequential = fused_and_sequential(works, cm)
    assert (fused < sequential) == fused_is_cheaper  # the profile prices the case this test is about
    # with one stage the planner's group cost is the simulated step, host work included
    names = [t.name for t in tasks]
    assert fused == pytest.approx(step_seconds([names], works, cm), rel=1e-9)
    assert sequential == pytest.approx(step_seconds([[n] for n in names], works, cm), rel=1e-9)

    result = plan(tasks, Cluster(devices=1, memory_gib=64), cm, time_limit=4)
    groups = [g.tasks for g in result.plan.groups]
    assert (len(groups) == 1) == fused_is_cheaper, groups
    # the plan's predicted step is never slower than the tenants one after another (nor than all fused)
    planned = simulate_step(result.plan, {w.name: w for w in works}, cm, packed=True).step_seconds
    assert planned <= min(fused, sequential) * (1 + 1e-9)


def test_the_steps_a_plan_compares_are_profiled_so_a_thinned_curve_cannot_hide_that_fusing_is_dearer():
    """A budget thins a layer curve to its ends first: llama-100m's quick profile on this CPU kept 256 and
    4096 tokens at seq_len 256. On a convex curve the chord between them prices 512 tokens dear and 4096
    exactly, so 8 tasks of 512 looked cheaper fused however much dearer fusing measured. The step sizes
    a plan compares (each task alone, all fused) are now points of the grid whatever the budget cuts
    (budget.with_sizes), and the CostModel prices them where they were measured."""
    from muxtune.profiler.budget import Pilot, fit

    pilot = Pilot(fixed=0.01, per_token=2.2e-3, layers=12)  # llama-100m on a 2-core CPU
    sizes = [(ROWS * SEQ, SEQ), (TASKS * ROWS * SEQ, SEQ)]
    plain, _, cuts = fit(prof.GRIDS["quick"], prof.DEFAULT_BUDGET["quick"], pilot, LLAMA_OPS, True)
    sized, _, _ = fit(prof.GRIDS["quick"], prof.DEFAULT_BUDGET["quick"], pilot, LLAMA_OPS, True, sizes=sizes)
    assert "curve ends only (tokens)" in cuts and plain["layer"][SEQ] == [256, 4096]
    assert sized["layer"][SEQ] == [256, 512, 4096]

    tasks = tenants()
    growth = 0.3  # fused measures ~2% dearer than the 8 tasks one after another; on the chord ~5% cheaper
    ends = CostModel.from_profile(superlinear_profile(growth, points=(256, 4096)))
    fused, sequential = fused_and_sequential(works_of(tasks, ends), ends)
    assert fused < sequential  # the chord
    measured = CostModel.from_profile(superlinear_profile(growth, points=(256, 512, 4096)))
    works = works_of(tasks, measured)
    fused, sequential = fused_and_sequential(works, measured)
    assert fused > sequential  # the curve
    result = plan(tasks, Cluster(devices=1, memory_gib=64), measured, time_limit=4)
    assert len(result.plan.groups) > 1
    planned = simulate_step(result.plan, {w.name: w for w in works}, measured, packed=True).step_seconds
    assert planned <= sequential * (1 + 1e-9)
