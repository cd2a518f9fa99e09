"""Chunk-aligned micro-batches: almost no padding, and no cross-contamination between packed sequences."""

import pytest
import torch
import torch.nn.functional as F
from reference import adapter_state, initial_state, write_jsonl
from test_equivalence import PADDED, TARGETS, assert_same_training, make_trainer, three_tasks

from muxtune.executor.alignment import pack_chunks, split_by_budget
from muxtune.executor.data import IGNORE, DataStats, Example, fuse
from muxtune.spec import Alignment, TaskSpec


def every_method(tmp_path, model_name):
    """One task per PEFT method, different lengths, so the stream mixes them all."""
    files = [write_jsonl(tmp_path / f"{i}.jsonl", 12, seed=i, min_len=2 + 3 * i, max_len=6 + 5 * i,
                         kind="text" if i % 2 else "pc") for i in range(7)]
    targets = TARGETS[model_name][0]
    pefts = [dict(method="lora", r=4, target_modules=targets), dict(method="dora", r=4, target_modules=targets),
             dict(method="ia3"), dict(method="adapter", size=8), dict(method="bitfit"),
             dict(method="prefix", num_virtual_tokens=3), dict(method="prompt", num_virtual_tokens=4)]
    return [TaskSpec(name=p["method"], data=f, peft=p, batch_size=2 + i % 2, max_seq_len=128, seed=30 + i, steps=50)
            for i, (p, f) in enumerate(zip(pefts, files))]


