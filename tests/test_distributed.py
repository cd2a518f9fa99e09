"""The distributed executor (the step loop of executor/trainer.py on several processes: pipeline.py, distributed.py): a 2-stage pipeline and 2 data-parallel
replicas, each 2 processes on gloo, train every task to the losses and adapter weights of the single-process
executor. Plus the pieces that need no processes: micro-batch shares, schedules, plan checks."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_equivalence import TARGETS, three_tasks

from muxtune.errors import MuxTuneError
from muxtune.executor.backbone import load_backbone
from muxtune.executor.data import load_examples
from muxtune.executor.distributed import check_plan
from muxtune.executor.pipeline import Topology
from muxtune.executor.trainer import MultiplexedTrainer
from muxtune.run import execute
from muxtune.simulator.iteration import simulate_step
from muxtune.spec import Alignment, FusionGroup, Layout, Plan, RunConfig

MODEL = "builtin:tiny-llama"
GROUPS = [["short", "long"], ["medium"]]
ALIGN = Alignment(chunk_len=16)


def plan_of(layout: Layout, micro_batches: int, schedule: str, groups=GROUPS) -> Plan:
    return Plan(groups=[FusionGroup(tasks=g, devices=["cpu"] * (layout.dp * layout.pp * layout.tp), layout=layout,
                                    micro_batches=micro_batches) for g in groups],
                schedule=schedule, alignment=ALIGN)


def single_process(specs, groups=GROUPS):
    backbone = load_backbone(MODEL)
    examples = {s.name: load_examples(s.data, backbone.tokenizer, s.max_seq_len)[0] for s in specs}
    trainer = MultiplexedTrainer(backbone, specs, examples, groups=groups, alignment=ALIGN)
    init = {name: {k: v.detach().clone() for k, v in run.adapter.export_state().items()}
            for name, run in trainer.runs.items()}
    trainer.train(progress=False)
    return trainer, init


def exported(out, name):
    return load_file(str(out / "adapters" / name / "adapter_model.safetensors"))


def assert_same(metrics, out, reference, init, loss_rtol, weight_atol):
    for name, run in reference.runs.items():
        torch.testing.assert_close(torch.tensor(metrics["tasks"][name]["loss"]), torch.tensor(run.losses),
                                   rtol=loss_rtol, atol=0)
        state, ref = exported(out, name), run.adapter.export_state()
        assert set(state) == set(ref)
        moved = max((ref[k] - init[name][k]).abs().max().item() for k in ref)
        assert moved > 1e-4  # training moved the weights
        for key in state:
            torch.testing.assert_close(state[key], ref[key].detach(), rtol=0, atol=weight_atol, msg=key)


def test_two_stage_pipeline_through_the_cli_equals_one_process(tmp_path):
    """One micro-batch per group: every stage computes exactly the single-process ops, so losses are
    identical and unclipped tasks' weights bit-identical (clipping sums the norm over stages: rounding)."""
    from muxtune.cli import main

    specs = three_tasks(tmp_path, TARGETS[MODEL])
    config = RunConfig(name="pipe", model=MODEL, tasks=specs)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    plan = plan_of(Layout(pp=2), micro_batches=1, schedule="1f1b")
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "run.yaml"), "--plan", str(tmp_path / "plan.json"), "--out", str(out),
                 "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"plan.json", "metrics.json", "report.html", "adapters"} <= {p.name for p in out.iterdir()}
    assert metrics["distributed"]["pp"] == 2 and set(metrics["distributed"]["bubble_fraction"]) == {"0", "1"}
    reference, init = single_process(specs)
    for name, run in reference.runs.items():
        assert metrics["tasks"][name]["loss"] == run.losses
        assert metrics["tasks"][name]["tokens"] == run.tokens
        if run.spec.max_grad_norm is None:
            state = exported(out, name)
            for key, value in run.adapter.export_state().items():
                assert torch.equal(state[key], value.detach()), key
    assert_same(metrics, out, reference, init, loss_rtol=0, weight_atol=1e-7)


def test_pipeline_interleaving_groups_with_micro_batches_equals_one_process(tmp_path):
    """Two micro-batches per group, the groups' micro-batches interleaved in one 1F1B: the same
    training up to the rounding of summing a task's gradient over two micro-batches."""
    specs = three_tasks(tmp_path, TARGETS[MODEL])
    config = RunConfig(name="pipe", model=MODEL, tasks=specs)
    plan = plan_of(Layout(pp=2), micro_batches=2, schedule="interleaved")
    metrics = execute(config, tmp_path / "out", plan=plan, progress=False)
    reference, init = single_process(specs)
    assert_same(metrics, tmp_path / "out", reference, init, loss_rtol=1e-6, weight_atol=2e-6)

    # the executor ran the simulator's schedule: the same order of (kind, group, micro-batch) per stage
    from fake_cost_model import FakeCostModel, FakeShape
    from muxtune.simulator.workload import TaskWork

    works = {t.name: TaskWork(t.name, "lora", 4, 100, t.batch_size, 8.0) for t in specs}
    # at the last step only "medium" (5 steps) is still running: simulate that step's plan
    last = plan_of(Layout(pp=2), micro_batches=2, schedule="interleaved", groups=[["medium"]])
    events = simulate_step(last, works, FakeCostModel(shape=FakeShape(n_layers=2))).events
    for rank, device in (("0", "cpu#0"), ("1", "cpu#1")):
        expected = events[(events.device == device) & events.kind.isin(["fwd", "bwd"])].sort_values("start")
        measured = [(kind, k) for kind, _, k, *_ in metrics["distributed"]["last_step"][rank]]
        assert measured == list(zip(expected.kind, expected.micro_batch))


