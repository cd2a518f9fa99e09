"""MuxTune vs. separate HF PEFT jobs: training throughput and memory of N LoRA tenants on one backbone.

    python -m benchmarks.mux_vs_separate            # llama-100m, 8 tasks, sweep 32..512 tokens/task
    python -m benchmarks.mux_vs_separate --quick    # tiny-llama, 3 tasks, 2 sweep points (< 1 min)

N tasks of LoRA (ranks 8, 12, 16, 8, ...; alpha 16; q_proj, v_proj; dropout 0) train on random token
sequences. At every sweep point each task's micro-batch holds exactly `tokens_per_task` tokens
(`rows` sequences of `seq_len` tokens, all the same length, so no padding). Configurations:

  separate_seq          N HF PEFT processes (`get_peft_model`, each with its own backbone), run one
                        after another: throughput = all tasks' tokens / sum of their timed seconds
  separate_concurrent   the same N processes all at once (only if N * one process's peak RSS < 70%
                        of RAM), 1 torch thread each by default (`--concurrent-threads`; N processes
                        with 2 threads each oversubscribe 2 cores N-fold and crawl):
                        throughput = all tokens / (last timed end - first timed start)
  switch                one HF PEFT process, one backbone, N adapters (`add_adapter`), `set_adapter`
                        to each task in turn every step, one AdamW per adapter
  muxtune               MuxTune's MultiplexedTrainer: the N tasks fused into one micro-batch per step
  planned               MuxTune's MultiplexedTrainer carrying out the planner's Plan for the N tasks at
                        this point (planner/plan.py priced by this device's CostModel: `--profile`, else a
                        stored profile that passes the calibration check, else a quick one measured now;
                        --quick: the shipped tiny-llama profile): all fused, or groups one after another
                        where the CostModel prices fusing dearer (issue 26)
  single_adapter_limit  MultiplexedTrainer with ONE task (rank 8) and N times the rows: the same
                        tokens per step as `muxtune`, the best a fused step could do

Every process runs on the malloc MuxTune's own training processes run on (tcmalloc where installed: the
command starts itself again on it, muxtune/allocator.py; `malloc` in the JSON names it).
Each configuration is its own process (benchmarks/_peft_worker.py), started afresh for every sweep
point and stopped after it: nothing a process did at an earlier point (its allocator's free lists,
a fragmented heap) carries over, and `peak RSS` is that point's own ru_maxrss. Memory of the separate
configurations is the sum over the N processes. Every process uses `--threads` (2) torch threads,
except in separate_concurrent (above).
Each measurement is 1 untimed warm-up step then timed steps (setup never counts). The timed steps of
one sweep point are interleaved: one step of every process of every configuration in turn
(separate[0..N-1], switch, muxtune, planned, limit; every other round in reverse), in rounds, so a noisy
machine hits them alike; the number of rounds is `--steps` or more, enough for muxtune's timed steps
to last `--min-seconds` (cheap small points get more rounds: more pairs for the paired median).
separate_concurrent runs after the rounds.

Output: per sweep point a table (tokens_per_task, config, tokens_per_s, peak_rss_mb), progress lines
on stderr, and as the LAST stdout line one JSON object: per-point figures, plus
  throughput_ratio  muxtune / best separate (seq or concurrent) at the smallest sweep point
  limit_ratio       min over sweep points of muxtune / single_adapter_limit, each point's figure the
                    median over the timed rounds of the two rates in the same round (they step back
                    to back); limit_ratio_total is the ratio of their summed seconds instead
  memory_ratio      separate memory / muxtune memory at the smallest sweep point
  memory_ratio_min  min of that over sweep points
  planned_vs_sequential  min over sweep points of planned / separate_seq (each point's figure also in
                    `sweep`, beside the planner's choice: `planned_groups`, `planned_micro_batches`,
                    and its own prediction `planned_predicted_vs_sequential`)
  throughput_ceiling  single_adapter_limit / best separate at the smallest sweep point: the most any
                    fused executor can gain here (fusion saves no FLOPs, only per-process overhead and
                    small-GEMM inefficiency)
and, as a noise check, throughput_ratio_median / limit_ratio_median: the same ratios from each
configuration's median per-step rate (`step_seconds` lists every timed step), which one step stalled
by load from elsewhere cannot move.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import multiprocessing
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from muxtune import allocator
from muxtune.benchmarks import _peft_worker  # by its installed name: forkserver children import it without the checkout root

CONFIGS = ["separate_seq", "separate_concurrent", "switch", "muxtune", "planned", "single_adapter_limit"]
REPO = Path(__file__).resolve().parent.parent
FULL = {"model": "builtin:llama-100m", "tasks": 8, "sweep": "32,64,128,256,512", "steps": 4, "min_seconds": 20.0,
        "profile": None}
QUICK = {"model": "builtin:tiny-llama", "tasks": 3, "sweep": "32,64", "steps": 2, "min_seconds": 0.0,
         "profile": str(next((REPO / "profiles").glob("cpu-*-tiny-llama.csv"), ""))}
PLAN_SECONDS = 5.0  # the planner's time limit at each sweep point
TARGETS = {"throughput_ratio": 1.5, "limit_ratio": 0.95, "memory_ratio": 5.3}
MEMORY_SHARE = 0.7  # run the separate processes concurrently only below this share of RAM
START_TIME = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START_TIME:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Shape:
    tokens: int  # per task per step
    rows: int
    seq: int


def shape_for(tokens: int, max_seq: int) -> Shape:
    rows = max(1, tokens // max_seq)
    if tokens % rows:
        raise SystemExit(f"--sweep: {tokens} tokens do not split into {rows} rows of <= {max_seq}")
    return Shape(tokens, rows, tokens // rows)


def ranks_for(n: int) -> list[int]:
    return [(8, 12, 16)[i % 3] for i in range(n)]


def total_ram_mb() -> float:
    try:
        import psutil

        return psutil.virtual_memory().total / 2**20
    except ImportError:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemTotal")) / 1024


class Worker:
    """One training process (benchmarks/_peft_worker.py, forked from the forkserver), driven over a pipe."""

    def __init__(self, config: str, model: str, ranks: list[int], task_index: int, threads: int, logdir: Path,
                 plan: dict | None = None):
        self.name = config if config != "separate" else f"separate[{task_index}]"
        self.log_path = logdir / f"{self.name}.log"
        ctx = multiprocessing.get_context("forkserver")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_peft_worker.run_worker, name=self.name, daemon=True,
                                args=(child, config, model, ranks, task_index, threads, str(self.log_path), plan))
        self.proc.start()
        child.close()
        self.info: dict | None = None

    def send(self, **cmd) -> None:
        self.conn.send(cmd)

    def receive(self) -> dict:
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join()
            tail = self.log_path.read_text()[-3000:] if self.log_path.exists() else ""
            raise RuntimeError(f"worker {self.name} exited (exitcode {self.proc.exitcode}); "
                               f"its log ends:\n{tail}") from None

    def ready(self) -> dict:
        if self.info is None:
            self.info = self.receive()
        return self.info

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.send(op="exit")
            except OSError:
                pass
            self.proc.join(timeout=30)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()


def start_forkserver(threads: int, device: str = "cpu", dtype: str = "float32") -> None:
    """Workers fork from one server that has imported the heavy libraries (and run no tensor op)."""
    os.environ["MUXTUNE_BENCH_DEVICE"], os.environ["MUXTUNE_BENCH_DTYPE"] = device, dtype  # read by the workers
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    multiprocessing.set_forkserver_preload(["muxtune.benchmarks._peft_worker", *_peft_worker.PRELOAD])


def plan_sweep(args, shapes: list[Shape], ram_mb: float) -> list[dict]:
    """The planner's choice at every sweep point (_peft_worker.plan_points), in a process of its own
    before any worker starts (a profile measured now then has the machine to itself)."""
    source = f"analytic {args.plan_hardware}" if args.plan_hardware else args.profile or "this device's profile"
    log(f"planning {args.tasks} tasks at {len(shapes)} sweep points ({source})")
    log_path = Path(tempfile.mkdtemp(prefix="mux_vs_separate.plan.")) / "planner.log"
    ctx = multiprocessing.get_context("forkserver")
    conn, child = ctx.Pipe()
    # not a daemon: measuring a profile starts processes of its own
    proc = ctx.Process(target=_peft_worker.run_planner, name="planner",
                       args=(child, args.model, ranks_for(args.tasks), [(s.rows, s.seq) for s in shapes],
                             args.profile, args.plan_hardware, MEMORY_SHARE * ram_mb / 1024, PLAN_SECONDS,
                             args.threads, str(log_path)))
    proc.start()
    child.close()
    try:
        choices = conn.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the planner exited (exitcode {proc.exitcode}); its log ends:\n"
                           f"{log_path.read_text()[-3000:] if log_path.exists() else ''}") from None
    proc.join()
    for shape, choice in zip(shapes, choices):
        log(f"t={shape.tokens}: the plan has {choice['groups']} group(s), {choice['micro_batches']} micro-batch(es) "
            f"each; predicted {choice['predicted_vs_sequential']:.3f}x the tasks one after another ({choice['cost_model']})")
    return choices


def prepare_all(workers: list[Worker], rows: int, seq: int, threads: int, warmup: bool = True) -> list[dict]:
    for w in workers:
        w.send(op="prepare", rows=rows, seq=seq, threads=threads, warmup=warmup)
    return [w.receive() for w in workers]


def train_all(workers: list[Worker], steps: int) -> list[dict]:
    for w in workers:
        w.send(op="train", steps=steps)
    return [w.receive() for w in workers]


def interleaved(jobs: dict[str, list[Worker]], steps: int) -> dict[str, list[dict]]:
    """Timed steps round-robin: one step of every job's every process in turn, `steps` times over,
    so that load from elsewhere on the machine hits all configurations alike. Every other round runs
    in reverse order (A B C, C B A, ...): no configuration always steps right after the same one."""
    records = {name: [] for name in jobs}
    order = [(name, w) for name, procs in jobs.items() for w in procs]
    for k in range(steps):
        for name, w in (order if k % 2 == 0 else order[::-1]):
            records[name].extend(train_all([w], 1))
        log(f"  timed round {k + 1}/{steps} done")
    return records


def sequential_figures(records: list[dict]) -> dict:
    """Throughput over the summed timed seconds; memory summed over the distinct processes. Also the
    median of the per-step rates, which one step stalled by load from elsewhere cannot move."""
    seconds = sum(r["seconds"] for r in records)
    peaks: dict[int, float] = {}
    for r in records:
        peaks[r["pid"]] = max(peaks.get(r["pid"], 0.0), r["peak_rss_mb"])
    return {"tokens_per_s": sum(r["tokens"] for r in records) / seconds, "mem_mb": sum(peaks.values()),
            "seconds": seconds, "max_process_mb": max(peaks.values()),
            "tokens_per_s_median": statistics.median(r["tokens"] / r["seconds"] for r in records),
            "step_seconds": [r["seconds"] for r in records], "step_tokens": [r["tokens"] for r in records]}


def paired_ratio(a: dict, b: dict) -> float:
    """Median over the timed rounds of a's rate / b's rate in the SAME round: a and b step back to back
    in each round, so drift of the machine's speed over the rounds (10-15% over minutes on this VM)
    cancels within each pair."""
    rates = lambda f: [t / s for t, s in zip(f["step_tokens"], f["step_seconds"])]  # noqa: E731
    return statistics.median(x / y for x, y in zip(rates(a), rates(b)))


def measure_separate_concurrent(separate: list[Worker], shape: Shape, steps: int, threads: int) -> dict:
    # already warm at this shape (the interleaved rounds): fresh data, the new thread count, then all
    # start their timed steps together
    prepare_all(separate, shape.rows, shape.seq, threads, warmup=False)
    results = train_all(separate, steps)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "mem_mb": sum(r["peak_rss_mb"] for r in results), "seconds": wall}


def measure_point(workers: dict, shape: Shape, args, ram_mb: float) -> dict:
    """Every configuration at one sweep point: warm-ups, interleaved timed steps, then the concurrent run."""
    n = args.tasks
    jobs = {"separate_seq": workers["separate"], "switch": [workers["switch"]],
            "muxtune": [workers["muxtune"]], "planned": [workers["planned"]], "single_adapter_limit": [workers["limit"]]}
    rows = {name: n * shape.rows if name == "single_adapter_limit" else shape.rows for name in jobs}
    for name, procs in jobs.items():
        for w in procs:  # one at a time: a warm-up step never overlaps another process's work
            answer = prepare_all([w], rows[name], shape.seq, args.threads)[0]
            if name == "muxtune":
                mux_step = answer["warmup_seconds"]
    rounds = max(args.steps, math.ceil(args.min_seconds / mux_step))
    log(f"t={shape.tokens}: all {n + 4} processes warm; {rounds} timed rounds")
    out = {name: sequential_figures(recs) for name, recs in interleaved(jobs, rounds).items()}
    out["rounds"] = rounds
    for name in jobs:
        log(f"t={shape.tokens} {name}: {out[name]['tokens_per_s']:.1f} tok/s, {out[name]['mem_mb']:.0f} MB")
    out["separate_concurrent"] = None
    if not args.no_concurrent and n * out["separate_seq"]["max_process_mb"] < MEMORY_SHARE * ram_mb:
        out["separate_concurrent"] = measure_separate_concurrent(workers["separate"], shape, rounds,
                                                                  args.concurrent_threads)
        log(f"t={shape.tokens} separate_concurrent: {out['separate_concurrent']['tokens_per_s']:.1f} tok/s")
    return out


def start_workers(args, ram_mb: float, plan: dict) -> dict:
    """All processes live for the whole sweep (setup is never timed). The first separate process
    starts alone: its size tells whether N + 4 of them fit in RAM. `plan`: the planned arm's Plan."""
    logdir = Path(tempfile.mkdtemp(prefix="mux_vs_separate."))
    ranks = ranks_for(args.tasks)
    spawn = lambda config, rks, i=0: Worker(config, args.model, rks, i, args.threads, logdir)  # noqa: E731
    first = spawn("separate", ranks, 0)
    rss = first.ready()["peak_rss_mb"]
    need = (args.tasks + 4) * rss * 1.5
    if need > MEMORY_SHARE * ram_mb:
        first.close()
        raise SystemExit(f"{args.tasks} tasks need ~{need:.0f} MB of worker processes (one is ~{rss:.0f} MB "
                         f"after setup) but only {MEMORY_SHARE * ram_mb:.0f} MB is budgeted: use fewer --tasks")
    workers = {"separate": [first] + [spawn("separate", ranks, i) for i in range(1, args.tasks)],
               "switch": spawn("switch", ranks), "muxtune": spawn("muxtune", ranks),
               "limit": spawn("limit", ranks[:1]),
               "planned": Worker("planned", args.model, ranks, 0, args.threads, logdir, plan)}
    log(f"started {args.tasks + 4} worker processes (stderr logs in {logdir})")
    try:
        for w in all_workers(workers):
            w.ready()
    except BaseException:
        close_all(workers)
        raise
    log("all workers ready")
    return workers


