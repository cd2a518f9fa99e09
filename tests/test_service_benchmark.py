"""benchmarks.service --quick stays runnable: a 4-job trace through two real services (multiplexed and
dedicated) and the simulator's replay of it print the summary JSON (no speed asserted here: the
figures and targets are in docs/benchmarks.md)."""

import json
import math

import pytest

from muxtune.profiler.profile import REPO_PROFILES


def test_service_benchmark_quick_runs_the_trace_through_both_modes_and_the_simulator(tmp_path, capsys):
    from muxtune.benchmarks import service

    profile = next(REPO_PROFILES.glob("cpu-*-tiny-llama.csv"))  # as it is: no calibration, no measuring
    result = service.main(["--quick", "--profile", str(profile), "--out", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("benchmarks.service: 4 jobs") and json.loads(lines[-1]) == json.loads(json.dumps(result))
    for key in ("makespan_ratio", "jct_ratio", "p95_jct_ratio", "sim_makespan_error", "sim_jct_error"):
        assert math.isfinite(result[key]) and result[key] >= 0, key
    for mode in ("muxtune", "dedicated"):
        measured, simulated = result["measured"][mode], result["simulated"][mode]
        assert measured["failed"] == [] and measured["peak_memory_bytes"] > 0
        # a job completes after it arrives and after it is queued: its JCT covers its queueing
        assert measured["jct_mean_s"] >= measured["queueing_mean_s"] >= 0
        assert simulated["jct_mean_s"] >= simulated["queueing_mean_s"] >= 0
        assert 0 < measured["busy_fraction"] <= 1.0 + 1e-9 and measured["training_seconds"] > 0
        assert measured["makespan_s"] >= measured["jct_p95_s"] * 0.99
    assert result["overheads"]["start_s"] > 0 and result["overheads"]["validate_s"] > 0
    assert (tmp_path / "service_jct_cdf.png").read_bytes()[:4] == b"\x89PNG"


def test_service_benchmark_refuses_bad_arguments_cleanly(capsys):
    from muxtune.benchmarks import service

    with pytest.raises(SystemExit) as exit_:
        service.main(["--jobs", "0"])
    assert exit_.value.code == 2 and "--jobs: need at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        service.main(["--profile", "/no/such.csv"])
    assert "--profile: no such file" in capsys.readouterr().err
