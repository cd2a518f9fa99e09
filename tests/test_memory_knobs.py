"""Memory knobs (issue 25): activation recomputation and gradient accumulation train a task exactly as
without them; the CostModel prices them; the planner, the simulator and admission use them."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from reference import adapter_state, randomize_b, write_jsonl
from test_equivalence import assert_same_training, initial_state

from muxtune import admission, admission_knobs
from muxtune.errors import MuxTuneError
from muxtune.executor import accumulation
from muxtune.executor.backbone import load_backbone
from muxtune.executor.data import load_examples
from muxtune.executor.hooks import StepObserver
from muxtune.executor.optim import summed_task_loss
from muxtune.executor.trainer import MultiplexedTrainer
from muxtune.planner.plan import plan
from muxtune.profiler import memory_knobs
from muxtune.profiler.cost_model import CostModel, MicroBatch, TaskLoad, llama_7b_shape
from muxtune.profiler.probes import saved_bytes
from muxtune.simulator.iteration import simulate_step
from muxtune.simulator.workload import TaskWork
from muxtune.spec import Alignment, Cluster, FusionGroup, Plan, TaskSpec

MODEL = "builtin:tiny-llama"
CHUNKED, PADDED = Alignment(chunk_len=16), Alignment(layout="padded")


def mixed_tasks(tmp_path, steps=3, dropout=0.1):
    """Four methods that draw dropout masks or change the attention (prefix), lengths that differ."""
    a = write_jsonl(tmp_path / "a.jsonl", 30, seed=1, min_len=3, max_len=12)
    b = write_jsonl(tmp_path / "b.jsonl", 30, seed=2, min_len=10, max_len=30, kind="text")
    c = write_jsonl(tmp_path / "c.jsonl", 30, seed=3, min_len=5, max_len=40)
    return [
        TaskSpec(name="lora", data=a, peft=dict(method="lora", r=4, alpha=8, dropout=dropout,
                                                target_modules=["q_proj", "v_proj", "down_proj"]),
                 batch_size=5, max_seq_len=64, lr=5e-3, steps=steps, seed=11),
        TaskSpec(name="adapter", data=b, peft=dict(method="adapter", size=8, dropout=dropout),
                 batch_size=3, max_seq_len=64, lr=2e-3, steps=steps, seed=12),
        TaskSpec(name="prefix", data=c, peft=dict(method="prefix", num_virtual_tokens=4),
                 batch_size=4, max_seq_len=64, lr=2e-3, steps=steps, seed=13),
        TaskSpec(name="dora", data=c, peft=dict(method="dora", r=4, alpha=8, dropout=dropout),
                 batch_size=4, max_seq_len=64, lr=1e-3, steps=steps, seed=14),
    ]


def trainer_of(specs, alignment=CHUNKED, **knobs):
    backbone = load_backbone(MODEL)
    examples = {s.name: load_examples(s.data, backbone.tokenizer, s.max_seq_len)[0] for s in specs}
    trainer = MultiplexedTrainer(backbone, specs, examples, alignment=alignment, **knobs)
    randomize_b(trainer)  # LoRA's B starts at zero: make every adapter's input gradient non-trivial
    return trainer


@pytest.mark.parametrize("alignment", [CHUNKED, PADDED], ids=["chunked", "padded"])
def test_recompute_trains_bit_for_bit_as_without(tmp_path, alignment):
    specs = mixed_tasks(tmp_path)
    plain, again = trainer_of(specs, alignment), trainer_of(specs, alignment, recompute=[True])
    forwards, layer = [], again.model.model.layers[0]
    original = layer.forward  # counted under the wrapping (hooks do not run again in a recompute)
    layer.forward = lambda *args, **kwargs: forwards.append(1) or original(*args, **kwargs)
    plain.train(progress=False)
    again.train(progress=False)
    # each block ran its forward twice per micro-batch: once in the forward, once in the backward
    assert len(forwards) == 2 * len(again.step_shapes)
    for spec in specs:
        assert plain.runs[spec.name].losses == again.runs[spec.name].losses
        for key, value in adapter_state(plain, spec.name).items():
            assert torch.equal(value, adapter_state(again, spec.name)[key]), f"{spec.name} {key}"
        # the dropout generators continue where they would have been (the next step's masks)
        gen, ref = again.mux.adapters[spec.name].dropout_gen, plain.mux.adapters[spec.name].dropout_gen
        assert (gen is None) == (ref is None) and (gen is None or torch.equal(gen.get_state(), ref.get_state()))


def test_recompute_keeps_only_block_inputs(tmp_path):
    """What autograd saves for the backward shrinks to the blocks' inputs (plus the head's)."""
    specs = mixed_tasks(tmp_path, dropout=0.0)[:1]
    kept = {}
    for on in (False, True):
        trainer = trainer_of(specs, recompute=[on])
        batch = trainer.micro_batches({"lora": trainer.runs["lora"].sampler.examples[:5]})[0]
        weights = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
        with accumulation_free_recompute(trainer, on):
            kept[on] = saved_bytes(lambda: trainer.loss_sums(batch, training=True), weights)
    assert kept[True] < 0.5 * kept[False]


def accumulation_free_recompute(trainer, on):
    from muxtune.executor.recompute import recomputing

    return recomputing(trainer.model, on)


def test_recompute_off_in_evaluation(tmp_path):
    """With gradients off nothing is checkpointed (evaluation is a forward only)."""
    specs = mixed_tasks(tmp_path, dropout=0.0)[:1]
    trainer = trainer_of(specs, recompute=[True])
    batch = trainer.micro_batches({"lora": trainer.runs["lora"].sampler.examples[:3]})[0]
    with accumulation_free_recompute(trainer, True), torch.no_grad():
        loss = trainer.loss_sums(batch, training=False)["lora"]
    assert loss.grad_fn is None


def test_micro_steps_split_each_task_into_its_parts():
    batches = {"a": list(range(7)), "b": list(range(2)), "c": list(range(3))}
    steps = accumulation.micro_steps(batches, {"a": 3, "b": 4})
    assert steps == [{"a": [0, 1, 2], "b": [0], "c": [0, 1, 2]}, {"a": [3, 4], "b": [1]}, {"a": [5, 6]}]
    assert accumulation.micro_steps(batches, {}) == [batches]


class GradientRecorder(StepObserver):
    """Each task's gradient (flattened) as the optimizer phase finds it, once per step (all tasks' AdamW
    steps are one multi-tensor update, executor/optim.py: no per-optimizer step hook runs)."""

    def __init__(self, trainer):
        self.trainer, self.due = trainer, True
        self.seen: dict[str, list[torch.Tensor]] = {name: [] for name in trainer.runs}
        trainer.observer = self

    def phase(self, name: str):
        if name == "draw":
            self.due = True
        elif name == "optimizer" and self.due:  # the step's first optimizer phase: gradients complete
            self.due = False
            for task, run in self.trainer.runs.items():
                grads = [p.grad.reshape(-1).clone() for p in run.parameters() if p.grad is not None]
                if grads:
                    self.seen[task].append(torch.cat(grads))
        return super().phase(name)


def record_gradients(trainer) -> dict[str, list[torch.Tensor]]:
    """Each task's gradient (flattened) as the optimizer phase receives it, every step."""
    return GradientRecorder(trainer).seen


