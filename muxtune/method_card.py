"""What the layers below the executor need to know about a PEFT method, as plain data (no torch).

Each method's torch-free half (muxtune/methods/<method>.py) exports `CARD = MethodCard(...)` beside its
Config; `muxtune.spec.method_card(name)` finds it. The profiler, CostModel, simulator, planner and
admission read a method's card instead of naming methods, so a new method is its two halves (plus its test).

The size knob `rank` is the card's unit throughout (LoRA/DoRA r, adapter size, virtual tokens; 0 if none,
spec.method_rank). `shape` is a model of the backbone sizes with the fields of the CostModel's
ModelShape (n_layers, hidden, intermediate, heads, kv_heads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodCard:
    name: str  # the `peft.method` string
    title: str  # how messages name it, e.g. "LoRA"
    # how the adapter meets the frozen backbone op (DESIGN.md): methods of one shape on their default
    # targets keep the same backbone tensors alive (CostModel.activation_bytes)
    shape: str
    # trainable parameters on the method's default targets: (model shape, rank) -> count (a cluster trace's
    # job, known only by method and rank; tasks of a config count their built adapter instead)
    params: Callable[[object, int], int]
    # the roofline of its per-layer work for CostModel.analytic: (hidden, rank) -> (ops per layer,
    # FLOPs per token per op, bytes per token per op, kernel launches per op)
    analytic: Callable[[int, int], tuple[int, float, float, int]]
    # the task config the profiler measures it with at `rank`, on `targets` (the model family's usual
    # attention targets, schedule.attention_targets)
    probe: Callable[[int, list[str]], dict]
    # the ranks the profiler measures it at (the built-in methods' are in profile.GRIDS, per profile mode;
    # a method of another package names its own, (0,) when it has no size knob)
    probe_ranks: tuple[int, ...] | None = None
    targeted: bool = False  # its cost follows its target_modules list and dropout (profile `target` rows)
    lead_slots: bool = False  # rank virtual tokens take slots at the start of each of its rows (prompt tuning)
    kv_prefix: bool = False  # every query attends over rank extra K/V slots (prefix tuning)
    # its parameters all sit with the embedding, on a pipeline's first stage (else spread over the layers)
    on_first_stage: bool = False
    tensor_parallel: bool = False  # the executor splits it under tensor parallelism
    pipeline_stages: bool = True  # the executor splits it over pipeline stages (prefix tuning: pp = 1 only)

    def virtual_tokens(self, rank: int) -> int:
        """Slots its sequences add to the attention span (lead slots or a KV prefix)."""
        return rank if self.lead_slots or self.kv_prefix else 0


def kv_width(shape) -> int:
    """Width of a layer's key (or value) projection output: hidden x kv_heads / heads."""
    return shape.hidden * shape.kv_heads // shape.heads


FP32 = 4  # adapters compute in fp32 (executor/mux.py): bytes per value of their analytic traffic
