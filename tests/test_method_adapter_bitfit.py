"""Bottleneck adapter and BitFit: multiplexed training equals each task trained alone by a plain
reference (the method written straight into a copy of the backbone, no MuxTune executor), export loads
back with the same logits, and bad configs are refused."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError
from reference import adapter_state, load_biased_backbone, train_alone, write_jsonl
from safetensors.torch import load_file
from test_equivalence import TARGETS, assert_same_training
from torch import nn
from transformers.pytorch_utils import Conv1D

from muxtune.errors import MuxTuneError
from muxtune.executor.backbone import load_backbone
from muxtune.executor.data import fuse, load_examples
from muxtune.executor.export import export_adapter, load_exported
from muxtune.executor.mux import Multiplexer, Segment
from muxtune.executor.peft import adapter as adapter_method
from muxtune.executor.peft import lora as lora_method
from muxtune.executor.trainer import MultiplexedTrainer
from muxtune.spec import TaskSpec, load_config

MODELS = ["builtin:tiny-llama", "builtin:tiny-gpt2", "builtin:tiny-opt"]

# Each family's ops, written here independently of the method modules, so the reference also checks
# that `placement` and BitFit's default targets pick the right ops.
ATTN_OUT = {"builtin:tiny-llama": "self_attn.o_proj", "builtin:tiny-gpt2": "attn.c_proj",
            "builtin:tiny-opt": "self_attn.out_proj"}
FFN_OUT = {"builtin:tiny-llama": "mlp.down_proj", "builtin:tiny-gpt2": "mlp.c_proj", "builtin:tiny-opt": "fc2"}
# an op whose output is not hidden-sized (32, 192, 128 columns), for explicit target_modules
OTHER = {"builtin:tiny-llama": "v_proj", "builtin:tiny-gpt2": "c_attn", "builtin:tiny-opt": "fc1"}


def backbone(model_name):
    return load_biased_backbone(model_name)


def make_trainer(model_name, specs):
    """Padded layout: the plain references take the fused batch's shapes; the chunk-aligned layout
    with every method is tests/test_alignment.py's."""
    from muxtune.spec import Alignment

    bb = backbone(model_name)
    examples = {s.name: load_examples(s.data, bb.tokenizer, s.max_seq_len)[0] for s in specs}
    return MultiplexedTrainer(bb, specs, examples, alignment=Alignment(layout="padded")), examples


def tasks(tmp_path, model_name):
    """Three adapter tasks, two BitFit tasks and a LoRA task: different configs, data, lengths,
    batch sizes, step counts and optimizer settings, all in one fused batch."""
    a = write_jsonl(tmp_path / "a.jsonl", 20, seed=1, min_len=1, max_len=4)
    b = write_jsonl(tmp_path / "b.jsonl", 20, seed=2, min_len=3, max_len=7, kind="text")
    c = write_jsonl(tmp_path / "c.jsonl", 20, seed=3, min_len=5, max_len=9)
    other = OTHER[model_name]
    return [
        TaskSpec(name="ad-both", data=a, peft=dict(method="adapter", size=8), batch_size=3, max_seq_len=64,
                 lr=5e-3, steps=4, seed=21, max_grad_norm=None),
        TaskSpec(name="ad-ffn", data=b, peft=dict(method="adapter", size=16, activation="gelu", placement=["ffn"]),
                 batch_size=2, max_seq_len=96, lr=2e-3, steps=3, seed=22, max_grad_norm=0.5,
                 weight_decay=0.01, lr_schedule="linear", warmup_steps=1),
        TaskSpec(name="ad-explicit", data=c, peft=dict(method="adapter", size=4, activation="tanh",
                                                       target_modules=[other]),
                 batch_size=2, max_seq_len=128, lr=3e-3, steps=4, seed=23, lr_schedule="cosine"),
        TaskSpec(name="bf-all", data=b, peft=dict(method="bitfit"), batch_size=3, max_seq_len=96,
                 lr=5e-3, steps=4, seed=31, max_grad_norm=None),
        TaskSpec(name="bf-some", data=c, peft=dict(method="bitfit", target_modules=[ATTN_OUT[model_name], other]),
                 batch_size=2, max_seq_len=128, lr=2e-3, steps=3, seed=32, max_grad_norm=0.5,
                 weight_decay=0.01, lr_schedule="linear", warmup_steps=1),
        TaskSpec(name="lora", data=a, peft=dict(method="lora", r=4, target_modules=TARGETS[model_name][0]),
                 batch_size=2, max_seq_len=64, lr=5e-3, steps=4, seed=41),
    ]


