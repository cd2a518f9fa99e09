"""Admission: refuse a task or plan that is predicted not to fit in device memory, up front, with the
numbers, instead of running out of memory halfway.

The prediction is the CostModel's memory model (profiler/cost_model.py, `peak_bytes`), priced on the loaded model's
shape and measured weight bytes, for the micro-batches the executor will run. Per device (one pipeline
stage of one replica):

    needed    = backbone_bytes(the stage's layers, first, last)             the frozen weights it keeps
              + task_state_bytes(params) per task                           the adapter layers it trains:
                                                                            fp32 weight, gradient, 2 AdamW moments
              + the most held_bytes(micro-batch, the stage's layers)        micro-batches in flight at once in
                in flight at once                                           the executor's 1F1B order
              + head_bytes(tokens) of the largest micro-batch (last stage)  logits, softmax and their gradient
    (CostModel.peak_bytes: the simulator prices a device the same way). A tensor rank holds its shard.
    micro-batch = each task's share of its batch (dp replicas x the group's micro-batches), every sequence
              at max_seq_len (+ virtual tokens); chunk-aligned batches hold at most max(token_budget, the
              longest sequence) tokens (a longer step is split), padded ones pad every row to the group's
              longest
    available = free device memory (CUDA mem_get_info, else available RAM) + the backbone part already
              loaded, or `memory_limit_gib` if smaller. Processes that share a device (several stages on
              one CPU) are summed against it.

With no profile at hand the CostModel prices activations from the model's shape; a profiled CostModel
(`cost_model=`) uses this device's measured saved bytes instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import psutil
import torch

from muxtune.errors import MuxTuneError
from muxtune.executor.mux import TaskAdapter
from muxtune.profiler.cost_model import CostModel, MicroBatch, ModelShape, TaskLoad
from muxtune.profiler.backbone_parts import decoder_layers, layer_param_bytes
from muxtune.schedule import blocks, one_f_one_b, part_index, part_size, replica_of, stage_of, stage_range, stage_split
from muxtune.spec import Alignment, Layout, Plan, TaskSpec, method_card, method_rank

GIB = 1024**3


@dataclass
class MemoryEstimate:
    backbone: int  # bytes
    adapters: dict[str, int]  # task -> bytes of weights, gradients and optimizer state on this device
    activations: int  # bytes: micro-batches in flight + the LM head's transient
    available: int
    device: str = "device"

    @property
    def needed(self) -> int:
        return self.backbone + sum(self.adapters.values()) + self.activations

    def describe(self) -> str:
        return (f"needs ~{_size(self.needed)} (backbone {_size(self.backbone)} + adapters and optimizer "
                f"{_size(sum(self.adapters.values()))} + activations {_size(self.activations)}), "
                f"{_size(self.available)} available")


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def cost_model_of(model):
    """The CostModel of a loaded model: its shape, and its weight bytes as loaded."""
    dtype = next(model.parameters()).dtype
    return CostModel(ModelShape.from_config(model.config, dtype), "admission", weight_bytes=layer_param_bytes(model))


def adapter_params(model, spec: TaskSpec) -> dict[int | str | None, int]:
    """The task's trainable parameters by decoder layer index; "sequence": prompt/prefix tuning's
    tensors (the first stage's); None: adapters of ops outside the decoder layers (every stage's)."""
    adapter = TaskAdapter(spec.name, spec.peft, model, spec.seed, spec.max_seq_len, "cpu")
    layer_of = {id(m): i for i, layer in enumerate(decoder_layers(model)[2]) for m in layer.modules()}
    counts: dict[int | str | None, int] = {}
    if adapter.sequence is not None:
        counts["sequence"] = sum(p.numel() for p in adapter.sequence.parameters() if p.requires_grad)
    for path, layer in adapter.items():
        index = layer_of.get(id(model.get_submodule(path)))
        counts[index] = counts.get(index, 0) + sum(p.numel() for p in layer.parameters() if p.requires_grad)
    return counts


def _virtual_tokens(spec: TaskSpec) -> int:
    return method_card(spec.peft.method).virtual_tokens(method_rank(spec.peft))


def _micro_batches(members: list[TaskSpec], params: dict[str, int], parts: int, index: int,
                   alignment: Alignment) -> list:
    """The micro-batch(es) the executor builds from part `index` of `parts` of the group's step (as
    MultiplexedTrainer.replica_micro_batches), priced as CostModel MicroBatches."""
    longest = max(s.max_seq_len + _virtual_tokens(s) for s in members)
    loads = []
    for s in members:
        rows = part_size(s.batch_size, parts, index)
        per_row = s.max_seq_len + _virtual_tokens(s) if alignment.layout == "chunked" else longest
        if rows:
            loads.append(TaskLoad(s.peft.method, method_rank(s.peft), rows * per_row, params[s.name]))
    if not loads:
        return []
    if alignment.layout == "padded":
        return [MicroBatch(tuple(loads), seq_len=longest)]
    total = sum(t.tokens for t in loads)
    cap = min(total, max(alignment.token_budget, longest))
    pieces = math.ceil(total / cap)  # the token budget splits it into this many, each at most `cap`
    scaled = tuple(TaskLoad(t.method, t.rank, max(1, round(t.tokens * cap / total)), t.params) for t in loads)
    return [MicroBatch(scaled, seq_len=alignment.chunk_len)] * pieces


def estimate(model, specs: list[TaskSpec], groups: list[list[str]], alignment: Alignment, available: int,
             params: dict[str, dict] | None = None, layout: Layout | None = None, schedule: str = "1f1b",
             micro_batches: list[int] | None = None, rank: int = 0, cost_model=None,
             recompute: list[bool] | None = None, accumulation: dict[str, int] | None = None) -> MemoryEstimate:
    """Memory of process `rank` (rank = (replica * pp + stage) * tp + tensor rank, as the plan's device
    order) of a plan with these groups and `layout` (default: one device): CostModel.peak_bytes of its
    stage's layers, its tasks' parameters on it and its micro-batches in the executor's 1F1B order. A
    tensor rank holds its shard of the stage (weights, activations, the split part of LoRA's tensors), as
    the simulator prices it. `params` caches adapter_params per task (filled here). Memory knobs (the
    Plan's): `recompute` per group (its micro-batches marked MicroBatch.recompute), `accumulation`
    micro-steps per task; the first micro-step holds every task's largest part, so it sets the peak."""
    layout = layout or Layout()
    cm = cost_model or cost_model_of(model)
    params = params if params is not None else {}
    for spec in specs:
        if spec.name not in params:
            params[spec.name] = adapter_params(model, spec)
    n_layers = cm.shape.n_layers
    split = stage_split(n_layers, layout.pp, layout.stage_layers)
    replica, stage = replica_of(rank, layout.pp, layout.tp), stage_of(rank, layout.pp, layout.tp)
    first, last = stage == 0, stage == layout.pp - 1
    mine = stage_range(split, stage)
    by_name = {spec.name: spec for spec in specs}

    def device_params(name: str) -> int:
        on_stage = sum(n for layer, n in params[name].items()
                       if layer is None or (layer == "sequence" and first) or (isinstance(layer, int) and layer in mine))
        peft = by_name[name].peft
        targets = tuple(peft.target_modules) if method_card(peft.method).targeted else ()
        return cm.tp_params(on_stage, targets, layout.tp)[0]

    total_params = {name: sum(params[name].values()) for name in by_name}
    held = {name: device_params(name) for name in by_name}
    adapters = {name: cm.task_state_bytes(n) for name, n in held.items()}
    # every group's micro-batches on this replica, in the order the executor runs them
    units = []
    for g, group in enumerate(groups):
        members = [largest_micro_step(by_name[name], (accumulation or {}).get(name, 1))
                   for name in group if name in by_name]
        if not members:
            continue
        parts = layout.dp * (micro_batches[g] if micro_batches else 1)
        count = micro_batches[g] if micro_batches else 1
        recomputed = bool(recompute and g < len(recompute) and recompute[g])
        units.append([replace(mb, recompute=recomputed) for k in range(count) for mb in _micro_batches(
            members, total_params, parts, part_index(k, replica, layout.dp), alignment)])
    order = [(kind, block[i]) for block in blocks(units, schedule)
             for kind, i in one_f_one_b(list(range(len(block))), stage, layout.pp)]
    backbone = cm.backbone_bytes(len(mine), first, last, layout.tp)
    peak = cm.peak_bytes(order, list(held.values()), len(mine), first, last, layout.tp)
    return MemoryEstimate(backbone, adapters, peak - backbone - sum(adapters.values()), available)


def largest_micro_step(spec: TaskSpec, steps: int) -> TaskSpec:
    """The task as its largest accumulation micro-step feeds it (executor/accumulation.micro_steps)."""
    return spec if steps <= 1 else spec.model_copy(update={"batch_size": part_size(spec.batch_size, steps, 0)})


def plan_estimates(model, specs: list[TaskSpec], plan: Plan, cost_model=None,
                   params: dict[str, dict] | None = None) -> list[MemoryEstimate]:
    """One estimate per process of a plan, in rank order; `available` is filled in by `admit`.
    `params` caches adapter_params per task (filled here)."""
    layout = plan.groups[0].layout
    params = params if params is not None else {}
    cm = cost_model or cost_model_of(model)
    return [estimate(model, specs, [list(g.tasks) for g in plan.groups], plan.alignment, 0, params, layout,
                     plan.schedule, [g.micro_batches for g in plan.groups], rank, cm,
                     [g.recompute for g in plan.groups], {t: k for g in plan.groups for t, k in g.accumulation.items()})
            for rank in range(layout.dp * layout.pp * layout.tp)]


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def admit(model, specs: list[TaskSpec], plan: Plan, limit_gib: float | None, what: str = "plan",
          params: dict[str, dict] | None = None, rank: int = 0, world: int = 1, cost_model=None
          ) -> dict[str, MemoryEstimate]:
    """Raise MuxTuneError (with needed vs available) when the tasks are predicted not to fit. Called by
    every process of the plan (with several, a collective): each reports its device's free memory;
    processes on the same device (host and name) are summed against it, and every process raises the
    same error, naming each device that does not fit with its numbers. `params` caches adapter_params
    per task (filled here)."""
    estimates = plan_estimates(model, specs, plan, cost_model, params)
    return per_device(estimates, device_reports(model, rank, world), limit_gib, what)


def device_reports(model, rank: int = 0, world: int = 1) -> list[dict]:
    """Every process's device (host and name), free and loaded bytes (with several, a collective)."""
    import socket

    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    mine = {"rank": rank, "device": f"{socket.gethostname()}:{device}", "free": _free_bytes(device),
            "loaded": sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")}
    everyone = [mine]
    if world > 1:
        import torch.distributed as dist

        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    return everyone


_ADVICE = "; lower batch_size / max_seq_len, the plan's token_budget, or split the tasks"


def per_device(estimates: list[MemoryEstimate], reports: list[dict], limit_gib: float | None,
               what: str = "plan") -> dict[str, MemoryEstimate]:
    """Sum the processes' estimates per device (`reports`: each rank's device, free and loaded bytes)
    and refuse, naming every device that does not fit with its ranks and numbers."""
    combined, refused = device_totals(estimates, reports, limit_gib)
    if refused:
        raise MuxTuneError(f"{what}: refused, predicted not to fit in device memory: " + "; ".join(refused) + _ADVICE)
    return combined


def device_totals(estimates: list[MemoryEstimate], reports: list[dict], limit_gib: float | None
                  ) -> tuple[dict[str, MemoryEstimate], list[str]]:
    """Each device's summed estimate, and a line for each device that does not fit."""
    devices: dict[str, list[dict]] = {}
    for report in reports:
        devices.setdefault(report["device"], []).append(report)
    combined, refused = {}, []
    for name, group in devices.items():
        ranks = sorted(r["rank"] for r in group)
        parts = [estimates[r] for r in ranks]
        adapters: dict[str, int] = {}
        for part in parts:
            for task, n in part.adapters.items():
                adapters[task] = adapters.get(task, 0) + n
        available = min(r["free"] for r in group) + sum(r["loaded"] for r in group)
        if limit_gib is not None:
            available = min(available, int(limit_gib * GIB))
        total = MemoryEstimate(sum(p.backbone for p in parts), adapters, sum(p.activations for p in parts),
                               available, device=name)
        combined[name] = total
        if total.needed > total.available:
            who = ", ".join(str(r) for r in ranks)
            refused.append(f"{name} (rank{'s' if len(ranks) > 1 else ''} {who}): {total.describe()}")
    return combined, refused
