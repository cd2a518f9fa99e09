"""Keeps one live worker process per base model that has work (a job validating, queued or running),
and starts a new one when a worker dies: it resumes that backbone's jobs from their checkpoints.

A worker is `python -m muxtune.service.worker --state DIR --model MODEL`; it takes the backbone's lock
file before touching anything, so a worker left over from a killed server and the new server's worker
never train the same backbone at once (the old one notices its parent is gone and exits).

A worker that dies before completing a step (one that crashes on every step, or while loading) is not
restarted forever: each crash in a row waits twice as long as the one before (restart_backoff_s, 2x,
... capped at a minute), and after `worker_crashes` crashes in a row the backbone's unfinished jobs fail
with error {code: "worker_crashed", message: why, with the worker log's last line}. A worker that
completed a step since it started (it writes backbones/<model>/progress) starts the count again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from muxtune import allocator
from muxtune.service.store import ACTIVE, Store, now

MAX_BACKOFF_S = 60.0


class Supervisor:
    def __init__(self, store: Store, interval: float = 0.5, crashes: int = 5, backoff: float = 1.0):
        self.store, self.interval = store, interval
        self.max_crashes, self.backoff = crashes, backoff
        self.workers: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {}
        self.crashes: dict[str, int] = {}  # per model: crashes in a row without a completed step
        self.started: dict[str, float] = {}  # per model: when its current worker was started
        self.not_before: dict[str, float] = {}  # per model: no restart before this (back-off)
        # the workers train on tcmalloc where installed: their memory is what admission prices (muxtune/allocator.py);
        # made here, not in the supervising thread, where a wrong MUXTUNE_MALLOC (SystemExit) would end it silently
        self.worker_env = allocator.environment({**os.environ, "MUXTUNE_CACHE": str(store.root / "cache")})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="muxtune-supervisor", daemon=True)

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the supervisor must outlive a bad moment (a locked db)
                print(f"supervisor: {type(exc).__name__}: {exc}", file=sys.stderr)
            self._stop.wait(self.interval)

    def check(self) -> None:
        db = self.store.connect()
        try:
            placeholders = ",".join("?" * len(ACTIVE))
            models = {r["model"] for r in db.execute(f"SELECT DISTINCT model FROM jobs WHERE status IN ({placeholders})",
                                                      ACTIVE)}
        finally:
            db.close()
        for model in models:
            proc = self.workers.get(model)
            if proc is not None and proc.poll() is None:
                continue
            if proc is not None and model not in self.not_before:
                # it died (killed, out of memory, a bug): its jobs resume in the next one, after a back-off
                self.restarts[model] = self.restarts.get(model, 0) + 1
                self.crashes[model] = 1 if self.progressed(model) else self.crashes.get(model, 0) + 1
                if self.crashes[model] >= self.max_crashes:
                    self.give_up(model, proc.returncode)
                    del self.workers[model]  # a job created later for this model starts a fresh count
                    self.crashes[model] = 0
                    continue
                delay = min(MAX_BACKOFF_S, self.backoff * 2 ** (self.crashes[model] - 1))
                self.not_before[model] = time.monotonic() + delay
                print(f"supervisor: worker for {model} exited with {proc.returncode}; restarting in {delay:.1f} s "
                      f"(restart {self.restarts[model]}, crash {self.crashes[model]} of {self.max_crashes} in a row)",
                      file=sys.stderr)
            if time.monotonic() < self.not_before.get(model, 0.0):
                continue
            self.not_before.pop(model, None)
            self.started[model] = time.time()
            self.workers[model] = self._spawn(model)

    def progressed(self, model: str) -> bool:
        """Did the worker that just died complete a step (worker.py writes `progress` after each)?"""
        progress = self.store.backbone_dir(model) / "progress"
        return progress.exists() and progress.stat().st_mtime >= self.started.get(model, float("inf"))

    def give_up(self, model: str, returncode: int | None) -> None:
        """Fail the backbone's unfinished jobs: its worker crashed `max_crashes` times in a row."""
        folder = self.store.backbone_dir(model)
        error, log = folder / "last_error", folder / "worker.log"
        if error.exists() and error.stat().st_mtime >= self.started.get(model, float("inf")):
            last = error.read_text(errors="replace").strip()  # what the worker itself said it died of
        else:  # killed without a word (a signal, the OOM killer): the log's last line
            lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
            last = lines[-1].strip()[:300] if lines else "no output"
        message = (f"The training worker for {model} crashed {self.crashes[model]} times in a row without "
                   f"completing a step (last exit status {returncode}: {last}); the job cannot continue")
        error = json.dumps({"code": "worker_crashed", "message": message, "param": None})
        print(f"supervisor: {message}", file=sys.stderr)
        db = self.store.connect()
        try:
            with self.store.transaction(db):
                placeholders = ",".join("?" * len(ACTIVE))
                ids = [r["id"] for r in db.execute(f"SELECT id FROM jobs WHERE model = ? AND status IN ({placeholders})",
                                                   (model, *ACTIVE))]
                for job_id in ids:
                    db.execute("UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, estimated_finish = NULL, "
                               "requested = NULL WHERE id = ?", (error, now(), job_id))
                    self.store.add_event(db, job_id, f"Fine-tuning job failed: {message}", "failed", level="error")
        finally:
            db.close()

    def command(self, model: str) -> list[str]:
        return [sys.executable, "-m", "muxtune.service.worker", "--state", str(self.store.root),
                "--model", model, "--parent", str(os.getpid())]

    def _spawn(self, model: str) -> subprocess.Popen:
        folder = self.store.backbone_dir(model)
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / "worker.log", "ab")  # noqa: SIM115 - the child owns it from here
        proc = subprocess.Popen(self.command(model), env=self.worker_env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        time.sleep(0)  # let it start; its pid is in backbones/<model>/worker.pid once it holds the lock
        return proc