def perturb(trainer, seed=7):
    """Zero-initialised parts (adapter up projection, LoRA B) would leave the first steps' gradients
    trivial: make every tensor start somewhere nonzero and task-specific."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for run in trainer.runs.values():
            for name, p in run.adapter.named_parameters():
                scale = 0.05 if name.endswith("bias") else 0.1
                if "adapter_down.weight" in name or "lora_A" in name:
                    continue  # already random
                p.add_(torch.randn(p.shape, generator=gen) * scale)


# --- the plain single-task reference --------------------------------------------------------------

REF_ACT = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class SerialAdapter(nn.Module):
    """A frozen op followed by a Houlsby bottleneck on its output: h + up(act(down(h)))."""

    def __init__(self, op, size, activation, features):
        super().__init__()
        self.op, self.act = op, REF_ACT[activation]
        self.down, self.up = nn.Linear(features, size), nn.Linear(size, features)

    def forward(self, x):
        h = self.op(x)
        return h + self.up(self.act(self.down(h)))


def matching_ops(model, names):
    head = model.get_output_embeddings()
    return [(path, m) for path, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m is not head
            and (names is None or any(path.endswith("." + n) for n in names))]


def patch_adapter(model, model_name, config, init):
    names = config.target_modules or [{"attention": ATTN_OUT, "ffn": FFN_OUT}[p][model_name] for p in config.placement]
    trained = {}
    for path, op in matching_ops(model, names):
        features = op.weight.shape[1] if isinstance(op, Conv1D) else op.out_features
        wrapped = SerialAdapter(op, config.size, config.activation, features)
        key = f"base_model.model.{path}"
        with torch.no_grad():
            for ours, ref in (("adapter_down", wrapped.down), ("adapter_up", wrapped.up)):
                ref.weight.copy_(init[f"{key}.{ours}.weight"])
                ref.bias.copy_(init[f"{key}.{ours}.bias"])
                trained[f"{key}.{ours}.weight"], trained[f"{key}.{ours}.bias"] = ref.weight, ref.bias
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, wrapped)
    return trained


def patch_bitfit(model, model_name, config, init):
    """The ops themselves get a trainable bias (LLaMA's ops, which have none, gain one)."""
    trained = {}
    for path, op in matching_ops(model, config.target_modules):
        key = f"base_model.model.{path}.bias"
        op.bias = nn.Parameter(init[key].clone())
        trained[key] = op.bias
    return trained


def train_plain_alone(model_name, spec, examples, init, pad_to=None):
    """One task on a fresh backbone: HF's own causal-LM loss, torch AdamW, transformers' scheduler,
    torch clipping. Shares with MuxTune only the data order and the initial weights.
    Returns (per-step losses, final weights under the exported keys)."""
    model = backbone(model_name).model
    patch = {"adapter": patch_adapter, "bitfit": patch_bitfit}[spec.peft.method]
    trained = patch(model, model_name, spec.peft, init)
    losses = train_alone(model, list(trained.values()), spec, examples, 256, pad_to)
    return losses, {k: v.detach().clone() for k, v in trained.items()}


def key_bias(key, tensor):
    """Which entries of an exported bias are attention key biases (GPT-2 packs q, k, v in c_attn)."""
    mask = torch.zeros_like(tensor, dtype=torch.bool)
    if key.endswith("k_proj.bias"):
        mask[:] = True
    elif key.endswith("c_attn.bias"):
        third = tensor.shape[0] // 3
        mask[third : 2 * third] = True
    return mask


def assert_same_bitfit(losses, ref_losses, state, ref_state, init):
    """assert_same_training, less the attention key biases. Softmax ignores a shift shared by all keys,
    so a key bias changes no output: its true gradient is zero, its computed gradient is rounding noise
    (~1e-11), and Adam, normalising by that noise, steps it by up to lr either way in either run. The
    losses (compared in full) show the two models compute the same function."""
    keep = {k: ~key_bias(k, v) for k, v in state.items()}
    keep = {k: m for k, m in keep.items() if m.any()}  # LLaMA/OPT's k_proj bias goes entirely
    assert set(ref_state) == set(state)
    assert_same_training(losses, ref_losses, *({k: d[k][m] for k, m in keep.items()} for d in (state, ref_state, init)))


# --- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", MODELS)
def test_multiplexed_equals_plain_reference_alone(tmp_path, model_name):
    specs = tasks(tmp_path, model_name)
    trainer, examples = make_trainer(model_name, specs)
    perturb(trainer)
    init = {s.name: adapter_state(trainer, s.name) for s in specs}
    trainer.train(progress=False)
    assert all(p.grad is None and not p.requires_grad for p in trainer.model.parameters())

    for spec in specs:
        if spec.peft.method == "lora":
            continue  # covered against HF PEFT by test_equivalence; here it only shares the batch
        run = trainer.runs[spec.name]
        assert run.status == "finished" and len(run.losses) == spec.steps
        ours = adapter_state(trainer, spec.name)
        # 1. each reference batch padded to the fused batch's length: equal shapes
        pad_to = [seq for _, seq in trainer.step_shapes[: spec.steps]]
        ref_losses, ref_state = train_plain_alone(model_name, spec, examples[spec.name], init[spec.name], pad_to)
        assert set(ours) == set(ref_state), spec.name  # resolve() chose exactly the reference's ops
        if spec.peft.method == "adapter":
            # The same arithmetic in the same order: bit-identical weights, but for one thing. When a
            # reference batch happens to have no padding (ad-explicit's 4th on LLaMA: two rows of 62),
            # transformers runs SDPA's is_causal kernel instead of the masked one the fused batch
            # needs; its dV then differs by an ulp, so allow a few ulps.
            torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
            for key in ours:
                torch.testing.assert_close(ours[key], ref_state[key], rtol=1e-6, atol=1e-9, msg=f"{spec.name} {key}")
        else:
            # BitFit cannot be bit-identical: the shared op runs with the frozen bias and the task's
            # bias replaces it after the GEMM, (xW + b0) + (b - b0), while the reference's op computes
            # xW + b: fp32 rounding apart.
            assert_same_bitfit(run.losses, ref_losses, ours, ref_state, init[spec.name])
        # 2. each reference batch padded to its own longest sequence, as a user runs it alone
        ref_losses, ref_state = train_plain_alone(model_name, spec, examples[spec.name], init[spec.name])
        same = assert_same_training if spec.peft.method == "adapter" else assert_same_bitfit
        same(run.losses, ref_losses, ours, ref_state, init[spec.name])


@pytest.mark.parametrize("model_name", MODELS)
def test_identity_at_init_and_export_reloads_same_logits(tmp_path, model_name):
    specs = [s for s in tasks(tmp_path, model_name) if s.name in ("ad-both", "bf-all", "lora")]
    specs[0] = specs[0].model_copy(update={"peft": specs[0].peft.model_copy(update={"activation": "silu"})})
    trainer, examples = make_trainer(model_name, specs)
    batch = fuse({s.name: examples[s.name][:2] for s in specs}, 256)
    seq = batch.input_ids.shape[1]
    plain = backbone(model_name).model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def logits(mux, segments, rows=slice(None)):
        with torch.no_grad(), mux.route(segments, seq, training=False):
            return trainer.model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits

    # zero up projection / frozen bias as the task's own: both methods start as the bare backbone, bit for bit
    torch.testing.assert_close(logits(trainer.mux, batch.segments), plain, rtol=0, atol=0)

    perturb(trainer)
    for _ in range(2):
        trainer.step()
    ours = logits(trainer.mux, batch.segments)
    for spec, seg in zip(specs, batch.segments):
        if spec.peft.method == "lora":
            continue
        path = export_adapter(trainer.runs[spec.name].adapter, trainer.model, model_name, tmp_path / "out" / spec.name)
        meta = json.loads((path / "adapter_config.json").read_text())
        assert meta["format"] == "muxtune" and meta["method"] == spec.peft.method
        assert meta["peft"]["target_modules"]  # resolved defaults are recorded: loading needs no model type
        assert set(load_file(str(path / "adapter_model.safetensors"))) == set(adapter_state(trainer, spec.name))

        fresh = backbone(model_name).model
        mux, _ = load_exported(path, fresh)
        rows = slice(seg.start, seg.end)
        n = seg.end - seg.start
        with torch.no_grad(), mux.route([Segment("exported", 0, n)], seq, training=False):
            theirs = fresh(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits
        mask = batch.attention_mask[rows].bool()
        torch.testing.assert_close(theirs[mask], ours[rows][mask], rtol=1e-5, atol=1e-5)
        assert (theirs[mask] - plain[rows][mask]).abs().max() > 1e-3  # and the adapter does something


def test_adapter_init_depends_on_the_task_seed_alone():
    """Same seed -> same initial adapter, whatever was attached before it and whatever the global RNG."""
    config = adapter_method.Config(size=8, placement=["ffn"])

    def init(seed, neighbours, global_seed):
        torch.manual_seed(global_seed)
        mux = Multiplexer.attach(backbone("builtin:tiny-opt").model)
        for i, neighbour in enumerate(neighbours):
            mux.add_task(f"n{i}", neighbour, seed=100 + i, max_seq_len=16)
        return mux.add_task("t", config, seed=seed, max_seq_len=16).export_state()

    alone = init(3, [], global_seed=0)
    crowded = init(3, [lora_method.Config(target_modules=["fc2"]), adapter_method.Config(size=4)], global_seed=1)
    other_seed = init(4, [], global_seed=0)
    assert alone.keys() == crowded.keys() and all(torch.equal(alone[k], crowded[k]) for k in alone)
    assert any(not torch.equal(alone[k], other_seed[k]) for k in alone if k.endswith("adapter_down.weight"))
    assert all(not alone[k].any() for k in alone if "adapter_up" in k or k.endswith("bias"))  # identity at init


def test_export_keys_name_the_ops(tmp_path):
    specs = [s for s in tasks(tmp_path, "builtin:tiny-llama") if s.name in ("ad-both", "bf-all")]
    trainer, _ = make_trainer("builtin:tiny-llama", specs)
    keys = set(adapter_state(trainer, "ad-both"))
    assert "base_model.model.model.layers.0.self_attn.o_proj.adapter_down.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.adapter_up.bias" in keys
    assert len(keys) == 2 * 2 * 4  # 2 layers x {o_proj, down_proj} x {down, up} x {weight, bias}
    bias = adapter_state(trainer, "bf-all")
    assert len(bias) == 2 * 7 and all(k.endswith(".bias") for k in bias)
    # LLaMA's ops have no bias: BitFit adds one, starting at zero
    assert all(not v.any() for v in bias.values())


@pytest.mark.parametrize("peft, message", [
    (dict(method="adapter", r=4), "r\n  Extra inputs are not permitted"),
    (dict(method="adapter", size=0), "size\n  Input should be greater than or equal to 1"),
    (dict(method="adapter", activation="swish"), "activation"),
    (dict(method="adapter", placement=["encoder"]), "placement.0"),
    (dict(method="adapter", dropout=1.0), "dropout"),
    (dict(method="bitfit", rank=2), "rank\n  Extra inputs are not permitted"),
    (dict(method="bitfit", target_modules=[]), "target_modules"),
])
def test_bad_config_is_refused(tmp_path, peft, message):
    with pytest.raises(ValidationError, match=message):
        TaskSpec(name="t", data=tmp_path / "d.jsonl", peft=peft)


def test_bad_config_message_names_the_key(tmp_path):
    config = {"name": "run", "tasks": [{"name": "t", "data": "d.jsonl", "peft": {"method": "adapter", "r": 4}}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(MuxTuneError, match=r"run.yaml:\d+: tasks\[0\]\.peft\.r: unknown key"):
        load_config(tmp_path / "run.yaml")


def test_unknown_model_type_needs_target_modules(tmp_path):
    specs = [s for s in tasks(tmp_path, "builtin:tiny-llama") if s.name == "ad-both"]
    model = load_backbone("builtin:tiny-llama").model
    model.config.model_type = "mystery"
    with pytest.raises(MuxTuneError, match="peft.placement: .*'mystery'.*set peft.target_modules"):
        Multiplexer.attach(model).add_task("t", specs[0].peft, seed=0, max_seq_len=16)
    # naming the ops works for any model
    explicit = specs[0].peft.model_copy(update={"target_modules": ["o_proj"]})
    adapter = Multiplexer.attach(model).add_task("t", explicit, seed=0, max_seq_len=16)
    assert len(adapter.paths) == 2


def test_adapter_dropout_is_isolated_from_neighbours(tmp_path):
    """The serial adapter's dropout (on the op's output) comes from the task's seed alone."""
    from reference import initial_state
    from test_equivalence import assert_same_training

    specs = [s for s in tasks(tmp_path, "builtin:tiny-gpt2")]
    specs = [s.model_copy(update={"peft": s.peft.model_copy(update={"dropout": 0.2})}) if s.peft.method == "adapter"
             else s for s in specs]
    together, _ = make_trainer("builtin:tiny-gpt2", specs)
    init = initial_state(together)
    together.train(progress=False)
    dropped = [s for s in specs if s.peft.method == "adapter"][0]
    alone, _ = make_trainer("builtin:tiny-gpt2", [dropped])
    alone.train(progress=False)
    assert_same_training(alone.runs[dropped.name].losses, together.runs[dropped.name].losses,
                         adapter_state(alone, dropped.name), adapter_state(together, dropped.name),
                         init[dropped.name])
    # and dropout really acts: with p=0 the same task trains differently
    plain, _ = make_trainer("builtin:tiny-gpt2", [s for s in tasks(tmp_path, "builtin:tiny-gpt2") if s.name == dropped.name])
    plain.train(progress=False)
    assert plain.runs[dropped.name].losses != alone.runs[dropped.name].losses
