"""The simulator's two figures: how well it predicts the executor's step time, and how fast the
cluster-level simulation runs.

    python -m benchmarks.simulator [--quick] [--model builtin:llama-100m] [--device cpu]

1. Prediction error: the single-process executor trains examples/quickstart.yaml (one fusion group of
   all tasks, and one group per task) for a few steps; for every measured step after warm-up the
   iteration simulator predicts that step from the CostModel (`load_cost_model`: this device's
   profile), with each group's rows padded to the length the executor padded them to (the padded
   layout, which is exactly what that describes). `median_error` = median |predicted - measured| / measured.
2. Cluster speed: `--jobs` Poisson arrivals on `--gpus` H100s (analytic CostModel, LLaMA-7B-shaped
   jobs) under the muxtune policy; `cluster_sim_seconds` is the wall time of that one simulation
   (target <= 10 s for 1,000 jobs on 64).

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from muxtune import allocator

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"


def load_cost_model(model: str, device: str, profile: str | None = None, config=None):
    """The profiler's CostModel for `model` on `device`: `profile` (a CSV) if given, else a cached profile
    with this device's fingerprint, else a quick profile measured now (of what `config`'s tasks need,
    its layer rows reaching their step sizes, as plan-and-run measures one)."""
    from muxtune.profiler.cost_model import CostModel, cost_model_for
    from muxtune.run import profile_needs, profile_sizes

    if profile:
        return CostModel.from_profile(profile)
    if config is None:
        return cost_model_for(model, device)
    methods, targets = profile_needs(config)
    return cost_model_for(model, device, methods=methods, targets=targets or None, sizes=profile_sizes(config))


VALIDATION = {"validation_split": 0.2, "eval_every": 2}  # --validation: every task evaluated every 2nd step


def quickstart(model: str, device: str, steps: int, max_seq_len: int | None, validation: bool = False):
    from muxtune.spec import load_config

    config = load_config(QUICKSTART)
    # --max-seq-len keeps the shapes inside what a (quick) profile measured: interpolation, not extrapolation
    cap = lambda t: {"max_seq_len": min(t.max_seq_len, max_seq_len)} if max_seq_len else {}  # noqa: E731
    extra = VALIDATION if validation else {}
    return config.model_copy(update={"model": model, "devices": device, "tasks": [
        t.model_copy(update={"steps": steps, **cap(t), **extra}) for t in config.tasks]})


def padded_trainer(config, groups: list[list[str]]):
    """(trainer, plan, trainable params per task, validation examples per task) of `config` with these
    fusion groups, padded layout: rows x padded length is exactly what `task_work` describes to the
    simulator."""
    from muxtune.executor.trainer import MultiplexedTrainer
    from muxtune.run import prepare
    from muxtune.simulator.workload import count_trainable_params
    from muxtune.spec import Alignment, FusionGroup, Plan

    plan = Plan(groups=[FusionGroup(tasks=g, devices=config.device_list()[:1]) for g in groups],
                alignment=Alignment(layout="padded"))
    validation: dict = {}
    backbone, plan, examples, _ = prepare(config, plan, validation=validation)
    params = {t.name: count_trainable_params(t, backbone.model) for t in config.tasks}
    trainer = MultiplexedTrainer(backbone, config.tasks, examples, groups=[g.tasks for g in plan.groups],
                                 alignment=plan.alignment, validation=validation)
    return trainer, plan, params, validation


def prediction_errors(model: str, device: str, steps: int, warmup: int, max_seq_len: int | None = None,
                      profile: str | None = None, validation: bool = False) -> list[tuple[float, bool]]:
    """(relative error, evaluated) of the simulated step time against every measured executor step after
    warm-up. With `validation`, every task holds out 20% of its file and is evaluated every 2nd step: a
    step's measured time includes the fused evaluation after it (`trainer.step` runs it), and the
    simulator prices the same step with those tasks `evaluating`."""
    from dataclasses import replace

    from muxtune.profiler.profile import clock
    from muxtune.simulator.iteration import simulate_step
    from muxtune.simulator.workload import evaluation_schedule, task_work

    config = quickstart(model, device, steps, max_seq_len, validation)
    cost_model = load_cost_model(model, device, profile, config)
    names = [t.name for t in config.tasks]
    errors = []
    for groups in ([names], [[n] for n in names]):
        trainer, plan, params, held_out = padded_trainer(config, groups)
        for step in range(steps):
            start = clock()
            trainer.step()
            measured = clock() - start  # wall time, or CPU time with MUXTUNE_PROFILE_CLOCK=cpu (as the profile)
            shapes = trainer.step_shapes[-len(groups):]  # (rows, padded length) of each group this step
            if step < warmup:
                continue
            works = {}
            for group, (_, padded) in zip(groups, shapes):
                for name in group:
                    works[name] = task_work(config.task(name), params[name], mean_seq_len=padded)
                    if name in held_out:
                        task = config.task(name)
                        # padded layout: a validation row is as long as its task's longest (the
                        # executor pads each evaluation micro-batch to its longest row)
                        works[name] = replace(works[name], eval_sequences=len(held_out[name]),
                                              eval_every=task.eval_interval(task.steps),
                                              eval_seq_len=max(len(ex.input_ids) for ex in held_out[name]))
            due = dict(evaluation_schedule(works, {n: steps for n in names})).get(step + 1, ())
            predicted = simulate_step(plan, works, cost_model, evaluating=due).step_seconds
            errors.append((abs(predicted - measured) / measured, bool(due)))
            print(f"groups={len(groups)} step={step} shapes={shapes}{' +eval' if due else ''} "
                  f"predicted={predicted * 1e3:.1f} ms measured={measured * 1e3:.1f} ms error={errors[-1][0]:.1%}",
                  file=sys.stderr)
    return errors


# what the CostModel's step_breakdown terms price, per measured phase of a trainer step
PHASES = [("forward", ["fwd_backbone", "fwd_head", "fwd_tasks"]),
          ("  bare backbone + head forward, same batch", ["fwd_backbone", "fwd_head"]),
          ("  LM head + loss sums (trainer)", ["fwd_head"]),
          ("  adapters (forward - bare)", ["fwd_tasks"]),
          ("backward", ["bwd_backbone", "bwd_head", "bwd_tasks"]),
          ("  bare backbone + head backward, same batch", ["bwd_backbone", "bwd_head"]),
          ("  adapters (backward - bare)", ["bwd_tasks"]),
          ("grad norm + clip + AdamW + zero_grad", ["optimizer"]),
          ("draw + fuse + schedule + rest of step", ["host_tasks", "host_batch"]),
          ("whole step", None)]


def step_phases(model: str, device: str, steps: int, warmup: int, max_seq_len: int | None = None,
                profile: str | None = None) -> list[dict]:
    """The phases of real fused trainer steps of the quickstart's tasks (one group), beside their terms."""
    from muxtune.simulator.workload import split_micro_batches, task_work

    config = quickstart(model, device, steps, max_seq_len)
    cost_model = load_cost_model(model, device, profile, config)
    names = [t.name for t in config.tasks]
    trainer, _, params, _ = padded_trainer(config, [names])

    def micro_batch(seq):
        return split_micro_batches([task_work(config.task(n), params[n], mean_seq_len=seq) for n in names], 1)[0]
    return observe_phases(trainer, micro_batch, cost_model, device, steps, warmup)


