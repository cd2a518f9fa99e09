"""The service's worker and supervisor in this process, without HTTP: the planner decides the fusion
groups of the backbone's current jobs at every join and leave, estimated_finish is the simulator's
phase-by-phase finish under the CostModel, and a worker that crashes in a row is backed off, then its
jobs fail with a clear error."""

import json
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from service_harness import MODEL, adapter_tensors, data_files

from muxtune.run import execute

from muxtune.planner import plan as planner
from muxtune.profiler.cost_model import CostModel
from muxtune.profiler.profile import REPO_PROFILES
from muxtune.service import planning
from muxtune.service.config import ServiceConfig
from muxtune.service.store import Store, now
from muxtune.service.supervisor import Supervisor
from muxtune.service.worker import Worker
from muxtune.spec import RunConfig, TaskSpec


def job(n: int) -> str:
    return f"ftjob-{n:024x}"


A, B = job(10), job(11)


def shipped_cost_model() -> CostModel:
    """The repo's stored tiny-llama CPU profile, taken as is: the worker's calibrated lookup would time
    this machine first (seconds, and on a busy CI machine it may rightly refuse)."""
    return CostModel.from_profile(next(REPO_PROFILES.glob("cpu-*-tiny-llama.csv")))


def add_job(store: Store, db, job_id: str, train, steps: int, status: str = "queued", seed: int = 1) -> TaskSpec:
    spec = TaskSpec(name=job_id, data=train, peft={"method": "lora"}, steps=steps, batch_size=4, max_seq_len=64,
                    seed=seed)
    with store.transaction(db):
        db.execute("INSERT INTO jobs (id, org, model, status, created_at, training_file, request, spec) "
                   "VALUES (?, 'acme', ?, ?, ?, 'file-x', '{}', ?)", (job_id, MODEL, status, now(), spec.model_dump_json()))
    return spec


@pytest.fixture
def worker(tmp_path, monkeypatch):
    monkeypatch.setattr(planning.Pricing, "cost_model", lambda self, specs: (shipped_cost_model(), ""))
    store = Store(tmp_path / "state").init()
    return Worker(store, ServiceConfig(threads=1, plan_in_background=False), MODEL)


def finish_of(worker: Worker) -> dict[str, int | None]:
    return {r["id"]: r["estimated_finish"] for r in worker.db.execute("SELECT id, estimated_finish FROM jobs")}


def step(worker: Worker) -> None:
    before = {name: run.step for name, run in worker.trainer.runs.items()}
    worker.trainer.step()
    worker.after_step(before)


def test_estimated_finish_is_the_simulated_finish_of_each_job_as_jobs_leave(worker, tmp_path, monkeypatch):
    # a known step time: 100 s per job in the fused step, so the arithmetic below is the simulator's
    def step_of(plan, works, cm, packed=True):
        return SimpleNamespace(step_seconds=100.0 * sum(len(g.tasks) for g in plan.groups), peak_memory={"cpu": 1})

    monkeypatch.setattr(planner, "simulate_step", step_of)
    train, _ = data_files(tmp_path / "data", seed=1)
    add_job(worker.store, worker.db, A, train, steps=3)
    add_job(worker.store, worker.db, B, train, steps=5, seed=2)
    at = time.time()
    worker.boundary()
    assert set(worker.trainer.runs) == {A, B}
    finish = finish_of(worker)
    # both fused for 3 steps (200 s each), then b alone for 2 more (100 s each)
    assert abs(finish[A] - (at + 600)) <= 2 and abs(finish[B] - (at + 800)) <= 2
    for _ in range(3):
        step(worker)
    assert A not in worker.trainer.runs  # it ended and left: b is priced alone for its 2 steps left
    assert abs(finish_of(worker)[B] - (time.time() + 200)) <= 2