@pytest.mark.parametrize("alignment", [CHUNKED, PADDED], ids=["chunked", "padded"])
def test_accumulation_equals_one_big_batch(tmp_path, alignment):
    """k micro-steps with unequal token counts give the big batch's losses and gradients (1e-6
    relative): the loss is the mean over all the step's tokens, not a mean of the micro-steps' means."""
    specs = mixed_tasks(tmp_path, dropout=0.0)  # masks are drawn per micro-batch shape: dropout off
    big = trainer_of(specs, alignment)
    split = trainer_of(specs, alignment, accumulation={"lora": 2, "adapter": 3, "prefix": 4, "dora": 1})
    init = initial_state(big)
    grads, ref_grads = record_gradients(split), record_gradients(big)
    big.train(progress=False)
    split.train(progress=False)
    assert len(split.step_shapes) == 4 * len(big.step_shapes)  # the largest k sets the micro-steps
    for spec in specs:
        torch.testing.assert_close(torch.tensor(split.runs[spec.name].losses),
                                   torch.tensor(big.runs[spec.name].losses), rtol=1e-6, atol=0)
        assert len(grads[spec.name]) == spec.steps
        for ours, ref in zip(grads[spec.name], ref_grads[spec.name]):
            assert float((ours - ref).norm() / ref.norm()) <= 1e-6, spec.name
        # the weights: AdamW divides by sqrt(v), so a rounding-size difference of a near-zero gradient
        # coordinate becomes an lr-sized step (test_equivalence.assert_same_training's bound)
        assert_same_training(split.runs[spec.name].losses, big.runs[spec.name].losses,
                             adapter_state(split, spec.name), adapter_state(big, spec.name), init[spec.name])