def perturb(trainer, seed=3):
    """Nonzero trainable values everywhere (zero-initialised ones would hide a wrong gradient path)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for run in trainer.runs.values():
            for p in run.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def sequence_losses_packed(trainer, batch):
    """Mean next-token loss of every packed sequence, from ONE forward over the chunk stream."""
    with trainer.mux.route(batch.segments, batch.chunk_len, training=False):
        hidden = trainer.chunked_hidden_states(batch)[0]
    targets = batch.targets.reshape(-1)
    valid = targets != IGNORE
    per_token = F.cross_entropy(trainer.model.get_output_embeddings()(hidden).float(), targets.clamp(min=0),
                                reduction="none") * valid
    return [per_token[s.start : s.end].sum() / valid[s.start : s.end].sum() for s in batch.sequences]


@pytest.mark.parametrize("model_name", list(TARGETS))
def test_packed_sequence_loss_and_gradients_equal_the_sequence_alone(tmp_path, model_name):
    specs = every_method(tmp_path, model_name)
    trainer, examples = make_trainer(model_name, specs, alignment=Alignment(chunk_len=8))
    perturb(trainer)
    batches = {s.name: [examples[s.name][i] for i in range(s.batch_size)] for s in specs}
    adapters = {name: trainer.mux.adapters[name] for name in batches}
    batch = pack_chunks(batches, 8, 256, lead={n: a.lead_tokens for n, a in adapters.items()},
                        position_offset={n: a.prefix_tokens for n, a in adapters.items()})
    # several sequences share a chunk, and some sequences span chunks
    assert any(s.start // 8 != (s.end - 1) // 8 for s in batch.sequences)
    assert any((a.end - 1) // 8 == b.start // 8 for a, b in zip(batch.sequences, batch.sequences[1:]))
    packed = sequence_losses_packed(trainer, batch)
    alone_batches = [(task, ex) for task, exs in batches.items() for ex in exs]
    assert len(packed) == len(alone_batches)
    for loss, (task, ex) in zip(packed, alone_batches):
        params = trainer.runs[task].parameters()
        got = torch.autograd.grad(loss, params, retain_graph=True)
        # the same sequence alone: a batch of one row, no padding, the ordinary (non-packed) path
        single = fuse({task: [ex]}, 256, lead={task: adapters[task].lead_tokens})
        ref = trainer.task_losses(single, training=False)[task]
        want = torch.autograd.grad(ref, params)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6, msg=f"{task} loss")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=f"{task} gradient")


def test_chunks_hold_one_task_each_with_positions_restarting_and_little_padding():
    examples = {"a": [Example([1] * 5, [IGNORE] + [1] * 4), Example([2] * 13, [IGNORE] + [2] * 12)],
                "b": [Example([3] * 3, [IGNORE] * 2 + [3])],
                "c": [Example([4] * 20, [IGNORE] + [4] * 19)]}
    batch = pack_chunks(examples, 8, 0, lead={"b": 2}, position_offset={"c": 7})
    assert [(s.task, s.start, s.end) for s in batch.segments] == [("a", 0, 3), ("b", 3, 4), ("c", 4, 7)]
    stream = batch.input_ids.reshape(-1).tolist()
    assert stream[:18] == [1] * 5 + [2] * 13 and stream[18:24] == [0] * 6  # a: 18 tokens, 6 padding
    assert stream[24:29] == [0, 0, 3, 3, 3]  # b: 2 virtual slots, then its sequence
    positions = batch.position_ids.reshape(-1).tolist()
    assert positions[:18] == list(range(5)) + list(range(13))
    assert positions[24:29] == list(range(5)) and positions[32:52] == list(range(7, 27))
    targets = batch.targets.reshape(-1).tolist()
    # a sequence's last token predicts nothing: no target crosses into the next sequence
    assert targets[4] == IGNORE and targets[:4] == [1] * 4 and targets[5:17] == [2] * 12
    assert batch.tokens_per_task == {"a": 18, "b": 5, "c": 20}
    assert batch.computed_per_task == {"a": 24, "b": 8, "c": 24}
    assert batch.target_counts == {"a": 16, "b": 1, "c": 19}
    assert batch.virtual_slots[1].tolist() == [[24, 25]]


def test_token_budget_splits_a_step_without_changing_training(tmp_path):
    specs = three_tasks(tmp_path, TARGETS["builtin:tiny-llama"], steps=3)
    whole, _ = make_trainer("builtin:tiny-llama", specs)
    init = initial_state(whole)
    whole.train(progress=False)
    split, _ = make_trainer("builtin:tiny-llama", specs, alignment=Alignment(chunk_len=16, token_budget=96))
    split.train(progress=False)
    assert len(split.step_shapes) > 2 * len(whole.step_shapes)  # several micro-batches per step
    # within the budget, but for a single sequence longer than it (up to max_seq_len 160): its own micro-batch
    assert all(rows * seq <= 160 for rows, seq in split.step_shapes)
    assert sum(rows * seq > 96 for rows, seq in split.step_shapes) < len(split.step_shapes) // 2
    for spec in specs:
        assert_same_training(split.runs[spec.name].losses, whole.runs[spec.name].losses,
                             adapter_state(split, spec.name), adapter_state(whole, spec.name), init[spec.name])


def test_budget_split_keeps_whole_sequences_in_order():
    exs = [Example([1] * n, [1] * n) for n in (10, 30, 5, 50)]
    parts = split_by_budget({"a": exs[:2], "b": exs[2:]}, 8, 48)
    assert [{t: [len(e.input_ids) for e in v] for t, v in p.items()} for p in parts] == \
        [{"a": [10, 30], "b": [5]}, {"b": [50]}]  # 40 + 8 (b rounded to a chunk) fits; 50 > budget: alone
    # padded (a row per sequence, each as long as the longest): 2 x 30 = 60 fits 64, 3 x 30 does not
    parts = split_by_budget({"a": exs[:2], "b": exs[2:]}, 1, 64, padded=True)
    assert [{t: [len(e.input_ids) for e in v] for t, v in p.items()} for p in parts] == \
        [{"a": [10, 30]}, {"b": [5]}, {"b": [50]}]
    assert [len(p) for p in split_by_budget({"a": exs[:2], "b": exs[2:]}, 1, 90, padded=True)] == [2, 1]  # 3 x 30; 50


def test_metrics_report_ineffective_tokens_per_task_and_chunking_removes_them(tmp_path):
    from muxtune.run import collect_metrics
    from muxtune.spec import RunConfig

    specs = three_tasks(tmp_path, TARGETS["builtin:tiny-gpt2"], steps=2)
    config = RunConfig(name="m", model="builtin:tiny-gpt2", tasks=specs)
    fractions = {}
    for name, alignment in (("padded", PADDED), ("chunked", Alignment(chunk_len=8))):
        trainer, _ = make_trainer("builtin:tiny-gpt2", specs, alignment=alignment)
        trainer.train(progress=False)
        stats = {s.name: DataStats() for s in specs}
        metrics = collect_metrics(config, trainer, stats, 1.0)
        fractions[name] = metrics["ineffective_token_fraction"]
        for task in metrics["tasks"].values():
            assert task["computed_tokens"] >= task["tokens"] > 0
            assert task["ineffective_token_fraction"] == pytest.approx(1 - task["tokens"] / task["computed_tokens"])
        assert metrics["alignment"]["layout"] == name
    assert fractions["padded"] > 0.3 and fractions["chunked"] < 0.05
