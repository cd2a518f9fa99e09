"""The planner: valid plans that fit memory, within 3% of the exhaustive optimum on small instances,
ahead of the baselines on the shipped mixes, and `muxtune plan` on this machine and on GPUs we lack.
Costs come from the shipped CPU profile of tiny-llama or the analytic H100 model (no profiling here)."""

import random
from pathlib import Path

import pytest
import yaml

from muxtune.errors import MuxTuneError
from muxtune.planner import baselines, cpsat, exhaustive
from muxtune.planner.layouts import CachedCostModel, instance_configs, priced
from muxtune.planner.plan import device_labels, plan, simulate, works_of
from muxtune.profiler.cost_model import CostModel, llama_7b_shape
from muxtune.simulator.iteration import simulate_step
from muxtune.spec import Cluster, Plan, load_config

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30


@pytest.fixture(scope="module")
def cpu_model():
    return CostModel.from_profile(next((REPO / "profiles").glob("cpu-*-tiny-llama.csv")))


@pytest.fixture(scope="module")
def h100():
    return CachedCostModel(CostModel.analytic("h100", llama_7b_shape()))


def random_tasks(seed: int, n: int):
    base = load_config(REPO / "examples" / "mixed_methods.yaml").tasks
    rng = random.Random(seed)
    return [rng.choice(base).model_copy(update={"name": f"t{i}", "max_seq_len": rng.choice([128, 256, 512, 1024]),
                                                 "batch_size": rng.choice([2, 4, 8]), "steps": rng.randint(10, 100)})
            for i in range(n)]


def exhaustive_best(tasks, cluster, cm, objective="throughput"):
    """The best simulated plan among the exhaustive search's best estimates (and the best of every layout)."""
    works = works_of(tasks, cm)
    found = exhaustive.search(works, [t.steps for t in tasks], cm, cluster.devices, int(cluster.memory_gib * GIB),
                              objective, keep=5, per_layout=True)
    steps = {t.name: t.steps for t in tasks}
    return max((simulate(c, works, steps, cm, device_labels(cluster, cm), int(cluster.memory_gib * GIB), s)
                for c in found for s in (("1f1b", "interleaved") if c.layout.pp > 1 else ("1f1b",))),
               key=lambda e: e.throughput)


def test_layouts_cover_every_split_of_the_devices():
    configs = instance_configs(4, n_layers=32)
    assert {(k, l.dp, l.pp) for k, l in configs} == {(1, 4, 1), (1, 2, 2), (1, 1, 4), (2, 2, 1), (2, 1, 2), (4, 1, 1)}
    assert all(sum(l.stage_layers) == 32 and l.micro_batches % l.pp == 0 for _, l in configs)
    assert all(l.pp <= 2 for _, l in instance_configs(8, n_layers=2))


def test_set_partitions_counts_match_bell_numbers():
    assert [sum(1 for _ in exhaustive.set_partitions(list(range(n)))) for n in range(1, 7)] == [1, 2, 5, 15, 52, 203]
    assert sum(1 for _ in exhaustive.set_partitions(list(range(4)), max_blocks=2)) == 8  # S(4,1) + S(4,2)


def test_quickstart_plan_is_valid_fits_memory_and_beats_the_baselines(cpu_model, tmp_path):
    config = load_config(REPO / "examples" / "quickstart.yaml")
    result = plan(config.tasks, Cluster(devices=1, memory_gib=4), cpu_model, time_limit=3)
    result.plan.check_against(config)  # every task in exactly one group
    result.plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == result.plan and again.version == 2 and again.alignment.layout == "chunked"
    assert result.chosen.fits and result.chosen.peak_memory <= 4 * GIB
    table = result.table.set_index("planner")
    assert list(table.index) == ["muxtune", "dedicated", "spatial", "temporal"]
    for name in ("dedicated", "spatial", "temporal"):
        assert table.loc["muxtune", "tokens_per_s"] > table.loc[name, "tokens_per_s"], name
    for line in ("baseline dedicated", "baseline spatial", "baseline temporal", "predicted (simulator)"):
        assert line in result.plan.explanation
    # the table's figures are the simulator's: re-simulating the saved plan gives the same step ...
    works = {w.name: w for w in works_of(config.tasks, cpu_model)}
    step = simulate_step(again, works, cpu_model, packed=True).step_seconds
    tokens = sum(w.tokens for w in works.values())
    assert tokens / step == pytest.approx(result.chosen.steady, rel=1e-9)
    # ... and the job: each phase (tasks leave when their steps are done) is a simulated step of the rest
    steps = {t.name: t.steps for t in config.tasks}
    makespan, done = 0.0, 0
    for boundary in sorted(set(steps.values())):
        left = [g.model_copy(update={"tasks": [t for t in g.tasks if steps[t] >= boundary]}) for g in again.groups]
        phase = again.model_copy(update={"groups": [g for g in left if g.tasks]})
        makespan += (boundary - done) * simulate_step(phase, works, cpu_model, packed=True).step_seconds
        done = boundary
    assert result.chosen.makespan == pytest.approx(makespan, rel=1e-9)
    job_tokens = sum(works[t].tokens * steps[t] for t in steps)
    assert result.chosen.throughput == pytest.approx(job_tokens / makespan, rel=1e-9)


