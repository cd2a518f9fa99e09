"""Tensor parallelism (executor/tensor_parallel.py): 2 tensor ranks on gloo split tiny-llama's projections
(q/k/v/gate/up by output rows, o/down by input columns) and each task's LoRA with them; every task trains
to the losses and adapter weights of the single-process executor. Plus what TP refuses, clearly."""

import json

import pytest
import torch
import yaml
from test_distributed import exported, plan_of, single_process
from test_equivalence import TARGETS, three_tasks

from muxtune.errors import MuxTuneError
from muxtune.executor.backbone import load_backbone
from muxtune.executor.data import load_examples
from muxtune.executor.distributed import check_plan
from muxtune.executor.pipeline import Topology
from muxtune.executor.trainer import MultiplexedTrainer
from muxtune.executor.tensor_parallel import assemble_state, op_kind
from muxtune.spec import Layout, RunConfig, TaskSpec

MODEL = "builtin:tiny-llama"


def test_two_tensor_ranks_through_the_cli_equal_one_process(tmp_path):
    """tp=2 through `muxtune run --plan` (the plan-and-run launcher): the three LoRA tasks cover column ops
    (q, v, k, gate, up: A replicated, B split) and row ops (o, down: A split, B replicated), with different
    r, schedules and clipping (clipping's norm is summed over both ranks' slices), and LoRA dropout 0.1:
    every rank draws the task's masks from the same stream, a row op's at the full input width cut to
    its columns, so the masks are exactly one process's (a different draw would change the losses).

    Tolerance, from the rounding: a row-parallel op adds two fp32 partial sums (each over half the input
    features) in one all-reduce, and a column op's input gradient and a replicated tensor's gradient are
    summed over the ranks the same way: values differ from one process by a few ulps (fp32 eps 1.2e-7),
    so losses are held to rtol 1e-6 (measured 1.7e-7) and almost every weight to 2e-7 (measured ~2e-8).
    AdamW divides by sqrt(v) + 1e-8: on the rare coordinate whose gradient is near zero, an ulp-sized
    gradient difference becomes a step difference up to ~lr * ulp / 1e-8, i.e. a small fraction of
    the lr-sized steps training took. Those coordinates get test_equivalence's bound for the same effect,
    1e-7 + 2e-3 * (how far training moved the tensor); there must be few of them (<= 1%), which a
    missing or doubled gradient reduction would not satisfy: it changes most coordinates."""
    from muxtune.cli import main

    specs = three_tasks(tmp_path, TARGETS[MODEL], dropout=0.1)
    config = RunConfig(name="tensor", model=MODEL, tasks=specs)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    plan = plan_of(Layout(tp=2), micro_batches=1, schedule="1f1b")
    check_plan(plan)  # tp > 1 is carried out, not refused
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "run.yaml"), "--plan", str(tmp_path / "plan.json"), "--out", str(out),
                 "--no-progress"]) == 0
    assert {"plan.json", "metrics.json", "report.html", "adapters"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed"]["tp"] == 2 and set(metrics["distributed"]["bubble_fraction"]) == {"0", "1"}
    reference, init = single_process(specs)
    for name, run in reference.runs.items():
        assert metrics["tasks"][name]["tokens"] == run.tokens  # counted once, not once per tensor rank
        torch.testing.assert_close(torch.tensor(metrics["tasks"][name]["loss"]), torch.tensor(run.losses),
                                   rtol=1e-6, atol=0)
        state, ref = exported(out, name), run.adapter.export_state()
        assert set(state) == set(ref)
        moved = max((ref[k] - init[name][k]).abs().max().item() for k in ref)
        assert moved > 1e-4  # training moved the weights
        for key in state:  # full shapes: the ranks' slices were put back together
            assert state[key].shape == ref[key].shape, key
            torch.testing.assert_close(state[key], ref[key].detach(), rtol=0, atol=1e-7 + 2e-3 * moved, msg=key)
            outliers = ((state[key] - ref[key].detach()).abs() > 2e-7).float().mean().item()
            assert outliers <= 0.01, (key, outliers)


# --- no processes needed: what tensor parallelism refuses, and how slices are put back together ------


def trainer_with(tmp_path, model, peft, tp=2):
    spec = TaskSpec.model_validate({"name": "job", "data": three_tasks(tmp_path, TARGETS[MODEL])[0].data,
                                    "peft": peft, "steps": 1})
    backbone = load_backbone(model)
    examples = {spec.name: load_examples(spec.data, backbone.tokenizer, spec.max_seq_len)[0]}
    plan = plan_of(Layout(tp=tp), 1, "1f1b", groups=[[spec.name]])
    return MultiplexedTrainer(backbone, [spec], examples, plan=plan, topology=Topology(rank=0, tp=tp))


@pytest.mark.parametrize("peft", [{"method": "ia3"}, {"method": "dora", "target_modules": ["q_proj"]},
                                  {"method": "prompt", "num_virtual_tokens": 2}])
def test_methods_other_than_lora_are_refused_naming_task_and_method(tmp_path, peft):
    with pytest.raises(MuxTuneError, match=f"task 'job': method '{peft['method']}' is not supported under tensor "
                                           "parallelism"):
        trainer_with(tmp_path, MODEL, peft)


def test_models_and_degrees_the_split_does_not_cover_are_refused(tmp_path):
    lora = {"method": "lora", "target_modules": ["c_attn"]}
    with pytest.raises(MuxTuneError, match="tensor parallelism is implemented for .* not model type 'gpt2'"):
        trainer_with(tmp_path, "builtin:tiny-gpt2", lora)
    with pytest.raises(MuxTuneError, match="tp=4 does not divide the model's num_key_value_heads=2"):
        trainer_with(tmp_path, MODEL, {"method": "lora"}, tp=4)


def test_op_kinds_and_assembling_slices():
    assert [op_kind(f"model.layers.0.{p}") for p in ("self_attn.q_proj", "mlp.up_proj", "self_attn.o_proj",
                                                     "mlp.down_proj", "self_attn.rotary")] == \
        ["column", "column", "row", "row", None]
    b, a = torch.arange(8.0).view(4, 2), torch.arange(6.0).view(2, 3)
    parts = [({"x.lora_B.weight": b[:2], "x.lora_A.weight": a, "y.lora_A.weight": a[:, :1]},
              {"x.lora_B.weight": 0, "y.lora_A.weight": 1}),
             ({"x.lora_B.weight": b[2:], "x.lora_A.weight": a + 1, "y.lora_A.weight": a[:, 1:]},
              {"x.lora_B.weight": 0, "y.lora_A.weight": 1})]
    state = assemble_state(parts)
    assert torch.equal(state["x.lora_B.weight"], b)  # split by output rows: concatenated in rank order
    assert torch.equal(state["y.lora_A.weight"], a)  # split by input columns
    assert torch.equal(state["x.lora_A.weight"], a)  # replicated: tensor rank 0's copy
