"""Iteration-level simulator on hand-computable costs (tests/fake_cost_model.py)."""

import json

import pytest

from fake_cost_model import FakeCostModel, FakeShape
from muxtune.errors import MuxTuneError
from muxtune.simulator.iteration import memory_breakdown, simulate_step
from muxtune.simulator.workload import TaskWork, split_micro_batches
from muxtune.spec import FusionGroup, Layout, Plan


def work(name, sequences=8, seq_len=16.0, params=120, method="lora"):
    return TaskWork(name, method, 8, params, sequences, seq_len)


def pipeline_plan(groups, pp, m, dp=1, schedule="1f1b"):
    devices = [f"gpu{i}" for i in range(dp * pp)]
    return Plan(schedule=schedule, groups=[FusionGroup(tasks=tasks, devices=devices, layout=Layout(dp=dp, pp=pp),
                                                       micro_batches=m) for tasks in groups])


@pytest.mark.parametrize("pp,m", [(2, 4), (3, 5), (4, 8), (4, 1), (4, 2)])
def test_1f1b_bubble_matches_formula(pp, m):
    cm = FakeCostModel(shape=FakeShape(n_layers=12), per_layer=0.1)
    timeline = simulate_step(pipeline_plan([["a"]], pp, m), {"a": work("a", sequences=m)}, cm)
    fwd, bwd = 0.1 * 12 / pp, 0.2 * 12 / pp
    assert timeline.step_seconds == pytest.approx((m + pp - 1) * (fwd + bwd))
    for device, bubble in timeline.bubble_fraction.items():
        assert bubble == pytest.approx((pp - 1) / (m + pp - 1)), device


def test_interleaved_groups_fill_each_others_bubbles():
    cm = FakeCostModel(shape=FakeShape(n_layers=4))
    works = {"a": work("a"), "b": work("b"), "c": work("c")}
    pp, m = 4, 2
    sequential = simulate_step(pipeline_plan([["a"], ["b"], ["c"]], pp, m, schedule="1f1b"), works, cm)
    interleaved = simulate_step(pipeline_plan([["a"], ["b"], ["c"]], pp, m, schedule="interleaved"), works, cm)
    stage = 0.25 + 0.5  # one layer per stage: fwd 0.25 + bwd 0.5
    assert sequential.step_seconds == pytest.approx(3 * (m + pp - 1) * stage)
    assert interleaved.step_seconds == pytest.approx((3 * m + pp - 1) * stage)
    for device in interleaved.bubble_fraction:
        assert sequential.bubble_fraction[device] == pytest.approx((pp - 1) / (m + pp - 1))
        assert interleaved.bubble_fraction[device] == pytest.approx((pp - 1) / (3 * m + pp - 1))


def test_every_micro_batch_runs_forward_and_backward_once_in_dependency_order():
    cm = FakeCostModel(shape=FakeShape(n_layers=6), per_token=0.001, p2p=0.05, allreduce=0.3, optimizer=0.02)
    works = {"a": work("a", sequences=8), "b": work("b", sequences=6, seq_len=30.0), "c": work("c", sequences=4)}
    pp, m, dp = 3, 2, 2
    plan = Plan(schedule="interleaved", groups=[
        FusionGroup(tasks=["a", "b"], devices=[f"g{i}" for i in range(6)], layout=Layout(dp=dp, pp=pp), micro_batches=m),
        FusionGroup(tasks=["c"], devices=[f"g{i}" for i in range(6)], layout=Layout(dp=dp, pp=pp), micro_batches=m)])
    ev = simulate_step(plan, works, cm).events
    compute = ev[ev["kind"].isin(["fwd", "bwd"])]
    counts = compute.groupby(["replica", "stage", "group", "micro_batch", "kind"]).size()
    assert (counts == 1).all() and len(counts) == dp * pp * 2 * m * 2
    key = ["replica", "group", "micro_batch"]
    fwd = compute[compute["kind"] == "fwd"].set_index(key + ["stage"])
    bwd = compute[compute["kind"] == "bwd"].set_index(key + ["stage"])
    for (r, g, k, s), op in fwd.iterrows():
        assert bwd.loc[(r, g, k, s), "start"] >= op["end"]  # backward after its own forward
        if s + 1 < pp:  # next stage's forward waits for this forward plus its transfer
            assert fwd.loc[(r, g, k, s + 1), "start"] >= op["end"] + 0.05 - 1e-12
            assert bwd.loc[(r, g, k, s), "start"] >= bwd.loc[(r, g, k, s + 1), "end"] + 0.05 - 1e-12
    sends = ev[ev["kind"] == "send"]
    assert len(sends) == dp * 2 * m * (pp - 1) * 2  # one activation and one gradient transfer per boundary
    allreduce = ev[ev["kind"] == "allreduce"]
    assert len(allreduce) == 2 * pp * dp  # per group and stage, logged on each replica
    last_bwd = compute[compute["kind"] == "bwd"].groupby(["stage", "group"])["end"].max()
    for op in allreduce.itertuples():
        assert op.start >= last_bwd[(op.stage, op.group)] - 1e-12  # waits for every replica's gradients
    optim = ev[ev["kind"] == "optim"]
    assert sorted(optim.groupby(["task"]).size().items()) == [("a", dp * pp), ("b", dp * pp), ("c", dp * pp)]
    reduced = allreduce.groupby(["stage", "group"])["end"].max()
    for op in optim.itertuples():
        assert op.start >= reduced[(op.stage, op.group)] - 1e-12


