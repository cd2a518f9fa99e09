"""The multiplexed trainer: every step, the active tasks' batches go through the backbone as ONE fused
micro-batch (or a few, when the Plan's token budget splits it); each task keeps its own loss, optimizer,
schedule, clipping and step count. The micro-batch is chunk-aligned by default (alignment.py) or
padded per row (`Alignment(layout="padded")`, data.fuse).

ONE step loop for one process and for many: a multi-process Plan (dp replicas x pp stages x tp tensor
ranks) runs this same loop on every process, each on its share (executor/pipeline.py: its stage of
the backbone, the transfers between stages, the replicas' gradient all-reduce; executor/distributed.py
starts the processes). A single process is the world of one: one stage, one replica, no collective.

Why a task trains exactly as it would alone: its loss is the mean over its own tokens, rows never
interact inside the backbone, and the total loss is the plain sum of the tasks' losses, so the
gradient reaching a task's adapter is the gradient of that task's loss alone.

Why one task's failure never hurts another: for the same reason. A task whose loss or gradients turn
non-finite, or whose next batch holds a corrupt example, is stopped (`status="failed"`, the step and
the reason kept, on every process alike); its loss is left out of the backward and its gradients never
reach its optimizer, and the other tasks' rows never saw its values. Tasks can join (`add_task`) and
leave (`cancel`) between steps; the backbone stays loaded.

Validation (executor/validation.py): after a step, every task due for evaluation (every
`eval_interval` of its steps, and at its end) is evaluated in the same fused, chunk-aligned layout,
forward only (through the stages in order; each replica its share of the validation set): no autograd
graph, dropout off, no generator drawn from and no task state touched but its evaluation record, so a
task's training is bit for bit the same with evaluation on or off.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers import get_scheduler

from muxtune.errors import MuxTuneError
from muxtune.executor import accumulation
from muxtune.executor.alignment import ChunkedBatch, pack_chunks, split_by_budget
from muxtune.executor.backbone import Backbone
from muxtune.executor.data import Example, FusedBatch, TaskSampler, fuse
from muxtune.executor.forward import FusedForward
from muxtune.executor.hooks import StepObserver
from muxtune.executor.mux import Multiplexer, TaskAdapter
from muxtune.executor.optim import read_norms, step_optimizers, summed_task_loss
from muxtune.executor.recompute import recomputing
from muxtune.executor.pipeline import Stage, StepRecord, Topology, Transfers, finish_all_reduce, start_all_reduce
from muxtune.executor.tensor_parallel import TensorParallel
from muxtune.executor.validation import check_validation, example_problem, record_evaluation
from muxtune.schedule import blocks, one_f_one_b, part_bounds, part_index
from muxtune.spec import Alignment, Layout, Plan, TaskSpec


@dataclass
class TaskRun:
    """One task's training state inside the multiplexed job."""

    spec: TaskSpec
    adapter: TaskAdapter
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: TaskSampler
    total_steps: int  # `steps`, or what `epochs` makes of the training examples
    examples_to_train: int | None = None  # an epochs task draws exactly this many examples in all
    validation: list[Example] | None = None
    eval_interval: int | None = None  # steps between evaluations (None: no validation)
    step: int = 0
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)  # argmax next-token accuracy of each step
    evaluations: list[dict] = field(default_factory=list)  # {step, valid_loss, valid_mean_token_accuracy}
    best_loss: float | None = None  # the lowest valid_loss so far, and the step it was reached at
    best_step: int | None = None
    bad_evaluations: int = 0  # evaluations in a row not better than the best (early stopping's patience)
    best_state: dict[str, torch.Tensor] | None = None  # the adapter at best_step (early stopping only)
    tokens: int = 0  # real tokens (data and virtual tokens) this task put through the backbone
    computed_tokens: int = 0  # the backbone positions its rows took, padding included
    seconds: float = 0.0  # wall time of the steps this task took part in
    status: str = "running"  # running | finished | stopped_early | failed | cancelled
    reason: str = ""  # why a task failed or was cancelled
    stopped_at: int | None = None  # the step (1-based) a failed task did not complete
    bad_examples: int = 0  # corrupt examples met mid-run and skipped (on_bad_line: skip)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def batch_size_now(self) -> int:
        """Examples this step draws: batch_size, but an epochs task's last batch takes only what is left."""
        if self.examples_to_train is None:
            return self.spec.batch_size
        return min(self.spec.batch_size, self.examples_to_train - self.step * self.spec.batch_size)

    @property
    def evaluation_due(self) -> bool:
        return self.eval_interval is not None and self.step > 0 and \
            (self.step % self.eval_interval == 0 or self.done) and \
            not (self.evaluations and self.evaluations[-1]["step"] == self.step)

    def __post_init__(self) -> None:
        # an adapter's trainable tensors are fixed once it is built (tensor parallelism shards their
        # .data in place): walking its module tree twice per step cost ~0.25 ms per task each time
        self._params = [p for p in self.adapter.parameters() if p.requires_grad]

    def parameters(self) -> list[torch.nn.Parameter]:
        return self._params


