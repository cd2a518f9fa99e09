"""Grouped IA3: every task's learned scaling vector on its own rows of the fused token matrix, one launch.

For segment s with rows X_s and vector l_s [F]:  Y_s = X_s * l_s  (rows outside every segment are
copied). Backward: dX_s = dY_s * l_s (the same kernel) and dl_s = sum over the segment's rows of
dY_s * X_s (`_segment_colsum`, one launch). Used for IA3's output scaling (keys, values) and its
feed-forward input scaling alike: both are this row scaling, before or after the shared op.
The vectors of all segments sit in one flat buffer at the SegmentTable's a_offset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from muxtune.kernels.segments import SegmentTable


@triton.jit
def _segment_scale(X, L, Y, token_segment, seg_off, tokens, features, stride_x, stride_y,
                   BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_mask = rm < tokens
    n_mask = rn < features
    mask = m_mask[:, None] & n_mask[None, :]
    seg = tl.load(token_segment + rm, mask=m_mask, other=-1)
    inside = seg >= 0
    off = tl.load(seg_off + seg, mask=m_mask & inside, other=0)
    scale = tl.load(L + off[:, None] + rn[None, :], mask=mask & inside[:, None], other=1.0)
    rows = rm.to(tl.int64)
    x = tl.load(X + rows[:, None] * stride_x + rn[None, :], mask=mask, other=0.0)
    y = x.to(tl.float32) * scale.to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + rn[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _segment_colsum(P, Q, G, seg_start, seg_len, seg_off, features, stride_p, stride_q,
                    ACCUMULATE: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    """G[off_s + j] (+)= sum_{t in segment s} P[t, j] * Q[t, j] (added to G's value with ACCUMULATE)."""
    pid_n = tl.program_id(0)
    s = tl.program_id(1)
    start = tl.load(seg_start + s)
    length = tl.load(seg_len + s)
    off = tl.load(seg_off + s)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < features
    rt = tl.arange(0, BT)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for t0 in range(0, length, BT):
        tt = t0 + rt
        rows = (start + tt).to(tl.int64)
        mask = (tt < length)[:, None] & n_mask[None, :]
        p = tl.load(P + rows[:, None] * stride_p + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        q = tl.load(Q + rows[:, None] * stride_q + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(p * q, axis=0)
    if ACCUMULATE:
        acc += tl.load(G + off + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(G + off + rn, acc.to(G.dtype.element_ty), mask=n_mask)


def _scale(x2: torch.Tensor, l_flat: torch.Tensor, table: SegmentTable) -> torch.Tensor:
    y = torch.empty_like(x2)
    tokens, features = x2.shape
    if tokens == 0:
        return y
    bm, bn = 32, 64
    grid = (triton.cdiv(tokens, bm), triton.cdiv(features, bn))
    _segment_scale[grid](x2, l_flat, y, table.token_segment, table.a_offset, tokens, features,
                         x2.stride(0), y.stride(0), BM=bm, BN=bn)
    return y


class SegmentedScale(torch.autograd.Function):
    """`accumulate_into`: None (the backward returns dl shaped as `l_flat`), or a function called with a
    `write(grad)` that ADDS dl into the flat buffer the offsets index (executor/flat_params.py), as
    kernels/lora.py's SegmentedLoRA."""

    @staticmethod
    def forward(ctx, x, l_flat, table: SegmentTable, accumulate_into=None):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(x2, l_flat)
        ctx.table, ctx.x_shape, ctx.accumulate_into = table, x.shape, accumulate_into
        return _scale(x2, l_flat, table).view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x2, l_flat = ctx.saved_tensors
        table: SegmentTable = ctx.table
        dy = grad_out.reshape(-1, x2.shape[-1]).contiguous()
        dx = _scale(dy, l_flat, table)
        features = x2.shape[-1]

        def write(dl, accumulate):
            if table.n:
                bn = 64
                _segment_colsum[(triton.cdiv(features, bn), table.n)](
                    dy, x2, dl, table.start, table.length, table.a_offset, features, dy.stride(0), x2.stride(0),
                    ACCUMULATE=accumulate, BT=32, BN=bn)

        if ctx.accumulate_into is not None:
            ctx.accumulate_into(lambda grad: write(grad, True))
            return dx.view(ctx.x_shape), None, None, None
        dl = torch.empty_like(l_flat)
        write(dl, False)
        return dx.view(ctx.x_shape), dl, None, None


def segmented_scale(x: torch.Tensor, vectors: list[torch.Tensor], table: SegmentTable) -> torch.Tensor:
    """Rows of segment s scaled by vectors[s] (each of x's feature width); other rows copied."""
    return SegmentedScale.apply(x, torch.cat([v.reshape(-1) for v in vectors]), table)


def segmented_scale_reference(x: torch.Tensor, vectors: list[torch.Tensor], table: SegmentTable) -> torch.Tensor:
    """The same function in torch: one gather of every row's vector (ones outside segments), one multiply."""
    x2 = x.reshape(-1, x.shape[-1])
    stacked = torch.cat([torch.ones(1, x2.shape[-1], device=x.device, dtype=torch.float32),
                         torch.stack([v.reshape(-1).float() for v in vectors])])
    per_row = stacked[table.token_segment.long() + 1]
    return (x2.float() * per_row).to(x.dtype).view(x.shape)
