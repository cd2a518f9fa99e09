"""Document-masked attention over a chunk-aligned stream: ONE attention call per layer, however many
sequences (and tasks) the fused batch holds.

Each sequence of the stream attends causally to itself, and to its task's K/V prefix (prefix tuning),
never to another sequence; padding attends to nothing and gets zeros. The layout (which position
belongs to which sequence, which prefix it sees) is built once per micro-batch (`DocumentLayout`),
on the host, and serves every layer; a layer then runs one of three equivalent kernels, chosen by
device and by cost:

  flex    (CUDA) PyTorch FlexAttention with a block mask over [all prefixes | stream]: blocks that
          are entirely masked are skipped, so the work is the sum of the sequences' length^2
  padded  (CPU) the sequences gathered by length into right-padded [sequences, heads, L, d] batches,
          one SDPA per length bucket (its prefix slots in front); causal queries never see the padding
          after them. A sequence's bucket L is the first rung of a fixed ladder (`bucket_length`,
          at most 1.25x apart, the powers of two among them) at or above its own length, and a bucket holds one prefix length: what a
          sequence is computed with depends on that sequence alone, never on its neighbours, so a
          task's results are bit for bit the same alone and fused (SDPA on the CPU computes each batch
          row alike whatever the batch size), and padding costs at most ~1.25x a sequence's attention.
          (Padding every sequence to the batch's longest, in ONE call, made a fused batch of short and
          long sequences pay the longest's attention for every short one: the quickstart's 9216-token
          step took 3x as long as its four groups apart.) Buckets are few: the ladder's rungs between
          the shortest and the longest sequence, whatever the number of sequences and tasks.
  masked  (CPU) ONE SDPA over the whole stream with a block-diagonal boolean mask ((T + P)^2 scores;
          only when forced: bucketed `padded` is never far from the sequences' own length^2)

`MUXTUNE_ATTENTION=flex|padded|masked` forces one (the tests run all three against each other).
Everything a layer needs beyond q/k/v is a device tensor built once here: no host sync per layer.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("flex", "padded", "masked")


@dataclass
class DocumentLayout:
    """What every layer's attention needs for one stream; see `build_layout`."""

    backend: str
    total: int  # stream positions T
    prefix_segments: list[int]  # segments whose prefixes sit in the [all prefixes] key region, in order
    prefix_total: int  # P: length of that region
    # padded: the stream positions of every bucket's [n * L] slots (clamped), one gather for all buckets
    gather: torch.Tensor | None = None
    buckets: list = field(default_factory=list)  # padded: the length buckets (Bucket), in gather order
    keep: torch.Tensor | None = None  # flat indices into the buckets' slots of real positions
    rows: torch.Tensor | None = None  # their stream positions
    mask: torch.Tensor | None = None  # masked: [1, 1, T, P + T]
    real: torch.Tensor | None = None  # masked: [T, 1, 1] 1.0 on sequence positions, 0.0 on padding
    block_mask: object = None  # flex


@dataclass
class Bucket:
    """`n` sequences padded to `length` slots, each seeing `prefix` prefix slots of its own task."""

    n: int
    length: int
    prefix: int = 0
    prefix_gather: torch.Tensor | None = None  # [n * prefix] positions in the prefix region
    mask: torch.Tensor | None = None  # [1, 1, length, prefix + length]: all of the prefix, then causal


@functools.lru_cache(maxsize=None)
def bucket_length(n: int) -> int:
    """The padded length of a sequence of n positions: the first rung >= n of 16, 20, 24, 28, 32, 40, 48,
    56, 64, 80, ... (4, 5, 6 or 7 times a power of two: every power of two is one, each at most 1.25x the
    last)."""
    rung, step = 16, 4
    while rung < n:
        rung += step
        if rung == 8 * step:  # the next power of two: rungs a quarter of it apart from here
            step *= 2
    return rung


def choose_backend(device: torch.device) -> str:
    forced = os.environ.get("MUXTUNE_ATTENTION")
    if forced:
        if forced not in BACKENDS:
            from muxtune.errors import MuxTuneError

            raise MuxTuneError(f"MUXTUNE_ATTENTION={forced!r}: expected one of {', '.join(BACKENDS)}")
        return forced
    if device.type == "cuda" and _flex() is not None:
        return "flex"
    return "padded"