def test_single_device_step_equals_cost_models_step_seconds():
    cm = FakeCostModel(per_token=0.002, embed=0.1, head=0.3, optimizer=0.05)
    works = {"a": work("a", seq_len=10.0), "b": work("b", seq_len=20.0), "c": work("c", sequences=3)}
    plan = Plan(groups=[FusionGroup(tasks=["a", "b"], devices=["cpu"]), FusionGroup(tasks=["c"], devices=["cpu"])])
    timeline = simulate_step(plan, works, cm)
    groups = [split_micro_batches([works["a"], works["b"]], 1)[0], split_micro_batches([works["c"]], 1)[0]]
    assert timeline.step_seconds == pytest.approx(cm.step_seconds(groups))
    assert timeline.tokens_per_second["a"] == pytest.approx(8 * 10 / timeline.step_seconds)


def test_host_work_comes_first_and_the_real_cost_model_prices_the_same_step():
    """Each task's host work (sampling, fusing) runs on the first stage before any forward; on one
    device the simulated step is exactly CostModel.step_seconds, host and fixed per-batch work included."""
    from muxtune.profiler.cost_model import CostModel
    from test_profiler import targeted_profile

    cm = FakeCostModel(shape=FakeShape(n_layers=4), per_token=0.001, host=0.02, optimizer=0.01)
    works = {"a": work("a"), "b": work("b", seq_len=30.0)}
    timeline = simulate_step(pipeline_plan([["a", "b"]], 2, 2), works, cm)
    ev = timeline.events
    host = ev[ev["kind"] == "host"]
    assert sorted(host["task"].dropna()) == ["a", "b"] and set(host["stage"]) == {0}
    assert host["end"].max() <= ev[ev["kind"] == "fwd"]["start"].min() + 1e-12
    without = simulate_step(pipeline_plan([["a", "b"]], 2, 2), works, FakeCostModel(
        shape=FakeShape(n_layers=4), per_token=0.001, optimizer=0.01))
    assert timeline.step_seconds == pytest.approx(without.step_seconds + 2 * 0.02)

    real = CostModel.from_profile(targeted_profile())
    works = {"a": TaskWork("a", "lora", 8, 5000, 4, 50.0, ("q_proj", "down_proj"), 0.1),
             "b": TaskWork("b", "lora", 16, 9000, 2, 40.0), "c": TaskWork("c", "ia3", 0, 700, 3, 50.0)}
    plan = Plan(groups=[FusionGroup(tasks=["a", "b", "c"], devices=["cpu"])])
    batch = split_micro_batches(list(works.values()), 1)[0]
    assert batch.tasks[0].targets == ("q_proj", "down_proj") and batch.tasks[0].dropout == 0.1
    assert simulate_step(plan, works, real).step_seconds == pytest.approx(real.step_seconds([batch]), rel=1e-9)


def test_data_parallel_halves_compute_and_adds_allreduce():
    cm = FakeCostModel(per_layer=0.0, per_token=0.01, allreduce=0.7, optimizer=0.1)
    works = {"a": work("a", sequences=8, seq_len=10.0)}
    alone = simulate_step(Plan(groups=[FusionGroup(tasks=["a"], devices=["g0"])]), works, cm)
    dp = simulate_step(Plan(groups=[FusionGroup(tasks=["a"], devices=["g0", "g1"], layout=Layout(dp=2))]), works, cm)
    compute = 3 * 0.01 * 80 * 4  # fwd + 2x bwd, 80 tokens, 4 layers
    assert alone.step_seconds == pytest.approx(compute + 0.1)
    assert dp.step_seconds == pytest.approx(compute / 2 + 0.7 + 0.1)


