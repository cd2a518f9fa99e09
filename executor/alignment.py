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
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from muxtune.executor.data import IGNORE, Example
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

    @property
    def chunk_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def tokens_per_task(self) -> dict[str, int]:
        return {s.task: int(self.real[s.start : s.end].sum()) for s in self.segments}

    @property
    def computed_per_task(self) -> dict[str, int]:
        return {s.task: (s.end - s.start) * self.chunk_len for s in self.segments}

    @property
    def target_counts(self) -> dict[str, int]:
        valid = self.targets != IGNORE
        return {s.task: int(valid[s.start : s.end].sum()) for s in self.segments}


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
    for index, (task, examples) in enumerate(batches.items()):
        n, offset, slots = lead.get(task, 0), position_offset.get(task, 0), []
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
        segments.append(Segment(task, row, rows))
        row = rows
        if n:
            virtual_slots[index] = torch.tensor(slots, dtype=torch.long, device=device)

    def grid(values, dtype):
        return torch.tensor(values, dtype=dtype).view(-1, chunk_len).to(device)

    return ChunkedBatch(grid(ids, torch.long), grid(targets, torch.long), grid(positions, torch.long),
                        grid(real, torch.bool), segments, sequences, virtual_slots)


def split_by_budget(batches: dict[str, list[Example]], chunk_len: int, token_budget: int,
                    lead: dict[str, int] | None = None) -> list[dict[str, list[Example]]]:
    """Split a step's sequences into micro-batches of at most `token_budget` computed tokens (each task
    rounded up to whole chunks), in order. A micro-batch holds whole sequences; a sequence larger than
    the budget gets a micro-batch of its own."""
    lead = lead or {}
    micro, current, lengths = [], {}, {}  # lengths: each task's stream length in `current`

    def cost(lengths: dict[str, int]) -> int:
        return sum(chunks_for(n, chunk_len) * chunk_len for n in lengths.values())

    for task, examples in batches.items():
        for ex in examples:
            grown = {**lengths, task: lengths.get(task, 0) + lead.get(task, 0) + len(ex.input_ids)}
            if current and cost(grown) > token_budget:
                micro.append(current)
                current, grown = {}, {task: lead.get(task, 0) + len(ex.input_ids)}
            current.setdefault(task, []).append(ex)
            lengths = grown
    if current:
        micro.append(current)
    return micro


# --- attention that never crosses a sequence boundary ------------------------------------------------


@dataclass
class _Packed:
    """What the attention function needs for the stream in flight."""

    spans: list[tuple[int, int, object]]  # (start, end, per-layer prefix (k, v) | None | "pad")
    buckets: list[tuple[torch.Tensor, torch.Tensor]]  # prefix-free sequences by length, see _length_buckets
    # Every position the attention reads, prefix sequences then buckets, gathered with ONE index_select
    # per tensor: its backward is one index_add, where a slice or gather per sequence/bucket would each
    # zero-fill a full-size gradient in the backward and sum them.
    device: torch.device | str = "cpu"
    gather: torch.Tensor | None = None
    sizes: list[int] = field(default_factory=list)

    def __post_init__(self):
        pieces = [torch.arange(start, end, device=self.device) for start, end, prefix in self.spans
                  if end > start and prefix not in (None, "pad")]
        pieces += [idx.reshape(-1) for idx, _ in self.buckets]
        if pieces:
            self.sizes = [p.numel() for p in pieces]
            self.gather = torch.cat(pieces)