def build_layout(spans: list[tuple[int, int, int | None]], total: int, prefix_lengths: dict[int, int],
                 device) -> DocumentLayout:
    """spans: (start, end, segment index) of every sequence in stream order; prefix_lengths: segment
    index -> its prefix length, for the segments that have one."""
    device = torch.device(device)
    prefix_segments = sorted(prefix_lengths)
    region_start, cursor = {}, 0
    for seg in prefix_segments:
        region_start[seg] = cursor
        cursor += prefix_lengths[seg]
    prefix_total = cursor
    seqs = [(s, e, seg) for s, e, seg in spans if e > s]
    layout = DocumentLayout(choose_backend(device), total, prefix_segments, prefix_total)
    if not seqs:
        return layout
    if layout.backend == "padded":
        _fill_padded(layout, seqs, prefix_lengths, region_start, device)
    else:
        _fill_masked(layout, seqs, total, prefix_lengths, region_start, device)
    return layout


def _fill_padded(layout, seqs, prefix_lengths, region_start, device) -> None:
    """Length buckets (module docstring): the sequences grouped by (bucket_length, prefix length)."""
    grouped: dict[tuple[int, int], list] = {}
    for s, e, seg in seqs:
        grouped.setdefault((bucket_length(e - s), prefix_lengths.get(seg, 0)), []).append((s, e, seg))
    gathers, keeps, rows, offset = [], [], [], 0
    for (length, prefix), members in sorted(grouped.items()):
        starts = torch.tensor([s for s, _, _ in members])[:, None]
        lengths = torch.tensor([e - s for s, e, _ in members])[:, None]
        offsets = torch.arange(length)[None, :]
        valid = offsets < lengths
        gathers.append(torch.where(valid, starts + offsets, starts).reshape(-1))  # padding reads token 0
        keeps.append(valid.reshape(-1).nonzero().squeeze(1) + offset)
        rows.append((starts + offsets)[valid])
        offset += len(members) * length
        bucket = Bucket(len(members), length, prefix)
        if prefix:
            base = torch.tensor([region_start[seg] for _, _, seg in members])[:, None]
            bucket.prefix_gather = (base + torch.arange(prefix)[None, :]).reshape(-1).to(device)
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            bucket.mask = torch.cat([torch.ones(length, prefix, dtype=torch.bool), causal], dim=1)[None, None].to(device)
        layout.buckets.append(bucket)
    # built on the host, moved once: no device sync per layer
    layout.gather = torch.cat(gathers).to(device)
    layout.keep = torch.cat(keeps).to(device)
    layout.rows = torch.cat(rows).to(device)


def _document_ids(seqs, total, prefix_lengths, region_start):
    """Per stream position its sequence (-1: padding) and segment; per prefix slot its segment."""
    doc = torch.full((total,), -1, dtype=torch.int32)
    segment = torch.full((total,), -1, dtype=torch.int32)
    for i, (s, e, seg) in enumerate(seqs):
        doc[s:e], segment[s:e] = i, seg
    owner = torch.full((sum(prefix_lengths.values()),), -2, dtype=torch.int32)
    for seg, start in region_start.items():
        owner[start : start + prefix_lengths[seg]] = seg
    return doc, segment, owner


def _fill_masked(layout, seqs, total, prefix_lengths, region_start, device) -> None:
    doc, segment, owner = _document_ids(seqs, total, prefix_lengths, region_start)
    if layout.backend == "flex":
        layout.block_mask = _flex_block_mask(doc.to(device), segment.to(device), owner.to(device), total,
                                             len(owner), device)
        return
    position = torch.arange(total)
    sequence_part = (doc[:, None] == doc[None, :]) & (position[None, :] <= position[:, None]) & (doc[:, None] >= 0)
    prefix_part = segment[:, None] == owner[None, :]
    mask = torch.cat([prefix_part, sequence_part], dim=1)
    padding = doc < 0
    mask[padding, len(owner) + position[padding]] = True  # padding sees itself (finite, then zeroed)
    layout.mask = mask[None, None].to(device)
    layout.real = (~padding).to(torch.float32)[:, None, None].to(device)


