"""Measure what one multiplexed training step costs on this device -> a Profile (pandas table, CSV).

Everything is measured on the real executor: the backbone from `load_backbone`, its own decoder layers,
and the tasks' adapters attached through `Multiplexer` / `MultiplexedTrainer` exactly as training runs
them. Rows of the table (column `op`):

  layer   one decoder layer, fwd / bwd (dX only: the backbone is frozen), over (tokens, seq_len)
  tp_layer  LLaMA-family models: one tensor rank's shard of a decoder layer at tensor-parallel degree
          `world` (TP_DEGREES; heads, KV heads and MLP width / world, as executor/tensor_parallel.py
          splits it), its compute only (the collectives are priced from the allreduce rows), fwd / bwd,
          over the layer grid; saved_bytes as for `layer`
  stem    everything of the backbone's forward that is not a decoder layer (embedding, masks, rotary
          tables, final norm), fwd, over (tokens, seq_len); its saved_bytes: the mask and rotary
          tables the layers save (shared by all layers, so not in a layer's saved_bytes)
  head    LM head + float cross-entropy + per-task loss sums, fwd / bwd, over tokens
  model   the whole bare backbone + head, fwd / bwd, over (tokens, seq_len): ties the parts together;
          phase eval: the same forward under no_grad, as a validation pass runs it (no autograd graph)
  task    what ONE task of `method` at `rank` adds to the whole model (all layers) when its `tokens`
          ride in the fused batch: measured with the task attached minus the bare model, paired
          (phases fwd, bwd, skip, step: see measure_tasks)
  target  what ONE LoRA/DoRA task adds per backbone op NAME it targets (e.g. `q_proj`, all layers),
          over (tokens, rank): phases fwd / bwd as for `task`, and dropout_fwd / dropout_bwd, what
          its dropout (p > 0: the mask drawn at the task's own shape, the masked input) adds on top.
          A task's overhead is the sum over its targets, so any target list is priced from these rows;
          shared_fwd / shared_bwd: what a second task of the method on the same op does not add again
          (one autograd node or kernel launch for all of them, see measure_target_shared).
  uncovered  phase bwd, over (tokens, `params` = an op's input width): the backward of a wrapped op on
          rows none of its tasks covers (dX zero-filled there, then added to the frozen op's dX;
          measure_uncovered); meta `op_inputs` gives each op name's input width
  step    phase host_fixed, over tokens: the host work of a trainer step that is there once per step
          (fusing, routing, loss bookkeeping), not once per task (see measure_step_fixed)
  optimizer  one task's AdamW step + gradient clipping + zero_grad, over its trainable `params`
  p2p / allreduce  between 2 processes (gloo on CPU; NCCL when 2 GPUs are visible), over `nbytes`

Timing: warm-up calls, then `repeats` timed calls, median; on CUDA the device is synchronized around
each timed region. Memory: `saved_bytes` are the tensors autograd keeps for backward (counted with
saved-tensor hooks, any device; for a task: those saved inside its adapter code, `batch_bytes` being
the backbone's own tensors among them); `peak_bytes` is the most memory allocated on top of what was live
before the op (CUDA: max_memory_allocated; CPU: a dispatch-mode tally of live tensor storages).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path

import pandas as pd
import torch

from muxtune.errors import MuxTuneError
from muxtune.profiler.backbone_parts import (bare_model_loss, decoder_layers, layer_param_bytes,  # noqa: F401
                                             op_input_widths, target_names, tp_shard_layers)
from muxtune.profiler.budget import Progress, fit, least_repeats, uncovered_tokens, whole_model_points
from muxtune.profiler.measure import (_row, measure_backbone, measure_comm, measure_optimizer,  # noqa: F401
                                      measure_step_fixed, measure_targets, measure_tasks, measure_uncovered,
                                      peft_config_for, pilot)
from muxtune.profiler.probes import LiveBytes, observe_step, peak_bytes  # noqa: F401
from muxtune.profiler.profile_file import (COLUMNS, Profile, fingerprint, profile_filename,  # noqa: F401
                                           user_cache_dir)
from muxtune.profiler.sampling import Sampling, clock, fwd_bwd_seconds, sync  # noqa: F401
from muxtune.schedule import attention_targets
from muxtune.spec import METHODS, method_card

# The names marked noqa: F401 are this module's public face: callers import them from here (the profile
# and its helpers), wherever they live (profile_file, probes, backbone_parts, measure).

REPO_PROFILES = Path(__file__).resolve().parent.parent / "profiles"  # shipped profiles (in the repo)


# --- what is measured, per mode ----------------------------------------------------------------------

# (seq_len, tokens...) of the backbone grids: rows = tokens / seq_len sequences of seq_len each.
GRIDS = {
    "quick": {"layer": {16: [64, 256, 1024], 64: [64, 256, 1024, 4096], 256: [256, 1024, 4096]},
              "task_seq": 32, "task_rows": [2, 8], "target_tokens": [256, 1024, 4096],
              "ranks": {"lora": [4, 32], "dora": [4, 32], "adapter": [8, 64], "prefix": [8, 32],
                        "prompt": [8, 24], "ia3": [0], "bitfit": [0]},
              "params": [1_000, 100_000, 1_000_000], "nbytes": [4_096, 262_144, 4_194_304],
              "warmup": 2, "repeats": 7},
    # full: the quick grid's points and more (longer sequences, more tokens, ranks and rows), never fewer:
    # a full profile must price small steps at least as well as a quick one (a full grid that started at
    # 256 tokens per layer and 128-token task rows left every small configuration extrapolated)
    "full": {"layer": {16: [64, 256, 1024], 64: [64, 256, 1024, 4096], 256: [256, 1024, 4096, 8192],
                       1024: [2048, 8192]},
             "task_seq": 32, "task_rows": [2, 8, 32], "target_tokens": [256, 1024, 4096, 16384],
             "ranks": {"lora": [4, 16, 64], "dora": [4, 16, 64], "adapter": [8, 64, 256],
                       "prefix": [8, 32, 128], "prompt": [8, 24, 96], "ia3": [0], "bitfit": [0]},
             "params": [1_000, 100_000, 1_000_000, 30_000_000],
             "nbytes": [4_096, 262_144, 4_194_304, 67_108_864],
             "warmup": 2, "repeats": 15},
}


DEFAULT_BUDGET = {"quick": 180.0, "full": 600.0}  # seconds: what a profile may take unless told otherwise


def run_profile(model_name: str, device: str = "cpu", mode: str = "quick", dtype: torch.dtype = torch.float32,
                comm: bool = True, progress: bool = True, budget: float | None = -1.0,
                methods: list[str] | None = None, targets: list[str] | None = None,
                sizes: list[tuple[int, int]] | None = None) -> Profile:
    """Measure the op table on `device` for `model_name` (a builtin preset or a HF model dir) within
    `budget` seconds (-1: the mode's default, None: no budget; profiler/budget.py says what is cut first).
    `methods` / `targets`: only what those PEFT methods and LoRA/DoRA target op names need (default: all);
    `sizes`: (tokens, seq_len) of the steps the tasks at hand run: layer rows reach them (budget.with_sizes)."""
    from muxtune.executor.backbone import load_backbone
    from muxtune.profiler.cost_model import ModelShape

    if mode not in GRIDS:
        raise MuxTuneError(f"profile mode: expected one of {sorted(GRIDS)}, got {mode!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MuxTuneError(f"devices: {device!r} requested but no CUDA device is available here")
    if device.startswith("cuda") and os.environ.get("MUXTUNE_PROFILE_CLOCK") == "cpu":
        raise MuxTuneError("MUXTUNE_PROFILE_CLOCK=cpu times host CPU work only; CUDA kernels run "
                           "asynchronously: unset it to profile a GPU")
    unknown = sorted(set(methods or []) - set(METHODS))
    if unknown:
        raise MuxTuneError(f"profile methods: unknown {unknown}; expected some of {sorted(METHODS)}")
    if budget == -1.0:
        budget = DEFAULT_BUDGET.get(mode)
    if budget is not None and budget <= 0:
        raise MuxTuneError(f"profile budget: expected seconds > 0, got {budget}")
    started = time.perf_counter()
    grid = copy.deepcopy(GRIDS[mode])
    for method in METHODS:  # a method of another package, at the ranks its card names
        if method_card(method).probe_ranks and method not in grid["ranks"]:
            grid["ranks"][method] = list(method_card(method).probe_ranks)
    if methods:
        grid["ranks"] = {m: r for m, r in grid["ranks"].items() if m in methods}
    if targets:
        grid["targets"] = sorted(targets)
    backbone = load_backbone(model_name, device=device, dtype=dtype)
    model = backbone.model
    fp = fingerprint(device, model_name, model.config, dtype)
    _, _, layers = decoder_layers(model)
    sizes = sorted({(int(t), int(s)) for t, s in sizes or [] if t > 0 and s > 0})
    targets = target_names(model, grid)  # the budget does not cut them
    probe = pilot(model, device)
    setup = time.perf_counter() - started  # the backbone loaded and the pilot timed: the points get the rest
    left = budget and max(budget - setup, 1.0)
    grid, costs, cuts = fit(grid, left, probe, targets, bool(tp_shard_layers(model, layers[0])), sizes)
    if not comm:
        costs.pop(("comm",))
    sampling_for = Sampling(warmup=grid["warmup"], least=least_repeats(grid), most=grid["repeats"])
    bar = Progress(costs, left,
                   f"profiling {model_name} on {device}", progress)
    if progress and cuts:
        bar.bar.write(f"profile: to fit the {budget:.0f} s budget: {'; '.join(cuts)}")
    s = dataclasses.replace(sampling_for, budget=bar.budget)
    rows, widths = [], op_input_widths(model)
    try:
        rows += measure_backbone(model, device, grid["layer"], s, bar, whole_model_points(grid))
        rows += measure_tasks(backbone, device, grid, s, bar)
        rows += measure_targets(backbone, device, grid, s, bar)
        if any(method_card(m).targeted for m in grid["ranks"]):
            rows += measure_uncovered(device, [w for n in targets for w in widths[n]],
                                      uncovered_tokens(grid, sizes), dtype, s, bar)
        rows += measure_step_fixed(backbone, device, grid, s, bar)
        tensors = 4 * model.config.num_hidden_layers  # LoRA on two ops per layer: A and B each
        rows += measure_optimizer(device, grid["params"], tensors, s, bar)
        if comm:
            bar.begin(("comm",))
            rows += measure_comm(device, grid["nbytes"], s)
            bar.end()
    finally:
        bar.close()
    table = pd.DataFrame(rows, columns=COLUMNS)
    meta = {"fingerprint": fp, "mode": mode, "shape": ModelShape.from_config(model.config, dtype).as_dict(),
            "weight_bytes": layer_param_bytes(model),
            # what the method-level task rows were measured on (a task with no target list is priced so)
            "task_targets": attention_targets(model.config.model_type),
            "methods": sorted(grid["ranks"]), "targets": targets, "sizes": sizes,
            "op_inputs": widths,
            "budget_s": budget, "estimated_s": round(sum(costs.values()), 1), "cuts": cuts,
            "setup_s": round(setup, 1),
            "spent_s": {kind: [round(estimated, 1), round(measured, 1)] for kind, (estimated, measured) in bar.spent.items()},
            "seconds": round(time.perf_counter() - started, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "device_string": device, "clock": "cpu" if os.environ.get("MUXTUNE_PROFILE_CLOCK") == "cpu" else "wall"}
    return Profile(table, meta)


COMPARABLE = ("device", "model", "model_hash", "dtype")  # what a stored profile must share to be checked


def covers(meta: dict, mode: str, methods=None, targets=None) -> bool:
    """Whether a stored profile has what is asked: a full one serves a quick request (not the other way
    round); one measured for some methods / target ops only serves tasks that use no others."""
    if mode == "full" and meta.get("mode") != "full":
        return False
    if methods and meta.get("methods") is not None and not set(methods) <= set(meta["methods"]):
        return False
    return not (targets and meta.get("targets") is not None and not set(targets) <= set(meta["targets"]))


def stored_candidates(fp: dict, mode: str, methods=None, targets=None, paths: list[Path] | None = None) -> list[Path]:
    """Stored profiles (`paths`, the shipped ones, the user cache) of the same model, dtype and kind of
    device as `fp`, that cover what is asked: the exact fingerprint first, then the same device name."""
    slug = fp["model"].removeprefix("builtin:").replace("/", "_").strip("._") or "model"
    files = list(paths or [])
    for folder in (REPO_PROFILES, user_cache_dir()):
        files += sorted(folder.glob(f"{fp['device']}-*-{slug}.csv"))
    found = []
    for path in dict.fromkeys(Path(f) for f in files):
        if not path.is_file():
            continue
        try:
            meta = Profile.load(path).meta
        except MuxTuneError:
            continue
        theirs = meta.get("fingerprint", {})
        if all(theirs.get(k) == fp[k] for k in COMPARABLE) and covers(meta, mode, methods, targets):
            found.append((theirs != fp, theirs.get("device_name") != fp["device_name"], path))
    return [path for *_, path in sorted(found, key=lambda x: x[:2])]


def trusted_profile(model_name: str, device: str, mode: str = "quick", dtype: torch.dtype = torch.float32,
                    methods=None, targets=None, paths: list[Path] | None = None, say=print):
    """(profile, path, calibration) of the first stored profile that passes the calibration check on this
    machine (profiler/calibration.py), rescaled if the machine is uniformly faster or slower (saved in the
    user cache under this machine's fingerprint); None when none does (measure anew)."""
    from muxtune.executor.backbone import load_backbone, model_config
    from muxtune.profiler import calibration

    config = model_config(model_name)
    fp = fingerprint(device, model_name, config, dtype)
    candidates = stored_candidates(fp, mode, methods, targets, paths)
    if not candidates:
        return None
    model = None
    for path in candidates:
        profile = Profile.load(path)
        if _MEASURED_HERE.get(str(path)) == path.stat().st_mtime_ns:
            # this process measured it, minutes ago: a check now would only weigh this machine's noise
            # against itself (benchmarks.pipeline re-measured its own 7-minute-old profile over a 0.86-1.03
            # spread of the references)
            profile.meta["calibration"] = {"source": str(path), "verdict": "trusted", "scale": 1.0,
                                           "measured_by_this_process": True}
            return profile, path, calibration.Calibration({}, "trusted", 1.0)
        model = model or load_backbone(model_name, device=device, dtype=dtype).model
        try:
            check = calibration.check(profile, model, device)
        except LookupError:  # a grid without the reference points: cannot be checked
            continue
        say(f"profile {path}: {check.describe()}")
        profile.meta["calibration"] = {"source": str(path), "verdict": check.verdict, "scale": round(check.scale, 4),
                                       "ratios": {k: round(v, 4) for k, v in check.ratios.items()},
                                       "checked": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if check.verdict == "trusted":
            return profile, path, check
        if check.verdict == "rescaled":
            profile = calibration.rescaled(profile, check)
            profile.meta["fingerprint"] = fp
            return profile, profile.save(user_cache_dir() / profile_filename(fp)), check
    return None


def load_or_profile(model_name: str, device: str = "cpu", mode: str = "quick", dtype: torch.dtype = torch.float32,
                    out: Path | None = None, refresh: bool = False, progress: bool = True,
                    budget: float | None = -1.0, methods=None, targets=None, sizes=None,
                    say=print) -> tuple[Profile, Path, bool]:
    """A stored profile that passes the calibration check here (`trusted_profile`), else a fresh
    measurement within `budget` saved to `out` (default: the user cache). Returns (profile, path, reused)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MuxTuneError(f"devices: {device!r} requested but no CUDA device is available here")
    if not refresh:
        found = trusted_profile(model_name, device, mode, dtype, methods, targets,
                                [Path(out)] if out and Path(out).is_file() else None, say)
        if found is not None:
            profile, path, _ = found
            if out and Path(out) != path:
                path = profile.save(out)
            return profile, path, True
    profile = run_profile(model_name, device, mode, dtype, progress=progress, budget=budget, methods=methods,
                          targets=targets, sizes=sizes)
    path = profile.save(Path(out) if out else user_cache_dir() / profile_filename(profile.meta["fingerprint"]))
    _MEASURED_HERE[str(path)] = path.stat().st_mtime_ns
    return profile, path, False


_MEASURED_HERE: dict[str, int] = {}  # profiles this process measured and saved: path -> the file's mtime