_ACTIVE: _Packed | None = None


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, heads, T, d], key/value [1, kv_heads, T, d] over the whole stream -> [1, T, heads, d].
    Each sequence attends causally to itself (and its task's K/V prefix) only; padding gets zeros.

    Sequences without a prefix go in length buckets: each bucket is gathered into a right-padded
    [sequences, heads, longest, d] batch and runs as ONE causal SDPA (a causal query never sees the
    padding after it, so valid positions are exact); compute stays near the sum of length^2 and the
    number of attention calls is the number of buckets, not of sequences (kernel launches on a GPU)."""
    packed = _ACTIVE
    if packed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each K/V head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    total, heads, dim = query.shape[2], query.shape[1], query.shape[3]
    rows, results = [], []
    if packed.gather is None:
        return query.new_zeros(1, total, heads, dim), None  # nothing but padding in the stream
    gather = packed.gather
    # [heads, positions, d] pieces: one per prefix sequence, then one per bucket
    q_parts, k_parts, v_parts = (t[0].index_select(1, gather).split(packed.sizes, dim=1) for t in (query, key, value))
    part = 0
    for start, end, prefix in packed.spans:
        if end <= start or prefix in (None, "pad"):
            continue
        q, k, v = (t[part].unsqueeze(0) for t in (q_parts, k_parts, v_parts))
        part += 1
        prefix_k, prefix_v = prefix[module.layer_idx]
        if groups > 1:
            prefix_k, prefix_v = prefix_k.repeat_interleave(groups, dim=1), prefix_v.repeat_interleave(groups, dim=1)
        n, length = prefix_k.shape[2], end - start
        k = torch.cat([prefix_k.to(k.dtype), k], dim=2)
        v = torch.cat([prefix_v.to(v.dtype), v], dim=2)
        # every position sees the whole prefix, then its own sequence causally
        mask = torch.ones(length, n + length, dtype=torch.bool, device=q.device).tril(diagonal=n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        rows.append(torch.arange(start, end, device=query.device))
        results.append(out[0].transpose(0, 1))
    for bucket in packed.buckets:
        idx, valid = bucket  # [n, longest] stream positions (clamped in padding), [n, longest] bool
        n, longest = idx.shape
        q, k, v = (t[part].view(heads, n, longest, dim).transpose(0, 1) for t in (q_parts, k_parts, v_parts))
        part += 1
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                             scale=scaling)  # [n, heads, longest, d]
        out = out.transpose(1, 2)[valid]  # [tokens, heads, d]
        rows.append(idx[valid])
        results.append(out)
    result = query.new_zeros(total, heads, dim)  # padding positions stay zero
    if rows:
        result = result.index_copy(0, torch.cat(rows), torch.cat(results))
    return result.unsqueeze(0), None


def _length_buckets(spans, device, slack: float = 1.25) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Group the prefix-free sequences by length: a bucket's longest is at most `slack` times its
    shortest, so padding inside a bucket costs at most ~(slack^2 - 1) of its attention FLOPs."""
    plain = sorted(((end - start, start) for start, end, prefix in spans if end > start and prefix is None),
                   reverse=True)
    buckets, current = [], []
    for length, start in plain:
        if current and current[0][0] > slack * length:
            buckets.append(current)
            current = []
        current.append((length, start))
    if current:
        buckets.append(current)
    out = []
    for bucket in buckets:
        longest = bucket[0][0]
        offsets = torch.arange(longest)
        starts = torch.tensor([start for _, start in bucket])[:, None]
        lengths = torch.tensor([length for length, _ in bucket])[:, None]
        valid = offsets[None, :] < lengths
        idx = torch.where(valid, starts + offsets[None, :], starts)  # padding reads the first token
        out.append((idx.to(device), valid.to(device)))
    return out


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
    spans, cursor = [], 0
    for seq in batch.sequences:
        if seq.start > cursor:
            spans.append((cursor, seq.start, "pad"))
        spans.append((seq.start, seq.end, prefixes.get(seq.segment)))
        cursor = seq.end
    total = batch.input_ids.numel()
    if cursor < total:
        spans.append((cursor, total, "pad"))
    previous = (_ACTIVE, model.config._attn_implementation)
    device = batch.input_ids.device
    _ACTIVE = _Packed(spans, _length_buckets(spans, device), device)
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
