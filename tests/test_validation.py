"""Validation, epochs and early stopping: the config rules, the epoch budget, the held-out split, and
the fused evaluation (never changes training, independent of neighbours, equal to HF PEFT's loss)."""

import json
from dataclasses import replace

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
from muxtune.spec import Alignment, EarlyStopping, Plan, TaskSpec

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


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_corrupt_validation_row_stops_only_its_task_naming_file_and_line(tmp_path, policy):
    """A damaged cache row in one task's validation set (a token id outside the vocabulary; the row keeps
    its place in the file) fails that task at once with file:line (error), or is left out (skip); the
    others train and evaluate exactly as without it, and the fused evaluation never sees the row."""
    specs = tenants(tmp_path)
    path = specs[1].validation_data
    path.write_text("\n\n" + path.read_text())  # two blank lines: the 5th example is on line 7
    specs[1] = specs[1].model_copy(update={"on_bad_line": policy})
    backbone = load_backbone(MODEL)
    data, validation = {}, {}
    for s in specs:
        data[s.name], validation[s.name], _ = load_task_data(s, backbone.tokenizer, s.name)
    good = list(validation["ia3"])
    validation["ia3"][4] = replace(good[4], input_ids=good[4].input_ids[:1] + [70000] + good[4].input_ids[2:])
    trainer = MultiplexedTrainer(backbone, specs, data, alignment=Alignment(chunk_len=16), validation=validation)
    evaluated = []
    loss_sums = trainer.loss_sums
    trainer.loss_sums = lambda batch, training, hits=None: (
        evaluated.append(batch.input_ids.max().item()) if not training else None) or loss_sums(batch, training, hits)
    trainer.train(progress=False)
    # the reference: without ia3 (error) or with ia3 validating on its good rows only (skip)
    kept = [s for s in specs if policy == "skip" or s.name != "ia3"]
    valid = {**validation, "ia3": good[:4] + good[5:]}
    reference = MultiplexedTrainer(load_backbone(MODEL), kept, data, alignment=Alignment(chunk_len=16),
                                   validation={s.name: valid[s.name] for s in kept})
    reference.train(progress=False)
    assert evaluated and max(evaluated) < trainer.vocab_size  # the bad row never reached the backbone
    run = trainer.runs["ia3"]
    if policy == "error":
        assert run.status == "failed" and run.step == 0 and not run.evaluations and run.stopped_at == 1
        assert run.reason == (f"corrupt validation data: {path}:7: token id 70000 outside the vocabulary "
                              f"(0..{trainer.vocab_size - 1})")
    else:
        assert run.status == "finished" and run.bad_examples == 1 and len(run.validation) == 8
    for name, ref in reference.runs.items():  # the other tenants (and a skipping ia3) as without the bad row
        assert trainer.runs[name].status == "finished" and trainer.runs[name].losses == ref.losses
        torch.testing.assert_close(torch.tensor([e["valid_loss"] for e in trainer.runs[name].evaluations]),
                                   torch.tensor([e["valid_loss"] for e in ref.evaluations]), rtol=1e-5, atol=0)


# --- early stopping, outputs, resume ----------------------------------------------------------------


def overfit_config(tmp_path, patience=2, steps=12, every=0, extra="") -> "Path":
    """'over' learns to answer every prompt with a run of 'a'; its validation set asks for a run of 'z'
    after the same prompts: each step that fits the training data makes the validation loss worse."""
    words = ["river", "stone", "cloud", "seven", "blue", "quiet", "gamma", "delta"]
    with open(tmp_path / "over.jsonl", "w") as f, open(tmp_path / "over-valid.jsonl", "w") as v:
        for i, word in enumerate(words):
            f.write(json.dumps({"prompt": f"{word} {i} ->", "completion": "aaaaaaaaaaaa"}) + "\n")
            v.write(json.dumps({"prompt": f"{word} {i} ->", "completion": "zzzzzzzzzzzz"}) + "\n")
    write_jsonl(tmp_path / "steady.jsonl", 20, seed=4, min_len=4, max_len=10)
    path = tmp_path / "over.yaml"
    path.write_text(f"""
name: over
model: {MODEL}
checkpoint_every: {every}
tasks:
  - name: over
    data: over.jsonl
    validation_data: over-valid.jsonl
    eval_every: 1
    early_stopping: {{patience: {patience}, min_delta: 0.0}}
    peft: {{method: lora, r: 4, alpha: 16}}
    batch_size: 4
    max_seq_len: 64
    lr: 5.0e-2
    steps: {steps}
    seed: 3
  - name: steady
    data: steady.jsonl
    peft: {{method: ia3}}
    batch_size: 3
    max_seq_len: 64
    lr: 1.0e-2
    steps: {steps}
    seed: 4
{extra}""")
    return path


