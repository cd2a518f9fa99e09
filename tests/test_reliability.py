"""Multi-tenant reliability: resume after kill -9 without loss, one task's failure contained, tenants
joining and leaving mid-run, admission by predicted memory, bad checkpoints refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reference import adapter_state, write_jsonl
from safetensors.torch import load_file

from muxtune.cli import main
from muxtune.executor.backbone import load_backbone
from muxtune.executor.data import Example, load_examples
from muxtune.executor.trainer import MultiplexedTrainer
from muxtune.spec import Alignment, TaskSpec, load_config
from muxtune.run import execute

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data"


def write_config(path: Path, steps: int = 30, every: int = 3, extra: str = "") -> Path:
    path.write_text(f"""
name: rel
model: builtin:tiny-llama
checkpoint_every: {every}
{extra}
tasks:
  - name: sentiment
    data: {DATA / 'sentiment.jsonl'}
    peft: {{method: lora, r: 4, alpha: 8, dropout: 0.1}}
    batch_size: 4
    max_seq_len: 64
    lr: 1.0e-3
    steps: {steps}
    lr_schedule: linear
    warmup_steps: 2
  - name: qa
    data: {DATA / 'qa.jsonl'}
    peft: {{method: ia3}}
    batch_size: 2
    max_seq_len: 96
    lr: 3.0e-3
    steps: {max(2, steps - 2)}
    seed: 5
    lr_schedule: cosine
  - name: chat
    data: {DATA / 'chat.jsonl'}
    peft: {{method: prompt, num_virtual_tokens: 4}}
    batch_size: 3
    max_seq_len: 80
    lr: 1.0e-2
    steps: {steps + 4}
    seed: 9
