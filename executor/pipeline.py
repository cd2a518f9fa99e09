"""Two-tiered parallel execution of a Plan: pipeline stages across processes, data-parallel replicas
of the pipeline, and temporal multiplexing of fusion groups inside one pipeline schedule.

Each process is one (replica, stage, tensor rank) of the Plan's layout (rank = (replica * pp + stage) *
tp + tensor rank, the order of `FusionGroup.devices`; tp > 1 splits the stage's layers across its tensor
ranks, executor/tensor_parallel.py). A stage runs a contiguous slice of the backbone's decoder layers: the first
stage also the embedding (and prompt tuning's virtual tokens), the last also the final norm, the LM head
and each task's loss. Every process builds the same fused micro-batches from the same seeded task
samplers, so only hidden states (forward) and their gradients (backward) cross stages, with async
`isend`/`irecv`: a send overlaps the next op's compute, which is often another group's micro-batch.

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
normalisation, and per-task gradient clipping with the norm summed over all stages.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from muxtune.errors import MuxTuneError
from muxtune.executor.alignment import ChunkedBatch, packed_attention
from muxtune.executor.backbone import Backbone
from muxtune.executor.data import Example
from muxtune.executor.mux import _key
from muxtune.executor.tensor_parallel import TensorParallel
from muxtune.executor.trainer import MultiplexedTrainer, TaskRun, build_task_run
from muxtune.schedule import (FAMILIES, StageParts, blocks, one_f_one_b, part_bounds, part_index, replica_of, stage_of,
                              stage_range, stage_split, tensor_rank_of)
from muxtune.spec import Plan, TaskSpec


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


@dataclass
class StepRecord:
    """What one process did in one step: compute spans (kind, group, micro-batch, start, end) relative
    to the step's start, and the step's wall time."""

    seconds: float
    spans: list[tuple[str, int, int, float, float]] = field(default_factory=list)

    @property
    def busy(self) -> float:
        return sum(end - start for *_, start, end in self.spans)


class PipelineTrainer:
    """Carries out a Plan's groups on this process's (replica, stage). One process (dp = pp = 1) is the
    single-process executor with the plan's micro-batches and schedule."""

    def __init__(self, backbone: Backbone, specs: list[TaskSpec], examples: dict[str, list[Example]],
                 plan: Plan, topology: Topology | None = None):
        self.topo = topology or Topology()
        layout = plan.groups[0].layout
        if (layout.dp, layout.pp, layout.tp) != (self.topo.dp, self.topo.pp, self.topo.tp):
            raise MuxTuneError(f"plan: layout dp={layout.dp} pp={layout.pp} tp={layout.tp} but the world is "
                               f"dp={self.topo.dp} pp={self.topo.pp} tp={self.topo.tp}")
        # our own copy: tasks that join mid-run (add_task) extend its groups, not the caller's plan
        plan = plan.model_copy(deep=True)
        # every adapter is built on the full model, in the config's task order: the same init as one process
        self.inner = MultiplexedTrainer(backbone, specs, examples, groups=[g.tasks for g in plan.groups],
                                        alignment=plan.alignment)
        self.model, self.mux, self.runs = self.inner.model, self.inner.mux, self.inner.runs
        self.alignment, self.device = self.inner.alignment, self.inner.device
        self.plan = plan
        split = stage_split(self.model.config.num_hidden_layers, self.topo.pp, layout.stage_layers)
        self.layers = stage_range(split, self.topo.stage)
        self.parts = stage_parts(self.model) if self.topo.pp > 1 else None
        if self.parts is not None:
            if self.alignment.layout != "chunked":
                raise MuxTuneError("plan: pipeline stages need alignment.layout 'chunked'")
            for run in self.runs.values():
                self._check_stageable(run)
            free_other_stages(self.model, self.parts, self.layers, self.topo.first, self.topo.last)
        self.tensor_parallel = None  # this process's slice of the stage's layers (executor/tensor_parallel.py)
        if self.topo.tp > 1:
            self.tensor_parallel = TensorParallel(self.model, self.mux, self.runs, self.layers, self.topo.tp,
                                                  self.topo.tensor_rank, self.topo.tensor_group)
        self.owned = {name: self.owned_parameters(run) for name, run in self.runs.items()}
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self.step_shapes: list[tuple[int, int]] = []
        self.eval_times: list[tuple[int, float, int]] = []  # none: multi-process plans refuse validation
        self.task_step_tokens: list[dict[str, int]] = []  # per step: each task's computed tokens, this replica
        self.records: list[StepRecord] = []

    def _check_stageable(self, run: TaskRun) -> None:
        if self.parts is not None and run.adapter.prefix_tokens:
            raise MuxTuneError(f"plan: task {run.spec.name!r}: prefix tuning is not supported across "
                               "pipeline stages (its K/V prefix spans every layer); use pp=1")

    # --- tenants come and go (muxtune/spool.py decides what, on rank 0; every process applies it) ---------

    def add_task(self, spec: TaskSpec, examples: list[Example], group: int) -> TaskRun:
        """A task joins between steps, on every process at the same step boundary. Its adapter is built
        on this stage's model, whose other stages' layers are on the meta device: the task's init stream
        is drawn over every op as on the full model (shapes only), so each stage's own layers start from
        exactly the weights the task would get alone; the others are placeholders never trained here."""
        if self.tensor_parallel is not None:
            raise MuxTuneError(f"submit {spec.name}: tensor-parallel plans (tp > 1) do not take tasks mid-run yet")
        if spec.name in self.runs:
            raise MuxTuneError(f"task {spec.name!r} is already in this run")
        run = build_task_run(self.mux, spec, examples)
        try:
            self._check_stageable(run)
        except MuxTuneError:
            self.mux.remove_task(spec.name)
            raise
        self.runs[spec.name] = run  # the inner trainer's dict: it draws the task's batches
        self.plan.groups[group].tasks.append(spec.name)  # the inner trainer's groups are these lists
        self.owned[spec.name] = self.owned_parameters(run)
        return run

    def cancel(self, name: str, reason: str = "cancelled") -> TaskRun:
        """A task leaves between steps (every process alike): stopped and detached, kept for export."""
        return self.inner.cancel(name, reason)

    # --- what this stage holds -----------------------------------------------------------------

    def owned_paths(self, run: TaskRun) -> list[str]:
        if self.parts is None:
            return list(run.adapter.paths)
        prefix = self.parts.layers + "."
        return [p for p in run.adapter.paths
                if not p.startswith(prefix) or int(p[len(prefix):].split(".")[0]) in self.layers]

    def owned_parameters(self, run: TaskRun) -> list[nn.Parameter]:
        """The task's trainable tensors this stage computes gradients for."""
        params = [p for path in self.owned_paths(run) for p in run.adapter.layers[_key(path)].parameters()]
        if run.adapter.sequence is not None and self.topo.first:
            params += list(run.adapter.sequence.parameters())
        return [p for p in params if p.requires_grad]

    def owned_state(self, run: TaskRun) -> dict[str, torch.Tensor]:
        """The task's exported tensors (HF PEFT keys) that this stage trained."""
        state = {}
        if run.adapter.sequence is not None and self.topo.first:
            state.update(run.adapter.sequence.export_state())
        for path in self.owned_paths(run):
            state.update(run.adapter.layers[_key(path)].export_state(f"base_model.model.{path}"))
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}

    @property
    def active(self) -> list[TaskRun]:
        return [run for run in self.runs.values() if not run.done and run.status == "running"]

    # --- one step --------------------------------------------------------------------------------

    def replica_micro_batches(self, batches: dict[str, list[Example]], micro_batches: int) -> list:
        """This replica's micro-batches of one group's step: each task's sequences are cut into
        dp * micro_batches contiguous parts (sizes as even as possible); micro-batch k of replica r
        holds part k * dp + r of every task (muxtune/schedule.py)."""
        parts = self.topo.dp * micro_batches
        out = []
        for k in range(micro_batches):
            index = part_index(k, self.topo.replica, self.topo.dp)
            share = {}
            for name, examples in batches.items():
                lo, hi = part_bounds(len(examples), parts, index)
                if hi > lo:
                    share[name] = examples[lo:hi]
            if share:
                out.extend(self.inner.micro_batches(share))
        return out

    def step(self) -> dict[str, float]:
        """One optimizer step of every active task, on this process's share of the work."""
        topo = self.topo
        runs = self.active
        start = time.perf_counter()
        self._record = StepRecord(0.0)
        self._start = start
        self._sends: list = []
        self._saved: dict = {}
        units: list[list[tuple[int, int]]] = []  # per group, its micro-batches
        self._batches: dict[tuple[int, int], object] = {}
        local_counts: dict[str, int] = {}
        tokens, computed = {}, {}
        for g, group in enumerate(self.plan.groups):
            members = [run for run in runs if run.spec.name in group.tasks]
            # a corrupt example fails its task on every process alike: they all draw the same batches
            full = {run.spec.name: batch for run in members if (batch := self.inner.draw_batch(run)) is not None}
            mine = self.replica_micro_batches(full, group.micro_batches) if full else []
            units.append([(g, k) for k in range(len(mine))])
            for k, batch in enumerate(mine):
                self._batches[(g, k)] = batch
                for name, n in batch.target_counts.items():
                    local_counts[name] = local_counts.get(name, 0) + n
                for name, n in batch.tokens_per_task.items():
                    tokens[name] = tokens.get(name, 0) + n
                for name, n in batch.computed_per_task.items():
                    computed[name] = computed.get(name, 0) + n
                self.step_shapes.append(tuple(batch.input_ids.shape))
        runs = [run for run in runs if run.status == "running"]
        names = [run.spec.name for run in runs]
        # the loss of a task is the mean over the target tokens of its WHOLE batch, all replicas together
        counts = torch.tensor([float(local_counts.get(n, 0)) for n in names], dtype=torch.float64)
        if topo.dp > 1:
            dist.all_reduce(counts, group=topo.replica_group)
        self._counts = dict(zip(names, counts.tolist()))
        self._sums = {n: 0.0 for n in names}

        # groups' adapter gradients are all-reduced in group order (the same collective order on every
        # replica), each as soon as its last backward here is done and all earlier groups' have started
        remaining = [len(u) for u in units]
        reductions, next_group = [], 0

        def start_reductions():
            nonlocal next_group
            while next_group < len(units) and remaining[next_group] == 0:
                if topo.dp > 1:
                    reductions.extend(self._all_reduce_group(next_group, runs))
                next_group += 1

        start_reductions()
        for block in self.blocks(units):
            for kind, unit in one_f_one_b(block, topo.stage, topo.pp):
                if kind == "fwd":
                    self.forward(unit)
                else:
                    self.backward(unit)
                    remaining[unit[0]] -= 1
                    start_reductions()
        for work, _ in self._sends:
            work.wait()
        for work, flat, params in reductions:
            work.wait()
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

        if self.tensor_parallel is not None:
            self.tensor_parallel.reduce_replicated_grads(runs)
        losses = self._losses(names)
        runs = self._stop_non_finite(runs, losses)
        self._clip(runs)
        failed = torch.zeros(len(runs))
        for i, run in enumerate(runs):
            try:
                run.optimizer.step()
                run.scheduler.step()
            except (RuntimeError, ValueError, OverflowError) as exc:  # e.g. an lr that overflows fp32
                failed[i] = 1
                run.reason = f"optimizer step failed at step {run.step + 1}: {exc}"
            run.optimizer.zero_grad(set_to_none=True)
        if topo.world > 1:  # a step that failed on one stage stops the task on every process
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        for run, bad in zip(runs, failed.tolist()):
            if bad:
                self.inner.fail(run, run.reason or f"optimizer step failed at step {run.step + 1} on another stage")
        runs = [run for run in runs if run.status == "running"]
        elapsed = time.perf_counter() - start
        for run in runs:
            name = run.spec.name
            run.step += 1
            run.losses.append(losses[name])
            run.tokens += tokens.get(name, 0)
            run.computed_tokens += computed.get(name, 0)
            run.seconds += elapsed
            if run.done:
                run.status = "finished"
        self._record.seconds = elapsed
        self.records.append(self._record)
        self.step_times.append(elapsed)
        self.step_tokens.append(sum(tokens.values()))
        self.task_step_tokens.append(computed)
        return {run.spec.name: losses[run.spec.name] for run in runs}

    def _stop_non_finite(self, runs: list[TaskRun], losses: dict[str, float]) -> list[TaskRun]:
        """Fail a task whose loss (known on the last stage) or gradients (on any stage) are non-finite,
        on every process alike (one all-reduce of per-task flags over the world); returns the others.
        Its gradients never reach its optimizer; the other tasks never saw its values (own rows only,
        and a non-finite loss was left out of the backward)."""
        flags = torch.zeros(len(runs), 2)
        for i, run in enumerate(runs):
            if self.topo.last and not math.isfinite(losses[run.spec.name]):
                flags[i, 0] = 1
            grads = [p.grad for p in self.owned[run.spec.name] if p.grad is not None]
            if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
                flags[i, 1] = 1
        if self.topo.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        for run, (bad_loss, bad_grad) in zip(runs, flags.tolist()):
            if bad_loss:
                self.inner.fail(run, f"non-finite loss at step {run.step + 1}")
            elif bad_grad:
                self.inner.fail(run, f"non-finite gradient at step {run.step + 1}")
        return [run for run in runs if run.status == "running"]

    def blocks(self, units: list[list[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
        """Each block is one 1F1B: a group each ("1f1b"), or all groups' micro-batches alternating."""
        return blocks(units, self.plan.schedule)

    def _timed(self, kind: str, unit: tuple[int, int]):
        started = time.perf_counter()

        def done():
            self._record.spans.append((kind, unit[0], unit[1], started - self._start,
                                       time.perf_counter() - self._start))
        return done

    def forward(self, unit: tuple[int, int]) -> None:
        topo, batch = self.topo, self._batches[unit]
        inputs = None
        if not topo.first:
            inputs = self._recv(self._hidden_shape(batch), topo.rank - topo.tp).requires_grad_()
        done = self._timed("fwd", unit)
        if self.parts is None:
            sums = self.inner.loss_sums(batch, training=True)
        else:
            sums, hidden = self._stage_forward(batch, inputs)
        if topo.last:
            # a non-finite loss stays out of the backward: only its own task is stopped (after the step)
            finite = [total / self._counts[name] for name, total in sums.items() if torch.isfinite(total)]
            loss = torch.stack(finite).sum() if finite else None
            for name, total in sums.items():
                self._sums[name] += float(total.detach())
            self._saved[unit] = (inputs, loss)
        else:
            self._saved[unit] = (inputs, hidden)
        done()
        if not topo.last:
            self._send(hidden.detach(), topo.rank + topo.tp)

    def _stage_forward(self, batch: ChunkedBatch, inputs: torch.Tensor | None):
        topo = self.topo
        with self.mux.route(batch.segments, batch.chunk_len, training=True, own_rows=True):
            embeds = self.inner.chunked_embeds(batch) if topo.first else inputs
            with packed_attention(self.model, batch, {}), only_stage(self.model, self.parts, self.layers,
                                                                        topo.first, topo.last):
                hidden = self.model.base_model(inputs_embeds=embeds, position_ids=batch.position_ids.reshape(1, -1)
                                               ).last_hidden_state
        if not topo.last:
            return None, hidden
        return self.inner.head_loss_sums(batch, hidden.view(*batch.targets.shape, -1), batch.targets), None

    def backward(self, unit: tuple[int, int]) -> None:
        topo = self.topo
        inputs, out = self._saved.pop(unit)
        grad = None if topo.last else self._recv(out.shape, topo.rank + topo.tp)
        done = self._timed("bwd", unit)
        if out is not None and out.requires_grad:
            out.backward(grad)
        done()
        if not topo.first:
            self._send(inputs.grad if inputs.grad is not None else torch.zeros_like(inputs), topo.rank - topo.tp)

    def _hidden_shape(self, batch: ChunkedBatch) -> tuple[int, int, int]:
        return (1, batch.input_ids.numel(), self.model.config.hidden_size)

    def _recv(self, shape, src: int) -> torch.Tensor:
        dtype = next(p for p in self.model.parameters() if p.device.type != "meta").dtype
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        dist.irecv(buffer, src=src).wait()
        return buffer

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.contiguous()
        self._sends.append((dist.isend(tensor, dst=dst), tensor))  # keep the buffer alive until sent

    def _all_reduce_group(self, g: int, runs: list[TaskRun]) -> list:
        """Start one async all-reduce (sum) per task of group g over the replicas of this stage."""
        started = []
        for run in runs:
            if run.spec.name not in self.plan.groups[g].tasks:
                continue
            params = self.owned[run.spec.name]
            if not params:
                continue
            for p in params:
                if p.grad is None:  # this replica had none of the task's sequences
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            started.append((dist.all_reduce(flat, group=self.topo.replica_group, async_op=True), flat, params))
        return started

    def _losses(self, names: list[str]) -> dict[str, float]:
        """Each task's mean loss over its whole batch (known on the last stage; NaN on the others)."""
        if not self.topo.last:
            return {n: float("nan") for n in names}
        sums = torch.tensor([self._sums[n] for n in names], dtype=torch.float64)
        if self.topo.dp > 1:
            dist.all_reduce(sums, group=self.topo.replica_group)
        return {n: float(s) / self._counts[n] for n, s in zip(names, sums.tolist())}

    def _clip(self, runs: list[TaskRun]) -> None:
        """Per-task gradient clipping; across stages the norm is taken over all the task's stages (and
        tensor ranks: a split tensor's slices on each, a replicated tensor once)."""
        clipped = [run for run in runs if run.spec.max_grad_norm is not None]
        if self.topo.pp == 1 and self.topo.tp == 1:
            for run in clipped:
                torch.nn.utils.clip_grad_norm_(run.parameters(), run.spec.max_grad_norm)
            return
        squares = torch.zeros(len(clipped), dtype=torch.float64)
        for i, run in enumerate(clipped):
            for p in self.owned[run.spec.name]:
                if p.grad is not None and (self.tensor_parallel is None or self.tensor_parallel.norm_share(p)):
                    squares[i] += float(torch.linalg.vector_norm(p.grad.float())) ** 2
        if clipped:
            dist.all_reduce(squares, group=self.topo.pipeline_group)
        for run, square in zip(clipped, squares.tolist()):
            coefficient = min(1.0, run.spec.max_grad_norm / (square ** 0.5 + 1e-6))
            for p in self.owned[run.spec.name]:
                if p.grad is not None:
                    p.grad.mul_(coefficient)

    def train(self, progress: bool = True, after_step=None) -> None:
        """Step until no task is active; `after_step(self)` runs on every process at each step boundary
        (checkpoints: a collective, so every process must call it at the same steps)."""
        from tqdm.auto import tqdm

        total = max((run.total_steps - run.step for run in self.active), default=0)
        show = progress and self.topo.rank == self.topo.world - 1  # the last stage knows the losses
        with tqdm(total=total, desc="training", unit="step", disable=not show) as bar:
            while self.active:
                losses = self.step()
                bar.update(1)
                bar.set_postfix({k[:12]: f"{v:.3f}" for k, v in list(losses.items())[:4]})
                if after_step is not None:
                    after_step(self)
