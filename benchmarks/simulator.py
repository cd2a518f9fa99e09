"""The simulator's two figures: how well it predicts the executor's step time, and how fast the
cluster-level simulation runs.

    python -m benchmarks.simulator [--quick] [--model builtin:llama-100m] [--device cpu]

1. Prediction error: the single-process executor trains examples/quickstart.yaml (one fusion group of
   all tasks, and one group per task) for a few steps; for every measured step after warm-up the
   iteration simulator predicts that step from the CostModel, with each group's rows padded to the
   length the executor padded them to. `median_error` = median |predicted - measured| / measured.
   Needs the profiler's CostModel (issue 5) through `load_cost_model`; until it is merged the figure
   is null and `error_reason` says why.
2. Cluster speed: `--jobs` Poisson arrivals on `--gpus` GPUs under the muxtune policy;
   `cluster_sim_seconds` is the wall time of that one simulation (target <= 10 s for 1,000 jobs on 64).

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"


def load_cost_model(model: str, device: str):
    """The profiler's CostModel for `model` on `device` (imported lazily: issue 5 provides it).
    Lead: adapt this one call to the profiler's constructor when merging."""
    from muxtune.profiler.cost_model import CostModel

    return CostModel.from_profile(model, device)


def prediction_errors(model: str, device: str, steps: int, warmup: int) -> list[float]:
    """Relative error of the simulated step time against every measured executor step after warm-up."""
    from muxtune.executor.trainer import MultiplexedTrainer
    from muxtune.run import prepare
    from muxtune.simulator.iteration import simulate_step
    from muxtune.simulator.workload import count_trainable_params, task_work
    from muxtune.spec import FusionGroup, Plan, load_config

    config = load_config(QUICKSTART)
    config = config.model_copy(update={"model": model, "devices": device,
                                       "tasks": [t.model_copy(update={"steps": steps}) for t in config.tasks]})
    cost_model = load_cost_model(model, device)
    names = [t.name for t in config.tasks]
    errors = []
    for groups in ([names], [[n] for n in names]):
        plan = Plan(groups=[FusionGroup(tasks=g, devices=config.device_list()[:1]) for g in groups])
        backbone, plan, examples, _ = prepare(config, plan)
        params = {t.name: count_trainable_params(t, backbone.model) for t in config.tasks}
        trainer = MultiplexedTrainer(backbone, config.tasks, examples, groups=[g.tasks for g in plan.groups])
        for step in range(steps):
            trainer.step()
            shapes = trainer.step_shapes[-len(groups):]  # (rows, padded length) of each group this step
            if step < warmup:
                continue
            works = {}
            for group, (_, padded) in zip(groups, shapes):
                for name in group:
                    works[name] = task_work(config.task(name), params[name], mean_seq_len=padded)
            predicted = simulate_step(plan, works, cost_model).step_seconds
            measured = trainer.step_times[-1]
            errors.append(abs(predicted - measured) / measured)
    return errors


@dataclass
class _StandInCostModel:
    """Stand-in used ONLY to time the cluster simulation while the profiler's CostModel is not merged
    (reported as cost_model="stand-in"); the simulation's speed does not depend on the numbers.
    TODO(merge issue 5): delete; use load_cost_model for the cluster part too."""

    @dataclass(frozen=True)
    class Shape:
        n_layers: int = 32
        hidden: int = 4096
        intermediate: int = 11008
        heads: int = 32
        kv_heads: int = 32
        vocab: int = 32000
        dtype_bytes: int = 2

    shape: Shape = Shape()
    device: str = "stand-in"

    def forward_seconds(self, mb, layers, first=False, last=False):
        return layers * (4e-3 + 2e-6 * mb.tokens)

    def backward_seconds(self, mb, layers, first=False, last=False):
        return 2 * self.forward_seconds(mb, layers, first, last)

    def optimizer_seconds(self, params):
        return 1e-3

    def p2p_seconds(self, nbytes):
        return 1e-5 + nbytes / 50e9

    def allreduce_seconds(self, nbytes, world):
        return 0.0 if world == 1 else 2e-5 + 2 * nbytes / 100e9

    def boundary_bytes(self, mb):
        return mb.tokens * self.shape.hidden * self.shape.dtype_bytes

    def activation_bytes(self, mb, layers):
        return 40_000 * mb.tokens * layers

    def backbone_bytes(self, layers, first=False, last=False):
        return 400_000_000 * layers

    def task_state_bytes(self, params):
        return 16 * params

    def step_seconds(self, groups):
        n = self.shape.n_layers
        return sum(3 * self.forward_seconds(mb, n) for mb in groups) + sum(
            self.optimizer_seconds(t.params) for mb in groups for t in mb.tasks)


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
    parser.add_argument("--rate", type=float, default=400.0, help="job arrivals per hour")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.jobs, args.gpus, args.rate = "builtin:tiny-llama", 3, 100, 8, 50.0
    import muxtune.spec  # noqa: F401  (import time is not simulation time)

    result: dict = {"model": args.model, "device": args.device}
    try:
        errors = prediction_errors(args.model, args.device, args.steps, warmup=1)
        result.update(median_error=statistics.median(errors), max_error=max(errors), predicted_steps=len(errors))
    except ImportError as exc:
        result.update(median_error=None, error_reason=f"no CostModel yet ({exc})")
    try:
        cost_model, kind = load_cost_model(args.model, args.device), "profiler"
    except ImportError:
        cost_model, kind = _StandInCostModel(), "stand-in"
    seconds, metrics = cluster_speed(args.jobs, args.gpus, args.rate, cost_model)
    result.update(cluster_sim_seconds=seconds, cluster_jobs=args.jobs, cluster_gpus=args.gpus,
                  cluster_cost_model=kind, cluster_metrics=metrics)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
