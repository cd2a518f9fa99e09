"""Grouped (segmented) LoRA: every task's low-rank update on its own rows of the fused token matrix, one
launch per GEMM kind instead of one small matmul per task.

For segment s with rows X_s, weights A_s [r_s, K], B_s [N, r_s] and scaling c_s:
    forward   S_s = X_s A_s^T              (shrink)      Y_s += c_s S_s B_s^T        (expand, in place)
    backward  dS_s = c_s dY_s B_s          (shrink)      dX_s = dS_s A_s             (expand)
              dB_s = c_s dY_s^T S_s        (outer)       dA_s = dS_s^T X_s           (outer)
Two Triton kernels cover all six: `_segment_matmul` (row block x column block x segment, reduction over
the inner dimension) and `_segment_outer` (weight-gradient tiles, reduction over a segment's rows).
Ranks and segment lengths differ per segment; the weights of all segments sit in two flat buffers and
each segment's geometry (offset, strides) comes from the SegmentTable, as Punica's SGMV does with
pointer arrays. Products accumulate in fp32 (the interpreter's bf16 tl.dot is broken, and adapters train
in fp32 here); on a GPU fp32 operands use TF32 tensor cores unless MUXTUNE_KERNEL_PRECISION=ieee.

`segmented_lora_reference` is the torch reference: the same function with padded batched matmuls.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from muxtune.kernels.segments import SegmentTable


@triton.jit
def _segment(s, seg_start, seg_len, seg_rank, seg_off):
    """Segment s: its first row, row count, rank and the offset of its weights in the flat buffer."""
    return tl.load(seg_start + s), tl.load(seg_len + s), tl.load(seg_rank + s), tl.load(seg_off + s)


@triton.jit
def _rank_if(value, rank, IS_RANK: tl.constexpr):
    """A segment's rank where IS_RANK is set, else the scalar the launch gave (one kernel serves every
    product whose inner size, column count or weight stride is the segment's rank)."""
    if IS_RANK:
        value = rank
    return value


