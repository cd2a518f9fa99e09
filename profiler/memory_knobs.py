"""What the memory knobs cost: activation recomputation (executor/recompute.py) and gradient accumulation
(executor/accumulation.py), priced from the CostModel's own terms, so they inherit its profile.

Recomputation, per micro-batch and stage of `layers` decoder blocks:
- memory: each block keeps only its input for the backward, the hidden states [T, hidden] (the
  CostModel's boundary_bytes, exact: it is the tensor), and during the backward one block at a time holds
  its whole activations again and its backward's working set: the profile's `layer` peak_bytes (a
  block's forward + backward, measured) with the adapters' share (block_backward_bytes);
- time: the blocks' forward runs once more inside the backward: forward_seconds(mb, layers) without the
  stem and the head (they are not recomputed), adapters included. The profile measures a block's forward;
  nothing else needs measuring (tests/test_memory_knobs.py checks the recompute's forward count).
Accumulation has no formula of its own: k micro-steps are k smaller micro-batches, each priced as one
(their fixed per-micro-batch costs are what accumulation adds), holding a k-th of the activations.
"""

from __future__ import annotations

from dataclasses import replace

from muxtune.profiler.shapes import MicroBatch

# The knob settings (recompute, accumulation micro-steps) the planner prices for a group and admission
# tries, from no knob up.
KNOBS = tuple((recompute, k) for recompute in (False, True) for k in (1, 2, 4, 8, 16))


def activation_bytes(cm, mb: MicroBatch, layers: int, recompute: bool = False, tp: int = 1) -> int:
    """Bytes `layers` blocks keep for the backward of `mb` (CostModel.activation_bytes), with recomputation:
    the blocks' inputs plus one block's activations while it is recomputed and differentiated."""
    tp_kw = {"tp": tp} if tp > 1 else {}
    if not recompute or layers == 0:
        return cm.activation_bytes(mb, layers, **tp_kw)
    return int(layers * cm.boundary_bytes(mb) + block_backward_bytes(cm, mb, tp))


def block_backward_bytes(cm, mb: MicroBatch, tp: int = 1) -> int:
    """What one block holds while it is recomputed and differentiated: the profile's `layer` peak_bytes
    (a block's forward and backward measured together: its saved tensors and its backward's working
    set), plus the adapters' share of activation_bytes; without a profile (or tp > 1) its saved tensors."""
    one = cm.activation_bytes(mb, 1, **({"tp": tp} if tp > 1 else {}))
    if cm.profile is None or tp > 1:
        return one
    saved = cm._grid("layer", "fwd", mb.tokens, mb.span, value="saved_bytes")
    peak = cm._grid("layer", "fwd", mb.tokens, mb.span, value="peak_bytes")
    return int(one + max(peak - saved, 0.0))


def recompute_seconds(cm, mb: MicroBatch, layers: int, tp: int = 1) -> float:
    """The forward of `layers` blocks run again in the backward (no stem, no head)."""
    tp_kw = {"tp": tp} if tp > 1 else {}
    return cm.forward_seconds(mb, layers, False, False, **tp_kw) if layers else 0.0


def saved_bytes(cm, mb: MicroBatch, layers: int, tp: int = 1) -> int:
    """What recomputation saves on `mb`'s activations (negative where a block's input outweighs them)."""
    return activation_bytes(cm, mb, layers, False, tp) - activation_bytes(cm, mb, layers, True, tp)


def peak_bytes(cm, groups: list[MicroBatch], recompute: bool = False) -> int:
    """CostModel.peak_bytes of a single-device step (`groups`: every micro-batch it runs, one after
    another), with or without recomputation (the micro-batches marked MicroBatch.recompute)."""
    marked = [replace(mb, recompute=recompute) for mb in groups]
    return cm.peak_bytes([(kind, mb) for mb in marked for kind in ("fwd", "bwd")],
                         [t.params for mb in groups for t in mb.tasks])


def step_seconds(cm, groups: list[MicroBatch], recompute: bool = False) -> float:
    """CostModel.step_seconds of a single-device step, plus each micro-batch's recompute."""
    extra = sum(recompute_seconds(cm, mb, cm.shape.n_layers) for mb in groups) if recompute else 0.0
    return cm.step_seconds(groups) + extra

