"""The parallel parts of the step loop (executor/trainer.py runs them): this process's place in the
Plan's layout, its pipeline stage's slice of the backbone, point-to-point transfers between stages and
the data-parallel gradient all-reduce. At world size 1 none of it costs anything: one stage holds the
whole model, nothing is sent and no process group exists.

Each process is one (replica, stage, tensor rank) of the Plan's layout (rank = (replica * pp + stage) *
tp + tensor rank, the order of `FusionGroup.devices`, muxtune/schedule.py; tp > 1 splits the stage's
layers across its tensor ranks, executor/tensor_parallel.py). A stage runs a contiguous slice of the
backbone's decoder layers: the first stage also the embedding (and prompt tuning's virtual tokens), the
last also the final norm, the LM head and each task's loss. Every process builds the same fused
micro-batches from the same seeded task samplers, so only hidden states (forward) and their gradients
(backward) cross stages, with async `isend`/`irecv`: a send overlaps the next op's compute, which is
often another group's micro-batch.

Schedules (Plan.schedule; the orders are muxtune/schedule.py's, which the simulator replays too):
  1f1b         each fusion group its own 1F1B with a flush before the next group;
  interleaved  the groups' micro-batches alternate in ONE 1F1B (no data dependency between groups), so
               one group's forwards fill the other's warm-up and drain bubbles.

Data parallel: each replica takes its share of every task's batch (the per-task optimizer still sees
exactly batch_size sequences). Target-token counts are summed over replicas first, so each replica's
loss is its share of the mean over the WHOLE batch's target tokens; summing adapter gradients across
replicas then gives exactly the single-process gradient. Only adapter gradients are all-reduced, one
flat buffer per task, started as soon as the group's last backward on this stage ends (overlapping the
other groups' compute); the frozen backbone is never all-reduced.

Why a task trains as it does in one process: the same adapter init (adapters are built on the full
model before the stage drops the other layers' weights), the same data order, the same loss
normalisation, and per-task gradient clipping with the norm taken over all stages.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from muxtune.errors import MuxTuneError
from muxtune.executor.mux import _key
from muxtune.schedule import (FAMILIES, StageParts, replica_of, stage_of, stage_range, stage_split,
                              tensor_rank_of)
from muxtune.spec import Layout


@dataclass
class Topology:
    """This process's place in the layout; process groups are None when the world is one process."""

    rank: int = 0
    dp: int = 1
    pp: int = 1
    tp: int = 1
    pipeline_group: object = None  # every process of this replica (its stages x tensor ranks)
    replica_group: object = None  # this (stage, tensor rank) in every replica
    tensor_group: object = None  # the tensor ranks of this (replica, stage)

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def replica(self) -> int:
        return replica_of(self.rank, self.pp, self.tp)

    @property
    def stage(self) -> int:
        return stage_of(self.rank, self.pp, self.tp)

    @property
    def tensor_rank(self) -> int:
        return tensor_rank_of(self.rank, self.tp)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def reports(self) -> bool:
        """Whether this process's loss figures count in a sum over the world: one per replica (its last
        stage; of a tensor-parallel stage, tensor rank 0)."""
        return self.last and self.tensor_rank == 0


class _ZeroPositions(nn.Module):
    """Stands in for a learned position embedding after the first stage: the input already has it."""

    def forward(self, *args, **kwargs):
        return torch.zeros(())


def stage_parts(model: nn.Module) -> StageParts:
    family = FAMILIES.get(model.config.model_type)
    parts = family.stage_parts if family else None
    if parts is None:
        supported = sorted(name for name, f in FAMILIES.items() if f.stage_parts)
        raise MuxTuneError(f"plan: pipeline stages are not supported for model type {model.config.model_type!r} "
                           f"(supported: {supported})")
    if getattr(model.base_model, "project_in", None) is not None:
        raise MuxTuneError("plan: pipeline stages are not supported for OPT models with an input projection")
    return parts


