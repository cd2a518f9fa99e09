"""Task data: JSONL in, tokenized examples out, a seeded per-task order, and the fused micro-batch.

Formats (per line): `{"text": ...}` trains on every token; `{"prompt": ..., "completion": ...}` trains
on the completion only. A sequence is [bos] + tokens + [eos]; one longer than the task's max_seq_len loses the oldest prompt
tokens first (the target is what the task learns), then the end of the target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from muxtune.errors import MuxTuneError
from muxtune.executor.mux import DATA_STREAM, Segment, stream_seed

IGNORE = -100  # label of a token that carries no loss (HF convention)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss; else equal to input_ids (the model shifts)


@dataclass
class DataStats:
    lines: int = 0
    truncated: int = 0
    dropped_no_target: int = 0


def load_examples(path: Path, tokenizer, max_seq_len: int, key: str = "data") -> tuple[list[Example], DataStats]:
    """Tokenize a JSONL file. A malformed line is an error naming the file and line."""
    path = Path(path)
    examples, stats = [], DataStats()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise MuxTuneError(f"{path}: cannot open data file ({key}): {exc.strerror}") from None
    with handle:
        for lineno, line in enumerate(_lines(handle, path), start=1):
            if not line.strip():
                continue
            record = _parse(line, path, lineno)
            if "text" in record and _is_str(record, "text", path, lineno):
                prompt_ids, target_ids = [], tokenizer.encode(record["text"])
            elif "prompt" in record or "completion" in record:
                prompt_ids = tokenizer.encode(_str_field(record, "prompt", path, lineno))
                target_ids = tokenizer.encode(_str_field(record, "completion", path, lineno))
            else:
                raise MuxTuneError(f"{path}:{lineno}: expected a 'text' or 'prompt'/'completion' record, "
                                   f"got keys {sorted(record)}")
            stats.lines += 1
            overflow = len(bos) + len(prompt_ids) + len(target_ids) + len(eos) - max_seq_len
            if overflow > 0:
                # keep the target: drop the prompt's oldest tokens first, then cut the target's tail
                stats.truncated += 1
                cut = min(overflow, len(prompt_ids))
                prompt_ids = prompt_ids[cut:]
            ids = bos + prompt_ids + target_ids + eos
            labels = [IGNORE] * (len(bos) + len(prompt_ids)) + target_ids + eos
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            # labels[0] is never predicted (nothing precedes it), so it cannot carry loss
            if all(label == IGNORE for label in labels[1:]):
                stats.dropped_no_target += 1
                continue
            examples.append(Example(ids, labels))
    if not examples:
        raise MuxTuneError(f"{path}: no usable examples ({stats.lines} lines, {stats.dropped_no_target} "
                           f"with no completion tokens left within max_seq_len={max_seq_len})")
    return examples, stats


def _lines(handle, path: Path):
    try:
        yield from handle
    except UnicodeDecodeError as exc:
        raise MuxTuneError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _parse(line: str, path: Path, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MuxTuneError(f"{path}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(record, dict):
        raise MuxTuneError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


def _is_str(record: dict, key: str, path: Path, lineno: int) -> bool:
    if not isinstance(record[key], str):
        raise MuxTuneError(f"{path}:{lineno}: '{key}' must be a string")
    return True


def _str_field(record: dict, key: str, path: Path, lineno: int) -> str:
    if key not in record:
        raise MuxTuneError(f"{path}:{lineno}: missing '{key}'")
    _is_str(record, key, path, lineno)
    return record[key]


@dataclass
class TaskSampler:
    """Endless seeded order over one task's examples: a fresh permutation each epoch; a batch may span
    two epochs. Its state (epoch, cursor, generator) is all a resume needs."""

    examples: list[Example]
    batch_size: int
    seed: int
    epoch: int = 0
    cursor: int = 0
    order: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(stream_seed(self.seed, DATA_STREAM))
        self.order = self._permutation()

    def _permutation(self) -> list[int]:
        return torch.randperm(len(self.examples), generator=self.generator).tolist()

    def next_batch(self) -> list[Example]:
        batch = []
        while len(batch) < self.batch_size:
            if self.cursor == len(self.order):
                self.epoch, self.cursor, self.order = self.epoch + 1, 0, self._permutation()
            batch.append(self.examples[self.order[self.cursor]])
            self.cursor += 1
        return batch


@dataclass
class FusedBatch:
    input_ids: torch.Tensor  # [rows, seq]
    attention_mask: torch.Tensor  # [rows, seq]
    labels: torch.Tensor  # [rows, seq]
    segments: list[Segment]

    @property
    def tokens_per_task(self) -> dict[str, int]:
        return {s.task: int(self.attention_mask[s.start : s.end].sum()) for s in self.segments}


def fuse(batches: dict[str, list[Example]], pad_id: int, device="cpu", lead: dict[str, int] | None = None) -> FusedBatch:
    """Stack every task's sequences into one [rows, seq] micro-batch, right-padded to the longest row;
    each task's rows are contiguous (its segment). `lead[task]` slots at the start of a task's rows
    are reserved for virtual tokens (prompt tuning): attended to, no data, no loss."""
    lead = lead or {}
    rows = [(lead.get(task, 0), ex) for task, examples in batches.items() for ex in examples]
    seq = max(skip + len(ex.input_ids) for skip, ex in rows)
    input_ids = torch.full((len(rows), seq), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), seq), dtype=torch.long)
    for i, (skip, ex) in enumerate(rows):
        n = skip + len(ex.input_ids)
        input_ids[i, skip:n] = torch.tensor(ex.input_ids)
        labels[i, skip:n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    segments, start = [], 0
    for task, examples in batches.items():
        segments.append(Segment(task, start, start + len(examples)))
        start += len(examples)
    return FusedBatch(input_ids.to(device), mask.to(device), labels.to(device), segments)
