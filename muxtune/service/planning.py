"""What the planner and the simulator say about one backbone's current jobs: the worker asks at every
join and leave (worker.py `replan`), then carries the answer out at the next step boundary.

    pricing = Pricing(model, device, dtype)            the worker's CostModel, found once per method set
    decision = decide(specs, runs, pricing, memory_gib, params)
    decision.groups     the planner's fusion groups (planner/plan.py, a one-device cluster)
    decision.finish     per job: seconds from now until its last step is done (planner.plan.simulate_job)
    decision.why        when there is no answer: why (no trusted profile here, no plan fits)

The CostModel is the stored profile of this model on this kind of device that passes the calibration
check here (profiler.profile.trusted_profile, as `muxtune.run.profile_phase` finds it), never one made
up: a worker that has none does not measure one in the middle of training (minutes, and it would slow
every tenant); its jobs keep their groups and carry estimated_finish = null with the reason as an event.
A provider can name a profile CSV in SERVICE.yaml (`profile:`), taken as it is, as `plan-and-run
--profile` takes one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

PLAN_SECONDS = 2.0  # the planner's time limit per decision: the backbone waits for it at the boundary


@dataclass
class Decision:
    groups: list[list[str]] | None = None
    finish: dict[str, float] = field(default_factory=dict)
    why: str = ""


class Pricing:
    """The CostModel of one backbone, looked up once per set of (PEFT methods, LoRA targets) the jobs
    need: a stored profile covers only what it measured. None (with `why`) when no stored one is trusted."""

    def __init__(self, model: str, device: str, dtype, path: str | None = None):
        self.model, self.device, self.dtype, self.path = model, device, dtype, path
        self.found: dict[tuple, tuple] = {}  # (methods, targets) -> (CostModel or None, why)

    def cost_model(self, specs) -> tuple[object | None, str]:
        from muxtune.spec import method_card

        methods = tuple(sorted({s.peft.method for s in specs}))
        targets = tuple(sorted({t for s in specs if method_card(s.peft.method).targeted for t in s.peft.target_modules}))
        if (methods, targets) not in self.found:
            self.found[(methods, targets)] = self.lookup(list(methods), list(targets))
        return self.found[(methods, targets)]

    def lookup(self, methods: list[str], targets: list[str]) -> tuple[object | None, str]:
        from muxtune.profiler.cost_model import CostModel
        from muxtune.profiler.profile import trusted_profile

        if self.path is not None:  # the provider's choice (SERVICE.yaml `profile:`)
            return CostModel.from_profile(self.path), ""
        found = trusted_profile(self.model, self.device, "quick", self.dtype, methods, targets or None,
                                say=lambda line: None)
        if found is None:
            return None, (f"no stored profile of {self.model} on {self.device} covering {', '.join(methods)} passes "
                          f"the calibration check here (measure one with `muxtune profile --model {self.model}`)")
        return CostModel.from_profile(found[0]), ""


def remaining(spec, run) -> object:
    """The job as the planner sees it now: its steps still to do (the rest of its schedule is its own)."""
    return spec.model_copy(update={"steps": max(1, run.total_steps - run.step)})


def mean_length(run) -> float | None:
    if hasattr(run, "mean_length"):  # a snapshot carries it
        return run.mean_length
    examples = run.sampler.examples
    if not isinstance(examples, list) or not examples:
        return None
    return sum(len(e.input_ids) for e in examples) / len(examples)


def decide(runs: dict, pricing: Pricing, memory_gib: float, params: dict[str, int]) -> Decision:
    """The planner's fusion groups for `runs` (the backbone's active TaskRuns by job id) and each job's
    simulated finish, with the jobs leaving the fused batch as they end (phase by phase)."""
    from muxtune.errors import MuxTuneError
    from muxtune.planner.plan import plan as search
    from muxtune.planner.plan import simulate_job, works_of
    from muxtune.spec import Cluster

    if not runs:
        return Decision(groups=[[]])
    specs = [remaining(run.spec, run) for run in runs.values()]
    cm, why = pricing.cost_model(specs)
    if cm is None:
        return Decision(why=why)
    lengths = {name: length for name, run in runs.items() if (length := mean_length(run)) is not None}
    known = {name: params[name] for name in runs if name in params}
    try:
        result = search(specs, Cluster(devices=1, memory_gib=memory_gib, hardware="this"), cm,
                        time_limit=PLAN_SECONDS, params=known or None, seq_lens=lengths)
    except MuxTuneError as exc:
        return Decision(why=str(exc))
    works = {w.name: w for w in works_of(specs, cm, known or None, lengths)}
    for name, run in runs.items():  # its evaluations are priced too: a forward over its validation set
        if run.validation and run.eval_interval:
            works[name] = replace(works[name], eval_sequences=len(run.validation), eval_every=run.eval_interval)
    steps = {s.name: s.steps for s in specs}
    job = simulate_job(result.plan, works, steps, cm, result.plan.alignment.layout == "chunked")
    return Decision(groups=[list(g.tasks) for g in result.plan.groups], finish=job.finish)


def decide_safely(runs: dict, pricing: Pricing, memory_gib: float, params: dict[str, int]) -> Decision:
    """`decide`, with a failure turned into a Decision saying why: an estimate must never stop training."""
    import traceback

    try:
        return decide(runs, pricing, memory_gib, params)
    except Exception as exc:  # noqa: BLE001 - nor crash-loop the worker
        traceback.print_exc()
        return Decision(why=f"the planner failed ({type(exc).__name__}: {exc})")


def snapshot(runs: dict) -> dict:
    """What `decide` reads of each active TaskRun, copied: a background plan must not see a later step."""
    from types import SimpleNamespace

    # small enough to send to the planner's process: the examples' mean length, not the examples
    return {name: SimpleNamespace(spec=run.spec, total_steps=run.total_steps, step=run.step,
                                  mean_length=mean_length(run), validation=[None] * len(run.validation or []),
                                  eval_interval=run.eval_interval) for name, run in runs.items()}


class PlannerProcess:
    """`decide` in a process of its own, with its own Pricing (its CostModel found there once): the
    planner's Python would otherwise hold the GIL the training loop needs, and a fused step of many
    small jobs took twice as long while it searched. One decision at a time (Background's thread waits
    for it)."""

    def __init__(self, model: str, device: str, dtype: str, path: str | None):
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start_pricing, initargs=(model, device, dtype, path, os.getpid()))

    def decide(self, runs: dict, pricing, memory_gib: float, params: dict[str, int]) -> Decision:
        try:
            return self.pool.submit(_decide_here, runs, memory_gib, params).result()
        except Exception as exc:  # noqa: BLE001 - a broken pool: no estimate, training goes on
            return Decision(why=f"the planner's process failed ({type(exc).__name__}: {exc})")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


_PRICING: Pricing | None = None  # in the planner's process


def _start_pricing(model: str, device: str, dtype: str, path: str | None, worker: int) -> None:
    global _PRICING
    import os

    import torch

    # the lowest CPU priority: on a busy machine a search must wait for training, never slow it (a
    # re-plan at every join and leave of a dozen jobs kept a core busy and fused steps took 2.5x as long)
    os.nice(19)
    torch.set_num_threads(1)
    _exit_with_parent(worker)  # its pid, not getppid(): the worker may be gone (and this one re-parented) already
    _PRICING = Pricing(model, device, getattr(torch, dtype), path)


def _exit_with_parent(parent: int) -> None:
    """End this process once the worker that started it is gone: a worker killed (a crash, the
    supervisor's restart) cannot shut its pool down, and the pool's process would wait for work
    forever, holding a CostModel's memory."""
    import os
    import threading
    import time

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="muxtune-planner-watchdog", daemon=True).start()


