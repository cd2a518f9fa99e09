"""Faults: a long multiplexed run killed with SIGKILL at random steps and resumed each time, with one
poisoned tenant (its learning rate overflows its adapter to NaN) among healthy ones.

    python -m benchmarks.faults [--quick] [--plan single|pp2] [--kills 5] [--steps 120] [--every 10]
                                [--tasks 5] [--seed 0]

Three runs of the same tenants on builtin:tiny-llama, CPU, one thread per process (so results are
bit-reproducible):
  reference   the healthy tenants only, never interrupted;
  clean       healthy + poisoned, never interrupted;
  faulty      healthy + poisoned, `muxtune run` in a subprocess (its own session) killed with SIGKILL
              `--kills` times at random steps (the whole process group: launcher and workers at once, as
              a lost machine), each time restarted with `--resume`.
`--plan single` (default): one process (reference and clean run in this process). `--plan pp2`: every
run is a 2-stage pipeline, 2 processes (gloo), the tenants in two fusion groups interleaved, 2
micro-batches each; the faulty run's kills take down both stages.
Figures (the last printed line is one JSON object):
  max_steps_lost        over all kills: steps the killed process had completed minus the step its
                        resume started from (target: <= checkpoint_interval)
  checkpoint_interval   the config's checkpoint_every
  tasks_affected        healthy tenants whose loss curve or adapter differs from the reference run
                        beyond float rounding (target: 0)
  resume_identical      the faulty run's adapters and loss curves equal the clean run's bit for bit
  poisoned_status       the poisoned tenant's status and the step it was stopped at
  layout, processes     which plan the runs used ("single" / "pp2") and its process count
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
FILES = ["sentiment.jsonl", "qa.jsonl", "chat.jsonl", "summarization.jsonl"]
METHODS = [{"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1}, {"method": "ia3"},
           {"method": "prompt", "num_virtual_tokens": 4}, {"method": "dora", "r": 4}, {"method": "bitfit"}]


def write_config(path: Path, tasks: int, steps: int, every: int, poisoned: bool) -> Path:
    lines = [f"name: faults\nmodel: builtin:tiny-llama\ncheckpoint_every: {every}\ntasks:"]
    for i in range(tasks):
        peft = json.dumps(METHODS[i % len(METHODS)])
        lines.append(f"  - {{name: t{i}, data: {DATA / FILES[i % len(FILES)]}, peft: {peft}, batch_size: {2 + i % 3},"
                     f" max_seq_len: 96, lr: 2.0e-3, steps: {steps - 3 * i}, seed: {i}, lr_schedule: cosine}}")
    if poisoned:  # an lr whose first AdamW step overflows the LoRA weights: NaN loss a step or two later
        lines.append(f"  - {{name: poisoned, data: {DATA / 'sentiment.jsonl'}, peft: {{method: lora, r: 4}},"
                     f" batch_size: 2, max_seq_len: 64, lr: 3.0e+37, max_grad_norm: null, steps: {steps}, seed: 99}}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plan(path: Path, config: Path) -> Path:
    """A 2-stage pipeline plan (2 processes on this CPU) of the config's tasks: two fusion groups
    (alternate tasks), interleaved in one 1F1B, 2 micro-batches each."""
    from muxtune.spec import Alignment, FusionGroup, Layout, Plan, load_config

    names = [t.name for t in load_config(config).tasks]
    groups = [names[0::2], names[1::2]]
    plan = Plan(groups=[FusionGroup(tasks=g, devices=["cpu", "cpu"], layout=Layout(pp=2), micro_batches=2)
                        for g in groups if g], schedule="interleaved", alignment=Alignment(chunk_len=16))
    plan.save(path)
    return path


def run_with_kills(config: Path, out: Path, kills: int, rng: random.Random, total_steps: int,
                   plan: Path | None = None) -> list[dict]:
    """Run to completion in a subprocess; SIGKILL its process group when it reports each of `kills`
    random steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    records, resume = [], False
    targets = sorted(rng.sample(range(1, total_steps - 1), kills))  # kill points spread over the run
    for attempt in range(kills + 1):
        command = [sys.executable, "-m", "muxtune.benchmarks._faults_worker", str(config), str(out)] + \
            (["--plan", str(plan)] if plan else []) + (["--resume"] if resume else [])
        # its own session: the SIGKILL reaches the launcher and every worker process at once
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        start_step = int(proc.stdout.readline().split()[1])  # "start N": the step it resumed from
        target = max(targets[attempt], start_step + 1) if attempt < kills else None
        last = start_step
        for line in proc.stdout:
            if line.startswith("step "):
                last = int(line.split()[1])
                if target is not None and last >= target:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
        proc.wait()
        if target is None:
            if proc.returncode != 0:
                raise RuntimeError(f"the final resume failed: {proc.stderr.read()}")
            return records
        manifest = out / "checkpoints" / "manifest.json"
        resume = manifest.exists()  # killed before its first checkpoint: it starts over
        records.append({"killed_after_step": last,
                        "resumed_from": json.loads(manifest.read_text())["steps"] if resume else 0})
    return records