def expected_stop(losses: list[float], patience: int, min_delta: float = 0.0) -> tuple[int, int]:
    """(index of the evaluation that stops the task, index of the best one), by the rule itself."""
    best, bad = 0, 0
    for i in range(1, len(losses)):
        if losses[i] < losses[best] - min_delta:
            best, bad = i, 0
        else:
            bad += 1
            if bad == patience:
                return i, best
    raise AssertionError(f"never stops: {losses}")


def test_early_stopping_stops_exports_the_best_adapter_and_frees_its_rows(tmp_path):
    from safetensors.torch import load_file

    from muxtune.run import execute
    from muxtune.spec import load_config

    config = load_config(overfit_config(tmp_path))
    metrics = execute(config, tmp_path / "run", progress=False)
    over = metrics["tasks"]["over"]
    losses = [e["valid_loss"] for e in over["evaluations"]]
    assert all(b > a for a, b in zip(losses, losses[1:]))  # the case really overfits from the first step
    stop, best = expected_stop(losses, patience=2)
    assert over["status"] == "stopped_early" and over["steps"] == over["stopped_early_at_step"] == stop + 1 == 3
    assert over["best_step"] == best + 1 == 1 and over["best_valid_loss"] == losses[best]
    assert metrics["tasks"]["steady"]["status"] == "finished" and metrics["tasks"]["steady"]["steps"] == 12

    # the exported adapter is the one of the best step, not the last: bit-equal to 'over' after best_step
    # steps of the same fused run without evaluation (evaluation changes no training, bit for bit; a
    # run of 'over' alone pads its attention batch to other lengths, equal only to rounding:
    # test_equivalence.assert_same_training)
    backbone = load_backbone(MODEL)
    plain = [config.task(name).model_copy(update={"validation_data": None, "eval_every": None, "early_stopping": None})
             for name in ("over", "steady")]
    trained = MultiplexedTrainer(backbone, plain, {s.name: load_examples(s.data, backbone.tokenizer, 64)[0]
                                                   for s in plain})
    states = []
    for _ in range(over["steps"]):
        trained.step()
        states.append(adapter_state(trained, "over"))
    exported = load_file(str(tmp_path / "run/adapters/over/adapter_model.safetensors"))
    best_state, last_state = states[over["best_step"] - 1], states[-1]
    assert exported.keys() == best_state.keys()
    for key, value in best_state.items():
        assert torch.equal(exported[key], value), key
    assert any(not torch.equal(exported[key], value) for key, value in last_state.items())

    # its rows left the fused batch at once: from step 4 on, only 'steady' tokens (vs a run without stopping)
    (tmp_path / "ref").mkdir()
    without = load_config(overfit_config(tmp_path / "ref", patience=100))
    ref = execute(without, tmp_path / "ref/run", progress=False)
    steady_tokens = ref["tasks"]["steady"]["tokens"]
    assert metrics["step_time_s"] and len(metrics["step_time_s"]) == len(ref["step_time_s"]) == 12
    assert metrics["tasks"]["steady"]["loss"] == ref["tasks"]["steady"]["loss"]  # the neighbour is unaffected
    assert metrics["tokens"] < ref["tokens"] and metrics["tasks"]["steady"]["tokens"] == steady_tokens
    assert metrics["tokens"] == ref["tokens"] - (ref["tasks"]["over"]["tokens"] - over["tokens"])

    # outputs: the results CSV with the fine-tuning APIs' columns, the report's validation figure
    rows = (tmp_path / "run/results/over.csv").read_text().splitlines()
    assert rows[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy" and len(rows) == 4
    assert [float(r.split(",")[3]) for r in rows[1:]] == losses
    report = (tmp_path / "run/report.html").read_text()
    assert "<h2>Validation</h2>" in report and (tmp_path / "run/validation_0.png").exists()
    assert "stopped_early" in report


def test_fused_batch_shrinks_the_step_after_an_early_stop(tmp_path):
    from muxtune.spec import load_config

    config = load_config(overfit_config(tmp_path))
    stopping, going_on = make(config.tasks), make([config.task("over").model_copy(update={
        "early_stopping": EarlyStopping(patience=100)}), config.task("steady")])
    stopping.train(progress=False)
    going_on.train(progress=False)
    assert stopping.runs["over"].status == "stopped_early" and stopping.runs["over"].step == 3
    assert going_on.runs["over"].status == "finished"
    assert stopping.step_tokens[:3] == going_on.step_tokens[:3]
    # from step 4 on every fused batch holds fewer tokens and computes fewer chunk rows
    assert all(a < b for a, b in zip(stopping.step_tokens[3:], going_on.step_tokens[3:]))
    assert len(stopping.step_tokens) == 12
    rows = [r for r, _ in stopping.step_shapes[3:]], [r for r, _ in going_on.step_shapes[3:]]
    assert all(a < b for a, b in zip(*rows))


@pytest.mark.parametrize("interrupt_at", [3, 5])  # before the stop (its best adapter is checkpointed), after it
def test_resume_around_evaluations_and_an_early_stop_is_bit_equal(tmp_path, interrupt_at):
    from safetensors.torch import load_file

    from muxtune.cli import main
    from muxtune.run import execute
    from muxtune.spec import load_config

    config = overfit_config(tmp_path, patience=3, every=2)
    reference = execute(load_config(config), tmp_path / "ref", progress=False)
    assert reference["tasks"]["over"]["stopped_early_at_step"] == 4 and reference["tasks"]["over"]["best_step"] == 1

    def interrupt(trainer):
        if len(trainer.step_times) == interrupt_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute(load_config(config), tmp_path / "run", progress=False, after_step=interrupt)
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0
    resumed = json.loads((tmp_path / "run/metrics.json").read_text())
    assert resumed["resumed_from_step"] == interrupt_at - 1
    for name, task in reference["tasks"].items():
        for key in ("status", "steps", "loss", "train_mean_token_accuracy", "evaluations", "best_step",
                    "best_valid_loss", "stopped_early_at_step"):
            assert resumed["tasks"][name][key] == task[key], f"{name} {key}"
        ours, ref = (load_file(str(d / f"adapters/{name}/adapter_model.safetensors")) for d in (tmp_path / "run",
                                                                                                 tmp_path / "ref"))
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), name
    assert (tmp_path / "run/results/over.csv").read_text() == (tmp_path / "ref/results/over.csv").read_text()


