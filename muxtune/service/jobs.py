"""A job request as the OpenAI API takes it -> the TaskSpec MuxTune trains; stored rows -> the objects
the OpenAI client reads (openai/types: FileObject, FineTuningJob, FineTuningJobEvent,
FineTuningJobCheckpoint).

How the API's hyper-parameters map onto a task:
    n_epochs                  -> epochs ("auto": 3)
    batch_size                -> batch_size ("auto": 8)
    learning_rate_multiplier  -> lr = 2e-4 x multiplier ("auto": 1)
    seed                      -> seed (absent: drawn here and shown on the job, so a rerun can repeat it)
MuxTune's own fields, taken as extra body fields and echoed on the job: peft (the task config's peft
block, default LoRA r=8 on q_proj,v_proj), max_seq_len, eval_every, early_stopping.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from muxtune.spec import TaskSpec

BASE_LR = 2e-4
AUTO = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
EXTRA_FIELDS = ("peft", "max_seq_len", "eval_every", "early_stopping")


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Literal["auto"] | int | None = None
    batch_size: Literal["auto"] | int | None = None
    learning_rate_multiplier: Literal["auto"] | float | None = None


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["supervised"]
    supervised: Supervised = Field(default_factory=Supervised)


class JobRequest(BaseModel):
    """POST /v1/fine_tuning/jobs. Unknown fields are refused (a typo must not be silently dropped)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None  # accepted for compatibility; MuxTune reports to nothing else
    # MuxTune's own
    peft: dict | None = None
    max_seq_len: int | None = None
    eval_every: int | None = None
    early_stopping: dict | None = None

    def hyper(self) -> Hyperparameters:
        if self.method is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


class BadRequest(Exception):
    """Turned into a 400 OpenAI error naming `param`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def build_spec(job_id: str, request: JobRequest, training_path, validation_path) -> tuple[TaskSpec, dict]:
    """The job's TaskSpec (its name is the job id) and the hyper-parameters as the job shows them."""
    hyper = request.hyper()
    shown = {k: (AUTO[k] if getattr(hyper, k) in (None, "auto") else getattr(hyper, k)) for k in AUTO}
    seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
    raw = {"name": job_id, "data": str(training_path), "peft": request.peft or {"method": "lora"},
           "epochs": shown["n_epochs"], "batch_size": shown["batch_size"],
           "lr": BASE_LR * shown["learning_rate_multiplier"], "seed": seed}
    if validation_path is not None:
        raw["validation_data"] = str(validation_path)
    for key in ("max_seq_len", "eval_every", "early_stopping"):
        if getattr(request, key) is not None:
            raw[key] = getattr(request, key)
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        param = {"epochs": "hyperparameters.n_epochs", "batch_size": "hyperparameters.batch_size",
                 "lr": "hyperparameters.learning_rate_multiplier"}.get(where, where or None)
        raise BadRequest(f"{param or 'request'}: {err['msg']}", param=param) from None
    return spec, {**shown, "seed": seed}


# --- rows -> OpenAI objects -------------------------------------------------------------------------


def file_object(row) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "expires_at": None, "status_details": None}


def fine_tuned_model_name(model: str, org: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{model}:{org}:{suffix or ''}:{job_id}"


def job_object(row) -> dict:
    request = json.loads(row["request"])
    spec = json.loads(row["spec"])
    hyper = {"n_epochs": spec["epochs"], "batch_size": spec["batch_size"],
             "learning_rate_multiplier": spec["lr"] / BASE_LR}
    method = {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    job = {
        "id": row["id"], "object": "fine_tuning.job", "created_at": row["created_at"],
        "error": json.loads(row["error"]) if row["error"] else None,
        "fine_tuned_model": row["fine_tuned_model"], "finished_at": row["finished_at"],
        "hyperparameters": hyper, "model": row["model"], "organization_id": row["org"],
        "result_files": json.loads(row["result_files"]), "seed": spec["seed"], "status": row["status"],
        "trained_tokens": row["trained_tokens"], "training_file": row["training_file"],
        "validation_file": row["validation_file"], "estimated_finish": row["estimated_finish"],
        "integrations": [], "metadata": request.get("metadata"), "method": method,
        "suffix": request.get("suffix"),
        # MuxTune's own, as the task trains them (defaults filled in)
        "peft": spec["peft"], "max_seq_len": spec["max_seq_len"], "eval_every": spec["eval_every"],
        "early_stopping": spec["early_stopping"],
    }
    return job


def event_object(row) -> dict:
    return {"id": row["id"], "object": "fine_tuning.job.event", "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "type": row["type"],
            "data": json.loads(row["data"]) if row["data"] else None}


def checkpoint_object(row) -> dict:
    return {"id": row["id"], "object": "fine_tuning.job.checkpoint", "created_at": row["created_at"],
            "fine_tuning_job_id": row["job_id"], "step_number": row["step"],
            "metrics": json.loads(row["metrics"]),
            "fine_tuned_model_checkpoint": f"{row['model']}:ckpt-step-{row['step']}"}
