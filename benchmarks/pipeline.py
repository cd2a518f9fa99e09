"""Temporal multiplexing on a 2-stage pipeline: bubbles and throughput of three ways to run the same tasks.

    python -m benchmarks.pipeline [--quick] [--devices cpu|cuda] [--model builtin:llama-100m] [--steps 6]

The tasks of examples/quickstart.yaml train on 2 processes (gloo on CPU; NCCL on 2 GPUs; a single GPU
runs 1 process, pp=1, where there are no pipeline bubbles to fill), each a pipeline stage:
  (1) dedicated  one fusion group per task, each its own 1F1B with a flush (no multiplexing);
  (2) fused_1f1b all tasks in one fusion group, 1F1B over its micro-batches;
  (3) muxtune    two fusion groups whose micro-batches alternate in one 1F1B (Plan.schedule
                 "interleaved"): one group's work fills the other's pipeline bubbles.
Each group's step is cut into --micro-batches micro-batches. Figures exclude the first (warm-up) step:
bubble fraction = 1 - compute time / wall time on a stage (worst stage), tokens/s = real tokens per
second of wall time. `sim_error`: the simulator's error on the step time (simulator.simulate_step with
the profiler's CostModel for the same plan), the worst of the three plans. Honest by construction: each
measured step after the warm-up is simulated with that step's own shapes (each task's computed tokens,
chunk padding included) and compared with that step's measured time (the slowest process); a plan's
figure is the median of its steps' |predicted - measured| / measured. On CPU the profile is taken at the
thread count each process trains with (cores / processes), so the ops are priced as they run.

A fourth arm, `tensor_parallel`, runs all tasks in one group split by tensor parallelism over the same
2 processes (Layout tp=2: each process holds half of every projection, 2 all-reduces per layer forward
and up to 5 backward) and reports its measured step and the simulator's error on it as `tp_sim_error`
(priced at the same thread count; `tp_profile_measured` says whether the profile has measured
`tp_layer` rows for tp=2 or the CostModel fell back to the whole layer / 2). LLaMA-family models and
2 devices only (the executor's limits); otherwise `tp_sim_error` is null with `tp_skipped` saying why.

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from muxtune import allocator

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"


def two_groups(tasks) -> list[list[str]]:
    """Split the tasks into two groups of about equal tokens per step (largest first to the lighter)."""
    groups, load = [[], []], [0, 0]
    for task in sorted(tasks, key=lambda t: -t.batch_size * t.max_seq_len):
        lighter = load.index(min(load))
        groups[lighter].append(task.name)
        load[lighter] += task.batch_size * task.max_seq_len
    return [g for g in groups if g]


def plans(config, devices: list[str], micro_batches: int) -> dict:
    from muxtune.spec import FusionGroup, Layout, Plan

    layout = Layout(pp=len(devices))

    def plan(groups, schedule):
        return Plan(planner="benchmark", schedule=schedule,
                    groups=[FusionGroup(tasks=g, devices=devices, layout=layout, micro_batches=micro_batches)
                            for g in groups])

    names = [t.name for t in config.tasks]
    return {"dedicated": plan([[n] for n in names], "1f1b"),
            "fused_1f1b": plan([names], "1f1b"),
            "muxtune": plan(two_groups(config.tasks), "interleaved")}


def tensor_parallel_plan(config, devices: list[str], micro_batches: int):
    """All tasks in one group, its stage split over the devices by tensor parallelism."""
    from muxtune.spec import FusionGroup, Layout, Plan

    return Plan(planner="benchmark", schedule="1f1b", groups=[FusionGroup(
        tasks=[t.name for t in config.tasks], devices=devices, layout=Layout(tp=len(devices)), micro_batches=micro_batches)])


def measure(config, plan, warmup: int) -> dict:
    from muxtune.run import execute

    metrics = execute(config, None, plan=plan, progress=False)
    dist = metrics["distributed"]
    times = metrics["step_time_s"][warmup:]
    tokens = dist["step_tokens"][warmup:]
    return {"step_s": statistics.median(times), "tokens_per_s": sum(tokens) / sum(times),
            "bubble_fraction": max(dist["bubble_fraction"].values()), "metrics": metrics}


def sim_error(config, plan, measured: dict, warmup: int) -> dict:
    """Per measured step after `warmup`: the simulated step time for that step's shapes; raises
    ImportError without the profiler."""
    from .simulator import load_cost_model
    from muxtune.simulator.iteration import simulate_step
    from muxtune.simulator.workload import task_work

    device = plan.groups[0].devices[0]
    cost_model = load_cost_model(config.model, "cpu" if device == "cpu" else device, config=config)
    metrics = measured["metrics"]
    specs = {t.name: t for t in config.tasks}
    predicted, errors = [], []
    for measured_s, computed in list(zip(metrics["step_time_s"], metrics["distributed"]["task_computed_tokens"]))[warmup:]:
        works = {name: task_work(specs[name], metrics["tasks"][name]["trainable_params"],
                                 mean_seq_len=tokens / specs[name].batch_size) for name, tokens in computed.items()}
        step_plan = plan.model_copy(update={"groups": [g.model_copy(update={"tasks": [n for n in g.tasks if n in works]})
                                                       for g in plan.groups if any(n in works for n in g.tasks)]})
        predicted.append(simulate_step(step_plan, works, cost_model, packed=True).step_seconds)
        errors.append(abs(predicted[-1] - measured_s) / measured_s)
    return {"predicted_step_s": statistics.median(predicted), "error": statistics.median(errors)}


DEFAULT_STEPS = 6


def main(argv: list[str] | None = None) -> dict:
    from muxtune.spec import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps, short sequences")
    parser.add_argument("--devices", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default="builtin:llama-100m")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps per plan (default {DEFAULT_STEPS}, fewer on a machine too slow for them in 20 min)")
    parser.add_argument("--micro-batches", type=int, default=2)
    args = parser.parse_args(argv)
    max_len = None
    if args.quick:
        args.model, args.steps, max_len = "builtin:tiny-llama", 2, 64
    import torch

    if args.devices == "cuda":
        devices = [f"cuda:{i}" for i in range(min(2, torch.cuda.device_count()))]
    else:
        devices = ["cpu", "cpu"]
    from muxtune.profiler.profile import DEFAULT_BUDGET

    from . import announce, default_steps, expected_seconds

    config = load_config(QUICKSTART)
    step_tokens = sum(t.batch_size * min(t.max_seq_len, max_len or t.max_seq_len) for t in config.tasks)
    device = "cpu" if args.devices == "cpu" else devices[0]
    # 4 arms, a step ~1.4 bare passes as the pilot prices them (session 12, AMD EPYC: the arms took 19 min
    # for 6 steps where 0.85 passes predicted 10.5; the 2 stages compute at once, but each on 1 thread)
    passes = lambda steps: [(4 * steps * 1.4, step_tokens)]  # noqa: E731
    # at least 3: a warm-up and 2 simulated steps per arm
    args.steps = default_steps(args.steps, DEFAULT_STEPS, 3, lambda n: expected_seconds(args.model, device, passes(n), 4 * 20),
                               DEFAULT_BUDGET["quick"])
    tasks = [t.model_copy(update={"steps": args.steps, "max_seq_len": min(t.max_seq_len, max_len or t.max_seq_len)})
             for t in config.tasks]
    config = config.model_copy(update={"model": args.model, "tasks": tasks,
                                       "devices": "cpu" if args.devices == "cpu" else "cuda"})
    warmup = 1 if args.steps > 1 else 0
    announce("benchmarks.pipeline", f"{args.steps} steps of {args.model} on a 2-process pipeline in 3 plans "
             "(dedicated, fused 1F1B, interleaved) and tensor parallel, each step predicted by the simulator",
             args.model, device, passes(args.steps), DEFAULT_BUDGET["quick"], fixed_seconds=4 * 20)
    results = {name: measure(config, plan, warmup) for name, plan in plans(config, devices, args.micro_batches).items()}
    tp_plan, tp_skipped = tensor_parallel_plan(config, devices, args.micro_batches), None
    if len(devices) < 2:
        tp_skipped = "tensor parallelism needs 2 devices"
    else:
        from muxtune.executor.tensor_parallel import FAMILIES
        from muxtune.planning import model_shape

        if not model_shape(config).gated_mlp:
            tp_skipped = f"tensor parallelism is implemented for {list(FAMILIES)} models only"
    tp = None if tp_skipped else measure(config, tp_plan, warmup)
    threads = torch.get_num_threads()
    if args.devices == "cpu":  # price the ops at the thread count each training process ran with
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(devices)))
    errors = {}
    try:
        for name, plan in plans(config, devices, args.micro_batches).items():
            try:
                predicted = sim_error(config, plan, results[name], warmup)
                errors[name] = predicted["error"]
                results[name]["predicted_step_s"] = predicted["predicted_step_s"]
            except ImportError as exc:
                errors[name], reason = None, f"no CostModel ({exc})"
        if tp is not None:
            predicted = sim_error(config, tp_plan, tp, warmup)
            tp["sim_error"], tp["predicted_step_s"] = predicted["error"], predicted["predicted_step_s"]
            from .simulator import load_cost_model

            rows = load_cost_model(config.model, "cpu" if devices[0] == "cpu" else devices[0],
                                   config=config).profile.rows("tp_layer")
            tp["profile_measured"] = bool(not rows.empty and (rows["world"] == len(devices)).any())
    finally:
        torch.set_num_threads(threads)
    summary = {name: {k: v for k, v in r.items() if k != "metrics"} for name, r in results.items()}
    for name, row in summary.items():
        print(f"{name:>11}: step {row['step_s']:.3f} s, {row['tokens_per_s']:.0f} tokens/s, "
              f"bubble {100 * row['bubble_fraction']:.1f}%, sim error {errors[name]}")
    known = [e for e in errors.values() if e is not None]
    result = {
        "model": args.model, "devices": devices, "processes": len(devices), "steps": args.steps,
        "micro_batches": args.micro_batches, "variants": summary,
        "speedup_vs_1f1b": summary["muxtune"]["tokens_per_s"] / summary["fused_1f1b"]["tokens_per_s"],
        "speedup_vs_dedicated": summary["muxtune"]["tokens_per_s"] / summary["dedicated"]["tokens_per_s"],
        "sim_error": max(known) if known else None,
        "sim_errors": errors,
        "tensor_parallel": None if tp is None else {k: v for k, v in tp.items() if k != "metrics"},
        "tp_sim_error": None if tp is None else tp["sim_error"],
        "tp_profile_measured": None if tp is None else tp["profile_measured"],
    }
    if tp is None:
        result["tp_skipped"] = tp_skipped
    else:
        print(f"tensor_parallel (tp={len(devices)}): step {tp['step_s']:.3f} s, {tp['tokens_per_s']:.0f} tokens/s, "
              f"predicted {tp['predicted_step_s']:.3f} s, sim error {tp['sim_error']:.3f}")
    if not known:
        result["sim_error_reason"] = reason
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    allocator.reexec()  # train on the malloc the product trains on (muxtune/allocator.py)
    main()
