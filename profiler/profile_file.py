"""A profile on disk: the device fingerprint it was measured under, and the Profile table (pandas) with
its metadata, saved as one CSV whose first line is a JSON header (profiler/profile.py finds and reuses them)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from muxtune.errors import MuxTuneError


COLUMNS = ["op", "phase", "tokens", "seq_len", "method", "rank", "params", "nbytes", "world",
           "seconds", "saved_bytes", "batch_bytes", "peak_bytes", "target", "rel_error"]


HEADER = "# muxtune-profile "  # first line of a profile CSV: this marker + the JSON metadata


def user_cache_dir() -> Path:
    return Path(os.environ.get("MUXTUNE_CACHE", Path.home() / ".cache" / "muxtune")) / "profiles"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_hash(config) -> str:
    """Hash of what decides the backbone's costs (its shape), stable across how the config was loaded."""
    keys = ["model_type", "hidden_size", "n_embd", "intermediate_size", "ffn_dim", "n_inner", "num_hidden_layers",
            "n_layer", "num_attention_heads", "n_head", "num_key_value_heads", "vocab_size", "tie_word_embeddings"]
    raw = config.to_dict()
    return hashlib.sha256(json.dumps({k: raw.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()[:12]


def fingerprint(device: str, model_name: str, config, dtype: torch.dtype) -> dict:
    """What must match for a stored profile to stand for a measurement here."""
    return {"device": "cuda" if device.startswith("cuda") else "cpu", "device_name": device_name(device),
            "threads": torch.get_num_threads() if not device.startswith("cuda") else 0,
            "torch": torch.__version__.split("+")[0], "model": model_name, "model_hash": model_hash(config),
            "dtype": str(dtype).removeprefix("torch.")}


def fingerprint_key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:10]


def profile_filename(fp: dict) -> str:
    slug = fp["model"].removeprefix("builtin:").replace("/", "_").strip("._") or "model"
    return f"{fp['device']}-{fingerprint_key(fp)}-{slug}.csv"


@dataclass
class Profile:
    table: pd.DataFrame  # one row per measurement, COLUMNS
    meta: dict  # {"fingerprint": {...}, "shape": ModelShape fields, "mode": ..., "layer_param_bytes": ...}

    def rows(self, op: str, phase: str | None = None) -> pd.DataFrame:
        # the CostModel asks for the same few selections thousands of times (the planner prices many
        # micro-batches): keep them, keyed by the table object so a replaced table is not served stale
        cache = self.__dict__.setdefault("_rows", {})
        key = (id(self.table), op, phase)
        if key not in cache:
            sel = self.table["op"] == op
            if phase is not None:
                sel &= self.table["phase"] == phase
            cache[key] = self.table[sel]
        return cache[key]

    def save(self, path: Path) -> Path:
        from muxtune.spec import write_text_atomic

        path = Path(path)
        write_text_atomic(path, HEADER + json.dumps(self.meta, sort_keys=True) + "\n"
                          + self.table[COLUMNS].to_csv(index=False))
        return path

    @classmethod
    def load(cls, path: Path) -> Profile:
        path = Path(path)
        try:
            first = path.open(encoding="utf-8").readline()
        except OSError as exc:
            raise MuxTuneError(f"{path}: cannot read profile: {exc.strerror}") from None
        if not first.startswith(HEADER):
            raise MuxTuneError(f"{path}:1: not a MuxTune profile (first line must start with {HEADER.strip()!r})")
        try:
            meta = json.loads(first[len(HEADER):])
        except json.JSONDecodeError as exc:
            raise MuxTuneError(f"{path}:1: profile header is not valid JSON: {exc.msg}") from None
        table = pd.read_csv(path, skiprows=1)
        if "target" not in table.columns:  # profiles from before per-target rows: none of them
            table["target"] = ""
        if "rel_error" not in table.columns:  # profiles from before adaptive repeats: not reported
            table["rel_error"] = float("nan")
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise MuxTuneError(f"{path}:2: profile table lacks columns {missing}")
        table["method"] = table["method"].fillna("")
        table["target"] = table["target"].astype(object).fillna("")  # an all-empty column reads as float
        return cls(table, meta)
