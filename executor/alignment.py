"""Chunk-based data alignment: a fusion group's sequences in fixed-size chunks, with almost no padding
and no attention across sequence boundaries.

Padding every row to the longest sequence of any fused task (mLoRA's layout, `data.fuse`) makes a third
to a half of the backbone's tokens padding on real mixes. Here each task's sequences are laid end to
end in one token stream, cut into rows of `chunk_len` tokens ("chunks"); a task is padded only up to
its last whole chunk. Short sequences share a chunk, long ones continue into the task's next chunks.
A task owns a contiguous run of chunk rows (`Segment` in rows, as the multiplexer and the grouped
kernels expect), and no chunk holds two tasks' tokens.

The backbone runs over the flattened stream `[1, rows * chunk_len]`; position ids restart at every
sequence, and the attention function registered here as "muxtune" (transformers' AttentionInterface)
attends within each sequence only, so its cost is the sum of the sequences' length^2, not the
stream's. Sequence-level methods keep working: a prompt task's sequences each start with its virtual
token slots; a prefix task's sequences see its K/V prefix in every layer and take positions n.. .

Outside a chunk-aligned forward the "muxtune" attention is plain SDPA, so a backbone switched to it
still runs padded batches as before.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from muxtune.executor.data import IGNORE, Example
from muxtune.executor.document_attention import DocumentLayout, build_layout, document_attention
from muxtune.executor.mux import Segment

ATTENTION = "muxtune"


@dataclass
class SequenceSpan:
    """Tokens [start, end) of the flattened stream are one sequence of the task in `segment`."""

    start: int
    end: int
    segment: int


@dataclass
class ChunkedBatch:
    """One chunk-aligned micro-batch. Rows are chunks; flattened, they are the token stream."""

    input_ids: torch.Tensor  # [rows, chunk_len]
    targets: torch.Tensor  # [rows, chunk_len]: the next token a position predicts, IGNORE where none
    position_ids: torch.Tensor  # [rows, chunk_len]: restart at every sequence (after a prefix: at n)
    real: torch.Tensor  # [rows, chunk_len] bool: a sequence's token or virtual slot, not padding
    segments: list[Segment]  # each task's chunk rows
    sequences: list[SequenceSpan]  # every sequence in stream order
    virtual_slots: dict[int, torch.Tensor]  # segment index -> [sequences, n] stream positions of virtual tokens
    # per task: real positions and target tokens, counted on the host as the batch is packed (reading
    # them off the device tensors would cost a reduction and a sync per task)
    real_counts: dict[str, int] = field(default_factory=dict)
    target_count: dict[str, int] = field(default_factory=dict)

    @property
    def chunk_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def tokens_per_task(self) -> dict[str, int]:
        return dict(self.real_counts)

    @property
    def computed_per_task(self) -> dict[str, int]:
        return {s.task: (s.end - s.start) * self.chunk_len for s in self.segments}

    @property
    def target_counts(self) -> dict[str, int]:
        return dict(self.target_count)


def chunks_for(tokens: int, chunk_len: int) -> int:
    return -(-tokens // chunk_len)


def pack_chunks(batches: dict[str, list[Example]], chunk_len: int, pad_id: int, device="cpu",
                lead: dict[str, int] | None = None, position_offset: dict[str, int] | None = None) -> ChunkedBatch:
    """Lay each task's sequences end to end and cut the stream into chunk rows. `lead[task]` virtual
    token slots start each of that task's sequences (prompt tuning: attended, no data, no loss);
    `position_offset[task]` is where its sequences' positions start (prefix tuning: n)."""
    lead, position_offset = lead or {}, position_offset or {}
    ids, targets, positions, real = [], [], [], []
    segments, sequences, virtual_slots, row = [], [], {}, 0
    real_counts, target_count = {}, {}
    for index, (task, examples) in enumerate(batches.items()):
        n, offset, slots = lead.get(task, 0), position_offset.get(task, 0), []
        first_token, first_target = len(real), len(targets)
        for ex in examples:
            start = len(ids)
            length = n + len(ex.input_ids)
            labels = [IGNORE] * n + list(ex.labels)
            ids += [pad_id] * n + list(ex.input_ids)
            targets += labels[1:] + [IGNORE]  # the sequence's last token predicts nothing
            positions += range(offset, offset + length)
            real += [True] * length
            sequences.append(SequenceSpan(start, start + length, index))
            slots.append(list(range(start, start + n)))
        padding = chunks_for(len(ids), chunk_len) * chunk_len - len(ids)
        ids += [pad_id] * padding
        targets += [IGNORE] * padding
        positions += [0] * padding
        real += [False] * padding
        rows = len(ids) // chunk_len
        real_counts[task] = sum(real[first_token:])
        target_count[task] = sum(t != IGNORE for t in targets[first_target:])
        segments.append(Segment(task, row, rows))
        row = rows
        if n:
            virtual_slots[index] = torch.tensor(slots, dtype=torch.long, device=device)

    def grid(values, dtype):
        return torch.tensor(values, dtype=dtype).view(-1, chunk_len).to(device)

    return ChunkedBatch(grid(ids, torch.long), grid(targets, torch.long), grid(positions, torch.long),
                        grid(real, torch.bool), segments, sequences, virtual_slots, real_counts, target_count)


