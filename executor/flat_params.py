"""Every task's adapter weights of one op in one flat buffer, laid out as a grouped kernel reads them.

A grouped kernel (muxtune.kernels) runs all tasks' adapters of an op in one launch over flat weight
buffers. Handing it each task's own Parameters costs host work per tenant on every call: a concatenation
in the forward and, in the backward, its slices and views and one AccumulateGrad per weight (~36 host
ops per tenant per op, benchmarks.host_overhead). A `FlatParameters` store removes that work, as
Megatron's gradient-accumulation fusion does: the tasks' Parameters stay the tasks' own objects (their
optimizers, checkpoints and exports see nothing new) but their data are views into ONE flat buffer, and
their gradients views into ONE persistent flat gradient buffer that the kernel's backward accumulates
into directly. What the store does per call is host arithmetic, not tensor ops.

Gradient semantics stay torch's: a weight's `.grad` is None until a backward reaches it in a step (the
trainer sets it to None after each optimizer step), then the store's view. Before the kernel
accumulates, `accumulate` zeroes the regions whose tasks have no gradient yet: the whole buffer at
once in the usual case (no task has one: the step's first backward through this op). A gradient that is
not the store's view (another code path's autograd set it) receives the kernel's result by an add.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


class FlatParameters:
    """The weights `names` (attribute paths, e.g. "lora_A.weight") of each of `layers` (one per task, all
    on one op), packed in that order into `data`; `offsets[layer]` holds where each of its weights begins."""

    def __init__(self, layers: list[nn.Module], names: tuple[str, ...]):
        self.layers = tuple(layers)
        self.params = [layer.get_parameter(name) for layer in layers for name in names]
        sizes = [p.numel() for p in self.params]
        starts = list(itertools.accumulate([0, *sizes[:-1]]))
        data = torch.empty(sum(sizes), dtype=torch.float32, device=self.params[0].device)
        self.grad = torch.zeros_like(data)
        self.grad_views = []
        with torch.no_grad():
            for p, start, size in zip(self.params, starts, sizes):
                data[start:start + size].copy_(p.reshape(-1))
                p.data = data[start:start + size].view_as(p)
                self.grad_views.append(self.grad[start:start + size].view_as(p))
        # a leaf that requires grad puts the kernel's node in the graph even where neither the op's input
        # nor its output does (the first layer's); the kernel returns no gradient for it
        self.data = data.requires_grad_()
        self.pointers = tuple(p.data_ptr() for p in self.params)
        per_layer = len(names)
        self.offsets = {id(layer): tuple(starts[i * per_layer:(i + 1) * per_layer]) for i, layer in enumerate(layers)}
        self._index = {id(layer): i for i, layer in enumerate(layers)}
        self._per_layer = per_layer

    def holds(self, layers: list[nn.Module]) -> bool:
        """True while `layers` are this store's, in its order, and their weights still view its buffer
        (a task that joined or left, a tensor-parallel split or a move to another device rebuilds it)."""
        return self.layers == tuple(layers) and all(p.data_ptr() == ptr for p, ptr in zip(self.params, self.pointers))

    def _params_of(self, layer: nn.Module) -> range:
        i = self._index[id(layer)] * self._per_layer
        return range(i, i + self._per_layer)

    def accumulate(self, layers: list[nn.Module], write) -> None:
        """`write(grad)` adds the gradients of `layers` (this batch's tasks) into `grad`; around it, their
        weights' `.grad` become (or receive) the store's views."""
        handover = self._begin_backward(layers)
        write(self.grad)
        self._end_backward(handover)

    def _begin_backward(self, layers: list[nn.Module]) -> list[int]:
        """Before the kernel accumulates the gradients of `layers` (this batch's) into `grad`: zero what
        holds no gradient of this step yet. Returns the indices (into `params`) to hand over afterwards."""
        if all(p.grad is None for p in self.params):
            self.grad.zero_()
            return [i for layer in layers for i in self._params_of(layer)]
        handover = []
        for layer in layers:
            for i in self._params_of(layer):
                if self.params[i].grad is not self.grad_views[i]:
                    self.grad_views[i].zero_()
                    handover.append(i)
        return handover

    def _end_backward(self, handover: list[int]) -> None:
        """After the kernel: the weights' gradients are the store's views (or got its result added)."""
        for i in handover:
            p, view = self.params[i], self.grad_views[i]
            if p.grad is None:
                p.grad = view
            else:
                p.grad.add_(view)


class StoreRows(torch.autograd.Function):
    """rows[t] = the store's `data[index[t]]` ([T, n] from a [T, n] index: e.g. each task's vector),
    for autograd ops that use the weights themselves (DoRA's magnitudes); the backward adds the rows'
    gradient into the store's flat gradient through `accumulate_into`, as the grouped kernels do (no
    per-task stack, unbind or AccumulateGrad)."""

    @staticmethod
    def forward(ctx, data, index, accumulate_into):
        ctx.index, ctx.accumulate_into = index, accumulate_into
        return data.detach()[index]

    @staticmethod
    def backward(ctx, grad):
        index = ctx.index.reshape(-1)
        ctx.accumulate_into(lambda flat: flat.index_add_(0, index, grad.reshape(-1)))
        return None, None, None


def flat_parameters(mux, layer: nn.Module, kind, names: tuple[str, ...]) -> FlatParameters:
    """The store of the weights `names` of every layer on `layer`'s op whose grouped function `kind` is
    (e.g. LoraLayer.grouped_aggregate: the tasks one grouped call serves), kept on the op and rebuilt
    when those layers or their weights changed."""
    op = mux.op(layer.path)
    layers = [other for other in op.adapters.values() if getattr(other, kind.__name__, None) is kind]
    store = op.shared.get(kind.__qualname__)
    if store is None or not store.holds(layers):
        store = op.shared[kind.__qualname__] = FlatParameters(layers, names)
    return store
