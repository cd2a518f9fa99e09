"""Per-task checkpoints of a multiplexed run, so a `kill -9` at any moment costs at most the steps since
the last checkpoint, and a resumed run ends with the same adapters and loss curves as one never stopped.

Layout under the run folder:

    checkpoints/manifest.json                 which checkpoint of each task is current, the run's step
                                              count and per-step records; written last, atomically
    checkpoints/<task>/step-000040/
        tensors.safetensors                   adapter weights, AdamW moments, RNG states (dropout and
                                              data order generators), the data order of the epoch
        state.json                            step, status, data cursor/epoch, LR schedule, optimizer
                                              hyper-parameters, losses and token counts so far, the spec

Why a manifest: every task must resume from the SAME global step, or the fused batches after a resume
differ from the uninterrupted run's. Each task folder is staged under a temporary name and renamed into
place; then the manifest is replaced (temp file + os.replace); only then are folders it no longer names
deleted. A kill at any point leaves the previous manifest and every folder it names intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from muxtune.errors import MuxTuneError
from muxtune.spec import TaskSpec, write_text_atomic

FORMAT_VERSION = 1


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(trainer, run_dir: Path, model: str, previous: dict | None = None) -> dict:
    """Checkpoint every task whose state changed since `previous` (the manifest returned by the last
    call); returns the new manifest."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    old_tasks = (previous or {}).get("tasks", {})
    tasks = {}
    for name, run in trainer.runs.items():
        folder = f"step-{run.step:06d}"
        known = old_tasks.get(name)
        if not (known and known["folder"] == folder and known["status"] == run.status
                and (root / name / folder).is_dir()):
            _save_task(run, root / name / folder)
        tasks[name] = {"folder": folder, "status": run.status, "spec": run.spec.model_dump(mode="json")}
    manifest = {
        "version": FORMAT_VERSION,
        "model": model,
        "steps": len(trainer.step_times),
        "groups": trainer.groups,
        "step_times": trainer.step_times,
        "step_tokens": trainer.step_tokens,
        "step_shapes": [list(shape) for shape in trainer.step_shapes],
        "tasks": tasks,
    }
    write_text_atomic(root / "manifest.json", json.dumps(manifest) + "\n")
    for name in tasks:  # older checkpoints are dropped only once the new manifest is in place
        for old in (root / name).iterdir():
            if old.name != tasks[name]["folder"]:
                shutil.rmtree(old, ignore_errors=True)
    return manifest


