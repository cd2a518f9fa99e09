"""Reliability of multi-process plans (gloo, 2 processes, tiny preset): a 2-stage pipeline run, and a
2-replica data-parallel one, killed with SIGKILL (the launcher and its workers) and resumed end with the
same losses and adapters as an uninterrupted one; a checkpoint is refused under another layout or model; a task going NaN in a
pipeline is stopped alone."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from reference import write_jsonl
from safetensors.torch import load_file

from muxtune.cli import main
from muxtune.errors import MuxTuneError
from muxtune.spec import Alignment, FusionGroup, Layout, Plan, RunConfig, TaskSpec

MODEL = "builtin:tiny-llama"
STEPS = 12


def specs_in(folder):
    a = write_jsonl(folder / "a.jsonl", 40, seed=1, min_len=2, max_len=6)
    b = write_jsonl(folder / "b.jsonl", 30, seed=2, min_len=8, max_len=20, kind="text")
    return [
        # dropout: each process draws its masks from its own stream, which the checkpoint keeps per rank
        TaskSpec(name="lora", data=a, peft=dict(method="lora", r=4, alpha=8, dropout=0.1), batch_size=4,
                 max_seq_len=64, lr=5e-3, steps=STEPS, seed=11, lr_schedule="linear", warmup_steps=2),
        TaskSpec(name="ia3", data=b, peft=dict(method="ia3"), batch_size=3, max_seq_len=96, lr=2e-3,
                 steps=STEPS - 2, seed=12, max_grad_norm=0.5),
        # prompt tuning's virtual tokens live on the first stage only
        TaskSpec(name="prompt", data=b, peft=dict(method="prompt", num_virtual_tokens=3), batch_size=2,
                 max_seq_len=96, lr=1e-2, steps=STEPS + 2, seed=13),
    ]


def write_job(folder, specs, groups, layout=Layout(pp=2), every=2, model=MODEL, **settings):
    config = RunConfig(name="job", model=model, tasks=specs, checkpoint_every=every, **settings)
    (folder / "run.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    plan = Plan(groups=[FusionGroup(tasks=g, devices=["cpu"] * (layout.dp * layout.pp), layout=layout,
                                    micro_batches=2) for g in groups],
                schedule="interleaved", alignment=Alignment(chunk_len=16))
    plan.save(folder / "plan.json")
    return folder / "run.yaml", folder / "plan.json"


GROUPS = [["lora", "prompt"], ["ia3"]]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs of the three tasks, one per layout, made once."""
    made = {}

    def of(layout):
        key = (layout.dp, layout.pp)
        if key not in made:
            folder = made[key] = tmp_path_factory.mktemp(f"ref-dp{layout.dp}-pp{layout.pp}")
            config, plan = write_job(folder, specs_in(folder), GROUPS, layout=layout)
            assert main(["run", str(config), "--plan", str(plan), "--out", str(folder / "out"),
                         "--no-progress"]) == 0
        return made[key]
    return of


@pytest.fixture(scope="module")
def reference(references):
    return references(Layout(pp=2))


def metrics_of(out):
    return json.loads((out / "metrics.json").read_text())


def adapters_of(out):
    return {p.parent.name: load_file(str(p)) for p in (out / "adapters").glob("*/adapter_model.safetensors")}


@pytest.mark.parametrize("layout", [Layout(pp=2), Layout(dp=2)], ids=["pipeline", "data-parallel"])
def test_killed_mid_run_resumes_to_the_same_losses_and_adapters(references, layout, tmp_path):
    reference = references(layout)
    config, plan = write_job(tmp_path, specs_in(tmp_path), GROUPS, layout=layout)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "muxtune.cli", "run", str(config), "--plan", str(plan), "--out", str(out),
               "--no-progress"]
    # its own session: SIGKILL reaches the launcher and both workers at once, as a lost machine would
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    manifest = out / "checkpoints" / "manifest.json"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if manifest.exists() and json.loads(manifest.read_text())["steps"] >= 4:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert manifest.exists(), proc.stderr.read().decode()
    saved = json.loads(manifest.read_text())
    assert 4 <= saved["steps"] < STEPS + 2 and not (out / "metrics.json").exists()  # killed mid-run
    assert saved["plan"]["layout"]["pp"] == layout.pp and set(saved["ranks"]) == {"0", "1"}
    # each task folder holds the whole adapter (both stages' layers, merged) and each process's dropout stream
    lora = saved["tasks"]["lora"]["folder"]
    tensors = load_file(str(out / "checkpoints" / "lora" / lora / "tensors.safetensors"))
    assert {"rank0.rng.dropout", "rank1.rng.dropout"} <= set(tensors)
    assert any("__layers__0__" in k for k in tensors) and any("__layers__1__" in k for k in tensors)

    assert main(["run", str(config), "--plan", str(plan), "--out", str(out), "--resume", "--no-progress"]) == 0
    metrics, ref = metrics_of(out), metrics_of(reference / "out")
    assert metrics["resumed_from_step"] == saved["steps"]
    for name, task in ref["tasks"].items():
        assert metrics["tasks"][name]["status"] == "finished"
        assert metrics["tasks"][name]["loss"] == task["loss"], name  # the whole curve, exactly
        assert metrics["tasks"][name]["tokens"] == task["tokens"]
    assert metrics["distributed"]["step_tokens"] == ref["distributed"]["step_tokens"]
    adapters, ref_adapters = adapters_of(out), adapters_of(reference / "out")
    assert set(adapters) == set(ref_adapters) == {"lora", "ia3", "prompt"}
    for name, state in ref_adapters.items():
        for key, value in state.items():
            assert torch.equal(adapters[name][key], value), f"{name} {key}"


