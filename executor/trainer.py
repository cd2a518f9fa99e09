"""The multiplexed trainer: every step, the active tasks' batches go through the backbone as ONE fused
micro-batch (or a few, when the Plan's token budget splits it); each task keeps its own loss, optimizer,
schedule, clipping and step count. The micro-batch is chunk-aligned by default (alignment.py) or
padded per row (`Alignment(layout="padded")`, data.fuse).

Why a task trains exactly as it would alone: its loss is the mean over its own tokens, rows never
interact inside the backbone, and the total loss is the plain sum of the tasks' losses, so the
gradient reaching a task's adapter is the gradient of that task's loss alone.

Why one task's failure never hurts another: for the same reason. A task whose loss or gradients turn
non-finite, or whose next batch holds a corrupt example, is stopped (`status="failed"`, the step and
the reason kept); its loss is left out of the backward and its gradients never reach its optimizer,
and the other tasks' rows never saw its values. Tasks can join (`add_task`) and leave (`cancel`)
between steps; the backbone stays loaded.

Validation (executor/validation.py): after a step, every task due for evaluation (every
`eval_interval` of its steps, and at its end) is evaluated in the same fused, chunk-aligned layout,
forward only: no autograd graph, dropout off, no generator drawn from and no task state touched but its
evaluation record, so a task's training is bit for bit the same with evaluation on or off.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import get_scheduler

from muxtune.executor.alignment import ChunkedBatch, pack_chunks, packed_attention, split_by_budget
from muxtune.executor.backbone import Backbone
from muxtune.executor.data import IGNORE, DataOptions, Example, FusedBatch, TaskSampler, example_origin, fuse
from muxtune.executor.hooks import StepObserver
from muxtune.executor.mux import Multiplexer, TaskAdapter
from muxtune.executor.validation import record_evaluation
from muxtune.errors import MuxTuneError
from muxtune.spec import Alignment, TaskSpec


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
    optimizer = make_optimizer(params, spec)
    total_steps = spec.step_count(len(examples))
    scheduler = get_scheduler(spec.lr_schedule, optimizer, num_warmup_steps=spec.warmup_steps,
                              num_training_steps=total_steps)
    sampler = TaskSampler(examples, spec.batch_size, spec.seed)
    if spec.validates and not validation:
        raise MuxTuneError(f"task {spec.name!r}: validation is configured but no validation examples were given")
    return TaskRun(spec, adapter, optimizer, scheduler, sampler, total_steps, spec.examples_to_train(len(examples)),
                   validation if spec.validates else None, spec.eval_interval(total_steps))


def make_optimizer(params: list[torch.nn.Parameter], spec: TaskSpec) -> torch.optim.Optimizer:
    """A task's AdamW. `fused=True` runs the whole update of all its tensors in one kernel per tensor
    (CPU and CUDA) instead of ~10 small ops each: a task's step costs a third as much on the host.
    The references in the tests build theirs here too, so "the same optimizer" holds bit for bit."""
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=True)


def example_problem(example: Example, vocab_size: int, max_seq_len: int) -> str | None:
    """Why an example cannot be trained on (a corrupt cache row, a bad source), or None."""
    ids, labels = example.input_ids, example.labels
    if not ids or len(ids) != len(labels):
        return f"{len(ids)} token ids but {len(labels)} labels"
    if len(ids) > max_seq_len:
        return f"{len(ids)} tokens, longer than max_seq_len={max_seq_len}"
    if min(ids) < 0 or max(ids) >= vocab_size:
        return f"token id {min(ids) if min(ids) < 0 else max(ids)} outside the vocabulary (0..{vocab_size - 1})"
    if any(label != IGNORE and label != token for label, token in zip(labels, ids)):
        return "a label that is neither -100 nor its token id"
    return None


@torch.no_grad()
def grad_norms(runs: list[TaskRun]) -> list[torch.Tensor | None]:
    """Every task's total gradient norm (None without gradients; one pass serves both the finiteness
    check and the clipping), bit for bit as `torch.nn.utils.get_total_norm` computes it
    (the 2-norm of the stacked per-tensor 2-norms), but the per-tensor norms of ALL tasks in one
    foreach call: with many small adapters the per-call work of doing it task by task is most of it.
    Every adapter tensor is fp32 on the trainer's device (TaskAdapter), so the library's grouping by
    device and dtype is one group in parameter order, as here."""
    grads = [[p.grad for p in run.parameters() if p.grad is not None] for run in runs]
    flat = [g for task in grads for g in task]
    per_tensor = list(torch._foreach_norm(flat, 2.0)) if flat else []
    out, start = [], 0
    for task in grads:
        part, start = per_tensor[start : start + len(task)], start + len(task)
        out.append(torch.linalg.vector_norm(torch.stack(part), 2.0) if part else None)
    return out


@torch.no_grad()
def clip_with_norm(run: TaskRun, max_norm: float, norm: torch.Tensor) -> None:
    """`torch.nn.utils.clip_grads_with_norm_` for one task's gradients, the same two ops (scale
    clamped at 1, one foreach multiply) without its per-call grouping by device and dtype."""
    grads = [p.grad for p in run.parameters() if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))


class MultiplexedTrainer:
    """Trains tasks on one shared backbone. `groups` (from the Plan) lists the fusion groups: the
    tasks of a group share one fused micro-batch; groups run one after another within a step
    (default: one group of all tasks). `alignment` (from the Plan) sets the micro-batch layout.
    `validation`: the validation examples of the tasks that validate (executor/validation.py)."""

    def __init__(self, backbone: Backbone, specs: list[TaskSpec], examples: dict[str, list[Example]],
                 groups: list[list[str]] | None = None, alignment: Alignment | None = None,
                 validation: dict[str, list[Example]] | None = None):
        self.backbone = backbone
        self.model = backbone.model
        self.device = next(self.model.parameters()).device
        self.mux = Multiplexer.attach(self.model)
        validation = validation or {}
        self.runs: dict[str, TaskRun] = {s.name: build_task_run(self.mux, s, examples[s.name], validation.get(s.name))
                                         for s in specs}
        self.groups = groups or [list(self.runs)]
        self.alignment = alignment or Alignment()
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []  # real (non-padding) tokens of each step's fused batches
        self.step_shapes: list[tuple[int, int]] = []  # (rows, seq) of every fused micro-batch computed
        # evaluations: (global step, seconds, tokens put through the backbone) of each fused evaluation
        self.eval_times: list[tuple[int, float, int]] = []
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.observer = StepObserver()  # phase hooks (executor/hooks.py): the profiler times the step here
        for run in self.runs.values():
            self.check_validation(run)

    def check_validation(self, run: TaskRun) -> None:
        """Check a task's validation examples once, as it joins: they are held in memory and evaluated
        whole at every evaluation, so this sees every row evaluation will. A corrupt one (a damaged cache
        row) would break the fused forward of every task due with it; instead it fails this task only,
        naming the file and line it came from (on_bad_line: error), or is left out and counted (skip),
        as a corrupt training example is when drawn."""
        if not run.validation:
            return
        kept = []
        for example in run.validation:
            problem = example_problem(example, self.vocab_size, run.spec.max_seq_len)
            if problem is None:
                kept.append(example)
            elif run.spec.on_bad_line == "error":
                self.fail(run, f"corrupt validation data: {self.origin(run, example)}: {problem}")
                return
            else:
                run.bad_examples += 1
        if not any(label != IGNORE for ex in kept for label in ex.labels[1:]):
            self.fail(run, f"corrupt validation data: no usable example left in "
                           f"{run.spec.validation_data or run.spec.data} ({run.bad_examples} corrupt)")
            return
        run.validation = kept

    def origin(self, run: TaskRun, example: Example) -> str:
        """`file:LINE` of a validation example (its file read again: executor/data.example_origin)."""
        source = run.spec.validation_data or run.spec.data  # a split's examples come from the training file
        if example.index is None:  # built in memory, not read from a file
            return f"{source}: an example"
        return example_origin(source, self.backbone.tokenizer, run.spec.max_seq_len, DataOptions.of(run.spec),
                              example.index)

    def add_task(self, spec: TaskSpec, examples: list[Example], group: int = 0,
                 validation: list[Example] | None = None) -> TaskRun:
        """A tenant joins between steps: its adapter is attached to the loaded backbone and it takes
        part from the next step on, with its own step count (so it trains as it would alone)."""
        if spec.name in self.runs:
            raise MuxTuneError(f"task {spec.name!r} is already in this run")
        run = self.runs[spec.name] = build_task_run(self.mux, spec, examples, validation)
        self.groups[group].append(spec.name)
        self.check_validation(run)
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
        error) or is skipped and counted (skip). Any error reading the data fails only this task."""
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

    def step(self) -> dict[str, float]:
        """One optimizer step for every active task: per fusion group one fused forward and backward."""
        runs = self.active
        start = time.perf_counter()
        sums, counts, tokens, computed, hits = {}, {}, {}, {}, {}
        for group in self.groups:
            members = [run for run in runs if run.spec.name in group]
            with self.observer.phase("draw"):
                batches = {run.spec.name: self.draw_batch(run) for run in members}
            batches = {name: batch for name, batch in batches.items() if batch is not None}
            if not batches:
                continue
            with self.observer.phase("fuse"):
                micro_batches = self.micro_batches(batches)
            self.observer.fused(micro_batches)
            # a task's loss is the mean over ALL its target tokens of the step, however they were split
            for batch in micro_batches:
                for name, n in batch.target_counts.items():
                    counts[name] = counts.get(name, 0) + n
            for batch in micro_batches:
                with self.observer.phase("forward"):
                    batch_sums = self.loss_sums(batch, training=True, hits=hits)
                # a non-finite loss stays out of the backward: only its own task is stopped
                finite = {name: total for name, total in batch_sums.items() if torch.isfinite(total)}
                if finite:
                    with self.observer.phase("backward"):
                        torch.stack([total / counts[name] for name, total in finite.items()]).sum().backward()
                for name, total in batch_sums.items():
                    sums[name] = sums.get(name, 0.0) + float(total.detach())
                for name, n in batch.tokens_per_task.items():
                    tokens[name] = tokens.get(name, 0) + n
                for name, n in batch.computed_per_task.items():
                    computed[name] = computed.get(name, 0) + n
                self.step_shapes.append(tuple(batch.input_ids.shape))
        losses = {name: sums[name] / counts[name] for name in sums}
        live = [run for run in runs if run.status == "running"]
        with self.observer.phase("optimizer"):
            norms = {run.spec.name: norm for run, norm in zip(live, grad_norms(live))}
        for run in live:
            loss, norm = losses[run.spec.name], norms[run.spec.name]
            if not math.isfinite(loss):
                self.fail(run, f"non-finite loss ({loss}) at step {run.step + 1}")
            elif norm is not None and not torch.isfinite(norm):
                self.fail(run, f"non-finite gradient at step {run.step + 1}")
        for run in runs:
            if run.status != "running":
                continue
            try:
                norm = norms[run.spec.name]
                with self.observer.phase("optimizer"):
                    if run.spec.max_grad_norm is not None and norm is not None:
                        clip_with_norm(run, run.spec.max_grad_norm, norm)
                    run.optimizer.step()
                run.scheduler.step()
            except (RuntimeError, ValueError, OverflowError) as exc:  # e.g. an lr that overflows fp32
                self.fail(run, f"optimizer step failed at step {run.step + 1}: {exc}")
            with self.observer.phase("optimizer"):
                run.optimizer.zero_grad(set_to_none=True)
        runs = [run for run in runs if run.status == "running"]
        elapsed = time.perf_counter() - start
        for run in runs:
            run.step += 1
            run.losses.append(losses[run.spec.name])
            run.accuracies.append(float(hits[run.spec.name]) / counts[run.spec.name])
            run.tokens += tokens[run.spec.name]
            run.computed_tokens += computed[run.spec.name]
            run.seconds += elapsed
            if run.done:
                run.status = "finished"
        self.step_times.append(elapsed)
        self.step_tokens.append(sum(tokens.values()))
        self.evaluate([run for run in runs if run.evaluation_due])
        return {run.spec.name: losses[run.spec.name] for run in runs}

    @torch.no_grad()
    def evaluate(self, runs: list[TaskRun]) -> None:
        """Evaluate `runs` together: their validation sets go through the backbone in fused micro-batches
        of the Plan's layout and token budget, forward only, dropout off. Records valid_loss (mean over
        the loss-bearing tokens, as training) and valid_mean_token_accuracy per task; early stopping
        may stop a task here (validation.record_evaluation)."""
        if not runs:
            return
        start = time.perf_counter()
        sums, hits, counts, tokens = {}, {}, {}, 0
        for group in self.groups:  # the Plan's fusion groups, as in a training step
            batches = {run.spec.name: run.validation for run in runs if run.spec.name in group}
            if not batches:
                continue
            for batch in self.micro_batches(batches, split_padded=True):
                for name, n in batch.target_counts.items():
                    counts[name] = counts.get(name, 0) + n
                for name, total in self.loss_sums(batch, training=False, hits=hits).items():
                    sums[name] = sums.get(name, 0.0) + float(total)
                tokens += sum(batch.tokens_per_task.values())
        for run in runs:
            name = run.spec.name
            record_evaluation(run, sums[name] / counts[name], float(hits[name]) / counts[name])
        self.eval_times.append((len(self.step_times), time.perf_counter() - start, tokens))

    def micro_batches(self, batches: dict[str, list[Example]], split_padded: bool = False
                      ) -> list[FusedBatch | ChunkedBatch]:
        """The fused micro-batch(es) of one group's step, in the Plan's layout. `split_padded`: padded
        micro-batches too hold at most the token budget of sequences (whole validation sets)."""
        pad_id = self.backbone.tokenizer.pad_token_id
        adapters = {name: self.mux.adapters[name] for name in batches}
        lead = {name: a.lead_tokens for name, a in adapters.items()}
        if self.alignment.layout == "padded":
            parts = split_by_budget(batches, 1, self.alignment.token_budget, lead) if split_padded else [batches]
            return [fuse(part, pad_id, self.device, lead=lead) for part in parts]
        offset = {name: a.prefix_tokens for name, a in adapters.items()}
        return [pack_chunks(part, self.alignment.chunk_len, pad_id, self.device, lead=lead, position_offset=offset)
                for part in split_by_budget(batches, self.alignment.chunk_len, self.alignment.token_budget, lead)]

    def task_losses(self, batch: FusedBatch | ChunkedBatch, training: bool) -> dict[str, torch.Tensor]:
        """Mean next-token loss of each task over its own target tokens (as HF's causal-LM loss)."""
        counts = batch.target_counts
        return {name: total / counts[name] for name, total in self.loss_sums(batch, training).items()}

    def loss_sums(self, batch: FusedBatch | ChunkedBatch, training: bool,
                  hits: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Summed next-token loss of each task over its own target tokens in this micro-batch; `hits`
        adds up each task's correctly predicted (argmax) target tokens."""
        with self.mux.route(batch.segments, batch.input_ids.shape[1], training=training,
                            own_rows=isinstance(batch, ChunkedBatch)):
            if isinstance(batch, ChunkedBatch):
                hidden, targets = self.chunked_hidden_states(batch).view(*batch.targets.shape, -1), batch.targets
            else:
                hidden, targets = self.hidden_states(batch)[:, :-1], batch.labels[:, 1:]
        with self.observer.phase("head"):
            return self.head_loss_sums(batch, hidden, targets, hits)

    def head_loss_sums(self, batch: FusedBatch | ChunkedBatch, hidden: torch.Tensor,
                       targets: torch.Tensor, hits: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Each task's summed loss from the last hidden states [rows, seq, d] and next-token targets
        [rows, seq] (the last pipeline stage runs only this part); `hits` as in loss_sums."""
        valid = targets != IGNORE
        # the LM head runs only on positions that carry loss: padding and prompts cost no vocab GEMM
        logits = self.model.get_output_embeddings()(hidden[valid])
        per_token = F.cross_entropy(logits.float(), targets[valid], reduction="none")
        row_task = torch.empty(batch.input_ids.shape[0], dtype=torch.long, device=self.device)
        for i, seg in enumerate(batch.segments):
            row_task[seg.start : seg.end] = i
        token_task = row_task[:, None].expand_as(valid)[valid]
        sums = torch.zeros(len(batch.segments), device=self.device).index_add(0, token_task, per_token)
        if hits is not None:  # read off the logits: nothing of it reaches the loss or its gradient
            right = (logits.detach().argmax(-1) == targets[valid]).to(torch.long)
            counts = torch.zeros(len(batch.segments), dtype=torch.long, device=self.device).index_add(0, token_task, right)
            for i, seg in enumerate(batch.segments):
                hits[seg.task] = hits.get(seg.task, 0) + counts[i]
        return {seg.task: sums[i] for i, seg in enumerate(batch.segments)}

    def chunked_hidden_states(self, batch: ChunkedBatch) -> torch.Tensor:
        """Last hidden states [1, rows * chunk_len, d] of the flattened chunk stream. Attention stays
        inside each sequence; prompt tasks' virtual slots get their virtual tokens, prefix tasks'
        sequences see their K/V prefix (alignment.packed_attention)."""
        adapters = [self.mux.adapters[seg.task] for seg in batch.segments]
        embeds = self.chunked_embeds(batch)
        prefixes = {i: a.sequence.key_values(1, embeds.dtype) for i, a in enumerate(adapters) if a.prefix_tokens}
        with packed_attention(self.model, batch, prefixes):
            return self.model.base_model(inputs_embeds=embeds, position_ids=batch.position_ids.reshape(1, -1)
                                         ).last_hidden_state

    def chunked_embeds(self, batch: ChunkedBatch) -> torch.Tensor:
        """Input embeddings [1, rows * chunk_len, d] of the chunk stream, prompt tasks' virtual tokens in
        their slots (the first pipeline stage runs only this part before its layers)."""
        adapters = [self.mux.adapters[seg.task] for seg in batch.segments]
        ids = batch.input_ids.reshape(1, -1)
        embeds = self.model.get_input_embeddings()(ids)
        if batch.virtual_slots:
            flat = embeds[0]
            for index, slots in batch.virtual_slots.items():
                placeholders = flat.new_zeros(slots.shape[0], slots.shape[1], flat.shape[-1])
                virtual = adapters[index].sequence.prepend(placeholders)  # [sequences, n, d]
                flat = flat.index_put((slots.reshape(-1),), virtual.reshape(-1, flat.shape[-1]))
            embeds = flat.unsqueeze(0)
        return embeds

    def hidden_states(self, batch: FusedBatch) -> torch.Tensor:
        """The backbone's last hidden states for the fused batch, with every task's sequence-level
        method applied to its own rows: prompt tuning's virtual tokens, prefix tuning's KV prefix."""
        adapters = [self.mux.adapters[seg.task] for seg in batch.segments]
        base = self.model.base_model
        if all(a.sequence is None for a in adapters):
            return base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        rows, seq = batch.input_ids.shape
        embeds = self.model.get_input_embeddings()(batch.input_ids)
        parts = []
        for seg, adapter in zip(batch.segments, adapters):
            part = embeds[seg.start : seg.end]
            parts.append(adapter.sequence.prepend(part) if adapter.lead_tokens else part)
        embeds = torch.cat(parts, dim=0)
        # A prefix task's tokens sit at positions n.. after its n prefix slots (as with HF PEFT's cache).
        offset = torch.cat([torch.full((seg.end - seg.start,), a.prefix_tokens, device=self.device)
                            for seg, a in zip(batch.segments, adapters)])
        position_ids = torch.arange(seq, device=self.device)[None, :] + offset[:, None]
        mask, cache = batch.attention_mask, None
        longest = max(a.prefix_tokens for a in adapters)
        if longest:
            cache, prefix_mask = self._prefix_cache(batch, adapters, longest, embeds.dtype)
            mask = torch.cat([prefix_mask, mask], dim=1)
        return base(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                    **{_cache_kwarg(base): cache}).last_hidden_state

    def _prefix_cache(self, batch: FusedBatch, adapters, longest: int, dtype):
        """One KV region of `longest` slots for the whole batch: each prefix task's rows hold their
        prefix right-aligned in it; every other slot is masked out."""
        from transformers import DynamicCache

        from muxtune.executor.peft.prefix import kv_geometry

        layers, kv_heads, head_dim = kv_geometry(self.model)
        per_layer = [([], []) for _ in range(layers)]
        mask = torch.zeros(batch.input_ids.shape[0], longest, dtype=batch.attention_mask.dtype, device=self.device)
        for seg, adapter in zip(batch.segments, adapters):
            rows, n = seg.end - seg.start, adapter.prefix_tokens
            kv = adapter.sequence.key_values(rows, dtype) if n else None
            mask[seg.start : seg.end, longest - n :] = 1
            for layer, (keys, values) in enumerate(per_layer):
                for store, i in ((keys, 0), (values, 1)):
                    blank = torch.zeros(rows, kv_heads, longest - n, head_dim, dtype=dtype, device=self.device)
                    store.append(torch.cat([blank, kv[layer][i]], dim=2) if n else blank)
        cache = DynamicCache([(torch.cat(k, dim=0), torch.cat(v, dim=0)) for k, v in per_layer])
        return cache, mask

    def train(self, progress: bool = True, after_step: Callable[["MultiplexedTrainer"], None] | None = None) -> None:
        """Step until no task is active. `after_step` runs at every step boundary (checkpoints, the
        spool of submitted and cancelled tasks)."""
        from tqdm.auto import tqdm

        total = max((run.total_steps - run.step for run in self.active), default=0)
        with tqdm(total=total, desc="training", unit="step", disable=not progress) as bar:
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


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; older 5.x releases silently drop
    an unknown `cache=` into **kwargs (the prefix would vanish), so ask the model which name it takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
