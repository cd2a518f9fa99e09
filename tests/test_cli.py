"""The front door: plan-and-run writes a complete run folder; bad input gets a clear message, exit 2,
no traceback and no half-written output."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from reference import write_jsonl

from muxtune import allocator

BIN = Path(sys.executable).parent


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)


def call(capsys, monkeypatch, cwd, command, *args):
    """Run a CLI entry point in this process (fast); an uncaught exception fails the test."""
    from muxtune import cli

    monkeypatch.chdir(cwd)
    code = (cli.plan_and_run_main if command == "plan-and-run" else cli.main)(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def small_config(tmp_path, **overrides):
    write_jsonl(tmp_path / "a.jsonl", 20, seed=1, min_len=2, max_len=6)
    write_jsonl(tmp_path / "b.jsonl", 20, seed=2, min_len=5, max_len=15, kind="text")
    config = {
        "name": "tiny",
        "model": "builtin:tiny-gpt2",
        "devices": "cpu",
        "tasks": [
            {"name": "a", "data": "a.jsonl", "peft": {"method": "lora", "r": 4, "target_modules": ["c_attn"]},
             "batch_size": 2, "max_seq_len": 64, "steps": 3, "seed": 0},
            {"name": "b", "data": "b.jsonl", "peft": {"method": "lora", "r": 8, "target_modules": ["c_fc"]},
             "batch_size": 3, "max_seq_len": 64, "steps": 2, "seed": 1},
        ],
    }
    config.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_plan_and_run_writes_the_run_folder(tmp_path):
    config = small_config(tmp_path)
    profile = next((Path(__file__).resolve().parent.parent / "profiles").glob("cpu-*-tiny-gpt2.csv"))
    result = run_cli("plan-and-run", str(config), "--no-progress", "--profile", str(profile), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "tiny"
    plan = json.loads((run / "plan.json").read_text())
    assert plan["version"] == 2 and plan["groups"][0]["tasks"] == ["a", "b"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tasks"]["a"]["steps"] == 3 and len(metrics["tasks"]["a"]["loss"]) == 3
    assert metrics["tasks"]["b"]["steps"] == 2 and metrics["tasks"]["b"]["status"] == "finished"
    assert metrics["tokens_per_s"] > 0 and all(t["tokens_per_s"] > 0 for t in metrics["tasks"].values())
    # the command line started itself again on tcmalloc, where installed (muxtune/allocator.py)
    assert metrics["malloc"] == ("tcmalloc" if allocator.library() else "system")
    for name in ("a", "b"):
        assert (run / "adapters" / name / "adapter_config.json").is_file()
        assert (run / "adapters" / name / "adapter_model.safetensors").is_file()
    html = (run / "report.html").read_text()
    # plan vs baselines, predicted vs measured, Gantt, memory, loss, throughput, ineffective tokens
    assert html.count("data:image/png;base64,") == 7 and (run / "loss_curves.png").stat().st_size > 1000
    assert "a" in result.stdout and "tokens/s" in result.stdout
    # --out puts it elsewhere; no staging folder is left behind
    result = run_cli("muxtune", "run", str(config), "--out", str(tmp_path / "elsewhere"), "--no-progress",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "elsewhere" / "metrics.json").is_file()
    assert not list(tmp_path.rglob(".*partial"))


@pytest.mark.parametrize("config,tasks", [("examples/quickstart.yaml", 4), ("examples/mixed_methods.yaml", 8)])
def test_example_configs_are_valid(repo, capsys, monkeypatch, config, tasks):
    result = call(capsys, monkeypatch, repo, "muxtune", "validate", config)
    assert result.returncode == 0, result.stderr
    assert f"ok: {tasks} tasks" in result.stdout


def test_mixed_methods_run_exports_every_method(tmp_path, capsys, monkeypatch):
    config = small_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    base = raw["tasks"][0]
    methods = {"lora": {"r": 4, "target_modules": ["c_attn"]}, "dora": {"r": 4, "target_modules": ["c_attn"]},
               "ia3": {}, "adapter": {"size": 8}, "prefix": {"num_virtual_tokens": 3},
               "prompt": {"num_virtual_tokens": 4}, "bitfit": {}}
    raw["tasks"] = [{**base, "name": m, "peft": {"method": m, **extra}, "steps": 2} for m, extra in methods.items()]
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = call(capsys, monkeypatch, tmp_path, "plan-and-run", str(config), "--no-progress")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {t["method"] for t in metrics["tasks"].values()} == set(methods)
    for method in methods:
        meta = json.loads((run / "adapters" / method / "adapter_config.json").read_text())
        if method in ("adapter", "bitfit"):
            assert meta["format"] == "muxtune" and meta["method"] == method
        else:
            assert meta["peft_type"] == {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "prefix": "PREFIX_TUNING",
                                         "prompt": "PROMPT_TUNING"}[method]


BAD_CONFIGS = [
    # (change to the config, text the error must contain)
    ({"tasks": [{"name": "a", "data": "a.jsonl", "steps": 2, "peft": {"method": "lora", "rr": 4}}]}, "tasks[0].peft.rr: unknown key"),
    ({"tasks": [{"name": "a", "data": "a.jsonl", "steps": 2, "peft": {"method": "lora", "r": 0}}]}, "tasks[0].peft.r"),
    ({"tasks": [{"name": "a", "data": "a.jsonl", "steps": 2, "peft": {"method": "nope"}}]}, "tasks[0].peft"),
    ({"tasks": [{"name": "a", "data": "missing.jsonl", "steps": 2, "peft": {"method": "lora"}}]}, "tasks[0].data: data file not found"),
    ({"tasks": [{"name": "a", "data": "a.jsonl", "steps": 2, "peft": {"method": "lora"}, "lr": -1}]}, "tasks[0].lr"),
    ({"tasks": []}, "tasks"),
    ({"devices": "gpu"}, "devices"),
    ({"model": "builtin:nope"}, "unknown builtin preset"),
    ({"colour": "blue"}, "colour: unknown key"),
    ({"devices": "cuda:0"}, "no CUDA device"),
    ({"tasks": [{"name": "a", "data": "a.jsonl", "steps": 2, "peft": {"method": "lora", "target_modules": ["q_proj"]}}]},
     "match no Linear/Conv1D op"),
]


@pytest.mark.parametrize("change,message", BAD_CONFIGS)
def test_bad_config_is_refused_cleanly(tmp_path, capsys, monkeypatch, change, message):
    config = small_config(tmp_path, **change)
    result = call(capsys, monkeypatch, tmp_path, "plan-and-run", str(config), "--no-progress")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and str(config) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() and not list(tmp_path.rglob(".*partial"))


def test_error_names_the_yaml_line(tmp_path):
    config = small_config(tmp_path)
    text = config.read_text().replace("r: 8", "r: -3")
    config.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "r: -3" in l)
    result = run_cli("plan-and-run", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{config}:{line}: tasks[1].peft.r" in result.stderr


@pytest.mark.parametrize("content,message", [
    ("name: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("", "expected a mapping"),
])
def test_malformed_yaml(tmp_path, capsys, monkeypatch, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    result = call(capsys, monkeypatch, tmp_path, "plan-and-run", str(path))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "x", "completion": ', "a.jsonl:3: not valid JSON"),
    ('["a list"]', "a.jsonl:3: expected a JSON object"),
    ('{"prompt": "x"}', "a.jsonl:3: missing 'completion'"),
    ('{"input": "x"}', "a.jsonl:3: expected a prompt_completion record (keys ['completion', 'prompt']), got keys ['input']"),
    ('{"text": "x"}', "a.jsonl:3: expected a prompt_completion record"),  # one format per file
    ('{"prompt": 5, "completion": "y"}', "a.jsonl:3: 'prompt' must be a string"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, capsys, monkeypatch, line, message):
    config = small_config(tmp_path)
    data = tmp_path / "a.jsonl"
    lines = data.read_text().splitlines()
    lines[2] = line
    data.write_text("\n".join(lines) + "\n")
    result = call(capsys, monkeypatch, tmp_path, "plan-and-run", str(config))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_missing_config_file(tmp_path):
    result = run_cli("plan-and-run", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "nope.yaml: no such config file" in result.stderr


def test_wheel_maps_every_folder_into_the_muxtune_package(repo, tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(repo)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("muxtune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("muxtune/spec.py", "muxtune/cli.py", "muxtune/executor/mux.py", "muxtune/executor/peft/lora.py",
                   "muxtune/planner/__init__.py", "muxtune/simulator/__init__.py", "muxtune/profiler/__init__.py",
                   "muxtune/kernels/__init__.py", "muxtune/service/api.py", "muxtune/service/worker.py"):
        assert module in names, module
    # no bare top-level packages that would shadow PyPI's `executor`, `kernels`, `profiler`, ...
    assert not [n for n in names if n.split("/")[0] in {"executor", "kernels", "profiler", "planner", "simulator"}]


def test_skipped_bad_lines_and_truncation_are_counted_in_the_metrics(tmp_path, capsys, monkeypatch):
    config = small_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write('{"prompt": "no completion here"}\n{not json\n')
        f.write(json.dumps({"prompt": "word " * 200, "completion": " end"}) + "\n")  # longer than max_seq_len
    raw["tasks"][0].update(on_bad_line="skip", truncation="truncate")
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = call(capsys, monkeypatch, tmp_path, "muxtune", "run", str(config), "--no-progress")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())["tasks"]["a"]["data"]
    assert data["skipped_bad_lines"] == 2 and data["first_bad_line"].startswith(str(tmp_path / "a.jsonl") + ":21:")
    assert data["truncated"] == 1 and data["lines"] == 23


def format_files(tmp_path) -> dict:
    """A file of each kind and record format, made to the format's public description (tests/format_samples.py)."""
    from format_samples import WRITERS, openai_records, to_sharegpt

    chat = openai_records(6)
    chat[1]["messages"][1]["weight"] = 0  # a turn not to train on
    sharegpt = [to_sharegpt(r) for r in openai_records(6)]
    prompts = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(8)]
    return {
        "openai": WRITERS["jsonl"](tmp_path / "openai.jsonl", chat),
        "sharegpt": WRITERS["jsonl"](tmp_path / "sharegpt.jsonl", sharegpt),
        "parquet": WRITERS["parquet"](tmp_path / "chat.parquet", chat),
        "csv": WRITERS["csv"](tmp_path / "sums.csv", prompts),
        "json": WRITERS["json"](tmp_path / "alpaca.json", [{"instruction": "Double.", "input": str(i),
                                                             "output": str(2 * i)} for i in range(8)]),
        "dataset": WRITERS["dataset"](tmp_path / "saved", sharegpt),
    }


