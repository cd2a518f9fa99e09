"""The job trace of benchmarks/service.py and its replay in the cluster simulator (also used by the
capacity-planning notebook, which replays the last recorded run's trace beside its measured figures).

    trace = make_trace(jobs, rate_per_hour, seed)        seeded Poisson arrivals, a fine-tuning API's mix
    write_data(job, folder)                              the job's training file (JSONL prompt/completion)
    sim_jobs = simulator_jobs(trace, files, model)       the jobs as the simulator sees them (steps, lengths)
    overheads = fit_overheads(status, first_submit)      ServiceOverheads from a pilot's status.json
    simulate(sim_jobs, mode, cost_model, overheads, ...) the simulator's prediction for one service mode
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MODEL = "builtin:tiny-llama"
MEMORY_LIMIT_GIB = 4.0
MAX_TENANTS = 16  # the service's default; the dedicated mode runs max_tenants = 1
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "blue", "quiet", "north", "amber"]

# a fine-tuning API's load: many small jobs, a few long ones; (low, high) ranges are drawn uniformly
KINDS = [
    dict(kind="small lora", weight=0.40, peft={"method": "lora", "r": 8}, examples=(100, 300), words=(3, 10),
         batch=4, epochs=(1, 2)),
    dict(kind="lora r16", weight=0.20, peft={"method": "lora", "r": 16}, examples=(200, 400), words=(6, 16),
         batch=8, epochs=(1, 3)),
    dict(kind="ia3", weight=0.15, peft={"method": "ia3"}, examples=(150, 300), words=(3, 8), batch=8, epochs=(1, 2)),
    dict(kind="adapter", weight=0.10, peft={"method": "adapter", "size": 16}, examples=(100, 200), words=(4, 12),
         batch=4, epochs=(1, 2)),
    dict(kind="long lora", weight=0.15, peft={"method": "lora", "r": 32}, examples=(400, 600), words=(12, 32),
         batch=8, epochs=(2, 3)),
]
ORGS = ["acme", "globex", "initech"]


@dataclass(frozen=True)
class TraceJob:
    id: int
    arrival: float  # seconds after the trace starts
    org: str
    kind: str
    peft: dict
    examples: int
    words: tuple[int, int]
    batch: int
    epochs: int

    def request(self, model: str, training_file: str) -> dict:
        """The job as a client creates it (the openai client's fine_tuning.jobs.create keywords)."""
        return dict(model=model, training_file=training_file, seed=self.id,
                    hyperparameters={"n_epochs": self.epochs, "batch_size": self.batch},
                    extra_body={"peft": self.peft, "max_seq_len": 256})


def make_trace(jobs: int, rate_per_hour: float, seed: int = 0, scale: float = 1.0) -> list[TraceJob]:
    """`jobs` jobs with exponential inter-arrival times (a Poisson process), the first at time 0; `scale`
    shrinks every job's data (the smoke test's short jobs)."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(3600.0 / rate_per_hour, size=jobs)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    weights = np.array([k["weight"] for k in KINDS])
    trace = []
    for i, at in enumerate(arrivals):
        kind = KINDS[int(rng.choice(len(KINDS), p=weights / weights.sum()))]
        draw = lambda low_high: int(rng.integers(low_high[0], low_high[1] + 1))  # noqa: E731
        examples = max(kind["batch"], int(draw(kind["examples"]) * scale))
        trace.append(TraceJob(i, float(at), ORGS[i % len(ORGS)], kind["kind"], kind["peft"], examples,
                              kind["words"], kind["batch"], draw(kind["epochs"])))
    return trace


def write_data(job: TraceJob, folder: Path) -> Path:
    rng = random.Random(1000 + job.id)
    path = Path(folder) / f"job{job.id}.jsonl"
    with open(path, "w") as out:
        for _ in range(job.examples):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*job.words)))
            out.write(json.dumps({"prompt": text + " ->", "completion": " " + rng.choice(WORDS[:4])}) + "\n")
    return path


def task_spec(job: TraceJob, path: Path):
    """The TaskSpec the service makes of the job's request (muxtune/service/jobs.py build_spec)."""
    from muxtune.service.jobs import JobRequest, build_spec

    request = job.request(MODEL, "file-" + "0" * 24)
    extra = request.pop("extra_body")
    spec, _ = build_spec(f"job{job.id}", JobRequest.model_validate({**request, **extra}), path, None)
    return spec


def simulator_jobs(trace: list[TraceJob], files: dict[int, Path], model: str = MODEL) -> list[dict]:
    """Each job as the cluster simulator sees it: steps (what epochs make of its examples), rows per step,
    mean tokens per row (its examples tokenized as the worker loads them) and its adapter's parameters."""
    from muxtune.executor.backbone import load_backbone
    from muxtune.executor.validation import load_task_data
    from muxtune.simulator.workload import count_trainable_params

    backbone = load_backbone(model, device="cpu")
    rows = []
    for job in trace:
        spec = task_spec(job, files[job.id])
        examples, _, _ = load_task_data(spec, backbone.tokenizer, spec.name)
        steps = math.ceil(spec.epochs * len(examples) / spec.batch_size)
        mean_len = sum(len(e.input_ids) for e in examples) / len(examples)
        rank = getattr(spec.peft, "r", getattr(spec.peft, "size", 0))
        rows.append(dict(id=job.id, arrival=job.arrival, kind=job.kind, model=model, method=spec.peft.method,
                         rank=int(rank), batch=spec.batch_size, steps=steps,
                         data_tokens=int(round(steps * spec.batch_size * mean_len)),
                         params=count_trainable_params(spec, backbone.model)))
    return rows


def fit_overheads(status: dict, first_submit: float, submit_s: float = 0.0):
    """ServiceOverheads from a pilot's backbones/<model>/status.json (muxtune/service/timing.py):
    per-job and per-change means of the timed parts, and the per-step fixed cost fitted as a + b x jobs
    over the steps taken with 1, 2, ... jobs training; `submit_s` the pilot's mean upload + create time
    through the API; an idle worker's pick-up, half its idle poll."""
    from muxtune.service.worker import IDLE_POLL_S
    from muxtune.simulator.cluster import ServiceOverheads

    phases = status["phases"]

    def mean(name: str) -> float:
        entry = phases.get(name)
        return entry["seconds"] / entry["count"] if entry and entry["count"] else 0.0

    by_jobs = {int(n): e for n, e in status["steps_by_jobs"].items() if e["count"]}
    n = np.array(sorted(by_jobs), dtype=float)
    per_step = np.array([by_jobs[int(k)]["overhead_seconds"] / by_jobs[int(k)]["count"] for k in n])
    weights = np.sqrt([by_jobs[int(k)]["count"] for k in n])
    if len(n) >= 2:
        slope, fixed = np.polyfit(n, per_step, 1, w=weights)
    else:
        slope, fixed = 0.0, float(per_step[0]) if len(per_step) else 0.0
    return ServiceOverheads(start_s=max(0.0, status["ready_at"] - first_submit), validate_s=mean("validate"),
                            join_s=mean("join"), leave_s=mean("leave"), change_s=mean("change"),
                            step_s=max(0.0, float(fixed)), step_per_job_s=max(0.0, float(slope)),
                            submit_s=submit_s, pickup_s=IDLE_POLL_S / 2)


def planner_grouping(cost_model, memory_gib: float, time_limit: float):
    """The service's fusion groups for a set of simulator jobs: the planner (planner/plan.py) on one
    device, as the worker asks it at every join and leave (muxtune/service/planning.py); cached per
    set of job shapes."""
    from muxtune.planner.plan import plan as search
    from muxtune.spec import Cluster, TaskSpec

    cache: dict[tuple, list[list[int]]] = {}

    def group(jobs):
        key = tuple(sorted((j.id, j.shape_key) for j in jobs))
        if key not in cache:
            specs, lengths = [], {}
            for j in jobs:
                peft = {"method": j.method, **({"r": j.rank} if j.method in ("lora", "dora") else {}),
                        **({"size": j.rank} if j.method == "adapter" else {})}
                specs.append(TaskSpec(name=f"job{j.id}", data="trace.jsonl", peft=peft, steps=j.steps,
                                      batch_size=j.batch, max_seq_len=256))
                lengths[f"job{j.id}"] = j.seq_len
            result = search(specs, Cluster(devices=1, memory_gib=memory_gib, hardware="this"), cost_model,
                            time_limit=time_limit, params={f"job{j.id}": j.params for j in jobs}, seq_lens=lengths)
            cache[key] = [[int(name[3:]) for name in g.tasks] for g in result.plan.groups]
        by_id = {j.id: j for j in jobs}
        return [[by_id[i] for i in g] for g in cache[key]]
    return group


def simulate(rows: list[dict], mode: str, cost_model, overheads=None, memory_gib: float = MEMORY_LIMIT_GIB,
             plan_seconds: float | None = None):
    """The cluster simulator's prediction (one device) for the service in `mode`: "muxtune" (jobs fused
    on one backbone, up to MAX_TENANTS, grouped by the planner) or "dedicated" (one job at a time)."""
    from muxtune.service.planning import PLAN_SECONDS
    from muxtune.simulator.cluster import Job, Planned, simulate_cluster

    jobs = [Job(r["id"], r["arrival"], r["model"], r["method"], r["rank"], r["data_tokens"], r["batch"], r["steps"],
                r["params"]) for r in rows]
    if mode == "dedicated":  # the service's dedicated mode still packs its one job's rows (chunked alignment)
        policy = Planned(name="dedicated", max_tenants=1)
    else:
        group = planner_grouping(cost_model, memory_gib, PLAN_SECONDS if plan_seconds is None else plan_seconds)
        policy = Planned(group=group, max_tenants=MAX_TENANTS)
    return simulate_cluster(jobs, 1, policy, lambda _model: cost_model, int(memory_gib * 2**30), overheads)


def overheads_dict(overheads) -> dict:
    return {k: round(v, 5) for k, v in asdict(overheads).items()}
