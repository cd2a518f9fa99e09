"""The layers of DESIGN.md hold: `lint-imports` checks pyproject.toml's import-linter contracts.

import-linter finds a package's modules by walking its folder, but `muxtune.executor` & co. are the
checkout's top-level folders mapped into `muxtune` by pyproject's package-dir. So the check runs on a
copy of the sources laid out as installed (muxtune/executor/, muxtune/planner/, ...).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
SUBPACKAGES = ("executor", "planner", "simulator", "profiler", "kernels")


def installed_layout(into: Path) -> Path:
    """A copy of the sources with every subpackage under muxtune/, as the wheel installs them."""
    package = into / "muxtune"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "muxtune", package, ignore=skip)
    for name in SUBPACKAGES:
        shutil.copytree(ROOT / name, package / name, ignore=skip)
    return package


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: `make install` installs import-linter (dev dependency)")
    return installed_layout(tmp_path_factory.mktemp("layers"))


def test_the_contracts_cover_the_layer_rules():
    names = " ".join(c["name"] for c in contracts())
    assert len(contracts()) >= 4
    for rule in ("no torch", "muxtune.run", "simulator", "layers"):
        assert rule in names


def test_every_contract_is_kept(sources):
    result = lint_imports(sources.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(contracts())} kept, 0 broken." in result.stdout


def test_a_crossing_breaks_the_check(sources, tmp_path):
    """A schedule module that imports torch, and an executor module that imports the simulator, fail."""
    broken = installed_layout(tmp_path)
    (broken / "schedule.py").write_text((broken / "schedule.py").read_text() + "\nimport torch  # noqa\n")
    (broken / "executor" / "sneaky.py").write_text("from muxtune.simulator import iteration  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "muxtune.schedule -> torch" in result.stdout
    assert "muxtune.executor.sneaky -> muxtune.simulator.iteration" in result.stdout


def test_the_vocabulary_planner_and_simulator_load_without_torch():
    """Each method's Config lives in its torch-free half (muxtune/methods/), so what plans and prices
    needs no torch at run time either (import-linter sees only the static imports)."""
    modules = ["muxtune.spec", "muxtune.profiler.cost_model", "muxtune.planner.plan", "muxtune.simulator.cluster"]
    code = f"import sys; import {', '.join(modules)}; print(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
