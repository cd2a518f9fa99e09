"""The prepared GPU script (benchmarks/device/all.sh) rehearsed on the CPU: every stage runs and
writes its JSON, so the script cannot rot between GPU sessions."""

import json
import os
import subprocess
import sys


def test_device_script_dry_run_writes_every_json(repo, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "benchmarks/device/all.sh", "--dry"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in (tmp_path / "kernel_tests.log").read_text()
    results = {name: json.loads((tmp_path / f"{name}.json").read_text())
               for name in ("host_overhead", "alignment", "mux_vs_separate")}
    assert results["host_overhead"]["ops_growth_tenants"] > 0 and results["host_overhead"]["device"] == "cpu"
    assert results["mux_vs_separate"]["device"] == "cpu" and results["mux_vs_separate"]["limit_ratio"] > 0
    assert results["alignment"]
