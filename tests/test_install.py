"""No top-level folder of ours shadows an installed distribution's import name, however the project starts.

Our folders (kernels/, planner/, profiler/, ...) are installed as `muxtune.<folder>`; their bare names
belong to other projects on PyPI (transformers >= 5.25 imports the Hugging Face `kernels` package at
start-up). Here a scratch folder on PYTHONPATH holds a dummy distribution for every such name, whose
import fails loudly, and each entry point is started from the repository root (where `python -m` and
`python -c` put the root first on sys.path). Each must import our code, never a dummy, and transformers'
`import kernels` must get the installed package, not our folder."""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# every top-level folder of the checkout (muxtune itself is our distribution's own name), and the bare
# names of muxtune's own subpackages
OUR_NAMES = sorted({p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")
                    and p.name.isidentifier() and p.name != "muxtune"}
                   | {"kernels", "planner", "simulator", "profiler", "executor", "benchmarks"})


def real_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A dummy distribution (package + dist-info) per name, installed by pip into a scratch --target.
    `kernels` gets none when the real one is installed: transformers must find that one."""
    names = [n for n in OUR_NAMES if n != "kernels" or not real_kernels_installed()]
    src = tmp_path_factory.mktemp("dummy-src")
    for name in names:
        (src / name).mkdir()
        (src / name / "__init__.py").write_text(
            f'raise ImportError("the dummy distribution {name} was imported instead of our code")\n')
    (src / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "shadow-dummies"
        version = "0.0.1"
        [tool.setuptools]
        packages = {json.dumps(names)}
        """))
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(target), str(src)], check=True, timeout=300)
    assert all((target / n / "__init__.py").is_file() for n in names)
    return target


def run(args, scratch, **kw):
    env = {**os.environ, "PYTHONPATH": str(scratch), "TRITON_INTERPRET": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kw)


# What `python -m benchmarks.<name>` does from the root: the root is sys.path[0] ('' for -c), the scratch
# site next, then the venv. Then transformers loads its hub-kernels integration (`from kernels import ...`).
PROBE = """
import json, sys
import benchmarks.planner
import transformers.integrations.hub_kernels
import muxtune.kernels, muxtune.planner, muxtune.simulator, muxtune.profiler, muxtune.executor
import kernels
print(json.dumps({name: sys.modules[name].__file__ for name in
                  ["benchmarks", "benchmarks.planner", "muxtune.kernels", "muxtune.planner", "muxtune.simulator",
                   "muxtune.profiler", "muxtune.executor", "kernels"]}))
"""


def test_python_m_from_the_root_imports_our_code_and_the_real_kernels(scratch):
    done = run([sys.executable, "-c", PROBE], scratch)
    assert done.returncode == 0, done.stderr[-3000:]
    files = {k: Path(v).resolve() for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    assert files["benchmarks"] == REPO / "benchmarks" / "__init__.py"
    assert files["benchmarks.planner"] == REPO / "benchmarks" / "planner.py"
    for folder in ("kernels", "planner", "simulator", "profiler", "executor"):
        assert files[f"muxtune.{folder}"] == REPO / folder / "__init__.py"
    # the bare name is the installed distribution's: the real one, or else the scratch dummy
    assert not files["kernels"].is_relative_to(REPO / "kernels")
    if real_kernels_installed():
        assert files["kernels"].is_relative_to(Path(importlib.metadata.distribution("kernels").locate_file("")))


@pytest.mark.parametrize("entry", [
    ["{python}", "-m", "benchmarks.planner", "--help"],
    ["{python}", "-m", "benchmarks.cost_model_accuracy", "--help"],
    ["{python}", "-m", "muxtune.benchmarks.simulator", "--help"],
    ["{python}", "-m", "muxtune.cli", "--help"],
    ["{bin}/muxtune", "validate", "examples/quickstart.yaml"],
    ["{bin}/plan-and-run", "--help"],
    ["{bin}/torchrun", "--nproc-per-node", "1", "-m", "muxtune.process", "--help"],
], ids=lambda e: " ".join(Path(a.format(python="python", bin="")).name for a in e[:3]))
def test_entry_points_start_from_the_root(scratch, entry):
    bin_dir = Path(sys.executable).parent
    if entry[0] == "{bin}/torchrun" and not (bin_dir / "torchrun").exists():
        pytest.fail("torchrun is not installed beside this python")
    args = [a.format(python=sys.executable, bin=bin_dir) for a in entry]
    done = run(args, scratch)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert "dummy distribution" not in done.stdout + done.stderr


def test_pytest_from_the_root_without_dash_p(scratch):
    """`python -m pytest` (root on sys.path) collects and runs a test that builds a transformers model."""
    done = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "tests/test_equivalence.py::test_multiplexed_equals_hf_peft_alone[builtin:tiny-llama]"], scratch)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout and "dummy distribution" not in done.stdout


def test_a_notebook_kernel_started_in_the_root(scratch, tmp_path):
    from nbclient import NotebookClient
    import nbformat

    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import muxtune.planner, transformers.integrations.hub_kernels, kernels, sys\n"
        "print(kernels.__file__, sys.modules['muxtune.planner'].__file__)")])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(scratch)  # the kernel inherits it
    try:
        NotebookClient(book, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    printed = "".join(o.get("text", "") for o in book.cells[0].outputs if o.get("name") == "stdout")
    kernels_file, planner_file = printed.split()
    assert not Path(kernels_file).resolve().is_relative_to(REPO / "kernels")
    assert Path(planner_file).resolve() == REPO / "planner" / "__init__.py"


def test_the_lock_pins_every_installed_distribution():
    """requirements.lock pins each transitive dependency with hashes, and the venv holds exactly those."""
    lock = (REPO / "requirements.lock").read_text()
    pins = {}
    for line in lock.splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line:
            name, version = line.split(" ")[0].split("==")
            pins[name.lower().replace("_", "-")] = version
    assert lock.count("--hash=sha256:") >= len(pins)
    assert pins["torch"].startswith("2.13.0")
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in ("muxtune", "pip"):  # the project itself, and the installer
            continue
        assert name in pins, f"{name} {dist.version} is installed but not in requirements.lock"
        assert dist.version == pins[name], f"{name}: installed {dist.version}, locked {pins[name]}"
