"""Cluster level: tenant jobs arrive over time on G GPUs of one hardware type; a policy places them.
Answers "how long do jobs wait and take, how busy are the GPUs, how many GPUs does this load need?".

Event-driven at job granularity (SimPy): the only events are arrivals and completions, never training
steps. An instance (a set of GPUs running one backbone) advances all its jobs by one step per instance
step; whenever its members change, the policy re-arranges it (fusion groups) and its step time is
re-priced, and every job's progress so far is kept. Step time and memory come from the CostModel:
`step_seconds` on one GPU, the iteration simulator when an instance needs a pipeline of several GPUs.

Policies (same arrivals, strict FIFO admission, spread over free GPUs first, then co-locate):
  dedicated  one instance per job, never shared (how HF-PEFT / NeMo deployments work)
  spatial    co-located jobs of one model share ONE fused batch, rows padded to the longest sequence
  muxtune    documented greedy stand-in for the planner (issue 7): co-located jobs are grouped by
             similar sequence length into fused groups of at most `token_budget` tokens, packed without
             padding (chunk alignment); groups run one after another (interleaved in a pipeline), so
             only one group's activations are held at a time and more jobs fit in memory
  planned    the fusion groups come from a planner outside the simulator (`Planned(group=...)`: the
             service's benchmark passes the real planner's grouping), packed like muxtune
A new policy implements `admit` and `arrange` (see Policy).

A running service spends time the CostModel does not price: its worker starts and loads the backbone,
validates each job's files, loads its data and joins it at a step boundary, re-plans and checkpoints at
every join and leave, and writes events and a checkpoint after every step. `ServiceOverheads` carries
those costs (benchmarks/service.py measures them from a pilot's backbones/<model>/status.json); while
an instance's worker does any of them its jobs do not train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import pandas as pd
import simpy

from muxtune.errors import MuxTuneError
from muxtune.simulator.workload import TaskWork, estimate_params, split_micro_batches

TRACE_COLUMNS = ["arrival", "model", "method", "rank", "data_tokens", "batch", "steps"]


@dataclass(frozen=True)
class Job:
    """One tenant's fine-tuning job. It trains `steps` steps of `batch` sequences and sees `data_tokens`
    tokens in all, so a sequence has data_tokens / (steps * batch) tokens on average."""

    id: int
    arrival: float  # seconds
    model: str
    method: str
    rank: int
    data_tokens: int
    batch: int
    steps: int
    params: int

    @property
    def seq_len(self) -> float:
        return self.data_tokens / (self.steps * self.batch)

    @cached_property
    def shape_key(self) -> tuple:
        """What the job's cost depends on (not its name): jobs with equal keys price the same."""
        return self.method, self.rank, self.params, self.batch, self.seq_len

    @cached_property  # a frozen dataclass still has a __dict__ for cached values
    def work(self) -> TaskWork:
        return TaskWork(f"job{self.id}", self.method, self.rank, self.params, self.batch, self.seq_len)


# --- arrivals ----------------------------------------------------------------------------------------

DEFAULT_MIX = [  # weight, method, rank, batch, steps range, tokens-per-sequence range
    dict(weight=0.5, method="lora", rank=8, batch=8, steps=(200, 2000), seq_len=(64, 512)),
    dict(weight=0.2, method="lora", rank=32, batch=16, steps=(500, 3000), seq_len=(256, 1024)),
    dict(weight=0.15, method="adapter", rank=64, batch=8, steps=(200, 1500), seq_len=(64, 256)),
    dict(weight=0.15, method="ia3", rank=0, batch=32, steps=(100, 1000), seq_len=(32, 128)),
]


