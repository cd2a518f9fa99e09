"""Cluster-level simulator on hand-computable costs (tests/fake_cost_model.py)."""

import pandas as pd
import pytest

from fake_cost_model import FakeCostModel
from muxtune.errors import MuxTuneError
from muxtune.simulator.cluster import (Dedicated, Job, MuxTuneGreedy, SpatialOnly, compare_policies,
                                       gpus_for_queueing, load_trace, poisson_jobs, simulate_cluster)
from muxtune.simulator.plots import plot_cluster, plot_sweep

CM = FakeCostModel(per_layer=0.25, per_token=0.001)  # 4 layers: a fixed 1 s forward cost per micro-batch
MEMORY = 100_000


def job(i, seq_len, arrival=0.0, batch=4, steps=10):
    return Job(i, arrival, "m", "lora", 8, batch * steps * seq_len, batch, steps, params=100)


def test_dedicated_runs_jobs_one_after_another_on_one_gpu():
    jobs = [job(i, 16) for i in range(4)]
    result = simulate_cluster(jobs, 1, Dedicated(), lambda m: CM, MEMORY)
    step = CM.step_seconds([__import__("muxtune.simulator.workload", fromlist=["x"]).split_micro_batches(
        [jobs[0].work], 1)[0]])
    table = result.jobs.sort_values("id")
    assert list(table["queueing"]) == pytest.approx([0, 10 * step, 20 * step, 30 * step])
    assert list(table["jct"]) == pytest.approx([10 * step, 20 * step, 30 * step, 40 * step])
    assert result.metrics["gpu_utilisation"] == pytest.approx(1.0)
    assert result.metrics["gpu_hours"] == pytest.approx(40 * step / 3600)


def test_policies_order_on_a_trace_of_mixed_lengths():
    # one GPU whose memory holds the backbone plus about 1,500 tokens of activations
    jobs = [job(0, 16), job(1, 16), job(2, 160), job(3, 160), job(4, 16, arrival=5.0)]
    memory = 4 * 1000 + 500 + 700 + 5 * 1600 + 10 * 4 * 1500
    results = compare_policies(jobs, 1, lambda m: CM, memory)
    dedicated, spatial, muxtune = (results[p].metrics for p in ("dedicated", "spatial", "muxtune"))
    # sharing admits jobs at once; dedicated makes them queue
    assert dedicated["queueing_p95_s"] > spatial["queueing_p95_s"] >= muxtune["queueing_p95_s"]
    # fusing amortises the fixed per-layer cost; muxtune also skips padding the short jobs to 160 tokens
    # and holds one group's activations at a time, so all five fit at once
    assert muxtune["throughput_tokens_per_s"] > spatial["throughput_tokens_per_s"] > dedicated["throughput_tokens_per_s"]
    assert muxtune["gpu_hours"] < spatial["gpu_hours"] < dedicated["gpu_hours"]
    assert muxtune["queueing_p95_s"] == 0
    for r in results.values():  # every job ran once to completion after it arrived
        assert sorted(r.jobs["id"]) == [0, 1, 2, 3, 4]
        assert (r.jobs["start"] >= r.jobs["arrival"]).all() and (r.jobs["finish"] > r.jobs["start"]).all()


def test_muxtune_groups_by_length_and_token_budget():
    policy = MuxTuneGreedy(token_budget=4 * 36, length_ratio=2.0)
    from muxtune.simulator.cluster import Costs, Instance

    jobs = [job(0, 16), job(1, 20), job(2, 30), job(3, 100)]
    groups, step, memory = policy.arrange(Instance(0, "m", 1, jobs), Costs(lambda m: CM, MEMORY))
    assert [[j.id for j in g] for g in groups] == [[0, 1], [2], [3]]  # budget splits 0,1 | 2; 100 > 2 * 30
    assert step == pytest.approx(sum(3 * 4 * (0.25 + 0.001 * t) for t in (4 * 36, 4 * 30, 4 * 100)))


def test_poisson_arrivals_and_results_are_deterministic_per_seed():
    a = poisson_jobs(60, 120, "m", CM.shape, seed=3)
    b = poisson_jobs(60, 120, "m", CM.shape, seed=3)
    assert a == b and a != poisson_jobs(60, 120, "m", CM.shape, seed=4)
    big = 10**12
    first = simulate_cluster(a, 4, MuxTuneGreedy(), lambda m: CM, big)
    second = simulate_cluster(b, 4, MuxTuneGreedy(), lambda m: CM, big)
    pd.testing.assert_frame_equal(first.jobs, second.jobs)
    assert first.metrics == second.metrics