def test_mean_of_means_would_differ(tmp_path):
    """The equality above is not vacuous: the micro-steps' token counts differ, so a mean of their
    means is another number than the step's mean."""
    specs = mixed_tasks(tmp_path, dropout=0.0)[:1]
    trainer = trainer_of(specs)
    batch = trainer.runs["lora"].sampler.examples[:5]
    parts = accumulation.micro_steps({"lora": batch}, {"lora": 2})
    micro = [trainer.micro_batches(p)[0] for p in parts]
    counts = {"lora": sum(mb.target_counts["lora"] for mb in micro)}
    with torch.no_grad():
        sums = [trainer.loss_sums(mb, training=False)["lora"] for mb in micro]
    whole = sum(sums) / counts["lora"]
    means = sum(s / mb.target_counts["lora"] for s, mb in zip(sums, micro)) / 2
    assert micro[0].target_counts["lora"] != micro[1].target_counts["lora"]
    assert abs(float(whole - means)) > 1e-4
    assert float(sum(summed_task_loss({"lora": s}, counts, {}) for s in sums)) == pytest.approx(float(whole))


def test_knobs_alone_equal_with_neighbours(tmp_path):
    """A task with accumulation and recompute (dropout on) trains as it does alone with the same knobs."""
    specs = mixed_tasks(tmp_path)
    knobs = dict(recompute=[True], accumulation={"lora": 2, "adapter": 3})
    together = trainer_of(specs, **knobs)
    init = initial_state(together)
    together.train(progress=False)
    alone = trainer_of(specs[:1], **knobs)
    alone.train(progress=False)
    assert_same_training(alone.runs["lora"].losses, together.runs["lora"].losses, adapter_state(alone, "lora"),
                         adapter_state(together, "lora"), init["lora"])


def test_plan_records_knobs_and_rejects_bad_ones():
    group = FusionGroup(tasks=["a", "b"], devices=["cpu"], recompute=True, accumulation={"a": 4})
    assert group.accumulation_of("a") == 4 and group.accumulation_of("b") == 1
    again = FusionGroup.model_validate_json(group.model_dump_json())
    assert again == group
    for bad in ({"c": 2}, {"a": 0}):
        with pytest.raises(ValueError, match="accumulation"):
            FusionGroup(tasks=["a", "b"], devices=["cpu"], accumulation=bad)


# --- pricing, simulator, planner, admission ------------------------------------------------------------

H100 = CostModel.analytic("h100", llama_7b_shape())
BIG = MicroBatch((TaskLoad("lora", 8, 8192, 4_000_000), TaskLoad("ia3", 0, 4096, 600_000)), 1024)


