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

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"


def load_cost_model(model: str, device: str, profile: str | None = None):
    """The profiler's CostModel for `model` on `device`: `profile` (a CSV) if given, else a cached profile
    with this device's fingerprint, else a quick profile measured now."""
    from muxtune.profiler.cost_model import CostModel, cost_model_for

    return CostModel.from_profile(profile) if profile else cost_model_for(model, device)


def prediction_errors(model: str, device: str, steps: int, warmup: int, max_seq_len: int | None = None,
                      profile: str | None = None) -> list[float]:
    """Relative error of the simulated step time against every measured executor step after warm-up."""
    from muxtune.executor.trainer import MultiplexedTrainer
    from muxtune.profiler.profile import clock
    from muxtune.run import prepare
    from muxtune.simulator.iteration import simulate_step
    from muxtune.simulator.workload import count_trainable_params, task_work
    from muxtune.spec import Alignment, FusionGroup, Plan, load_config

    config = load_config(QUICKSTART)
    # --max-seq-len keeps the shapes inside what a (quick) profile measured: interpolation, not extrapolation
    cap = lambda t: {"max_seq_len": min(t.max_seq_len, max_seq_len)} if max_seq_len else {}  # noqa: E731
    config = config.model_copy(update={"model": model, "devices": device,
                                       "tasks": [t.model_copy(update={"steps": steps, **cap(t)}) for t in config.tasks]})
    cost_model = load_cost_model(model, device, profile)
    names = [t.name for t in config.tasks]
    errors = []
    for groups in ([names], [[n] for n in names]):
        # the padded layout: rows x padded length is exactly what `task_work` describes to the simulator
        plan = Plan(groups=[FusionGroup(tasks=g, devices=config.device_list()[:1]) for g in groups],
                    alignment=Alignment(layout="padded"))
        backbone, plan, examples, _ = prepare(config, plan)
        params = {t.name: count_trainable_params(t, backbone.model) for t in config.tasks}
        trainer = MultiplexedTrainer(backbone, config.tasks, examples, groups=[g.tasks for g in plan.groups],
                                     alignment=plan.alignment)
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
            predicted = simulate_step(plan, works, cost_model).step_seconds
            errors.append(abs(predicted - measured) / measured)
            print(f"groups={len(groups)} step={step} shapes={shapes} predicted={predicted * 1e3:.1f} ms "
                  f"measured={measured * 1e3:.1f} ms error={errors[-1]:.1%}", file=sys.stderr)
    return errors


def cluster_speed(jobs: int, gpus: int, rate_per_hour: float, cost_model) -> tuple[float, dict]:
    from muxtune.simulator.cluster import MuxTuneGreedy, poisson_jobs, simulate_cluster

    arrivals = poisson_jobs(jobs, rate_per_hour, "backbone", cost_model.shape, seed=0)
    started = time.perf_counter()
    result = simulate_cluster(arrivals, gpus, MuxTuneGreedy(), lambda _model: cost_model, 80 * 2**30)
    return time.perf_counter() - started, result.metrics


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, 100 jobs on 8 GPUs")
    parser.add_argument("--model", default="builtin:llama-100m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="cap the quickstart tasks' max_seq_len (keep shapes inside the profile's range)")
    parser.add_argument("--profile", help="a profile CSV to use instead of the cache / a fresh measurement")
    parser.add_argument("--rate", type=float, default=400.0, help="job arrivals per hour")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.jobs, args.gpus, args.rate = "builtin:tiny-llama", 3, 100, 8, 50.0
    import muxtune.spec  # noqa: F401  (import time is not simulation time)

    result: dict = {"model": args.model, "device": args.device}
    errors = prediction_errors(args.model, args.device, args.steps, warmup=1, max_seq_len=args.max_seq_len,
                               profile=args.profile)
    result.update(median_error=statistics.median(errors), max_error=max(errors), predicted_steps=len(errors))
    # the cluster: GPUs we do not have, priced by the analytic cost model (LLaMA-7B-shaped jobs on H100s)
    from muxtune.profiler.cost_model import CostModel, llama_7b_shape

    cost_model, kind = CostModel.analytic("h100", llama_7b_shape()), "analytic h100, llama-7b shape"
    seconds, metrics = cluster_speed(args.jobs, args.gpus, args.rate, cost_model)
    result.update(cluster_sim_seconds=seconds, cluster_jobs=args.jobs, cluster_gpus=args.gpus,
                  cluster_cost_model=kind, cluster_metrics=metrics)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
