"""SERVICE.yaml: what a service serves and how much each organisation may use. Validated by pydantic
like the task config; every error names the file, key and line (muxtune.spec.load_yaml_model).

    models: [builtin:tiny-llama]     base models jobs may name (builtin presets, local HF model dirs)
    device: cpu                      where the workers train (cpu, cuda, cuda:N)
    dtype: float32
    memory_limit_gib: null           admission limit per backbone (default: the device's free memory)
    max_tenants: 16                  most jobs training at once on one backbone (more wait as queued)
    checkpoint_every: 1              steps between a backbone's checkpoints (a kill -9 loses at most these)
    threads: null                    torch CPU threads per worker (default: torch's)
    profile: null                    a profile CSV (`muxtune profile`'s) the planner prices with as it is; default:
                                     the stored profile of the model that passes the calibration check here
    worker_crashes: 5                a backbone's worker crashing this often in a row (no step done in
                                     between) fails its unfinished jobs (code worker_crashed)
    restart_backoff_s: 1.0           wait before restarting a crashed worker; doubles each crash in a row
    plan_in_background: true         the planner searches at each join and leave while the backbone trains
                                     on (its groups apply from the boundary after it answers); false: the
                                     backbone waits for it (seconds with a dozen jobs)
    limits:                          per organisation
      running_jobs: 8                jobs validating, queued or running at once
      jobs_per_minute: 30            job creations in any 60 s (more answer 429)
      upload_bytes: 104857600        largest file upload (more answers 413)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from muxtune.spec import load_yaml_model, matching


class OrgLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    running_jobs: int = Field(8, ge=1, description="jobs not yet finished at once, per organisation")
    jobs_per_minute: int = Field(30, ge=1, description="job creations in any 60 seconds, per organisation")
    upload_bytes: int = Field(100 * 2**20, ge=1, description="largest file upload")


class ServiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[str] = Field(default_factory=lambda: ["builtin:tiny-llama"], min_length=1)
    device: Annotated[str, matching(r"cpu|cuda(:\d+)?",
                                    "expected 'cpu', 'cuda' or 'cuda:N' (one device per backbone)")] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    memory_limit_gib: float | None = Field(None, gt=0)
    max_tenants: int = Field(16, ge=1, description="most jobs training at once on one backbone")
    checkpoint_every: int = Field(1, ge=1, description="steps between a backbone's checkpoints")
    threads: int | None = Field(None, ge=1)
    profile: str | None = Field(None, description="a profile CSV to price with, instead of the calibrated lookup")
    worker_crashes: int = Field(5, ge=1, description="crashes in a row before a backbone's jobs fail")
    restart_backoff_s: float = Field(1.0, ge=0, description="first wait before restarting a crashed worker")
    plan_in_background: bool = Field(True, description="the planner searches while the backbone trains on; "
                                     "false: every join and leave waits for its answer")
    limits: OrgLimits = Field(default_factory=OrgLimits)


def load_service_config(path: str | Path | None) -> ServiceConfig:
    if path is None:
        return ServiceConfig()
    return load_yaml_model(Path(path), ServiceConfig, "service config", "of service settings", empty_ok=True)[0]


def dump(config: ServiceConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