def all_workers(workers: dict) -> list[Worker]:
    return workers["separate"] + [workers["switch"], workers["muxtune"], workers["planned"], workers["limit"]]


def close_all(workers: dict) -> None:
    for w in all_workers(workers):
        w.close()


def best_separate(point: dict) -> float:
    return max(point[c]["tokens_per_s"] for c in ("separate_seq", "separate_concurrent") if point[c])


def summarize(args, shapes: list[Shape], points: list[dict], choices: list[dict]) -> dict:
    sweep = []
    for shape, point, choice in zip(shapes, points, choices):
        entry = {"tokens_per_task": shape.tokens, "rows": shape.rows, "seq_len": shape.seq, "rounds": point["rounds"]}
        for config in CONFIGS:
            r = point[config]
            entry[config] = None if r is None else {k: rounded(v) for k, v in r.items() if k != "max_process_mb"}
        mux = point["muxtune"]
        entry["mux_vs_separate"] = round(mux["tokens_per_s"] / best_separate(point), 3)
        entry["mux_vs_limit"] = round(mux["tokens_per_s"] / point["single_adapter_limit"]["tokens_per_s"], 3)
        entry["memory_ratio"] = round(point["separate_seq"]["mem_mb"] / mux["mem_mb"], 3)
        robust_separate = max(point["separate_seq"]["tokens_per_s_median"],
                              (point["separate_concurrent"] or {}).get("tokens_per_s", 0.0))
        entry["mux_vs_separate_median"] = round(mux["tokens_per_s_median"] / robust_separate, 3)
        entry["mux_vs_limit_median"] = round(
            mux["tokens_per_s_median"] / point["single_adapter_limit"]["tokens_per_s_median"], 3)
        entry["mux_vs_limit_paired"] = round(paired_ratio(mux, point["single_adapter_limit"]), 3)
        # the planner's choice, and what it measured against the tasks one after another
        entry["planned_groups"], entry["planned_micro_batches"] = choice["groups"], choice["micro_batches"]
        entry["planned_predicted_vs_sequential"] = round(choice["predicted_vs_sequential"], 3)
        entry["planned_vs_sequential"] = round(point["planned"]["tokens_per_s"] / point["separate_seq"]["tokens_per_s"], 3)
        entry["planned_vs_sequential_median"] = round(
            point["planned"]["tokens_per_s_median"] / point["separate_seq"]["tokens_per_s_median"], 3)
        sweep.append(entry)
    first = points[0]
    figures = {
        "throughput_ratio": sweep[0]["mux_vs_separate"],
        # what ANY fused executor could reach here: one adapter over the same tokens vs the best separate
        # arm. Fusion saves no FLOPs, so below 1.5 the throughput target is out of reach on this machine.
        "throughput_ceiling": round(first["single_adapter_limit"]["tokens_per_s"] / best_separate(first), 3),
        # muxtune and the limit step back to back in every round: each round's pair is one side-by-side
        # measurement, their median the figure (the ratio of summed seconds is kept as limit_ratio_total)
        "limit_ratio": min(e["mux_vs_limit_paired"] for e in sweep),
        "memory_ratio": sweep[0]["memory_ratio"],
        "memory_ratio_min": min(e["memory_ratio"] for e in sweep),
        # issue 26: with the planner's choice, never slower than the tasks one after another (>= 1)
        "planned_vs_sequential": min(e["planned_vs_sequential"] for e in sweep),
    }
    robust = {  # the same two ratios from median step rates (separate_concurrent has one wall time only)
        "throughput_ratio_median": sweep[0]["mux_vs_separate_median"],
        "limit_ratio_median": min(e["mux_vs_limit_median"] for e in sweep),
        "limit_ratio_total": min(e["mux_vs_limit"] for e in sweep),
        "planned_vs_sequential_median": min(e["planned_vs_sequential_median"] for e in sweep),
    }
    applies = {"throughput_ratio": shapes[0].tokens <= 64, "limit_ratio": True, "memory_ratio": args.tasks == 8}
    # None: the target is not stated for this setup (it is for <= 64 tokens/task and N = 8)
    met = {k: (figures[k] >= TARGETS[k] if applies[k] else None) for k in TARGETS}
    return {"model": args.model, "profile": args.profile, "device": args.device, "dtype": args.dtype, "tasks": args.tasks, "steps": args.steps, "min_seconds": args.min_seconds,
            "ranks": ranks_for(args.tasks),
            "malloc": allocator.in_use(),  # every worker's too: the forkserver is this process's child
            "threads": args.threads, "concurrent_threads": args.concurrent_threads, "sweep": sweep,
            **figures, "targets": TARGETS, "targets_met": met, **robust,
            "elapsed_s": round(time.perf_counter() - START_TIME, 1)}


