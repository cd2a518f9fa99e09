"""Single-task references the tests compare the multiplexed executor against.

`train_hf_peft_alone` is HF PEFT as a user would run it: `get_peft_model` on a fresh backbone, the
model's own causal-LM loss, torch AdamW, transformers' scheduler, torch gradient clipping. It shares
with MuxTune only the data order (the task's seeded sampler) and the initial adapter weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import get_scheduler

from muxtune.executor.backbone import load_backbone
from muxtune.executor.data import TaskSampler, fuse
from muxtune.executor.trainer import make_optimizer
from muxtune.spec import TaskSpec


def write_jsonl(path: Path, n: int, seed: int, min_len: int, max_len: int, kind: str = "pc") -> Path:
    """Small deterministic data set with task-specific lengths."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "blue", "quiet"]
    with open(path, "w") as f:
        for _ in range(n):
            k = rng.randint(min_len, max_len)
            text = " ".join(rng.choice(words) for _ in range(k))
            if kind == "text":
                f.write(json.dumps({"text": text}) + "\n")
            else:
                f.write(json.dumps({"prompt": text + " ->", "completion": " " + rng.choice(words[:3])}) + "\n")
    return path


def randomize_b(trainer, seed: int = 7) -> None:
    """HF PEFT inits B to zero; a random B makes the very first step exercise the A gradients too.
    Layers of other methods (no B) are left as they are."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for run in trainer.runs.values():
            for _, layer in run.adapter.items():
                if hasattr(layer, "lora_B"):
                    layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)


def initial_state(trainer) -> dict[str, dict[str, torch.Tensor]]:
    return {name: adapter_state(trainer, name) for name in trainer.runs}


def adapter_state(trainer, name) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.runs[name].adapter.export_state().items()}


def train_hf_peft_alone(model_name: str, spec: TaskSpec, examples, init_state: dict[str, torch.Tensor],
                        attn: str = "sdpa", pad_to: list[int] | None = None):
    """Returns (per-step losses, final adapter state under HF PEFT's exported keys).
    `pad_to[i]`: right-pad step i's batch to that length (default: to its own longest sequence)."""
    backbone = load_backbone(model_name, attn_implementation=attn)
    fan_in_fan_out = model_name.endswith("gpt2") or "gpt2" in model_name
    from muxtune.executor.peft import method_of

    method = method_of(spec.peft)
    peft_config = method.resolve(spec.peft, backbone.model) if hasattr(method, "resolve") else spec.peft
    hf_config = method.hf_config(peft_config, model_name, fan_in_fan_out)
    model = get_peft_model(backbone.model, hf_config)
    set_peft_model_state_dict(model, init_state)
    loaded = get_peft_model_state_dict(model)  # the reference really starts from our initial weights
    assert set(loaded) == set(init_state) and all(torch.equal(loaded[k], init_state[k]) for k in loaded)
    losses = train_alone(model, [p for p in model.parameters() if p.requires_grad], spec, examples,
                         backbone.tokenizer.pad_token_id, pad_to)
    return losses, {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def train_alone(model, params, spec: TaskSpec, examples, pad_id: int, pad_to: list[int] | None = None) -> list[float]:
    """One task alone, as a user trains it: the HF model's own causal-LM loss, torch AdamW,
    transformers' scheduler, torch clipping. `pad_to[i]`: right-pad step i's batch to that length
    (default: to its own longest sequence). Returns the per-step losses."""
    optimizer = make_optimizer(params, spec.lr, spec.weight_decay)  # torch AdamW, with the executor's settings
    scheduler = get_scheduler(spec.lr_schedule, optimizer, num_warmup_steps=spec.warmup_steps,
                              num_training_steps=spec.steps)
    sampler = TaskSampler(examples, spec.batch_size, spec.seed)
    losses = []
    for step in range(spec.steps):
        batch = fuse({spec.name: sampler.next_batch()}, pad_id)
        ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
        if pad_to is not None:
            extra = pad_to[step] - ids.shape[1]
            ids = torch.nn.functional.pad(ids, (0, extra), value=pad_id)
            mask = torch.nn.functional.pad(mask, (0, extra), value=0)
            labels = torch.nn.functional.pad(labels, (0, extra), value=-100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if spec.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def load_biased_backbone(name, *args, **kwargs):
    """A preset with seeded nonzero biases (the same in every copy). The presets start every bias at
    zero, which would hide how a method treats it (BitFit must swap the frozen bias, not add to it;
    DoRA must not rescale it; IA3 scales it with the output)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from muxtune.executor import backbone as presets  # not this module's name: tests monkeypatch it

    backbone = presets.load_backbone(name, *args, **kwargs)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in backbone.model.modules():
            if isinstance(module, (nn.Linear, Conv1D)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return backbone


def assert_hf_peft_reproduces(path: Path, base, batch, seg, ours: torch.Tensor, plain: torch.Tensor) -> None:
    """HF PEFT, loading the adapter exported at `path` onto the fresh backbone `base`, gives our logits on
    the task's rows `seg` of `batch`; and they differ from the bare backbone's (the adapter does something)."""
    peft_model = PeftModel.from_pretrained(base, str(path))
    peft_model.eval()
    rows = slice(seg.start, seg.end)
    with torch.no_grad():
        theirs = peft_model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits
    mask = batch.attention_mask[rows].bool()
    torch.testing.assert_close(ours[rows][mask], theirs[mask], rtol=1e-5, atol=1e-5)
    assert (theirs[mask] - plain[rows][mask]).abs().max() > 1e-3
