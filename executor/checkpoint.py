"""Per-task checkpoints of a multiplexed run, so a `kill -9` at any moment costs at most the steps since
the last checkpoint, and a resumed run ends with the same adapters and loss curves as one never stopped.

Layout under the run folder:

    checkpoints/manifest.json                 which checkpoint of each task is current, the run's step
                                              count and per-step records; written last, atomically
    checkpoints/<task>/step-000040/
        tensors.safetensors                   adapter weights, AdamW moments, RNG states (dropout and
                                              data order generators), the data order of the epoch,
                                              the adapter at the best evaluation (early stopping)
        state.json                            step, status, data cursor/epoch, LR schedule, optimizer
                                              hyper-parameters, losses, accuracies, evaluations, the
                                              best one and the patience used up, token counts, the spec

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
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from muxtune.errors import MuxTuneError
from muxtune.executor.distributed import from_rank0
from muxtune.spec import TaskSpec, write_text_atomic

FORMAT_VERSION = 1


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(trainer, run_dir: Path | None, model: str, previous: dict | None = None) -> dict | None:
    """Checkpoint every task whose state changed since `previous` (the manifest returned by the last
    call); returns the new manifest. With several processes every one calls it at the same step (a
    collective): they send their parts to rank 0, which writes the checkpoint and returns the manifest
    (None elsewhere; see "multi-process plans" below)."""
    if trainer.topo.world > 1:
        return _save_parts(trainer, run_dir, model, previous)
    payloads = {name: _task_payload(run) for name, run in trainer.runs.items()}
    return _commit(checkpoint_dir(run_dir), {**_manifest_head(trainer, model), "groups": trainer.groups,
                                             "step_times": trainer.step_times, "step_tokens": trainer.step_tokens,
                                             "step_shapes": [list(shape) for shape in trainer.step_shapes]},
                   payloads, previous)


def _manifest_head(trainer, model: str) -> dict:
    return {"version": FORMAT_VERSION, "model": model, "steps": len(trainer.step_times),
            "plan": plan_layout(trainer), "eval_times": [list(e) for e in trainer.eval_times]}


def _commit(root: Path, manifest: dict, payloads: dict[str, tuple[dict, dict]], previous: dict | None) -> dict:
    """Write each task's (tensors, state) whose step or status changed since `previous`, then the
    manifest naming them all, then drop the folders it no longer names (in that order: see above)."""
    root.mkdir(parents=True, exist_ok=True)
    old_tasks = (previous or {}).get("tasks", {})
    tasks = {}
    for name, (tensors, state) in payloads.items():
        folder = f"step-{state['step']:06d}"
        known = old_tasks.get(name)
        if not (known and known["folder"] == folder and known["status"] == state["status"]
                and (root / name / folder).is_dir()):
            _write_task(root / name / folder, tensors, state)
        tasks[name] = {"folder": folder, "status": state["status"], "spec": state["spec"]}
    manifest = {**manifest, "tasks": tasks}
    write_text_atomic(root / "manifest.json", json.dumps(manifest) + "\n")
    for name in tasks:  # older checkpoints are dropped only once the new manifest is in place
        for old in (root / name).iterdir():
            if old.name != tasks[name]["folder"]:
                shutil.rmtree(old, ignore_errors=True)
    return manifest


def _task_payload(run, adapter_keys: set[str] | None = None,
                  param_indices: set[int] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A task's checkpoint as (tensors, state.json content); `adapter_keys` / `param_indices` keep only
    the adapter tensors and AdamW entries one pipeline stage owns (all by default)."""
    tensors = {f"adapter.{k}": v.detach().cpu().contiguous() for k, v in run.adapter.state_dict().items()
               if adapter_keys is None or k in adapter_keys}
    optim = run.optimizer.state_dict()
    optim_scalars = {}
    for index, state in optim["state"].items():
        if param_indices is not None and index not in param_indices:
            continue
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                optim_scalars[f"{index}.{key}"] = value
    tensors["rng.data"] = run.sampler.generator.get_state()
    tensors["data.order"] = torch.tensor(run.sampler.order, dtype=torch.int64)
    if run.adapter.dropout_gen is not None:
        tensors["rng.dropout"] = run.adapter.dropout_gen.get_state()
    for key, value in (run.best_state or {}).items():
        if adapter_keys is None or key in adapter_keys:
            tensors[f"best.{key}"] = value.detach().cpu().contiguous()
    state = {
        "version": FORMAT_VERSION,
        "task": run.spec.name,
        "spec": run.spec.model_dump(mode="json"),
        "step": run.step,
        "status": run.status,
        "reason": run.reason,
        "stopped_at": run.stopped_at,
        "bad_examples": run.bad_examples,
        "data": {"epoch": run.sampler.epoch, "cursor": run.sampler.cursor, "examples": len(run.sampler.examples)},
        "losses": run.losses,
        "accuracies": run.accuracies,
        "evaluations": run.evaluations,
        "best": {"loss": run.best_loss, "step": run.best_step, "bad_evaluations": run.bad_evaluations},
        "tokens": run.tokens,
        "computed_tokens": run.computed_tokens,
        "seconds": run.seconds,
        "param_groups": optim["param_groups"],
        "optimizer_scalars": optim_scalars,
        "scheduler": run.scheduler.state_dict(),
    }
    return tensors, state