def rounded(value):
    return [round(v, 3) for v in value] if isinstance(value, list) else round(value, 3)


def table(shape: Shape, point: dict) -> pd.DataFrame:
    rows = []
    for config in CONFIGS:
        r = point[config]
        rows.append({"tokens_per_task": shape.tokens, "config": config,
                     "tokens_per_s": None if r is None else round(r["tokens_per_s"], 1),
                     "peak_rss_mb": None if r is None else round(r["mem_mb"], 0)})
    return pd.DataFrame(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"tiny smoke run: {QUICK}")
    parser.add_argument("--model", help=f"backbone (default {FULL['model']})")
    parser.add_argument("--tasks", type=int, help=f"number of tasks N (default {FULL['tasks']})")
    parser.add_argument("--sweep", help=f"per-task micro-batch tokens, comma-separated (default {FULL['sweep']})")
    parser.add_argument("--steps", type=int, help=f"timed rounds per sweep point, at least (default {FULL['steps']})")
    parser.add_argument("--min-seconds", type=float,
                        help="more rounds where muxtune's timed steps would last less than this "
                             f"(default {FULL['min_seconds']}; --quick {QUICK['min_seconds']})")
    parser.add_argument("--profile", help="the profile CSV the planned arm's CostModel reads (default: this "
                        "device's stored profile, else one measured now; --quick: the shipped tiny-llama one)")
    parser.add_argument("--plan-hardware", help="price the planned arm with the analytic CostModel of this "
                        "catalog GPU instead (`this`: the GPU here; nothing measured)")
    parser.add_argument("--max-seq", type=int, default=256,
                        help="longest sequence; a task's tokens split into tokens // max_seq rows (default 256)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every process (default 2)")
    parser.add_argument("--concurrent-threads", type=int, default=1,
                        help="torch threads of each process in separate_concurrent (default 1: N processes "
                             "share the cores; 2 each oversubscribes them N-fold)")
    parser.add_argument("--no-concurrent", action="store_true", help="skip separate_concurrent")
    parser.add_argument("--device", default="cpu", help="where every arm's backbone runs: cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="backbone dtype (adapters train in fp32 either way; default float32)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sweep = sorted(int(t) for t in str(args.sweep).split(","))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` that stops the workers
    shapes = [shape_for(t, args.max_seq) for t in args.sweep]
    ram_mb = total_ram_mb()
    start_forkserver(args.threads, args.device, args.dtype)
    log(f"{args.model}, {args.tasks} tasks, sweep {args.sweep} tokens/task, at least {args.steps} timed rounds, "
        f"RAM {ram_mb:.0f} MB")
    choices = plan_sweep(args, shapes, ram_mb)
    points = []
    for shape, choice in zip(shapes, choices):
        workers = start_workers(args, ram_mb, choice["plan"])  # fresh processes for every point (module docstring)
        try:
            points.append(measure_point(workers, shape, args, ram_mb))
        finally:
            close_all(workers)
        print(table(shape, points[-1]).to_string(index=False), "\n", flush=True)
    result = summarize(args, shapes, points, choices)
    columns = ("tokens_per_task", "mux_vs_separate", "mux_vs_limit", "memory_ratio", "mux_vs_separate_median",
               "mux_vs_limit_median", "planned_groups", "planned_vs_sequential")
    print(pd.DataFrame([{k: e[k] for k in columns}
                        for e in result["sweep"]]).to_string(index=False))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    allocator.reexec()  # train on the malloc the product trains on (muxtune/allocator.py)
    main()