def run_in_process(config: Path, out: Path, plan: Path | None = None) -> dict:
    """An uninterrupted run (a multi-process plan's processes are spawned from here)."""
    from muxtune.run import execute
    from muxtune.spec import Plan, load_config

    return execute(load_config(config), out, plan=Plan.load(plan) if plan else None, progress=False)


def adapters(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.name: load_file(str(p)) for p in (out / "adapters").glob("*/adapter_model.safetensors")}


def same(a: dict, b: dict, exact: bool) -> bool:
    if set(a) != set(b):
        return False
    if exact:
        return all(torch.equal(a[k], b[k]) for k in a)
    return all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 tenants, 24 steps, 2 kills (a smoke run)")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=10, help="checkpoint_every")
    parser.add_argument("--tasks", type=int, default=5, help="healthy tenants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan", choices=["single", "pp2"], default="single",
                        help="one process, or a 2-stage pipeline of 2 processes (default single)")
    args = parser.parse_args(argv)
    if args.quick:
        args.kills, args.steps, args.every, args.tasks = 2, 24, 4, 3
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="muxtune-faults-") as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("MUXTUNE_CACHE", str(tmp / "cache"))
        healthy = write_config(tmp / "healthy.yaml", args.tasks, args.steps, args.every, poisoned=False)
        faulty = write_config(tmp / "faulty.yaml", args.tasks, args.steps, args.every, poisoned=True)
        healthy_plan = faulty_plan = None
        if args.plan == "pp2":
            healthy_plan = write_plan(tmp / "healthy-plan.json", healthy)
            faulty_plan = write_plan(tmp / "faulty-plan.json", faulty)
        reference = run_in_process(healthy, tmp / "reference", healthy_plan)
        clean = run_in_process(faulty, tmp / "clean", faulty_plan)
        started = time.perf_counter()
        kills = run_with_kills(faulty, tmp / "faulty", args.kills, rng, args.steps, faulty_plan)
        faulty_seconds = time.perf_counter() - started
        result_metrics = json.loads((tmp / "faulty" / "metrics.json").read_text())

        ref_adapters, clean_adapters, faulty_adapters = (adapters(tmp / d) for d in ("reference", "clean", "faulty"))
        affected = []
        for name, task in reference["tasks"].items():
            got = result_metrics["tasks"][name]
            curve_ok = torch.allclose(torch.tensor(got["loss"]), torch.tensor(task["loss"]), rtol=1e-5, atol=1e-6)
            if got["status"] != "finished" or not curve_ok or not same(faulty_adapters[name], ref_adapters[name], False):
                affected.append(name)
        identical = all(result_metrics["tasks"][n]["loss"] == t["loss"] for n, t in clean["tasks"].items()) and \
            all(same(faulty_adapters[n], clean_adapters[n], True) for n in clean_adapters)
        poisoned = result_metrics["tasks"]["poisoned"]
    lost = [max(0, k["killed_after_step"] - k["resumed_from"]) for k in kills]
    result = {
        "max_steps_lost": max(lost, default=0),
        "checkpoint_interval": args.every,
        "tasks_affected": len(affected),
        "affected": affected,
        "kills": len(kills),
        "steps_lost": lost,
        "kill_points": kills,
        "resume_identical": identical,
        "poisoned_status": poisoned["status"],
        "poisoned_stopped_at": poisoned["stopped_at_step"],
        "poisoned_reason": poisoned["reason"],
        "healthy_tasks": args.tasks,
        "steps": args.steps,
        "faulty_run_seconds": round(faulty_seconds, 1),
        "layout": args.plan,
        "processes": 2 if args.plan == "pp2" else 1,
    }
    print(f"[{args.plan}] {len(kills)} kills, steps lost per kill {lost} (checkpoint every {args.every}); "
          f"poisoned tenant {poisoned['status']} at step {poisoned['stopped_at_step']}; "
          f"healthy tenants affected: {len(affected)}; resume bit-identical: {identical}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
