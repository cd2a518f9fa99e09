"""Multiplexed training equals each task trained alone: with HF PEFT, and with itself alone (isolation)."""

import pytest
import torch
from reference import adapter_state, initial_state, randomize_b, train_hf_peft_alone, write_jsonl

from muxtune.executor.backbone import load_backbone
from muxtune.executor.data import load_examples
from muxtune.executor.trainer import MultiplexedTrainer
from muxtune.spec import Alignment, TaskSpec

PADDED = Alignment(layout="padded")

TARGETS = {
    "builtin:tiny-llama": (["q_proj", "v_proj"], ["k_proj", "o_proj", "down_proj"], ["gate_proj", "up_proj"]),
    "builtin:tiny-gpt2": (["c_attn"], ["c_proj"], ["c_fc", "c_attn"]),  # Conv1D ops
    "builtin:tiny-opt": (["q_proj", "v_proj"], ["out_proj", "fc2"], ["fc1", "k_proj"]),
}


def three_tasks(tmp_path, targets, steps=4, dropout=0.0):
    """Different r, alpha, lr, batch size, schedule, clipping, target modules, data and lengths."""
    a = write_jsonl(tmp_path / "a.jsonl", 40, seed=1, min_len=2, max_len=6)
    b = write_jsonl(tmp_path / "b.jsonl", 30, seed=2, min_len=8, max_len=20, kind="text")
    c = write_jsonl(tmp_path / "c.jsonl", 25, seed=3, min_len=15, max_len=40)
    return [
        TaskSpec(name="short", data=a, peft=dict(method="lora", r=4, alpha=8, dropout=dropout, target_modules=targets[0]),
                 batch_size=4, max_seq_len=64, lr=5e-3, steps=steps, seed=11, max_grad_norm=None),
        TaskSpec(name="medium", data=b, peft=dict(method="lora", r=16, alpha=16, dropout=dropout, target_modules=targets[1]),
                 batch_size=3, max_seq_len=96, lr=2e-3, steps=steps + 1, seed=12, max_grad_norm=0.5,
                 weight_decay=0.01, lr_schedule="linear", warmup_steps=2),
        TaskSpec(name="long", data=c, peft=dict(method="lora", r=8, alpha=32, dropout=dropout, target_modules=targets[2],
                                                use_rslora=True),
                 batch_size=2, max_seq_len=160, lr=1e-3, steps=steps - 1, seed=13, lr_schedule="cosine"),
    ]


def make_trainer(model_name, specs, attn="sdpa", alignment=None, device="cpu"):
    """Chunk-aligned micro-batches by default (small chunks, so sequences share and span chunks)."""
    backbone = load_backbone(model_name, device=device, attn_implementation=attn)
    examples = {s.name: load_examples(s.data, backbone.tokenizer, s.max_seq_len)[0] for s in specs}
    alignment = alignment or Alignment(chunk_len=16)
    return MultiplexedTrainer(backbone, specs, examples, alignment=alignment), examples


def assert_same_training(losses, ref_losses, state, ref_state, init):
    """Losses at fp32 rounding; weights within a bound scaled by how far training moved them.

    Why weights get a scaled bound: right-padding a batch to a different length changes the rounding
    of the attention kernels (~2e-7), and Adam turns a relative error on a near-zero gradient
    coordinate into an lr-sized step. test_..._same_shapes_bit_exact shows that with equal shapes the
    weights are bit-identical, so this residue is rounding, not multiplexing."""
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert set(state) == set(ref_state)
    moved = max((ref_state[k] - init[k]).abs().max().item() for k in state)
    assert moved > 1e-4  # training moved the weights: not a comparison of two untouched inits
    for key in state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=0, atol=1e-7 + 2e-3 * moved, msg=key)