def test_resume_refuses_another_layout_another_model_and_one_process(reference, tmp_path, capsys):
    out = reference / "out"  # its final checkpoint stays with the outputs
    config = reference / "run.yaml"
    _, dp_plan = write_job(tmp_path, specs_in(reference), GROUPS, layout=Layout(dp=2))
    assert main(["run", str(config), "--plan", str(dp_plan), "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "manifest.json: plan.layout.dp" in err and "dp=1" in err and "Traceback" not in err

    regrouped = tmp_path / "regrouped"
    regrouped.mkdir()
    _, other_groups = write_job(regrouped, specs_in(reference), [["lora"], ["prompt", "ia3"]])
    assert main(["run", str(config), "--plan", str(other_groups), "--out", str(out), "--resume",
                 "--no-progress"]) == 2
    assert "manifest.json: groups" in capsys.readouterr().err

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    other_model, plan = write_job(gpt2, specs_in(reference), GROUPS, model="builtin:tiny-gpt2")
    assert main(["run", str(other_model), "--plan", str(plan), "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "manifest.json: model:" in capsys.readouterr().err

    # without the plan: the one-process executor refuses the 2-stage checkpoint
    assert main(["run", str(config), "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "plan.layout.pp" in capsys.readouterr().err
    assert metrics_of(out)["resumed_from_step"] is None  # the refused resumes changed nothing


def test_a_task_going_nan_in_a_pipeline_fails_alone(reference, tmp_path):
    specs = specs_in(tmp_path)
    poison = TaskSpec(name="poison", data=specs[0].data, peft=dict(method="lora", r=4), batch_size=2,
                      max_seq_len=64, lr=3e37, steps=6, seed=3, max_grad_norm=None)
    config, plan = write_job(tmp_path, specs + [poison], [["lora", "prompt", "poison"], ["ia3"]], every=0)
    assert main(["run", str(config), "--plan", str(plan), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    metrics, ref = metrics_of(tmp_path / "out"), metrics_of(reference / "out")
    bad = metrics["tasks"]["poison"]
    assert bad["status"] == "failed" and "non-finite" in bad["reason"] and bad["stopped_at_step"] == bad["steps"] + 1
    assert 1 <= bad["steps"] < 6 and all(torch.isfinite(torch.tensor(bad["loss"])))
    adapters, ref_adapters = adapters_of(tmp_path / "out"), adapters_of(reference / "out")
    for name, task in ref["tasks"].items():
        assert metrics["tasks"][name]["status"] == "finished"
        # the fused shapes differ (the poisoned rows are there until it fails): rounding only, the
        # equivalence tests' bound
        torch.testing.assert_close(torch.tensor(metrics["tasks"][name]["loss"]), torch.tensor(task["loss"]),
                                   rtol=1e-5, atol=1e-6)
        for key, value in ref_adapters[name].items():
            torch.testing.assert_close(adapters[name][key], value, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


def test_a_pipeline_over_its_device_memory_is_refused_per_device(tmp_path, capsys):
    """Both stages share this machine's memory: their estimates are summed against it and the refusal
    names the device, its ranks and the numbers, before any training or output."""
    config, plan = write_job(tmp_path, specs_in(tmp_path), GROUPS, memory_limit_gib=0.001)
    out = tmp_path / "out"
    assert main(["run", str(config), "--plan", str(plan), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "predicted not to fit" in err and ":cpu (ranks 0, 1): needs ~" in err and "1.0 MiB available" in err
    assert "Traceback" not in err and not (out / "metrics.json").exists()


# --- tenants come and go in a multi-process run ------------------------------------------------------
#
# `tenants` runs on rank 0 of the spawned processes at every step boundary, before the spool is read (it
# is pickled to them: a module-level function), and submits / cancels through the real CLI, so the
# timing is fixed: the late task joins after step 3, ia3 leaves after step 5.

LATE_STEPS = 5


def late_task_files(folder):
    # DoRA: its magnitude is initialised from the frozen weights, which each stage holds for its own
    # layers only by the time the task joins
    late = folder / "late.yaml"
    late.write_text(f"name: late\ndata: {folder / 'a.jsonl'}\npeft: {{method: dora, r: 4, alpha: 8}}\n"
                    f"batch_size: 3\nmax_seq_len: 64\nsteps: {LATE_STEPS}\nseed: 21\nlr: 3.0e-3\n")
    huge = folder / "huge.yaml"  # ~1.2 GiB predicted on the CPU, over the job's 0.25: rejected, the run goes on
    huge.write_text(f"name: huge\ndata: {folder / 'a.jsonl'}\npeft: {{method: lora}}\nsteps: 50\nbatch_size: 64\n"
                    "max_seq_len: 100000\n")
    return late, huge


@pytest.mark.parametrize("peft", [dict(method="lora", r=4), dict(method="dora", r=4), dict(method="ia3"),
                                  dict(method="bitfit"), dict(method="adapter", size=8),
                                  dict(method="prompt", num_virtual_tokens=3)], ids=lambda p: p["method"])
def test_a_task_joining_a_pipeline_stage_gets_the_init_it_would_get_alone(peft, tmp_path):
    """No processes: an adapter built after a stage dropped the other stages' layers (to the meta
    device) holds, for this stage's own layers, exactly the tensors of one built on the full model."""
    from muxtune.executor.backbone import load_backbone
    from muxtune.executor.mux import TaskAdapter
    from muxtune.executor.pipeline import free_other_stages, stage_parts

    full = load_backbone(MODEL).model
    compared = 0
    for stage, layers in enumerate([range(0, 1), range(1, 2)]):  # tiny-llama: 2 layers, one per stage
        model = load_backbone(MODEL).model
        free_other_stages(model, stage_parts(model), layers, first=stage == 0, last=stage == 1)
        spec = TaskSpec(name="late", data=str(tmp_path / "x.jsonl"), peft=peft, seed=21, steps=50)
        alone = TaskAdapter("late", spec.peft, full, spec.seed, spec.max_seq_len, "cpu").state_dict()
        joined = TaskAdapter("late", spec.peft, model, spec.seed, spec.max_seq_len, "cpu").state_dict()
        assert set(joined) == set(alone) and all(not v.is_meta for v in joined.values())
        own = [k for k in alone if f"layers__{layers[0]}__" in k or (k.startswith("sequence.") and stage == 0)]
        for key in own:
            assert torch.equal(joined[key], alone[key]), key
        compared += len(own)
    assert compared == len(alone)  # every tensor is some stage's own


def tenants(out, late, huge, crash_at, trainer):
    step = len(trainer.step_times)
    if step == 3:
        assert main(["submit", out, late]) == 0
        assert main(["submit", out, huge]) == 0
    if step == 4:  # answered at step 3's boundary, beside the submission
        assert "predicted not to fit" in (Path(out) / "spool" / "huge.rejected").read_text()
        assert trainer.runs["late"].step == 1 and "huge" not in trainer.runs
    if step == 5:
        assert main(["cancel", out, "ia3"]) == 0
    if step == crash_at:  # raised inside the spool's collective: every process stops with this message
        raise MuxTuneError(f"simulated crash after step {step}")


def run_with_tenants(folder, layout, crash_at=None, resume=False):
    from muxtune.run import execute
    from muxtune.spec import load_config

    if not resume:
        write_job(folder, specs_in(folder), GROUPS, layout=layout, memory_limit_gib=0.25)
    late, huge = late_task_files(folder)
    out = folder / "out"
    hook = functools.partial(tenants, str(out), str(late), str(huge), crash_at)
    return execute(load_config(folder / "run.yaml"), out, plan=Plan.load(folder / "plan.json"), progress=False,
                   resume=resume, after_step=hook)


@pytest.fixture(scope="module")
def with_tenants(tmp_path_factory):
    """Runs where a task joins after step 3 and one leaves after step 5, one per layout, made once."""
    made = {}

    def of(layout):
        key = (layout.dp, layout.pp)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tenants-dp{layout.dp}-pp{layout.pp}")
            made[key] = (folder, run_with_tenants(folder, layout))
        return made[key]
    return of


def train_alone(spec):
    from muxtune.executor.backbone import load_backbone
    from muxtune.executor.data import load_examples
    from muxtune.executor.trainer import MultiplexedTrainer

    backbone = load_backbone(MODEL)
    examples = {spec.name: load_examples(spec.data, backbone.tokenizer, spec.max_seq_len)[0]}
    trainer = MultiplexedTrainer(backbone, [spec], examples, alignment=Alignment(chunk_len=16))
    init = {k: v.detach().clone() for k, v in trainer.runs[spec.name].adapter.export_state().items()}
    trainer.train(progress=False)
    return trainer.runs[spec.name], init


@pytest.mark.parametrize("layout", [Layout(pp=2), Layout(dp=2)], ids=["pipeline", "data-parallel"])
def test_tasks_join_and_leave_a_multi_process_run(with_tenants, references, layout):
    from muxtune.spec import load_task

    folder, metrics = with_tenants(layout)
    out, ref_out = folder / "out", references(layout) / "out"
    # the spool's files in name order
    assert [(e["step"], e["task"], e["event"]) for e in metrics["events"]] == [
        (3, "huge", "rejected"), (3, "late", "submitted"), (5, "ia3", "cancelled")]
    # the late task joins the group with the fewest active tasks: ia3's (spool.join_group)
    assert metrics["events"][1]["group"] == 1
    assert "predicted not to fit" in metrics["events"][0]["reason"] and ":cpu (rank" in metrics["events"][0]["reason"]
    ref = metrics_of(ref_out)
    adapters, ref_adapters = adapters_of(out), adapters_of(ref_out)

    # the late task: exactly the result of training it alone, in one process, from its own step 0
    late = metrics["tasks"]["late"]
    assert late["status"] == "finished" and late["steps"] == LATE_STEPS and late["tokens"] > 0
    alone, init = train_alone(load_task(folder / "late.yaml"))
    torch.testing.assert_close(torch.tensor(late["loss"]), torch.tensor(alone.losses), rtol=1e-5, atol=1e-6)
    expected = alone.adapter.export_state()
    assert set(adapters["late"]) == set(expected)
    assert max((expected[k] - init[k]).abs().max().item() for k in expected) > 1e-4  # it trained
    for key, value in expected.items():
        torch.testing.assert_close(adapters["late"][key], value.detach(), rtol=1e-4, atol=1e-6, msg=key)

    # the cancelled task stopped after its 5th step with the curve it had; the others are unchanged
    # by the arrival and the departure (their fused shapes changed: rounding only, as above)
    ia3 = metrics["tasks"]["ia3"]
    assert ia3["status"] == "cancelled" and ia3["steps"] == 5 and "cancelled at step 5" in ia3["reason"]
    torch.testing.assert_close(torch.tensor(ia3["loss"]), torch.tensor(ref["tasks"]["ia3"]["loss"][:5]),
                               rtol=1e-5, atol=1e-6)
    assert set(adapters["ia3"]) == set(ref_adapters["ia3"])
    for name in ("lora", "prompt"):
        assert metrics["tasks"][name]["status"] == "finished"
        torch.testing.assert_close(torch.tensor(metrics["tasks"][name]["loss"]),
                                   torch.tensor(ref["tasks"][name]["loss"]), rtol=1e-5, atol=1e-6)
        for key, value in ref_adapters[name].items():
            torch.testing.assert_close(adapters[name][key], value, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")
    # the final checkpoint holds the joined task in its group, whole (both stages' layers merged)
    manifest = json.loads((out / "checkpoints" / "manifest.json").read_text())
    assert manifest["groups"] == [["lora", "prompt"], ["ia3", "late"]]
    assert manifest["tasks"]["late"]["spec"]["peft"]["method"] == "dora"


def test_a_crash_after_a_task_joined_resumes_with_it(with_tenants, tmp_path):
    """Crashed after step 6 (the last checkpoint: step 4, after the join), `--resume` brings the joined
    task back from the checkpoint (its spec and data are in the manifest, not the config), replays the
    cancellation at step 5, and ends bit-equal to the uninterrupted run."""
    folder, uninterrupted = with_tenants(Layout(pp=2))
    with pytest.raises(MuxTuneError, match="simulated crash after step 6"):
        run_with_tenants(tmp_path, Layout(pp=2), crash_at=6)
    out = tmp_path / "out"
    saved = json.loads((out / "checkpoints" / "manifest.json").read_text())
    assert saved["steps"] == 4 and saved["groups"] == [["lora", "prompt"], ["ia3", "late"]]
    assert not (out / "metrics.json").exists()

    metrics = run_with_tenants(tmp_path, Layout(pp=2), resume=True)
    assert metrics["resumed_from_step"] == 4
    assert [(e["step"], e["event"]) for e in metrics["events"]] == [(5, "cancelled")]
    for name, task in uninterrupted["tasks"].items():
        assert metrics["tasks"][name]["status"] == task["status"], name
        assert metrics["tasks"][name]["loss"] == task["loss"], name  # the whole curve, exactly
        assert metrics["tasks"][name]["tokens"] == task["tokens"], name
    adapters, ref_adapters = adapters_of(out), adapters_of(folder / "out")
    assert set(adapters) == set(ref_adapters) == {"lora", "ia3", "prompt", "late"}
    for name, state in ref_adapters.items():
        for key, value in state.items():
            assert torch.equal(adapters[name][key], value), f"{name} {key}"
