"""The three document-masked attention kernels (one call per layer) agree with each other, prefixes
and grouped-query heads included; padded and masked also in their gradients."""

import pytest
import torch

from muxtune.executor.document_attention import bucket_length, build_layout, document_attention

# sequences of different lengths (one long among short ones), padding between them, two prefix tasks
SPANS = [(0, 5, 0), (5, 7, 0), (8, 20, 1), (20, 23, 2), (24, 25, 2), (25, 31, 3)]
TOTAL, PREFIXES = 32, {1: 3, 3: 2}


def inputs(seed=0, heads=4, kv_heads=2, dim=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, TOTAL, dim, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, TOTAL, dim, generator=gen, requires_grad=True) for _ in range(2))
    prefix = tuple(torch.randn(1, kv_heads, sum(PREFIXES.values()), dim, generator=gen, requires_grad=True)
                   for _ in range(2))
    return q, k, v, prefix


def reference(q, k, v, prefix):
    """Sequence by sequence: its own prefix (region order = segment order), then itself causally."""
    groups = q.shape[1] // k.shape[1]
    rep = lambda t: t.repeat_interleave(groups, dim=1)  # noqa: E731
    out = torch.zeros(TOTAL, q.shape[1], q.shape[3])
    starts = {1: 0, 3: PREFIXES[1]}
    for s, e, seg in SPANS:
        ks, vs = rep(k[:, :, s:e]), rep(v[:, :, s:e])
        n = PREFIXES.get(seg, 0)
        if n:
            lo = starts[seg]
            ks = torch.cat([rep(prefix[0][:, :, lo : lo + n]), ks], dim=2)
            vs = torch.cat([rep(prefix[1][:, :, lo : lo + n]), vs], dim=2)
        mask = torch.ones(e - s, n + e - s, dtype=torch.bool).tril(diagonal=n)
        o = torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], ks, vs, attn_mask=mask)
        out[s:e] = o[0].transpose(0, 1)
    return out.unsqueeze(0)


@pytest.mark.parametrize("backend", ["padded", "masked", "flex"])
def test_one_call_per_layer_equals_attention_sequence_by_sequence(monkeypatch, backend):
    monkeypatch.setenv("MUXTUNE_ATTENTION", backend)
    layout = build_layout(SPANS, TOTAL, PREFIXES, "cpu")
    assert layout.backend == backend
    q, k, v, prefix = inputs()
    want = reference(q, k, v, prefix)
    if backend == "flex":  # FlexAttention has no backward on the CPU: forward only
        q, k, v, prefix = q.detach(), k.detach(), v.detach(), tuple(t.detach() for t in prefix)
    got = document_attention(layout, q, k, v, prefix, None, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(got[0, [7, 23, 31]]) == 0  # padding positions get zeros
    if backend != "flex":
        weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
        grads = torch.autograd.grad((got * weights).sum(), [q, k, v, *prefix])
        ref_grads = torch.autograd.grad((want * weights).sum(), [q, k, v, *prefix])
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_a_sequence_computes_the_same_alone_and_among_neighbours_of_other_lengths(monkeypatch):
    """Padded buckets depend on a sequence's own length and prefix only: a task's attention outputs and
    gradients are bit for bit the same whoever else is in the fused batch (what padding to the batch's
    longest could not give: another padded length is another rounding)."""
    monkeypatch.delenv("MUXTUNE_ATTENTION", raising=False)
    gen = torch.Generator().manual_seed(3)
    mine = [(0, 5, 0), (5, 19, 0)]  # task 0: two sequences, positions 0..18
    neighbours = [(19, 60, 1), (60, 61, 2), (61, 83, 1), (83, 90, 2)]  # longer and shorter ones
    heads, dim, total = 2, 8, 96
    q, k, v = (torch.randn(1, heads, total, dim, generator=gen) for _ in range(3))
    weights = torch.randn(1, total, heads, dim, generator=gen)

    def attend(spans, length):
        leaves = [t[:, :, :length].clone().requires_grad_() for t in (q, k, v)]
        layout = build_layout(spans, length, {}, "cpu")
        out = document_attention(layout, *leaves, None, None, 0.0)
        (out * weights[:, :length]).sum().backward()
        return out[0, :19].detach(), [t.grad[:, :, :19] for t in leaves]

    alone, alone_grads = attend(mine, 19)
    fused, fused_grads = attend(mine + neighbours, total)
    assert torch.equal(alone, fused)
    assert all(torch.equal(a, b) for a, b in zip(alone_grads, fused_grads))


def test_length_buckets_are_few_and_waste_little():
    rungs = sorted({bucket_length(n) for n in range(1, 4097)})
    assert rungs[0] == 16 and all(b <= 1.25 * a for a, b in zip(rungs, rungs[1:]))
    assert all(bucket_length(n) >= n for n in range(1, 4097)) and len(rungs) <= 33 and 512 in rungs
    spans, start = [], 0
    for i in range(200):  # 200 sequences of 10..500 positions: a call per rung between them, not 200
        n = 10 + (i * 37) % 491
        spans.append((start, start + n, i % 7))
        start += n
    layout = build_layout(spans, start, {}, "cpu")
    assert layout.backend == "padded" and len(layout.buckets) <= len({bucket_length(n) for n in range(10, 501)}) == 21
    assert sum(b.n * b.length for b in layout.buckets) <= 1.3 * start
