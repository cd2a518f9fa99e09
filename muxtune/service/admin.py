"""The operator's page: GET /admin, for a key made with `muxtune keys create --admin`.

    GET  /admin                   the page (static/admin.html + static/admin.js), or the login form
    POST /admin/login             form field `key`: an operator key -> a session cookie, redirect to /admin
    POST /admin/logout            ends the session
    GET  /admin/api/state         JSON: backbones (tenants, fusion groups, memory used vs limit, busy time),
                                  the queue, jobs per organisation, every recent job with its
                                  train / validation curves; the page polls it every POLL_S seconds
    GET  /admin/static/{name}     the page's script: a small chart library of our own (inline SVG), no CDN

The key is typed into the form once and never travels in a URL: the server answers with an opaque
session token in an HttpOnly, SameSite cookie and keeps only that token -> the key's id (in memory: a
restarted server asks again). A revoked key's sessions end at their next request. A tenant's key is
refused with 403 on every /admin route, a missing or unknown one with 401 (the API) or the login form
(the page). The page is the server's only HTML; the /v1 API refuses operator keys.
"""

from __future__ import annotations

import html
import json
import secrets
from importlib import resources

from fastapi import Cookie, FastAPI, Form, Header
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from muxtune.service.store import ACTIVE, Store, model_slug
from muxtune.service.timing import read_status

COOKIE = "muxtune_admin"
RECENT_JOBS = 200  # jobs shown (the newest); their curves come with them
STATIC = {"admin.js": "text/javascript"}


def add_admin_routes(app: FastAPI, store: Store, models: list[str], memory_limit_gib: float | None) -> None:
    sessions: dict[str, str] = {}  # session token -> the operator key's hash

    def who(session: str | None, authorization: str | None) -> str | None:
        """'admin', 'tenant' or None: a bearer key (scripts) or the session cookie (the page)."""
        key = (authorization or "").removeprefix("Bearer ").strip()
        if key:
            return store.key_kind(key)
        if session and session in sessions:
            if store.key_kind_by_hash(sessions[session]) == "admin":
                return "admin"
            del sessions[session]  # revoked since
        return None

    def refused(kind: str | None, page: bool) -> Response | None:
        if kind == "admin":
            return None
        if kind == "tenant":
            return _error(403, "this is the operator's page: an organisation's key does not open it", page)
        if page:
            return HTMLResponse(login_form(), status_code=200)
        return _error(401, "an operator key is needed (`muxtune keys create --admin`)", page)

    @app.get("/admin", include_in_schema=False)
    def admin_page(muxtune_admin: str | None = Cookie(None), authorization: str | None = Header(None)):
        answer = refused(who(muxtune_admin, authorization), page=True)
        return answer or HTMLResponse(_asset("admin.html"), headers={"Cache-Control": "no-store"})

    @app.post("/admin/login", include_in_schema=False)
    def login(key: str = Form("")):
        kind = store.key_kind(key.strip()) if key.strip() else None
        if kind == "tenant":
            return _error(403, "this is the operator's page: an organisation's key does not open it", True)
        if kind != "admin":
            return HTMLResponse(login_form("Not a live operator key."), status_code=401)
        token = secrets.token_urlsafe(32)
        sessions[token] = store.hash_of(key.strip())
        answer = RedirectResponse("/admin", status_code=303)
        # Lax (not Strict): the redirect after the form's POST carries it; HttpOnly: scripts never see it
        answer.set_cookie(COOKIE, token, httponly=True, samesite="lax", path="/admin")
        return answer

    @app.post("/admin/logout", include_in_schema=False)
    def logout(muxtune_admin: str | None = Cookie(None)):
        sessions.pop(muxtune_admin or "", None)
        answer = RedirectResponse("/admin", status_code=303)
        answer.delete_cookie(COOKIE, path="/admin")
        return answer

    @app.get("/admin/static/{name}", include_in_schema=False)
    def static(name: str):  # the page's script holds nothing secret: served to anyone
        if name not in STATIC:
            return _error(404, f"no such file: {name}", False)
        return Response(_asset(name), media_type=STATIC[name], headers={"Cache-Control": "no-store"})

    @app.get("/admin/api/state")
    def state(muxtune_admin: str | None = Cookie(None), authorization: str | None = Header(None)):
        answer = refused(who(muxtune_admin, authorization), page=False)
        return answer or JSONResponse(service_state(store, models, memory_limit_gib))


