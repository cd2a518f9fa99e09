"""Admission: refuse a task or plan that is predicted not to fit in device memory, up front, with the
numbers, instead of running out of memory halfway.

No profiled CostModel is merged yet, so the prediction is an estimate from the model's shape:

    needed = backbone weights (as loaded)
           + per task: trainable adapter parameters x 16 bytes (fp32 weight, gradient, two AdamW moments)
           + activations of the largest fused micro-batch:
               tokens x layers x (8 x hidden + 4 x ffn) x backbone dtype bytes   (what autograd keeps
                 per token and layer: norms, q/k/v, attention output, residuals, the MLP's inputs)
             + tokens x vocab x 8 bytes                                           (fp32 logits + their
                 gradient; an upper bound, the LM head only runs on target tokens)
    tokens = sum over the group's tasks of batch_size x (max_seq_len + virtual tokens), capped by the
             plan's token budget for chunk-aligned micro-batches (a longer step is split).
    available = free device memory now (CUDA: torch.cuda.mem_get_info; CPU: available RAM) + the
             backbone weights already loaded, or the config's `memory_limit_gib` if smaller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from muxtune.errors import MuxTuneError
from muxtune.spec import Alignment, TaskSpec

GIB = 1024**3


@dataclass
class MemoryEstimate:
    backbone: int  # bytes
    adapters: dict[str, int]  # task -> bytes of weights, gradients and optimizer state
    activations: int  # bytes of the largest group's fused micro-batch
    available: int

    @property
    def needed(self) -> int:
        return self.backbone + sum(self.adapters.values()) + self.activations

    def describe(self) -> str:
        return (f"needs ~{_size(self.needed)} (backbone {_size(self.backbone)} + adapters and optimizer "
                f"{_size(sum(self.adapters.values()))} + activations {_size(self.activations)}), "
                f"{_size(self.available)} available")


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def model_dims(model) -> tuple[int, int, int, int]:
    """(layers, hidden, ffn, vocab) of a Llama / GPT-2 / OPT style config."""
    c = model.config
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    ffn = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or getattr(c, "n_inner", None) \
        or 4 * hidden
    return layers, hidden, ffn, c.vocab_size


def adapter_bytes(model, spec: TaskSpec) -> int:
    """Weights + gradients + AdamW moments (fp32) of the task's adapter, built once on the CPU to count."""
    from muxtune.executor.mux import TaskAdapter

    adapter = TaskAdapter(spec.name, spec.peft, model, spec.seed, spec.max_seq_len, "cpu")
    return 16 * sum(p.numel() for p in adapter.parameters() if p.requires_grad)


def estimate(model, specs: list[TaskSpec], groups: list[list[str]], alignment: Alignment, available: int,
             adapters: dict[str, int] | None = None) -> MemoryEstimate:
    layers, hidden, ffn, vocab = model_dims(model)
    dtype_bytes = next(model.parameters()).element_size()
    backbone = sum(p.numel() * p.element_size() for p in model.parameters())
    backbone += sum(b.numel() * b.element_size() for b in model.buffers())
    adapters = dict(adapters or {})
    for spec in specs:
        if spec.name not in adapters:
            adapters[spec.name] = adapter_bytes(model, spec)
    by_name = {spec.name: spec for spec in specs}
    per_token = layers * (8 * hidden + 4 * ffn) * dtype_bytes + vocab * 8
    peak = 0
    for group in groups:
        members = [by_name[name] for name in group if name in by_name]
        tokens = sum(s.batch_size * (s.max_seq_len + _virtual_tokens(s)) for s in members)
        if alignment.layout == "chunked" and members:
            tokens = min(tokens, max(alignment.token_budget, max(s.max_seq_len + _virtual_tokens(s) for s in members)))
        peak = max(peak, tokens * per_token)
    return MemoryEstimate(backbone, adapters, peak, available)


def _virtual_tokens(spec: TaskSpec) -> int:
    return getattr(spec.peft, "num_virtual_tokens", 0) if spec.peft.method in ("prompt", "prefix") else 0


def available_bytes(device: torch.device, model, limit_gib: float | None) -> int:
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    available = free + loaded
    if limit_gib is not None:
        available = min(available, int(limit_gib * GIB))
    return available


def admit(model, specs: list[TaskSpec], groups: list[list[str]], alignment: Alignment, limit_gib: float | None,
          what: str = "plan", adapters: dict[str, int] | None = None) -> MemoryEstimate:
    """Raise MuxTuneError (with needed vs available) when the tasks are predicted not to fit."""
    device = next(model.parameters()).device
    result = estimate(model, specs, groups, alignment, available_bytes(device, model, limit_gib), adapters)
    if result.needed > result.available:
        worst = max(result.adapters, key=result.adapters.get) if result.adapters else None
        raise MuxTuneError(f"{what}: refused, predicted not to fit in {device} memory: {result.describe()}"
                           + (f"; largest task state: {worst!r}" if worst else "")
                           + "; lower batch_size / max_seq_len, the plan's token_budget, or split the tasks")
    return result
