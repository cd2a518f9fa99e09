"""Spatial multiplexing mechanics: one base-op call over every task's rows; finished tasks leave."""

import pytest
from test_equivalence import PADDED, TARGETS, make_trainer, three_tasks

from muxtune.executor.mux import MultiplexedOp


@pytest.mark.parametrize("layout", ["chunked", "padded"])
def test_each_backbone_op_runs_once_over_all_tasks_rows(tmp_path, layout):
    from muxtune.spec import Alignment

    specs = three_tasks(tmp_path, TARGETS["builtin:tiny-opt"])  # OPT flattens rows in its MLP
    trainer, _ = make_trainer("builtin:tiny-opt", specs, alignment=Alignment(layout=layout, chunk_len=16))
    calls = {}
    for path, module in trainer.model.named_modules():
        if isinstance(module, MultiplexedOp):
            module.base_op.register_forward_hook(
                lambda m, inp, out, path=path: calls.setdefault(path, []).append(inp[0].shape[:-1].numel()))
    trainer.step()
    rows, seq = trainer.step_shapes[-1]
    if layout == "padded":  # a row per sequence
        assert rows == sum(s.batch_size for s in specs)
    else:  # chunk rows: each task's tokens rounded up to whole chunks
        assert seq == 16 and rows == sum(-(-run.tokens // 16) for run in trainer.runs.values())
    # union of all tasks' targets is wrapped; each wrapped op ran exactly once, over every token
    assert len(calls) == 2 * 6  # 2 layers x {q,v,out_proj,fc2,fc1,k}
    assert all(tokens == [rows * seq] for tokens in calls.values())
    # the backbone is shared, not copied: one set of weights, none trainable
    assert sum(p.requires_grad for p in trainer.model.parameters()) == 0


def test_finished_tasks_leave_the_fused_batch(tmp_path):
    specs = three_tasks(tmp_path, TARGETS["builtin:tiny-llama"], steps=3)  # steps 3, 4, 2
    trainer, _ = make_trainer("builtin:tiny-llama", specs, alignment=PADDED)  # a row per sequence
    trainer.train(progress=False)
    rows = [r for r, _ in trainer.step_shapes]
    assert rows == [9, 9, 7, 3]  # batch sizes 4+3+2; 'long' done after 2 steps, 'short' after 3
    assert [len(trainer.runs[s.name].losses) for s in specs] == [3, 4, 2]
    assert all(run.status == "finished" for run in trainer.runs.values())


def test_fusion_groups_from_the_plan_run_one_after_another_with_the_same_results(tmp_path):
    from reference import adapter_state, initial_state
    from test_equivalence import assert_same_training

    from muxtune.executor.backbone import load_backbone
    from muxtune.executor.data import load_examples
    from muxtune.executor.trainer import MultiplexedTrainer

    specs = three_tasks(tmp_path, TARGETS["builtin:tiny-gpt2"], steps=3)
    fused, _ = make_trainer("builtin:tiny-gpt2", specs)
    init = initial_state(fused)
    fused.train(progress=False)
    backbone = load_backbone("builtin:tiny-gpt2")
    examples = {s.name: load_examples(s.data, backbone.tokenizer, s.max_seq_len)[0] for s in specs}
    split = MultiplexedTrainer(backbone, specs, examples, groups=[["short", "long"], ["medium"]], alignment=PADDED)
    split.train(progress=False)
    assert [r for r, _ in split.step_shapes] == [6, 3, 6, 3, 4, 3, 3]  # two micro-batches per step
    for spec in specs:
        assert_same_training(split.runs[spec.name].losses, fused.runs[spec.name].losses,
                             adapter_state(split, spec.name), adapter_state(fused, spec.name), init[spec.name])


def test_trainers_come_and_go_on_one_backbone_without_rewrapping(tmp_path):
    from muxtune.executor.trainer import MultiplexedTrainer

    specs = three_tasks(tmp_path, TARGETS["builtin:tiny-llama"], steps=2)
    first, examples = make_trainer("builtin:tiny-llama", specs)
    first.train(progress=False)
    for name in list(first.runs):
        first.mux.remove_task(name)
    for _ in range(2):  # the same tasks again, twice, on the same backbone
        again = MultiplexedTrainer(first.backbone, specs, examples)
        again.train(progress=False)
        assert again.mux is first.mux
        assert again.runs["short"].losses == first.runs["short"].losses
        for name in list(again.runs):
            again.mux.remove_task(name)
    ops = [m for m in first.model.modules() if isinstance(m, MultiplexedOp)]
    assert ops and not any(isinstance(op.base_op, MultiplexedOp) for op in ops)


def test_lora_adds_into_the_frozen_ops_output_without_copying_it(tmp_path):
    """On the CPU path the LoRA update is added into the frozen op's [rows, seq, out] output in place:
    no copy of an op's whole output per call. (Its flat reshape is a view, and a view made the kernel
    clone the output first: ~1.9 s of a 19 s fused llama-100m step.)"""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    specs = three_tasks(tmp_path, TARGETS["builtin:tiny-llama"])
    trainer, _ = make_trainer("builtin:tiny-llama", specs, alignment=PADDED)
    inside, calls, copies = [], [], []
    aten = torch.ops.aten

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if inside and func in (aten.clone.default, aten.copy_.default):
                copies.append(func)
            return func(*args, **(kwargs or {}))

    for module in trainer.model.modules():
        if isinstance(module, MultiplexedOp):
            module.register_forward_pre_hook(lambda m, a: (inside.append(m), calls.append(m)) and None)
            module.register_forward_hook(lambda m, a, out: inside.pop() and None)
    with Copies():
        trainer.step()
    assert len(calls) >= 2 * len(TARGETS["builtin:tiny-llama"]) and not copies