def test_cost_model_prices_recompute():
    plain, kept = H100.activation_bytes(BIG, 32), memory_knobs.activation_bytes(H100, BIG, 32, recompute=True)
    # kept: every block's input [T, hidden] plus one block's whole activations
    assert kept == 32 * BIG.tokens * 4096 * 2 + H100.activation_bytes(BIG, 1)  # analytic: a block's saved tensors
    assert kept < plain / 5 and memory_knobs.saved_bytes(H100, BIG, 32) == plain - kept
    redo = memory_knobs.recompute_seconds(H100, BIG, 32)
    assert 0 < redo < H100.forward_seconds(BIG, 32, True, True)  # the blocks again, not the stem or head
    assert memory_knobs.step_seconds(H100, [BIG], True) == pytest.approx(H100.step_seconds([BIG]) + redo)
    order, params = [("fwd", BIG), ("bwd", BIG)], [t.params for t in BIG.tasks]
    assert memory_knobs.peak_bytes(H100, [BIG], False) == H100.peak_bytes(order, params)
    # the one memory model holds a recomputed micro-batch's kept bytes in place of its activations
    assert memory_knobs.peak_bytes(H100, [BIG], True) == H100.peak_bytes(order, params) - plain + kept
    assert H100.held_bytes(replace(BIG, recompute=True), 32) == kept


def test_simulator_shows_the_knobs():
    works = {"a": TaskWork("a", "lora", 8, 4_000_000, 16, 1024.0), "b": TaskWork("b", "lora", 8, 4_000_000, 6, 512.0)}

    def timeline(**knobs):
        group = FusionGroup(tasks=["a", "b"], devices=["cuda:0"], **knobs)
        return simulate_step(Plan(groups=[group]), works, H100, packed=True)

    plain, recomputed = timeline(), timeline(recompute=True)
    accumulated = timeline(accumulation={"a": 4, "b": 2})
    assert (plain.events["kind"] == "recompute").sum() == 0
    assert (recomputed.events["kind"] == "recompute").sum() == 1
    assert recomputed.step_seconds > plain.step_seconds
    assert recomputed.peak_memory["cuda:0"] < plain.peak_memory["cuda:0"]
    assert (accumulated.events["kind"] == "fwd").sum() == 4  # micro-steps: a's 4 parts, b's 2 with its first two
    assert accumulated.peak_memory["cuda:0"] < plain.peak_memory["cuda:0"]


def test_planner_picks_knobs_only_when_memory_needs_them():
    tasks = [TaskSpec(name=f"t{i}", data=Path("unused.jsonl"), peft=dict(method="lora", r=8), batch_size=32,
                      max_seq_len=2048, steps=10) for i in range(2)]
    roomy = plan(tasks, Cluster(devices=1, memory_gib=640, hardware="h100"), H100, time_limit=2)
    assert not any(g.recompute or g.accumulation for g in roomy.plan.groups)
    tight = plan(tasks, Cluster(devices=1, memory_gib=40, hardware="h100"), H100, time_limit=2)
    assert tight.chosen.fits and tight.chosen.peak_memory <= 40 * 2**30
    assert any(g.recompute or g.accumulation for g in tight.plan.groups)
    # the baselines got the knobs too: every one of them fits where none would without
    assert all(b.fits for b in tight.baselines)


def test_admission_admits_with_knobs_and_refuses_with_numbers(tmp_path):
    spec = mixed_tasks(tmp_path)[0].model_copy(update={"batch_size": 32, "max_seq_len": 2048})
    model = load_backbone(MODEL).model
    plain = admission.estimate(model, [spec], [["lora"]], CHUNKED, 0)
    least = admission.estimate(model, [spec], [["lora"]], CHUNKED, 0, recompute=[True], accumulation={"lora": 16})
    assert least.needed < plain.needed
    limit = (plain.needed + least.needed) / 2
    one = Plan(groups=[FusionGroup(tasks=["lora"], devices=["cpu"])], alignment=CHUNKED)
    admitted = admission_knobs.admit(model, [spec], one, limit / 2**30)
    assert admitted.estimate.needed <= limit < plain.needed
    assert any(admitted.recompute) or admitted.accumulation
    plan_with = admitted.apply(one)
    assert (plan_with.groups[0].recompute, plan_with.groups[0].accumulation) == (
        admitted.recompute[0], admitted.accumulation)
    with pytest.raises(MuxTuneError, match="even with recomputation") as refused:
        admission_knobs.admit(model, [spec], one, 0.9 * least.needed / 2**30)
    assert "GiB" in str(refused.value) or "MiB" in str(refused.value)