@pytest.mark.parametrize("seed,n,devices,memory_gib", [(0, 6, 2, 80), (1, 5, 4, 80), (2, 6, 1, 80), (3, 4, 4, 80),
                                                       (5, 5, 2, 16), (6, 4, 2, 16)])
def test_plan_is_within_3_percent_of_the_exhaustive_optimum(h100, seed, n, devices, memory_gib):
    """16 GiB per H100: the 7B backbone needs two pipeline stages, whose group estimate ranks close
    solutions less surely than the simulator (the planner simulates next-best ones too)."""
    tasks = random_tasks(seed, n)
    cluster = Cluster(devices=devices, memory_gib=memory_gib, hardware="h100")
    result = plan(tasks, cluster, h100, time_limit=5)
    best = exhaustive_best(tasks, cluster, h100)
    assert result.chosen.fits
    assert result.chosen.throughput >= 0.97 * best.throughput
    if memory_gib == 16:
        assert result.chosen.candidate.layout.pp > 1 and best.candidate.layout.pp > 1


def test_memory_limit_splits_groups_and_is_never_exceeded(cpu_model):
    config = load_config(REPO / "examples" / "long_short.yaml")
    roomy = plan(config.tasks, Cluster(devices=1, memory_gib=8), cpu_model, time_limit=2)
    spatial = next(b for b in roomy.baselines if b.candidate.planner == "spatial")
    # a cap below what fusing everything needs, above what the largest single task needs
    works = works_of(config.tasks, cpu_model)
    alone = max(simulate(baselines.dedicated(works, [t.steps for t in config.tasks], cpu_model, 1, 8 * GIB,
                                             "throughput"), works, {t.name: t.steps for t in config.tasks},
                         cpu_model, ["cpu"], 8 * GIB, "1f1b").peak_memory, 1)
    cap = (alone + spatial.peak_memory) / 2
    tight = plan(config.tasks, Cluster(devices=1, memory_gib=cap / GIB), cpu_model, time_limit=2)
    assert tight.chosen.peak_memory <= cap and tight.chosen.fits
    # fusing everything in one micro-batch no longer fits: the spatial baseline now accumulates gradients
    squeezed = next(b for b in tight.baselines if b.candidate.planner == "spatial")
    assert spatial.peak_memory > cap and spatial.candidate.layout.micro_batches == 1
    assert squeezed.candidate.layout.micro_batches > 1 and squeezed.peak_memory <= cap
    with pytest.raises(MuxTuneError, match="no plan fits"):
        plan(config.tasks, Cluster(devices=1, memory_gib=0.001), cpu_model, time_limit=1)


def test_cp_sat_matches_the_exhaustive_estimate_for_both_objectives(h100):
    tasks = random_tasks(5, 5)
    works, steps = works_of(tasks, h100), [t.steps for t in tasks]
    for objective in ("throughput", "steady"):
        best = exhaustive.search(works, steps, h100, 2, 80 * GIB, objective, keep=1)[0]
        k, layout = best.notes["instances"], best.layout
        found = cpsat.solve(works, k, layout, h100, 80 * GIB, objective, 3, steps)
        assert found.status in ("OPTIMAL", "FEASIBLE")
        assert found.estimate >= 0.97 * best.estimate


def test_group_job_time_has_a_phase_per_step_count(h100):
    """A fused group loses each task when its steps are done: its job time is the full group's step for
    the fewest steps, then the rest's step for theirs (not the full step times the most steps)."""
    tasks = random_tasks(3, 3)
    tasks = [t.model_copy(update={"steps": s}) for t, s in zip(tasks, (10, 30, 30))]
    works, steps = works_of(tasks, h100), [t.steps for t in tasks]
    layout = instance_configs(1, h100.shape.n_layers)[0][1]
    costs = {}
    whole = priced((0, 1, 2), works, steps, layout, h100, True, costs)
    rest = costs[(1, 2)]
    assert whole.job_seconds == pytest.approx(10 * whole.seconds + 20 * rest.seconds)
    assert whole.job_seconds < 30 * whole.seconds
    assert priced((1,), works, steps, layout, h100, True, costs).job_seconds == pytest.approx(30 * costs[(1,)].seconds)


