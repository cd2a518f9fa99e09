"""Timers and memory probes the profiler measures with: a real trainer step's phases through its phase hooks
(executor/hooks.py), the peak of live tensor storages, the bytes autograd saves for backward."""

from __future__ import annotations

import contextlib
import weakref

import torch

from muxtune.executor.hooks import StepObserver
from muxtune.profiler.sampling import clock, sync


class PhaseTimer(StepObserver):
    """Adds up the seconds a step spends in each phase (executor/hooks.py); `first_batch` is the step's
    first fused micro-batch."""

    def __init__(self):
        self.spent: dict[str, float] = {}
        self.first_batch = None

    @contextlib.contextmanager
    def phase(self, name: str):
        start = clock()
        try:
            yield
        finally:
            self.spent[name] = self.spent.get(name, 0.0) + clock() - start

    def fused(self, batches: list) -> None:
        if self.first_batch is None:
            self.first_batch = batches[0]


def observe_step(trainer, device: str) -> dict:
    """Run one real `trainer.step()` with its phases timed inside it (seconds) through the trainer's
    phase hooks: forward (the fused forward, LM head included), head, backward, optimizer (grad norm,
    clipping, AdamW, zero_grad), draw, fuse, and the whole `step`; `last_batch` is the step's first fused
    batch. Host work is what the step spends outside forward, backward and optimizer, timed in the same
    call (a difference against a separately timed forward/backward carries the two calls' different cache
    states into it)."""
    timer, observer = PhaseTimer(), trainer.observer
    trainer.observer = timer
    try:
        sync(device)
        start = clock()
        trainer.step()
        sync(device)
        seconds = clock() - start
    finally:
        trainer.observer = observer
    spent = {key: timer.spent.get(key, 0.0) for key in ("forward", "head", "backward", "optimizer", "draw", "fuse")}
    spent["step"] = seconds
    spent["host"] = spent["step"] - spent["forward"] - spent["backward"] - spent["optimizer"]
    if timer.first_batch is not None:
        spent["last_batch"] = timer.first_batch
    return spent


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Tally of tensor storages created while active and still alive; `peak` is its maximum. The CPU
    stand-in for torch.cuda.max_memory_allocated (it sees every aten op, forward and backward).
    Outputs that alias an input (views such as a weight's `t()`, in-place results) allocate nothing:
    counting their storage counted every weight a step touched (~330 MB for llama-100m's steps)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) and len(func._schema.returns) > 1 else (out,)
        new = [o for o, r in zip(outs, func._schema.returns) if r.alias_info is None]
        for t in torch.utils._pytree.tree_leaves(new):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if n and key not in self._seen:
                    self._seen.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, n)
        return out

    def _free(self, key: int, n: int) -> None:
        if key in self._seen:
            self._seen.discard(key)
            self.live -= n


def peak_bytes(fn, device: str) -> int:
    """Most memory allocated by `fn` on top of what was live when it started."""
    if device.startswith("cuda"):
        dev = torch.device(device)
        sync(device)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(dev) - before)
    with LiveBytes() as tally:
        fn()
    return int(tally.peak)


def saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs (not `exclude`d weights)."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def adapter_saved_bytes(adapter, fn, exclude: set[int]) -> tuple[int, int]:
    """(all, batch) bytes of the distinct storages autograd saves inside one task's adapter code (its
    layers' aggregate/dispatch, its sequence module) while `fn` runs. A saved slice of the batch counts
    with its whole storage: that is what it keeps alive. `batch`: the part that is the backbone's own
    tensors handed to the adapter (an op's input or output), which tasks of the same shape share."""
    seen: dict[int, int] = {}
    handed: set[int] = set()

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    def counting(call):
        def wrapped(*args, **kwargs):
            handed.update(a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return call(*args, **kwargs)
        return wrapped

    # the grouped paths (one call for all of an op's segments) count as the adapter's code as well
    names = ("aggregate", "dispatch", "looped_aggregate", "grouped_aggregate", "grouped_dispatch", "prepend",
             "key_values")
    patched = [(module, name) for module in [*adapter.layers.values(), adapter.sequence] if module is not None
               for name in names if getattr(module, name, None) is not None]
    for module, name in patched:
        module.__dict__[name] = counting(getattr(module, name))  # an instance attribute shadows the method
    try:
        fn()
    finally:
        for module, name in patched:
            del module.__dict__[name]
    return sum(seen.values()), sum(n for ptr, n in seen.items() if ptr in handed)