def service_state(store: Store, models: list[str], memory_limit_gib: float | None) -> dict:
    """Everything the page shows, read from the state folder (the database and each worker's status.json)."""
    db = store.connect()
    try:
        rows = db.execute("SELECT id, org, model, status, created_at, finished_at, spec, estimated_finish "
                          "FROM jobs ORDER BY seq DESC LIMIT ?", (RECENT_JOBS,)).fetchall()
        ids = [r["id"] for r in rows]
        curves: dict[str, list] = {i: [] for i in ids}
        if ids:
            placeholders = ",".join("?" * len(ids))
            for event in db.execute(f"SELECT job_id, data FROM events WHERE type = 'metrics' AND job_id IN "
                                    f"({placeholders}) ORDER BY seq", ids):
                data = json.loads(event["data"])
                curves[event["job_id"]].append([data["step"], data.get("train_loss"), data.get("valid_loss")])
        per_org = {}
        for row in db.execute("SELECT org, status, COUNT(*) AS n FROM jobs GROUP BY org, status ORDER BY org"):
            per_org.setdefault(row["org"], {})[row["status"]] = row["n"]
    finally:
        db.close()
    jobs = []
    for r in rows:
        spec = json.loads(r["spec"])
        jobs.append({"id": r["id"], "org": r["org"], "model": r["model"], "status": r["status"],
                     "created_at": r["created_at"], "finished_at": r["finished_at"],
                     "estimated_finish": r["estimated_finish"], "method": spec["peft"].get("method"),
                     "curve": curves[r["id"]]})
    backbones = []
    for model in models:
        status = read_status(store.backbone_dir(model) / "status.json") or {}
        tenants = [j["id"] for j in jobs if j["model"] == model and j["status"] == "running"]
        limit = status.get("memory_limit_bytes") or (int(memory_limit_gib * 2**30) if memory_limit_gib else None)
        phases = status.get("phases", {})
        backbones.append({"model": model, "slug": model_slug(model), "worker_pid": status.get("pid"),
                          "tenants": tenants, "groups": status.get("groups", []),
                          "memory_bytes": status.get("memory_bytes"), "memory_limit_bytes": limit,
                          "training_seconds": phases.get("step", {}).get("seconds", 0.0),
                          "steps": phases.get("step", {}).get("count", 0), "updated_at": status.get("written_at")})
    queue = [{"id": j["id"], "org": j["org"], "model": j["model"], "status": j["status"]}
             for j in reversed(jobs) if j["status"] in ACTIVE and j["status"] != "running"]
    return {"backbones": backbones, "queue": queue, "organisations": per_org, "jobs": jobs}


def _asset(name: str) -> bytes:
    return resources.files("muxtune.service").joinpath("static", name).read_bytes()


def _error(status: int, message: str, page: bool) -> Response:
    if page:
        return HTMLResponse(f"<!doctype html><title>MuxTune operator</title><p>{html.escape(message)}</p>",
                            status_code=status)
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": "forbidden" if status == 403 else "invalid_api_key"}}, status_code=status)


def login_form(problem: str = "") -> str:
    note = f'<p class="problem">{html.escape(problem)}</p>' if problem else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>MuxTune operator login</title>
<style>body{{font:15px system-ui,sans-serif;margin:4em auto;max-width:26em}}input{{width:100%;padding:.4em}}
.problem{{color:#b00}}</style></head><body><h1>MuxTune operator</h1>{note}
<form method="post" action="/admin/login"><label>Operator key (<code>muxtune keys create --admin</code>)
<input type="password" name="key" autocomplete="off" autofocus></label><p><button>Log in</button></p></form>
</body></html>"""
