"""Benchmarks stay runnable: a tiny configuration prints the JSON summary (no timing asserted here;
speed targets live in the benchmarks themselves and docs/benchmarks.md)."""

import json

import pytest

from muxtune.benchmarks import cost_model_accuracy, mixed_methods


def test_mixed_methods_benchmark_runs_on_a_tiny_model(capsys):
    result = mixed_methods.main(["--model", "builtin:tiny-llama", "--steps", "1", "--repeats", "1",
                                 "--tokens", "16", "--threads", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result
    assert len(last["methods"]) == 8 and last["ratio"] > 0
    assert last["fused_tokens_per_s"] > 0 and last["sequential_tokens_per_s"] > 0


def test_simulator_benchmark_runs_and_predicts_with_a_plugged_in_cost_model(capsys, monkeypatch):
    from fake_cost_model import FakeCostModel, FakeShape
    from muxtune.benchmarks import simulator

    # the real CostModel arrives with the profiler; here the prediction path runs on the tests' fake
    monkeypatch.setattr(simulator, "load_cost_model", lambda model, device, profile=None, config=None: FakeCostModel(shape=FakeShape(n_layers=2)))
    result = simulator.main(["--quick"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    assert last["predicted_steps"] == 2 * 2 and last["median_error"] >= 0
    assert last["cluster_sim_seconds"] > 0 and last["cluster_metrics"]["jobs"] == 100


def test_simulator_benchmark_times_the_step_phases_beside_the_shipped_profiles_terms(repo, capsys):
    """--phases on the real CostModel (a shipped profile, given explicitly): every term of the step's
    price sits beside one measured phase, so the phase rows add up to the whole step's price."""
    from muxtune.benchmarks import simulator

    profile = next((repo / "profiles").glob("cpu-*-tiny-llama.csv"))
    result = simulator.main(["--quick", "--phases", "--max-seq-len", "48", "--profile", str(profile)])
    phases = {row["phase"]: row for row in result["phases"]}
    top = ["forward", "backward", "grad norm + clip + AdamW + zero_grad", "draw + fuse + schedule + rest of step"]
    assert sum(phases[name]["predicted_ms"] for name in top) == pytest.approx(phases["whole step"]["predicted_ms"])
    assert all(row["measured_ms"] == row["measured_ms"] for row in result["phases"])  # no NaN
    assert phases["whole step"]["measured_ms"] > phases["forward"]["measured_ms"] > 0
    assert result["median_error"] >= 0 and result["predicted_steps"] == 2 * 2


def test_simulator_benchmark_predicts_the_steps_with_a_fused_evaluation(repo, capsys):
    """--validation: every task holds out 20% and is evaluated every 2nd step; of the 2 measured steps
    per plan (3 steps, 1 warm-up) both are followed by an evaluation (step 2, and the last step), and
    each is predicted with its evaluation on the timeline."""
    from muxtune.benchmarks import simulator

    profile = next((repo / "profiles").glob("cpu-*-tiny-llama.csv"))
    result = simulator.main(["--quick", "--validation", "--max-seq-len", "48", "--profile", str(profile)])
    assert result["validation"] and result["predicted_steps"] == 2 * 2 and result["evaluated_steps"] == 2 * 2
    assert 0 <= result["evaluated_median_error"] < 10


def test_alignment_benchmark_runs_in_quick_mode(capsys):
    from muxtune.benchmarks import alignment

    result = alignment.main(["--quick", "--threads", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result
    for key in ("ineffective_fraction_padded", "ineffective_fraction_chunked", "useful_throughput_ratio"):
        assert key in last
    # padding is counted, not timed: these hold on any machine
    assert last["ineffective_fraction_padded"] > last["ineffective_fraction_per_task"] > last["ineffective_fraction_chunked"]
    assert last["ineffective_fraction_chunked"] < 0.02 and last["useful_throughput_ratio"] > 0


def test_faults_benchmark_kills_resumes_and_contains_the_poisoned_task(capsys):
    from muxtune.benchmarks import faults

    result = faults.main(["--kills", "1", "--steps", "12", "--every", "3", "--tasks", "2"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    assert last["kills"] == 1 and last["checkpoint_interval"] == 3
    assert last["max_steps_lost"] <= last["checkpoint_interval"]
    assert last["tasks_affected"] == 0 and last["resume_identical"] is True
    assert last["poisoned_status"] == "failed"
    assert last["layout"] == "single" and last["processes"] == 1


def test_faults_benchmark_on_a_two_process_pipeline(capsys):
    """--plan pp2: every run is a 2-stage pipeline; the kill takes down the launcher and both stages."""
    from muxtune.benchmarks import faults

    result = faults.main(["--plan", "pp2", "--kills", "1", "--steps", "8", "--every", "3", "--tasks", "2"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    assert last["layout"] == "pp2" and last["processes"] == 2 and last["kills"] == 1
    assert last["max_steps_lost"] <= last["checkpoint_interval"] == 3
    assert last["tasks_affected"] == 0 and last["resume_identical"] is True
    assert last["poisoned_status"] == "failed"


def test_pipeline_benchmark_runs_in_quick_mode(capsys):
    """Three plans on a 2-process gloo pipeline; keys and sanity only (timings are not asserted here)."""
    from muxtune.benchmarks import pipeline

    result = pipeline.main(["--quick"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    assert last["processes"] == 2 and set(last["variants"]) == {"dedicated", "fused_1f1b", "muxtune"}
    for row in last["variants"].values():
        assert row["tokens_per_s"] > 0 and 0 <= row["bubble_fraction"] < 1
    assert last["speedup_vs_1f1b"] > 0 and last["speedup_vs_dedicated"] > 0
    # the CostModel is in the tree: the simulator's error on the same plans is always computed
    assert last["sim_error"] >= 0 and set(last["sim_errors"]) == set(last["variants"])
    assert all(row["predicted_step_s"] > 0 for row in last["variants"].values())
    # the tensor-parallel arm (tiny-llama splits over 2 processes): measured and simulated
    tp = last["tensor_parallel"]
    assert tp["tokens_per_s"] > 0 and tp["predicted_step_s"] > 0 and last["tp_sim_error"] == tp["sim_error"] >= 0
    assert isinstance(last["tp_profile_measured"], bool)


def test_cost_model_accuracy_benchmark_runs_every_configuration_on_a_shipped_profile(repo, capsys):
    """Real trainer steps for every configuration (all methods), priced by a shipped CPU profile
    (its fingerprint need not match this machine: the file is given explicitly)."""
    profile = next((repo / "profiles").glob("cpu-*-tiny-llama.csv"))
    result = cost_model_accuracy.main(["--profile", str(profile), "--quick", "--steps", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result and last["configs"] == len(cost_model_accuracy.CONFIGS) >= 6
    assert {"median_error", "max_error", "memory_median_error", "drift_corrected", "speed_range"} <= set(last)
    for row in last["results"]:
        assert row["measured_s"] > 0 and row["predicted_s"] > 0 and row["speed"] > 0
        # the prediction at the speed measured beside the steps (SpeedControl)
        assert row["corrected_error"] == pytest.approx(abs(row["predicted_s"] * row["speed"] - row["measured_s"])
                                                       / row["measured_s"])
        assert row["measured_bytes"] > 0 and row["predicted_bytes"] > 0


def test_planner_benchmark_runs_in_quick_mode(capsys):
    from muxtune.benchmarks import planner

    result = planner.main(["--quick"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    assert {"max_gap", "solve_seconds", "compare_seconds", "pipeline_instances", "beats_baselines"} <= set(last)
    assert last["gap_instances"] == 3 and last["max_gap"] == max(last["gaps"])
    assert len(last["versus_baselines"]) == 8 and last["memory_violations"] == 0
    assert last["beats_baselines"] == all(v["beats"] for v in last["versus_baselines"])


def test_mux_vs_separate_benchmark_runs_every_arm_in_quick_mode():
    """All six arms (separate processes one after another and concurrently, adapter switching, MuxTune,
    the planner's plan, the one-adapter limit) train, each checking every step that it trained the
    tokens asked for; the planned arm reports the planner's choice and its ratio to the separate jobs."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "benchmarks.mux_vs_separate", "--quick", "--sweep", "32",
                           "--steps", "1", "--threads", "1"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    point = last["sweep"][0]
    for arm in ("separate_seq", "separate_concurrent", "switch", "muxtune", "planned", "single_adapter_limit"):
        assert point[arm]["tokens_per_s"] > 0, arm
    assert 1 <= point["planned_groups"] <= 3 and point["planned_predicted_vs_sequential"] > 0
    assert last["planned_vs_sequential"] == point["planned_vs_sequential"] > 0
    assert last["tasks"] == 3 and last["throughput_ratio"] > 0 and last["throughput_ceiling"] > 0
    assert last["memory_ratio"] > 1  # three backbones vs one: holds on any machine
    # limit_ratio pairs the two arms' steps of the same round; with one round that is the plain ratio
    assert last["limit_ratio"] == point["mux_vs_limit_paired"] == pytest.approx(point["mux_vs_limit"], abs=2e-3)


def test_a_benchmarks_default_steps_shrink_on_a_machine_too_slow_for_them(capsys):
    """Machines of our kind differ ~3x: a benchmark counted in steps takes fewer of them by default where
    they would not finish within the limit (issue 19's 20 minutes), never below its least; steps the
    user asked for are kept."""
    from muxtune.benchmarks import DEFAULT_LIMIT_SECONDS, default_steps

    per_step = DEFAULT_LIMIT_SECONDS / 5
    assert default_steps(None, 8, 4, lambda n: 0.01 * per_step * n) == 8  # a fast machine: the default
    assert default_steps(None, 8, 2, lambda n: per_step * n) == 5
    assert default_steps(None, 8, 2, lambda n: per_step * n, reserved=per_step) == 4  # a profile to measure first
    assert "4 steps instead of the default 8" in capsys.readouterr().out
    assert default_steps(None, 8, 6, lambda n: per_step * n) == 6  # never below the least
    assert default_steps(8, 8, 2, lambda n: per_step * n) == 8  # asked for
