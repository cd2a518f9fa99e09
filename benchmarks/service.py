"""Does the capacity plan come true? A seeded job trace through the real fine-tuning service, measured
against the cluster simulator's prediction for the same trace.

    python -m benchmarks.service [--quick] [--jobs 24] [--rate 1800] [--scale 1] [--seed 0] [--clients 4]
                                    [--profile CSV] [--record]

1. A pilot: a few jobs through a fresh service; its worker's status.json (muxtune/service/timing.py)
   gives the service's own costs the CostModel does not price (worker start-up, file validation,
   joining, leaving, re-plan + checkpoint per change, events + checkpoint per step) as the
   simulator's ServiceOverheads. The pilot's jobs are not the trace's.
2. The trace (benchmarks/service_trace.py: Poisson arrivals, a mix of methods, ranks, lengths, batch
   sizes and epochs) goes through `muxtune serve` twice, side by side in this run: (a) MuxTune, jobs
   multiplexed on one backbone (max_tenants 16, the planner's fusion groups); (b) dedicated, one job at
   a time (max_tenants 1). Concurrent `openai` clients (one key per organisation) upload each job's file
   and create the job at its arrival time; one poller per organisation lists the jobs every 0.25 s.
3. The simulator predicts both modes from the same CostModel + those overheads. The CostModel is the
   stored profile that passes the calibration check on this machine now (rescaled when the machine is
   uniformly slower), and the service is given it as its `profile:`, so both price with the same one.

Per mode: makespan, mean / p95 job completion time (JCT, arrival -> succeeded), mean queueing
(arrival -> running), backbone busy fraction (some job running), peak memory of the worker; measured
and simulated. The last line is one JSON object with makespan_ratio = makespan(dedicated) /
makespan(muxtune), jct_ratio, p95_jct_ratio and sim_makespan_error / sim_jct_error (|predicted -
measured| / measured, the worse of the two modes). --record writes the figures to
docs/img/service_benchmark.json and the JCT CDF to docs/img/service_jct_cdf.png (what docs/benchmarks.md
and the capacity-planning notebook show).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .service_trace import (KINDS, MAX_TENANTS, MEMORY_LIMIT_GIB, MODEL, ORGS, fit_overheads, make_trace, overheads_dict,
                            simulate, simulator_jobs, write_data)

DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
POLL_S = 0.25
# a backbone checkpoint every 10 steps (a kill -9 costs at most 10 steps): every step's (the default) costs
# each job ~40 ms per step here, as much as training a tiny-llama step, in both modes alike
CHECKPOINT_EVERY = 10
FINAL = ("succeeded", "failed", "cancelled")


class Service:
    """`muxtune serve` on a free port with its own state folder and one key per organisation."""

    def __init__(self, folder: Path, max_tenants: int, profile: str):
        from muxtune.service.store import Store

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state = self.folder / "state"
        config = self.folder / "service.yaml"
        config.write_text(f"models: [{MODEL}]\nthreads: 1\nmax_tenants: {max_tenants}\n"
                          f"memory_limit_gib: {MEMORY_LIMIT_GIB}\nprofile: {profile}\n"
                          f"checkpoint_every: {CHECKPOINT_EVERY}\n"
                          "limits: {running_jobs: 1000, jobs_per_minute: 10000}\n")
        store = Store(self.state).init()
        self.keys = {org: store.create_key(org)[1] for org in ORGS}
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.folder / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "muxtune.cli", "serve", "--state", str(self.state),
                                      "--port", str(self.port), "--config", str(config)],
                                     stdout=self.log, stderr=self.log,
                                     env={**_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        self._wait_up()

    def _wait_up(self) -> None:
        import httpx

        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                httpx.get(self.url + "/v1/files", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the service did not start in 120 s")

    def client(self, org: str):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=self.keys[org], max_retries=2, timeout=120)

    def status(self) -> dict | None:
        from muxtune.service.store import Store
        from muxtune.service.timing import read_status

        return read_status(Store(self.state).backbone_dir(MODEL) / "status.json")

    def peak_memory(self) -> int | None:
        """The worker's peak resident memory (VmHWM), read before it stops."""
        status = self.status()
        try:
            for line in Path(f"/proc/{status['pid']}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except (OSError, TypeError):
            pass
        return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _env() -> dict:
    import os

    return dict(os.environ)


def run_trace(service: Service, trace, files: dict, clients: int, timeout: float) -> dict:
    """Submit every job at its arrival time through `clients` concurrent openai clients; poll until all
    end. Per trace job: arrival, running (first seen running), finish (first seen succeeded), status."""
    seen: dict[str, dict] = {}  # job id -> {"running": t, "finish": t, "status": s}
    ids: dict[int, str] = {}
    submitted: dict[int, float] = {}  # trace job id -> seconds its upload and create calls took
    errors: list[str] = []
    done = threading.Event()
    t0 = time.time()

    def submit(job):
        api = service.client(job.org)
        started = time.time()
        try:
            upload = api.files.create(file=open(files[job.id], "rb"), purpose="fine-tune")
            created = api.fine_tuning.jobs.create(**job.request(MODEL, upload.id))
            submitted[job.id] = time.time() - started
            ids[job.id] = created.id
        except Exception as exc:  # noqa: BLE001 - reported with the job, the run goes on
            errors.append(f"job {job.id}: {type(exc).__name__}: {exc}")

    def poll(org):
        api = service.client(org)
        before = 0.0  # the last poll's time: a change seen now happened, on average, midway since then
        while not done.is_set():
            try:
                page = api.fine_tuning.jobs.list(limit=1000)
            except Exception:  # noqa: BLE001 - a slow answer under load: the next poll sees it
                time.sleep(POLL_S)
                continue
            now = time.time() - t0
            at, before = (before + now) / 2, now
            for job in page.data:
                entry = seen.setdefault(job.id, {})
                if job.status in FINAL and "running" not in entry:  # it started and ended since the last poll
                    entry["window"] = (2 * at - now, now)  # (the previous poll, this one)
                if job.status in ("running",) + FINAL and "running" not in entry:
                    entry["running"] = at
                if job.status in FINAL and "finish" not in entry:
                    entry["finish"], entry["status"] = at, job.status
            time.sleep(POLL_S)

    pollers = [threading.Thread(target=poll, args=(org,), daemon=True) for org in ORGS]
    for thread in pollers:
        thread.start()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for job in trace:
            time.sleep(max(0.0, t0 + job.arrival - time.time()))
            pool.submit(submit, job)
    deadline = time.time() + timeout
    while time.time() < deadline and not errors:
        if len(ids) == len(trace) and all("finish" in seen.get(i, {}) for i in ids.values()):
            break
        time.sleep(POLL_S)
    done.set()
    for thread in pollers:
        thread.join(timeout=10)
    if errors:
        raise RuntimeError("; ".join(errors))
    missing = [j.id for j in trace if "finish" not in seen.get(ids.get(j.id, ""), {})]
    if missing:
        raise RuntimeError(f"jobs {missing} did not end within {timeout:.0f} s (see {service.folder}/server.log)")
    for j in trace:
        entry = seen[ids[j.id]]
        if "window" in entry:  # two ordered moments within one poll interval (after the arrival): at 1/3 and 2/3
            start, end = entry.pop("window")
            lo = min(max(start, j.arrival), end)
            entry["running"], entry["finish"] = lo + (end - lo) / 3, lo + 2 * (end - lo) / 3
    return {j.id: dict(arrival=j.arrival, submitted=submitted[j.id], **seen[ids[j.id]]) for j in trace}


def measured_metrics(jobs: dict, peak_memory: int | None, status: dict | None) -> dict:
    arrivals = [j["arrival"] for j in jobs.values()]
    jct = [j["finish"] - j["arrival"] for j in jobs.values()]
    makespan = max(j["finish"] for j in jobs.values()) - min(arrivals)
    intervals = sorted((j["running"], j["finish"]) for j in jobs.values())
    busy, end = 0.0, float("-inf")
    for start, stop in intervals:  # the union of the running intervals
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    failed = [i for i, j in jobs.items() if j["status"] != "succeeded"]
    return dict(makespan_s=makespan, jct_mean_s=statistics.fmean(jct), jct_p95_s=percentile(jct, 95),
                queueing_mean_s=statistics.fmean(j["running"] - j["arrival"] for j in jobs.values()),
                busy_fraction=busy / makespan, peak_memory_bytes=peak_memory, failed=failed,
                training_seconds=status["phases"]["step"]["seconds"] if status else None,
                jct_s=jct)


def simulated_metrics(result) -> dict:
    table = result.jobs
    makespan = float(table["finish"].max() - table["arrival"].min())
    return dict(makespan_s=makespan, jct_mean_s=float(table["jct"].mean()),
                jct_p95_s=percentile(list(table["jct"]), 95), queueing_mean_s=float(table["queueing"].mean()),
                busy_fraction=result.metrics["gpu_utilisation"] * float(table["finish"].max()) / makespan,
                peak_memory_bytes=result.metrics.get("peak_memory_bytes"), jct_s=[float(x) for x in table["jct"]])


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def pilot(folder: Path, profile: str, jobs: int, seed: int, scale: float) -> tuple[dict, float, float]:
    """`jobs` jobs of the trace's mix (another seed) all at once through a fresh MuxTune service: its
    worker's status.json, when the first job was submitted (for the worker's start-up) and the mean
    seconds a job took to submit (file upload + job creation through the API)."""
    from dataclasses import replace

    service = Service(folder, MAX_TENANTS, profile)
    try:
        trace = [replace(job, id=1000 + job.id, arrival=0.0) for job in make_trace(jobs, 3600.0, seed + 1, scale)]
        files = {job.id: write_data(job, folder) for job in trace}
        first = time.time()
        seen = run_trace(service, trace, files, clients=jobs, timeout=600)
        time.sleep(1.2)  # the worker writes its last status.json at its next idle boundary
        return service.status(), first, statistics.fmean(j["submitted"] for j in seen.values())
    finally:
        service.stop()


def calibrated_profile() -> tuple[str, str]:
    """(profile CSV, what it is): the CostModel the service plans with (its `profile:`) and the simulator
    predicts with. The stored profile of the model that passes the calibration check on this machine
    now (rescaled when the machine is uniformly slower), else one measured now (`muxtune profile`'s
    quick mode, a few minutes once; cached): on a machine busy with other work the shipped profile's
    steps are about 2x too fast, and a plan priced with it cannot come true."""
    import torch

    from muxtune.profiler.profile import load_or_profile

    torch.set_num_threads(1)  # as the service's workers train (threads: 1)
    methods = sorted({kind["peft"]["method"] for kind in KINDS})
    _, path, reused = load_or_profile(MODEL, "cpu", "quick", torch.float32, progress=False, methods=methods,
                                      targets=["q_proj", "v_proj"], say=lambda line: print(line, file=sys.stderr))
    return str(path), f"{Path(path).name} ({'stored, passes the calibration check' if reused else 'measured now'})"


def plot_cdf(measured: dict, simulated: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    colours = {"muxtune": "tab:blue", "dedicated": "tab:red"}
    for mode in ("muxtune", "dedicated"):
        for label, source, style in (("measured", measured, "-"), ("simulated", simulated, "--")):
            values = np.sort(source[mode]["jct_s"])
            ax.step(values, np.arange(1, len(values) + 1) / len(values), style, where="post",
                    color=colours[mode], label=f"{mode} ({label})")
    ax.set_xlabel("job completion time (s)")
    ax.set_ylabel("share of jobs")
    ax.set_title("JCT CDF: one backbone, the same trace")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 jobs, a 2-job pilot: a smoke test (about 2 min)")
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--rate", type=float, default=1800.0, help="job arrivals per hour (Poisson)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=4, help="concurrent openai clients submitting jobs")
    parser.add_argument("--pilot-jobs", type=int, default=4)
    parser.add_argument("--scale", type=float, default=1.0, help="every job's data x this (shorter jobs)")
    parser.add_argument("--profile", help="a profile CSV to plan and predict with as it is (default: the calibrated "
                        "stored one, else one measured now)")
    parser.add_argument("--out", help="folder for the services' state and logs (default: a temporary one)")
    parser.add_argument("--record", action="store_true",
                        help="write docs/img/service_benchmark.json and docs/img/service_jct_cdf.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.rate, args.pilot_jobs, args.scale = 4, 3600.0, 2, 0.1
    for name in ("jobs", "clients", "pilot_jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: need at least 1")
    if args.rate <= 0 or args.scale <= 0:
        parser.error("--rate and --scale: must be positive")

    from muxtune.profiler.cost_model import CostModel

    from . import announce

    if args.profile and not Path(args.profile).is_file():
        parser.error(f"--profile: no such file: {args.profile}")
    profile, profile_note = (args.profile, f"{Path(args.profile).name} (given)") if args.profile else calibrated_profile()
    trace = make_trace(args.jobs, args.rate, args.seed, args.scale)
    out = Path(args.out or tempfile.mkdtemp(prefix="muxtune-service-bench-"))
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {job.id: write_data(job, data) for job in trace}
    rows = simulator_jobs(trace, files)
    steps = sum(r["steps"] for r in rows)
    tokens = statistics.fmean(r["data_tokens"] / r["steps"] for r in rows)
    # the dedicated mode trains every step alone; the muxtune mode about as many tokens in fewer steps
    announce("benchmarks.service", f"{args.jobs} jobs ({steps} steps) of {MODEL} through the fine-tuning service, "
             "multiplexed vs dedicated, beside the cluster simulator's prediction", MODEL, "cpu",
             [(2.5 * steps, int(tokens)), (6 * args.pilot_jobs, 64)], fixed_seconds=40 + 1.5 * args.jobs)

    cost_model = CostModel.from_profile(profile)
    status, first, submit_s = pilot(out / "pilot", profile, args.pilot_jobs, args.seed, args.scale)
    overheads = fit_overheads(status, first, submit_s)
    print(f"service overheads (pilot of {args.pilot_jobs} jobs): {overheads_dict(overheads)}", file=sys.stderr)

    measured, simulated = {}, {}
    for mode, tenants in (("muxtune", MAX_TENANTS), ("dedicated", 1)):
        simulated[mode] = simulated_metrics(simulate(rows, mode, cost_model, overheads))
        service = Service(out / mode, tenants, profile)
        try:
            jobs = run_trace(service, trace, files, args.clients, timeout=1800)
            time.sleep(1.2)
            measured[mode] = measured_metrics(jobs, service.peak_memory(), service.status())
        finally:
            service.stop()
        print(f"{mode}: measured {_brief(measured[mode])}; simulated {_brief(simulated[mode])}", file=sys.stderr)

    def error(key: str) -> float:
        return max(abs(simulated[m][key] - measured[m][key]) / measured[m][key] for m in measured)

    result = {
        "model": MODEL, "jobs": args.jobs, "rate_per_hour": args.rate, "seed": args.seed, "steps": steps,
        "makespan_ratio": measured["dedicated"]["makespan_s"] / measured["muxtune"]["makespan_s"],
        "jct_ratio": measured["dedicated"]["jct_mean_s"] / measured["muxtune"]["jct_mean_s"],
        "p95_jct_ratio": measured["dedicated"]["jct_p95_s"] / measured["muxtune"]["jct_p95_s"],
        "sim_makespan_error": error("makespan_s"), "sim_jct_error": error("jct_mean_s"),
        "measured": {m: {k: v for k, v in d.items() if k != "jct_s"} for m, d in measured.items()},
        "simulated": {m: {k: v for k, v in d.items() if k != "jct_s"} for m, d in simulated.items()},
        "overheads": overheads_dict(overheads), "profile": profile_note,
    }
    if args.record:
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        plot_cdf(measured, simulated, DOCS_IMG / "service_jct_cdf.png")
        record = {**result, "trace": rows, "jct_s": {"measured": {m: d["jct_s"] for m, d in measured.items()},
                                                     "simulated": {m: d["jct_s"] for m, d in simulated.items()}}}
        (DOCS_IMG / "service_benchmark.json").write_text(json.dumps(record, indent=1) + "\n")
    else:
        plot_cdf(measured, simulated, out / "service_jct_cdf.png")
    print(json.dumps(result))
    return result


def _brief(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.1f}" for k, v in metrics.items() if isinstance(v, float))


if __name__ == "__main__":
    main()
