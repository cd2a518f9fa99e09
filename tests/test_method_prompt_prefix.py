"""Prompt and prefix tuning multiplexed with other methods equal HF PEFT trained alone; their
neighbours in the fused batch are unaffected."""

import pytest
from pydantic import ValidationError
from reference import adapter_state, initial_state, randomize_b, train_hf_peft_alone, write_jsonl
from test_equivalence import PADDED, TARGETS, assert_same_training, make_trainer

from muxtune.errors import MuxTuneError
from muxtune.spec import TaskSpec


def mixed_tasks(tmp_path, model_name, steps=3):
    a = write_jsonl(tmp_path / "a.jsonl", 30, seed=1, min_len=2, max_len=8)
    b = write_jsonl(tmp_path / "b.jsonl", 30, seed=2, min_len=6, max_len=20, kind="text")
    c = write_jsonl(tmp_path / "c.jsonl", 30, seed=3, min_len=10, max_len=30)
    return [
        TaskSpec(name="prompt", data=a, peft=dict(method="prompt", num_virtual_tokens=5), batch_size=3,
                 max_seq_len=64, lr=1e-2, steps=steps, seed=21),
        TaskSpec(name="prefix", data=b, peft=dict(method="prefix", num_virtual_tokens=7), batch_size=2,
                 max_seq_len=96, lr=1e-2, steps=steps + 1, seed=22, lr_schedule="linear"),
        TaskSpec(name="lora", data=c, peft=dict(method="lora", r=4, target_modules=TARGETS[model_name][0]),
                 batch_size=2, max_seq_len=128, lr=5e-3, steps=steps, seed=23),
        TaskSpec(name="prefix-short", data=c, peft=dict(method="prefix", num_virtual_tokens=2), batch_size=1,
                 max_seq_len=128, lr=1e-2, steps=steps, seed=24),
    ]


@pytest.mark.parametrize("model_name", list(TARGETS))
def test_prompt_and_prefix_equal_hf_peft_alone_in_a_mixed_batch(tmp_path, model_name):
    specs = mixed_tasks(tmp_path, model_name)
    trainer, examples = make_trainer(model_name, specs)
    randomize_b(trainer)
    init = initial_state(trainer)
    trainer.train(progress=False)
    for spec in specs:
        ref_losses, ref_state = train_hf_peft_alone(model_name, spec, examples[spec.name], init[spec.name])
        run = trainer.runs[spec.name]
        assert len(run.losses) == spec.steps
        assert_same_training(run.losses, ref_losses, adapter_state(trainer, spec.name), ref_state, init[spec.name])


def test_neighbours_of_prompt_and_prefix_tasks_are_unaffected(tmp_path):
    specs = mixed_tasks(tmp_path, "builtin:tiny-llama")
    together, _ = make_trainer("builtin:tiny-llama", specs)
    init = initial_state(together)
    together.train(progress=False)
    for spec in specs:
        alone, _ = make_trainer("builtin:tiny-llama", [spec])
        alone.train(progress=False)
        assert_same_training(alone.runs[spec.name].losses, together.runs[spec.name].losses,
                             adapter_state(alone, spec.name), adapter_state(together, spec.name), init[spec.name])


def test_prompt_rows_see_virtual_tokens_and_others_do_not(tmp_path):
    specs = mixed_tasks(tmp_path, "builtin:tiny-llama")
    trainer, _ = make_trainer("builtin:tiny-llama", specs, alignment=PADDED)
    trainer.step()
    rows, seq = trainer.step_shapes[-1]
    assert rows == 3 + 2 + 2 + 1
    # the prompt task's rows start with 5 attended slots that carry no loss
    from muxtune.executor.data import fuse

    batches = {s.name: trainer.runs[s.name].sampler.examples[:2] for s in specs}
    batch = fuse(batches, 256, lead={"prompt": 5})
    assert batch.attention_mask[0:2, :5].all() and (batch.labels[0:2, :5] == -100).all()
    assert batch.input_ids[0, 5] == 257  # the task's own sequence (bos first) follows the virtual tokens
    assert batch.input_ids[2, 0] == 257  # other tasks' rows start with their own bos


def test_prefix_longer_than_the_model_allows_is_refused(tmp_path):
    spec = mixed_tasks(tmp_path, "builtin:tiny-llama")[1].model_copy(
        update={"peft": TaskSpec.model_validate({"name": "x", "data": "x", "steps": 1,
                                                      "peft": {"method": "prefix", "num_virtual_tokens": 4000}}).peft,
                "max_seq_len": 200})
    with pytest.raises(MuxTuneError, match=r"task 'prefix': peft.num_virtual_tokens \+ max_seq_len = 4200 exceeds"):
        make_trainer("builtin:tiny-llama", [spec])


@pytest.mark.parametrize("peft", [{"method": "prompt", "r": 4}, {"method": "prefix", "num_virtual_tokens": 0},
                                  {"method": "lora", "num_virtual_tokens": 3}, {"method": "unknown"}])
def test_parameters_of_another_method_are_refused(peft):
    with pytest.raises(ValidationError):
        TaskSpec(name="t", data="d.jsonl", peft=peft)
