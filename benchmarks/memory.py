"""The memory knobs (issue 25): what recomputation buys on this CPU, and what the knobs make fit on a cluster.

    python -m benchmarks.memory [--tenants 8] [--seq 1024] [--steps 2] [--profile CSV] [--skip-cluster]

1. This CPU, builtin:llama-100m, `--tenants` LoRA tenants of one `--seq`-token sequence each, fused in one
   micro-batch (padded layout with equal lengths: no padding, what the CostModel prices), trained once
   without and once with activation recomputation, each in a fresh process (peak RSS is a process's
   maximum). Measured per configuration: the peak RSS of the steps (VmHWM, reset after the trainer is
   built) above the RSS of the process before the backbone was loaded, the step time (median of `--steps` after a warm-up step). Predicted: the CostModel's peak
   (profiler/memory_knobs.peak_bytes: backbone + adapter states + the step's transient) and step time
   (memory_knobs.step_seconds), from a profile of this CPU (`--profile`, else a stored one that passes
   the calibration check, else measured now).
   Measured per configuration also the peak of its tensors alone: those resident as a step starts
   (weights, adapters, AdamW moments) + the most a step adds (profiler.probes.LiveBytes, as
   benchmarks.cost_model_accuracy measures CPU memory): what the CostModel prices, the CPU's stand-in
   for a GPU's allocated bytes. The workers run on the malloc the commands that train use
   (muxtune/allocator.py: tcmalloc where installed, whose peak RSS is the tensors' peak plus a few
   percent; glibc's keeps freed heap blocks, ~1.5x).
   Keys: recompute_memory_ratio (peak RSS without / with), tensor_recompute_memory_ratio (the tensors'),
   recompute_time_ratio (step with / without), predicted_* beside them, memory_prediction_error (the
   worst |predicted - measured| / measured peak RSS over both configurations; target <= 0.10) and
   tensor_prediction_error (the same against the tensors' peak); each row names its worker's malloc.
2. Analytic (no hardware needed): a Llama-3-8B shape (hidden 4096, 32 layers, 8 KV heads, vocab 128256)
   x 64 mixed tenants (examples/mixed_methods.yaml's methods, batch 4-32, lengths 256-2048, 50-200 steps,
   seeded) planned on 16 H100s with 80 GiB each, once without the memory knobs (`without_knobs`: each
   baseline's peak) and once with them. Keys: baselines_fit (every baseline fits with the memory knobs), plan_vs_best_baseline (the plan's simulated whole-job throughput / the best
   baseline's; target >= 1.3), and each plan's knobs.

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from muxtune import allocator

REPO = Path(__file__).resolve().parent.parent
MODEL = "builtin:llama-100m"
GIB = 2**30


def status_bytes(key: str) -> int:
    """VmRSS (resident now) or VmHWM (its peak since the last reset) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise SystemExit(f"benchmarks.memory: /proc/self/status has no {key} (Linux only)")


