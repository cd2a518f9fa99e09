"""Benchmarks stay runnable: a tiny configuration prints the JSON summary (no timing asserted here;
speed targets live in the benchmarks themselves and docs/benchmarks.md)."""

import json

from benchmarks import cost_model_accuracy, mixed_methods


def test_mixed_methods_benchmark_runs_on_a_tiny_model(capsys):
    result = mixed_methods.main(["--model", "builtin:tiny-llama", "--steps", "1", "--repeats", "1",
                                 "--tokens", "16", "--threads", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result
    assert len(last["methods"]) == 8 and last["ratio"] > 0
    assert last["fused_tokens_per_s"] > 0 and last["sequential_tokens_per_s"] > 0


def test_cost_model_accuracy_benchmark_runs_every_configuration_on_a_shipped_profile(repo, capsys):
    """Real trainer steps for all seven configurations (all methods), priced by a shipped CPU profile
    (its fingerprint need not match this machine: the file is given explicitly)."""
    profile = next((repo / "profiles").glob("cpu-*-tiny-llama.csv"))
    result = cost_model_accuracy.main(["--profile", str(profile), "--quick", "--steps", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result and last["configs"] == len(cost_model_accuracy.CONFIGS) >= 6
    assert {"median_error", "max_error", "memory_median_error"} <= set(last)
    for row in last["results"]:
        assert row["measured_s"] > 0 and row["predicted_s"] > 0
        assert row["measured_bytes"] > 0 and row["predicted_bytes"] > 0