def test_throughput_counts_the_job_so_no_device_idles_after_a_short_task(h100):
    """Quickstart on 4 H100s (compute-bound 7B): in the steady state a dedicated GPU per task is as good as
    it gets, but its GPUs idle once their short tasks end; over the whole job the plan must lead."""
    config = load_config(REPO / "examples" / "quickstart.yaml")
    result = plan(config.tasks, Cluster(devices=4, memory_gib=80, hardware="h100"), h100, time_limit=3)
    table = result.table.set_index("planner")
    for name in ("dedicated", "spatial", "temporal"):
        assert table.loc["muxtune", "tokens_per_s"] > table.loc[name, "tokens_per_s"], name
    dedicated = table.loc["dedicated"]
    assert dedicated["tokens_per_s"] < dedicated["steady_tokens_per_s"]  # it idles after the short tasks
    # job throughput is the fixed job's tokens over the makespan, for the plan and the baselines alike
    job_tokens = sum(w.tokens * t.steps for w, t in zip(works_of(config.tasks, h100), config.tasks))
    for name, row in table.iterrows():
        assert row["tokens_per_s"] == pytest.approx(job_tokens / row["makespan_s"], rel=1e-9), name
    steady = plan(config.tasks, Cluster(devices=4, memory_gib=80, hardware="h100"), h100, objective="steady",
                  time_limit=3)
    assert steady.chosen.steady >= result.chosen.steady * 0.9999
    assert result.chosen.makespan <= steady.chosen.makespan * 1.0001
    with pytest.raises(MuxTuneError, match="objective"):
        plan(config.tasks, Cluster(devices=4, memory_gib=80, hardware="h100"), h100, objective="latency")


def test_baselines_have_their_shapes(h100):
    tasks = random_tasks(4, 6)
    works, steps = works_of(tasks, h100), [t.steps for t in tasks]
    dedicated, spatial, temporal = baselines.all_baselines(works, steps, h100, 8, 80 * GIB, "throughput")
    assert sorted(len(i) for i in dedicated.instances) == [1] * 6  # an instance per task
    assert len(spatial.instances) == 1 and len(spatial.instances[0]) == 1 and not spatial.packed
    assert len(temporal.instances[0]) == 6 and temporal.notes["schedule"] == "interleaved"


