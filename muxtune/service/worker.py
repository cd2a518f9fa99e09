"""One worker process per base model: it loads the backbone once and trains every admitted job of that
model multiplexed on it (executor/trainer.py), never talking HTTP. Between two steps it reads the
state folder's database (`boundary`):

    requests     a running job to cancel or pause (written by the server)
    validating   each new job's files are read as training will read them (data.inspect_file); a
                 malformed record fails the job here, the message naming the file and its line
    queued       jobs join the running backbone at this step boundary, through the join machinery
                 `muxtune submit` uses (spool.apply: admitted by the memory model, joining the least
                 busy fusion group); one that does not fit, or finds max_tenants busy, stays queued
    replan       after any join or leave the planner chooses the fusion groups of the backbone's jobs
                 now (planning.decide: planner/plan.py on this one device, priced by the calibrated
                 stored profile) and the trainer takes them from the next step on; the simulation of
                 the jobs' remaining steps, each leaving as it ends, gives every job's estimated_finish

After a step (`after_step`) it writes each job's metrics event (once: events are keyed by step), a
job checkpoint at each evaluation, finishes the jobs that ended (adapter, results CSV as a
"fine-tune-results" file, status) and checkpoints the backbone's jobs (executor/checkpoint.py).

Crash safety: after a kill -9 the next worker restores the jobs the manifest names and the database
still calls running, at the manifest's step, so they continue bit for bit as if never stopped; a job
that joined after that checkpoint joins again from its start. Steps re-run after the checkpoint write
the same events again, which the store keeps once.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import traceback

import muxtune  # noqa: F401  first: keeps the checkout root's bare names off sys.path
from muxtune.errors import MuxTuneError
from muxtune.service import planning
from muxtune.service.config import ServiceConfig
from muxtune.service.jobs import fine_tuned_model_name
from muxtune.service.store import Store, new_id, now
from muxtune.service.timing import PhaseClock
from muxtune.spec import Alignment, FusionGroup, Plan, TaskSpec

IDLE_POLL_S = 0.2


class Worker:
    def __init__(self, store: Store, config: ServiceConfig, model: str, parent: int | None = None):
        import torch

        from muxtune.executor.backbone import load_backbone
        from muxtune.executor.trainer import MultiplexedTrainer
        from muxtune.planning import free_memory_gib
        from muxtune.run import DTYPES

        self.store, self.config, self.model, self.parent = store, config, model, parent
        self.run_dir = store.backbone_dir(model)
        device = "cuda:0" if config.device == "cuda" else config.device
        if config.threads:
            torch.set_num_threads(config.threads)
        self.backbone = load_backbone(model, device=device, dtype=DTYPES[config.dtype])
        self.alignment = Alignment()
        self.adapter_params: dict = {}  # admission's per-task parameter counts, computed once per job
        self.db = store.connect()
        self.trainer = MultiplexedTrainer(self.backbone, [], {}, groups=[[]], alignment=self.alignment)
        self.manifest = None
        self.pricing = planning.Pricing(model, device, DTYPES[config.dtype], config.profile)
        # the planner's own process when it plans in the background (planning.PlannerProcess)
        remote = planning.PlannerProcess(model, device, config.dtype, config.profile) if config.plan_in_background \
            else None
        self.planner = planning.Background(remote.decide if remote else planning.decide_safely)
        self.waited: set[tuple[str, str]] = set()  # (job, why) waiting events written by this worker
        self.memory_gib = config.memory_limit_gib or free_memory_gib(device)
        self.clock = PhaseClock(self.run_dir / "status.json", model, device, int(self.memory_gib * 2**30))
        self.resume()
        self.stale = bool(self.trainer.runs)  # resumed jobs are planned again at the first boundary

    # --- start: the checkpoint of the jobs still running ---------------------------------------------

    def resume(self) -> None:
        from muxtune.executor import checkpoint
        from muxtune.executor.trainer import MultiplexedTrainer

        running = {r["id"] for r in self.db.execute("SELECT id FROM jobs WHERE model = ? AND status = 'running'",
                                                     (self.model,))}
        manifest = None
        if (checkpoint.checkpoint_dir(self.run_dir) / "manifest.json").exists():
            manifest = checkpoint.load_manifest(self.run_dir)
            tasks = {n: e for n, e in manifest["tasks"].items() if n in running}
            manifest = {**manifest, "tasks": tasks}
        if manifest and manifest["tasks"]:
            specs = [TaskSpec.model_validate(e["spec"]) for e in manifest["tasks"].values()]
            examples, validation = {}, {}
            for spec in specs:
                examples[spec.name], valid, _ = self.load_data(spec)
                if valid is not None:
                    validation[spec.name] = valid
            groups = [[n for n in g if n in manifest["tasks"]] for g in manifest["groups"]]
            groups = [g for g in groups if g] or [[]]
            self.trainer = MultiplexedTrainer(self.backbone, specs, examples, groups=groups,
                                              alignment=self.alignment, validation=validation)
            checkpoint.restore(self.trainer, self.run_dir, manifest)
            self.manifest = manifest
            with self.store.transaction(self.db):
                for name, run in self.trainer.runs.items():
                    self.store.add_event(self.db, name, f"Worker restarted: resuming from the checkpoint at step "
                                         f"{run.step}", f"resumed-at-{run.step}")
        # a job that joined after the last checkpoint joins again from its start
        again = running - set(self.trainer.runs)
        with self.store.transaction(self.db):
            for job_id in again:
                self.db.execute("UPDATE jobs SET status = 'queued' WHERE id = ? AND status = 'running'", (job_id,))

    def load_data(self, spec: TaskSpec):
        from muxtune.executor.validation import load_task_data

        return load_task_data(spec, self.backbone.tokenizer, spec.name)

    # --- the loop ------------------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            if self.parent is not None and os.getppid() != self.parent:
                return  # the server is gone; the next one starts its own worker (which waits for our lock)
            self.boundary()
            if self.trainer.active:
                before = {name: run.step for name, run in self.trainer.runs.items()}
                jobs = len(self.trainer.active)
                with self.clock.phase("step"):
                    self.trainer.step()
                self.after_step(before)
                self.clock.stepped(jobs, self.trainer.groups)
            else:
                self.clock.idle(self.trainer.groups)
                time.sleep(IDLE_POLL_S)

    def boundary(self) -> None:
        # each part is timed as "boundary" (a step's fixed cost) unless it did something (status.json)
        with self.clock.phase("boundary") as phase:
            phase.did(self.collect_plan(), "plan")
        with self.clock.phase("boundary") as phase:
            changed = phase.did(self.apply_requests(), "requests")
        with self.clock.phase("boundary") as phase:
            phase.did(self.validate_new_jobs(), "validate")
        with self.clock.phase("boundary") as phase:
            changed |= phase.did(self.admit_queued(), "join")
        if changed or self.stale:
            with self.clock.phase("change"):
                self.replan()
                self.save_checkpoint()

    def after_step(self, before: dict[str, int]) -> None:
        stepped = [run for name, run in self.trainer.runs.items() if run.step > before.get(name, 0)]
        self.progressed()
        with self.clock.phase("events"), self.store.transaction(self.db):
            for run in stepped:
                metrics = step_metrics(run)
                total = run.total_steps
                message = f"Step {run.step}/{total}: training loss={metrics['train_loss']:.4f}"
                if metrics.get("valid_loss") is not None:
                    message += f", validation loss={metrics['valid_loss']:.4f}"
                    self.store.add_checkpoint(self.db, run.spec.name, run.step, metrics, self.model_name(run.spec.name))
                self.store.add_event(self.db, run.spec.name, message, f"step-{run.step}", type="metrics", data=metrics)
        ended = [name for name, run in self.trainer.runs.items() if run.status != "running" or run.done]
        for name in ended:
            with self.clock.phase("leave"):
                self.finish(name)
        if ended:
            with self.clock.phase("change"):
                self.replan()
                self.save_checkpoint()
        elif len(self.trainer.step_times) % self.config.checkpoint_every == 0:
            with self.clock.phase("checkpoint"):
                self.save_checkpoint()

    def replan(self) -> None:
        """Ask the planner for the fusion groups of the jobs on the backbone now, and the simulator for
        when each ends; the trainer fuses by the new groups from the next step on (a job's result does
        not depend on its group, DESIGN.md). No answer: the groups stay, estimated_finish is null.
        With plan_in_background (the default) the planner searches in a thread and the backbone trains
        on meanwhile, a joining job in the least busy group; its answer is carried out at the first step
        boundary after it arrives (`collect_plan`)."""
        self.stale = False
        runs = planning.snapshot({run.spec.name: run for run in self.trainer.active})
        params = {name: sum(counts.values()) for name, counts in self.adapter_params.items()}
        if self.config.plan_in_background:
            self.planner.request(runs, self.pricing, self.memory_gib, params)
        else:
            self.carry_out(runs, planning.decide_safely(runs, self.pricing, self.memory_gib, params), time.time())

    def collect_plan(self) -> int:
        """A background decision that arrived: carried out if the backbone still has the jobs it was
        made for (else a newer one is on its way)."""
        finished = self.planner.take()
        if finished is None or set(finished[0]) != {run.spec.name for run in self.trainer.active}:
            return 0
        self.carry_out(*finished)
        return 1

    def carry_out(self, runs: dict, decision: planning.Decision, at: float) -> None:
        """The planner's groups from the next step on; each job's estimated_finish and event."""
        if decision.groups is not None:
            self.trainer.groups = decision.groups
        groups = self.trainer.groups
        jobs = hashlib.sha256(" ".join(sorted(runs)).encode()).hexdigest()[:8]  # one event per job set and step
        with self.store.transaction(self.db):
            for name, run in runs.items():
                finish = decision.finish.get(name)
                self.db.execute("UPDATE jobs SET estimated_finish = ? WHERE id = ?",
                                (None if finish is None else int(at + finish), name))
                if finish is not None:
                    group = next(g for g in groups if name in g)
                    self.store.add_event(self.db, name, f"Estimated finish in {finish:.0f} s: {run.total_steps - run.step} "
                                         f"steps left, fused with {len(group) - 1} of the backbone's {len(runs) - 1} "
                                         f"other job(s) in group {groups.index(group) + 1} of {len(groups)} (planner)",
                                         f"estimate-{run.step}-{jobs}")
                if decision.why:
                    self.store.add_event(self.db, name, f"No estimated finish: {decision.why}", "no-estimate",
                                         level="warn")

    def progressed(self) -> None:
        """A step completed: the supervisor's crash count of this backbone starts again (supervisor.py)."""
        (self.run_dir / "progress").write_text(f"{len(self.trainer.step_times)}\n")

    def save_checkpoint(self) -> None:
        from muxtune.executor import checkpoint

        self.manifest = checkpoint.save(self.trainer, self.run_dir, self.model, self.manifest)
        # a resumed paused job's own checkpoint is dropped only once the backbone's names it
        for name in self.trainer.runs:
            paused = self.store.paused_dir(name)
            if paused.exists():
                shutil.rmtree(paused, ignore_errors=True)

    def model_name(self, job_id: str) -> str:
        row = self.db.execute("SELECT org, request FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return fine_tuned_model_name(self.model, row["org"], json.loads(row["request"]).get("suffix"), job_id)

    # --- between steps: requests, validation, joining ------------------------------------------------

    def apply_requests(self) -> bool:
        from muxtune.executor import checkpoint

        rows = self.db.execute("SELECT id, requested FROM jobs WHERE model = ? AND status = 'running' AND "
                               "requested IS NOT NULL", (self.model,)).fetchall()
        for row in rows:
            job_id, run = row["id"], self.trainer.runs.get(row["id"])
            if run is None:
                continue
            if row["requested"] == "cancel":
                self.trainer.cancel(job_id, reason=f"cancelled at step {run.step}")
                self.finish(job_id)
            else:  # pause: its own checkpoint, then it leaves the backbone until resumed
                tensors, state = checkpoint._task_payload(run)
                folder = self.store.paused_dir(job_id)
                shutil.rmtree(folder, ignore_errors=True)
                checkpoint._write_task(folder / "task", tensors, state)
                self.detach(job_id)
                with self.store.transaction(self.db):
                    self.db.execute("UPDATE jobs SET status = 'paused', requested = NULL, estimated_finish = NULL "
                                    "WHERE id = ?", (job_id,))
                    self.store.add_event(self.db, job_id, f"Fine-tuning job paused at step {run.step}",
                                         f"paused-at-{run.step}")
        return bool(rows)

    def validate_new_jobs(self) -> int:
        from muxtune.executor.data import DataOptions, inspect_file

        rows = self.db.execute("SELECT * FROM jobs WHERE model = ? AND status = 'validating_files' ORDER BY seq",
                               (self.model,)).fetchall()
        for row in rows:
            spec = TaskSpec.model_validate_json(row["spec"])
            error = None
            for param, file_id, path in (("training_file", row["training_file"], spec.data),
                                         ("validation_file", row["validation_file"], spec.validation_data)):
                if file_id is None:
                    continue
                try:
                    report = inspect_file(path, self.backbone.tokenizer, spec.max_seq_len, DataOptions.of(spec))
                    if not report.examples:
                        raise MuxTuneError(f"{path}: no usable examples ({report.records} records)")
                except MuxTuneError as exc:  # the user sees their file's id, not our folder
                    error = {"code": f"invalid_{param}", "param": param,
                             "message": str(exc).replace(str(path), file_id)}
                    break
            with self.store.transaction(self.db):
                if error is None:
                    done = self.db.execute("UPDATE jobs SET status = 'queued' WHERE id = ? AND status = "
                                           "'validating_files'", (row["id"],)).rowcount
                    if done:
                        self.store.add_event(self.db, row["id"], "Files validated, moving job to queued state",
                                             "validated")
                else:
                    done = self.db.execute("UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE id = ? "
                                           "AND status = 'validating_files'",
                                           (json.dumps(error), now(), row["id"])).rowcount
                    if done:
                        self.store.add_event(self.db, row["id"], f"Validation failed: {error['message']}", "failed",
                                             level="error")
        return len(rows)

    def admit_queued(self) -> int:
        from muxtune import admission, spool
        from muxtune.executor import checkpoint

        rows = self.db.execute("SELECT id, spec FROM jobs WHERE model = ? AND status = 'queued' ORDER BY seq",
                               (self.model,)).fetchall()
        joined = 0
        for row in rows:
            job_id, spec = row["id"], TaskSpec.model_validate_json(row["spec"])
            if len(self.trainer.active) >= self.config.max_tenants:
                self.wait(job_id, "full", f"Queued: the backbone trains its most ({self.config.max_tenants}) jobs")
                break
            try:
                examples, valid, _ = self.load_data(spec)
            except MuxTuneError as exc:
                self.fail(job_id, "invalid_training_file", str(exc).replace(str(spec.data), row["id"]))
                continue

            def admit(trainer, spec, group):
                active = [r.spec for r in trainer.active] + [spec]
                fused = Plan(groups=[FusionGroup(tasks=[s.name for s in active], devices=["this"])],
                             alignment=self.alignment)
                admission.admit(self.backbone.model, active, fused, self.config.memory_limit_gib,
                                what=f"job {spec.name}", params=self.adapter_params)

            with self.store.transaction(self.db):  # cancelled meanwhile? then it stays out
                if not self.db.execute("UPDATE jobs SET status = 'running' WHERE id = ? AND status = 'queued'",
                                       (job_id,)).rowcount:
                    continue
            event = {"event": "submitted", "task": job_id, "spec": spec, "examples": examples, "validation": valid}
            spool.apply(self.trainer, [event], admit)
            if event["event"] == "rejected":
                with self.store.transaction(self.db):
                    self.db.execute("UPDATE jobs SET status = 'queued' WHERE id = ? AND status = 'running'", (job_id,))
                self.wait(job_id, "memory", f"Queued: waiting for memory on the backbone ({event['reason']})")
                break  # first come, first served: a later, smaller job does not overtake it
            paused = self.store.paused_dir(job_id) / "task"
            if paused.is_dir():  # a resumed job continues where it was paused
                checkpoint._restore_task(self.trainer.runs[job_id], paused)
            joined += 1
            with self.store.transaction(self.db):
                self.store.add_event(self.db, job_id, f"Fine-tuning job started: joined the {self.model} backbone "
                                     f"with {len(self.trainer.active) - 1} other job(s) at step "
                                     f"{self.trainer.runs[job_id].step}", f"started-{self.trainer.runs[job_id].step}")
        return joined

    def wait(self, job_id: str, why: str, message: str) -> None:
        if (job_id, why) in self.waited:  # said once: a write transaction per step would cost every tenant
            return
        self.waited.add((job_id, why))
        with self.store.transaction(self.db):
            self.store.add_event(self.db, job_id, message, f"waiting-{why}")

    def fail(self, job_id: str, code: str, message: str) -> None:
        with self.store.transaction(self.db):
            self.db.execute("UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, estimated_finish = NULL "
                            "WHERE id = ?", (json.dumps({"code": code, "message": message, "param": None}), now(), job_id))
            self.store.add_event(self.db, job_id, f"Fine-tuning job failed: {message}", "failed", level="error")

    # --- a job that ended ----------------------------------------------------------------------------

    def finish(self, job_id: str) -> None:
        """Record a job that ended (finished, stopped early, failed, cancelled), then take it off the backbone."""
        from muxtune.executor.export import export_adapter
        from muxtune.run import results_csv

        run = self.trainer.runs[job_id]
        if run.status in ("finished", "stopped_early", "running"):
            export_adapter(run.adapter, self.backbone.model, self.backbone.name, self.store.path_of("ftjob", job_id))
            row = self.db.execute("SELECT org, result_files FROM jobs WHERE id = ?", (job_id,)).fetchone()
            results = json.loads(row["result_files"])
            text = results_csv(run).encode()
            file_id = results[0] if results else new_id("file")
            path = self.store.path_of("file", file_id)
            path.with_name(f".{file_id}.partial").write_bytes(text)
            path.with_name(f".{file_id}.partial").replace(path)
            name = self.model_name(job_id)
            with self.store.transaction(self.db):
                if not results:
                    self.db.execute("INSERT INTO files (id, org, purpose, filename, bytes, created_at) VALUES "
                                    "(?, ?, 'fine-tune-results', 'step_metrics.csv', ?, ?)",
                                    (file_id, row["org"], len(text), now()))
                self.store.add_checkpoint(self.db, job_id, run.step, step_metrics(run), name)
                self.db.execute("UPDATE jobs SET status = 'succeeded', finished_at = ?, fine_tuned_model = ?, "
                                "result_files = ?, trained_tokens = ?, estimated_finish = NULL, requested = NULL "
                                "WHERE id = ?", (now(), name, json.dumps([file_id]), run.tokens, job_id))
                if run.status == "stopped_early":
                    self.store.add_event(self.db, job_id, f"Stopped early at step {run.step}: the adapter is the "
                                         f"best one (step {run.best_step}, valid_loss {run.best_loss:.4f})", "early")
                self.store.add_event(self.db, job_id, f"New fine-tuned model created: {name}", "model")
                self.store.add_event(self.db, job_id, "The job has successfully completed", "succeeded")
        elif run.status == "cancelled":
            with self.store.transaction(self.db):
                self.db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ?, estimated_finish = NULL, "
                                "requested = NULL WHERE id = ?", (now(), job_id))
                self.store.add_event(self.db, job_id, f"Fine-tuning job cancelled at step {run.step}", "cancelled")
        else:
            self.fail(job_id, "training_failed", run.reason)
        self.detach(job_id)

    def detach(self, job_id: str) -> None:
        self.trainer.cancel(job_id)
        del self.trainer.runs[job_id]
        for group in self.trainer.groups:
            if job_id in group:
                group.remove(job_id)


