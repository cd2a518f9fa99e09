"""Tasks -> the micro-batch shapes the CostModel prices. The one place a task's per-step work is turned
into `MicroBatch`/`TaskLoad` objects (the planner reuses it).

A task's step is `batch_size` sequences of (on average) `seq_len` tokens. Splitting it over data-parallel
replicas and micro-batches divides its sequences; fusing tasks puts their shares side by side. Without
chunk alignment the fused batch pads every row to its longest sequence (what the executor's `fuse` does),
so a task contributes rows x the group's longest length; `packed=True` counts only real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from muxtune.errors import MuxTuneError

try:
    from muxtune.profiler.cost_model import MicroBatch, TaskLoad
except ImportError:  # TODO(merge issue 5): delete this fallback; it copies the agreed interface field for field

    @dataclass(frozen=True)
    class TaskLoad:
        method: str
        rank: int
        tokens: int
        params: int

    @dataclass(frozen=True)
    class MicroBatch:
        tasks: tuple[TaskLoad, ...]
        seq_len: int

        @property
        def tokens(self) -> int:
            return sum(t.tokens for t in self.tasks)


@dataclass(frozen=True)
class TaskWork:
    """One task's work per optimizer step, independent of where it runs."""

    name: str
    method: str
    rank: int  # LoRA/DoRA r, adapter size, virtual tokens; 0 if none (CostModel's TaskLoad.rank)
    params: int  # trainable parameters
    sequences: int  # sequences per optimizer step (batch size)
    seq_len: float  # mean tokens per sequence

    @property
    def tokens(self) -> float:
        return self.sequences * self.seq_len


def method_rank(peft) -> int:
    """The size knob of a PEFT config that the CostModel's TaskLoad.rank means."""
    for key in ("r", "size", "num_virtual_tokens"):
        if hasattr(peft, key):
            return int(getattr(peft, key))
    return 0


def task_work(spec, params: int, mean_seq_len: float | None = None) -> TaskWork:
    """A TaskSpec's step: batch_size sequences of mean_seq_len tokens (default: max_seq_len, the worst case)."""
    length = spec.max_seq_len if mean_seq_len is None else min(float(mean_seq_len), spec.max_seq_len)
    return TaskWork(spec.name, spec.peft.method, method_rank(spec.peft), int(params), spec.batch_size, length)


def count_trainable_params(spec, model) -> int:
    """Exact trainable parameter count of a task's adapter on `model` (a loaded backbone), built the way
    the executor builds it (the model is not modified)."""
    from muxtune.executor.mux import TaskAdapter

    adapter = TaskAdapter(spec.name, spec.peft, model, spec.seed, spec.max_seq_len, "cpu")
    return sum(p.numel() for p in adapter.parameters() if p.requires_grad)


def split_micro_batches(works: list[TaskWork], parts: int, packed: bool = False) -> list[MicroBatch]:
    """Split a fused group's step into `parts` micro-batches (dp replicas x micro-batches, in that order
    of use), each task's sequences spread as evenly as possible. Micro-batches that get no sequence
    are dropped (a task with fewer sequences than parts)."""
    if parts < 1:
        raise MuxTuneError(f"micro-batches: need at least 1 part, got {parts}")
    longest = max(w.seq_len for w in works)
    out = []
    for i in range(parts):
        loads = []
        for w in works:
            rows = w.sequences // parts + (1 if i < w.sequences % parts else 0)
            if rows:
                per_row = w.seq_len if packed else longest
                loads.append(TaskLoad(w.method, w.rank, int(round(rows * per_row)), w.params))
        if loads:
            out.append(MicroBatch(tuple(loads), seq_len=int(math.ceil(longest))))
    return out