""")
    return path


def adapters_of(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.name: load_file(str(p)) for p in sorted((run_dir / "adapters").glob("*/adapter_model.safetensors"))}


def assert_bit_equal_runs(run_dir: Path, ref_dir: Path) -> None:
    metrics, ref = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, ref_dir))
    for name, task in ref["tasks"].items():
        assert metrics["tasks"][name]["status"] == "finished"
        assert metrics["tasks"][name]["loss"] == task["loss"], name  # the whole curve, exactly
    adapters, ref_adapters = adapters_of(run_dir), adapters_of(ref_dir)
    assert set(adapters) == set(ref_adapters) == set(ref["tasks"])
    for name in ref_adapters:
        for key, value in ref_adapters[name].items():
            assert torch.equal(adapters[name][key], value), f"{name} {key}"


def test_kill_9_mid_run_then_resume_equals_uninterrupted_run(tmp_path):
    config = write_config(tmp_path / "rel.yaml", steps=40, every=3)
    execute(load_config(config), tmp_path / "ref", progress=False)  # single-threaded here (conftest)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "muxtune.cli", "run", str(config), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "checkpoints" / "manifest.json"
    deadline = time.time() + 300
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert manifest.exists(), proc.stderr.read().decode()
    saved = json.loads(manifest.read_text())["steps"]
    assert 3 <= saved < 44 and not (out / "metrics.json").exists()  # killed mid-run, after a checkpoint

    resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == saved
    assert_bit_equal_runs(out, tmp_path / "ref")


def test_resume_in_process_after_interrupt_equals_uninterrupted(tmp_path):
    """An exception mid-run (as Ctrl-C) leaves the last checkpoint; --resume finishes bit-equal."""
    config = write_config(tmp_path / "rel.yaml", steps=12, every=4)
    execute(load_config(config), tmp_path / "ref", progress=False)

    def interrupt_at_step_6(trainer):
        if len(trainer.step_times) == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute(load_config(config), tmp_path / "run", progress=False, after_step=interrupt_at_step_6)
    assert json.loads((tmp_path / "run/checkpoints/manifest.json").read_text())["steps"] == 4
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0
    assert_bit_equal_runs(tmp_path / "run", tmp_path / "ref")


def test_resume_refuses_other_model_changed_task_and_damaged_checkpoint(tmp_path, capsys):
    config = write_config(tmp_path / "rel.yaml", steps=4, every=2)
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()

    other = tmp_path / "other.yaml"
    other.write_text(config.read_text().replace("builtin:tiny-llama", "builtin:tiny-gpt2"))
    assert main(["run", str(other), "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "manifest.json: model:" in err and "tiny-gpt2" in err and "Traceback" not in err

    changed = tmp_path / "changed.yaml"
    changed.write_text(config.read_text().replace("r: 4,", "r: 8,"))
    assert main(["run", str(changed), "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "tasks.sentiment.peft" in capsys.readouterr().err

    # a checkpoint of another model's shapes under this task's name is refused naming file and key
    manifest_path = out / "checkpoints" / "manifest.json"
    folder = out / "checkpoints" / "sentiment" / json.loads(manifest_path.read_text())["tasks"]["sentiment"]["folder"]
    tensors = load_file(str(folder / "tensors.safetensors"))
    key = next(k for k in tensors if k.startswith("adapter.") and k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(4, 32)
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "tensors.safetensors"))
    assert main(["run", str(config), "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "tensors.safetensors" in err and key in err and "shape" in err

    assert main(["run", str(config), "--out", str(tmp_path / "fresh"), "--resume", "--no-progress"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert not (tmp_path / "fresh" / "metrics.json").exists()


# --- fault isolation --------------------------------------------------------------------------------


def isolation_specs(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", 40, seed=1, min_len=2, max_len=6)
    b = write_jsonl(tmp_path / "b.jsonl", 30, seed=2, min_len=8, max_len=20, kind="text")
    return [
        TaskSpec(name="a", data=a, peft=dict(method="lora", r=4, alpha=8, dropout=0.1), batch_size=4,
                 max_seq_len=64, lr=5e-3, steps=6, seed=11),
        TaskSpec(name="b", data=b, peft=dict(method="ia3"), batch_size=3, max_seq_len=96, lr=2e-3, steps=7, seed=12),
    ]


def train(specs, examples=None, groups=None):
    backbone = load_backbone("builtin:tiny-llama")
    examples = examples or {}
    for s in specs:
        examples.setdefault(s.name, load_examples(s.data, backbone.tokenizer, s.max_seq_len)[0])
    trainer = MultiplexedTrainer(backbone, specs, examples, groups=groups, alignment=Alignment(chunk_len=16))
    trainer.train(progress=False)
    return trainer


def assert_same_adapters(trainer, ref, names):
    for name in names:
        run, ref_run = trainer.runs[name], ref.runs[name]
        assert run.status == ref_run.status == "finished"
        torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(ref_run.losses), rtol=1e-5, atol=1e-6)
        state, ref_state = adapter_state(trainer, name), adapter_state(ref, name)
        for key in ref_state:  # the equivalence tests' bound: fused shapes differ, rounding only
            torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


def test_a_task_going_nan_fails_alone_and_the_others_are_unchanged(tmp_path):
    specs = isolation_specs(tmp_path)
    poisoned = TaskSpec(name="poison", data=specs[0].data, peft=dict(method="lora", r=4), batch_size=2,
                        max_seq_len=64, lr=3e37, steps=6, seed=3, max_grad_norm=None)
    with_poison = train(specs + [poisoned])
    alone = train(specs)
    run = with_poison.runs["poison"]
    assert run.status == "failed" and run.stopped_at == run.step + 1 and "non-finite" in run.reason
    assert 1 <= run.step < 6
    assert all(torch.isfinite(torch.tensor(run.losses)))  # the failed step's loss was never recorded
    assert_same_adapters(with_poison, alone, ["a", "b"])


def test_corrupt_example_mid_run_fails_its_task_or_is_skipped_by_policy(tmp_path):
    specs = isolation_specs(tmp_path)
    backbone = load_backbone("builtin:tiny-llama")
    good = load_examples(specs[0].data, backbone.tokenizer, 64)[0][:]
    corrupt = Example([1, 70000, 5], [-100, 70000, 5])  # a token id outside the vocabulary
    bad_spec = TaskSpec(name="bad", data=specs[0].data, peft=dict(method="lora", r=4), batch_size=4,
                        max_seq_len=64, steps=6, seed=4)
    examples = {s.name: load_examples(s.data, backbone.tokenizer, s.max_seq_len)[0] for s in specs}
    examples["bad"] = list(good)
    trainer = MultiplexedTrainer(backbone, specs + [bad_spec], examples, alignment=Alignment(chunk_len=16))
    trainer.step()
    examples["bad"][:] = [corrupt] * len(good)  # the task's data turns corrupt mid-run
    trainer.train(progress=False)
    run = trainer.runs["bad"]
    assert run.status == "failed" and run.step == 1 and run.stopped_at == 2
    assert "corrupt data" in run.reason and "outside the vocabulary" in run.reason
    assert_same_adapters(trainer, train(specs), ["a", "b"])

    skipping = bad_spec.model_copy(update={"on_bad_line": "skip"})
    data = list(good)
    data[::3] = [corrupt] * len(data[::3])
    trainer = train([skipping], examples={"bad": data})
    assert trainer.runs["bad"].status == "finished" and trainer.runs["bad"].bad_examples > 0


def test_failed_task_is_reported_in_metrics_and_report(tmp_path, capsys):
    config = write_config(tmp_path / "rel.yaml", steps=10, every=5)
    config.write_text(config.read_text().replace("lr: 1.0e-3", "lr: 3.0e+37\n    max_grad_norm: null"))
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "sentiment: failed: non-finite" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    bad = metrics["tasks"]["sentiment"]
    assert bad["status"] == "failed" and bad["stopped_at_step"] == bad["steps"] + 1 and "non-finite" in bad["reason"]
    assert metrics["tasks"]["qa"]["status"] == metrics["tasks"]["chat"]["status"] == "finished"
    report = (tmp_path / "run" / "report.html").read_text()
    assert "failed" in report and "non-finite" in report


# --- tenants come and go ----------------------------------------------------------------------------


def test_submit_and_cancel_mid_run_through_the_spool(tmp_path, capsys):
    config = write_config(tmp_path / "rel.yaml", steps=8, every=0)
    task = tmp_path / "late.yaml"
    task.write_text(f"name: late\ndata: {DATA / 'summarization.jsonl'}\npeft: {{method: lora, r: 4}}\n"
                    "batch_size: 2\nmax_seq_len: 128\nsteps: 5\nseed: 21\nlr: 2.0e-3\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\ndata: nowhere.jsonl\npeft: {method: lora}\n")
    out = tmp_path / "run"
    backbones = []

    typo = tmp_path / "typo.yaml"
    typo.write_text(f"name: typo\ndata: {DATA / 'qa.jsonl'}\npeft: {{method: lora}}\nbatchsize: 4\n")

    def tenants(trainer):
        backbones.append(id(trainer.model))
        if len(trainer.step_times) == 1:  # a bad task file is refused by `submit` itself, naming line and key
            assert main(["submit", str(out), str(typo)]) == 2
            assert f"{typo}:4: batchsize: unknown key" in capsys.readouterr().err
        if len(trainer.step_times) == 2:
            assert main(["submit", str(out), str(task)]) == 0
            assert main(["cancel", str(out), "qa"]) == 0
        if len(trainer.step_times) == 3:
            assert trainer.runs["late"].step == 1 and trainer.runs["qa"].status == "cancelled"

    assert main(["submit", str(out), str(broken)]) == 2  # no running job there yet
    assert "no running job" in capsys.readouterr().err
    metrics = execute(load_config(config), out, progress=False, after_step=tenants)
    assert len(set(backbones)) == 1
    assert metrics["tasks"]["late"]["status"] == "finished" and metrics["tasks"]["late"]["steps"] == 5
    assert metrics["tasks"]["qa"]["status"] == "cancelled" and metrics["tasks"]["qa"]["steps"] == 2
    assert [e["event"] for e in metrics["events"]] == ["submitted", "cancelled"]
    assert (out / "adapters" / "late" / "adapter_model.safetensors").is_file()

    # the late task equals training it alone; the others are unchanged by its arrival
    late = load_task_spec(task)
    alone = train([late])
    got = adapters_of(out)["late"]
    ref = alone.runs["late"].adapter.export_state()
    torch.testing.assert_close(torch.tensor(metrics["tasks"]["late"]["loss"]), torch.tensor(alone.runs["late"].losses),
                               rtol=1e-5, atol=1e-6)
    for key, value in ref.items():
        torch.testing.assert_close(got[key], value.detach(), rtol=1e-4, atol=1e-6, msg=key)


def load_task_spec(path):
    from muxtune.spec import load_task

    return load_task(path)


def test_submission_with_bad_data_or_too_big_is_rejected_and_the_run_goes_on(tmp_path):
    config = write_config(tmp_path / "rel.yaml", steps=5, every=0, extra="memory_limit_gib: 0.5")
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: bad\ndata: {bad_data}\npeft: {{method: lora}}\nsteps: 50\n")
    huge = tmp_path / "huge.yaml"
    huge.write_text(f"name: huge\ndata: {DATA / 'qa.jsonl'}\npeft: {{method: lora}}\nsteps: 50\nbatch_size: 100000\n"
                    "max_seq_len: 100000\n")
    out = tmp_path / "run"

    def submit(trainer):
        if len(trainer.step_times) == 1:
            assert main(["submit", str(out), str(bad)]) == 0
            assert main(["submit", str(out), str(huge)]) == 0

    metrics = execute(load_config(config), out, progress=False, after_step=submit)
    rejected = {e["task"]: e["reason"] for e in metrics["events"] if e["event"] == "rejected"}
    assert set(rejected) == {"bad", "huge"}
    assert "bad.jsonl:2" in rejected["bad"]
    assert "predicted not to fit" in rejected["huge"] and "B available" in rejected["huge"]
    assert all(t["status"] == "finished" for t in metrics["tasks"].values()) and set(metrics["tasks"]) == {
        "sentiment", "qa", "chat"}


# --- admission ----------------------------------------------------------------------------------------


def test_plan_predicted_not_to_fit_is_refused_up_front_with_numbers(tmp_path, capsys):
    config = write_config(tmp_path / "rel.yaml", steps=3, every=0, extra="memory_limit_gib: 0.001")
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "predicted not to fit" in err and "MiB available" in err and "needs ~" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written

    from muxtune.admission import estimate
    from muxtune.executor.backbone import load_backbone as load

    backbone = load("builtin:tiny-llama")
    spec = load_config(write_config(tmp_path / "ok.yaml")).tasks[0]
    one = estimate(backbone.model, [spec], [[spec.name]], Alignment(), 0)
    bigger = spec.model_copy(update={"batch_size": spec.batch_size * 2})
    two = estimate(backbone.model, [bigger], [[spec.name]], Alignment(), 0)
    assert two.activations == 2 * one.activations > 0 and one.adapters[spec.name] > 0


def test_admission_is_the_cost_models_memory_model_per_device(tmp_path):
    """One source of truth: admission's numbers are the CostModel's memory methods for the executor's
    micro-batches; a pipeline is admitted per stage (each holds its layers, its adapters, its 1F1B's
    micro-batches in flight) and a refusal names each device over its memory, with its numbers."""
    from muxtune.admission import cost_model_of, estimate, per_device, plan_estimates
    from muxtune.errors import MuxTuneError
    from muxtune.profiler.cost_model import MicroBatch, TaskLoad
    from muxtune.simulator.workload import count_trainable_params, method_rank
    from muxtune.spec import FusionGroup, Layout, Plan

    backbone = load_backbone("builtin:tiny-llama")
    model = backbone.model
    specs = load_config(write_config(tmp_path / "ok.yaml")).tasks  # lora, ia3, prompt (4 virtual tokens)
    names = [s.name for s in specs]
    cm = cost_model_of(model)
    n = cm.shape.n_layers
    params = {s.name: count_trainable_params(s, model) for s in specs}
    virtual = {"prompt": 4}
    mb = MicroBatch(tuple(TaskLoad(s.peft.method, method_rank(s.peft), s.batch_size * (s.max_seq_len + virtual.get(
        s.peft.method, 0)), params[s.name]) for s in specs), seq_len=16)
    one = estimate(model, specs, [names], Alignment(), 0)
    assert one.backbone == cm.backbone_bytes(n, True, True) == sum(
        p.numel() * p.element_size() for p in model.parameters())
    assert one.adapters == {name: cm.task_state_bytes(params[name]) for name in names}
    assert one.activations == cm.activation_bytes(mb, n) + cm.head_bytes(mb.tokens)

    # two stages, two micro-batches: the stages split the backbone and the adapters between them
    plan = Plan(groups=[FusionGroup(tasks=names, devices=["cpu"] * 2, layout=Layout(pp=2), micro_batches=2)])
    stages = plan_estimates(model, specs, plan)
    assert [s.backbone for s in stages] == [cm.backbone_bytes(1, True, False), cm.backbone_bytes(1, False, True)]
    for name in names:
        assert sum(s.adapters[name] for s in stages) == one.adapters[name]
    assert stages[1].adapters["chat"] == 0 < stages[0].adapters["chat"]  # prompt tuning: the first stage
    # stage 0 holds both micro-batches' activations of its layer in flight, the last stage one + the head
    first, second = (MicroBatch(tuple(TaskLoad(s.peft.method, method_rank(s.peft), (s.batch_size + 1 - k) // 2 * (
        s.max_seq_len + virtual.get(s.peft.method, 0)), params[s.name]) for s in specs), 16) for k in (0, 1))
    assert first.tokens > second.tokens  # odd batch sizes: the first micro-batch takes the extra sequence
    assert stages[0].activations == cm.activation_bytes(first, 1) + cm.activation_bytes(second, 1)
    assert stages[1].activations == cm.activation_bytes(first, 1) + cm.head_bytes(first.tokens)

    # per device: two GPUs, only the second over; the same stages sharing one CPU are summed against it
    reports = [{"rank": 0, "device": "h:cuda:0", "free": stages[0].needed, "loaded": 0},
               {"rank": 1, "device": "h:cuda:1", "free": stages[1].needed - 1, "loaded": 0}]
    with pytest.raises(MuxTuneError) as refused:
        per_device(stages, reports, None)
    message = str(refused.value)
    assert "h:cuda:1 (rank 1): needs ~" in message and "h:cuda:0" not in message and "available" in message
    shared = [{"rank": r, "device": "h:cpu", "free": 10**12, "loaded": 0} for r in (0, 1)]
    assert per_device(stages, shared, None)["h:cpu"].needed == stages[0].needed + stages[1].needed
    with pytest.raises(MuxTuneError, match=r"h:cpu \(ranks 0, 1\): needs ~"):
        per_device(stages, shared, limit_gib=(stages[0].needed + stages[1].needed - 1) / 2**30)


@pytest.mark.parametrize("layout", [dict(pp=2), dict(tp=2), dict(dp=2, pp=2)])
def test_admission_and_the_simulator_predict_the_same_memory_per_device(tmp_path, layout):
    """One memory model: admission's estimate of each process and the simulator's peak of its device are
    both CostModel.peak_bytes, so they agree byte for byte (a tensor rank holds its shard in both)."""
    from muxtune.admission import cost_model_of, plan_estimates
    from muxtune.profiler.cost_model import hardware
    from muxtune.simulator.iteration import simulate_step
    from muxtune.simulator.workload import count_trainable_params, task_work
    from muxtune.spec import FusionGroup, Layout, Plan

    model = load_backbone("builtin:tiny-llama").model
    specs = [TaskSpec(name=n, data="x.jsonl", peft={"method": "lora", "r": r, "target_modules": ["q_proj", "o_proj"]},
                      batch_size=b, max_seq_len=16, steps=1) for n, r, b in (("a", 4, 4), ("b", 8, 2))]
    cm = cost_model_of(model)
    cm.hw = hardware("h100")  # the simulator prices time too: the catalog's H100, memory as loaded
    lay = Layout(**layout)
    devices = [f"d{i}" for i in range(lay.dp * lay.pp * lay.tp)]
    plan = Plan(groups=[FusionGroup(tasks=["a", "b"], devices=devices, layout=lay, micro_batches=2)],
                alignment=Alignment(layout="padded"))
    works = {s.name: task_work(s, count_trainable_params(s, model)) for s in specs}
    peaks = simulate_step(plan, works, cm).peak_memory
    estimates = plan_estimates(model, specs, plan, cm)
    assert [e.needed for e in estimates] == [peaks[d] for d in devices]
    if lay.tp > 1:  # a tensor rank holds less than its whole stage
        assert estimates[0].backbone < cm.backbone_bytes(cm.shape.n_layers, True, True)