def build_task_run(mux: Multiplexer, spec: TaskSpec, examples: list[Example],
                   validation: list[Example] | None = None) -> TaskRun:
    adapter = mux.add_task(spec.name, spec.peft, spec.seed, spec.max_seq_len)
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, spec.lr, spec.weight_decay)
    total_steps = spec.step_count(len(examples))
    scheduler = get_scheduler(spec.lr_schedule, optimizer, num_warmup_steps=spec.warmup_steps,
                              num_training_steps=total_steps)
    sampler = TaskSampler(examples, spec.batch_size, spec.seed)
    if spec.validates and not validation:
        raise MuxTuneError(f"task {spec.name!r}: validation is configured but no validation examples were given")
    return TaskRun(spec, adapter, optimizer, scheduler, sampler, total_steps, spec.examples_to_train(len(examples)),
                   validation if spec.validates else None, spec.eval_interval(total_steps))


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """A task's AdamW: torch's fused implementation on the CPU (one pass over memory; foreach ops there
    run one call per tensor), its multi-tensor (foreach) one elsewhere. The trainer steps all tasks'
    optimizers together (executor/optim.py, bit-identical to each one's own `step()`). The references
    in the tests and the profiler's optimizer rows build theirs here too, so "the same optimizer" holds
    bit for bit."""
    on_cpu = all(p.device.type == "cpu" for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=None if on_cpu else True,
                             fused=True if on_cpu else None)


@torch.no_grad()
def grad_norms(params: list[list[torch.nn.Parameter]]) -> list[torch.Tensor | None]:
    """The total gradient norm of each task's tensors `params` (None without gradients; one pass serves
    both the finiteness check and the clipping), bit for bit as `torch.nn.utils.get_total_norm`
    computes it (the 2-norm of the stacked per-tensor 2-norms), but the per-tensor norms of ALL tasks in
    one foreach call: with many small adapters the per-call work of doing it task by task is most of it.
    Every adapter tensor is fp32 on the trainer's device (TaskAdapter), so the library's grouping by
    device and dtype is one group in parameter order, as here."""
    grads = [[p.grad for p in task if p.grad is not None] for task in params]
    flat = [g for task in grads for g in task]
    per_tensor = list(torch._foreach_norm(flat, 2.0)) if flat else []
    out, start = [], 0
    for task in grads:
        part, start = per_tensor[start : start + len(task)], start + len(task)
        out.append(torch.linalg.vector_norm(torch.stack(part), 2.0) if part else None)
    return out