def format_config(tmp_path, files: dict) -> Path:
    tasks = [{"name": name, "data": str(path), "peft": {"method": "lora", "r": 4, "target_modules": ["c_attn"]},
              "batch_size": 2, "max_seq_len": 128, "steps": 2, "seed": i}
             for i, (name, path) in enumerate(files.items())]
    path = tmp_path / "formats.yaml"
    path.write_text(yaml.safe_dump({"name": "formats", "model": "builtin:tiny-gpt2", "devices": "cpu",
                                    "checkpoint_every": 0, "tasks": tasks}, sort_keys=False))
    return path


def test_a_file_in_each_format_trains_and_validate_reports_each_file(tmp_path, capsys, monkeypatch):
    config = format_config(tmp_path, format_files(tmp_path))
    result = call(capsys, monkeypatch, tmp_path, "muxtune", "validate", str(config))
    assert result.returncode == 0, result.stderr
    for line in ("openai.jsonl: jsonl file, chat (OpenAI messages) format", "sharegpt.jsonl: jsonl file, sharegpt",
                 "chat.parquet: parquet file, chat (OpenAI messages) format", "sums.csv: csv file, prompt_completion",
                 "alpaca.json: json file, alpaca format", "saved: dataset file, sharegpt (conversations) format",
                 "6 records -> 6 examples", "lengths in tokens (before truncation) vs max_seq_len=128", "> 128 |"):
        assert line in result.stdout, line
    result = call(capsys, monkeypatch, tmp_path, "muxtune", "run", str(config), "--no-progress")
    assert result.returncode == 0, result.stderr
    tasks = json.loads((tmp_path / "runs" / "formats" / "metrics.json").read_text())["tasks"]
    sources = {"openai": ("chat", "jsonl"), "sharegpt": ("sharegpt", "jsonl"), "parquet": ("chat", "parquet"),
               "csv": ("prompt_completion", "csv"), "json": ("alpaca", "json"), "dataset": ("sharegpt", "dataset")}
    for name, (fmt, source) in sources.items():
        task = tasks[name]
        assert task["status"] == "finished" and task["steps"] == 2 and len(task["loss"]) == 2, name
        assert all(0 < loss < 20 for loss in task["loss"]), name
        assert (task["data"]["format"], task["data"]["source"]) == (fmt, source), name
        assert task["data"]["trainable_tokens"] > 0
    # the weight-0 turn (in openai.jsonl and chat.parquet) is not trained on; the ShareGPT copy has no weights
    assert tasks["openai"]["data"]["trainable_tokens"] < tasks["sharegpt"]["data"]["trainable_tokens"]
    assert tasks["openai"]["data"]["trainable_tokens"] == tasks["parquet"]["data"]["trainable_tokens"]