def _decide_here(runs: dict, memory_gib: float, params: dict[str, int]) -> Decision:
    return decide_safely(runs, _PRICING, memory_gib, params)


class Background:
    """The planner in a thread, one decision at a time, so the backbone keeps training while it searches
    (seconds for a dozen jobs: every tenant would wait that long at every join and leave). A request
    made while one is being decided replaces any older waiting one: only the newest job set matters.
    `take()` hands over a finished (runs, decision, when it was asked) once."""

    def __init__(self, decide_fn):
        import threading

        self.decide_fn = decide_fn
        self.lock = threading.Lock()
        self.waiting: tuple | None = None
        self.finished: tuple | None = None
        self.thread = None

    def request(self, runs: dict, *args) -> None:
        import threading
        import time

        with self.lock:
            self.waiting = (runs, args, time.time())
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, name="muxtune-planner", daemon=True)
                self.thread.start()

    def _work(self) -> None:
        while True:
            with self.lock:
                if self.waiting is None:
                    self.thread = None
                    return
                (runs, args, at), self.waiting = self.waiting, None
            decision = self.decide_fn(runs, *args)
            with self.lock:
                self.finished = (runs, decision, at)

    def take(self) -> tuple | None:
        with self.lock:
            finished, self.finished = self.finished, None
        return finished

    def busy(self) -> bool:
        with self.lock:
            return self.thread is not None
