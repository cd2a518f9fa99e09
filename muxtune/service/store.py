"""The state folder: everything a service keeps, so a kill -9 of any of its processes loses nothing.

    DIR/service.sqlite3       keys, files, jobs, events, checkpoints, idempotency keys (WAL mode)
    DIR/service.json          the config the server was started with (its workers read it)
    DIR/files/<file id>       uploaded files and results CSVs, as uploaded
    DIR/adapters/<job id>/    a finished job's adapter (HF PEFT format where the method has one)
    DIR/backbones/<model>/    one worker's checkpoints (executor/checkpoint.py) and its pid/lock/log
    DIR/paused/<job id>/      a paused job's own checkpoint, until it resumes
    DIR/cache/                tokenized data (executor/data.py)

Ids are made here and checked against their pattern before they name a path (`path_of`); a user's
file name is only ever stored, never used as a path. Every query that reads a tenant's object takes
its organisation: another organisation's id finds nothing, exactly as an unknown one.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
import time
from pathlib import Path

from muxtune.errors import MuxTuneError

ID_PATTERNS = {"file": r"file-[0-9a-f]{24}", "ftjob": r"ftjob-[0-9a-f]{24}"}
ACTIVE = ("validating_files", "queued", "running")  # statuses a worker still has to act on
FINAL = ("succeeded", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, org TEXT NOT NULL, hash TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL, revoked_at INTEGER, admin INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS files (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
    org TEXT NOT NULL, purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
    org TEXT NOT NULL, model TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
    finished_at INTEGER, training_file TEXT NOT NULL, validation_file TEXT, request TEXT NOT NULL,
    spec TEXT NOT NULL, error TEXT, fine_tuned_model TEXT, result_files TEXT NOT NULL DEFAULT '[]',
    trained_tokens INTEGER, estimated_finish INTEGER, requested TEXT);
CREATE INDEX IF NOT EXISTS jobs_by_org ON jobs (org, seq);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL, created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL,
    type TEXT NOT NULL, data TEXT, dedupe TEXT NOT NULL, UNIQUE (job_id, dedupe));
CREATE TABLE IF NOT EXISTS checkpoints (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL, created_at INTEGER NOT NULL, step INTEGER NOT NULL, metrics TEXT NOT NULL,
    model TEXT NOT NULL, UNIQUE (job_id, step));
CREATE TABLE IF NOT EXISTS idempotency (org TEXT NOT NULL, key TEXT NOT NULL, job_id TEXT NOT NULL,
    PRIMARY KEY (org, key));
"""


def new_id(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def model_slug(model: str) -> str:
    """A model name as a folder name (builtin:tiny-llama -> builtin-tiny-llama-<hash>)."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-.")[:60]
    return f"{readable}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


class Store:
    """One state folder. Each thread opens its own connection (`connect`); writes that must not
    interleave use `transaction` (BEGIN IMMEDIATE: one writer at a time, others wait)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.db_path = self.root / "service.sqlite3"

    def init(self) -> "Store":
        for folder in ("files", "adapters", "backbones", "paused", "cache"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            if "admin" not in {row["name"] for row in db.execute("PRAGMA table_info(keys)")}:  # an older folder
                db.execute("ALTER TABLE keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0")
        return self

    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("PRAGMA synchronous=FULL")  # a committed event or status survives a power cut too
        return db

    def transaction(self, db: sqlite3.Connection):
        return _Transaction(db)

    # --- paths: only ever from a checked id ---------------------------------------------------------

    def path_of(self, kind: str, object_id: str) -> Path:
        if not re.fullmatch(ID_PATTERNS[kind], object_id or ""):
            raise MuxTuneError(f"not a {kind} id: {object_id!r}")
        folder = {"file": "files", "ftjob": "adapters"}[kind]
        return self.root / folder / object_id

    def paused_dir(self, job_id: str) -> Path:
        return self.path_of("ftjob", job_id).parent.parent / "paused" / job_id

    def backbone_dir(self, model: str) -> Path:
        return self.root / "backbones" / model_slug(model)

    # --- API keys -----------------------------------------------------------------------------------

    def create_key(self, org: str, admin: bool = False) -> tuple[str, str]:
        """(key id, the key): the key itself is returned once and only its hash is kept. An `admin` key is
        an operator's: it opens GET /admin (every organisation's jobs) and is refused by the /v1 API."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", org):
            raise MuxTuneError(f"--org: {org!r}: use letters, digits, '_', '.', '-' (at most 64)")
        key, key_id = "sk-mux-" + secrets.token_urlsafe(32), new_id("key")
        with self.connect() as db:
            db.execute("INSERT INTO keys (id, org, hash, created_at, revoked_at, admin) VALUES (?, ?, ?, ?, NULL, ?)",
                       (key_id, org, _hash(key), now(), int(admin)))
        return key_id, key

    def list_keys(self, org: str | None = None) -> list[dict]:
        with self.connect() as db:
            rows = db.execute("SELECT id, org, created_at, revoked_at, admin FROM keys WHERE ? IS NULL OR org = ? "
                              "ORDER BY created_at, id", (org, org)).fetchall()
        return [dict(r) for r in rows]

    def revoke_key(self, key_id: str, org: str) -> None:
        with self.connect() as db:
            done = db.execute("UPDATE keys SET revoked_at = ? WHERE id = ? AND org = ? AND revoked_at IS NULL",
                              (now(), key_id, org)).rowcount
        if not done:
            raise MuxTuneError(f"keys revoke: no live key {key_id!r} of organisation {org!r}")

    def org_of_key(self, key: str) -> str | None:
        with self.connect() as db:
            row = db.execute("SELECT org FROM keys WHERE hash = ? AND revoked_at IS NULL AND admin = 0",
                             (_hash(key),)).fetchone()
        return row["org"] if row else None

    def key_kind(self, key: str) -> str | None:
        """"admin" (an operator's live key), "tenant" (an organisation's) or None (unknown or revoked)."""
        return self.key_kind_by_hash(_hash(key))

    def key_kind_by_hash(self, key_hash: str) -> str | None:
        with self.connect() as db:
            row = db.execute("SELECT admin FROM keys WHERE hash = ? AND revoked_at IS NULL", (key_hash,)).fetchone()
        return None if row is None else ("admin" if row["admin"] else "tenant")

    @staticmethod
    def hash_of(key: str) -> str:
        """What is kept of a key (a session remembers this, never the key)."""
        return _hash(key)

    # --- events and checkpoints (written by the worker; each at most once) ---------------------------

    def add_event(self, db, job_id: str, message: str, dedupe: str, type: str = "message", level: str = "info",
                  data: dict | None = None) -> None:
        """An event, unless one with the same `dedupe` key exists: a step re-run after a crash writes
        the same event again, and this keeps one copy."""
        db.execute("INSERT OR IGNORE INTO events (id, job_id, created_at, level, message, type, data, dedupe) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (new_id("ftevent"), job_id, now(), level, message, type,
                                                        json.dumps(data) if data is not None else None, dedupe))

    def add_checkpoint(self, db, job_id: str, step: int, metrics: dict, model: str) -> None:
        db.execute("INSERT OR IGNORE INTO checkpoints (id, job_id, created_at, step, metrics, model) "
                   "VALUES (?, ?, ?, ?, ?, ?)", (new_id("ftckpt"), job_id, now(), step, json.dumps(metrics), model))


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class _Transaction:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, tb):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
