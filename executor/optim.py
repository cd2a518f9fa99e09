"""All tasks' AdamW steps as ONE multi-tensor update: each task keeps its own optimizer object (its lr
set by its own scheduler, its weight decay, its moments and step count, its checkpointed state), but
the arithmetic runs as one `torch._foreach_*` call per stage over every task's tensors at once, with
each tensor's own scalars (lr, weight decay, bias corrections) passed as lists.

Why not one call per task: with N tasks the host would launch ~10 small ops per task per step (or
one fused kernel per task), so the step's launch count grew with N; on a GPU each is idle device time.

Why it is bit-identical to each task's own `torch.optim.AdamW(foreach=True).step()`: the same foreach
ops in the same order (torch.optim.adamw._multi_tensor_adamw, non-capturable), elementwise per tensor;
a ScalarList passes each tensor the value the task's Scalar would have been. tests/test_optim.py
checks it bit for bit, with different lrs, schedules, weight decays, step counts and missing grads.
The step counters stay host tensors, as in torch's non-capturable path, so the bias corrections are
host arithmetic: no device sync.
"""

from __future__ import annotations

import math

import torch


class OptimizerStepError(ValueError):
    """A task's hyper-parameters cannot be applied this step (e.g. an lr that overflows fp32)."""


def _checked(values: list[float], what: str) -> None:
    limit = torch.finfo(torch.float32).max
    for v in values:
        if not math.isfinite(v) or abs(v) > limit:
            raise OptimizerStepError(f"{what} {v} is not a finite fp32 value")


def task_scalars(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, dict]]:
    """(parameter, its group) of every tensor with a gradient, in the optimizer's order; checks the
    group's settings are the ones the multi-tensor step implements, and its values fit fp32."""
    out = []
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize") or group.get("capturable") or group.get("differentiable"):
            raise OptimizerStepError("multi-tensor AdamW implements plain AdamW only "
                                     "(no amsgrad, maximize, capturable or differentiable)")
        lr = float(group["lr"])
        _checked([lr, 1 - lr * group["weight_decay"], group["eps"]], "lr/weight decay/eps")
        out += [(p, group) for p in group["params"] if p.grad is not None]
    return out