class MultiplexedTrainer(FusedForward):
    """Trains tasks on one shared backbone: the ONE step loop, for one process or for this process's
    (replica, stage, tensor rank) of a multi-process Plan (executor/pipeline.py has the parallel parts;
    at world size 1 they do nothing and no process group exists).

    `groups` (from the Plan) lists the fusion groups: the tasks of a group share one fused micro-batch;
    groups run one after another within a step (default: one group of all tasks). `alignment` (from the
    Plan) sets the micro-batch layout. `validation`: the validation examples of the tasks that validate
    (executor/validation.py). `plan`: the whole Plan instead (its groups, alignment, layout, micro-batches
    and schedule); `topology`: this process's place in its layout (default: the only process).
    Memory knobs (the Plan's, or given): `recompute` per group (executor/recompute.py), `accumulation`
    micro-steps per task (executor/accumulation.py)."""

    def __init__(self, backbone: Backbone, specs: list[TaskSpec], examples: dict[str, list[Example]],
                 groups: list[list[str]] | None = None, alignment: Alignment | None = None,
                 validation: dict[str, list[Example]] | None = None, plan: Plan | None = None,
                 topology: Topology | None = None, recompute: list[bool] | None = None,
                 accumulation: dict[str, int] | None = None):
        self.topo = topology or Topology()
        if plan is not None:
            layout = plan.groups[0].layout
            if (layout.dp, layout.pp, layout.tp) != (self.topo.dp, self.topo.pp, self.topo.tp):
                raise MuxTuneError(f"plan: layout dp={layout.dp} pp={layout.pp} tp={layout.tp} but the world is "
                                   f"dp={self.topo.dp} pp={self.topo.pp} tp={self.topo.tp}")
            # our own copy: tasks that join mid-run (add_task) extend its groups, not the caller's plan
            plan = plan.model_copy(deep=True)
            groups, alignment = [g.tasks for g in plan.groups], plan.alignment
            if recompute is None:
                recompute = [g.recompute for g in plan.groups]
            if accumulation is None:
                accumulation = {t: k for g in plan.groups for t, k in g.accumulation.items()}
        self.plan = plan
        self.layout = plan.groups[0].layout if plan else Layout()
        self.schedule = plan.schedule if plan else "1f1b"
        self.group_micro_batches = [g.micro_batches for g in plan.groups] if plan else []
        self.backbone = backbone
        self.model = backbone.model
        self.device = next(self.model.parameters()).device
        self.mux = Multiplexer.attach(self.model)
        self.alignment = alignment or Alignment()
        self.stage = Stage(self.model, self.topo, self.layout, self.alignment.layout)
        validation = validation or {}
        # every adapter is built on the full model, in the config's task order: the same init on every stage
        self.runs: dict[str, TaskRun] = {s.name: build_task_run(self.mux, s, examples[s.name], validation.get(s.name))
                                         for s in specs}
        for run in self.runs.values():
            self.stage.check(run)
        self.groups = groups or [list(self.runs)]
        self.recompute = list(recompute or [False] * len(self.groups))
        self.accumulation = dict(accumulation or {})
        self.stage.free_others(self.model)
        self.tensor_parallel = None  # this process's slice of the stage's layers (executor/tensor_parallel.py)
        if self.topo.tp > 1:
            self.tensor_parallel = TensorParallel(self.model, self.mux, self.runs, self.stage.layers, self.topo.tp,
                                                  self.topo.tensor_rank, self.topo.tensor_group)
        self.owned = {name: self.stage.owned_parameters(run) for name, run in self.runs.items()}
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []  # real (non-padding) tokens of each step's fused batches (this replica)
        self.step_shapes: list[tuple[int, int]] = []  # (rows, seq) of every fused micro-batch computed
        self.task_step_tokens: list[dict[str, int]] = []  # per step: each task's computed tokens, this replica
        self.records: list[StepRecord] = []  # per step: this process's compute spans
        # evaluations: (global step, seconds, tokens put through the backbone) of each fused evaluation
        self.eval_times: list[tuple[int, float, int]] = []
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        dtype = next(p for p in self.model.parameters() if p.device.type != "meta").dtype
        self.transfers = Transfers(self.device, dtype)
        self.observer = StepObserver()  # phase hooks (executor/hooks.py): the profiler times the step here
        for run in self.runs.values():
            check_validation(self, run)

    # --- tenants come and go (in a multi-process run on every process at the same step boundary) ---------

    def add_task(self, spec: TaskSpec, examples: list[Example], group: int = 0,
                 validation: list[Example] | None = None) -> TaskRun:
        """A tenant joins between steps: its adapter is attached to the loaded backbone and it takes
        part from the next step on, with its own step count (so it trains as it would alone). On a
        pipeline stage the other stages' layers are on the meta device: the task's init stream is drawn
        over every op as on the full model (shapes only), so this stage's layers start from exactly the
        weights the task would get alone; the others are placeholders never trained here."""
        if self.tensor_parallel is not None:
            raise MuxTuneError(f"submit {spec.name}: tensor-parallel plans (tp > 1) do not take tasks mid-run yet")
        if spec.name in self.runs:
            raise MuxTuneError(f"task {spec.name!r} is already in this run")
        run = build_task_run(self.mux, spec, examples, validation)
        try:
            self.stage.check(run)
        except MuxTuneError:
            self.mux.remove_task(spec.name)
            raise
        self.runs[spec.name] = run
        self.groups[group].append(spec.name)  # a plan's groups are these lists
        self.owned[spec.name] = self.stage.owned_parameters(run)
        check_validation(self, run)
        return run

    def cancel(self, name: str, reason: str = "cancelled") -> TaskRun:
        """A tenant leaves between steps: it stops training and its adapter is detached from the
        backbone's ops (kept for export, as trained so far)."""
        run = self.runs[name]
        if run.status == "running":
            run.status, run.reason = "cancelled", reason
        if name in self.mux.adapters:
            self.mux.remove_task(name)
        return run

    def fail(self, run: TaskRun, reason: str) -> None:
        run.status, run.reason, run.stopped_at = "failed", reason, run.step + 1
        run.optimizer.zero_grad(set_to_none=True)

    def draw_batch(self, run: TaskRun) -> list[Example] | None:
        """The task's next batch, every example checked; a corrupt one fails the task (on_bad_line:
        error) or is skipped and counted (skip). Any error reading the data fails only this task.
        Every process draws the same batches, so a failure here is the same on every process."""
        batch = []
        try:
            while len(batch) < run.batch_size_now:
                index = run.sampler.next_index()
                example = run.sampler.examples[index]
                problem = example_problem(example, self.vocab_size, run.spec.max_seq_len)
                if problem is None:
                    batch.append(example)
                    continue
                if run.spec.on_bad_line == "error" or run.bad_examples >= len(run.sampler.examples):
                    self.fail(run, f"corrupt data: example {index} of {run.spec.data}: {problem}")
                    return None
                run.bad_examples += 1
        except Exception as exc:  # noqa: BLE001 - an unreadable data source stops its task only
            self.fail(run, f"data error: {type(exc).__name__}: {exc}")
            return None
        return batch

    @property
    def active(self) -> list[TaskRun]:
        return [run for run in self.runs.values() if not run.done and run.status == "running"]

    def micro_batch_count(self, group: int) -> int:
        """The Plan's micro-batches per step of a group (1 for a group that joined mid-run)."""
        return self.group_micro_batches[group] if group < len(self.group_micro_batches) else 1

    def replica_micro_batches(self, batches: dict[str, list[Example]], micro_batches: int,
                              split_padded: bool = False) -> list[FusedBatch | ChunkedBatch]:
        """This replica's micro-batches of one group's step: each task's sequences are cut into
        dp * micro_batches contiguous parts (sizes as even as possible); micro-batch k of replica r
        holds part k * dp + r of every task (muxtune/schedule.py). One part: the whole batch."""
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
                out.extend(self.micro_batches(share, split_padded=split_padded))
        return out

    def step(self) -> dict[str, float]:
        """One optimizer step of every active task, on this process's share of the work: per fusion
        group its fused micro-batch(es), forward and backward in the Plan's schedule."""
        topo, runs = self.topo, self.active
        start = time.perf_counter()
        self._record, self._start, self._saved = StepRecord(0.0), start, {}
        units: list[list[tuple[int, int]]] = []  # per group, its micro-batches
        self._batches: dict[tuple[int, int], FusedBatch | ChunkedBatch] = {}
        counts, tokens, computed, self._hits = {}, {}, {}, {}
        for g, group in enumerate(self.groups):
            members = [run for run in runs if run.spec.name in group]
            with self.observer.phase("draw"):
                batches = {run.spec.name: batch for run in members if (batch := self.draw_batch(run)) is not None}
            if not batches:
                units.append([])
                continue
            with self.observer.phase("fuse"):
                # accumulation micro-steps one after another, each in the Plan's micro-batches
                mine = [mb for part in accumulation.micro_steps(batches, self.accumulation)
                        for mb in self.replica_micro_batches(part, self.micro_batch_count(g))]
            if mine:
                self.observer.fused(mine)
            units.append([(g, k) for k in range(len(mine))])
            for k, batch in enumerate(mine):
                self._batches[(g, k)] = batch
                for totals, per_task in ((counts, batch.target_counts), (tokens, batch.tokens_per_task),
                                         (computed, batch.computed_per_task)):
                    for name, n in per_task.items():
                        totals[name] = totals.get(name, 0) + n
                self.step_shapes.append(tuple(batch.input_ids.shape))
        runs = [run for run in runs if run.status == "running"]
        names = [run.spec.name for run in runs]
        # a task's loss is the mean over ALL its target tokens of the step, however (and on however
        # many replicas) they were split
        self._counts = self._replica_sum(counts, names) if topo.dp > 1 else counts
        self._sums = {}
        self.run_schedule(units, runs)
        if self.tensor_parallel is not None:
            self.tensor_parallel.reduce_replicated_grads(runs)
        losses, accuracies = self._step_figures(names)
        with self.observer.phase("optimizer"):
            norms, factors = read_norms(runs, self._grad_norms(runs))  # one host read for all tasks
        self._stop_non_finite(runs, losses, norms)
        runs = [run for run in runs if run.status == "running"]
        with self.observer.phase("optimizer"):
            failed = step_optimizers(runs, factors)  # clipping and all tasks' AdamW as one update
        self._fail_everywhere(runs, failed, "optimizer step failed at step {step} on another stage")
        runs = [run for run in runs if run.status == "running"]
        elapsed = time.perf_counter() - start
        for run in runs:
            name = run.spec.name
            run.step += 1
            run.losses.append(losses[name])
            run.accuracies.append(accuracies[name])
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
        self.evaluate([run for run in runs if run.evaluation_due])
        return {run.spec.name: losses[run.spec.name] for run in runs}

    def run_schedule(self, units: list[list[tuple[int, int]]], runs: list[TaskRun]) -> None:
        """Every micro-batch's forward and backward in the schedule's 1F1B order (one process: each
        forward then its backward). With replicas, a group's adapter gradients are all-reduced in group
        order (the same collective order on every replica), each as soon as its last backward here is
        done and all earlier groups' have started."""
        topo = self.topo
        remaining, reductions, next_group = [len(u) for u in units], [], 0

        def start_reductions():
            nonlocal next_group
            while next_group < len(units) and remaining[next_group] == 0:
                if topo.dp > 1:
                    reductions.extend(start_all_reduce(self.owned[run.spec.name], topo.replica_group)
                                      for run in runs if run.spec.name in self.groups[next_group]
                                      and self.owned[run.spec.name])
                next_group += 1

        start_reductions()
        for block in blocks(units, self.schedule):
            for kind, unit in one_f_one_b(block, topo.stage, topo.pp):
                if kind == "fwd":
                    self.forward(unit)
                else:
                    self.backward(unit)
                    remaining[unit[0]] -= 1
                    start_reductions()
        self.transfers.wait()
        finish_all_reduce(reductions)

    def blocks(self, units: list[list[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
        """Each block is one 1F1B: a group each ("1f1b"), or all groups' micro-batches alternating."""
        return blocks(units, self.schedule)

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
            inputs = self.transfers.recv(self._hidden_shape(batch), topo.rank - topo.tp).requires_grad_()
        done = self._timed("fwd", unit)
        with self.observer.phase("forward"), recomputing(self.model, self.recomputed(unit[0])):
            sums, hidden = self.stage_loss_sums(batch, inputs, training=True, hits=self._hits)
        if topo.last:
            # over each task's step-wide token count (one host read adds the sums to the loss log); a
            # non-finite loss stays out of the backward (only its own task is stopped, after the step)
            self._saved[unit] = (inputs, summed_task_loss(sums, self._counts, self._sums))
        else:
            self._saved[unit] = (inputs, hidden)
        done()
        if not topo.last:
            self.transfers.send(hidden.detach(), topo.rank + topo.tp)

    def backward(self, unit: tuple[int, int]) -> None:
        topo = self.topo
        inputs, out = self._saved.pop(unit)
        grad = None if topo.last else self.transfers.recv(out.shape, topo.rank + topo.tp)
        done = self._timed("bwd", unit)
        if out is not None and out.requires_grad:
            with self.observer.phase("backward"), recomputing(self.model, self.recomputed(unit[0])):
                out.backward(grad)
        done()
        if not topo.first:
            self.transfers.send(inputs.grad if inputs.grad is not None else torch.zeros_like(inputs),
                                topo.rank - topo.tp)

    def recomputed(self, group: int) -> bool:
        """Whether the Plan recomputes this group's activations (a group that joined mid-run: no)."""
        return group < len(self.recompute) and self.recompute[group]

    def _replica_sum(self, values: dict, names: list[str]) -> dict[str, float]:
        """Per-task figures summed over the replicas (an all-reduce over this stage's replica group)."""
        totals = torch.tensor([float(values.get(n, 0)) for n in names], dtype=torch.float64)
        dist.all_reduce(totals, group=self.topo.replica_group)
        return dict(zip(names, totals.tolist()))

    def _step_figures(self, names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
        """Each task's mean loss and token accuracy over its whole batch (known on the last stage; NaN
        on the others)."""
        if not self.topo.last:
            return ({n: float("nan") for n in names},) * 2
        sums, hits = self._sums, {n: float(self._hits.get(n, 0)) for n in names}
        if self.topo.dp > 1:
            sums, hits = self._replica_sum(sums, names), self._replica_sum(hits, names)
        counts = self._counts
        return {n: sums[n] / counts[n] for n in names}, {n: hits[n] / counts[n] for n in names}

    def _grad_norms(self, runs: list[TaskRun]) -> dict[str, torch.Tensor | None]:
        """Each task's total gradient norm over all its stages and tensor ranks (a split tensor's
        slices on each, a replicated tensor once); one process: `grad_norms` alone."""
        split = self.topo.pp > 1 or self.topo.tp > 1
        shares = [[p for p in self.owned[run.spec.name]
                   if self.tensor_parallel is None or self.tensor_parallel.norm_share(p)] for run in runs]
        norms = grad_norms(shares)
        if split and runs:
            squares = torch.stack([n.double() ** 2 if n is not None else torch.zeros((), dtype=torch.float64,
                                                                                       device=self.device)
                                   for n in norms]).cpu()
            dist.all_reduce(squares, group=self.topo.pipeline_group)
            norms = list(squares.sqrt().to(self.device, torch.float32))
        return {run.spec.name: norm for run, norm in zip(runs, norms)}

    def _stop_non_finite(self, runs: list[TaskRun], losses: dict[str, float],
                         norms: dict[str, float]) -> None:
        """Fail a task whose loss (known on the last stage) or gradients are non-finite, on every
        process alike. Its gradients never reach its optimizer; the other tasks never saw its values
        (own rows only, and a non-finite loss was left out of the backward)."""
        failed = {}
        for run in runs:
            name, norm = run.spec.name, norms.get(run.spec.name)
            if self.topo.last and not math.isfinite(losses[name]):
                failed[name] = f"non-finite loss ({losses[name]}) at step {run.step + 1}"
            elif norm is not None and not math.isfinite(norm):
                failed[name] = f"non-finite gradient at step {run.step + 1}"
        self._fail_everywhere(runs, failed, "non-finite loss at step {step}")

    def _fail_everywhere(self, runs: list[TaskRun], failed: dict[str, str], elsewhere: str) -> None:
        """Fail the `failed` tasks (name -> reason); with several processes, a task failed on one of
        them fails on all (`elsewhere`: the reason where it did not fail locally)."""
        if self.topo.world > 1:
            flags = torch.tensor([float(run.spec.name in failed) for run in runs])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            for run, bad in zip(runs, flags.tolist()):
                if bad and run.spec.name not in failed:
                    failed[run.spec.name] = elsewhere.format(step=run.step + 1)
        for run in runs:
            if run.spec.name in failed and run.status == "running":
                self.fail(run, failed[run.spec.name])

    @torch.no_grad()
    def evaluate(self, runs: list[TaskRun]) -> None:
        """Evaluate `runs` together: their validation sets go through the backbone in fused micro-batches
        of the Plan's layout and token budget, forward only, dropout off (through the stages in order;
        each replica its share). Records valid_loss (mean over the loss-bearing tokens, as training) and
        valid_mean_token_accuracy per task on every process; early stopping may stop a task here
        (validation.record_evaluation)."""
        if not runs:
            return
        topo, start = self.topo, time.perf_counter()
        sums, hits, counts, tokens = {}, {}, {}, 0
        for group in self.groups:  # the Plan's fusion groups, as in a training step
            batches = {run.spec.name: run.validation for run in runs if run.spec.name in group}
            for batch in self.replica_micro_batches(batches, 1, split_padded=True) if batches else []:
                for name, n in batch.target_counts.items():
                    counts[name] = counts.get(name, 0) + n
                inputs = None if topo.first else self.transfers.recv(self._hidden_shape(batch), topo.rank - topo.tp)
                batch_sums, hidden = self.stage_loss_sums(batch, inputs, training=False, hits=hits)
                if not topo.last:
                    self.transfers.send(hidden, topo.rank + topo.tp)
                for name, total in (batch_sums or {}).items():
                    sums[name] = sums.get(name, 0.0) + float(total)
                tokens += sum(batch.tokens_per_task.values())
        self.transfers.wait()
        names = [run.spec.name for run in runs]
        if topo.world > 1:  # the replicas' last stages hold the shares; every process learns the totals
            figures = torch.tensor([[sums.get(n, 0.0), float(hits.get(n, 0)), float(counts.get(n, 0))]
                                    if topo.reports else [0.0, 0.0, 0.0] for n in names], dtype=torch.float64)
            dist.all_reduce(figures)
            sums, hits, counts = ({n: row[i] for n, row in zip(names, figures.tolist())} for i in range(3))
        for run in runs:
            name = run.spec.name
            record_evaluation(run, sums[name] / counts[name], float(hits[name]) / counts[name])
        self.eval_times.append((len(self.step_times), time.perf_counter() - start, tokens))

    def micro_batches(self, batches: dict[str, list[Example]], split_padded: bool = False
                      ) -> list[FusedBatch | ChunkedBatch]:
        """The fused micro-batch(es) of one group's step, in the Plan's layout. `split_padded`: padded
        micro-batches too hold at most the token budget, padding included (whole validation sets)."""
        pad_id = self.backbone.tokenizer.pad_token_id
        adapters = {name: self.mux.adapters[name] for name in batches}
        lead = {name: a.lead_tokens for name, a in adapters.items()}
        if self.alignment.layout == "padded":
            parts = split_by_budget(batches, 1, self.alignment.token_budget, lead, padded=True) if split_padded \
                else [batches]
            return [fuse(part, pad_id, self.device, lead=lead) for part in parts]
        offset = {name: a.prefix_tokens for name, a in adapters.items()}
        return [pack_chunks(part, self.alignment.chunk_len, pad_id, self.device, lead=lead, position_offset=offset)
                for part in split_by_budget(batches, self.alignment.chunk_len, self.alignment.token_budget, lead)]

    def train(self, progress: bool = True, after_step: Callable[["MultiplexedTrainer"], None] | None = None) -> None:
        """Step until no task is active. `after_step(self)` runs at every step boundary (checkpoints, the
        spool of submitted and cancelled tasks); with several processes, on every process alike (it may
        hold collectives). The progress bar is the last process's (its last stage knows the losses)."""
        from tqdm.auto import tqdm

        total = max((run.total_steps - run.step for run in self.active), default=0)
        show = progress and self.topo.rank == self.topo.world - 1
        with tqdm(total=total, desc="training", unit="step", disable=not show) as bar:
            while self.active:
                losses = self.step()
                bar.update(1)
                bar.set_postfix(progress_figures(self.runs, losses))
                if after_step is not None:
                    after_step(self)
                    bar.total = max(bar.total, bar.n + max((r.total_steps - r.step for r in self.active), default=0))


def progress_figures(runs: dict[str, TaskRun], losses: dict[str, float], most: int = 4) -> dict[str, str]:
    """The progress bar's figures: each (of the first `most`) task's train loss, and its latest
    valid_loss with the best one where it validates."""
    figures = {}
    for name, loss in list(losses.items())[:most]:
        run, text = runs[name], f"{loss:.3f}"
        if run.evaluations:
            text += f" val {run.evaluations[-1]['valid_loss']:.3f} (best {run.best_loss:.3f})"
        figures[name[:12]] = text
    return figures