@triton.jit
def _segment_matmul(IN, W, OUT, seg_start, seg_len, seg_rank, seg_woff, seg_alpha,
                    inner, cols, wsi, wsj, stride_in, stride_out, split_len, stride_split,
                    SPLIT: tl.constexpr, INNER_IS_RANK: tl.constexpr, COLS_IS_RANK: tl.constexpr, WSI_IS_RANK: tl.constexpr,
                    WSJ_IS_RANK: tl.constexpr, SCALED: tl.constexpr, ACCUMULATE: tl.constexpr,
                    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """OUT[t, j] (+)= alpha_s * sum_i IN[t, i] * W_s[i, j] for rows t of segment s, i < inner, j < cols;
    W_s[i, j] = W[woff_s + i * wsi + j * wsj]. Each of inner/cols/wsi/wsj is either the given scalar or,
    when its *_IS_RANK flag is set, the segment's rank; alpha_s is the segment's scale when SCALED.
    SPLIT > 1 (split-K, for few output columns over a long inner dimension): program column `pid` does
    inner slice pid % SPLIT and writes a partial product at OUT + (pid % SPLIT) * stride_split."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1) // SPLIT
    part = tl.program_id(1) % SPLIT
    s = tl.program_id(2)
    start, length, rank, woff = _segment(s, seg_start, seg_len, seg_rank, seg_woff)
    inner = _rank_if(inner, rank, INNER_IS_RANK)
    cols = _rank_if(cols, rank, COLS_IS_RANK)
    wsi = _rank_if(wsi, rank, WSI_IS_RANK)
    wsj = _rank_if(wsj, rank, WSJ_IS_RANK)
    if pid_m * BM >= length or pid_n * BN >= cols:  # this program's tile lies outside the segment
        return

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rows = (start + rm).to(tl.int64)
    m_mask = rm < length
    n_mask = rn < cols
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_end = tl.minimum(inner, (part + 1) * split_len)
    for k0 in range(part * split_len, k_end, BK):
        kk = k0 + rk
        k_mask = kk < k_end
        a = tl.load(IN + rows[:, None] * stride_in + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(W + woff + kk[:, None] * wsi + rn[None, :] * wsj, mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0)
        acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
    if SCALED:
        acc = acc * tl.load(seg_alpha + s)
    out_ptrs = OUT + part * stride_split + rows[:, None] * stride_out + rn[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _segment_outer(P, Q, G, seg_start, seg_len, seg_rank, seg_goff, seg_alpha,
                   n_rows, n_cols, gsi, gsj, stride_p, stride_q,
                   ROWS_IS_RANK: tl.constexpr, COLS_IS_RANK: tl.constexpr, GSI_IS_RANK: tl.constexpr,
                   SCALED: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
                   BI: tl.constexpr, BJ: tl.constexpr, BT: tl.constexpr):
    """G_s[i, j] = alpha_s * sum_{t in segment s} P[t, i] * Q[t, j], i < n_rows, j < n_cols, written at
    G[goff_s + i * gsi + j * gsj] (the *_IS_RANK flags substitute the segment's rank as in
    `_segment_matmul`); ACCUMULATE adds to what G holds there. An empty segment writes (adds) zeros."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    s = tl.program_id(2)
    start, length, rank, goff = _segment(s, seg_start, seg_len, seg_rank, seg_goff)
    n_rows = _rank_if(n_rows, rank, ROWS_IS_RANK)
    n_cols = _rank_if(n_cols, rank, COLS_IS_RANK)
    gsi = _rank_if(gsi, rank, GSI_IS_RANK)
    if pid_i * BI >= n_rows or pid_j * BJ >= n_cols:  # this program's tile lies outside the segment
        return

    ri = pid_i * BI + tl.arange(0, BI)
    rj = pid_j * BJ + tl.arange(0, BJ)
    rt = tl.arange(0, BT)
    i_mask = ri < n_rows
    j_mask = rj < n_cols
    acc = tl.zeros((BI, BJ), dtype=tl.float32)
    for t0 in range(0, length, BT):
        tt = t0 + rt
        t_mask = tt < length
        rows = (start + tt).to(tl.int64)
        p = tl.load(P + rows[:, None] * stride_p + ri[None, :], mask=t_mask[:, None] & i_mask[None, :], other=0.0)
        q = tl.load(Q + rows[:, None] * stride_q + rj[None, :], mask=t_mask[:, None] & j_mask[None, :], other=0.0)
        acc += tl.dot(tl.trans(p.to(tl.float32)), q.to(tl.float32), input_precision=PRECISION)
    if SCALED:
        acc = acc * tl.load(seg_alpha + s)
    g_ptrs = G + goff + ri[:, None] * gsi + rj[None, :] * gsj
    mask = i_mask[:, None] & j_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(g_ptrs, acc.to(G.dtype.element_ty), mask=mask)


def _precision(device: torch.device) -> str:
    if device.type != "cuda":
        return "ieee"
    return os.environ.get("MUXTUNE_KERNEL_PRECISION", "tf32")


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    """Tile edge for a dimension of size n: a power of two in [lo, hi] (GPUs reject tiles under 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


RANK = "rank"  # a geometry argument that is each segment's own rank


def _geometry(value, table: SegmentTable) -> tuple[int, bool]:
    """(scalar passed to the kernel, is-rank flag); the scalar of a rank argument is its maximum."""
    return (table.max_rank, True) if value == RANK else (int(value), False)


def _matmul(inp, w, out, woff, table: SegmentTable, inner, cols, wsi, wsj, scaled: bool, accumulate: bool):
    """One launch of `_segment_matmul` over all segments."""
    (inner, inner_r), (cols, cols_r), (wsi, wsi_r), (wsj, wsj_r) = (
        _geometry(v, table) for v in (inner, cols, wsi, wsj))
    if table.max_length == 0 or cols == 0:
        return
    bm, bn, bk = 64 if table.max_length > 32 else 32, _block(cols), _block(inner)
    grid = (triton.cdiv(table.max_length, bm), triton.cdiv(cols, bn), table.n)
    split = _split(grid, inner, bk, inp.device) if not accumulate else 1
    if split == 1:
        target = out
    else:  # rows in no segment: zero in every partial, so their sum leaves `out`'s zeros there
        target = (torch.empty if table.covers_all else torch.zeros)((split, *out.shape), dtype=torch.float32,
                                                                    device=out.device)
    split_len = triton.cdiv(triton.cdiv(inner, split), bk) * bk
    _segment_matmul[(grid[0], grid[1] * split, grid[2])](
                          inp, w, target, table.start, table.length, table.rank, woff, table.scale,
                          inner, cols, wsi, wsj, inp.stride(0), out.stride(0), split_len,
                          target.stride(0) if split > 1 else 0, SPLIT=split,
                          INNER_IS_RANK=inner_r, COLS_IS_RANK=cols_r, WSI_IS_RANK=wsi_r, WSJ_IS_RANK=wsj_r,
                          SCALED=scaled, ACCUMULATE=accumulate, PRECISION=_precision(inp.device),
                          BM=bm, BN=bn, BK=bk)
    if split > 1:
        # rows outside every segment stay unwritten in every partial; only segment rows are ever read
        torch.sum(target, dim=0, out=out) if out.dtype == torch.float32 else out.copy_(target.sum(0))


def _split(grid, inner: int, bk: int, device) -> int:
    """Split-K factor: enough programs to fill a GPU's SMs twice, each keeping >= 4 inner tiles.
    (Shrink-type products have few output columns, so without it a few programs loop over all of K.)"""
    forced = os.environ.get("MUXTUNE_KERNEL_SPLIT")  # tests exercise split-K in the interpreter
    if forced:
        return max(1, min(int(forced), triton.cdiv(inner, bk)))
    if device.type != "cuda":
        return 1
    programs = grid[0] * grid[1] * grid[2]
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    split = 1
    while programs * split < 2 * sms and inner >= split * 2 * 4 * bk:
        split *= 2
    return split


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _outer(p, q, g, goff, table: SegmentTable, rows, cols, gsi, gsj, scaled: bool, accumulate: bool = False):
    """One launch of `_segment_outer` over all segments."""
    (rows, rows_r), (cols, cols_r), (gsi, gsi_r) = (_geometry(v, table) for v in (rows, cols, gsi))
    if rows == 0 or cols == 0 or table.n == 0:
        return
    bi, bj = _block(rows), _block(cols)
    grid = (triton.cdiv(rows, bi), triton.cdiv(cols, bj), table.n)
    _segment_outer[grid](p, q, g, table.start, table.length, table.rank, goff, table.scale,
                         rows, cols, gsi, int(gsj), p.stride(0), q.stride(0),
                         ROWS_IS_RANK=rows_r, COLS_IS_RANK=cols_r, GSI_IS_RANK=gsi_r, SCALED=scaled,
                         ACCUMULATE=accumulate, PRECISION=_precision(p.device), BI=bi, BJ=bj, BT=32)


class SegmentedLoRA(torch.autograd.Function):
    """out[rows of s] += scale_s * x_s A_s^T B_s^T for every segment s, in place on `out` (the base op's
    fresh output, which its own backward does not need). The modified tensor is the first input: autograd's
    in-place-on-a-view machinery (CopySlices) routes the first gradient to it.

    `accumulate_into`: None, and the backward returns the weights' gradients as tensors shaped as
    `a_flat`/`b_flat` (autograd delivers them); or a function `accumulate_into(write)` that calls
    `write(grad)` with the flat buffer the offsets index, into which the backward then ADDS dA and dB
    and returns none (the executor's flat parameter store, executor/flat_params.py: no per-task slices,
    views or AccumulateGrad nodes)."""

    @staticmethod
    def forward(ctx, out, x, a_flat, b_flat, table: SegmentTable, accumulate_into=None):
        k, n = x.shape[-1], out.shape[-1]
        x2, y = x.reshape(-1, k), out.view(-1, n)
        s = torch.empty(x2.shape[0], max(table.max_rank, 1), dtype=torch.float32, device=x.device)
        # shrink S = X A^T: A_s [r, k] read as W[i=k, j=r]; expand Y += c S B^T: B_s [n, r] as W[i=r, j=n]
        _matmul(x2, a_flat, s, table.a_offset, table, k, RANK, 1, k, scaled=False, accumulate=False)
        _matmul(s, b_flat, y, table.b_offset, table, RANK, n, 1, RANK, scaled=True, accumulate=True)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x2, s, a_flat, b_flat)
        ctx.table, ctx.x_shape, ctx.accumulate_into = table, x.shape, accumulate_into
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2, s, a_flat, b_flat = ctx.saved_tensors
        table: SegmentTable = ctx.table
        k, n = x2.shape[-1], grad_out.shape[-1]
        dy = grad_out.reshape(-1, n).contiguous()
        ds = torch.empty_like(s)
        # dS = c dY B: B_s [n, r] read as W[i=n, j=r]; dX = dS A: A_s [r, k] read as W[i=r, j=k]
        _matmul(dy, b_flat, ds, table.b_offset, table, n, RANK, RANK, 1, scaled=True, accumulate=False)
        dx = (torch.empty_like if table.covers_all else torch.zeros_like)(x2)
        _matmul(ds, a_flat, dx, table.a_offset, table, RANK, k, k, 1, scaled=False, accumulate=False)

        # dA_s = dS_s^T X_s into [r, k]; dB_s = c dY_s^T S_s into [n, r]
        def write(da, db, accumulate):
            _outer(ds, x2, da, table.a_offset, table, RANK, k, k, 1, scaled=False, accumulate=accumulate)
            _outer(dy, s, db, table.b_offset, table, n, RANK, RANK, 1, scaled=True, accumulate=accumulate)

        if ctx.accumulate_into is not None:
            ctx.accumulate_into(lambda grad: write(grad, grad, True))
            return grad_out, dx.view(ctx.x_shape), None, None, None, None
        da, db = torch.empty_like(a_flat), torch.empty_like(b_flat)
        write(da, db, False)
        return grad_out, dx.view(ctx.x_shape), da, db, None, None


def segmented_lora(x: torch.Tensor, out: torch.Tensor, a_weights: list[torch.Tensor], b_weights: list[torch.Tensor],
                   table: SegmentTable) -> torch.Tensor:
    """Add every segment's LoRA update to its rows of `out` (in place; returns it). x: [tokens, K] rows
    the adapters read (already dropped out where a task uses dropout); a_weights[s]: [r_s, K];
    b_weights[s]: [N, r_s]. Gradients flow to x, out and every weight."""
    a_flat = torch.cat([a.reshape(-1) for a in a_weights])
    b_flat = torch.cat([b.reshape(-1) for b in b_weights])
    return SegmentedLoRA.apply(out, x, a_flat, b_flat, table)


def segmented_lora_reference(x: torch.Tensor, out: torch.Tensor, a_weights: list[torch.Tensor],
                             b_weights: list[torch.Tensor], table: SegmentTable) -> torch.Tensor:
    """The same function in torch: segments padded to one length and ranks to one rank, two batched
    matmuls (fp32), scattered back. Out of place."""
    length, rank, n = table.max_length, max(table.max_rank, 1), out.shape[-1]
    starts, lengths = table.start.tolist(), table.length.tolist()
    xs = torch.stack([torch.nn.functional.pad(x[lo:lo + ln].float(), (0, 0, 0, length - ln))
                      for lo, ln in zip(starts, lengths)])
    a = torch.stack([torch.nn.functional.pad(w.float(), (0, 0, 0, rank - w.shape[0])) for w in a_weights])
    b = torch.stack([torch.nn.functional.pad(w.float(), (0, rank - w.shape[1])) for w in b_weights])
    delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)) * table.scale.view(-1, 1, 1)
    flat = out.reshape(-1, n)
    pieces, cursor = [], 0
    for i, (lo, ln) in sorted(enumerate(zip(starts, lengths)), key=lambda item: item[1][0]):
        pieces += [flat[cursor:lo], (flat[lo:lo + ln].float() + delta[i, :ln]).to(out.dtype)]
        cursor = lo + ln
    pieces.append(flat[cursor:])
    return torch.cat(pieces).view(out.shape)


class LoopedLoRA(torch.autograd.Function):
    """The torch path of the same segmented op, for CPUs: one matmul pair per segment (no Triton), but
    ONE autograd node for all segments. The per-task path builds ~5 nodes per task and a split/cat of
    the op's full output around them; this builds none of that. Each segment runs exactly the matmuls
    autograd runs for HF PEFT's `lora_B(lora_A(x)) * scaling` (same operands, same layouts, also in the
    backward, as torch's mm derivative formulas do), so results stay bit-identical to HF PEFT.

    What is not a matmul runs once over all rows where the segments cover them all: the expand matmuls
    write into one buffer, scaled by a per-row scale and added to the output in one op each (the same
    fp32 multiply and add per element as per segment), and dX's pieces are written in place (`out=`).
    With many small tasks those per-segment elementwise calls were a third of the op's calls."""

    @staticmethod
    def forward(ctx, out, x, spans, scales, masks, *weights):
        n, k = out.shape[-1], x.shape[-1]
        # a fresh output when the base op's is a view (Conv1D, 3D inputs): in place on a view would make
        # autograd copy the whole gradient (CopySlices) in the backward
        inplace = out._base is None
        result = out if inplace else out.clone()
        y, x2 = result.view(-1, n), x.reshape(-1, k)
        row_scale = _row_scale(spans, scales, y.shape[0], y.device)
        delta = None if row_scale is None else torch.empty_like(y)
        shrunk = []
        for (lo, hi), scale, mask, a, b in zip(spans, scales, masks, weights[0::2], weights[1::2]):
            xi = x2[lo:hi] if mask is None else x2[lo:hi] * mask
            s = xi.mm(a.t())
            if delta is None:
                y[lo:hi].add_(s.mm(b.t()) * scale)  # not `+=`: its setitem copies the rows onto themselves
            else:
                torch.mm(s, b.t(), out=delta[lo:hi])
            shrunk.append(s)
        if delta is not None:
            y += delta.mul_(row_scale)
        if inplace:
            ctx.mark_dirty(result)
        # the dropout masks through save_for_backward too: as ctx attributes they escaped saved-tensor
        # hooks, so a recomputed block (executor/recompute.py) kept every op's masks alive ([T, k] each)
        ctx.save_for_backward(x, *shrunk, *weights, *masks)
        ctx.spans, ctx.scales = spans, scales
        return result

    @staticmethod
    def backward(ctx, grad_out):
        x, *saved = ctx.saved_tensors
        segments = len(ctx.spans)
        shrunk, weights, masks = saved[:segments], saved[segments : 3 * segments], saved[3 * segments :]
        n, k = grad_out.shape[-1], x.shape[-1]
        g, x2 = grad_out.reshape(-1, n), x.reshape(-1, k)
        want_dx = ctx.needs_input_grad[1]  # False where x is frozen (the first layer's, without prompt tuning)
        row_scale = _row_scale(ctx.spans, ctx.scales, g.shape[0], g.device)
        dx = torch.empty_like(x2) if want_dx else None
        if dx is not None and row_scale is None:  # rows no segment covers: zero (a fill of those rows only)
            for lo, hi in _uncovered(ctx.spans, dx.shape[0]):
                dx[lo:hi].zero_()
        scaled = None if row_scale is None else g * row_scale
        grads = []
        for (lo, hi), scale, mask, s, a, b in zip(ctx.spans, ctx.scales, masks, shrunk,
                                                   weights[0::2], weights[1::2]):
            xi = x2[lo:hi] if mask is None else x2[lo:hi] * mask
            gb = g[lo:hi] * scale if scaled is None else scaled[lo:hi]
            ds = gb.mm(b)
            grads += [ds.t().mm(xi), gb.t().mm(s)]  # dA [r, k], dB [n, r]
            if want_dx:
                if mask is None:
                    torch.mm(ds, a, out=dx[lo:hi])
                else:
                    dx[lo:hi] = ds.mm(a) * mask
        return grad_out, None if dx is None else dx.view(x.shape), None, None, None, *grads


def _uncovered(spans: tuple, rows: int) -> list[tuple[int, int]]:
    """The row ranges of [0, rows) outside every (sorted, disjoint) span."""
    gaps, cursor = [], 0
    for lo, hi in sorted(spans):
        if lo > cursor:
            gaps.append((cursor, lo))
        cursor = max(cursor, hi)
    return gaps + ([(cursor, rows)] if cursor < rows else [])


@functools.lru_cache(maxsize=256)
def _row_scale(spans: tuple, scales: tuple, rows: int, device: torch.device) -> torch.Tensor | None:
    """[rows, 1] fp32: each row's segment scale, or None where the segments leave rows uncovered (a task
    without an adapter on this op): those rows keep the per-segment path, which never touches them.
    The same few batch layouts recur in every op of a step: cached, not rebuilt per call."""
    if sum(hi - lo for lo, hi in spans) != rows:
        return None
    lengths = torch.tensor([hi - lo for lo, hi in spans])
    return torch.repeat_interleave(torch.tensor(scales, dtype=torch.float32), lengths).view(-1, 1).to(device)


def looped_lora(x: torch.Tensor, out: torch.Tensor, spans: list[tuple[int, int]], scales: list[float],
                masks: list[torch.Tensor | None], a_weights: list[torch.Tensor],
                b_weights: list[torch.Tensor]) -> torch.Tensor:
    """`out` with every segment's LoRA update added to its rows (in place when `out` is not a view).
    x: [tokens, K]; spans: (first row, end row) per segment; masks: a segment's dropout mask or None."""
    weights = [w for pair in zip(a_weights, b_weights) for w in pair]
    return LoopedLoRA.apply(out, x, tuple(spans), tuple(scales), tuple(masks), *weights)
