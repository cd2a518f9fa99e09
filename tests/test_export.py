"""Exported adapters are HF PEFT adapters: PeftModel.from_pretrained loads them and gives our logits."""

import json

import pytest
import torch
from reference import assert_hf_peft_reproduces, randomize_b
from test_equivalence import TARGETS, make_trainer, three_tasks

from muxtune.executor.backbone import load_backbone
from muxtune.executor.data import fuse
from muxtune.executor.export import export_adapter, load_adapter_weights


@pytest.mark.parametrize("model_name", list(TARGETS))
def test_exported_adapter_loads_in_peft_with_same_logits(tmp_path, model_name):
    specs = three_tasks(tmp_path, TARGETS[model_name], steps=2)
    trainer, examples = make_trainer(model_name, specs)
    randomize_b(trainer)  # non-zero B, so the adapter changes the logits
    trainer.train(progress=False)

    batch = fuse({s.name: examples[s.name][:2] for s in specs}, trainer.backbone.tokenizer.pad_token_id)
    with torch.no_grad(), trainer.mux.route(batch.segments, batch.input_ids.shape[1], training=False):
        ours = trainer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    plain = load_backbone(model_name).model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    for spec, seg in zip(specs, batch.segments):
        path = export_adapter(trainer.runs[spec.name].adapter, trainer.model, model_name, tmp_path / "out" / spec.name)
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == spec.peft.r
        assert_hf_peft_reproduces(path, load_backbone(model_name).model, batch, seg, ours, plain)


def test_export_roundtrip_and_mismatch_is_refused(tmp_path):
    from muxtune.errors import MuxTuneError

    specs = three_tasks(tmp_path, TARGETS["builtin:tiny-llama"], steps=2)
    trainer, _ = make_trainer("builtin:tiny-llama", specs)
    randomize_b(trainer)
    adapter = trainer.runs["short"].adapter
    path = export_adapter(adapter, trainer.model, "builtin:tiny-llama", tmp_path / "short")
    fresh, _ = make_trainer("builtin:tiny-llama", specs[:1])
    load_adapter_weights(fresh.runs["short"].adapter, path)
    for (_, a), (_, b) in zip(adapter.items(), fresh.runs["short"].adapter.items()):
        assert torch.equal(a.lora_B.weight, b.lora_B.weight)
    # an adapter of another task (other targets and rank) is refused with a clear message
    with pytest.raises(MuxTuneError, match="missing tensor|shapes"):
        load_adapter_weights(trainer.runs["medium"].adapter, path)