def _swap(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent, _, attr = path.rpartition(".")
    holder = model.get_submodule(parent)
    previous = getattr(holder, attr)
    setattr(holder, attr, module)
    return previous


@contextlib.contextmanager
def only_stage(model: nn.Module, parts: StageParts, layers: range, first: bool, last: bool):
    """Within this block the backbone's forward runs this stage's layers only, takes `inputs_embeds`
    as the previous stage's hidden states, and leaves the final norm to the last stage."""
    full = model.get_submodule(parts.layers)
    swaps = [(parts.layers, nn.ModuleList([full[i] for i in layers]))]
    if not first and parts.positions:
        swaps.append((parts.positions, _ZeroPositions()))
    if not last:
        swaps.append((parts.final_norm, nn.Identity()))
    previous = [(path, _swap(model, path, module)) for path, module in swaps]
    try:
        yield
    finally:
        for path, module in reversed(previous):
            _swap(model, path, module)


def free_other_stages(model: nn.Module, parts: StageParts, layers: range, first: bool, last: bool) -> None:
    """Drop the frozen weights this stage never uses (to the meta device): the backbone is held once
    per pipeline, split across its stages. Module paths stay as in the full model (adapter keys)."""
    full = model.get_submodule(parts.layers)
    for i, layer in enumerate(full):
        if i not in layers:
            layer.to("meta")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = embed.weight is head.weight
    if not first and not tied:
        embed.to("meta")
    if not last:
        model.get_submodule(parts.final_norm).to("meta")
        if not tied:
            head.to("meta")


class Stage:
    """This process's slice of the backbone: its decoder layers, and whether it holds the embedding
    (first) and the head (last). One stage of one process is the whole model."""

    def __init__(self, model: nn.Module, topo: Topology, layout: Layout, alignment_layout: str):
        split = stage_split(model.config.num_hidden_layers, topo.pp, layout.stage_layers)
        self.layers = stage_range(split, topo.stage)
        self.first, self.last = topo.first, topo.last
        self.parts = stage_parts(model) if topo.pp > 1 else None
        if self.parts is not None and alignment_layout != "chunked":
            raise MuxTuneError("plan: pipeline stages need alignment.layout 'chunked'")

    def check(self, run) -> None:
        if self.parts is not None and run.adapter.prefix_tokens:
            raise MuxTuneError(f"plan: task {run.spec.name!r}: prefix tuning is not supported across "
                               "pipeline stages (its K/V prefix spans every layer); use pp=1")

    def free_others(self, model: nn.Module) -> None:
        if self.parts is not None:
            free_other_stages(model, self.parts, self.layers, self.first, self.last)

    def run_layers(self, model: nn.Module):
        """The backbone's forward restricted to this stage (a no-op context for the whole model)."""
        if self.parts is None:
            return contextlib.nullcontext()
        return only_stage(model, self.parts, self.layers, self.first, self.last)

    def owned_paths(self, run) -> list[str]:
        if self.parts is None:
            return list(run.adapter.paths)
        prefix = self.parts.layers + "."
        return [p for p in run.adapter.paths
                if not p.startswith(prefix) or int(p[len(prefix):].split(".")[0]) in self.layers]

    def owned_parameters(self, run) -> list[nn.Parameter]:
        """The task's trainable tensors this stage computes gradients for, in its optimizer's order."""
        if self.parts is None:
            return list(run.parameters())
        mine = {id(p) for path in self.owned_paths(run) for p in run.adapter.layers[_key(path)].parameters()}
        if run.adapter.sequence is not None and self.first:
            mine |= {id(p) for p in run.adapter.sequence.parameters()}
        return [p for p in run.parameters() if id(p) in mine]

    def owned_keys(self, run) -> set[str]:
        """The adapter state-dict keys this stage trains."""
        prefixes = tuple(f"layers.{_key(path)}." for path in self.owned_paths(run))
        if self.first:
            prefixes += ("sequence.",)
        return {k for k in run.adapter.state_dict() if k.startswith(prefixes)}

    def owned_state(self, run) -> dict[str, torch.Tensor]:
        """The task's exported tensors (HF PEFT keys) that this stage trained."""
        state = {}
        if run.adapter.sequence is not None and self.first:
            state.update(run.adapter.sequence.export_state())
        for path in self.owned_paths(run):
            state.update(run.adapter.layers[_key(path)].export_state(f"base_model.model.{path}"))
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


@dataclass
class StepRecord:
    """What one process did in one step: compute spans (kind, group, micro-batch, start, end) relative
    to the step's start, and the step's wall time."""

    seconds: float
    spans: list[tuple[str, int, int, float, float]] = field(default_factory=list)


class Transfers:
    """Hidden states and their gradients between neighbouring stages: sends are async (the buffer is
    kept until `wait`), receives block."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self.sends = device, dtype, []

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.contiguous()
        self.sends.append((dist.isend(tensor, dst=dst), tensor))

    def recv(self, shape, src: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
        dist.irecv(buffer, src=src).wait()
        return buffer

    def wait(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends = []


def start_all_reduce(params: list[nn.Parameter], group) -> tuple:
    """One async all-reduce (sum) of a task's gradients as one flat buffer over `group`."""
    for p in params:
        if p.grad is None:  # this replica had none of the task's sequences
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    return dist.all_reduce(flat, group=group, async_op=True), flat, params


def finish_all_reduce(started: list[tuple]) -> None:
    for work, flat, params in started:
        work.wait()
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