def step_metrics(run) -> dict:
    """A step's metrics as OpenAI's metrics events carry them (validation figures at evaluated steps)."""
    evaluation = run.evaluations[-1] if run.evaluations and run.evaluations[-1]["step"] == run.step else None
    return {"step": run.step, "train_loss": run.losses[-1] if run.losses else None,
            "train_mean_token_accuracy": run.accuracies[-1] if run.accuracies else None,
            "valid_loss": evaluation["valid_loss"] if evaluation else None,
            "valid_mean_token_accuracy": evaluation["valid_mean_token_accuracy"] if evaluation else None,
            "total_steps": run.total_steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muxtune.service.worker")
    parser.add_argument("--state", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--parent", type=int, help="exit once this process (the server) is gone")
    args = parser.parse_args(argv)
    store = Store(args.state)
    config = ServiceConfig.model_validate_json((store.root / "service.json").read_text())
    folder = store.backbone_dir(args.model)
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / "worker.lock", "w")  # noqa: SIM115 - held for the process's life
    fcntl.flock(lock, fcntl.LOCK_EX)  # one worker per backbone, also across a server restart
    (folder / "worker.pid").write_text(f"{os.getpid()}\n")
    try:
        Worker(store, config, args.model, args.parent).serve()
    except Exception as exc:  # noqa: BLE001 - logged; the supervisor starts a new worker, which resumes
        traceback.print_exc()
        # the reason on its own too: the log's last line may be another process's (the planner's process
        # dying with its parent prints there as well)
        (folder / "last_error").write_text(f"{type(exc).__name__}: {exc}"[:300])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
