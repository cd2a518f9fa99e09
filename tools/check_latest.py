"""`make check-latest`: does the project still work with the NEWEST versions pyproject.toml's ranges allow?

Creates a scratch venv (never .venv), installs torch (the pinned CPU wheel) and this project with its dev
extras letting pip pick the newest allowed release of everything else, prints each version that differs
from requirements.lock, then runs a fast subset: the install/shadowing tests, one equivalence test, one
CLI run and one benchmark in --quick mode. Exit status: that of the first failing step (0: all passed).
A failure here is drift that users of `pip install muxtune` would meet next; refresh the lock with
`make lock` once it is fixed (README, "Dependencies")."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBSET = [
    ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_install.py",
     "tests/test_equivalence.py::test_multiplexed_equals_hf_peft_alone[builtin:tiny-llama]",
     "tests/test_cli.py::test_plan_and_run_writes_the_run_folder",
     "-k", "not the_lock_pins"],  # this venv is meant to differ from the lock
    ["-m", "benchmarks.planner", "--quick"],
]


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line:
            name, version = line.split(" ")[0].split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def step(title: str, args: list[str], **kw) -> None:
    print(f"\n== {title}: {' '.join(args)}", flush=True)
    start = time.monotonic()
    done = subprocess.run(args, cwd=REPO, **kw)
    print(f"== {title}: exit {done.returncode} after {time.monotonic() - start:.0f} s", flush=True)
    if done.returncode:
        sys.exit(done.returncode)


def main() -> None:
    venv = Path(tempfile.mkdtemp(prefix="muxtune-latest-"))
    python = str(venv / "bin" / "python")
    step("scratch venv", [sys.executable, "-m", "venv", str(venv)])
    step("torch (pinned CPU wheel)", [python, "-m", "pip", "install", "--quiet", "torch==2.13.0"])
    step("newest allowed versions", [python, "-m", "pip", "install", "--quiet", "--upgrade",
                                     "--upgrade-strategy", "eager", "-e", ".[dev]"])
    freeze = subprocess.run([python, "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout
    pins = locked_versions()
    print("\nnewest allowed versions that differ from requirements.lock:")
    changed = 0
    for line in sorted(freeze.splitlines()):
        name, version = line.split("==")
        key = name.lower().replace("_", "-")
        if key == "pip" or pins.get(key) == version:
            continue
        changed += 1
        print(f"  {name:32s} {pins.get(key, '(not in the lock)'):>16s} -> {version}")
    print(f"  ({changed} of {len(freeze.splitlines())} differ)" if changed else "  none: the lock is up to date")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    for args in SUBSET:
        step("subset", [python, *(["-P"] if args[1] == "pytest" else []), *args], env=env)
    print(f"\ncheck-latest: passed with the newest allowed versions (scratch venv {venv})")


if __name__ == "__main__":
    main()