def test_peak_memory_counts_backbone_states_and_micro_batches_in_flight():
    cm = FakeCostModel(shape=FakeShape(n_layers=8))
    pp, m = 4, 6
    works = {"a": work("a", sequences=12, seq_len=10.0, params=800)}
    timeline = simulate_step(pipeline_plan([["a"]], pp, m), works, cm)
    act = 10 * (2 * 10) * 2  # bytes/token/layer * tokens per micro-batch * layers per stage
    for s in range(pp):
        backbone = 1000 * 2 + (500 if s == 0 else 0) + (700 if s == pp - 1 else 0)
        state = 16 * 800 * 2 // 8
        assert timeline.peak_memory[f"gpu{s}"] == backbone + state + min(pp - s, m) * act


def test_results_are_deterministic_and_json_ready(tmp_path):
    cm = FakeCostModel(per_token=0.001, p2p=0.01)
    works = {"a": work("a"), "b": work("b", seq_len=33.0)}
    plan = pipeline_plan([["a"], ["b"]], 2, 3, schedule="interleaved")
    first, second = simulate_step(plan, works, cm), simulate_step(plan, works, cm)
    assert first.events.equals(second.events)
    assert json.loads(json.dumps(first.summary())) == json.loads(json.dumps(second.summary()))
    png = first.gantt(tmp_path / "gantt.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_micro_batch_split_pads_to_the_longest_unless_packed():
    works = [work("a", sequences=5, seq_len=10.0), work("b", sequences=2, seq_len=40.0)]
    padded = split_micro_batches(works, 2)
    packed = split_micro_batches(works, 2, packed=True)
    assert [[t.tokens for t in mb.tasks] for mb in padded] == [[3 * 40, 40], [2 * 40, 40]]
    assert sum(mb.tokens for mb in packed) == 5 * 10 + 2 * 40
    assert all(mb.seq_len == 40 for mb in padded + packed)
    assert len(split_micro_batches([work("c", sequences=1)], 3)) == 1  # empty micro-batches are dropped


def test_plan_errors_are_clear(tmp_path):
    cm = FakeCostModel()
    works = {"a": work("a"), "b": work("b")}
    overlap = Plan(groups=[FusionGroup(tasks=["a"], devices=["g0", "g1"], layout=Layout(pp=2)),
                           FusionGroup(tasks=["b"], devices=["g1"])])
    with pytest.raises(MuxTuneError, match="shared with a group on other devices"):
        simulate_step(overlap, works, cm)
    split = Plan(groups=[FusionGroup(tasks=["a"], devices=["g0", "g1"], layout=Layout(pp=2, stage_layers=[1, 2]))])
    with pytest.raises(MuxTuneError, match="stage_layers"):
        simulate_step(split, works, cm)
    ia3 = {"a": work("a", method="ia3")}  # what the executor refuses under tp is not simulated either
    with pytest.raises(MuxTuneError, match=r"groups\[0\]: layout.tp=2: .*only LoRA"):
        simulate_step(Plan(groups=[FusionGroup(tasks=["a"], devices=["g0", "g1"], layout=Layout(tp=2))]), ia3, cm)


def test_plan_v2_fields_and_v1_files_load(tmp_path):
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps({"version": 1, "planner": "trivial",
                              "groups": [{"tasks": ["a"], "devices": ["cpu"], "layout": {"dp": 1, "pp": 1, "tp": 1},
                                          "micro_batches": 1}], "explanation": ""}))
    plan = Plan.load(v1)
    assert plan.version == 2 and plan.schedule == "1f1b" and plan.groups[0].layout.stage_layers is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 2, "groups": [{"tasks": ["a"], "devices": ["cpu"],
                                                        "layout": {"pp": 2, "stage_layers": [1, 1]}}]}))
    with pytest.raises(MuxTuneError, match="needs 2 devices"):
        Plan.load(bad)
    plan = Plan(groups=[FusionGroup(tasks=["a"], devices=["g0", "g1"], layout=Layout(pp=2, stage_layers=[3, 1]))],
                schedule="interleaved")
    plan.save(tmp_path / "v2.json")
    assert Plan.load(tmp_path / "v2.json") == plan