def reset_peak_rss() -> None:
    """Start the peak (VmHWM) again from the present RSS (Linux >= 4.0: clear_refs 5), so that loading the
    backbone (its initialisation holds the weights twice for a moment) is not the peak of the step."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(recompute: bool, tenants: int, seq: int, steps: int, model: str = MODEL) -> dict:
    """One configuration in this process (module docstring, part 1)."""
    import torch

    from muxtune.executor.backbone import load_backbone
    from muxtune.executor.data import Example
    from muxtune.executor.trainer import MultiplexedTrainer
    from muxtune.profiler.probes import LiveBytes
    from muxtune.spec import Alignment, TaskSpec

    torch.set_num_threads(1)
    before = status_bytes("VmRSS")  # the interpreter and its libraries: not the device memory the CostModel prices
    backbone = load_backbone(model)
    gen = random.Random(0)
    specs, examples = [], {}
    for i in range(tenants):
        specs.append(TaskSpec(name=f"t{i}", data="synthetic.jsonl", peft=dict(method="lora", r=8, alpha=16),
                              batch_size=1, max_seq_len=seq, steps=steps + 2, seed=i))
        ids = [gen.randrange(256) for _ in range(seq)]
        examples[f"t{i}"] = [Example(ids, list(ids))]
    trainer = MultiplexedTrainer(backbone, specs, examples, alignment=Alignment(layout="padded"),
                                 recompute=[recompute])
    times = []
    reset_peak_rss()
    for _ in range(steps + 1):
        start = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - start)
    rss_peak = status_bytes("VmHWM") - before
    # the tensors alone (what the CostModel prices, the CPU's stand-in for a GPU's allocated memory): those
    # resident as a step starts (weights, adapters, AdamW moments) + the most a step adds (profiler LiveBytes)
    resident = {}
    for run in trainer.runs.values():
        for p in run.parameters():
            resident[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
        for state in run.optimizer.state.values():
            for t in state.values():
                if torch.is_tensor(t):
                    resident[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for p in backbone.model.parameters():
        resident[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    with LiveBytes() as tally:  # an extra step: the tally's dispatch mode slows it, so it is not timed
        trainer.step()
    params = {name: sum(p.numel() for p in run.parameters()) for name, run in trainer.runs.items()}
    return {"recompute": recompute, "peak_bytes": rss_peak, "tensor_peak_bytes": sum(resident.values()) + tally.peak,
            "step_seconds": statistics.median(times[1:]), "shape": list(trainer.step_shapes[-1]), "params": params,
            "malloc": allocator.in_use()}


def measure(recompute: bool, args) -> dict:
    command = [sys.executable, "-m", "muxtune.benchmarks.memory", "--worker", str(int(recompute)),
               "--tenants", str(args.tenants), "--seq", str(args.seq), "--steps", str(args.steps), "--model", args.model]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=allocator.environment())
    if done.returncode != 0:
        raise SystemExit(f"benchmarks.memory: the worker (recompute={recompute}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cost_model(args):
    """The CostModel of this CPU (time and memory): `--profile` as it is, else a stored profile that
    passes the calibration check here, else one measured now (the quick grid's budget, LoRA on q/v only,
    its layer curves reaching this benchmark's fused batch), at the workers' one thread."""
    import torch

    from muxtune.profiler.cost_model import CostModel
    from muxtune.profiler.profile import load_or_profile

    if args.profile:
        return CostModel.from_profile(args.profile), args.profile
    torch.set_num_threads(1)  # the workers' thread count: part of the profile's fingerprint
    profile, path, reused = load_or_profile(args.model, "cpu", "quick", methods=["lora"], targets=["q_proj", "v_proj"],
                                            sizes=[(args.tenants * args.seq, args.seq)])
    return CostModel.from_profile(profile), f"{path} ({'stored, passed calibration' if reused else 'measured now'})"


def on_this_cpu(args) -> dict:
    from muxtune.profiler import memory_knobs
    from muxtune.profiler.cost_model import MicroBatch, TaskLoad

    runs = {on: measure(on, args) for on in (False, True)}
    cm, source = cost_model(args)
    loads = tuple(TaskLoad("lora", 8, args.seq, n, ("q_proj", "v_proj")) for n in runs[False]["params"].values())
    mb = MicroBatch(loads, args.seq)
    rows, errors, tensor_errors = [], [], []
    for on, run in runs.items():
        predicted = memory_knobs.peak_bytes(cm, [mb], on)
        seconds = memory_knobs.step_seconds(cm, [mb], on) if cm.profile is not None else None
        errors.append(abs(predicted - run["peak_bytes"]) / run["peak_bytes"])
        tensor_errors.append(abs(predicted - run["tensor_peak_bytes"]) / run["tensor_peak_bytes"])
        rows.append({"recompute": on, "malloc": run["malloc"], "peak_mib": run["peak_bytes"] / 2**20,
                     "tensor_peak_mib": run["tensor_peak_bytes"] / 2**20, "predicted_peak_mib": predicted / 2**20,
                     "step_s": run["step_seconds"], "predicted_step_s": seconds})
        print(f"recompute={on!s:5}: peak RSS {run['peak_bytes'] / 2**20:8.0f} MiB ({run['malloc']} malloc), tensors "
              f"{run['tensor_peak_bytes'] / 2**20:8.0f} MiB (predicted {predicted / 2**20:8.0f}),"
              f" step {run['step_seconds']:6.2f} s" + (f" (predicted {seconds:6.2f} s)" if seconds else ""), flush=True)
    plain, redo = rows
    return {"model": args.model, "tenants": args.tenants, "seq": args.seq, "priced_by": source, "rows": rows,
            "recompute_memory_ratio": plain["peak_mib"] / redo["peak_mib"],
            "predicted_recompute_memory_ratio": plain["predicted_peak_mib"] / redo["predicted_peak_mib"],
            "recompute_time_ratio": redo["step_s"] / plain["step_s"],
            "predicted_recompute_time_ratio": (redo["predicted_step_s"] / plain["predicted_step_s"]
                                               if plain["predicted_step_s"] else None),
            "tensor_recompute_memory_ratio": plain["tensor_peak_mib"] / redo["tensor_peak_mib"],
            "memory_prediction_error": max(errors), "tensor_prediction_error": max(tensor_errors)}


def llama3_8b_shape():
    from muxtune.profiler.cost_model import ModelShape

    return ModelShape(n_layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256,
                      dtype_bytes=2, gated_mlp=True)


def tenants(n: int = 64, seed: int = 25):
    from muxtune.spec import load_config

    base = load_config(REPO / "examples" / "mixed_methods.yaml").tasks
    rng = random.Random(seed)
    return [rng.choice(base).model_copy(update={"name": f"t{i}", "max_seq_len": rng.choice([256, 512, 1024, 2048]),
                                                 "batch_size": rng.choice([4, 8, 16, 32]), "steps": rng.randint(50, 200)})
            for i in range(n)]


def on_a_cluster(time_limit: float) -> dict:
    from muxtune.planner.plan import plan
    from muxtune.profiler import memory_knobs
    from muxtune.profiler.cost_model import CostModel
    from muxtune.spec import Cluster

    cm = CostModel.analytic("h100", llama3_8b_shape())
    cluster = Cluster(devices=16, memory_gib=80, hardware="h100")
    # first without the knobs (the planner's knob list emptied): what the baselines needed before
    settings, memory_knobs.KNOBS = memory_knobs.KNOBS, ((False, 1),)
    try:
        before = plan(tenants(), cluster, cm, time_limit=time_limit)
    finally:
        memory_knobs.KNOBS = settings
    print(before.table.to_string(index=False), flush=True)
    result = plan(tenants(), cluster, cm, time_limit=time_limit)
    print(result.table.to_string(index=False), flush=True)

    def knobs(candidate) -> dict:
        chosen = list(candidate.notes.get("knobs", {}).values())
        return {"groups": len(chosen), "recompute": sum(r for r, _ in chosen),
                "accumulation": sorted({k for _, k in chosen})}

    best = max(result.baselines, key=lambda b: b.throughput if b.fits else 0.0)
    return {"baselines_fit": all(b.fits for b in result.baselines),
            "plan_vs_best_baseline": result.chosen.throughput / best.throughput, "best_baseline": best.candidate.planner,
            "plan_knobs": knobs(result.chosen.candidate),
            "baselines": {b.candidate.planner: {"fits": b.fits, "peak_gib": b.peak_memory / GIB,
                                                "tokens_per_s": b.throughput, "knobs": knobs(b.candidate)}
                          for b in result.baselines},
            "plan_tokens_per_s": result.chosen.throughput, "plan_peak_gib": result.chosen.peak_memory / GIB,
            "without_knobs": {b.candidate.planner: {"fits": b.fits, "peak_gib": b.peak_memory / GIB}
                              for b in [before.chosen] + before.baselines}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL, help="part 1's backbone (a builtin preset)")
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024, help="tokens of each tenant's sequence")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after a warm-up)")
    parser.add_argument("--profile", help="a profile CSV of this CPU for the model, taken as it is")
    parser.add_argument("--time-limit", type=float, default=20.0, help="planner time limit of part 2 (s)")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-cluster", action="store_true")
    parser.add_argument("--worker", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        result = worker(bool(args.worker), args.tenants, args.seq, args.steps, args.model)
        print(json.dumps(result))
        return result
    print(f"benchmarks.memory: (1) {args.model}, {args.tenants} tenants x {args.seq} tokens on this CPU, without and "
          f"with recomputation, {args.steps + 1} steps each in its own process; (2) the analytic Llama-3-8B x 64 "
          f"tenants x 16 H100 plan ({args.time_limit:.0f} s planner limit); a few minutes, plus up to 3 min for a "
          f"profile of this CPU if no stored one passes its calibration check", flush=True)
    out = {}
    if not args.skip_cpu:
        out["cpu"] = on_this_cpu(args)
        out.update({k: out["cpu"][k] for k in ("recompute_memory_ratio", "recompute_time_ratio",
                                               "memory_prediction_error", "tensor_prediction_error")})
    if not args.skip_cluster:
        out["cluster"] = on_a_cluster(args.time_limit)
        out.update({k: out["cluster"][k] for k in ("baselines_fit", "plan_vs_best_baseline")})
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
