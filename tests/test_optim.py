"""All tasks' AdamW steps as one multi-tensor update equal each task's own AdamW step, bit for bit."""

import pytest
import torch
from transformers import get_scheduler

from muxtune.executor.optim import OptimizerStepError, multi_tensor_adamw
from muxtune.executor.trainer import make_optimizer
from muxtune.spec import TaskSpec

TASKS = [  # lr, weight decay, schedule, warm-up, tensor shapes (a task with no weight decay, one that decays)
    (5e-3, 0.0, "constant", 0, [(4, 16), (32, 4)]),
    (2e-3, 0.01, "linear", 2, [(16, 16), (48, 16), (7,)]),
    (1e-3, 0.1, "cosine", 0, [(8, 24)]),
]


def build(seed: int):
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for i, (lr, wd, schedule, warmup, shapes) in enumerate(TASKS):
        params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
        spec = TaskSpec(name=f"t{i}", data="x.jsonl", lr=lr, weight_decay=wd, lr_schedule=schedule,
                        warmup_steps=warmup, steps=6, peft={"method": "lora"})
        optimizer = make_optimizer(params, spec)
        scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=6)
        tasks.append((params, optimizer, scheduler))
    return tasks


def set_grads(tasks, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for t, (params, _, _) in enumerate(tasks):
        for k, p in enumerate(params):
            # task 1's last tensor gets no gradient at step 2 (a layer a batch did not reach)
            p.grad = None if (t, k, step) == (1, 2, 2) else torch.randn(p.shape, generator=gen) * 10 ** (t - 2)


def test_multi_tensor_adamw_is_bit_identical_to_each_tasks_own_adamw():
    ours, reference = build(0), build(0)
    for step in range(6):
        # task 2 joins at step 2: its counters start later than the others'
        live = [i for i in range(3) if not (i == 2 and step < 2)]
        for tasks in (ours, reference):
            set_grads(tasks, step)
        multi_tensor_adamw([ours[i][1] for i in live])
        for i in live:
            reference[i][1].step()
        for tasks in (ours, reference):
            for i in live:
                tasks[i][2].step()
                tasks[i][1].zero_grad(set_to_none=True)
        for i in range(3):
            for p, q in zip(ours[i][0], reference[i][0]):
                assert torch.equal(p, q), f"task {i} step {step}"
            for p, q in zip(ours[i][0], reference[i][0]):
                a, b = ours[i][1].state.get(p, {}), reference[i][1].state.get(q, {})
                assert a.keys() == b.keys()
                for key in a:
                    assert torch.equal(a[key], b[key]), f"task {i} step {step} {key}"
    # training moved every tensor, and the tasks' lrs differed all along (no single-lr shortcut)
    assert all(not torch.equal(p, q) for (ps, _, _), (qs, _, _) in zip(ours, build(0)) for p, q in zip(ps, qs))
    assert len({opt.param_groups[0]["lr"] for _, opt, _ in ours}) == 3


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