def _write_task(folder: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(tensors, str(staging / "tensors.safetensors"))
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


def joined_tasks(manifest: dict, configured: set[str], run_dir: Path) -> list[TaskSpec]:
    """The tasks submitted while the run went on (through the spool): in the manifest, not in the config."""
    specs = []
    for name, entry in manifest["tasks"].items():
        if name not in configured:
            try:
                specs.append(TaskSpec.model_validate(entry["spec"]))
            except Exception as exc:  # noqa: BLE001 - a damaged manifest is bad input
                raise MuxTuneError(f"{checkpoint_dir(run_dir) / 'manifest.json'}: tasks.{name}.spec: {exc}") from None
    return specs


def restore(trainer, run_dir: Path, manifest: dict) -> None:
    """Load each task's checkpoint named by the manifest (checked already: check_manifest,
    check_layout) into the trainer's runs (same names). With several processes every one calls it:
    rank 0 reads the files and sends them to every process, which loads its share."""
    root = checkpoint_dir(run_dir)
    trainer.eval_times = [tuple(e) for e in manifest.get("eval_times", [])]
    if trainer.topo.world > 1:
        own = _restore_parts(trainer, root, manifest)
    else:
        for name, entry in manifest["tasks"].items():
            _restore_task(trainer.runs[name], root / name / entry["folder"])
        own = manifest
    trainer.step_times, trainer.step_tokens = list(own["step_times"]), list(own["step_tokens"])
    trainer.step_shapes = [tuple(shape) for shape in own["step_shapes"]]


def _restore_task(run, folder: Path) -> None:
    state, tensors = _read_task(folder)
    _apply_task(run, state, tensors, folder)


def _read_task(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    state_path, tensors_path = folder / "state.json", folder / "tensors.safetensors"
    try:
        return json.loads(state_path.read_text()), load_file(str(tensors_path))
    except FileNotFoundError as exc:
        raise MuxTuneError(f"{exc.filename}: checkpoint file missing") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file of any kind is bad input
        raise MuxTuneError(f"{folder}: unreadable checkpoint: {exc}") from None


def _apply_task(run, state: dict, tensors: dict[str, torch.Tensor], folder: Path,
                adapter_keys: set[str] | None = None, param_indices: set[int] | None = None,
                rank: int | None = None) -> None:
    """Put a task's checkpoint into its TaskRun. Every adapter tensor is checked against the task's
    adapter; only `adapter_keys` / `param_indices` (one pipeline stage's share) are loaded. `rank`:
    the process of a multi-process checkpoint, whose own counters and dropout stream are restored."""
    tensors_path, state_path = folder / "tensors.safetensors", folder / "state.json"
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
    if adapter_keys is None:
        run.adapter.load_state_dict(adapter)
    else:  # the other stages' layers are on the meta device here
        run.adapter.load_state_dict({k: v for k, v in adapter.items() if k in adapter_keys}, strict=False)

    optim_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, field = key.split(".", 2)
            optim_state.setdefault(int(index), {})[field] = value
    for key, value in state["optimizer_scalars"].items():
        index, field = key.split(".", 1)
        optim_state.setdefault(int(index), {})[field] = value
    if param_indices is not None:
        optim_state = {i: s for i, s in optim_state.items() if i in param_indices}
    run.optimizer.load_state_dict({"state": optim_state, "param_groups": state["param_groups"]})
    run.scheduler.load_state_dict(state["scheduler"])

    run.sampler.generator.set_state(tensors["rng.data"])
    run.sampler.order = tensors["data.order"].tolist()
    run.sampler.epoch, run.sampler.cursor = state["data"]["epoch"], state["data"]["cursor"]
    own = state if rank is None else state["ranks"][str(rank)]
    dropout = "rng.dropout" if rank is None else f"rank{rank}.rng.dropout"
    if run.adapter.dropout_gen is not None:
        run.adapter.dropout_gen.set_state(tensors[dropout])
    run.step, run.status, run.reason = state["step"], state["status"], state["reason"]
    run.stopped_at, run.bad_examples = state["stopped_at"], state["bad_examples"]
    run.losses, run.tokens = own["losses"], own["tokens"]
    # validation (absent from checkpoints written before it existed)
    run.accuracies, run.evaluations = own.get("accuracies", []), state.get("evaluations", [])
    best = state.get("best", {})
    run.best_loss, run.best_step = best.get("loss"), best.get("step")
    run.bad_evaluations = best.get("bad_evaluations", 0)
    device = next(iter(run.adapter.state_dict().values())).device
    run.best_state = {k.removeprefix("best."): v.to(device) for k, v in tensors.items() if k.startswith("best.")} or None
    run.computed_tokens, run.seconds = own["computed_tokens"], own["seconds"]


# --- multi-process plans (executor/pipeline.py, distributed.py) ---------------------------------------
#
# Every process holds the whole job's task states except the adapter layers (and their AdamW moments
# and best weights) of other pipeline stages, its own counters (a replica counts its share of the
# tokens; only the last stage knows the losses) and its own dropout stream. At a checkpoint every
# process sends its part to rank 0 (adapters are small), which merges them into the single-process
# format (full adapter, full optimizer state, one copy of the data order and cursor, identical on every
# process) plus each rank's counters and dropout generator, and writes it with the same staging,
# manifest and clean-up order. Rank 0 alone writes and reads the files: other nodes need not share its
# file system.


def plan_layout(trainer) -> dict:
    """What a checkpoint is only valid for: the same stages, replicas, schedule and micro-batches."""
    return {"layout": trainer.layout.model_dump(mode="json"), "schedule": trainer.schedule,
            "micro_batches": [trainer.micro_batch_count(g) for g in range(len(trainer.groups))]}


def check_layout(manifest: dict, run_dir: Path, plan, groups: bool = True, joined: set[str] = frozenset()) -> None:
    """Refuse to resume checkpoints written under another parallel layout with this plan; `groups`: the
    plan's fusion groups must be the checkpoint's too (multi-process plans), apart from the `joined`
    tasks (submitted mid-run: in the manifest, not in the config or plan)."""
    path = checkpoint_dir(run_dir) / "manifest.json"
    saved = manifest.get("plan", {"layout": {"dp": 1, "pp": 1, "tp": 1, "stage_layers": None}})
    if not isinstance(saved, dict) or not isinstance(saved.get("layout"), dict):
        raise MuxTuneError(f"{path}: plan: expected the plan's layout, got {saved!r}")
    now = {"layout": plan.groups[0].layout.model_dump(mode="json"), "schedule": plan.schedule,
           "micro_batches": [g.micro_batches for g in plan.groups]}
    for key in ("dp", "pp", "tp", "stage_layers"):
        if saved["layout"].get(key) != now["layout"][key]:
            raise MuxTuneError(f"{path}: plan.layout.{key}: the checkpoints were written with {key}="
                               f"{saved['layout'].get(key)}, this plan has {key}={now['layout'][key]}; resume "
                               "with the plan they were written with (runs/<name>/plan.json)")
    if "schedule" in saved and saved["schedule"] != now["schedule"]:
        raise MuxTuneError(f"{path}: plan.schedule: the checkpoints were written with {saved['schedule']!r}, "
                           f"this plan has {now['schedule']!r}")
    if not groups:
        return
    planned = [list(g.tasks) for g in plan.groups]
    saved_groups = manifest.get("groups")
    if isinstance(saved_groups, list) and all(isinstance(g, list) for g in saved_groups):
        saved_groups = [[name for name in g if name not in joined] for g in saved_groups]
    if saved_groups != planned:
        raise MuxTuneError(f"{path}: groups: the checkpoints were written for fusion groups {manifest.get('groups')}, "
                           f"this plan has {planned}")
    if "micro_batches" in saved and saved["micro_batches"] != now["micro_batches"]:
        raise MuxTuneError(f"{path}: plan.groups.micro_batches: the checkpoints were written with "
                           f"{saved['micro_batches']}, this plan has {now['micro_batches']}")


def _owned(trainer, run) -> tuple[set[str], set[int]]:
    """The adapter state-dict keys and optimizer parameter indices this process's stage trains."""
    mine = {id(p) for p in trainer.owned[run.spec.name]}
    return trainer.stage.owned_keys(run), {i for i, p in enumerate(run.parameters()) if id(p) in mine}


def _save_parts(trainer, run_dir: Path | None, model: str, previous: dict | None) -> dict | None:
    import torch.distributed as dist

    topo = trainer.topo
    part = {"rank": topo.rank, "replica": topo.replica, "stage": topo.stage, "first": topo.first,
            "last": topo.last, "tasks": {name: _task_payload(run, *_owned(trainer, run))
                                         for name, run in trainer.runs.items()},
            "step_times": trainer.step_times, "step_tokens": trainer.step_tokens,
            "step_shapes": [list(s) for s in trainer.step_shapes]}
    gathered = [None] * topo.world if topo.rank == 0 else None
    dist.gather_object(part, gathered, dst=0)
    if topo.rank != 0 or run_dir is None:
        return None
    ranks = sorted(gathered, key=lambda p: p["rank"])
    replica0 = sorted((p for p in ranks if p["replica"] == 0), key=lambda p: p["stage"])
    last = replica0[-1]
    heads = [p for p in ranks if p["first"]]
    payloads = {}
    for name in trainer.runs:
        tensors, state = dict(ranks[0]["tasks"][name][0]), dict(ranks[0]["tasks"][name][1])
        tensors.pop("rng.dropout", None)
        scalars = {}
        for p in replica0:  # each stage's adapter layers and AdamW entries; replicas hold equal copies
            own_tensors, own_state = p["tasks"][name]
            tensors.update({k: v for k, v in own_tensors.items() if k.startswith(("adapter.", "optimizer.", "best."))})
            scalars.update(own_state["optimizer_scalars"])
        state["optimizer_scalars"] = scalars
        state["ranks"] = {}
        for p in ranks:
            own_tensors, own_state = p["tasks"][name]
            if "rng.dropout" in own_tensors:
                tensors[f"rank{p['rank']}.rng.dropout"] = own_tensors["rng.dropout"]
            state["ranks"][str(p["rank"])] = {k: own_state[k] for k in ("losses", "accuracies", "tokens",
                                                                         "computed_tokens", "seconds")}
        # the job's figures, as a one-process checkpoint has them (for reading; resume uses `ranks`)
        state["losses"] = last["tasks"][name][1]["losses"]
        state["accuracies"] = last["tasks"][name][1]["accuracies"]
        state["tokens"] = sum(p["tasks"][name][1]["tokens"] for p in heads)
        state["computed_tokens"] = sum(p["tasks"][name][1]["computed_tokens"] for p in heads)
        payloads[name] = (tensors, state)
    manifest = {
        **_manifest_head(trainer, model),
        "groups": trainer.groups,
        "step_times": [max(t) for t in zip(*(p["step_times"] for p in ranks))],
        "step_tokens": [sum(t) for t in zip(*(p["step_tokens"] for p in heads))],
        "step_shapes": [s for p in heads for s in p["step_shapes"]],
        "ranks": {str(p["rank"]): {k: p[k] for k in ("step_times", "step_tokens", "step_shapes")} for p in ranks},
    }
    return _commit(checkpoint_dir(run_dir), manifest, payloads, previous)


def _restore_parts(trainer, root: Path, manifest: dict) -> dict:
    """Every process: its share of each task's checkpoint (rank 0 reads the files and sends them);
    returns this rank's own step records."""
    topo = trainer.topo
    if not isinstance(manifest.get("ranks"), dict) or str(topo.world - 1) not in manifest["ranks"]:
        raise MuxTuneError(f"{root / 'manifest.json'}: ranks: not written by a {topo.world}-process run")

    def read():
        files = {}
        for name, entry in manifest["tasks"].items():
            folder = root / name / entry["folder"]
            state, _ = _read_task(folder)  # parse once here, so a damaged file names itself
            files[name] = (str(folder), state, (folder / "tensors.safetensors").read_bytes())
        return files

    for name, (folder, state, blob) in from_rank0(topo, read).items():
        run = trainer.runs[name]
        keys, indices = _owned(trainer, run)
        _apply_task(run, state, load_bytes(blob), Path(folder), keys, indices, rank=topo.rank)
    return manifest["ranks"][str(topo.rank)]