def observe_phases(trainer, micro_batch, cost_model, device: str, steps: int, warmup: int) -> list[dict]:
    """Time the phases of `steps` real `trainer.step()`s (profiler.profile.observe_step) and set each
    beside the CostModel terms that price it (`micro_batch(seq_len)` -> the MicroBatch the CostModel
    prices for the step's shape). The bare backbone + head is run on each step's batch right after it
    (profiler.profile.bare_model_loss, what the `model` rows measure)."""
    import statistics

    from muxtune.profiler.profile import bare_model_loss, fwd_bwd_seconds, observe_step
    from muxtune.profiler.sampling import Sampling

    once = Sampling(warmup=0, least=1, most=1)
    measured: list[dict] = []
    for step in range(steps):
        spent = observe_step(trainer, device)
        batch = spent.pop("last_batch")
        forward, backward = fwd_bwd_seconds(
            lambda: bare_model_loss(trainer.model, batch.input_ids, batch.attention_mask), device, once)
        spent["bare_forward"], spent["bare_backward"] = forward.seconds, backward.seconds
        if step >= warmup:
            measured.append(dict(spent, shape=tuple(batch.input_ids.shape)))
    median = lambda key: statistics.median(m[key] for m in measured)  # noqa: E731
    seen = {"forward": median("forward"), "  bare backbone + head forward, same batch": median("bare_forward"),
            "  LM head + loss sums (trainer)": median("head"),
            "  adapters (forward - bare)": median("forward") - median("bare_forward"),
            "backward": median("backward"), "  bare backbone + head backward, same batch": median("bare_backward"),
            "  adapters (backward - bare)": median("backward") - median("bare_backward"),
            "grad norm + clip + AdamW + zero_grad": median("optimizer"),
            "draw + fuse + schedule + rest of step": median("host"), "whole step": median("step")}
    terms = cost_model.step_breakdown(micro_batch(measured[-1]["shape"][1]))
    table = []
    for label, keys in PHASES:
        predicted = sum(terms[k] for k in keys) if keys else sum(terms.values())
        table.append({"phase": label.strip(), "measured_ms": 1e3 * seen[label], "predicted_ms": 1e3 * predicted,
                      "terms": ", ".join(keys) if keys else "step_seconds"})
        print(f"{label:44s} measured {1e3 * seen[label]:8.2f} ms  predicted {1e3 * predicted:8.2f} ms  "
              f"({table[-1]['terms']})", file=sys.stderr)
    return table


