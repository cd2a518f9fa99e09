"""Tasks -> the micro-batch shapes the CostModel prices. The one place a task's per-step work is turned
into `MicroBatch`/`TaskLoad` objects (the planner reuses it).

A task's step is `batch_size` sequences of (on average) `seq_len` tokens. Splitting it over data-parallel
replicas and micro-batches divides its sequences; fusing tasks puts their shares side by side. Without
chunk alignment the fused batch pads every row to its longest sequence (what the executor's `fuse` does),
so a task contributes rows x the group's longest length; `packed=True` counts only real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from muxtune.errors import MuxTuneError
from muxtune.profiler.cost_model import MicroBatch, TaskLoad
from muxtune.schedule import part_size
from muxtune.spec import method_card, method_rank  # noqa: F401  (its callers import method_rank from here too)


@dataclass(frozen=True)
class TaskWork:
    """One task's work per optimizer step, independent of where it runs."""

    name: str
    method: str
    rank: int  # LoRA/DoRA r, adapter size, virtual tokens; 0 if none (CostModel's TaskLoad.rank)
    params: int  # trainable parameters
    sequences: int  # sequences per optimizer step (batch size)
    seq_len: float  # mean tokens per sequence
    targets: tuple[str, ...] = ()  # LoRA/DoRA target op names (() = the method's defaults)
    dropout: float = 0.0  # LoRA/DoRA dropout probability
    eval_sequences: int = 0  # validation sequences of one evaluation (0: the task does not validate)
    eval_every: int = 0  # steps between its evaluations (it is evaluated at its last step too)
    eval_seq_len: float = 0.0  # tokens a validation sequence is priced at (0: seq_len); padded: its row length

    @property
    def tokens(self) -> float:
        return self.sequences * self.seq_len


def task_work(spec, params: int, mean_seq_len: float | None = None) -> TaskWork:
    """A TaskSpec's step: batch_size sequences of mean_seq_len tokens (default: max_seq_len, the worst case)."""
    length = spec.max_seq_len if mean_seq_len is None else min(float(mean_seq_len), spec.max_seq_len)
    # the CostModel prices LoRA/DoRA per targeted op and their dropout (profile `target` rows)
    priced = method_card(spec.peft.method).targeted
    targets = tuple(spec.peft.target_modules) if priced else ()
    dropout = float(spec.peft.dropout) if priced else 0.0
    return TaskWork(spec.name, spec.peft.method, method_rank(spec.peft), int(params), spec.batch_size, length,
                    targets, dropout)


def count_trainable_params(spec, model) -> int:
    """Exact trainable parameter count of a task's adapter on `model` (a loaded backbone), built the way
    the executor builds it (the model is not modified)."""
    from muxtune.executor.mux import TaskAdapter

    adapter = TaskAdapter(spec.name, spec.peft, model, spec.seed, spec.max_seq_len, "cpu")
    return sum(p.numel() for p in adapter.parameters() if p.requires_grad)


def split_micro_batches(works: list[TaskWork], parts: int, packed: bool = False) -> list[MicroBatch]:
    """Split a fused group's step into `parts` micro-batches (dp replicas x micro-batches, in part order,
    muxtune/schedule.py), each task's sequences spread as evenly as possible. Micro-batches that get no
    sequence are dropped (a task with fewer sequences than parts): they are the last ones."""
    if parts < 1:
        raise MuxTuneError(f"micro-batches: need at least 1 part, got {parts}")
    longest = max(w.seq_len for w in works)
    out = []
    for i in range(parts):
        loads = []
        for w in works:
            rows = part_size(w.sequences, parts, i)
            if rows:
                per_row = w.seq_len if packed else longest
                loads.append(TaskLoad(w.method, w.rank, int(round(rows * per_row)), w.params, w.targets, w.dropout))
        if loads:
            out.append(MicroBatch(tuple(loads), seq_len=int(math.ceil(longest))))
    return out


def host_load(work: TaskWork, group: list[TaskWork], dp: int, packed: bool) -> TaskLoad:
    """A task's share of one replica's step, as CostModel.host_seconds prices it: its rows x their length
    (the group's longest when padded, as split_micro_batches lays them out). The simulator and the
    planner's group cost both price a task's host work at this load."""
    per_row = work.seq_len if packed else max(w.seq_len for w in group)
    return TaskLoad(work.method, work.rank, int(round(work.sequences / dp * per_row)), work.params, work.targets,
                    work.dropout)