def test_cli_plans_for_this_machine_and_for_gpus_we_lack(tmp_path, monkeypatch, capsys):
    from muxtune import cli

    monkeypatch.chdir(REPO)
    profile = str(next((REPO / "profiles").glob("cpu-*-tiny-llama.csv")))
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "examples/quickstart.yaml", "--profile", profile, "--memory-gib", "4",
                     "--time-limit", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "baseline dedicated" in printed and Plan.load(out).planner.startswith("muxtune")
    assert cli.main(["plan", "examples/mixed_methods.yaml", "--hardware", "h100", "--gpus", "4",
                     "--time-limit", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "h100 (analytic)" in printed
    assert {d for g in Plan.load(out).groups for d in g.devices} <= {f"cuda:{i}" for i in range(4)}
    assert cli.main(["plan", "examples/quickstart.yaml", "--hardware", "tpu9"]) == 2
    assert "not in the catalog" in capsys.readouterr().err
    assert cli.main(["plan", "examples/quickstart.yaml", "--hardware", "h100", "--gpus", "0"]) == 2
    assert "--gpus" in capsys.readouterr().err


def test_config_cluster_section_is_validated_with_its_line(tmp_path):
    raw = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    for task in raw["tasks"]:
        task["data"] = str(REPO / "examples" / task["data"])
    raw["cluster"] = {"devices": 8, "memory_gib": 80, "hardware": "h100"}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_config(tmp_path / "ok.yaml").cluster == Cluster(devices=8, memory_gib=80, hardware="h100")
    raw["cluster"] = {"devices": 0, "memory_gib": 80}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(MuxTuneError, match=r"bad.yaml:\d+: cluster.devices"):
        load_config(tmp_path / "bad.yaml")


# --- tensor parallelism ---------------------------------------------------------------------------------

WIDE_ONE_LAYER = dict(n_layers=1, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000, dtype_bytes=2)


def lora_tasks(n=2, method="lora"):
    base = load_config(REPO / "examples" / "quickstart.yaml").tasks
    other = [t for t in load_config(REPO / "examples" / "mixed_methods.yaml").tasks if t.peft.method == method]
    short = {"batch_size": 2, "max_seq_len": 64, "steps": 5}
    return [base[i % len(base)].model_copy(update={"name": f"t{i}", **short}) for i in range(n)] + (
        [other[0].model_copy(update={"name": "other", **short})] if method != "lora" else [])


def test_tp_layouts_only_where_the_executor_splits_and_the_link_is_fast(cpu_model):
    from muxtune.planner.layouts import tp_degrees
    from muxtune.profiler.cost_model import ModelShape

    h100 = CostModel.analytic("h100", llama_7b_shape())
    lora = works_of(lora_tasks(), h100)
    assert tp_degrees(h100, lora, 8) == (1, 2, 4, 8) and tp_degrees(h100, lora, 16) == (1, 2, 4, 8)
    assert tp_degrees(h100, lora, 6) == (1, 2)  # 3 does not divide 32 heads
    assert tp_degrees(h100, works_of(lora_tasks(method="ia3"), h100), 8) == (1,)  # only LoRA is split
    gpt2 = CostModel.analytic("h100", ModelShape(**{**WIDE_ONE_LAYER, "gated_mlp": False}))
    assert tp_degrees(gpt2, works_of(lora_tasks(), gpt2), 8) == (1,)  # not a LLaMA-family model
    assert tp_degrees(CostModel.analytic("l4", llama_7b_shape()), lora, 8) == (1,)  # PCIe only
    assert tp_degrees(cpu_model, works_of(lora_tasks(), cpu_model), 2) == (1,)  # processes over gloo
    tp_configs = {(k, l.dp, l.pp, l.tp) for k, l in instance_configs(4, 32, (1, 2))}
    assert tp_configs - {(k, l.dp, l.pp, 1) for k, l in instance_configs(4, 32)} == {
        (1, 2, 1, 2), (1, 1, 2, 2), (2, 1, 1, 2)}


def test_tp_is_chosen_when_memory_forces_it_and_never_for_other_methods():
    """A one-layer model whose weights (1.7 GB layer + 1 GB embedding/head) do not fit a 2.3 GiB device:
    2 devices cannot split it by stages (one layer) nor replicate it; tp=2 halves the layer."""
    from muxtune.profiler.cost_model import ModelShape

    cm = CostModel.analytic("h100", ModelShape(**WIDE_ONE_LAYER))
    cluster = Cluster(devices=2, memory_gib=2.3, hardware="h100")
    assert cm.backbone_bytes(1, True, True) > 2.3 * GIB > cm.backbone_bytes(1, True, True, tp=2)
    result = plan(lora_tasks(), cluster, cm, time_limit=4)
    layouts = {(g.layout.dp, g.layout.pp, g.layout.tp) for g in result.plan.groups}
    assert layouts == {(1, 1, 2)} and all(len(g.devices) == 2 for g in result.plan.groups)
    assert result.chosen.fits and result.chosen.peak_memory <= 2.3 * GIB
    with pytest.raises(MuxTuneError, match="no plan fits"):  # the executor splits LoRA only: no tp plan
        plan(lora_tasks(method="ia3"), cluster, cm, time_limit=4)


def test_tp_group_cost_is_the_simulated_step():
    """pp = 1, one micro-batch, analytic costs: the planner's group cost on a tp layout (layers' shard +
    every all-reduce + replicated gradients + optimizer) is exactly the simulator's step."""
    from muxtune.planner.layouts import LayoutChoice, group_cost
    from muxtune.spec import FusionGroup, Layout

    cm = CostModel.analytic("h100", llama_7b_shape())
    tasks = lora_tasks(3)
    works = works_of(tasks, cm)
    for dp, tp in ((1, 2), (2, 2), (1, 4)):
        layout = LayoutChoice(dp, 1, 1, (32,), tp)
        cost = group_cost(tuple(works), layout, cm, packed=True)
        devices = [f"cuda:{i}" for i in range(dp * tp)]
        step = simulate_step(Plan(groups=[FusionGroup(tasks=[t.name for t in tasks], devices=devices,
                                                      layout=Layout(dp=dp, tp=tp))]),
                             {w.name: w for w in works}, cm, packed=True)
        assert cost.seconds == pytest.approx(step.step_seconds, rel=1e-9)
        one = group_cost(tuple(works), LayoutChoice(dp, 1, 1, (32,)), cm, packed=True)
        assert cost.state_bytes < one.state_bytes and cost.activation_bytes < one.activation_bytes


def test_a_method_the_executor_keeps_on_one_stage_is_never_planned_over_stages():
    """Prefix tuning's K/V prefix spans every layer: the executor refuses it across pipeline stages (its
    card says so), so the planner offers it pp = 1 layouts only. A LLaMA-7B backbone (13.5 GB in bf16)
    on 2 x 10 GiB devices fits only split: with an IA3 task (not tensor-parallel) as two stages, with a
    prefix task (neither) not at all."""
    cm = CostModel.analytic("h100", llama_7b_shape())
    cluster = Cluster(devices=2, memory_gib=10, hardware="h100")
    result = plan(lora_tasks(method="ia3"), cluster, cm, time_limit=4)
    assert {g.layout.pp for g in result.plan.groups} == {2}
    with pytest.raises(MuxTuneError, match="no plan fits"):
        plan(lora_tasks(method="prefix"), cluster, cm, time_limit=4)
