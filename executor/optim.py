"""All tasks' AdamW steps in one update: each task keeps its own optimizer object (its lr set by its own
scheduler, its weight decay, its moments and step count, its checkpointed state); the clipping
multiply and the step counters are one foreach call for all tasks, and the AdamW arithmetic is
- on a GPU (foreach optimizers): one `torch._foreach_*` call per stage over every task's tensors at
  once, each tensor's own scalars (lr, weight decay, bias corrections) passed as lists. One call per
  task would launch ~10 small ops per task per step, a launch count growing with N: idle device time.
- on the CPU (fused optimizers, `make_optimizer`): each task's own `torch._fused_adamw_` call, one
  pass over its tensors. There foreach ops loop over the tensors one op call each, ten passes over
  memory: 8 LoRA tasks of 48 tensors on llama-100m took 33 ms of a ~530 ms step this way, against
  9 ms fused (clipping and counters included).

Why it is bit-identical to each task's own `torch.optim.AdamW(...).step()`: on the GPU the same foreach
ops in the same order (torch.optim.adamw._multi_tensor_adamw, non-capturable), elementwise per tensor,
a ScalarList passing each tensor the value the task's Scalar would have been; on the CPU the very call
torch's fused path makes for the task. tests/test_optim.py checks both bit for bit, with different
lrs, schedules, weight decays, step counts, clipping and missing grads. The step counters stay host
tensors (torch's non-capturable foreach path; CPU ones when fused on the CPU), so the bias corrections
are host arithmetic: no device sync.
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
def multi_tensor_adamw(optimizers: list[torch.optim.Optimizer],
                       grad_scales: dict[torch.optim.Optimizer, float] | None = None) -> None:
    """`opt.step()` for every AdamW in `optimizers`; `grad_scales`: a factor to multiply an optimizer's
    gradients by first (its task's clipping), one multiply for all. The foreach optimizers (on a GPU)
    step as one multi-tensor update; a fused one (on the CPU, `make_optimizer`) as its own fused call,
    as its `step()` does. Raises OptimizerStepError, before touching any tensor, if one task's values
    cannot be applied (the caller then steps the tasks one by one to fail only that one)."""
    entries = [(opt, p, group) for opt in optimizers for p, group in task_scalars(opt)]
    if not entries:
        return
    _checked([_step_size(opt, p, group) for opt, p, group in entries], "step size")  # before any change
    for opt, p, group in entries:
        _init_state(opt, p, group)
    if grad_scales:
        # a factor of exactly 1 (the norm within its limit) changes no bit: x * 1.0 == x
        scaled = [(p.grad, grad_scales[opt]) for opt, p, _ in entries if grad_scales.get(opt, 1.0) != 1.0]
        if scaled:
            torch._foreach_mul_(*(list(c) for c in zip(*scaled)))
    torch._foreach_add_([opt.state[p]["step"] for opt, p, _ in entries], 1)
    fused = [e for e in entries if e[2].get("fused")]
    for opt, group, part in _by_group(fused):
        states = [opt.state[p] for p in part]
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(part, [p.grad for p in part], [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], amsgrad=False,
                            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                            eps=group["eps"], maximize=False)
    _foreach_adamw([e for e in entries if not e[2].get("fused")])


def _step_size(opt: torch.optim.Optimizer, p: torch.Tensor, group: dict) -> float:
    """The coming step's -lr / bias_correction1 (the stored counter is a host tensor on the CPU and in
    torch's non-capturable foreach path: reading it is no device sync)."""
    state = opt.state.get(p, {})
    return _corrections(group, (state["step"].tolist() if "step" in state else 0.0) + 1)[0]


def _corrections(group: dict, n: float) -> tuple[float, float]:
    """(-lr / bias_correction1, sqrt(bias_correction2)) at step n, host arithmetic as torch's."""
    beta1, beta2 = group["betas"]
    return (group["lr"] / (1 - beta1**n)) * -1, (1 - beta2**n) ** 0.5


def _init_state(opt: torch.optim.Optimizer, p: torch.Tensor, group: dict) -> None:
    """A tensor's AdamW state, made lazily as torch.optim.AdamW._init_group does."""
    state = opt.state[p]
    if len(state) == 0:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device) if group.get("fused") \
            else torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _by_group(entries: list) -> list[tuple]:
    """(optimizer, group, its parameters with gradients) of each param group among `entries`."""
    out: dict[int, tuple] = {}
    for opt, p, group in entries:
        out.setdefault(id(group), (opt, group, []))[2].append(p)
    return list(out.values())


def _foreach_adamw(entries: list) -> None:
    """torch.optim.adamw._multi_tensor_adamw (non-capturable) over every task's tensors at once (the
    step counters are already incremented), each tensor's own scalars passed as lists: a ScalarList
    passes each tensor the value its task's Scalar would have been."""
    if not entries:
        return
    params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
    decay, lerp_weight, beta2s, one_minus_beta2, step_sizes, bc2_sqrt, eps = [], [], [], [], [], [], []
    for opt, p, group in entries:
        lr, (beta1, beta2) = group["lr"], group["betas"]
        state = opt.state[p]
        step_size, bias_correction2_sqrt = _corrections(group, state["step"].tolist())  # tolist: no aten op
        decay.append(1 - lr * group["weight_decay"])
        lerp_weight.append(1 - beta1)
        beta2s.append(beta2)
        one_minus_beta2.append(1 - beta2)
        step_sizes.append(step_size)
        bc2_sqrt.append(bias_correction2_sqrt)
        eps.append(group["eps"])
        params.append(p)
        grads.append(p.grad)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
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
    multiply for all tasks), take all their AdamW steps in one update (multi_tensor_adamw), then each task's own
    scheduler step and zero_grad. Returns the tasks whose step failed (name -> reason; e.g. an lr that
    overflows fp32): they were not stepped, the others were."""
    scales = {run.optimizer: factors[run.spec.name] for run in runs
              if run.spec.max_grad_norm is not None and run.spec.name in factors}
    failed = {}
    try:
        multi_tensor_adamw([run.optimizer for run in runs], scales)
        stepped = runs
    except OptimizerStepError:  # one task's values cannot be applied: step them one by one, fail that one
        stepped = []
        for run in runs:
            try:
                multi_tensor_adamw([run.optimizer], scales)
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
