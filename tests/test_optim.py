"""All tasks' AdamW steps as one multi-tensor update equal each task's own AdamW step, bit for bit."""

import pytest
import torch
from transformers import get_scheduler

from muxtune.executor.optim import OptimizerStepError, multi_tensor_adamw
from muxtune.executor.trainer import make_optimizer

TASKS = [  # lr, weight decay, schedule, warm-up, tensor shapes (a task with no weight decay, one that decays)
    (5e-3, 0.0, "constant", 0, [(4, 16), (32, 4)]),
    (2e-3, 0.01, "linear", 2, [(16, 16), (48, 16), (7,)]),
    (1e-3, 0.1, "cosine", 0, [(8, 24)]),
    # LoRA-like, one tensor over the 32768 elements at which an elementwise op splits over threads
    (7e-4, 0.05, "constant", 1, [(8, 64), (64, 8), (64, 768), (16, 64)]),
]
SCALES = {0: 0.37, 1: 1.0, 3: 0.81}  # clipping factors applied with the step (1.0: within its limit, skipped)


def build(seed: int, kind: str = "default"):
    """The tasks with make_optimizer's AdamW (fused on the CPU), or `kind` "foreach": torch's
    multi-tensor AdamW, the one make_optimizer gives on a GPU."""
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for i, (lr, wd, schedule, warmup, shapes) in enumerate(TASKS):
        params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
        optimizer = make_optimizer(params, lr, wd) if kind == "default" else \
            torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=True)
        scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=6)
        tasks.append((params, optimizer, scheduler))
    return tasks


def set_grads(tasks, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for t, (params, _, _) in enumerate(tasks):
        for k, p in enumerate(params):
            # task 1's last tensor gets no gradient at step 2 (a layer a batch did not reach), task 3's
            # second at step 3 (unequal counters within a task after)
            p.grad = None if (t, k, step) in ((1, 2, 2), (3, 1, 3)) else torch.randn(p.shape, generator=gen) * 10 ** (t - 2)


@pytest.mark.parametrize("kind, threads", [("default", 1), ("default", 2), ("foreach", 2)])
def test_multi_tensor_adamw_is_bit_identical_to_each_tasks_own_adamw(kind, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_torch(kind)
    finally:
        torch.set_num_threads(before)


def check_against_torch(kind: str):
    ours, reference = build(0, kind), build(0, kind)
    assert all(opt.param_groups[0]["fused" if kind == "default" else "foreach"] for _, opt, _ in ours)
    for step in range(6):
        # task 2 joins at step 2: its counters start later than the others'
        live = [i for i in range(len(TASKS)) if not (i == 2 and step < 2)]
        for tasks in (ours, reference):
            set_grads(tasks, step)
        multi_tensor_adamw([ours[i][1] for i in live], {ours[i][1]: f for i, f in SCALES.items()})
        for i in live:
            for p in reference[i][0]:
                if p.grad is not None and i in SCALES:
                    p.grad.mul_(SCALES[i])  # what clip_grads_with_norm_ does with that factor
            reference[i][1].step()
        for tasks in (ours, reference):
            for i in live:
                tasks[i][2].step()
                tasks[i][1].zero_grad(set_to_none=True)
        for i in range(len(TASKS)):
            for p, q in zip(ours[i][0], reference[i][0]):
                assert torch.equal(p, q), f"task {i} step {step}"
            for p, q in zip(ours[i][0], reference[i][0]):
                a, b = ours[i][1].state.get(p, {}), reference[i][1].state.get(q, {})
                assert a.keys() == b.keys()
                for key in a:
                    assert torch.equal(a[key], b[key]), f"task {i} step {step} {key}"
    # training moved every tensor, and the tasks' lrs differed all along (no single-lr shortcut)
    assert all(not torch.equal(p, q) for (ps, _, _), (qs, _, _) in zip(ours, build(0, kind)) for p, q in zip(ps, qs))
    assert len({opt.param_groups[0]["lr"] for _, opt, _ in ours}) == len(TASKS)


def test_a_task_whose_lr_overflows_raises_before_any_tensor_changes():
    tasks = build(0)
    set_grads(tasks, 0)
    tasks[1][1].param_groups[0]["lr"] = 1e39  # beyond fp32
    before = [p.clone() for params, _, _ in tasks for p in params]
    with pytest.raises(OptimizerStepError, match="not a finite fp32 value"):
        multi_tensor_adamw([opt for _, opt, _ in tasks])
    after = [p for params, _, _ in tasks for p in params]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(not opt.state for _, opt, _ in tasks)
