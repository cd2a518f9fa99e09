"""Activation recomputation: each transformer block of a fusion group whose Plan says `recompute` keeps
only its input for the backward and runs its forward again there (torch.utils.checkpoint, non-reentrant),
so a step holds one block's activations at a time instead of every block's.

A recomputed block must compute exactly what its first forward did, or the gradient is not the one of
the loss that was computed. Three things the block reads live outside its arguments, and by the time the
backward runs they are gone or have moved on:
- the routing of the fused batch (Multiplexer.route: which rows are whose, the batch's segment tables),
- the chunk-aligned attention's sequence map (alignment.packed_attention),
- every task's dropout generator (TaskAdapter.dropout_gen): it has drawn the masks of the later blocks
  and the later micro-batches since; torch's own `preserve_rng_state` covers the default generators only;
- a KV cache among the block's arguments (prefix tuning's prefix, padded layout): the block appended
  its keys and values to it, and appending them again would double them.
So at the first forward each checkpointed block records them (a generator's state is a few KB), and its
recompute runs with them restored and puts the present ones back afterwards: the same masks are drawn
from the same states, and the generators continue where they were. The result is bit for bit the
gradient without recomputation (tests/test_memory_knobs.py).

The blocks are wrapped in place (their `forward` is replaced on the instance): module paths, state
dicts and the adapters' keys are unchanged. `recomputing(model, on)` switches it for the forwards in
its block; with gradients off (evaluation) nothing is checkpointed.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache

from muxtune.executor import alignment
from muxtune.executor.mux import Multiplexer
from muxtune.profiler.backbone_parts import decoder_layers


class _Switch:
    """Whether the model's blocks checkpoint now (one per model, like its Multiplexer)."""

    def __init__(self):
        self.on = False


def install(model: nn.Module) -> _Switch:
    """Wrap the model's decoder blocks once (later calls return the same switch)."""
    switch = getattr(model, "_muxtune_recompute", None)
    if switch is not None:
        return switch
    switch = _Switch()
    object.__setattr__(model, "_muxtune_recompute", switch)
    _, _, layers = decoder_layers(model)
    for layer in layers:
        layer.forward = functools.partial(_block_forward, switch, model, layer.forward)
    return switch


@contextlib.contextmanager
def recomputing(model: nn.Module, on: bool):
    """Within this block the model's decoder blocks recompute their activations in the backward (`on`)."""
    switch = install(model) if on else getattr(model, "_muxtune_recompute", None)
    if switch is None:  # never switched on: nothing is wrapped and nothing to do
        yield
        return
    previous, switch.on = switch.on, on
    try:
        yield
    finally:
        switch.on = previous


def _block_forward(switch: _Switch, model: nn.Module, forward, *args, **kwargs):
    if not switch.on or not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    caches = [value for value in (*args, *kwargs.values()) if isinstance(value, Cache)]
    state = _BlockState.capture(model, caches)
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=lambda: (contextlib.nullcontext(), state.restored()), **kwargs)


class _BlockState:
    """What a block's forward read besides its arguments (module docstring), as of that forward."""

    def __init__(self, model: nn.Module, mux: Multiplexer | None, routing, attention, generators, cache_layers):
        self.model, self.mux, self.routing, self.attention = model, mux, routing, attention
        self.generators, self.cache_layers = generators, cache_layers

    @classmethod
    def capture(cls, model: nn.Module, caches: list) -> "_BlockState":
        mux = getattr(model, "_muxtune_multiplexer", None)
        routing = mux.routing_state() if mux is not None else None
        generators = []
        if mux is not None and mux.segments:
            for seg in mux.segments:
                gen = mux.adapters[seg.task].dropout_gen if seg.task in mux.adapters else None
                if gen is not None:
                    generators.append((gen, gen.get_state()))
        # a cache layer's tensors are replaced (torch.cat), never written in place: references suffice
        cache_layers = [(layer, dict(vars(layer))) for cache in caches for layer in cache.layers]
        return cls(model, mux, routing, alignment.attention_state(model), generators, cache_layers)

    @contextlib.contextmanager
    def restored(self):
        present = [(gen, gen.get_state()) for gen, _ in self.generators]
        present_cache = [(layer, dict(vars(layer))) for layer, _ in self.cache_layers]
        for gen, state in self.generators:
            gen.set_state(state)
        for layer, fields in self.cache_layers:
            vars(layer).update(fields)
        routing = self.mux.restored_routing(self.routing) if self.mux is not None else contextlib.nullcontext()
        try:
            with routing, alignment.restored_attention(self.model, self.attention):
                yield
        finally:
            for gen, state in present:
                gen.set_state(state)
            for layer, fields in present_cache:
                vars(layer).update(fields)
