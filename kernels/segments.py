"""Segment metadata shared by the grouped kernels: which tokens of the fused matrix belong to which task.

A fused micro-batch is a [tokens, features] matrix whose rows are tiled by task segments. The grouped
kernels launch one grid over (row block, column block, segment) and read each segment's bounds and
weight geometry from small device tables, built once per micro-batch and op shape (the Multiplexer
keeps a cache for the batch in flight), so no per-task launches or host loops run in the hot path.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SegmentTable:
    """Device tables for `n` segments (row spans of the token matrix) and their per-segment weights.

    start/length: token rows of each segment. rank: each segment's adapter rank (LoRA) or 0.
    a_offset/b_offset: where each segment's weights begin in the flat weight buffers.
    scale: per-segment scalar (LoRA's alpha/r). token_segment: for every row, its segment or -1.
    """

    start: torch.Tensor
    length: torch.Tensor
    rank: torch.Tensor
    a_offset: torch.Tensor
    b_offset: torch.Tensor
    scale: torch.Tensor
    token_segment: torch.Tensor
    max_length: int
    max_rank: int
    tokens: int
    covers_all: bool  # the segments tile every row (no row left to the base op alone)

    @property
    def n(self) -> int:
        return int(self.start.numel())


def build_segment_table(spans: list[tuple[int, int]], ranks: list[int], a_sizes: list[int], b_sizes: list[int],
                        scales: list[float], tokens: int, device,
                        offsets: tuple[list[int], list[int]] | None = None) -> SegmentTable:
    """spans: (first row, end row) of each segment, disjoint; a_sizes/b_sizes: elements of each segment's
    weights, packed in segment order in the flat buffers; or `offsets`: where each segment's weights
    begin in them (a store that holds more than this batch's tasks, executor/flat_params.py)."""
    n = len(spans)
    if offsets is None:
        offsets = list(itertools.accumulate([0, *a_sizes[:-1]])), list(itertools.accumulate([0, *b_sizes[:-1]]))
    # built in host lists, then one tensor each: per-segment tensor writes would cost ops per task
    columns = []
    for i, ((lo, hi), r, a_off, b_off) in enumerate(zip(spans, ranks, *offsets)):
        if not 0 <= lo <= hi <= tokens:
            raise ValueError(f"segment {i} rows [{lo}, {hi}) outside the {tokens} rows of the batch")
        columns.append((lo, hi - lo, r, a_off, b_off))
    owner = [-1] * tokens
    for i, (lo, hi) in enumerate(spans):
        owner[lo:hi] = [i] * (hi - lo)
    ints = torch.tensor(list(zip(*columns)) if columns else [[]] * 5, dtype=torch.int64).reshape(5, n)
    token_segment = torch.tensor(owner, dtype=torch.int32)
    covered = sum(hi - lo for lo, hi in spans)
    if sum(o >= 0 for o in owner) != covered:
        raise ValueError(f"segments overlap: {spans}")
    ints = ints.to(device=device, dtype=torch.int32)
    return SegmentTable(
        start=ints[0], length=ints[1], rank=ints[2], a_offset=ints[3], b_offset=ints[4],
        scale=torch.tensor(scales, dtype=torch.float32, device=device),
        token_segment=token_segment.to(device),
        max_length=max((hi - lo for lo, hi in spans), default=0),
        max_rank=max(ranks, default=0),
        tokens=tokens,
        covers_all=covered == tokens,
    )