def test_a_task_submitted_mid_run_with_validation_is_evaluated(tmp_path):
    """`muxtune submit` of a task with validation data while the job runs: it joins at the next step
    boundary and is evaluated every eval_every of its own steps and at its end, as it would be alone;
    its figures reach metrics.json and its results CSV."""
    from muxtune.cli import main
    from muxtune.run import execute
    from muxtune.spec import load_config, load_task

    config = overfit_config(tmp_path, patience=100, steps=8)
    write_jsonl(tmp_path / "late.jsonl", 20, seed=6, min_len=3, max_len=9)
    write_jsonl(tmp_path / "late-valid.jsonl", 6, seed=7, min_len=3, max_len=9)
    task = tmp_path / "late.yaml"
    task.write_text("name: late\ndata: late.jsonl\nvalidation_data: late-valid.jsonl\neval_every: 2\n"
                    "peft: {method: lora, r: 4}\nbatch_size: 2\nmax_seq_len: 64\nsteps: 5\nseed: 8\nlr: 1.0e-2\n")
    out = tmp_path / "run"

    def submit(trainer):
        if len(trainer.step_times) == 2:
            assert main(["submit", str(out), str(task)]) == 0

    metrics = execute(load_config(config), out, progress=False, after_step=submit)
    late = metrics["tasks"]["late"]
    assert [e["event"] for e in metrics["events"]] == ["submitted"]
    assert late["status"] == "finished" and late["steps"] == 5
    assert [e["step"] for e in late["evaluations"]] == [2, 4, 5]  # its own steps: every 2, and its last
    assert late["validation_examples"] == 6 and late["best_step"] in (2, 4, 5)
    # it joined after global step 2, so it was evaluated after global steps 4, 6 and 7, in the same fused
    # pass as 'over' (evaluated after every step): those passes carry its validation tokens too
    tokens = {e["after_step"]: e["tokens"] for e in metrics["evaluations"]}
    assert sorted(tokens) == list(range(1, 9))
    assert tokens[4] == tokens[6] == tokens[7] > tokens[1] == tokens[3] == tokens[5] == tokens[8]

    # as the same task trained and evaluated alone, in the run's layout
    spec = load_task(task)
    backbone = load_backbone(MODEL)
    examples, valid, _ = load_task_data(spec, backbone.tokenizer, "late")
    alone = MultiplexedTrainer(backbone, [spec], {"late": examples}, alignment=Plan.load(out / "plan.json").alignment,
                               validation={"late": valid})
    alone.train(progress=False)
    ours, theirs = late["evaluations"], alone.runs["late"].evaluations
    torch.testing.assert_close(torch.tensor([e["valid_loss"] for e in ours]),
                               torch.tensor([e["valid_loss"] for e in theirs]), rtol=1e-5, atol=0)
    rows = (out / "results" / "late.csv").read_text().splitlines()
    assert len(rows) == 6 and [r.split(",")[3] != "" for r in rows[1:]] == [False, True, False, True, True]