def test_two_data_parallel_replicas_equal_one_process(tmp_path):
    """Each replica takes half of every task's batch; the loss is normalised by the whole batch's
    target tokens and only adapter gradients are summed across replicas."""
    specs = three_tasks(tmp_path, TARGETS[MODEL])
    config = RunConfig(name="dp", model=MODEL, tasks=specs)
    plan = plan_of(Layout(dp=2), micro_batches=1, schedule="1f1b")
    metrics = execute(config, tmp_path / "out", plan=plan, progress=False)
    reference, init = single_process(specs)
    assert_same(metrics, tmp_path / "out", reference, init, loss_rtol=1e-6, weight_atol=2e-6)
    assert sum(metrics["tasks"][n]["tokens"] for n in reference.runs) == sum(r.tokens for r in reference.runs.values())


# --- no processes needed ------------------------------------------------------------------------


def test_one_process_pipeline_trainer_is_the_single_process_executor(tmp_path):
    specs = three_tasks(tmp_path, TARGETS[MODEL], steps=3)
    backbone = load_backbone(MODEL)
    examples = {s.name: load_examples(s.data, backbone.tokenizer, s.max_seq_len)[0] for s in specs}
    trainer = MultiplexedTrainer(backbone, specs, examples, plan=plan_of(Layout(), 1, "1f1b"))
    trainer.train(progress=False)
    reference, _ = single_process(specs)
    for name, run in reference.runs.items():
        assert trainer.runs[name].losses == run.losses
        for key, value in run.adapter.export_state().items():
            assert torch.equal(trainer.runs[name].adapter.export_state()[key], value), key


def test_replica_shares_cover_every_sequence_once(tmp_path):
    specs = three_tasks(tmp_path, TARGETS[MODEL], steps=2)
    backbone = load_backbone(MODEL)
    examples = {s.name: load_examples(s.data, backbone.tokenizer, s.max_seq_len)[0] for s in specs}
    batches = {s.name: examples[s.name][: s.batch_size] for s in specs}  # 4, 3, 2 sequences
    seen = {name: 0 for name in batches}
    for replica in range(2):
        trainer = MultiplexedTrainer(load_backbone(MODEL), specs, examples, plan=plan_of(Layout(dp=2), 2, "1f1b"),
                                     topology=Topology(rank=replica, dp=2))
        for batch in trainer.replica_micro_batches(batches, micro_batches=2):
            for name, n in batch.target_counts.items():
                seen[name] += n
    for name, examples_ in batches.items():
        assert seen[name] == sum(sum(1 for t in ex.labels[1:] if t != -100) for ex in examples_)


def test_interleaved_schedule_alternates_groups_and_1f1b_flushes_each():
    trainer = MultiplexedTrainer.__new__(MultiplexedTrainer)
    units = [[(0, 0), (0, 1)], [(1, 0), (1, 1), (1, 2)]]
    trainer.schedule = plan_of(Layout(pp=2), 2, "interleaved").schedule
    assert trainer.blocks(units) == [[(0, 0), (1, 0), (0, 1), (1, 1), (1, 2)]]
    trainer.schedule = plan_of(Layout(pp=2), 2, "1f1b").schedule
    assert trainer.blocks(units) == units


def test_plans_the_distributed_executor_does_not_run_are_rejected_clearly():
    split = Plan(groups=[FusionGroup(tasks=["a"], devices=["cpu", "cpu"], layout=Layout(pp=2)),
                         FusionGroup(tasks=["b"], devices=["cpu", "cpu"], layout=Layout(dp=2))])
    with pytest.raises(MuxTuneError, match="same devices and layout"):
        check_plan(split)


def test_prefix_tuning_across_stages_is_refused(tmp_path):
    from muxtune.spec import TaskSpec

    specs = three_tasks(tmp_path, TARGETS[MODEL], steps=2)[:1]
    specs = [specs[0].model_copy(update={"peft": TaskSpec.model_validate(
        {"name": "p", "data": specs[0].data, "steps": 1, "peft": {"method": "prefix", "num_virtual_tokens": 2}}).peft})]
    backbone = load_backbone(MODEL)
    examples = {s.name: load_examples(s.data, backbone.tokenizer, s.max_seq_len)[0] for s in specs}
    plan = plan_of(Layout(pp=2), 1, "1f1b", groups=[[specs[0].name]])
    with pytest.raises(MuxTuneError, match="prefix tuning is not supported across pipeline stages"):
        MultiplexedTrainer(backbone, specs, examples, plan=plan, topology=Topology(rank=0, pp=2))