@pytest.mark.parametrize("kind,where", [("parquet", "chat.parquet: row 2: messages[1]"),
                                        ("dataset", "saved: row 2: messages[1]")])
def test_a_bad_row_is_refused_by_validate_and_run_with_file_row_and_field(tmp_path, capsys, monkeypatch, kind, where):
    from format_samples import WRITERS, openai_records

    records = openai_records(4)
    records[1]["messages"][1]["weight"] = 0.5
    path = WRITERS[kind](tmp_path / ("chat.parquet" if kind == "parquet" else "saved"), records)
    config = format_config(tmp_path, {"chat": path})
    monkeypatch.setenv("MUXTUNE_CACHE", str(tmp_path / "cache"))
    for command in ("validate", "run"):
        extra = ["--no-progress"] if command == "run" else []
        result = call(capsys, monkeypatch, tmp_path, "muxtune", command, str(config), *extra)
        assert result.returncode == 2, result.stderr
        assert where in result.stderr and "'weight' must be 0 or 1, got 0.5" in result.stderr
        assert "Traceback" not in result.stderr
    # nothing half-written: no run folder, no cache entry, no staging folder
    assert not (tmp_path / "runs").exists() and not list(tmp_path.rglob(".*partial"))
    assert not (tmp_path / "cache" / "data").exists() or not list((tmp_path / "cache" / "data").iterdir())