def poisson_jobs(n: int, rate_per_hour: float, model: str, shape, seed: int = 0,
                 mix: list[dict] | None = None) -> list[Job]:
    """`n` jobs with exponential inter-arrival times (a Poisson process) and kinds drawn from `mix`."""
    mix = mix or DEFAULT_MIX
    rng = np.random.default_rng(seed)
    weights = np.array([m["weight"] for m in mix], dtype=float)
    arrivals = np.cumsum(rng.exponential(3600.0 / rate_per_hour, size=n))
    kinds = rng.choice(len(mix), size=n, p=weights / weights.sum())
    jobs = []
    for i, (t, k) in enumerate(zip(arrivals, kinds)):
        kind = mix[k]
        steps = int(rng.integers(kind["steps"][0], kind["steps"][1] + 1))
        seq_len = int(rng.integers(kind["seq_len"][0], kind["seq_len"][1] + 1))
        jobs.append(Job(i, float(t), model, kind["method"], kind["rank"], steps * kind["batch"] * seq_len,
                        kind["batch"], steps, estimate_params(kind["method"], kind["rank"], shape)))
    return jobs


def load_trace(path: Path, shape_of: Callable[[str], object]) -> list[Job]:
    """Jobs from a CSV with columns arrival (s), model, method, rank, data_tokens, batch, steps and
    optionally params (else estimated from method and rank). Errors name the file, line and column."""
    path = Path(path)
    try:
        table = pd.read_csv(path)
    except FileNotFoundError:
        raise MuxTuneError(f"{path}: no such trace file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MuxTuneError(f"{path}: not a readable CSV: {exc}") from None
    missing = [c for c in TRACE_COLUMNS if c not in table.columns]
    if missing:
        raise MuxTuneError(f"{path}: missing column(s) {missing}; expected {TRACE_COLUMNS} (+ optional params)")
    jobs = []
    for i, row in enumerate(table.to_dict("records")):
        line = i + 2  # header is line 1
        try:
            numbers = {c: float(row[c]) for c in ["arrival", "rank", "data_tokens", "batch", "steps"]}
        except (TypeError, ValueError) as exc:
            raise MuxTuneError(f"{path}:{line}: {exc}") from None
        for column, value in numbers.items():
            if not math.isfinite(value) or value < 0 or (column in ("batch", "steps", "data_tokens") and value < 1):
                raise MuxTuneError(f"{path}:{line}: {column}: invalid value {row[column]!r}")
        method = str(row["method"])
        if "params" in table.columns and not pd.isna(row["params"]):
            params = int(row["params"])
        else:
            try:
                params = estimate_params(method, int(numbers["rank"]), shape_of(str(row["model"])))
            except MuxTuneError as exc:
                raise MuxTuneError(f"{path}:{line}: {exc}") from None
        jobs.append(Job(i, numbers["arrival"], str(row["model"]), method, int(numbers["rank"]),
                        int(numbers["data_tokens"]), int(numbers["batch"]), int(numbers["steps"]), params))
    return sorted(jobs, key=lambda j: (j.arrival, j.id))


# --- pricing instances through the CostModel ---------------------------------------------------------


class Costs:
    """Step time and memory of an instance's arrangement, from the CostModel of its model (cached)."""

    def __init__(self, cost_model_for: Callable[[str], object], gpu_memory: int):
        self.cost_model_for = cost_model_for
        self.gpu_memory = gpu_memory
        self._models: dict[str, object] = {}
        self._cache: dict[tuple, tuple[float, int]] = {}
        self._gpus: dict[tuple, int] = {}

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = self.cost_model_for(name)
        return self._models[name]

    def gpus_for(self, job: Job) -> int:
        """Fewest GPUs (pipeline stages) on which the job fits alone."""
        key = (job.model, job.shape_key)
        if key in self._gpus:
            return self._gpus[key]
        n = self.model(job.model).shape.n_layers
        for gpus in range(1, n + 1):
            if self.price(job.model, [[job]], gpus, packed=False)[1] <= self.gpu_memory:
                self._gpus[key] = gpus
                return gpus
        raise MuxTuneError(f"job {job.id}: does not fit on {n} GPUs of {self.gpu_memory} bytes")

    def price(self, model: str, groups: list[list[Job]], gpus: int, packed: bool) -> tuple[float, int]:
        """(step seconds, peak bytes per GPU) of fusion `groups` run one after another on `gpus` GPUs."""
        key = (model, gpus, packed, tuple(tuple(j.shape_key for j in g) for g in groups))
        if key not in self._cache:
            self._cache[key] = self._price(model, groups, gpus, packed)
        return self._cache[key]

    def _price(self, model: str, groups: list[list[Job]], gpus: int, packed: bool) -> tuple[float, int]:
        cm = self.model(model)
        if gpus == 1:  # the CostModel's own single-device step; one micro-batch in flight at a time
            batches = [split_micro_batches([j.work for j in g], 1, packed)[0] for g in groups]
            memory = cm.peak_bytes([(kind, mb) for mb in batches for kind in ("fwd", "bwd")],
                                   [j.params for g in groups for j in g])
            return cm.step_seconds(batches), memory
        from muxtune.simulator.iteration import simulate_step
        from muxtune.spec import FusionGroup, Layout, Plan

        devices = [f"gpu{i}" for i in range(gpus)]
        plan = Plan(schedule="interleaved", groups=[
            FusionGroup(tasks=[j.work.name for j in g], devices=devices, layout=Layout(pp=gpus), micro_batches=gpus)
            for g in groups])
        timeline = simulate_step(plan, {j.work.name: j.work for g in groups for j in g}, cm, packed)
        return timeline.step_seconds, max(timeline.peak_memory.values())


@dataclass(frozen=True)
class ServiceOverheads:
    """Seconds a service's worker spends outside the training steps the CostModel prices (all zero: the
    bare cluster). While it spends them its instance's jobs do not train."""

    start_s: float = 0.0  # a worker starting (process, backbone load): once per GPU a model is first run on
    validate_s: float = 0.0  # per arriving job: its files read as training will read them
    join_s: float = 0.0  # per joining job: its data loaded, adapter and optimizer built
    leave_s: float = 0.0  # per ending job: adapter exported, results written
    change_s: float = 0.0  # per join/leave boundary: re-plan + checkpoint of the instance
    step_s: float = 0.0  # per instance step: events and checkpoint, the fixed part
    step_per_job_s: float = 0.0  # ... and the part per job on the instance
    submit_s: float = 0.0  # per job: its file uploaded and the job created through the API, before the service knows it
    pickup_s: float = 0.0  # an idle worker notices a queued job after this long on average (half its idle poll)

    def step(self, jobs: int) -> float:
        return self.step_s + self.step_per_job_s * jobs


# --- policies ----------------------------------------------------------------------------------------


@dataclass
class Instance:
    id: int
    model: str
    gpus: int
    jobs: list[Job]
    groups: list[list[Job]] = field(default_factory=list)
    step_seconds: float = math.inf
    memory: int = 0
    stalled_until: float = 0.0  # its worker is busy outside training (ServiceOverheads) until then


class Policy(Protocol):
    name: str

    def arrange(self, instance: Instance, costs: Costs) -> tuple[list[list[Job]], float, int]:
        """Fusion groups of the instance's jobs, and their (step seconds, peak bytes per GPU)."""

    def admit(self, cluster: "ClusterState") -> None:
        """Start queued jobs: cluster.start(job) on free GPUs or cluster.join(instance, job)."""


class Dedicated:
    name = "dedicated"

    def arrange(self, instance, costs):
        return [instance.jobs], *costs.price(instance.model, [instance.jobs], instance.gpus, packed=False)

    def admit(self, cluster):
        while cluster.queue and cluster.free_gpus >= cluster.costs.gpus_for(cluster.queue[0]):
            cluster.start(cluster.queue[0])


class SpatialOnly:
    """All co-located jobs in one fused batch, padded to the longest sequence."""

    name = "spatial"
    packed = False

    def arrange(self, instance, costs):
        return [instance.jobs], *costs.price(instance.model, [instance.jobs], instance.gpus, self.packed)

    max_tenants: int | None = None  # most jobs on one instance (the service's max_tenants)

    def admit(self, cluster):
        while cluster.queue:
            job = cluster.queue[0]
            if cluster.free_gpus >= cluster.costs.gpus_for(job):
                cluster.start(job)
                continue
            fits = [inst for inst in cluster.instances.values() if inst.model == job.model
                    and (self.max_tenants is None or len(inst.jobs) < self.max_tenants)
                    and self.arrange(Instance(inst.id, inst.model, inst.gpus, inst.jobs + [job]), cluster.costs)[2]
                    <= cluster.costs.gpu_memory]
            if not fits:
                return
            cluster.join(min(fits, key=lambda inst: (inst.step_seconds, inst.id)), job)


@dataclass
class MuxTuneGreedy(SpatialOnly):
    """Greedy stand-in for the planner: sort by sequence length; a fused group takes jobs while its
    tokens stay within token_budget and its longest sequence is within length_ratio of its shortest."""

    name: str = "muxtune"
    token_budget: int = 16384
    length_ratio: float = 2.0
    packed = True

    def arrange(self, instance, costs):
        groups: list[list[Job]] = []
        for job in sorted(instance.jobs, key=lambda j: (j.seq_len, j.id)):
            group = groups[-1] if groups else None
            if (group and job.seq_len <= self.length_ratio * group[0].seq_len
                    and sum(j.work.tokens for j in group) + job.work.tokens <= self.token_budget):
                group.append(job)
            else:
                groups.append([job])
        return groups, *costs.price(instance.model, groups, instance.gpus, self.packed)


@dataclass
class Planned(SpatialOnly):
    """Fusion groups chosen outside the simulator: `group(jobs)` -> groups of those jobs (the service's
    planner, planner/plan.py, which this layer may not import), packed without padding like muxtune."""

    group: Callable[[list[Job]], list[list[Job]]] | None = None
    name: str = "muxtune"
    max_tenants: int | None = None
    packed = True

    def arrange(self, instance, costs):
        groups = self.group(list(instance.jobs)) if self.group else [list(instance.jobs)]
        return groups, *costs.price(instance.model, groups, instance.gpus, self.packed)


POLICIES = {"dedicated": Dedicated, "spatial": SpatialOnly, "muxtune": MuxTuneGreedy}


# --- the event loop ----------------------------------------------------------------------------------


@dataclass
class ClusterState:
    gpus: int
    costs: Costs
    policy: Policy
    free_gpus: int = 0
    queue: list[Job] = field(default_factory=list)
    instances: dict[int, Instance] = field(default_factory=dict)
    where: dict[int, int] = field(default_factory=dict)  # job id -> instance id
    changed: set[int] = field(default_factory=set)
    started: dict[int, float] = field(default_factory=dict)
    now: float = 0.0
    _next_id: int = 0

    def start(self, job: Job) -> Instance:
        gpus = self.costs.gpus_for(job)
        if gpus > self.free_gpus:
            raise MuxTuneError(f"policy {self.policy.name}: job {job.id} needs {gpus} GPUs, {self.free_gpus} free")
        self.free_gpus -= gpus
        instance = Instance(self._next_id, job.model, gpus, [])
        self._next_id += 1
        self.instances[instance.id] = instance
        self.join(instance, job)
        return instance

    def join(self, instance: Instance, job: Job) -> None:
        self.queue.remove(job)
        instance.jobs.append(job)
        self.where[job.id] = instance.id
        self.started[job.id] = self.now
        self.changed.add(instance.id)


@dataclass
class ClusterResult:
    policy: str
    gpus: int
    jobs: pd.DataFrame  # per job: arrival, start, finish, queueing, jct, tokens, model, method
    busy: pd.DataFrame  # time, busy_gpus (a step function: value holds until the next row)
    metrics: dict


def simulate_cluster(jobs: list[Job], gpus: int, policy: Policy, cost_model_for: Callable[[str], object],
                     gpu_memory: int, overheads: ServiceOverheads | None = None) -> ClusterResult:
    """Run every job to completion under `policy` on `gpus` GPUs of `gpu_memory` bytes each; with
    `overheads`, as a service whose workers also spend those (their jobs wait meanwhile)."""
    over = overheads or ServiceOverheads()
    if gpus < 1:
        raise MuxTuneError(f"cluster: need at least 1 GPU, got {gpus}")
    costs = Costs(cost_model_for, gpu_memory)
    for job in jobs:
        if costs.gpus_for(job) > gpus:
            raise MuxTuneError(f"job {job.id}: needs {costs.gpus_for(job)} GPUs, the cluster has {gpus}")
    state = ClusterState(gpus, costs, policy, free_gpus=gpus)
    env = simpy.Environment()
    progress: dict[int, float] = {}  # job id -> steps done
    last_update = {"t": 0.0}
    finished: dict[int, float] = {}
    busy_log: list[tuple[float, int]] = [(0.0, 0)]
    generation = {"n": 0}

    peak = {"bytes": 0}  # the most memory one GPU's instance held
    warm: dict[str, int] = {}  # per model: GPUs whose worker has started (workers stay resident)
    in_use: dict[str, int] = {}

    def advance():
        for inst in state.instances.values():
            dt = env.now - max(last_update["t"], inst.stalled_until)
            if dt > 0:
                for job in inst.jobs:
                    progress[job.id] += dt / inst.step_seconds
        last_update["t"] = env.now

    def stall(inst: Instance, seconds: float) -> None:
        if seconds > 0:
            inst.stalled_until = max(inst.stalled_until, env.now) + seconds

    def settle():
        """Finish due jobs, let the policy admit queued ones, re-arrange changed instances, and
        schedule a wake-up at the next completion."""
        state.now = env.now
        advance()
        left: dict[str, float] = {}  # per model: when its last instance ended (its worker still owes the leave)
        for inst in list(state.instances.values()):
            done = [j for j in inst.jobs if progress[j.id] >= j.steps * (1 - 1e-9)]
            for job in done:  # a job ends when its adapter is written: the leave is its own cost
                inst.jobs.remove(job)
                finished[job.id] = max(env.now, inst.stalled_until) + over.leave_s
                stall(inst, over.leave_s)
                state.changed.add(inst.id)
            if not inst.jobs:
                del state.instances[inst.id]
                state.free_gpus += inst.gpus
                in_use[inst.model] -= inst.gpus
                left[inst.model] = max(left.get(inst.model, 0.0), inst.stalled_until + over.change_s)
        before = {iid: len(inst.jobs) for iid, inst in state.instances.items()}
        state.policy.admit(state)
        for iid in state.changed:
            if iid in state.instances:
                inst = state.instances[iid]
                for job in inst.jobs:
                    progress.setdefault(job.id, 0.0)
                if iid not in before:  # a new instance: its worker may have to start first
                    in_use[inst.model] = in_use.get(inst.model, 0) + inst.gpus
                    if in_use[inst.model] > warm.get(inst.model, 0):
                        warm[inst.model] = in_use[inst.model]
                        stall(inst, over.start_s)
                    inst.stalled_until = max(inst.stalled_until, left.get(inst.model, 0.0))
                joined = len(inst.jobs) - before.get(iid, 0)
                stall(inst, over.join_s * max(joined, 0) + over.change_s)
                for job in inst.jobs[len(inst.jobs) - max(joined, 0):]:  # queued until its worker takes it
                    state.started[job.id] = max(env.now, inst.stalled_until - over.change_s)
                inst.groups, inst.step_seconds, inst.memory = state.policy.arrange(inst, costs)
                inst.step_seconds += over.step(len(inst.jobs))
                peak["bytes"] = max(peak["bytes"], inst.memory)
        state.changed.clear()
        busy_log.append((env.now, gpus - state.free_gpus))
        wake = min((max(inst.stalled_until - env.now, 0.0) + (j.steps - progress[j.id]) * inst.step_seconds
                    for inst in state.instances.values() for j in inst.jobs), default=None)
        if wake is not None:
            generation["n"] += 1
            mine = generation["n"]
            env.timeout(max(wake, 0.0)).callbacks.append(lambda _e: generation["n"] == mine and settle())

    def arrivals():
        for job in sorted(jobs, key=lambda j: (j.arrival, j.id)):
            yield env.timeout(max(0.0, job.arrival + over.submit_s - env.now))
            running = [inst for inst in state.instances.values() if inst.model == job.model and inst.jobs]
            if over.validate_s and running:  # the model's worker reads the new job's files between two steps
                advance()
                stall(running[0], over.validate_s)
            elif not running and (over.validate_s or over.pickup_s):  # an idle worker notices it, then validates it
                yield env.timeout(over.pickup_s + over.validate_s)
            state.queue.append(job)
            settle()

    env.process(arrivals())
    env.run()
    if len(finished) != len(jobs):
        raise MuxTuneError(f"policy {policy.name}: {len(jobs) - len(finished)} jobs never started "
                           "(no placement fits them)")
    table = pd.DataFrame([dict(id=j.id, model=j.model, method=j.method, arrival=j.arrival,
                               start=state.started[j.id], finish=finished[j.id],
                               tokens=j.data_tokens) for j in jobs])
    table["queueing"] = table["start"] - table["arrival"]
    table["jct"] = table["finish"] - table["arrival"]
    busy = pd.DataFrame(busy_log, columns=["time", "busy_gpus"]).drop_duplicates("time", keep="last")
    metrics = {**_metrics(table, busy, gpus, policy.name), "peak_memory_bytes": peak["bytes"]}
    return ClusterResult(policy.name, gpus, table, busy, metrics)


def _metrics(table: pd.DataFrame, busy: pd.DataFrame, gpus: int, policy: str) -> dict:
    end = float(table["finish"].max())
    span = end - float(table["arrival"].min())
    times = list(busy["time"]) + [end]
    gpu_seconds = float(sum(b * (t1 - t0) for b, t0, t1 in zip(busy["busy_gpus"], times[:-1], times[1:])))
    return {
        "policy": policy, "gpus": gpus, "jobs": len(table),
        "jct_p50_s": float(table["jct"].quantile(0.5)), "jct_p95_s": float(table["jct"].quantile(0.95)),
        "queueing_p50_s": float(table["queueing"].quantile(0.5)),
        "queueing_p95_s": float(table["queueing"].quantile(0.95)),
        "gpu_utilisation": gpu_seconds / (gpus * end) if end > 0 else 0.0,  # share of GPU time allocated
        "throughput_tokens_per_s": float(table["tokens"].sum()) / span if span > 0 else 0.0,
        "gpu_hours": gpu_seconds / 3600.0,
        "makespan_s": end,
    }


def compare_policies(jobs: list[Job], gpus: int, cost_model_for, gpu_memory: int,
                     policies: list[str] = ("dedicated", "spatial", "muxtune")) -> dict[str, ClusterResult]:
    return {name: simulate_cluster(jobs, gpus, POLICIES[name](), cost_model_for, gpu_memory) for name in policies}


def gpus_for_queueing(jobs: list[Job], gpu_counts: list[int], target_p95_s: float, cost_model_for,
                      gpu_memory: int, policies: list[str] = ("dedicated", "spatial", "muxtune")
                      ) -> tuple[pd.DataFrame, dict[str, int | None]]:
    """The sweep behind "how many GPUs keep p95 queueing under X for this arrival rate?": every policy
    on every GPU count (same arrivals); per policy the fewest GPUs meeting the target (None: none do)."""
    rows = [simulate_cluster(jobs, g, POLICIES[name](), cost_model_for, gpu_memory).metrics
            for name in policies for g in sorted(gpu_counts)]
    table = pd.DataFrame(rows)
    answer = {}
    for name in policies:
        ok = table[(table["policy"] == name) & (table["queueing_p95_s"] <= target_p95_s)]
        answer[name] = int(ok["gpus"].min()) if len(ok) else None
    return table, answer
