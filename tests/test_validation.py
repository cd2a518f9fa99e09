"""Validation, epochs and early stopping: the config rules, the epoch budget, the held-out split, and
the fused evaluation (never changes training, independent of neighbours, equal to HF PEFT's loss)."""

import json

import pytest
import torch
from peft import PeftModel
from pydantic import ValidationError
from reference import adapter_state, write_jsonl

from muxtune.executor.backbone import load_backbone
from muxtune.executor.data import IGNORE, fuse, load_examples
from muxtune.executor.export import export_adapter
from muxtune.executor.trainer import MultiplexedTrainer
from muxtune.executor.validation import load_task_data
from muxtune.spec import Alignment, TaskSpec

MODEL = "builtin:tiny-llama"


def spec(tmp_path, **overrides):
    data = write_jsonl(tmp_path / "train.jsonl", 10, seed=1, min_len=2, max_len=6)
    return TaskSpec(**{"name": "t", "data": data, "peft": {"method": "lora", "r": 4}, "batch_size": 3,
                       "max_seq_len": 64, "steps": 4, **overrides})


# --- the config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"epochs": 2}, "exactly one of steps and epochs.*both"),
    ({"steps": None}, "exactly one of steps and epochs.*neither"),
    ({"validation_split": 0.6}, "validation_split\n  Input should be less than or equal to 0.5"),
    ({"validation_split": 0.0}, "validation_split\n  Input should be greater than 0"),
    ({"early_stopping": {"patience": 2}}, "early_stopping needs validation data"),
    ({"eval_every": 2}, "eval_every needs validation data"),
    ({"validation_split": 0.2, "validation_data": "v.jsonl"}, "validation_data or validation_split, not both"),
    ({"validation_split": 0.2, "early_stopping": {"patience": 0}}, "patience\n  Input should be greater than"),
])
def test_bad_combinations_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValidationError, match=message):
        spec(tmp_path, **overrides)


def test_step_count_and_default_eval_interval(tmp_path):
    task = spec(tmp_path, steps=None, epochs=2, validation_split=0.1)
    assert task.step_count(10) == 7 and task.examples_to_train(10) == 20  # ceil(2 * 10 / 3)
    assert spec(tmp_path, steps=None, epochs=0.1, batch_size=1).step_count(30) == 3  # no float-noise step
    assert task.eval_interval(7) == 1 and task.eval_interval(95) == 10 and task.eval_interval(100) == 10
    assert spec(tmp_path, validation_split=0.1, eval_every=3).eval_interval(100) == 3
    assert spec(tmp_path).eval_interval(100) is None


# --- epochs and the held-out split ------------------------------------------------------------------


def test_two_epochs_train_ceil_2n_over_b_steps_and_see_every_example_twice(tmp_path):
    task = spec(tmp_path, steps=None, epochs=2, batch_size=3)
    backbone = load_backbone(MODEL)
    examples = list(load_examples(task.data, backbone.tokenizer, task.max_seq_len)[0])
    assert len(examples) == 10
    trainer = MultiplexedTrainer(backbone, [task], {"t": examples})
    drawn = []
    draw = trainer.draw_batch
    trainer.draw_batch = lambda run: drawn.append(draw(run)) or drawn[-1]
    trainer.train(progress=False)
    run = trainer.runs["t"]
    assert run.status == "finished" and run.step == run.total_steps == len(run.losses) == 7  # ceil(20 / 3)
    assert [len(batch) for batch in drawn] == [3, 3, 3, 3, 3, 3, 2]  # the last batch takes what is left
    seen = [id(ex) for batch in drawn for ex in batch]
    assert sorted(seen) == sorted([id(ex) for ex in examples] * 2)  # every example exactly twice


def test_split_holds_out_a_seeded_share_never_trained_on(tmp_path):
    backbone = load_backbone(MODEL)
    data = write_jsonl(tmp_path / "d.jsonl", 40, seed=3, min_len=2, max_len=30)
    task = spec(tmp_path, data=data, validation_split=0.25, seed=5)
    train, valid, stats = load_task_data(task, backbone.tokenizer, "tasks[0]")
    everything = [ex.input_ids for ex in load_examples(data, backbone.tokenizer, 64)[0]]
    assert stats.examples == 40 and len(train) == 30 and len(valid) == 10
    train_ids = [everything.index(train[i].input_ids) for i in range(len(train))]
    valid_ids = [everything.index(ex.input_ids) for ex in valid]
    assert sorted(train_ids + valid_ids) == list(range(40))  # a partition: nothing trained is validated on
    again = load_task_data(task, backbone.tokenizer, "tasks[0]")[1]
    other = load_task_data(task.model_copy(update={"seed": 6}), backbone.tokenizer, "tasks[0]")[1]
    assert [ex.input_ids for ex in again] == [ex.input_ids for ex in valid]  # the seed decides the split
    assert [ex.input_ids for ex in other] != [ex.input_ids for ex in valid]


# --- the fused evaluation ---------------------------------------------------------------------------


def tenants(tmp_path, validate=True, eval_every=1):
    """LoRA (with dropout: its generator must not be touched by evaluation), IA3 and prompt tuning."""
    paths = [write_jsonl(tmp_path / f"{n}.jsonl", 30, seed=i, min_len=2 + 3 * i, max_len=8 + 6 * i,
                         kind="text" if i == 1 else "pc") for i, n in enumerate(("lora", "ia3", "prompt"))]
    valid = [write_jsonl(tmp_path / f"{n}-valid.jsonl", 9, seed=10 + i, min_len=2 + 3 * i, max_len=8 + 6 * i,
                         kind="text" if i == 1 else "pc") for i, n in enumerate(("lora", "ia3", "prompt"))]
    peft = [dict(method="lora", r=4, alpha=8, dropout=0.1), dict(method="ia3"),
            dict(method="prompt", num_virtual_tokens=4)]
    extra = [dict(validation_data=v, eval_every=eval_every) if validate else {} for v in valid]
    return [TaskSpec(name=n, data=d, peft=p, batch_size=2 + i, max_seq_len=64, lr=[5e-3, 3e-2, 3e-2][i],
                     steps=4 + i, seed=20 + i, **e)
            for i, (n, d, p, e) in enumerate(zip(("lora", "ia3", "prompt"), paths, peft, extra))]