def test_no_trusted_profile_leaves_estimated_finish_null_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(planning.Pricing, "lookup", lambda self, methods, targets: (None, "no stored profile here"))
    store = Store(tmp_path / "state").init()
    worker = Worker(store, ServiceConfig(threads=1, plan_in_background=False), MODEL)
    train, _ = data_files(tmp_path / "data", seed=1)
    add_job(store, worker.db, A, train, steps=2)
    worker.boundary()
    assert finish_of(worker) == {A: None} and worker.trainer.groups == [[A]]
    events = [r["message"] for r in worker.db.execute("SELECT message FROM events WHERE job_id = ?", (A,))]
    assert "No estimated finish: no stored profile here" in events


def test_the_worker_fuses_by_the_planners_groups_for_the_current_jobs(worker, tmp_path, monkeypatch):
    asked = []  # (the jobs the planner was asked about, the groups it answered)

    def spy(tasks, cluster, cost_model, **kwargs):
        result = real(tasks, cluster, cost_model, **kwargs)
        assert cluster.devices == 1
        asked.append(({t.name for t in tasks}, [list(g.tasks) for g in result.plan.groups]))
        return result

    real = planner.plan
    monkeypatch.setattr(planner, "plan", spy)
    train, _ = data_files(tmp_path / "data", seed=1)
    specs = [add_job(worker.store, worker.db, job(n), train, steps=steps, seed=n) for n, steps in enumerate((2, 4, 4))]
    worker.boundary()
    assert asked[-1][0] == {job(0), job(1), job(2)}
    assert worker.trainer.groups == asked[-1][1]
    step(worker)
    step(worker)  # ftjob-0 is done: the planner is asked again about the two left
    assert asked[-1][0] == {job(1), job(2)} and worker.trainer.groups == asked[-1][1]
    assert sorted(n for g in worker.trainer.groups for n in g) == [job(1), job(2)]

    # a split the planner chooses is carried out as it says, from the next step on
    monkeypatch.setattr(planning, "decide", lambda runs, *a: planning.Decision(groups=[[n] for n in sorted(runs)]))
    specs.append(add_job(worker.store, worker.db, job(3), train, steps=2, seed=3))
    worker.boundary()
    assert worker.trainer.groups == [[job(1)], [job(2)], [job(3)]]
    step(worker)
    assert [worker.trainer.runs[n].step for n in (job(1), job(2), job(3))] == [3, 3, 1]
    step(worker)
    assert not worker.trainer.runs  # all done: 1 and 2 were regrouped mid-run, 3 trained in its own group

    # regrouping changes no job's result: each adapter is its task's trained alone (the join test's tolerance)
    for n in (1, 2, 3):
        got = adapter_tensors(worker.store.path_of("ftjob", job(n)))
        spec = specs[n]
        execute(RunConfig(name="alone", model=MODEL, tasks=[spec]), tmp_path / "alone" / spec.name, progress=False)
        reference = adapter_tensors(tmp_path / "alone" / spec.name / "adapters" / spec.name)
        assert set(got) == set(reference)
        for key, value in reference.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_a_worker_crashing_in_a_row_is_backed_off_then_its_jobs_fail(tmp_path):
    store = Store(tmp_path / "state").init()
    db = store.connect()
    train, _ = data_files(tmp_path / "data", seed=1)
    add_job(store, db, A, train, steps=2, status="running")
    supervisor = Supervisor(store, interval=0.02, crashes=3, backoff=0.3)
    # the injected crash: a worker that dies before completing any step, every time
    supervisor.command = lambda model: [sys.executable, "-c", "import sys; print('injected crash'); sys.exit(3)"]
    spawned, spawn = [], supervisor._spawn
    supervisor._spawn = lambda model: spawned.append(time.monotonic()) or spawn(model)
    supervisor.start()
    try:
        deadline = time.time() + 30
        while db.execute("SELECT status FROM jobs").fetchone()[0] != "failed" and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # no worker is started for it any more
    finally:
        supervisor.stop()
    row = db.execute("SELECT status, error FROM jobs").fetchone()
    assert row["status"] == "failed"
    error = json.loads(row["error"])
    assert error["code"] == "worker_crashed" and "crashed 3 times in a row" in error["message"]
    assert "injected crash" in error["message"]
    assert len(spawned) == 3
    gaps = [b - a for a, b in zip(spawned, spawned[1:])]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6, gaps  # each wait twice the one before
    events = [r["message"] for r in db.execute("SELECT message FROM events WHERE job_id = ?", (A,))]
    assert any("crashed 3 times" in m for m in events)