def split_by_budget(batches: dict[str, list[Example]], chunk_len: int, token_budget: int,
                    lead: dict[str, int] | None = None, padded: bool = False) -> list[dict[str, list[Example]]]:
    """Split a step's sequences into micro-batches of at most `token_budget` computed tokens, in order:
    each task's stream rounded up to whole chunks, or (`padded`) a row per sequence, every row as long
    as the micro-batch's longest (what `fuse` lays out). A micro-batch holds whole sequences; a sequence
    larger than the budget gets a micro-batch of its own."""
    lead = lead or {}
    micro, current, lengths = [], {}, {}  # lengths: each task's stream length in `current` (padded: rows)

    def cost(lengths: dict[str, list[int]]) -> int:
        if padded:
            return sum(len(rows) for rows in lengths.values()) * max(max(rows) for rows in lengths.values())
        return sum(chunks_for(sum(rows), chunk_len) * chunk_len for rows in lengths.values())

    for task, examples in batches.items():
        for ex in examples:
            n = lead.get(task, 0) + len(ex.input_ids)
            grown = {**lengths, task: lengths.get(task, []) + [n]}
            if current and cost(grown) > token_budget:
                micro.append(current)
                current, grown = {}, {task: [n]}
            current.setdefault(task, []).append(ex)
            lengths = grown
    if current:
        micro.append(current)
    return micro


# --- attention that never crosses a sequence boundary ------------------------------------------------


_ACTIVE: tuple[DocumentLayout, dict] | None = None  # the stream in flight: its layout and prefixes


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, heads, T, d], key/value [1, kv_heads, T, d] over the whole stream -> [1, T, heads, d].
    Each sequence attends causally to itself (and its task's K/V prefix) only; padding gets zeros.
    One attention call per layer (CUDA), one per length bucket (CPU): executor/document_attention.py."""
    if _ACTIVE is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    layout, prefixes = _ACTIVE
    prefix_kv = None
    if layout.prefix_segments:  # this layer's prefixes of all prefix tasks, as one key region
        layer = module.layer_idx
        prefix_kv = tuple(torch.cat([prefixes[seg][layer][i] for seg in layout.prefix_segments], dim=2)
                          for i in (0, 1))
    return document_attention(layout, query, key, value, prefix_kv, scaling, dropout), None


def varlen_mask(*args, **kwargs):
    """The mask builder registered with the attention: none while a stream is in flight (the
    attention knows the sequences), SDPA's otherwise."""
    return None if _ACTIVE is not None else sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION, varlen_attention)
AttentionMaskInterface.register(ATTENTION, varlen_mask)


@contextlib.contextmanager
def packed_attention(model, batch: ChunkedBatch, prefixes: dict[int, list]):
    """Within this block the model's attention is per sequence of `batch`'s stream. `prefixes`:
    segment index -> per-layer (key, value) of that task's prefix, shape [1, kv_heads, n, head_dim]."""
    global _ACTIVE
    spans = [(seq.start, seq.end, seq.segment) for seq in batch.sequences]
    lengths = {seg: prefix[0][0].shape[2] for seg, prefix in prefixes.items()}
    previous = (_ACTIVE, model.config._attn_implementation)
    layout = build_layout(spans, batch.input_ids.numel(), lengths, batch.input_ids.device)
    _ACTIVE = (layout, prefixes)
    model.config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        _ACTIVE, model.config._attn_implementation = previous[0], previous[1]


def attention_state(model) -> tuple:
    """The packed stream in flight and the model's attention choice, for a block that runs its forward
    again later (executor/recompute.py)."""
    return _ACTIVE, model.config._attn_implementation


@contextlib.contextmanager
def restored_attention(model, state: tuple):
    """Within this block the attention sees the stream of `state` (attention_state) again."""
    global _ACTIVE
    previous = attention_state(model)
    _ACTIVE, model.config._attn_implementation = state
    try:
        yield
    finally:
        _ACTIVE, model.config._attn_implementation = previous
