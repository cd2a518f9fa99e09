"""Gradient accumulation: a task's `batch_size` sequences of one optimizer step fed over k micro-steps
(the Plan's FusionGroup.accumulation), so a step holds the activations of a k-th of its batch at a time.

The result must be the one big batch's: a task's loss is the mean over ALL its loss-bearing tokens of
the optimizer step. Each micro-step's summed loss is divided by that step-wide count (known before the
first forward: the targets are in the batches), never by the micro-step's own count: a mean of
micro-step means weighs a token of a short micro-step more than one of a long one (the bug class of
axolotl #1100 and transformers #37766). The gradients of the k backwards add up in the adapters'
`.grad`, so the optimizer sees the big batch's gradient, within float rounding of the summation order.

The step loop splits with `micro_steps`; the denominators are each task's target tokens over all its
micro-batches (the trainer sums them before the first forward); what one micro-batch backwards is
executor/optim.summed_task_loss.
"""

from __future__ import annotations

from muxtune.schedule import part_bounds


def micro_steps(batches: dict[str, list], accumulation: dict[str, int]) -> list[dict[str, list]]:
    """Split each task's batch into its k contiguous parts (sizes differ by at most one, the earlier ones
    larger); micro-step j holds every task's j-th part. A task with k = 1 (the default) is wholly in the
    first micro-step; a task with fewer sequences than k takes part in fewer micro-steps."""
    count = max((accumulation.get(name, 1) for name in batches), default=1)
    out = []
    for j in range(count):
        step = {}
        for name, examples in batches.items():
            k = min(accumulation.get(name, 1), len(examples)) or 1
            if j < k:
                lo, hi = part_bounds(len(examples), k, j)
                step[name] = examples[lo:hi]
        if step:
            out.append(step)
    return out
