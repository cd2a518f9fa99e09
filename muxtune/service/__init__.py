"""The fine-tuning service: the OpenAI fine-tuning API in front of the multiplexed backbone.

    config.py   SERVICE.yaml (pydantic): models served, device, memory limit, tenants per backbone, org limits
    store.py    the state folder: SQLite (WAL) with keys, files, jobs, events, checkpoints; paths under it
    jobs.py     an API job request -> a TaskSpec; rows -> the OpenAI objects (FileObject, FineTuningJob, ...)
    api.py      the HTTP server (FastAPI): auth, per-organisation isolation, errors, the /v1 routes
    worker.py   one process per base model: holds the backbone, trains the admitted jobs multiplexed
    supervisor.py  (in the server) keeps one live worker per model that has work, restarts a dead one
    admin.py    GET /admin: the operator's page (login form, session cookie) and its state API
    timing.py   a worker's status.json: its fusion groups, memory, and where its time goes

The server never trains; a worker never talks HTTP. They share only the state folder: the server
writes jobs and requests (cancel, pause, resume) into SQLite, the worker picks them up at its next
step boundary and writes statuses, events, checkpoints and adapters back. docs/service.md says how
a provider runs it.
"""