@functools.lru_cache(maxsize=1)
def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return create_block_mask, flex_attention


@functools.lru_cache(maxsize=2)
def _flex_kernel(device_type: str):
    """FlexAttention compiled once per process on CUDA (eager flex materialises the full score
    matrix); eager elsewhere (the CPU tests check the block mask, not the speed)."""
    return torch.compile(_flex()[1], dynamic=False) if device_type == "cuda" else _flex()[1]


def _flex_block_mask(doc, segment, owner, total, prefix_total, device):
    create_block_mask, _ = _flex()

    def mask_mod(b, h, q, kv):
        in_prefix = kv < prefix_total
        p = torch.clamp(kv, max=max(prefix_total - 1, 0))
        s = torch.clamp(kv - prefix_total, min=0)
        sees_prefix = in_prefix & (owner[p] == segment[q]) if prefix_total else in_prefix
        sees_sequence = (~in_prefix) & (doc[s] == doc[q]) & (s <= q) & (doc[q] >= 0)
        return sees_prefix | sees_sequence

    return create_block_mask(mask_mod, None, None, total, prefix_total + total, device=device)


def document_attention(layout: DocumentLayout, query, key, value, prefix_kv: tuple | None, scaling, dropout):
    """query [1, heads, T, d], key/value [1, kv_heads, T, d]; prefix_kv: this layer's (keys, values)
    of the [all prefixes] region, [1, kv_heads, P, d], or None -> [1, T, heads, d]."""
    heads, total, dim = query.shape[1], query.shape[2], query.shape[3]
    if not layout.buckets and layout.mask is None and layout.block_mask is None:
        return query.new_zeros(1, total, heads, dim)
    groups = heads // key.shape[1]
    if prefix_kv is not None:
        key = torch.cat([prefix_kv[0].to(key.dtype), key], dim=2)
        value = torch.cat([prefix_kv[1].to(value.dtype), value], dim=2)
    if layout.backend == "flex":
        if dropout:  # the backbone runs in eval mode: HF passes attention dropout 0 there
            raise ValueError("FlexAttention has no attention dropout; the backbone must be in eval mode")
        out = _flex_kernel(query.device.type)(query, key, value, block_mask=layout.block_mask, scale=scaling, enable_gqa=groups > 1)
        return out.transpose(1, 2)
    if groups > 1:  # grouped-query attention: each K/V head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if layout.backend == "padded":
        return _padded(layout, query, key, value, scaling, dropout, prefix_kv is not None)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=layout.mask, dropout_p=dropout, scale=scaling)
    return (out[0].transpose(0, 1) * layout.real).unsqueeze(0)


def _padded(layout, query, key, value, scaling, dropout, with_prefix: bool):
    heads, dim = query.shape[1], query.shape[3]
    prefix_total = layout.prefix_total if with_prefix else 0
    sizes = [b.n * b.length for b in layout.buckets]
    # one gather per tensor for all buckets: its backward is one index_add
    qs, ks, vs = (t.index_select(1, layout.gather).split(sizes, dim=1)
                  for t in (query[0], key[0, :, prefix_total:], value[0, :, prefix_total:]))
    outs = []
    for b, bucket in enumerate(layout.buckets):
        n, length = bucket.n, bucket.length
        q, k, v = (t[b].view(heads, n, length, dim).transpose(0, 1) for t in (qs, ks, vs))
        if bucket.prefix:
            k_pre, v_pre = (t[0, :, :prefix_total].index_select(1, bucket.prefix_gather)
                            .view(heads, n, bucket.prefix, dim).transpose(0, 1) for t in (key, value))
            out = F.scaled_dot_product_attention(q, torch.cat([k_pre, k], dim=2), torch.cat([v_pre, v], dim=2),
                                                 attn_mask=bucket.mask, dropout_p=dropout, scale=scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        outs.append(out.transpose(1, 2).reshape(n * length, heads, dim))
    flat = torch.cat(outs).index_select(0, layout.keep)
    result = query.new_zeros(layout.total, heads, dim).index_copy(0, layout.rows, flat)  # padding stays zero
    return result.unsqueeze(0)
