"""Starting a real `muxtune serve` for the service tests: a free port on 127.0.0.1, its own state
folder, keys made with `muxtune keys create`, and the references a job's adapter is compared with
(the same task trained alone by the executor, `muxtune run`'s execute)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import torch
from reference import write_jsonl
from safetensors.torch import load_file

from muxtune.run import execute
from muxtune.spec import RunConfig, TaskSpec

MODEL = "builtin:tiny-llama"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the tests' one thread (conftest)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_key(state: Path, org: str) -> str:
    done = subprocess.run([sys.executable, "-m", "muxtune.cli", "keys", "create", "--state", str(state), "--org", org],
                          capture_output=True, text=True, env=ENV, check=True)
    return done.stdout.strip()


def make_admin_key(state: Path) -> str:
    """An operator's key (`muxtune keys create --admin`): it opens /admin, the /v1 API refuses it."""
    done = subprocess.run([sys.executable, "-m", "muxtune.cli", "keys", "create", "--admin", "--state", str(state)],
                          capture_output=True, text=True, env=ENV, check=True)
    return done.stdout.strip()


def serve(root: Path, config_text: str, orgs=("acme", "globex"), admin: bool = False) -> tuple["Server", dict]:
    """A started service on a fresh state folder under `root`, with a key per organisation (+ "admin")."""
    server = Server(root / "state", config_text)
    server.state.mkdir()
    keys = {org: make_key(server.state, org) for org in orgs}
    if admin:
        keys["admin"] = make_admin_key(server.state)
    return server.start(), keys


class Server:
    def __init__(self, state: Path, config_text: str = "threads: 1\n", env: dict | None = None):
        self.state, self.env = Path(state), env or ENV
        self.config = self.state.parent / f"{self.state.name}.yaml"
        self.config.write_text(config_text)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> "Server":
        command = [sys.executable, "-m", "muxtune.cli", "serve", "--state", str(self.state), "--port", str(self.port),
                   "--config", str(self.config)]
        self.log = open(self.state.parent / f"{self.state.name}.server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=self.log)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.logs()
            try:
                httpx.get(self.url + "/v1/files", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("server did not start:\n" + self.logs())

    def logs(self) -> str:
        text = (self.state.parent / f"{self.state.name}.server.log").read_text(errors="replace")
        for log in self.state.glob("backbones/*/worker.log"):
            text += f"\n--- {log}\n" + log.read_text(errors="replace")
        return text[-6000:]

    def worker_pid(self, model: str = MODEL) -> int | None:
        from muxtune.service.store import model_slug

        path = self.state / "backbones" / model_slug(model) / "worker.pid"
        return int(path.read_text()) if path.exists() else None

    def kill9(self) -> None:
        """kill -9 the server and its worker, as a power cut would leave them."""
        worker = self.worker_pid()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if worker:
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        worker = self.worker_pid()
        if worker:  # a worker notices its server is gone by itself; make sure in the tests
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass


def client(server: Server, key: str):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def data_files(folder: Path, seed: int, n: int = 12) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return (write_jsonl(folder / f"train{seed}.jsonl", n, seed, 2, 5),
            write_jsonl(folder / f"valid{seed}.jsonl", 4, seed + 1000, 2, 5))


def wait_done(api, job_id: str, timeout: float = 300) -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = api.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"{job_id} still {job.status} after {timeout} s")


def download_adapter(server: Server, key: str, job_id: str, into: Path) -> Path:
    answer = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}/adapter",
                       headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    into.mkdir(parents=True, exist_ok=True)
    zipfile.ZipFile(io.BytesIO(answer.content)).extractall(into)
    return into


def alone(job, train: Path, valid: Path | None, out: Path, **extra) -> dict[str, torch.Tensor]:
    """The job's task trained alone by the executor: its adapter's tensors."""
    hyper = job.hyperparameters
    spec = TaskSpec(name=job.id, data=train, validation_data=valid, peft=job.peft, epochs=hyper.n_epochs,
                    batch_size=hyper.batch_size, lr=2e-4 * hyper.learning_rate_multiplier, seed=job.seed,
                    max_seq_len=job.max_seq_len, eval_every=job.eval_every, **extra)
    execute(RunConfig(name="alone", model=MODEL, tasks=[spec]), out, progress=False)
    return load_file(str(out / "adapters" / job.id / "adapter_model.safetensors"))


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def metrics_steps(api, job_id: str) -> list[int]:
    events = api.fine_tuning.jobs.list_events(job_id, limit=1000).data
    return sorted(e.data["step"] for e in events if e.type == "metrics")


def json_of(answer) -> dict:
    return json.loads(answer.text)
