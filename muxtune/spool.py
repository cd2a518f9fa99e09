"""Tenants come and go while a run trains: a spool folder `runs/<name>/spool/`, read at step boundaries.

    muxtune submit RUN_DIR task.yaml   validates the task file here, then drops spool/<task>.task.json
    muxtune cancel RUN_DIR TASK        drops spool/<task>.cancel

The running job picks them up after its current step (`poll`): a submitted task's data is loaded, it
passes admission, and its adapter is attached to the already-loaded backbone; a cancelled task stops
and is detached. Handled files move to spool/done/; a submission that cannot be taken (bad data, no
memory, a name in use) is answered with spool/<task>.rejected holding the reason, and the run goes on.
Each file is written atomically (temp file + rename), so the watcher never reads half a file.
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


def poll(trainer, run_dir: Path, load_data, admit) -> list[dict]:
    """Apply the spool's pending submissions and cancellations to the trainer; returns the events.
    `load_data(spec)` returns the task's examples and data stats; `admit(trainer, spec)` raises
    MuxTuneError when the task would not fit. Either error rejects the submission only."""
    spool = spool_dir(run_dir)
    if not spool.is_dir():
        return []
    events = []
    step = len(trainer.step_times)
    for path in sorted(spool.glob("*.task.json")) + sorted(spool.glob("*.cancel")):
        name = path.name.rsplit(".", 2 if path.name.endswith(".task.json") else 1)[0]
        try:
            if path.name.endswith(".cancel"):
                if name not in trainer.runs:
                    raise MuxTuneError(f"cancel: no task {name!r} in this run")
                trainer.cancel(name, reason=f"cancelled at step {trainer.runs[name].step}")
                events.append({"step": step, "task": name, "event": "cancelled"})
            else:
                try:
                    spec = TaskSpec.model_validate(json.loads(path.read_text()))
                except Exception as exc:  # noqa: BLE001 - a hand-edited spool file is bad input
                    raise MuxTuneError(f"{path}: not a task: {exc}") from None
                if spec.name in trainer.runs:
                    raise MuxTuneError(f"submit: a task named {spec.name!r} is already in this run")
                examples, stats = load_data(spec)
                admit(trainer, spec)
                trainer.add_task(spec, examples)
                events.append({"step": step, "task": name, "event": "submitted", "stats": stats})
        except MuxTuneError as exc:
            write_text_atomic(spool / f"{name}.rejected", f"{exc}\n")
            events.append({"step": step, "task": name, "event": "rejected", "reason": str(exc)})
        done = spool / "done"
        done.mkdir(exist_ok=True)
        path.replace(done / path.name)
    return events