def test_memory_benchmark_measures_both_configurations_on_a_tiny_model(capsys):
    from muxtune import allocator
    from muxtune.benchmarks import memory

    from muxtune.profiler.profile import REPO_PROFILES

    shipped = next(REPO_PROFILES.glob("cpu-*-tiny-llama.csv"))  # as it is: no calibration timing in a smoke test
    out = memory.main(["--model", MODEL, "--tenants", "2", "--seq", "256", "--steps", "1", "--skip-cluster",
                       "--profile", str(shipped)])
    assert [row["recompute"] for row in out["cpu"]["rows"]] == [False, True]
    assert all(row["peak_mib"] > 0 and row["step_s"] > 0 for row in out["cpu"]["rows"])
    # the workers train on the malloc the commands that train use (muxtune/allocator.py)
    assert {row["malloc"] for row in out["cpu"]["rows"]} == {"tcmalloc" if allocator.library() else "system"}
    assert out["memory_prediction_error"] >= 0 and out["tensor_prediction_error"] >= 0
    assert "recompute_time_ratio" in out
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")


def test_the_lm_head_in_pieces_equals_the_whole_head_and_holds_one_piece(monkeypatch):
    """Past schedule.head_chunk_tokens the LM head's logits are computed piece by piece and recomputed in
    the backward: the same losses, predictions and gradients, with one piece's logits alive at a time;
    the CostModel prices the same."""
    from muxtune.executor import forward
    from muxtune.profiler.probes import peak_bytes as measured_peak
    from muxtune.schedule import head_chunk_tokens

    torch.manual_seed(0)
    vocab, tokens = 4096, 2048
    head = torch.nn.Linear(64, vocab, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(tokens, 64), torch.randint(0, vocab, (tokens,))

    def run():
        h = hidden.clone().requires_grad_()
        losses, predicted = forward.token_losses(head, h, targets, True)
        losses.sum().backward()
        return losses.detach(), predicted, h.grad

    whole = run()
    peak_whole = measured_peak(run, "cpu")
    monkeypatch.setattr(forward, "head_chunk_tokens", lambda v: 256)  # 8 pieces
    pieces = run()
    peak_pieces = measured_peak(run, "cpu")
    for a, b in zip(whole, pieces):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert peak_pieces < peak_whole / 3  # logits + their float softmax + gradient: one piece's, not eight
    # the CostModel: beyond a piece, only the piece's transient and each token's hidden state and loss
    cm = H100
    piece = head_chunk_tokens(cm.shape.vocab)
    assert cm.head_bytes(piece) == cm._whole_head_bytes(piece)
    assert cm.head_bytes(40 * piece) < 2 * cm.head_bytes(piece) < cm._whole_head_bytes(40 * piece)


def test_a_step_with_the_lm_head_in_pieces_trains_as_the_whole_head(tmp_path, monkeypatch):
    from muxtune.executor import forward

    specs = mixed_tasks(tmp_path, dropout=0.0)[:2]
    whole, pieces = trainer_of(specs), trainer_of(specs)
    monkeypatch.setattr(forward, "head_chunk_tokens", lambda v: 7)  # many pieces, one of them short
    pieces.train(progress=False)
    monkeypatch.undo()
    whole.train(progress=False)
    for spec in specs:
        torch.testing.assert_close(torch.tensor(pieces.runs[spec.name].losses),
                                   torch.tensor(whole.runs[spec.name].losses), rtol=1e-6, atol=0)
        for key, value in adapter_state(whole, spec.name).items():
            torch.testing.assert_close(adapter_state(pieces, spec.name)[key], value, rtol=1e-5, atol=1e-7)