def _save_task(run, folder: Path) -> None:
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tensors = {f"adapter.{k}": v.detach().cpu().contiguous() for k, v in run.adapter.state_dict().items()}
    optim = run.optimizer.state_dict()
    optim_scalars = {}
    for index, state in optim["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                optim_scalars[f"{index}.{key}"] = value
    tensors["rng.data"] = run.sampler.generator.get_state()
    tensors["data.order"] = torch.tensor(run.sampler.order, dtype=torch.int64)
    if run.adapter.dropout_gen is not None:
        tensors["rng.dropout"] = run.adapter.dropout_gen.get_state()
    save_file(tensors, str(staging / "tensors.safetensors"))
    state = {
        "version": FORMAT_VERSION,
        "task": run.spec.name,
        "step": run.step,
        "status": run.status,
        "reason": run.reason,
        "stopped_at": run.stopped_at,
        "bad_examples": run.bad_examples,
        "data": {"epoch": run.sampler.epoch, "cursor": run.sampler.cursor, "examples": len(run.sampler.examples)},
        "losses": run.losses,
        "tokens": run.tokens,
        "computed_tokens": run.computed_tokens,
        "seconds": run.seconds,
        "param_groups": optim["param_groups"],
        "optimizer_scalars": optim_scalars,
        "scheduler": run.scheduler.state_dict(),
    }
    (staging / "state.json").write_text(json.dumps(state))
    for path in staging.iterdir():  # on disk before the rename makes the folder visible
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def load_manifest(run_dir: Path) -> dict:
    path = checkpoint_dir(run_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise MuxTuneError(f"{path}: no checkpoint to resume from (run without --resume to start over)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MuxTuneError(f"{path}: not a MuxTune checkpoint manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("version") != FORMAT_VERSION or \
            not isinstance(manifest.get("tasks"), dict):
        raise MuxTuneError(f"{path}: not a MuxTune checkpoint manifest (version {FORMAT_VERSION})")
    return manifest


def check_manifest(manifest: dict, run_dir: Path, model: str, specs: dict[str, TaskSpec]) -> None:
    """Refuse checkpoints written for another model, or for a task whose settings changed since."""
    path = checkpoint_dir(run_dir) / "manifest.json"
    if manifest.get("model") != model:
        raise MuxTuneError(f"{path}: model: the checkpoints were trained on {manifest.get('model')!r}, "
                           f"the config uses {model!r}")
    for name, entry in manifest["tasks"].items():
        spec = specs.get(name)
        if spec is None:
            continue
        saved, now = entry.get("spec", {}), spec.model_dump(mode="json")
        for key in now:
            if saved.get(key) != now[key]:
                raise MuxTuneError(f"{path}: tasks.{name}.{key}: the checkpoint was trained with "
                                   f"{saved.get(key)!r}, the config now says {now[key]!r}")


def restore(trainer, run_dir: Path, manifest: dict) -> None:
    """Load each task's checkpoint named by the manifest into the trainer's runs (same names)."""
    root = checkpoint_dir(run_dir)
    for name, entry in manifest["tasks"].items():
        _restore_task(trainer.runs[name], root / name / entry["folder"])
    trainer.step_times = list(manifest["step_times"])
    trainer.step_tokens = list(manifest["step_tokens"])
    trainer.step_shapes = [tuple(shape) for shape in manifest["step_shapes"]]


def _restore_task(run, folder: Path) -> None:
    tensors_path, state_path = folder / "tensors.safetensors", folder / "state.json"
    try:
        state = json.loads(state_path.read_text())
        tensors = load_file(str(tensors_path))
    except FileNotFoundError as exc:
        raise MuxTuneError(f"{exc.filename}: checkpoint file missing") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file of any kind is bad input
        raise MuxTuneError(f"{folder}: unreadable checkpoint: {exc}") from None
    adapter = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
    expected = run.adapter.state_dict()
    for key, value in expected.items():
        if key not in adapter:
            raise MuxTuneError(f"{tensors_path}: adapter.{key}: missing (a checkpoint of another model or method?)")
        if adapter[key].shape != value.shape:
            raise MuxTuneError(f"{tensors_path}: adapter.{key}: shape {list(adapter[key].shape)}, this task's "
                               f"adapter needs {list(value.shape)} (a checkpoint of another model?)")
    extra = set(adapter) - set(expected)
    if extra:
        raise MuxTuneError(f"{tensors_path}: adapter.{sorted(extra)[0]}: not a weight of this task's adapter")
    if state["data"]["examples"] != len(run.sampler.examples):
        raise MuxTuneError(f"{state_path}: data.examples: the checkpoint's data had {state['data']['examples']} "
                           f"examples, {run.spec.data} now has {len(run.sampler.examples)}")
    run.adapter.load_state_dict(adapter)

    optim_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, field = key.split(".", 2)
            optim_state.setdefault(int(index), {})[field] = value
    for key, value in state["optimizer_scalars"].items():
        index, field = key.split(".", 1)
        optim_state.setdefault(int(index), {})[field] = value
    run.optimizer.load_state_dict({"state": optim_state, "param_groups": state["param_groups"]})
    run.scheduler.load_state_dict(state["scheduler"])

    run.sampler.generator.set_state(tensors["rng.data"])
    run.sampler.order = tensors["data.order"].tolist()
    run.sampler.epoch, run.sampler.cursor = state["data"]["epoch"], state["data"]["cursor"]
    if run.adapter.dropout_gen is not None:
        run.adapter.dropout_gen.set_state(tensors["rng.dropout"])
    run.step, run.status, run.reason = state["step"], state["status"], state["reason"]
    run.stopped_at, run.bad_examples = state["stopped_at"], state["bad_examples"]
    run.losses, run.tokens = state["losses"], state["tokens"]
    run.computed_tokens, run.seconds = state["computed_tokens"], state["seconds"]