def test_pipelines_on_separate_devices_run_side_by_side():
    """Two groups on their own devices (dedicated instances, and pipelines of different depth) are two
    independent pipelines: the step is the slower one, each device only runs its own group."""
    cm = FakeCostModel(shape=FakeShape(n_layers=4))
    works = {"a": work("a", sequences=8), "b": work("b", sequences=4, seq_len=30.0)}
    alone = {t: simulate_step(Plan(groups=[FusionGroup(tasks=[t], devices=["g0"])]), works, cm).step_seconds
             for t in works}
    both = simulate_step(Plan(groups=[FusionGroup(tasks=["a"], devices=["g0"]),
                                      FusionGroup(tasks=["b"], devices=["g1", "g2"], layout=Layout(pp=2),
                                                  micro_batches=2)]), works, cm)
    assert set(both.events[both.events["group"] == 0]["device"]) == {"g0"}
    assert set(both.events[both.events["group"] == 1]["device"]) == {"g1", "g2"}
    a_alone = both.events[both.events["device"] == "g0"]["end"].max()
    assert a_alone == pytest.approx(alone["a"])
    assert both.step_seconds == pytest.approx(max(a_alone, both.events[both.events["group"] == 1]["end"].max()))


def test_memory_breakdown_splits_the_peak():
    from muxtune.simulator.iteration import memory_breakdown

    cm = FakeCostModel(shape=FakeShape(n_layers=8))
    works = {"a": work("a", sequences=12, seq_len=10.0, params=800)}
    plan = pipeline_plan([["a"]], 4, 6)
    timeline = simulate_step(plan, works, cm)
    table = memory_breakdown(plan, works, cm, timeline).set_index("device")
    for device, row in table.iterrows():
        assert row.sum() == timeline.peak_memory[device]
        assert row["adapters"] == row["optimizer"] == 8 * 800 * 2 // 8 and row["activations"] > 0


# --- tensor parallelism -------------------------------------------------------------------------------


def tp_plan(tasks, dp=1, pp=1, tp=2, m=1, schedule="1f1b"):
    devices = [f"g{i}" for i in range(dp * pp * tp)]
    return Plan(schedule=schedule, groups=[FusionGroup(tasks=tasks, devices=devices, layout=Layout(dp=dp, pp=pp, tp=tp),
                                                       micro_batches=m)])


def lora(name, targets, sequences=8, params=120):
    return TaskWork(name, "lora", 8, params, sequences, 16.0, targets)