def make(specs, **kwargs):
    """A trainer as test_equivalence makes them (chunk-aligned, 16-token chunks), with validation sets."""
    backbone = load_backbone(MODEL)
    data, validation = {}, {}
    for s in specs:
        data[s.name], valid, _ = load_task_data(s, backbone.tokenizer, s.name)
        if valid is not None:
            validation[s.name] = valid
    return MultiplexedTrainer(backbone, specs, data, alignment=Alignment(chunk_len=16), validation=validation, **kwargs)


def test_training_is_bit_identical_with_evaluation_on_or_off(tmp_path):
    on, off = make(tenants(tmp_path)), make(tenants(tmp_path, validate=False))
    fused = []
    loss_sums = on.loss_sums
    on.loss_sums = lambda batch, training, hits=None: (
        fused.append({s.task for s in batch.segments}) if not training else None) or loss_sums(batch, training, hits)
    on.train(progress=False)
    off.train(progress=False)
    assert {3, 2} <= {len(tasks) for tasks in fused}  # evaluated together, never one tenant at a time
    for name, run in on.runs.items():
        ref = off.runs[name]
        assert len(run.evaluations) == run.total_steps and not ref.evaluations
        assert run.losses == ref.losses and run.accuracies == ref.accuracies
        for key, value in adapter_state(off, name).items():
            assert torch.equal(adapter_state(on, name)[key], value), f"{name} {key}"
        assert torch.equal(run.adapter.dropout_gen.get_state(), ref.adapter.dropout_gen.get_state()) \
            if run.adapter.dropout_gen is not None else True
        assert run.sampler.generator.get_state().equal(ref.sampler.generator.get_state())
        assert all(0.0 <= a <= 1.0 for a in run.accuracies)


def test_validation_figures_alone_equal_with_neighbours(tmp_path):
    specs = tenants(tmp_path)
    together = make(specs)
    together.train(progress=False)
    for task in specs:
        alone = make([task])
        alone.train(progress=False)
        ours, theirs = together.runs[task.name].evaluations, alone.runs[task.name].evaluations
        assert [e["step"] for e in ours] == [e["step"] for e in theirs]
        torch.testing.assert_close(torch.tensor([e["valid_loss"] for e in ours]),
                                   torch.tensor([e["valid_loss"] for e in theirs]), rtol=1e-5, atol=0)
        # the same weights evaluated alone and fused: only the neighbours differ
        run = alone.runs[task.name]
        run.adapter.load_state_dict(together.runs[task.name].adapter.state_dict())
        run.evaluations.clear()
        alone.evaluate([run])
        assert run.evaluations[0]["valid_mean_token_accuracy"] == ours[-1]["valid_mean_token_accuracy"]
        torch.testing.assert_close(run.evaluations[0]["valid_loss"], ours[-1]["valid_loss"], rtol=1e-6, atol=0)


def hf_peft_loss(path, examples, pad_id) -> float:
    """The loss HF PEFT computes with the exported adapter over the validation examples (one batch,
    its own masking of padding and prompts: labels -100)."""
    model = PeftModel.from_pretrained(load_backbone(MODEL).model, str(path))
    model.eval()
    batch = fuse({"v": examples}, pad_id)
    with torch.no_grad():
        return float(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss)


def test_valid_loss_equals_hf_peft_on_the_exported_adapter(tmp_path):
    specs = tenants(tmp_path, eval_every=2)
    trainer = make(specs)
    pad_id = trainer.backbone.tokenizer.pad_token_id
    checked = set()
    while trainer.active:
        trainer.step()
        for name, run in trainer.runs.items():  # every task at every step it was evaluated at
            if run.evaluations and run.evaluations[-1]["step"] == run.step and (name, run.step) not in checked:
                checked.add((name, run.step))
                path = export_adapter(run.adapter, trainer.model, MODEL, tmp_path / f"{name}-{run.step}")
                config = json.loads((path / "adapter_config.json").read_text())
                assert config["peft_type"] == {"lora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING"}[name]
                expected = hf_peft_loss(path, run.validation, pad_id)
                torch.testing.assert_close(run.evaluations[-1]["valid_loss"], expected, rtol=1e-5, atol=0,
                                           msg=f"{name} step {run.step}")
    assert checked == {("lora", 2), ("lora", 4), ("ia3", 2), ("ia3", 4), ("ia3", 5), ("prompt", 2), ("prompt", 4),
                       ("prompt", 6)}  # every eval_every=2 steps, and at each task's end
    # the accuracy is the argmax next-token accuracy over the loss-bearing tokens
    run = trainer.runs["ia3"]
    batch = fuse({"v": run.validation}, pad_id)
    with torch.no_grad(), trainer.mux.route(batch.segments, batch.input_ids.shape[1], training=False):
        logits = trainer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    targets = batch.labels[:, 1:]
    right = (logits.argmax(-1) == targets)[targets != IGNORE]
    assert run.evaluations[-1]["valid_mean_token_accuracy"] == pytest.approx(right.float().mean().item(), abs=1e-12)
