"""DoRA and (IA)^3: multiplexed training (mixed with other methods in ONE fused batch) equals each task
trained alone with HF PEFT (LoraConfig(use_dora=True) / IA3Config), exported adapters load in HF PEFT
with the same logits, IA3's defaults are peft's, and bad configs are refused.

HF PEFT has both methods on all three families (LLaMA Linear, GPT-2 Conv1D, OPT Linear with biases):
no family is skipped."""

import json

import pytest
import reference
import test_equivalence
import torch
from peft import IA3Config, get_peft_model
from pydantic import ValidationError
from reference import (adapter_state, assert_hf_peft_reproduces, initial_state, load_biased_backbone, train_hf_peft_alone,
                       write_jsonl)
from test_equivalence import PADDED, assert_same_training, make_trainer

from muxtune.errors import MuxTuneError
from muxtune.executor.backbone import load_backbone
from muxtune.executor.data import TaskSampler, fuse
from muxtune.executor.export import export_adapter, load_adapter_weights
from muxtune.executor.peft import dora, ia3
from muxtune.spec import TaskSpec

MODELS = ["builtin:tiny-llama", "builtin:tiny-gpt2", "builtin:tiny-opt"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models' ops take microseconds; a second intra-op thread only adds wake-ups, which on a
    busy 2-core machine cost a scheduler slice (~7 ms) per op: measured 8.5 s vs 0.17 s for the same
    4 fused steps. Both sides of every comparison run under the same setting; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def biased_backbones(monkeypatch):
    # every backbone of these tests, ours (make_trainer) and HF PEFT's (train_hf_peft_alone), is biased
    monkeypatch.setattr(reference, "load_backbone", load_biased_backbone)
    monkeypatch.setattr(test_equivalence, "load_backbone", load_biased_backbone)


# Per family: two DoRA target sets (the second on ops with a bias where the family has one, plus an
# MLP op), and a LoRA neighbour sharing ops with both, so LoRA and DoRA rows meet in the same op call.
DORA_TARGETS = {
    "builtin:tiny-llama": (["q_proj", "v_proj"], ["o_proj", "down_proj", "v_proj"], ["v_proj", "down_proj"]),
    "builtin:tiny-gpt2": (["c_attn"], ["c_proj", "c_fc"], ["c_attn", "c_fc"]),  # Conv1D: fan_in_fan_out
    "builtin:tiny-opt": (["q_proj", "v_proj"], ["out_proj", "fc2", "fc1"], ["v_proj", "fc2"]),
}
# Per family: IA3 with explicit targets (some feed-forward = input-scaled), IA3 with targets only (the
# feed-forward default is filled from peft's table), and the LoRA neighbour's targets. The neighbour
# shares a feed-forward op, so there one task's rows are scaled before the shared op, another's after.
IA3_TARGETS = {
    "builtin:tiny-llama": (dict(target_modules=["q_proj", "up_proj", "o_proj"], feedforward_modules=["up_proj"]),
                           dict(target_modules=["q_proj", "down_proj"]), ["down_proj", "up_proj"]),
    # c_attn is Conv1D and output-scaled (bias included); c_proj names both attn.c_proj and mlp.c_proj,
    # and peft's feed-forward default mlp.c_proj then applies to the MLP one only
    "builtin:tiny-gpt2": (dict(target_modules=["c_fc", "c_attn"], feedforward_modules=["c_fc"]),
                          dict(target_modules=["c_attn", "c_proj"]), ["c_fc", "c_proj"]),
    "builtin:tiny-opt": (dict(target_modules=["v_proj", "fc1", "out_proj"], feedforward_modules=["fc1"]),
                         dict(target_modules=["k_proj", "fc2"]), ["fc1", "fc2"]),
}


def data(tmp_path):
    """Three small data sets of different lengths (21-46, 28-72, 48-93 tokens): natural padding
    differs from the fused batch's. None is cut at max_seq_len, see assert_alone_batches_padded."""
    return (write_jsonl(tmp_path / "a.jsonl", 30, seed=1, min_len=2, max_len=6),
            write_jsonl(tmp_path / "b.jsonl", 30, seed=2, min_len=5, max_len=12, kind="text"),
            write_jsonl(tmp_path / "c.jsonl", 25, seed=3, min_len=7, max_len=14))


def dora_tasks(tmp_path, model_name, steps=3, dropout=0.0):
    a, b, c = data(tmp_path)
    t1, t2, tl = DORA_TARGETS[model_name]
    return [
        TaskSpec(name="dora-a", data=a, peft=dict(method="dora", r=4, alpha=8, dropout=dropout, target_modules=t1),
                 batch_size=3, max_seq_len=64, lr=5e-3, steps=steps, seed=11, max_grad_norm=None),
        TaskSpec(name="dora-b", data=c, peft=dict(method="dora", r=8, alpha=16, dropout=dropout, target_modules=t2,
                                                  use_rslora=True),
                 batch_size=2, max_seq_len=96, lr=2e-3, steps=steps + 1, seed=12, max_grad_norm=0.5,
                 weight_decay=0.01, lr_schedule="linear", warmup_steps=1),
        TaskSpec(name="lora", data=b, peft=dict(method="lora", r=4, alpha=8, target_modules=tl),
                 batch_size=2, max_seq_len=96, lr=3e-3, steps=steps, seed=13, lr_schedule="cosine"),
    ]


def ia3_tasks(tmp_path, model_name, steps=3):
    a, b, c = data(tmp_path)
    explicit, targets_only, tl = IA3_TARGETS[model_name]
    return [
        TaskSpec(name="ia3-default", data=a, peft=dict(method="ia3"),  # peft's per-model-type defaults
                 batch_size=3, max_seq_len=64, lr=5e-3, steps=steps, seed=21, max_grad_norm=None),
        TaskSpec(name="ia3-explicit", data=b, peft=dict(method="ia3", **explicit),
                 batch_size=2, max_seq_len=96, lr=2e-3, steps=steps + 1, seed=22, max_grad_norm=0.5,
                 weight_decay=0.01, lr_schedule="linear", warmup_steps=1),
        TaskSpec(name="ia3-targets", data=c, peft=dict(method="ia3", **targets_only),
                 batch_size=2, max_seq_len=96, lr=3e-3, steps=steps, seed=23, lr_schedule="cosine"),
        TaskSpec(name="lora", data=b, peft=dict(method="lora", r=4, alpha=8, target_modules=tl),
                 batch_size=2, max_seq_len=96, lr=3e-3, steps=steps - 1, seed=24),
    ]


TASKS = {"dora": dora_tasks, "ia3": ia3_tasks}


def perturb(trainer, seed=7):
    """HF PEFT starts LoRA B at zero, the DoRA magnitude at ||W|| and IA3 vectors at one: the first
    steps' gradients would be special. Start every task somewhere nontrivial and task-specific."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for run in trainer.runs.values():
            for name, p in run.adapter.named_parameters():
                if name.endswith("lora_B.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                elif name.endswith("lora_magnitude_vector.weight"):
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                elif name.endswith("ia3_l"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))


def assert_alone_batches_padded(spec, examples, pad_to):
    """Bit-identity at equal shapes also needs the same attention CALL alone as fused. For a batch
    without padding, transformers' sdpa integration drops the mask and calls SDPA with is_causal=True
    (and enable_gqa=True for LLaMA's grouped KV heads instead of repeat_kv): another kernel, with the
    same forward but a backward whose dV rounds differently (measured on tiny-llama layer 0: 2.4e-7 on
    dV, weights 3e-8 apart after 3 steps). A fused batch of tasks of different lengths is padded, so
    each task's batch alone, padded to the fused length, must be too: one of its rows is shorter."""
    sampler = TaskSampler(examples, spec.batch_size, spec.seed)
    for step, seq in enumerate(pad_to):
        lengths = [len(ex.input_ids) for ex in sampler.next_batch()]
        assert min(lengths) < seq, f"{spec.name} step {step}: rows {lengths} all fill the fused length {seq}"


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("method", ["dora", "ia3"])
@pytest.mark.parametrize("model_name", MODELS)
def test_multiplexed_equals_hf_peft_alone(tmp_path, model_name, method):
    specs = TASKS[method](tmp_path, model_name)
    # padded layout: the reference can then take the fused batch's shapes (bit-identical check 2);
    # the chunk-aligned layout with every method is tests/test_alignment.py's
    trainer, examples = make_trainer(model_name, specs, alignment=PADDED)
    perturb(trainer)
    init = initial_state(trainer)
    trainer.train(progress=False)
    assert all(p.grad is None and not p.requires_grad for p in trainer.model.parameters())

    for spec in specs:
        run = trainer.runs[spec.name]
        assert run.status == "finished" and len(run.losses) == spec.steps
        ours = adapter_state(trainer, spec.name)
        # 1. HF PEFT alone, each batch padded to its own longest sequence (as a user runs it): the
        #    attention kernels round differently at another length, hence test_equivalence's scaled bound
        ref_losses, ref_state = train_hf_peft_alone(model_name, spec, examples[spec.name], init[spec.name])
        assert_same_training(run.losses, ref_losses, ours, ref_state, init[spec.name])
        # 2. HF PEFT alone, padded to the fused batch's lengths (same shapes): bit-identical weights
        pad_to = [seq for _, seq in trainer.step_shapes[: spec.steps]]
        assert_alone_batches_padded(spec, examples[spec.name], pad_to)
        ref_losses, ref_state = train_hf_peft_alone(model_name, spec, examples[spec.name], init[spec.name],
                                                    pad_to=pad_to)
        torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
        assert set(ours) == set(ref_state)
        assert max_diff(ours, init[spec.name]) > 1e-4  # training moved the weights
        for key in ours:
            torch.testing.assert_close(ours[key], ref_state[key], rtol=0, atol=0, msg=f"{spec.name} {key}")


@pytest.mark.parametrize("method", ["dora", "ia3"])
@pytest.mark.parametrize("model_name", MODELS)
def test_exported_adapter_loads_in_peft_with_same_logits(tmp_path, model_name, method):
    specs = TASKS[method](tmp_path, model_name, steps=2)
    trainer, examples = make_trainer(model_name, specs)
    perturb(trainer)
    trainer.train(progress=False)

    batch = fuse({s.name: examples[s.name][:2] for s in specs}, trainer.backbone.tokenizer.pad_token_id)
    with torch.no_grad(), trainer.mux.route(batch.segments, batch.input_ids.shape[1], training=False):
        ours = trainer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    plain = load_biased_backbone(model_name).model(input_ids=batch.input_ids,
                                                   attention_mask=batch.attention_mask).logits
    fresh, _ = make_trainer(model_name, specs)  # same configs, other weights: for loading exports back

    for spec, seg in zip(specs, batch.segments):
        adapter = trainer.runs[spec.name].adapter
        path = export_adapter(adapter, trainer.model, model_name, tmp_path / "out" / spec.name)
        config = json.loads((path / "adapter_config.json").read_text())
        if spec.peft.method == "ia3":
            assert config["peft_type"] == "IA3"
            assert set(config["target_modules"]) == set(adapter.config.target_modules)
            assert set(config["feedforward_modules"]) == set(adapter.config.feedforward_modules)
        else:
            assert config["peft_type"] == "LORA" and config["use_dora"] == (spec.peft.method == "dora")
        assert_hf_peft_reproduces(path, load_biased_backbone(model_name).model, batch, seg, ours, plain)

        # and the exported weights load back into a fresh task of the same config
        load_adapter_weights(fresh.runs[spec.name].adapter, path)
        assert max_diff(adapter_state(fresh, spec.name), adapter_state(trainer, spec.name)) == 0


@pytest.mark.parametrize("model_name", ["builtin:tiny-gpt2", "builtin:tiny-opt"])  # Conv1D; Linear with bias
def test_dora_dropout_matches_peft_layer(model_name):
    """With dropout on, peft's DoRA recomputes W x on the DROPPED input (the shared output saw the
    undropped one). Our layer against peft's, same mask injected into both: outputs and gradients."""
    target = DORA_TARGETS[model_name][1]
    spec_peft = dora.Config(r=4, alpha=8, dropout=0.3, target_modules=target)
    fifo = model_name.endswith("gpt2")
    peft_model = get_peft_model(load_biased_backbone(model_name).model, dora.hf_config(spec_peft, model_name, fifo))
    peft_model.train()
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for path, module in peft_model.base_model.model.named_modules():
        if not hasattr(module, "lora_magnitude_vector") or "default" not in module.lora_magnitude_vector:
            continue
        base_op = module.get_base_layer()
        ours = dora.build_layer(spec_peft, base_op, path, gen)
        with torch.no_grad():
            ours.lora_B.weight.copy_(torch.randn(ours.lora_B.weight.shape, generator=gen) * 0.1)
            ours.lora_magnitude_vector.weight.mul_(1.1)
        state = ours.export_state("x")
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(state["x.lora_A.weight"])
            module.lora_B["default"].weight.copy_(state["x.lora_B.weight"])
            module.lora_magnitude_vector["default"].weight.copy_(state["x.lora_magnitude_vector"])
        in_features = ours.lora_A.weight.shape[1]
        x = torch.randn(2, 5, in_features, generator=gen)
        mask = (torch.rand(x.shape, generator=gen) > 0.3).float() / 0.7
        module.lora_dropout["default"] = _FixedMask(mask)

        x1 = x.clone().requires_grad_()
        theirs = module(x1)
        theirs.square().sum().backward()
        x2 = x.clone().requires_grad_()
        flat = x2.reshape(-1, in_features)
        mine = ours.aggregate(flat, base_op(flat), mask.reshape(-1, in_features)).view(theirs.shape)
        mine.square().sum().backward()
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
        for ours_p, theirs_p in ((ours.lora_A.weight, module.lora_A["default"].weight),
                                 (ours.lora_B.weight, module.lora_B["default"].weight),
                                 (ours.lora_magnitude_vector.weight, module.lora_magnitude_vector["default"].weight)):
            torch.testing.assert_close(ours_p.grad, theirs_p.grad, rtol=0, atol=0)
        checked += 1
    assert checked >= 4


class _FixedMask(torch.nn.Module):
    """Stands in for peft's nn.Dropout with a given inverted-dropout mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def test_dora_with_dropout_does_not_depend_on_neighbours(tmp_path):
    """Dropout masks come from the task's seed: alone or mixed with LoRA and IA3 tasks, same result."""
    model_name = "builtin:tiny-opt"
    specs = dora_tasks(tmp_path, model_name, dropout=0.2) + ia3_tasks(tmp_path, model_name)[:1]
    together, _ = make_trainer(model_name, specs)
    perturb(together)
    init = initial_state(together)
    together.train(progress=False)
    spec = specs[1]  # DoRA on ops with a bias, next to a DoRA, a LoRA and an IA3 task
    alone, _ = make_trainer(model_name, [spec])
    alone.runs[spec.name].adapter.load_export_state(init[spec.name])
    alone.train(progress=False)
    assert_same_training(alone.runs[spec.name].losses, together.runs[spec.name].losses,
                         adapter_state(alone, spec.name), adapter_state(together, spec.name), init[spec.name])


@pytest.mark.parametrize("model_name", MODELS)
def test_ia3_places_vectors_where_peft_does(model_name):
    """resolve() fills peft's own defaults; every op gets the same kind of vector (input-scaled on
    feed-forward ops, output-scaled elsewhere) of the same shape as under HF PEFT's get_peft_model."""
    model = load_backbone(model_name).model
    fifo = model_name.endswith("gpt2")
    for given in ({}, *IA3_TARGETS[model_name][:2]):
        config = ia3.resolve(ia3.Config(**given), model)
        ours = {path: ia3.build_layer(config, model.get_submodule(path), path, None)
                for path in _target_paths(model, config)}
        # peft as a user would call it (peft fills an omitted feed-forward list itself)
        theirs = get_peft_model(load_backbone(model_name).model,
                                IA3Config(task_type="CAUSAL_LM", fan_in_fan_out=fifo, **given))
        placed = {path: m for path, m in theirs.base_model.model.named_modules() if hasattr(m, "ia3_l")}
        assert set(ours) == set(placed), given
        for path, layer in ours.items():
            assert hasattr(layer, "dispatch") == placed[path].is_feedforward, (given, path)
            assert layer.ia3_l.shape == placed[path].ia3_l["default"].shape
        # and the config we export is one peft accepts (feed-forward modules among the targets)
        ia3.hf_config(config, model_name, fifo)


def _target_paths(model, config):
    from muxtune.executor.backbone import target_ops

    return [path for path, _ in target_ops(model, config.target_modules)]


def test_bad_configs_are_refused(tmp_path):
    def spec(**peft):
        return TaskSpec(name="t", data=tmp_path / "d.jsonl", peft=peft, steps=50)

    assert spec(method="ia3").peft.target_modules is None  # defaults are filled per model, later
    assert spec(method="dora", r=4).peft.scaling == 16 / 4
    for peft in (dict(method="ia3", r=4),                                  # a LoRA key on IA3
                 dict(method="ia3", dropout=0.1),
                 dict(method="dora", feedforward_modules=["down_proj"]),  # an IA3 key on DoRA
                 dict(method="dora", r=0),
                 dict(method="ia3", target_modules=[]),
                 # peft refuses feed-forward modules that are not targets (and could not reload them)
                 dict(method="ia3", target_modules=["q_proj"], feedforward_modules=["down_proj"])):
        with pytest.raises(ValidationError):
            spec(**peft)
    # explicit feed-forward modules outside peft's default targets
    with pytest.raises(MuxTuneError, match="feedforward_modules"):
        ia3.resolve(ia3.Config(feedforward_modules=["up_proj"]), load_backbone("builtin:tiny-llama").model)
    # a model type peft has no IA3 defaults for
    fake = torch.nn.Linear(2, 2)
    fake.config = type("C", (), {"model_type": "no-such-model"})()
    with pytest.raises(MuxTuneError, match="no IA3 default"):
        ia3.resolve(ia3.Config(), fake)