@pytest.mark.parametrize("targets,bwd_reduces", [(("q_proj", "v_proj"), 5 * 4 - 3), (("down_proj",), 5 * 4 - 5)])
def test_tp2_step_by_hand(targets, bwd_reduces):
    """tp=2 on one stage of 4 layers: each rank computes half the layers' work; 2 all-reduces per layer
    forward (o_proj, down_proj), 5 backward (the q/k/v/gate/up input gradients) but the first layer's
    q/k/v (their input, the embedding's, needs no gradient) and, when no attention op is adapted, its
    gate/up too; then the task's replicated adapter gradients, once; everything on the critical path."""
    cm = FakeCostModel(shape=FakeShape(n_layers=4), per_layer=0.25, tp_allreduce=0.01, allreduce=0.03,
                       layer_bytes=1000, act_bytes_per_token_layer=10)
    works = {"a": lora("a", targets)}
    timeline = simulate_step(tp_plan(["a"]), works, cm)
    single = simulate_step(tp_plan(["a"], tp=1), works, cm)
    fwd, bwd = 4 * 0.25 / 2, 2 * 4 * 0.25 / 2  # half of one device's 1.0 s and 2.0 s
    assert single.step_seconds == pytest.approx(3.0)
    assert timeline.step_seconds == pytest.approx(fwd + bwd + (8 + bwd_reduces) * 0.01 + 0.03)
    ev = timeline.events
    assert set(ev["device"]) == {"g0", "g1"}
    for device, mine in ev.groupby("device"):
        reduces = mine[mine["kind"] == "tp_allreduce"]
        assert (reduces["stream"] == "comm").all()
        per_op = reduces[reduces["micro_batch"] == 0]
        starts = sorted(per_op["start"])
        assert len(per_op) == 8 + bwd_reduces
        assert len([t for t in starts if t < fwd + 8 * 0.01 - 1e-9]) == 8  # 2 per layer in the forward
        assert list(reduces[reduces["micro_batch"] == -1]["task"]) == ["a"]  # replicated gradients, once
        busy = mine[mine["stream"] == "compute"]
        assert (busy["end"] - busy["start"]).sum() == pytest.approx(fwd + bwd)
        # the compute stream waits for every all-reduce: no compute overlaps one
        for op in reduces.itertuples():
            assert not ((busy["start"] < op.end - 1e-12) & (busy["end"] > op.start + 1e-12)).any()
        assert timeline.bubble_fraction[device] == pytest.approx(1 - (fwd + bwd) / timeline.step_seconds)
        tokens = 8 * 16
        # memory: half the layers' weights, the stem/head whole, 60 replicated + 30 split parameters
        assert timeline.peak_memory[device] == 4 * 1000 // 2 + 500 + 700 + 16 * 90 + 10 * tokens * 4 // 2
    table = memory_breakdown(tp_plan(["a"]), works, cm, timeline).set_index("device")
    assert list(table["backbone"]) == [4 * 1000 // 2 + 1200] * 2 and list(table["activations"]) == [10 * 8 * 16 * 4 // 2] * 2
    assert list(table["adapters"] + table["optimizer"]) == [16 * 90] * 2


def test_tp_gantt_draws_the_collectives(tmp_path):
    cm = FakeCostModel(shape=FakeShape(n_layers=2), tp_allreduce=0.02)
    timeline = simulate_step(tp_plan(["a"], pp=2, m=2), {"a": lora("a", ("q_proj",))}, cm)
    assert timeline.gantt(tmp_path / "tp.png").stat().st_size > 0


def test_pp2_x_tp2_and_dp2_x_tp2_by_hand():
    """4 devices as (stage, tensor rank) and (replica, tensor rank): device order replica-major,
    tensor rank fastest; sends go to the same tensor rank of the next stage; the later stage's layers
    have all 5 backward all-reduces (its input needs a gradient)."""
    cm = FakeCostModel(shape=FakeShape(n_layers=4), per_layer=0.25, tp_allreduce=0.01, p2p=0.05, allreduce=0.03)
    works = {"a": lora("a", ("q_proj", "v_proj"))}
    m = 2
    ev = simulate_step(tp_plan(["a"], pp=2, m=m), works, cm).events
    per_op = ev[(ev["kind"] == "tp_allreduce") & (ev["micro_batch"] >= 0)]
    for device, stage in (("g0", 0), ("g1", 0), ("g2", 1), ("g3", 1)):
        mine = per_op[per_op["device"] == device]
        assert set(mine["stage"]) == {stage}
        bwd = 2 * 5 - (3 if stage == 0 else 0)  # 2 layers a stage
        assert len(mine) == m * (2 * 2 + bwd)
    sends = ev[ev["kind"] == "send"]
    assert sorted(set(sends["device"])) == ["g0", "g1", "g2", "g3"]  # activations down, gradients up
    assert len(sends) == 2 * m * 2  # per tensor rank: m forward + m backward transfers
    # dp=2 x tp=2: the data-parallel all-reduce per tensor rank, then the replicated gradients over the ranks
    ev = simulate_step(tp_plan(["a"], dp=2, m=1), {"a": lora("a", ("q_proj",), sequences=8)}, cm).events
    dp_reduce = ev[ev["kind"] == "allreduce"]
    assert sorted(dp_reduce["device"]) == ["g0", "g1", "g2", "g3"] and set(dp_reduce["replica"]) == {0, 1}
    replicated = ev[(ev["kind"] == "tp_allreduce") & (ev["micro_batch"] == -1)]
    assert len(replicated) == 4 and (replicated["start"] >= dp_reduce["end"].max() - 1e-12).all()
    optim = ev[ev["kind"] == "optim"]
    assert (optim["start"] >= replicated["end"].max() - 1e-12).all()


def test_a_step_with_evaluations_shows_each_groups_forward_only_passes_at_the_cost_models_price(tmp_path):
    """The step after which tasks are evaluated: the same step, then per fusion group its due tasks'
    validation sets in fused micro-batches of the token budget, one `eval` event each (compute, no
    backward), priced by CostModel.evaluation_seconds. A step without evaluation has none."""
    from dataclasses import replace

    from muxtune.simulator.workload import evaluation_micro_batches
    from muxtune.spec import Alignment

    cm = FakeCostModel(per_token=0.002, embed=0.1, head=0.3, optimizer=0.05)
    works = {"a": replace(work("a", seq_len=10.0), eval_sequences=6, eval_every=2),
             "b": replace(work("b", seq_len=20.0), eval_sequences=40, eval_every=3),  # 800 tokens: 2 micro-batches
             "c": work("c", sequences=3)}  # does not validate
    plan = Plan(groups=[FusionGroup(tasks=["a", "c"], devices=["cpu"]), FusionGroup(tasks=["b"], devices=["cpu"])],
                alignment=Alignment(token_budget=512))
    plain = simulate_step(plan, works, cm)
    assert "eval" not in set(plain.events["kind"]) and plain.evaluation_seconds == 0 and plain.evaluating == ()

    step = simulate_step(plan, works, cm, evaluating=("a", "b"))
    training = step.events[step.events["kind"] != "eval"].reset_index(drop=True)
    assert training.equals(plain.events)  # evaluating changes nothing of the step itself
    ev = step.events[step.events["kind"] == "eval"]
    expected = [(0, mb) for mb in evaluation_micro_batches([works["a"]], 512)] + \
               [(1, mb) for mb in evaluation_micro_batches([works["b"]], 512)]
    assert len(expected) == 3 and list(zip(ev["group"], ev["micro_batch"])) == [(0, 0), (1, 0), (1, 1)]
    assert (ev["stream"] == "compute").all() and (ev["device"] == "cpu").all() and ev["task"].isna().all()
    for op, (_, mb) in zip(ev.itertuples(), expected):
        assert op.end - op.start == pytest.approx(cm.evaluation_seconds([mb])) and op.end > op.start
    # one after another, from the end of the step
    assert ev["start"].iloc[0] == pytest.approx(plain.step_seconds)
    assert list(ev["start"].iloc[1:]) == pytest.approx(list(ev["end"].iloc[:-1]))
    priced = cm.evaluation_seconds([mb for _, mb in expected])
    assert step.evaluation_seconds == pytest.approx(priced) and step.evaluating == ("a", "b")
    assert step.step_seconds == pytest.approx(plain.step_seconds + priced)
    assert step.summary()["evaluation_seconds"] == pytest.approx(priced)
    # only the due tasks are evaluated: b alone gives group 1's two passes
    only_b = simulate_step(plan, works, cm, evaluating=("b",)).events
    assert list(only_b[only_b["kind"] == "eval"]["group"]) == [1, 1]
    assert step.gantt(tmp_path / "gantt.png").is_file()


def test_padded_evaluation_micro_batches_are_the_executors_split():
    """Padded layout: the executor splits a validation set into micro-batches of at most the token budget,
    padding included (a row per sequence, as long as the micro-batch's longest: alignment.split_by_budget),
    task after task; the simulator prices the same micro-batches, rows x longest each. (Split by real
    tokens, a llama-100m evaluation ran 98k padded tokens in 4 micro-batches for a 16k budget: 73 s
    measured against 61 s priced; now 57 s against 59.)"""
    from dataclasses import replace

    from muxtune.executor.alignment import split_by_budget
    from muxtune.executor.data import Example
    from muxtune.simulator.workload import evaluation_micro_batches

    works = [replace(work("a", seq_len=30.0), eval_sequences=7, eval_seq_len=20.0),
             replace(work("b", seq_len=30.0), eval_sequences=9, eval_seq_len=48.0),
             replace(work("c", seq_len=30.0), eval_sequences=2, eval_seq_len=300.0)]  # longer than the budget
    budget = 256
    priced = evaluation_micro_batches(works, budget, padded=True)
    ran = split_by_budget({w.name: [Example([1] * int(w.eval_seq_len), [1] * int(w.eval_seq_len))] * w.eval_sequences
                           for w in works}, 1, budget, padded=True)
    shapes = [(sum(len(v) for v in part.values()), max(len(e.input_ids) for v in part.values() for e in v))
              for part in ran]
    assert [(sum(t.tokens for t in mb.tasks), mb.seq_len) for mb in priced] == [(r * s, s) for r, s in shapes]
    assert all(r * s <= budget for r, s in shapes if r > 1) and shapes[-1] == (1, 300)
    # chunk-aligned (the default): real tokens only, as before
    packed = evaluation_micro_batches(works, budget)
    assert sum(mb.tokens for mb in packed) == 7 * 20 + 9 * 48 + 2 * 300