# --- bad input: our usual clear error, exit 2, no traceback, nothing written -------------------------


def bad_run(tmp_path, capsys, monkeypatch, **task):
    from test_cli import call, small_config

    write_jsonl(tmp_path / "v.jsonl", 4, seed=9, min_len=2, max_len=6)
    config = small_config(tmp_path)
    raw = __import__("yaml").safe_load(config.read_text())
    raw["tasks"][0].update(task)
    config.write_text(__import__("yaml").safe_dump(raw, sort_keys=False))
    result = call(capsys, monkeypatch, tmp_path, "main", "run", str(config), "--out", str(tmp_path / "out"),
                  "--no-progress")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.rglob(".*partial"))
    return result.stderr


@pytest.mark.parametrize("task, message", [
    ({"epochs": 2}, r"config.yaml:\d+: tasks\[0\]: .*set exactly one of steps and epochs.*both"),
    ({"steps": None}, r"config.yaml:\d+: tasks\[0\]: .*got neither"),
    ({"validation_split": 0.7}, r"config.yaml:\d+: tasks\[0\].validation_split: Input should be less than or equal"),
    ({"early_stopping": {"patience": 2}}, r"tasks\[0\]: .*early_stopping needs validation data"),
    ({"validation_data": "nowhere.jsonl"}, r"config.yaml:\d+: tasks\[0\].validation_data: data file not found"),
])
def test_bad_validation_config_is_refused_cleanly(tmp_path, capsys, monkeypatch, task, message):
    import re

    assert re.search(message, bad_run(tmp_path, capsys, monkeypatch, **task))