@torch.no_grad()
def multi_tensor_adamw(optimizers: list[torch.optim.Optimizer]) -> None:
    """`opt.step()` for every AdamW in `optimizers`, as one multi-tensor update. Raises
    OptimizerStepError, before touching any tensor, if one task's values cannot be applied (the caller
    then steps the tasks one by one to fail only that one)."""
    entries = [(opt, p, group) for opt in optimizers for p, group in task_scalars(opt)]
    if not entries:
        return
    params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
    decay, lerp_weight, beta2s, one_minus_beta2, step_sizes, bc2_sqrt, eps = [], [], [], [], [], [], []
    for opt, p, group in entries:
        lr, (beta1, beta2) = group["lr"], group["betas"]
        state = opt.state.get(p, {})
        # this step's count: the stored counter is a host tensor (torch's non-capturable path), so
        # reading it is no device sync; the bias corrections are host arithmetic as in torch
        n = (state["step"].tolist() if "step" in state else 0.0) + 1  # tolist: no aten op either
        bias_correction1 = 1 - beta1**n
        bias_correction2 = 1 - beta2**n
        decay.append(1 - lr * group["weight_decay"])
        lerp_weight.append(1 - beta1)
        beta2s.append(beta2)
        one_minus_beta2.append(1 - beta2)
        step_sizes.append((lr / bias_correction1) * -1)
        bc2_sqrt.append(bias_correction2**0.5)
        eps.append(group["eps"])
    _checked(step_sizes, "step size")  # before any state or tensor changes
    for opt, p, group in entries:
        state = opt.state[p]
        if len(state) == 0:  # lazily, as torch.optim.AdamW._init_group does
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        params.append(p)
        grads.append(p.grad)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        steps.append(state["step"])
    torch._foreach_add_(steps, 1)
    torch._foreach_mul_(params, decay)
    _foreach_lerp_scalars(exp_avgs, grads, lerp_weight)
    torch._foreach_mul_(exp_avg_sqs, beta2s)
    _foreach_addcmul_scalars(exp_avg_sqs, grads, one_minus_beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


def _foreach_lerp_scalars(tensors, ends, weights: list[float]) -> None:
    """lerp with each tensor's own weight: one call when all are equal (the usual case: betas are the
    default), else one call per distinct weight, each as torch passes it (a Scalar)."""
    for weight, idx in _by_value(weights).items():
        torch._foreach_lerp_([tensors[i] for i in idx], [ends[i] for i in idx], weight)


def _foreach_addcmul_scalars(tensors, grads, values: list[float]) -> None:
    for value, idx in _by_value(values).items():
        sub = [grads[i] for i in idx]
        torch._foreach_addcmul_([tensors[i] for i in idx], sub, sub, value)


def _by_value(values: list[float]) -> dict[float, list[int]]:
    groups: dict[float, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v, []).append(i)
    return groups


@torch.no_grad()
def clip_coefficients(norms: torch.Tensor, max_norms: list[float]) -> torch.Tensor:
    """Every task's clipping factor from its stacked norm, as `clip_grads_with_norm_` computes it for
    each one alone (clamp(max_norm / (norm + 1e-6), max=1); `float / tensor` is reciprocal, then
    multiply, in torch), but as one device computation for all tasks."""
    limits = torch.tensor(max_norms, dtype=norms.dtype).to(norms.device, non_blocking=True)
    return torch.clamp((norms + 1e-6).reciprocal() * limits, max=1.0)


@torch.no_grad()
def read_norms(runs: list, norms: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Each task's gradient norm and clipping factor on the host, for all tasks in ONE host-device
    sync. `norms`: task name -> its gradient norm (a device tensor) or None (no gradients). The
    factors are bit for bit the ones each task's own `clip_grads_with_norm_` computes."""
    with_norm = [run for run in runs if norms[run.spec.name] is not None]
    values, factors = {}, {}
    if with_norm:
        stacked = torch.stack([norms[run.spec.name] for run in with_norm])
        factor = clip_coefficients(stacked, [run.spec.max_grad_norm or 0.0 for run in with_norm])
        for run, value, f in zip(with_norm, *torch.stack([stacked, factor]).tolist()):
            values[run.spec.name], factors[run.spec.name] = value, f
    return values, factors


@torch.no_grad()
def step_optimizers(runs: list, factors: dict[str, float]) -> dict[str, str]:
    """Clip each task's gradients to its own max_grad_norm (`factors` from read_norms: one ScalarList
    multiply for all tasks), take all their AdamW steps as one multi-tensor update, then each task's own
    scheduler step and zero_grad. Returns the tasks whose step failed (name -> reason; e.g. an lr that
    overflows fp32): they were not stepped, the others were."""
    grads, scalars = [], []
    for run in runs:
        if run.spec.max_grad_norm is not None and run.spec.name in factors:
            for p in run.parameters():
                if p.grad is not None:
                    grads.append(p.grad)
                    scalars.append(factors[run.spec.name])
    if grads:
        torch._foreach_mul_(grads, scalars)
    failed = {}
    try:
        multi_tensor_adamw([run.optimizer for run in runs])
        stepped = runs
    except OptimizerStepError:  # one task's values cannot be applied: step them one by one, fail that one
        stepped = []
        for run in runs:
            try:
                multi_tensor_adamw([run.optimizer])
                stepped.append(run)
            except OptimizerStepError as exc:
                failed[run.spec.name] = f"optimizer step failed at step {run.step + 1}: {exc}"
    for run in stepped:
        run.optimizer._opt_called = True  # what `optimizer.step()`'s scheduler hook records
        run.scheduler.step()
    for run in runs:
        # optimizer.zero_grad(set_to_none=True) without its per-call profiler record: the same effect
        for p in run.parameters():
            p.grad = None
    return failed


def summed_task_loss(batch_sums: dict[str, torch.Tensor], counts: dict[str, int], sums: dict[str, float]
                     ) -> torch.Tensor | None:
    """The sum of the tasks' mean losses (each task's summed loss / its target count) to run the
    backward of, leaving a non-finite one out (only its own task will be stopped), or None if none is
    finite; adds each task's summed loss to `sums`. All tasks at once: one read of the values (the loss
    log and the finiteness check need them on the host anyway), one division and one sum, not ops per
    task."""
    names = list(batch_sums)
    values = torch.stack(list(batch_sums.values()))
    host = values.detach().tolist()
    for name, value in zip(names, host):
        sums[name] = sums.get(name, 0.0) + value
    finite = [i for i, value in enumerate(host) if math.isfinite(value)]
    if not finite:
        return None
    if len(finite) < len(names):
        values = values.index_select(0, torch.tensor(finite, device=values.device))
    divisors = torch.tensor([float(counts[names[i]]) for i in finite], dtype=values.dtype).to(values.device)
    return (values / divisors).sum()