@pytest.mark.parametrize("model_name", list(TARGETS))
def test_multiplexed_equals_hf_peft_alone(tmp_path, model_name):
    specs = three_tasks(tmp_path, TARGETS[model_name])
    trainer, examples = make_trainer(model_name, specs)  # chunk-aligned
    padded, _ = make_trainer(model_name, specs, alignment=PADDED)
    randomize_b(trainer)
    init = initial_state(trainer)
    for name, run in padded.runs.items():
        run.adapter.load_export_state(init[name])
    trainer.train(progress=False)
    padded.train(progress=False)
    # the backbone is shared and frozen: it never got a gradient
    assert all(p.grad is None and not p.requires_grad for p in trainer.model.parameters())
    assert max(seq for _, seq in trainer.step_shapes) == 16 < max(seq for _, seq in padded.step_shapes)

    for spec in specs:
        run = trainer.runs[spec.name]
        assert run.status == "finished" and len(run.losses) == spec.steps
        ours = adapter_state(trainer, spec.name)
        # 1. HF PEFT alone, each batch padded to its own longest sequence (as a user runs it): the
        #    chunk-aligned and the padded layout both train the task as it trains alone
        ref_losses, ref_state = train_hf_peft_alone(model_name, spec, examples[spec.name], init[spec.name])
        assert_same_training(run.losses, ref_losses, ours, ref_state, init[spec.name])
        assert_same_training(padded.runs[spec.name].losses, ref_losses, adapter_state(padded, spec.name),
                             ref_state, init[spec.name])
        # 2. HF PEFT alone, each batch padded to the padded fused batch's length: bit-identical weights
        pad_to = [seq for _, seq in padded.step_shapes[: spec.steps]]
        ref_losses, ref_state = train_hf_peft_alone(model_name, spec, examples[spec.name], init[spec.name],
                                                    pad_to=pad_to)
        torch.testing.assert_close(torch.tensor(padded.runs[spec.name].losses), torch.tensor(ref_losses),
                                   rtol=1e-5, atol=1e-6)
        for key, value in adapter_state(padded, spec.name).items():
            torch.testing.assert_close(value, ref_state[key], rtol=0, atol=0, msg=f"{spec.name} {key}")


@pytest.mark.parametrize("model_name", ["builtin:tiny-llama", "builtin:tiny-gpt2", "builtin:tiny-opt"])
def test_task_result_independent_of_neighbours_dropout_included(tmp_path, model_name):
    specs = three_tasks(tmp_path, TARGETS[model_name], dropout=0.1)
    together, _ = make_trainer(model_name, specs)
    init = initial_state(together)
    together.train(progress=False)
    # the same tasks in another order, and each alone: same seed -> same init, data, dropout masks
    reordered, _ = make_trainer(model_name, list(reversed(specs)))
    reordered.train(progress=False)
    for spec in specs:
        alone, _ = make_trainer(model_name, [spec])
        assert all(torch.equal(v, initial_state(alone)[spec.name][k]) for k, v in init[spec.name].items())
        alone.train(progress=False)
        for other in (alone, reordered):
            assert_same_training(other.runs[spec.name].losses, together.runs[spec.name].losses,
                                 adapter_state(other, spec.name), adapter_state(together, spec.name),
                                 init[spec.name])


def test_dropout_masks_come_from_the_task_seed(tmp_path):
    """With dropout on, the seed decides the result: same seed equal, another seed different."""
    specs = three_tasks(tmp_path, TARGETS["builtin:tiny-llama"], dropout=0.3)[:1]
    runs = []
    for seed in (11, 11, 99):
        spec = specs[0].model_copy(update={"seed": seed})
        trainer, _ = make_trainer("builtin:tiny-llama", [spec])
        randomize_b(trainer)  # same init for all three: only the dropout/data streams differ by seed
        with torch.no_grad():
            for _, layer in trainer.runs[spec.name].adapter.items():
                layer.lora_A.weight.fill_(0.01)
        trainer.train(progress=False)
        runs.append(trainer.runs[spec.name].losses)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
