"""Tenants come and go while a run trains: a spool folder `runs/<name>/spool/`, read at step boundaries.

    muxtune submit RUN_DIR task.yaml   validates the task file here, then drops spool/<task>.task.json
    muxtune cancel RUN_DIR TASK        drops spool/<task>.cancel

The running job picks them up after its current step (`poll`): a submitted task's data is loaded, it
passes admission, and its adapter is attached to the already-loaded backbone; a cancelled task stops
and is detached. Handled files move to spool/done/; a submission that cannot be taken (bad data, no
memory, a name in use) is answered with spool/<task>.rejected holding the reason, and the run goes on.
Each file is written atomically (temp file + rename), so the watcher never reads half a file.

Reading and applying are separate (`decide`, `apply`, `answer`) so a multi-process run can read the
spool on rank 0 alone and have every process apply the same events at the same step
(executor/distributed.py `poll_spool`); one process simply does all three (`poll`).
"""

from __future__ import annotations

import json
from pathlib import Path

from muxtune.errors import MuxTuneError
from muxtune.spec import TaskSpec, load_task, write_text_atomic


def spool_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "spool"


def _live_spool(run_dir: Path) -> Path:
    spool = spool_dir(run_dir)
    if not spool.is_dir():
        raise MuxTuneError(f"{run_dir}: no running job here (its spool/ folder is missing); start one with "
                           f"`muxtune run CONFIG --out {run_dir}`")
    return spool


def submit(run_dir: Path, task_file: Path) -> Path:
    spool = _live_spool(run_dir)
    spec = load_task(task_file)
    path = spool / f"{spec.name}.task.json"
    write_text_atomic(path, spec.model_dump_json() + "\n")
    return path


def cancel(run_dir: Path, task: str) -> Path:
    spool = _live_spool(run_dir)
    if "/" in task or task.startswith("."):
        raise MuxTuneError(f"cancel: {task!r} is not a task name")
    path = spool / f"{task}.cancel"
    write_text_atomic(path, task + "\n")
    return path


def join_group(groups: list[list[str]], active: set[str]) -> int:
    """The fusion group a submitted task joins: the one with the fewest active tasks (the earliest on a
    tie). Deterministic from the run's state alone, so every process of a multi-process run picks the same
    one; it spreads late tenants over the groups instead of growing the first one."""
    return min(range(len(groups)), key=lambda g: (sum(name in active for name in groups[g]), g))


def decide(run_dir: Path, names: set[str], load_data) -> list[dict]:
    """Read the spool's pending files (submissions first, then cancellations, each in name order) into
    events, without touching the trainer: {"event": "submitted", "task", "spec", "examples", "stats"},
    {"event": "cancelled", "task"} or {"event": "rejected", "task", "reason"}; each carries its `file`.
    `names`: the tasks already in the run. `load_data(spec)` returns (examples, data stats). In a
    multi-process run only rank 0 calls this (it alone reads files) and sends the events to the others."""
    spool = spool_dir(run_dir)
    if not spool.is_dir():
        return []
    names, events = set(names), []
    for path in sorted(spool.glob("*.task.json")) + sorted(spool.glob("*.cancel")):
        name = path.name.rsplit(".", 2 if path.name.endswith(".task.json") else 1)[0]
        try:
            if path.name.endswith(".cancel"):
                if name not in names:
                    raise MuxTuneError(f"cancel: no task {name!r} in this run")
                events.append({"event": "cancelled", "task": name, "file": str(path)})
            else:
                try:
                    spec = TaskSpec.model_validate(json.loads(path.read_text()))
                except Exception as exc:  # noqa: BLE001 - a hand-edited spool file is bad input
                    raise MuxTuneError(f"{path}: not a task: {exc}") from None
                if spec.name in names:
                    raise MuxTuneError(f"submit: a task named {spec.name!r} is already in this run")
                # (examples, stats), or (examples, stats, validation examples) where the caller validates
                examples, stats, *validation = load_data(spec)
                names.add(spec.name)
                events.append({"event": "submitted", "task": name, "spec": spec, "examples": examples,
                               "stats": stats, "validation": validation[0] if validation else None,
                               "file": str(path)})
        except MuxTuneError as exc:
            events.append({"event": "rejected", "task": name, "reason": str(exc), "file": str(path)})
    return events


def apply(trainer, events: list[dict], admit) -> None:
    """Carry out decided events on the trainer (every process, in the same order). `admit(trainer, spec,
    group)` raises MuxTuneError when the task would not fit; that, or a task the trainer cannot build,
    turns the submission into a rejection (the event is updated in place). Cancelling a task that has
    already finished or failed changes nothing but its adapter's attachment."""
    for event in events:
        name = event["task"]
        if event["event"] == "cancelled":
            trainer.cancel(name, reason=f"cancelled at step {trainer.runs[name].step}")
        elif event["event"] == "submitted":
            spec = event["spec"]
            active = {run.spec.name for run in trainer.active}
            group = join_group(trainer_groups(trainer), active)
            try:
                admit(trainer, spec, group)
                if event.get("validation") is None:
                    trainer.add_task(spec, event["examples"], group=group)
                else:
                    trainer.add_task(spec, event["examples"], group=group, validation=event["validation"])
                event["group"] = group
            except MuxTuneError as exc:
                event.update(event="rejected", reason=str(exc))


def trainer_groups(trainer) -> list[list[str]]:
    return [list(g) for g in trainer.groups]  # a plan's groups are these lists (MultiplexedTrainer)


def answer(run_dir: Path, events: list[dict], step: int) -> list[dict]:
    """Write spool/<task>.rejected for each rejection, move the handled files to spool/done/, and
    return the events as metrics.json lists them (no data, no spec object)."""
    spool = spool_dir(run_dir)
    done = spool / "done"
    listed = []
    for event in events:
        if event["event"] == "rejected":
            write_text_atomic(spool / f"{event['task']}.rejected", f"{event['reason']}\n")
        done.mkdir(exist_ok=True)
        path = Path(event["file"])
        if path.exists():
            path.replace(done / path.name)
        listed.append({"step": step, **{k: v for k, v in event.items() if k in ("task", "event", "reason", "group",
                                                                                  "stats")}})
    return listed


def poll(trainer, run_dir: Path, load_data, admit) -> list[dict]:
    """One process: apply the spool's pending submissions and cancellations to the trainer at this step
    boundary; returns the events. See `decide` and `apply` for `load_data` and `admit`."""
    events = decide(run_dir, set(trainer.runs), load_data)
    apply(trainer, events, admit)
    return answer(run_dir, events, len(trainer.step_times))