def cluster_speed(jobs: int, gpus: int, rate_per_hour: float, cost_model) -> tuple[float, dict]:
    from muxtune.simulator.cluster import MuxTuneGreedy, poisson_jobs, simulate_cluster

    arrivals = poisson_jobs(jobs, rate_per_hour, "backbone", cost_model.shape, seed=0)
    started = time.perf_counter()
    result = simulate_cluster(arrivals, gpus, MuxTuneGreedy(), lambda _model: cost_model, 80 * 2**30)
    return time.perf_counter() - started, result.metrics


DEFAULT_STEPS = 8


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, 100 jobs on 8 GPUs")
    parser.add_argument("--model", default="builtin:llama-100m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps per arm (default {DEFAULT_STEPS}, fewer on a machine too slow for them in 20 min)")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="cap the quickstart tasks' max_seq_len (keep shapes inside the profile's range)")
    parser.add_argument("--profile", help="a profile CSV to use instead of the cache / a fresh measurement")
    parser.add_argument("--phases", action="store_true",
                        help="also time the phases of the fused steps beside the CostModel terms that price them")
    parser.add_argument("--rate", type=float, default=400.0, help="job arrivals per hour")
    parser.add_argument("--validation", action="store_true",
                        help="every task validates (20%% held out, evaluated every 2nd step): steps with the "
                             "fused evaluation are predicted too")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.jobs, args.gpus, args.rate = "builtin:tiny-llama", 3, 100, 8, 50.0
    import muxtune.spec  # noqa: F401  (import time is not simulation time)
    from muxtune.profiler.profile import DEFAULT_BUDGET

    from . import announce, default_steps, expected_seconds

    tasks = quickstart(args.model, args.device, 1, args.max_seq_len, args.validation).tasks
    step_tokens = sum(t.batch_size * t.max_seq_len for t in tasks)

    def passes(steps: int) -> list[tuple[float, int]]:
        # a step ~1.9 bare passes as the pilot prices them: adapters, and the pilot's line (measured at a
        # few hundred tokens) runs short at the 9216-token step (session 12, AMD EPYC: 101 s per step of both arms
        # against 26 s for a pass priced by the pilot)
        counted = [((2 + 2 * args.phases) * steps * 1.9, step_tokens)]
        if args.validation:  # an evaluation every 2nd step in each run: a forward (~half a pass) of the held-out rows
            from muxtune.run import validation_sequences

            held = sum(validation_sequences(t, None) * t.max_seq_len for t in tasks)
            counted.append((2 * (steps // VALIDATION["eval_every"]) * 0.5, held))
        return counted

    profile_budget = None if args.profile else DEFAULT_BUDGET["quick"]
    # at least 4: a warm-up and 3 predicted steps per arm
    args.steps = default_steps(args.steps, DEFAULT_STEPS, 4,
                               lambda n: expected_seconds(args.model, args.device, passes(n), 15), profile_budget or 0.0)
    announce("benchmarks.simulator", f"{args.steps} quickstart steps of {args.model} in 1 and in 4 fusion groups"
             f"{' (every task evaluated every 2nd step)' if args.validation else ''}, each predicted by the "
             f"simulator; then {args.jobs} jobs on {args.gpus} simulated GPUs",
             args.model, args.device, passes(args.steps), profile_budget, fixed_seconds=15)

    result: dict = {"model": args.model, "device": args.device}
    seen = prediction_errors(args.model, args.device, args.steps, warmup=1, max_seq_len=args.max_seq_len,
                             profile=args.profile, validation=args.validation)
    errors = [error for error, _ in seen]
    result.update(median_error=statistics.median(errors), max_error=max(errors), predicted_steps=len(errors))
    if args.validation:
        evaluated = [error for error, due in seen if due]
        result.update(validation=True, evaluated_steps=len(evaluated),
                      evaluated_median_error=statistics.median(evaluated) if evaluated else None)
    if args.phases:
        result["phases"] = step_phases(args.model, args.device, args.steps, warmup=1, max_seq_len=args.max_seq_len,
                                       profile=args.profile)
    # the cluster: GPUs we do not have, priced by the analytic cost model (LLaMA-7B-shaped jobs on H100s)
    from muxtune.profiler.cost_model import CostModel, llama_7b_shape

    cost_model, kind = CostModel.analytic("h100", llama_7b_shape()), "analytic h100, llama-7b shape"
    seconds, metrics = cluster_speed(args.jobs, args.gpus, args.rate, cost_model)
    result.update(cluster_sim_seconds=seconds, cluster_jobs=args.jobs, cluster_gpus=args.gpus,
                  cluster_cost_model=kind, cluster_metrics=metrics)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    allocator.reexec()  # train on the malloc the product trains on (muxtune/allocator.py)
    main()