def test_a_worker_that_completes_steps_between_crashes_keeps_being_restarted(tmp_path):
    store = Store(tmp_path / "state").init()
    db = store.connect()
    train, _ = data_files(tmp_path / "data", seed=1)
    add_job(store, db, A, train, steps=2, status="running")
    progress = store.backbone_dir(MODEL) / "progress"
    supervisor = Supervisor(store, interval=0.02, crashes=2, backoff=0.05)
    supervisor.command = lambda model: [sys.executable, "-c", f"open({str(progress)!r}, 'w').write('1'); exit(3)"]
    spawned, spawn = [], supervisor._spawn
    supervisor._spawn = lambda model: spawned.append(time.monotonic()) or spawn(model)
    supervisor.start()
    try:
        deadline = time.time() + 30
        while len(spawned) < 5 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        supervisor.stop()
    assert len(spawned) >= 5 and db.execute("SELECT status FROM jobs").fetchone()[0] == "running"


def test_simulate_job_finish_is_each_tasks_last_step_and_its_evaluations():
    from dataclasses import replace

    from fake_cost_model import FakeCostModel

    from muxtune.simulator.iteration import simulate_step
    from muxtune.simulator.workload import task_work
    from muxtune.spec import FusionGroup, Plan

    cm = FakeCostModel(per_token=1e-3)
    specs = [TaskSpec(name=n, data="x.jsonl", peft={"method": "lora"}, steps=s, batch_size=4, max_seq_len=64)
             for n, s in (("short", 2), ("long", 5))]
    plain = {s.name: task_work(s, 1000) for s in specs}
    steps = {s.name: s.steps for s in specs}
    plan = Plan(groups=[FusionGroup(tasks=list(steps), devices=["cpu"])])
    job = planner.simulate_job(plan, plain, steps, cm, packed=True)
    both = simulate_step(plan, plain, cm, packed=True).step_seconds
    alone = simulate_step(Plan(groups=[FusionGroup(tasks=["long"], devices=["cpu"])]), plain, cm, packed=True).step_seconds
    assert job.finish["short"] == pytest.approx(2 * both)
    assert job.finish["long"] == pytest.approx(2 * both + 3 * alone) == pytest.approx(job.makespan)
    # with evaluations: the last one done is the job's end, evaluations included; the earlier one gains its own
    evaluating = {n: replace(w, eval_sequences=4, eval_every=2) for n, w in plain.items()}
    job = planner.simulate_job(plan, evaluating, steps, cm, packed=True)
    assert job.finish["long"] == pytest.approx(job.makespan) and job.evaluation > 0
    assert 2 * both < job.finish["short"] < job.finish["long"]


def test_the_planner_process_ends_when_its_worker_is_killed(tmp_path):
    """A worker killed (crash, supervisor restart) cannot shut its planner pool down: the pool's process
    must notice and end by itself, not wait for work forever holding a CostModel."""
    import os
    import signal
    import subprocess

    import psutil

    profile = next(REPO_PROFILES.glob("cpu-*-tiny-llama.csv"))
    script = ("import os, sys, time\n"
              "from muxtune.service.planning import PlannerProcess\n"
              f"p = PlannerProcess({MODEL!r}, 'cpu', 'float32', {str(profile)!r})\n"
              "print(p.pool.submit(os.getpid).result(), flush=True)\n"
              "time.sleep(600)\n")
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        planner_pid = int(worker.stdout.readline())
        assert psutil.pid_exists(planner_pid) and planner_pid != worker.pid
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        deadline = time.time() + 15
        while time.time() < deadline and psutil.pid_exists(planner_pid) \
                and psutil.Process(planner_pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.2)
        assert not psutil.pid_exists(planner_pid) or psutil.Process(planner_pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if worker.poll() is None:
            worker.kill()