def stage_params(work: TaskWork, stage: int, layers: int, n_layers: int) -> int:
    """A task's adapter parameters held by one stage: spread evenly over the layers, or all on the first
    stage for a method whose parameters sit with the embedding (prompt tuning's virtual tokens)."""
    if method_card(work.method).on_first_stage:
        return work.params if stage == 0 else 0
    return round(work.params * layers / n_layers)


def device_params(work: TaskWork, stage: int, layers: int, n_layers: int, tp: int, cost_model) -> tuple[int, int]:
    """(parameters one device of the stage holds, of which replicated over its tensor ranks)."""
    params = stage_params(work, stage, layers, n_layers)
    return cost_model.tp_params(params, work.targets, tp) if tp > 1 else (params, 0)


def evaluation_schedule(works: dict[str, TaskWork], steps: dict[str, int]) -> list[tuple[int, tuple[str, ...]]]:
    """(global step, the tasks evaluated after it) for every step at which some task is evaluated, as the
    executor schedules it: after a global step, every task at a multiple of its eval_every and at its
    last step, all due tasks in one pass."""
    validating = {n: w for n, w in works.items() if w.eval_sequences}
    schedule = []
    for step in range(1, max((steps[n] for n in validating), default=0) + 1):
        due = tuple(n for n, w in validating.items() if step == steps[n] or (step < steps[n] and step % w.eval_every == 0))
        if due:
            schedule.append((step, due))
    return schedule


def evaluation_counts(works: dict[str, TaskWork], steps: dict[str, int]) -> dict[tuple[str, ...], int]:
    """How often each set of tasks is evaluated together (evaluation_schedule, counted)."""
    counts: dict[tuple[str, ...], int] = {}
    for _, due in evaluation_schedule(works, steps):
        counts[due] = counts.get(due, 0) + 1
    return counts


def evaluation_micro_batches(works: list[TaskWork], token_budget: int, padded: bool = False) -> list[MicroBatch]:
    """One fused evaluation of `works`: their validation sequences in as many micro-batches as the Plan's
    token budget takes, as the executor splits them (alignment.split_by_budget): chunk-aligned, real
    tokens only; or `padded`, a row per sequence at its row length (eval_seq_len), task after task,
    each micro-batch at most the budget's rows of its longest."""
    loads = [replace(w, sequences=w.eval_sequences, seq_len=w.eval_seq_len or w.seq_len)
             for w in works if w.eval_sequences]
    if not loads:
        return []
    if not padded:
        tokens = sum(w.tokens for w in loads)
        return split_micro_batches(loads, max(1, math.ceil(tokens / token_budget)), packed=True)
    out, current = [], []  # current: (work, rows) of the micro-batch being filled

    def close():
        longest = max(w.seq_len for w, _ in current)
        out.append(MicroBatch(tuple(TaskLoad(w.method, w.rank, int(round(rows * longest)), w.params, w.targets,
                                             w.dropout) for w, rows in current), seq_len=int(math.ceil(longest))))

    for w in loads:
        left = w.sequences
        while left:
            rows = sum(r for _, r in current)
            longest = max([w.seq_len] + [v.seq_len for v, _ in current])
            fits = int(token_budget // longest) - rows if current else max(1, int(token_budget // w.seq_len))
            if fits <= 0:
                close()
                current = []
                continue
            take = min(fits, left)
            current.append((w, take))
            left -= take
    if current:
        close()
    return out


def evaluation_passes(groups: list[list[str]], works: dict[str, TaskWork], due, token_budget: int,
                      padded: bool = False) -> list[tuple[int, list[MicroBatch]]]:
    """One evaluation of the tasks `due` as the executor runs it (MultiplexedTrainer.evaluate): fusion
    group after fusion group, each group's due tasks fused into its own micro-batches. (group index,
    its micro-batches) for every group with a due task."""
    passes = []
    for g, tasks in enumerate(groups):
        mbs = evaluation_micro_batches([works[t] for t in tasks if t in due], token_budget, padded)
        if mbs:
            passes.append((g, mbs))
    return passes


def estimate_params(method: str, rank: int, shape) -> int:
    """Trainable parameters of a job known only by method and rank (a cluster trace), for the default
    targets of each method on a model of `shape` (the method card's formula). Tasks of a config use
    count_trainable_params instead."""
    return method_card(method).params(shape, rank)
