"""The HTTP server: the OpenAI fine-tuning API under /v1, so the official `openai` client works with
`base_url="http://HOST:PORT/v1"` and a key from `muxtune keys create`.

Every route needs a live key (Authorization: Bearer ...), which names the caller's organisation; every
object is looked up with that organisation, so another organisation's id answers 404 exactly as an
unknown one. Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the
HTTP status the client maps to its exceptions (400, 401, 404, 409, 413, 429).

The server never trains: it stores files and jobs, and writes cancel/pause requests that the model's
worker applies at its next step boundary (muxtune/service/worker.py).
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from muxtune.service.config import ServiceConfig
from muxtune.service.jobs import (BadRequest, JobRequest, build_spec, checkpoint_object, event_object,
                                  file_object, job_object)
from muxtune.service.store import ACTIVE, FINAL, Store, new_id, now

UPLOAD_PURPOSES = ("fine-tune",)
TRAINING_PURPOSES = ("fine-tune",)
WAIT_FOR_WORKER_S = 15.0  # how long cancel/pause wait for the worker to apply them before answering


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def not_found(what: str, object_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"No such {what}: {object_id}", param=param, code="not_found")


def create_app(store: Store, config: ServiceConfig, supervise: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        from muxtune.service.supervisor import Supervisor

        supervisor = None
        if supervise:
            supervisor = Supervisor(store, crashes=config.worker_crashes, backoff=config.restart_backoff_s).start()
        app.state.supervisor = supervisor
        yield
        if supervisor is not None:
            supervisor.stop()

    app = FastAPI(title="MuxTune fine-tuning service", lifespan=lifespan)
    limits = config.limits

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path"))
        return JSONResponse(error_body(f"{param}: {err['msg']}", "invalid_request_error", param or None),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.middleware("http")
    async def _upload_size(request: Request, call_next):
        # refused before the body is read: a client cannot make the server spool gigabytes first
        length = request.headers.get("content-length")
        if request.url.path.rstrip("/") == "/v1/files" and request.method == "POST" and length and \
                length.isdigit() and int(length) > limits.upload_bytes + 64 * 1024:
            return JSONResponse(error_body(f"file too large: the upload limit is {limits.upload_bytes} bytes",
                                           "invalid_request_error", "file", "file_too_large"), status_code=413)
        return await call_next(request)

    def organisation(authorization: str | None = Header(None)) -> str:
        key = (authorization or "").removeprefix("Bearer ").strip()
        org = store.org_of_key(key) if key else None
        if org is None:
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
        return org

    def db():
        connection = store.connect()
        try:
            yield connection
        finally:
            connection.close()

    # --- files ------------------------------------------------------------------------------------

    @app.post("/v1/files")
    def upload(file: UploadFile = File(...), purpose: str = Form(...), org: str = Depends(organisation),
               db=Depends(db)):
        if purpose not in UPLOAD_PURPOSES:
            raise APIError(400, f"purpose: {purpose!r} is not accepted here; upload fine-tuning data with "
                           "purpose 'fine-tune'", param="purpose", code="invalid_file_purpose")
        file_id = new_id("file")
        path = store.path_of("file", file_id)
        size = 0
        with open(path.with_name(f".{file_id}.partial"), "wb") as out:
            while chunk := file.file.read(1 << 20):
                size += len(chunk)
                if size > limits.upload_bytes:
                    out.close()
                    path.with_name(f".{file_id}.partial").unlink()
                    raise APIError(413, f"file too large: the upload limit is {limits.upload_bytes} bytes",
                                   param="file", code="file_too_large")
                out.write(chunk)
        path.with_name(f".{file_id}.partial").replace(path)
        name = Path(file.filename or "upload.jsonl").name[:255]  # only ever stored, never a path
        db.execute("INSERT INTO files (id, org, purpose, filename, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                   (file_id, org, purpose, name, size, now()))
        return file_object(_file_row(db, org, file_id))

    @app.get("/v1/files")
    def list_files(purpose: str | None = None, limit: int = 10000, after: str | None = None, order: str = "desc",
                   org: str = Depends(organisation), db=Depends(db)):
        rows = db.execute("SELECT * FROM files WHERE org = ? AND deleted = 0 AND (? IS NULL OR purpose = ?) "
                          f"ORDER BY seq {'ASC' if order == 'asc' else 'DESC'}", (org, purpose, purpose)).fetchall()
        return _page([file_object(r) for r in rows], after, limit)

    @app.get("/v1/files/{file_id}")
    def retrieve_file(file_id: str, org: str = Depends(organisation), db=Depends(db)):
        return file_object(_file_row(db, org, file_id))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, org: str = Depends(organisation), db=Depends(db)):
        _file_row(db, org, file_id)
        return Response(store.path_of("file", file_id).read_bytes(), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, org: str = Depends(organisation), db=Depends(db)):
        _file_row(db, org, file_id)
        with store.transaction(db):
            db.execute("UPDATE files SET deleted = 1 WHERE id = ?", (file_id,))
            placeholders = ",".join("?" * len(FINAL))
            # a job that has not finished still reads it (a resume reloads its data): the bytes stay until then
            in_use = db.execute(f"SELECT 1 FROM jobs WHERE (training_file = ? OR validation_file = ?) AND status "
                                f"NOT IN ({placeholders})", (file_id, file_id, *FINAL)).fetchone()
        if not in_use:
            store.path_of("file", file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    def _file_row(db, org: str, file_id: str, param: str | None = None):
        row = db.execute("SELECT * FROM files WHERE id = ? AND org = ? AND deleted = 0", (file_id, org)).fetchone()
        if row is None:
            raise not_found("file", file_id, param)
        return row

    # --- jobs -------------------------------------------------------------------------------------

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request, org: str = Depends(organisation),
                         idempotency_key: str | None = Header(None)):
        try:
            body = JobRequest.model_validate(json.loads(await request.body() or b"{}"))
        except (ValidationError, json.JSONDecodeError) as exc:
            errors = exc.errors() if isinstance(exc, ValidationError) else [{"loc": (), "msg": str(exc)}]
            param = ".".join(str(p) for p in errors[0]["loc"]) or None
            raise APIError(400, f"{param or 'body'}: {errors[0]['msg']}", param=param) from None
        connection = store.connect()
        try:
            return _create_job(connection, org, body, idempotency_key)
        finally:
            connection.close()

    def _create_job(db, org: str, body: JobRequest, idempotency_key: str | None) -> dict:
        if body.model not in config.models:
            raise APIError(400, f"model: {body.model!r} is not available for fine-tuning here (available: "
                           f"{', '.join(config.models)})", param="model", code="model_not_available")
        paths = {}
        for param in ("training_file", "validation_file"):
            file_id = getattr(body, param)
            if file_id is None:
                continue
            row = db.execute("SELECT * FROM files WHERE id = ? AND org = ? AND deleted = 0", (file_id, org)).fetchone()
            if row is None:  # another organisation's file is answered as an unknown one
                raise APIError(400, f"{param}: no such file: {file_id}", param=param, code="invalid_file")
            if row["purpose"] not in TRAINING_PURPOSES:
                raise APIError(400, f"{param}: {file_id} has purpose {row['purpose']!r}; fine-tuning reads files "
                               "uploaded with purpose 'fine-tune'", param=param, code="invalid_file_purpose")
            paths[param] = store.path_of("file", file_id)
        job_id = new_id("ftjob")
        try:
            spec, _ = build_spec(job_id, body, paths["training_file"], paths.get("validation_file"))
        except BadRequest as exc:
            raise APIError(400, exc.message, param=exc.param, code=exc.code) from None
        with store.transaction(db):
            if idempotency_key:  # a retried request: the job its first attempt created
                seen = db.execute("SELECT job_id FROM idempotency WHERE org = ? AND key = ?",
                                  (org, idempotency_key)).fetchone()
                if seen is not None:
                    return job_object(_job_row(db, org, seen["job_id"]))
            recent = db.execute("SELECT COUNT(*) FROM jobs WHERE org = ? AND created_at > ?",
                                (org, time.time() - 60)).fetchone()[0]
            if recent >= limits.jobs_per_minute:
                raise APIError(429, f"rate limit: at most {limits.jobs_per_minute} job creations per minute",
                               type="rate_limit_error", code="rate_limit_exceeded")
            placeholders = ",".join("?" * len(ACTIVE))
            running = db.execute(f"SELECT COUNT(*) FROM jobs WHERE org = ? AND status IN ({placeholders})",
                                 (org, *ACTIVE)).fetchone()[0]
            if running >= limits.running_jobs:
                raise APIError(429, f"limit: at most {limits.running_jobs} unfinished jobs per organisation",
                               type="rate_limit_error", code="too_many_jobs")
            db.execute("INSERT INTO jobs (id, org, model, status, created_at, training_file, validation_file, "
                       "request, spec) VALUES (?, ?, ?, 'validating_files', ?, ?, ?, ?, ?)",
                       (job_id, org, body.model, now(), body.training_file, body.validation_file,
                        body.model_dump_json(), spec.model_dump_json()))
            store.add_event(db, job_id, f"Validating training file: {body.training_file}"
                            + (f" and validation file: {body.validation_file}" if body.validation_file else ""),
                            "created")
            if idempotency_key:
                db.execute("INSERT INTO idempotency VALUES (?, ?, ?)", (org, idempotency_key, job_id))
        return job_object(_job_row(db, org, job_id))

    def _job_row(db, org: str, job_id: str):
        row = db.execute("SELECT * FROM jobs WHERE id = ? AND org = ?", (job_id, org)).fetchone()
        if row is None:
            raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
        return row

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(after: str | None = None, limit: int = 20, org: str = Depends(organisation), db=Depends(db)):
        rows = db.execute("SELECT * FROM jobs WHERE org = ? ORDER BY seq DESC", (org,)).fetchall()
        return _page([job_object(r) for r in rows], after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def retrieve_job(job_id: str, org: str = Depends(organisation), db=Depends(db)):
        return job_object(_job_row(db, org, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, org: str = Depends(organisation), db=Depends(db)):
        return _request(db, org, job_id, "cancel")

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause_job(job_id: str, org: str = Depends(organisation), db=Depends(db)):
        return _request(db, org, job_id, "pause")

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume_job(job_id: str, org: str = Depends(organisation), db=Depends(db)):
        row = _job_row(db, org, job_id)
        with store.transaction(db):
            done = db.execute("UPDATE jobs SET status = 'queued', requested = NULL WHERE id = ? AND status = 'paused'",
                              (job_id,)).rowcount
            if done:
                store.add_event(db, job_id, "Fine-tuning job resumed: queued to rejoin its backbone",
                                f"resumed-{time.time_ns()}")
        if not done:
            raise APIError(400, f"job {job_id} is {row['status']}, not paused", code="invalid_job_state")
        return job_object(_job_row(db, org, job_id))

    def _request(db, org: str, job_id: str, what: str) -> dict:
        """Cancel or pause: a job not yet training changes here; a training one is changed by its worker
        at its next step boundary (waited for a little, so the answer usually shows the new status)."""
        row = _job_row(db, org, job_id)
        target = {"cancel": "cancelled", "pause": "paused"}[what]
        waiting = ("validating_files", "queued") + (("paused",) if what == "cancel" else ())
        with store.transaction(db):
            placeholders = ",".join("?" * len(waiting))
            done = db.execute(f"UPDATE jobs SET status = ?, finished_at = ? WHERE id = ? AND status IN ({placeholders})",
                              (target, now() if what == "cancel" else None, job_id, *waiting)).rowcount
            if done:
                store.add_event(db, job_id, f"Fine-tuning job {target}", target)
            elif row["status"] == "running":
                db.execute("UPDATE jobs SET requested = ? WHERE id = ? AND status = 'running'", (what, job_id))
        if not done and row["status"] != "running":
            raise APIError(400, f"job {job_id} is {row['status']}: it cannot be {target}", code="invalid_job_state")
        deadline = time.time() + WAIT_FOR_WORKER_S
        while _job_row(db, org, job_id)["status"] == "running" and time.time() < deadline:
            time.sleep(0.1)
        return job_object(_job_row(db, org, job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(job_id: str, after: str | None = None, limit: int = 20, org: str = Depends(organisation),
                    db=Depends(db)):
        _job_row(db, org, job_id)
        rows = db.execute("SELECT * FROM events WHERE job_id = ? ORDER BY seq DESC", (job_id,)).fetchall()
        return _page([event_object(r) for r in rows], after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, after: str | None = None, limit: int = 10, org: str = Depends(organisation),
                         db=Depends(db)):
        _job_row(db, org, job_id)
        rows = db.execute("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY step DESC", (job_id,)).fetchall()
        return _page([checkpoint_object(r) for r in rows], after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/adapter")
    def download_adapter(job_id: str, org: str = Depends(organisation), db=Depends(db)):
        row = _job_row(db, org, job_id)
        folder = store.path_of("ftjob", job_id)
        if row["status"] != "succeeded" or not folder.is_dir():
            raise APIError(400, f"job {job_id} is {row['status']}: it has an adapter once it has succeeded",
                           code="invalid_job_state")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.iterdir()):
                archive.write(path, path.name)
        return Response(buffer.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}-adapter.zip"'})

    from muxtune.service.admin import add_admin_routes

    add_admin_routes(app, store, config.models, config.memory_limit_gib)
    return app


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    """OpenAI's cursor paging: the items after the one with id `after` (in listing order), `limit` of them."""
    if limit < 1:
        raise APIError(400, "limit: must be at least 1", param="limit")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "has_more": len(items) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}
