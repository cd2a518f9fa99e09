"""Keeps one live worker process per base model that has work (a job validating, queued or running),
and starts a new one when a worker dies: it resumes that backbone's jobs from their checkpoints.

A worker is `python -m muxtune.service.worker --state DIR --model MODEL`; it takes the backbone's lock
file before touching anything, so a worker left over from a killed server and the new server's worker
never train the same backbone at once (the old one notices its parent is gone and exits).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from muxtune.service.store import ACTIVE, Store


class Supervisor:
    def __init__(self, store: Store, interval: float = 0.5):
        self.store, self.interval = store, interval
        self.workers: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {}
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
            if proc is not None:  # it died (killed, out of memory, a bug): its jobs resume in the next one
                self.restarts[model] = self.restarts.get(model, 0) + 1
                print(f"supervisor: worker for {model} exited with {proc.returncode}; restarting "
                      f"(restart {self.restarts[model]})", file=sys.stderr)
            self.workers[model] = self._spawn(model)

    def _spawn(self, model: str) -> subprocess.Popen:
        folder = self.store.backbone_dir(model)
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / "worker.log", "ab")  # noqa: SIM115 - the child owns it from here
        env = {**os.environ, "MUXTUNE_CACHE": str(self.store.root / "cache")}
        command = [sys.executable, "-m", "muxtune.service.worker", "--state", str(self.store.root),
                   "--model", model, "--parent", str(os.getpid())]
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        time.sleep(0)  # let it start; its pid is in backbones/<model>/worker.pid once it holds the lock
        return proc
