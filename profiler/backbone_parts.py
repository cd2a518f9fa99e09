"""The pieces of a loaded backbone the profiler measures alone: its decoder layers and their inputs, the LM
head's loss, the bare model, a tensor rank's shard of a layer, the op names adapters can target."""

from __future__ import annotations

import copy

import torch
from torch import nn

from muxtune.errors import MuxTuneError
from muxtune.executor.backbone import op_features
from muxtune.executor.data import IGNORE
from muxtune.executor.forward import task_loss_sums
from muxtune.schedule import TENSOR_PARALLEL_FAMILIES


def decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, list) of the model's decoder layers, whatever the family calls them."""
    n = model.config.num_hidden_layers
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and path:
            parent_path, _, attr = path.rpartition(".")
            return model.get_submodule(parent_path) if parent_path else model, attr, module
    raise MuxTuneError(f"model: cannot find the {n} decoder layers of this {model.config.model_type!r} model")


def synthetic_batch(rows: int, seq: int, device: str, vocab: int = 256, seed: int = 0):
    """Random byte tokens; the last row's last slot is padding, so the attention mask is a real tensor
    (a fused batch of several tasks always has some padding)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=gen)
    mask = torch.ones_like(ids)
    if seq > 1:
        mask[-1, -1] = 0
    return ids.to(device), mask.to(device)


def layer_inputs(model: nn.Module, layer: nn.Module, ids, mask):
    """The exact (args, kwargs) the backbone passes its decoder layer for this batch."""
    captured = {}

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Captured

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["args"], captured["kwargs"]


class _Captured(Exception):
    pass


def head_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, tasks: int = 1) -> torch.Tensor:
    """What the trainer does after the backbone, with its own code (executor/forward.task_loss_sums): the
    LM head on loss positions of the last hidden states [rows, seq, d], float CE, `tasks` tasks' loss sums
    (rows split evenly among them) and their hit counts; their total."""
    rows = hidden.shape[0]
    sums, _ = task_loss_sums(model.get_output_embeddings(), hidden, targets, [i * tasks // rows for i in range(rows)],
                             tasks, count_hits=True)
    return sums.sum()


def head_inputs(model: nn.Module, tokens: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf of `tokens` + 1 random last hidden states [1, tokens + 1, d] and `tokens` byte targets [1, tokens]:
    head_loss(model, leaf[:, :-1], targets), the view the trainer hands its head."""
    hidden = torch.randn(1, tokens + 1, model.config.hidden_size, device=device,
                         dtype=model.get_output_embeddings().weight.dtype)
    return hidden, torch.randint(0, 256, (1, tokens), device=device)


def bare_model_loss(model: nn.Module, ids, mask) -> torch.Tensor:
    """The whole frozen backbone + head, with the input embeddings requiring grad so backward computes
    dX through every layer (what an adapter in the first layer makes the real step do)."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)  # padding carries no loss, as the trainer's labels
    return head_loss(model, hidden[:, :-1], targets)


def zero_grads(*trainers) -> None:
    for trainer in trainers:
        for run in trainer.runs.values():
            run.optimizer.zero_grad(set_to_none=True)


TP_DEGREES = (2,)  # tensor-parallel degrees whose layer shards are measured (tp_layer rows)


def tp_shard_layers(model: nn.Module, layer: nn.Module) -> dict[int, nn.Module]:
    """{tp: a decoder layer shaped like one tensor rank's shard} for the TP_DEGREES the executor can
    split this model into (executor/tensor_parallel.py: LLaMA family, tp dividing heads and MLP width).
    A fresh layer of the model's class with heads / tp, KV heads / tp and MLP width / tp (same head
    size): the same ops on the shard's shapes, what each process computes; its weights are random."""
    import copy

    config = model.config
    if config.model_type not in TENSOR_PARALLEL_FAMILIES:
        return {}
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    param = next(layer.parameters())
    out = {}
    for tp in TP_DEGREES:
        if heads % tp or kv_heads % tp or config.intermediate_size % tp:
            continue
        shard = copy.deepcopy(config)
        shard.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shard.num_attention_heads, shard.num_key_value_heads = heads // tp, kv_heads // tp
        shard.intermediate_size = config.intermediate_size // tp
        out[tp] = type(layer)(shard, layer_idx=0).to(device=param.device, dtype=param.dtype).requires_grad_(False)
    return out


def layer_call(model, layer, ids, mask):
    """(forward, hidden, grad, args, kwargs): one decoder layer called as the model calls it on this batch;
    `forward()` -> (output, a fixed random output gradient) for `fwd_bwd_seconds`."""
    args, kwargs = layer_inputs(model, layer, ids, mask)
    hidden, grad = args[0].detach(), torch.randn_like(args[0])

    def forward():
        out = layer(hidden.requires_grad_(), *args[1:], **kwargs)
        return (out[0] if isinstance(out, tuple) else out), grad
    return forward, hidden, grad, args, kwargs


def layer_op_names(model: nn.Module) -> list[str]:
    """Names of the ops of one decoder layer a task can target (`q_proj`, `c_attn`, ...), in order."""
    from transformers.pytorch_utils import Conv1D

    _, _, layers = decoder_layers(model)
    names = []
    for path, module in layers[0].named_modules():
        if path and not path.endswith("base_op") and (isinstance(module, (nn.Linear, Conv1D))
                                                      or hasattr(module, "base_op")):
            name = path.rsplit(".", 1)[-1]
            if name not in names:
                names.append(name)
    return names


def op_input_widths(model: nn.Module) -> dict[str, list[int]]:
    """{op name: the input features of each op of one decoder layer by that name} for the ops a task can
    target: a name can stand for several ops (GPT-2's `c_proj`: the attention's output projection and
    the MLP's down projection, of different widths), and a task targeting it wraps them all."""
    from transformers.pytorch_utils import Conv1D

    _, _, layers = decoder_layers(model)
    widths: dict[str, list[int]] = {}
    for path, module in layers[0].named_modules():
        op = getattr(module, "base_op", module)
        if path and not path.endswith("base_op") and isinstance(op, (nn.Linear, Conv1D)):
            widths.setdefault(path.rsplit(".", 1)[-1], []).append(int(op_features(op)[0]))
    return widths


def layer_param_bytes(model) -> dict:
    """Bytes of the backbone's weights: one decoder layer, the embedding side, the head side."""
    _, _, layers = decoder_layers(model)
    per_layer = sum(p.numel() * p.element_size() for p in layers[0].parameters())
    head = model.get_output_embeddings().weight
    layer_ids = {id(p) for layer in layers for p in layer.parameters()}
    rest = [p for p in model.parameters() if id(p) not in layer_ids and p is not head]
    return {"layer": per_layer, "first": sum(p.numel() * p.element_size() for p in rest),
            "last": head.numel() * head.element_size() if not any(p is head for p in rest) else 0}


def target_names(model: nn.Module, grid: dict) -> list[str]:
    """The op names whose LoRA/DoRA `target` rows are measured: those the tasks at hand target (grid's
    "targets"), else every op of a layer a task can target."""
    names = layer_op_names(model)
    wanted = [n for n in names if n in (grid.get("targets") or [])]
    return wanted or names  # none of this model's names asked (or nothing asked): every op
