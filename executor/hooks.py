"""Phase hooks of a training step: what an observer (the profiler, a benchmark) subscribes to instead of
patching the trainer. The trainer enters `observer.phase(name)` around each phase of its step:

  draw       drawing the tasks' next batches
  fuse       building the fused micro-batch(es) of a fusion group
  forward    the fused forward, LM head and loss sums included
  head       the LM head and loss sums alone (inside forward)
  backward   the backward of the summed task losses
  optimizer  gradient norms, clipping, AdamW steps and zero_grad (the LR schedule is host work)

and hands each fusion group's fused micro-batches to `fused(batches)` as soon as they are built.
The default observer does nothing, at the cost of one shared null context per phase.
"""

from __future__ import annotations

import contextlib

_NOTHING = contextlib.nullcontext()  # reusable: entering it twice is fine


class StepObserver:
    """Subclass and override what you need; the trainer holds one as `trainer.observer`."""

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return _NOTHING

    def fused(self, batches: list) -> None:
        """A fusion group's micro-batches (FusedBatch or ChunkedBatch), before they are run."""
