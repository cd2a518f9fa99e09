"""Where a worker's time goes, and what its backbone holds now: backbones/<model>/status.json.

The worker times each part of its loop (`PhaseClock.phase`) and rewrites status.json (atomically) at
every join and leave and at most once a second otherwise. Two readers:

    GET /admin/api/state   the operator's page: fusion groups, memory used vs the limit, busy fraction
    benchmarks/service.py  the service's own costs the CostModel does not price (worker start-up, file
                           validation, joining, re-planning, the per-step events and checkpoint), which the
                           cluster simulator takes as `ServiceOverheads` (simulator/cluster.py)

status.json:
    pid, model, started_at (process start), ready_at (backbone loaded), written_at   unix seconds
    groups                  the fusion groups now (job ids)
    memory_bytes            the worker's resident memory (CPU) or allocated device memory (CUDA)
    memory_limit_bytes      the admission limit of the backbone
    phases                  {name: {count, seconds}}: step (training), boundary / events / checkpoint (every
                            step's fixed costs), validate / join / leave / requests (count: jobs), change
                            (a re-plan + checkpoint after a join or leave)
    steps_by_jobs           {jobs training: {count, step_seconds, overhead_seconds}}: steps by how many jobs
                            trained, their training time and the fixed costs paid with them
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

WRITE_EVERY_S = 1.0
PER_STEP = ("boundary", "events", "checkpoint")  # parts every step pays (the rest: per job or per change)
CHANGES = ("validate", "join", "leave", "requests", "change")


class Tally:
    """The name and count a timed part is booked under: `did(n, name)` books a part that did n things."""

    def __init__(self, name: str):
        self.name, self.count = name, 1

    def did(self, count: int, name: str) -> int:
        if count:
            self.name, self.count = name, int(count)
        return count


def resident_bytes(device: str) -> int:
    """Memory the worker holds now: allocated CUDA memory on a GPU, the process's resident set on the CPU."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.Process().memory_info().rss)


class PhaseClock:
    def __init__(self, path: Path, model: str, device: str, memory_limit_bytes: int):
        import psutil

        self.path, self.device = Path(path), device
        self.state = {"pid": os.getpid(), "model": model, "started_at": psutil.Process().create_time(), "ready_at": time.time(),
                      "written_at": None, "groups": [], "memory_bytes": 0, "memory_limit_bytes": memory_limit_bytes,
                      "phases": {}, "steps_by_jobs": {}}
        self.last_write = 0.0
        self.pending = 0.0  # per-step fixed costs since the last training step
        self.dirty = True  # a join or leave not yet in status.json
        self.step_seconds_seen = 0.0

    @contextmanager
    def phase(self, name: str):
        """Time a part of the loop as `name` (or what `did` renames it to); the fixed per-step parts
        (boundary, events, checkpoint) are also added to the next `stepped`."""
        tally = Tally(name)
        start = time.perf_counter()
        try:
            yield tally
        finally:
            seconds = time.perf_counter() - start
            entry = self.state["phases"].setdefault(tally.name, {"count": 0, "seconds": 0.0})
            entry["count"] += tally.count
            entry["seconds"] += seconds
            if tally.name in PER_STEP:
                self.pending += seconds
            self.dirty |= tally.name in CHANGES

    def stepped(self, jobs: int, groups: list[list[str]]) -> None:
        """A training step of `jobs` jobs is done: its time and the fixed costs since the last one."""
        step = self.state["phases"]["step"]
        entry = self.state["steps_by_jobs"].setdefault(str(jobs), {"count": 0, "step_seconds": 0.0,
                                                                   "overhead_seconds": 0.0})
        entry["count"] += 1
        entry["step_seconds"] += step["seconds"] - self.step_seconds_seen
        entry["overhead_seconds"] += self.pending
        self.step_seconds_seen, self.pending = step["seconds"], 0.0
        self.write(groups)

    def idle(self, groups: list[list[str]]) -> None:
        """No job is training: what the boundaries cost meanwhile belongs to no step."""
        self.pending = 0.0
        self.write(groups)

    def write(self, groups: list[list[str]]) -> None:
        """Rewrite status.json after a join or leave, else at most once every WRITE_EVERY_S."""
        if not self.dirty and time.time() - self.last_write < WRITE_EVERY_S:
            return
        self.last_write, self.dirty = time.time(), False
        self.state.update(written_at=self.last_write, groups=[list(g) for g in groups if g],
                          memory_bytes=resident_bytes(self.device))
        partial = self.path.with_name(f".{self.path.name}.partial")
        partial.write_text(json.dumps(self.state))
        partial.replace(self.path)


def read_status(path: Path) -> dict | None:
    """A worker's status.json, or None when it has not written one (or is mid-way through the first)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