def test_sweep_finds_fewest_gpus_meeting_the_queueing_target(tmp_path):
    jobs = [job(i, 16, arrival=float(i)) for i in range(6)]
    table, answer = gpus_for_queueing(jobs, [1, 2, 3, 6], 1.0, lambda m: CM, MEMORY, policies=["dedicated"])
    assert list(table["gpus"]) == [1, 2, 3, 6]
    assert list(table["queueing_p95_s"]) == sorted(table["queueing_p95_s"], reverse=True)
    meets = table[table["queueing_p95_s"] <= 1.0]["gpus"]
    assert answer["dedicated"] == meets.min() and table.set_index("gpus").loc[6, "queueing_p95_s"] == 0
    assert plot_sweep(table, 1.0, tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    results = compare_policies(jobs, 2, lambda m: CM, MEMORY)
    assert plot_cluster(results, tmp_path / "cluster.png").read_bytes()[:4] == b"\x89PNG"


def test_trace_csv_loads_and_bad_rows_name_the_line(tmp_path):
    good = tmp_path / "trace.csv"
    good.write_text("arrival,model,method,rank,data_tokens,batch,steps\n5,m,lora,8,6400,4,100\n1,m,ia3,0,3200,8,50\n")
    jobs = load_trace(good, lambda m: CM.shape)
    assert [j.arrival for j in jobs] == [1.0, 5.0] and jobs[1].seq_len == 16 and jobs[0].params > 0
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival,model,method,rank,data_tokens,batch,steps\n5,m,lora,8,6400,4,100\n1,m,lora,8,100,0,5\n")
    with pytest.raises(MuxTuneError, match=r"bad.csv:3: batch"):
        load_trace(bad, lambda m: CM.shape)
    missing = tmp_path / "missing.csv"
    missing.write_text("arrival,model\n1,m\n")
    with pytest.raises(MuxTuneError, match="missing column"):
        load_trace(missing, lambda m: CM.shape)
    with pytest.raises(MuxTuneError, match="does not fit"):
        simulate_cluster([job(0, 16)], 1, SpatialOnly(), lambda m: CM, 10)


def test_single_gpu_pricing_agrees_with_the_iteration_simulator():
    from muxtune.simulator.cluster import Costs
    from muxtune.simulator.iteration import simulate_step
    from muxtune.spec import FusionGroup, Plan

    jobs = [job(0, 16), job(1, 40), job(2, 100)]
    groups = [[jobs[0], jobs[1]], [jobs[2]]]
    step, memory = Costs(lambda m: CM, MEMORY).price("m", groups, 1, packed=True)
    plan = Plan(groups=[FusionGroup(tasks=[j.work.name for j in g], devices=["gpu0"]) for g in groups])
    timeline = simulate_step(plan, {j.work.name: j.work for j in jobs}, CM, packed=True)
    assert step == pytest.approx(timeline.step_seconds) and memory == timeline.peak_memory["gpu0"]


def test_service_submission_and_idle_pickup_delay_every_job_by_their_seconds():
    """ServiceOverheads.submit_s (the API upload + create) delays when the service knows a job;
    pickup_s (an idle worker's poll) only a job that finds no job training."""
    from muxtune.simulator.cluster import ServiceOverheads

    jobs = [job(i, 16) for i in range(2)]
    bare = simulate_cluster(jobs, 1, Dedicated(), lambda m: CM, MEMORY).jobs.sort_values("id")
    over = ServiceOverheads(submit_s=0.5, pickup_s=0.25)
    slow = simulate_cluster(jobs, 1, Dedicated(), lambda m: CM, MEMORY, over).jobs.sort_values("id")
    # the first finds the worker idle (submit + pick-up); the second queues behind it: its wait is
    # covered by the first's run, so it ends as late as the first's delay pushes it
    assert list(slow["jct"] - bare["jct"]) == pytest.approx([0.75, 0.75])
    assert list(slow["start"] - bare["start"]) == pytest.approx([0.75, 0.75])