def test_bad_or_empty_validation_file_is_refused_with_file_and_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion":\n')
    err = bad_run(tmp_path, capsys, monkeypatch, validation_data="bad.jsonl")
    assert f"{tmp_path / 'bad.jsonl'}:2: not valid JSON" in err
    (tmp_path / "empty.jsonl").write_text("\n")
    err = bad_run(tmp_path, capsys, monkeypatch, validation_data="empty.jsonl")
    assert f"{tmp_path / 'empty.jsonl'}: no usable examples" in err
    # a split of a file too small to keep a training example
    (tmp_path / "one.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    err = bad_run(tmp_path, capsys, monkeypatch, data="one.jsonl", validation_split=0.5)
    assert "validation_split: 0.5 of 1 example(s) leaves none to train on" in err


@pytest.mark.parametrize("layout", ["dp", "pp"])
def test_multi_process_plans_validate_and_count_epochs_as_one_process(tmp_path, layout):
    """dp=2 (each replica evaluates its half of the validation set, the sums reduced) and pp=2 (the
    evaluation forward runs through both stages, the loss on the last) report the valid_loss of the
    one-process run, stop early at the same evaluation, and train an epochs task for the same steps."""
    from safetensors.torch import load_file

    from muxtune.run import execute
    from muxtune.spec import FusionGroup, Layout, Plan, load_config

    config = load_config(overfit_config(tmp_path, steps=8))
    steady = config.task("steady").model_copy(update={"steps": None, "epochs": 1})  # 20 examples: 7 steps
    config = config.model_copy(update={"tasks": [config.task("over"), steady]})
    one = execute(config, tmp_path / "one", progress=False)
    plan = Plan(groups=[FusionGroup(tasks=["over", "steady"], devices=["cpu", "cpu"],
                                    layout=Layout(**{layout: 2}))])
    many = execute(config, tmp_path / "many", plan=plan, progress=False)
    assert one["tasks"]["over"]["status"] == many["tasks"]["over"]["status"] == "stopped_early"
    for name in ("over", "steady"):
        mine, ref = many["tasks"][name], one["tasks"][name]
        assert (mine["steps"], mine["total_steps"], mine["best_step"]) == (ref["steps"], ref["total_steps"],
                                                                           ref["best_step"])
        assert [e["step"] for e in mine["evaluations"]] == [e["step"] for e in ref["evaluations"]]
        torch.testing.assert_close(torch.tensor([e["valid_loss"] for e in mine["evaluations"]], dtype=torch.float64),
                                   torch.tensor([e["valid_loss"] for e in ref["evaluations"]], dtype=torch.float64),
                                   rtol=1e-5, atol=0)
        assert [e["valid_mean_token_accuracy"] for e in mine["evaluations"]] == \
            [e["valid_mean_token_accuracy"] for e in ref["evaluations"]]
        torch.testing.assert_close(torch.tensor(mine["train_mean_token_accuracy"]),
                                   torch.tensor(ref["train_mean_token_accuracy"]), rtol=0, atol=1e-6)
    assert one["tasks"]["steady"]["steps"] == 7
    assert len(one["tasks"]["over"]["evaluations"]) > 0
    best = load_file(str(tmp_path / "many" / "adapters" / "over" / "adapter_model.safetensors"))
    reference = load_file(str(tmp_path / "one" / "adapters" / "over" / "adapter_model.safetensors"))
    for key, value in reference.items():  # the best adapter, put together from both stages / replicas
        torch.testing.assert_close(best[key], value, rtol=0, atol=2e-6, msg=key)


# --- the plan prices the evaluations ----------------------------------------------------------------


def test_predicted_job_time_includes_the_evaluation_forwards(tmp_path):
    from fake_cost_model import FakeCostModel

    from muxtune.planner.plan import simulate_job
    from muxtune.simulator.workload import evaluation_counts, evaluation_micro_batches
    from muxtune.spec import FusionGroup

    specs = tenants(tmp_path, eval_every=2)  # 4, 5 and 6 steps
    trainer = make(specs)
    trainer.train(progress=False)
    from muxtune.run import RunConfig, task_works, with_step_counts

    config = with_step_counts(RunConfig(name="v", tasks=specs), None)
    cm = FakeCostModel(per_token=1e-3)
    works = task_works(config, cm)
    steps = {t.name: t.steps for t in config.tasks}
    counts = evaluation_counts(works, steps)
    # the executor's schedule: after steps 2, 4 (all three), 5 (ia3), 6 (prompt)
    assert counts == {("lora", "ia3", "prompt"): 2, ("ia3",): 1, ("prompt",): 1}
    assert sum(counts.values()) == len(trainer.eval_times) and [s for s, _, _ in trainer.eval_times] == [2, 4, 5, 6]
    assert all(works[n].eval_sequences == 9 for n in steps)

    plan = Plan(groups=[FusionGroup(tasks=list(steps), devices=["cpu"])])
    with_eval = simulate_job(plan, works, steps, cm, packed=True)
    plain = {n: replace(w, eval_sequences=0, eval_every=0) for n, w in works.items()}
    without = simulate_job(plan, plain, steps, cm, packed=True)
    priced = sum(count * cm.evaluation_seconds(evaluation_micro_batches([works[n] for n in due], 16384))
                 for due, count in counts.items())
    assert priced > 0 and with_eval.evaluation == pytest.approx(priced)
    assert with_eval.makespan == pytest.approx(without.makespan + priced) and without.evaluation == 0
    assert with_eval.throughput < without.throughput
