"""plan-and-run end to end, `muxtune simulate` / `muxtune report`, and the report as a browser shows it."""

import base64
import html
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from test_cli import call, small_config

FIGURES = ["plans", "steps", "gantt", "memory", "loss", "throughput", "ineffective"]
PNGS = ["plans.png", "step_times.png", "gantt.png", "memory.png", "loss_curves.png", "throughput.png",
        "ineffective_tokens.png"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One plan-and-run of a two-task tiny-gpt2 config (shipped profile of this CPU, in process)."""
    import torch

    from muxtune.run import plan_and_run
    from muxtune.spec import load_config

    tmp = tmp_path_factory.mktemp("run")
    config = load_config(small_config(tmp))
    profile = next((Path(__file__).resolve().parent.parent / "profiles").glob("cpu-*-tiny-gpt2.csv"))
    torch.set_num_threads(1)
    prediction, metrics = plan_and_run(config, tmp / "out", profile=str(profile), progress=False)
    return tmp / "out", prediction, metrics


def test_plan_and_run_writes_every_output(trained_run):
    run, prediction, metrics = trained_run
    for name in ["plan.json", "plans.csv", "simulation.csv", "memory.csv", "prediction.json", "metrics.json",
                 "report.html", *PNGS]:
        assert (run / name).is_file(), name
    for task in ("a", "b"):
        assert (run / "adapters" / task / "adapter_config.json").is_file()
    plans = pd.read_csv(run / "plans.csv")
    assert list(plans["plan"]) == ["muxtune", "dedicated", "spatial", "temporal"]
    assert (plans["step_s"] > 0).all() and (plans["tokens_per_s"] > 0).all()
    # the chosen plan is what ran, and it is what plan.json says
    assert json.loads((run / "plan.json").read_text())["groups"][0]["tasks"] == ["a", "b"]
    events = pd.read_csv(run / "simulation.csv")
    assert {"fwd", "bwd", "optim"} <= set(events["kind"]) and events["end"].max() == pytest.approx(
        prediction.info["step_s"])
    memory = pd.read_csv(run / "memory.csv")
    assert list(memory.columns) == ["device", "backbone", "adapters", "optimizer", "activations"]
    assert (memory[["backbone", "adapters", "optimizer", "activations"]] > 0).all().all()
    # exact adapter sizes: 16 bytes of state per trainable parameter (weights, grads, two moments)
    params = sum(t["trainable_params"] for t in metrics["tasks"].values())
    assert int(memory["adapters"].sum() + memory["optimizer"].sum()) == 16 * params


def test_report_has_every_section_and_figure(trained_run):
    run, prediction, metrics = trained_run
    page = (run / "report.html").read_text()
    for key in FIGURES:
        assert f'id="fig-{key}"' in page, key
    images = page.split('src="data:image/png;base64,')[1:]
    assert len(images) == len(FIGURES)
    for image in images:
        assert base64.b64decode(image.split('"')[0])[:8] == b"\x89PNG\r\n\x1a\n"
    for heading in ["Plan (", "MuxTune vs baselines", "Predicted vs measured", "Simulated timeline",
                    "Memory per device", "Tasks", "Ineffective tokens", "Failed or cancelled tasks"]:
        assert heading in page, heading
    assert "dedicated" in page and "temporal" in page and html.escape(prediction.info["why"]) in page
    # the planner's explanation: one list item per line, never run together
    lines = prediction.plans["muxtune"].explanation.splitlines()
    assert len(lines) >= 5 and all(f"<li>{html.escape(line)}</li>" in page for line in lines)


def test_report_rerenders_from_the_run_folder(trained_run, tmp_path, capsys, monkeypatch):
    run, _, _ = trained_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    for png in PNGS:
        (copy / png).unlink()
    (copy / "report.html").unlink()
    result = call(capsys, monkeypatch, tmp_path, "muxtune", "report", str(copy))
    assert result.returncode == 0, result.stderr
    assert "report.html" in result.stdout and all((copy / png).is_file() for png in PNGS)
    result = call(capsys, monkeypatch, tmp_path, "muxtune", "report", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "not a run folder" in result.stderr and "Traceback" not in result.stderr


def test_dry_run_plans_hardware_that_is_not_here(tmp_path, capsys, monkeypatch):
    config = small_config(tmp_path)
    result = call(capsys, monkeypatch, tmp_path, "muxtune", "simulate", str(config), "--hardware", "h100",
                  "--gpus", "16", "--no-progress")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "tiny"
    assert not (run / "metrics.json").exists() and not (run / "adapters").exists()
    plans = pd.read_csv(run / "plans.csv").set_index("plan")
    # the baselines spread over the 16 GPUs; the planner may use fewer (two tiny tasks need no pipeline)
    assert (plans.loc[["dedicated", "spatial", "temporal"], "devices"] == 16).all()
    assert 1 <= plans.loc["muxtune", "devices"] <= 16
    assert json.loads((run / "prediction.json").read_text())["cost_model"] == "analytic h100"
    # dedicated: each of the two tasks gets its own 8 GPUs
    dedicated = json.loads((run / "plans" / "dedicated.json").read_text())
    assert [g["tasks"] for g in dedicated["groups"]] == [["a"], ["b"]]
    assert len(set(dedicated["groups"][0]["devices"]) & set(dedicated["groups"][1]["devices"])) == 0
    page = (run / "report.html").read_text()
    assert "Dry run" in page and "MuxTune run <code>tiny</code>" in page and 'id="fig-gantt"' in page and 'id="fig-loss"' not in page
    # plan-and-run: --hardware needs --dry-run
    result = call(capsys, monkeypatch, tmp_path, "plan-and-run", str(config), "--hardware", "h100", "--no-progress")
    assert result.returncode == 2 and "--dry-run" in result.stderr


def test_dry_run_compares_the_planners_own_baselines_over_the_whole_job(tmp_path):
    """plans.csv holds the planner's plan and baselines with the planner's own figures (same tasks, cost
    model and simulator), job throughput = the job's tokens / makespan, and the plan never behind one.
    (tiny-llama on H100s is latency-bound: a step takes about as long alone as fused, so no plan can end
    the job before its longest task alone would, and a GPU per task ties; the 7B case in test_planner.py
    is where the plan must lead.)"""
    from muxtune.planner.plan import plan
    from muxtune.profiler.cost_model import CostModel, ModelShape
    from muxtune.run import model_config, plan_and_run
    from muxtune.spec import Cluster, load_config

    config = load_config(Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml")
    prediction, metrics = plan_and_run(config, tmp_path / "dry", dry_run=True, hardware="h100", gpus=4,
                                       progress=False)
    assert metrics is None
    table = prediction.comparison.set_index("plan")
    assert list(table.index) == ["muxtune", "dedicated", "spatial", "temporal"]
    job_tokens = sum(t.batch_size * t.max_seq_len * t.steps for t in config.tasks)
    assert prediction.info["job_tokens"] == job_tokens
    for name, row in table.iterrows():
        assert row["tokens_per_s"] == pytest.approx(job_tokens / row["makespan_s"], rel=1e-9), name
        if name != "muxtune":
            assert table.loc["muxtune", "tokens_per_s"] >= row["tokens_per_s"], name
    cost_model = CostModel.analytic("h100", ModelShape.from_config(model_config(config.model)))
    result = plan(config.tasks, Cluster(devices=4, memory_gib=cost_model.hw["memory_gb"] * 1e9 / 2**30,
                                        hardware="h100"), cost_model)
    mine = result.table.assign(plan=lambda t: t["planner"]).set_index("plan")
    for name in table.index:
        assert table.loc[name, "tokens_per_s"] == pytest.approx(mine.loc[name, "tokens_per_s"], rel=1e-9), name
        assert table.loc[name, "makespan_s"] == pytest.approx(mine.loc[name, "makespan_s"], rel=1e-9), name
    assert "x the best baseline (dedicated" in prediction.info["why"]


def test_every_subcommand_has_help(capsys):
    from muxtune import cli

    for argv in (["run", "--help"], ["simulate", "--help"], ["report", "--help"], ["plan", "--help"],
                 ["profile", "--help"], ["validate", "--help"], ["submit", "--help"], ["cancel", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        words = " ".join(out.split())  # argparse wraps lines
        # a description of what the command does, an example and the exit codes, each argument explained
        assert "example: muxtune " + argv[0] in words and "exit codes: 0 ok; 2 bad input" in words, argv
        assert "\n  config\n" not in out and "\n  task_file\n" not in out and "\n  task\n" not in out, argv
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    with pytest.raises(SystemExit):
        cli.plan_and_run_main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes" in out and "--dry-run" in out and "--hardware" in out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-probe', imgs.map(i => i.id || i.parentElement.id + ':' + i.naturalWidth).join(','));
});</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(trained_run, tmp_path):
    """A browser loads every embedded figure (naturalWidth > 0) and the page screenshot is not blank."""
    run, _, _ = trained_run
    page = tmp_path / "probe.html"
    page.write_text((run / "report.html").read_text().replace("</body>", PROBE))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    probe = dom.split('data-probe="')[1].split('"')[0].split(",")
    widths = {entry.split(":")[0]: int(entry.split(":")[1]) for entry in probe}
    assert set(widths) == {f"fig-{k}" for k in FIGURES}
    assert all(w > 100 for w in widths.values()), widths
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1000,3000", f"--screenshot={shot}",
                    (run / "report.html").as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    pixels = Image.open(shot).convert("L")
    assert pixels.size == (1000, 3000) and pixels.getextrema()[0] < 100  # dark plot lines and text, not blank


@pytest.mark.parametrize("args,message", [(["--hardware", "tpu"], "not in the catalog"),
                                          (["--hardware", "h100", "--gpus", "0"], "--gpus: need at least 1")])
def test_simulate_refuses_bad_hardware_cleanly(tmp_path, capsys, monkeypatch, args, message):
    config = small_config(tmp_path)
    result = call(capsys, monkeypatch, tmp_path, "muxtune", "simulate", str(config), *args, "--no-progress")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_validating_run_shows_a_step_with_evaluations_beside_the_plain_step(tmp_path, capsys, monkeypatch):
    """simulation.csv holds the plain step and the first step after which tasks are evaluated (column
    `timeline`); the latter's `eval` events are the evaluation forwards, priced by the cost model; the
    report draws both timelines."""
    config = small_config(tmp_path)
    raw = __import__("yaml").safe_load(config.read_text())
    raw["tasks"][0].update(validation_split=0.2, eval_every=2)  # a: evaluated after steps 2 and 3
    config.write_text(__import__("yaml").safe_dump(raw, sort_keys=False))
    result = call(capsys, monkeypatch, tmp_path, "muxtune", "simulate", str(config), "--hardware", "h100",
                  "--gpus", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "tiny"
    events = pd.read_csv(run / "simulation.csv")
    prediction = json.loads((run / "prediction.json").read_text())
    step, evaluated = (events[events["timeline"] == t] for t in ("step", "evaluation step"))
    assert "eval" not in set(step["kind"]) and step["end"].max() == pytest.approx(prediction["step_s"])
    forwards = evaluated[evaluated["kind"] == "eval"]
    at = prediction["evaluation_step"]
    assert at["after_step"] == 2 and at["tasks"] == ["a"] and len(forwards) >= 1
    assert (forwards["start"] >= evaluated[evaluated["kind"] != "eval"]["end"].max() - 1e-12).all()
    assert float((forwards["end"] - forwards["start"]).sum()) == pytest.approx(at["evaluation_s"])
    assert at["evaluation_s"] > 0 and evaluated["end"].max() == pytest.approx(at["step_s"])

    # the price is the cost model's: a's 4 held-out sequences, forward only, in the plan's token budget
    from muxtune.profiler.cost_model import CostModel, ModelShape
    from muxtune.run import model_config, task_works, with_step_counts
    from muxtune.simulator.workload import evaluation_micro_batches
    from muxtune.spec import Plan, load_config

    loaded = with_step_counts(load_config(config), None)
    cm = CostModel.analytic("h100", ModelShape.from_config(model_config(loaded.model)))
    works = task_works(loaded, cm)
    assert works["a"].eval_sequences == 4
    plan = Plan.load(run / "plan.json")
    mbs = evaluation_micro_batches([works["a"]], plan.alignment.token_budget)
    assert at["evaluation_s"] == pytest.approx(cm.evaluation_seconds(mbs), rel=1e-9)

    page = (run / "report.html").read_text()
    assert 'id="fig-gantt"' in page and 'id="fig-gantt_eval"' in page and (run / "gantt_eval.png").is_file()
    assert "Simulated timeline of a step with evaluations" in page
