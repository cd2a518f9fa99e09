"""CostModel: the one place that knows what a fused micro-batch costs in time and memory.

Two sources, one interface:
- `CostModel.from_profile(profile)`: measurements of this device (profiler/profile.py), interpolated
  to shapes not measured. Interpolation is piecewise linear with linear extrapolation past the ends:
  in tokens at a fixed sequence length, then across sequence lengths (a layer costs a + b*T + c*T*S,
  so linear in T at fixed S and linear in S at fixed T are both exact for that form); a task's
  overhead in tokens per measured rank, then across ranks; optimizer in parameter count; links in bytes.
- `CostModel.analytic(hardware, shape)`: a roofline per op (FLOPs and bytes from ModelShape and the
  micro-batch) over a small hardware catalog (profiler/hardware.csv), so what-if planning works for
  GPUs we do not have; `.calibrate(profile)` scales it by the efficiency a real profile achieved.

How a step is composed (profile): the whole bare model over (T, span) is measured as `model`; the
parts `stem`, `layer`, `head` are measured alone, and what the parts miss (the model's own loop,
mask building) is spread evenly over the layers, so a full single-device step reproduces the
measured model exactly and a pipeline stage of k layers gets k layers' share. Each task adds its
measured overhead (spread over the layers too), less, for the second and later task of a method, the
part tasks of one method share (one split and concatenation per wrapped op). A LoRA/DoRA task's
overhead is the sum over the op names it targets of the profile's `target` rows (plus their
`dropout_*` rows when it has dropout), so its target list and dropout are priced, not assumed; each
LoRA task after the first on an op saves that op's `shared_*` part (one autograd node / kernel
launch serves them all). The
first stage's backward is shortened by the batch's `skip`: the backward work below the lowest op any
of its methods needs a gradient at (the least of its methods' measured skips). span = seq_len + the
longest prefix in the batch. A step adds each task's optimizer and host work and, once per
micro-batch, the step's fixed host work (`step_breakdown` lists every term). Host terms are nearly
flat in tokens and rank: they are held at the ends of their measured range, never extrapolated.
Tensor parallelism (tp > 1, executor/tensor_parallel.py): forward/backward_seconds(..., tp) price one
tensor rank's compute (its layer shard, the profile's `tp_layer` rows; stem, head and adapters whole),
tp_collectives / tp_allreduce_seconds the all-reduces it waits for, backbone_bytes / activation_bytes
(..., tp) and tp_params its memory (profiler/tensor_parallel_pricing.py, profiler/memory_model.py).
Nothing else in MuxTune holds a timing formula: the planner and simulator call these methods.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pandas as pd

from muxtune.errors import MuxTuneError
from muxtune.profiler.interpolation import interp1, interp_grid
from muxtune.profiler.memory_model import ADAM_BYTES_PER_PARAM, GRAD_BYTES_PER_PARAM, MemoryModel  # noqa: F401
from muxtune.profiler.shapes import MicroBatch, ModelShape, TaskLoad, llama_7b_shape  # noqa: F401
from muxtune.profiler.tensor_parallel_pricing import TensorParallelPricing
from muxtune.spec import METHODS, method_card

# the names marked noqa: F401 are part of this module's face: callers import them from here

CATALOG = Path(__file__).with_name("hardware.csv")


def load_catalog() -> pd.DataFrame:
    return pd.read_csv(CATALOG)


def hardware(name: str) -> dict:
    """A catalog row by its name (e.g. 'h100') or by a GPU name it matches ('NVIDIA H100 80GB HBM3')."""
    catalog = load_catalog()
    key = name.lower().removesuffix(" (analytic)")
    for row in catalog.to_dict("records"):
        # whole words, so 'NVIDIA L40S' is not taken for an L4
        if key == row["name"] or any(re.search(rf"\b{re.escape(m.lower())}\b", key) for m in row["match"].split("|")):
            return row
    raise MuxTuneError(f"hardware: {name!r} is not in the catalog ({CATALOG.name}); choose from "
                       + ", ".join(catalog["name"]))


# --- the cost model ----------------------------------------------------------------------------------


class CostModel(MemoryModel, TensorParallelPricing):
    """Time and memory of ops, layers, pipeline stages and whole fused steps (see module docstring)."""

    def __init__(self, shape: ModelShape, device: str, profile=None, hw: dict | None = None,
                 weight_bytes: dict | None = None):
        self.shape, self.device = shape, device
        self.profile, self.hw = profile, hw
        self.scale = {"layer": 1.0, "head": 1.0, "task": 1.0, "optimizer": 1.0, "activation": 1.0}
        self.weight_bytes = weight_bytes or self._analytic_weight_bytes()
        if profile is not None:
            # pure look-ups into an immutable profile, asked thousands of times by the planner: memoize
            # them per instance (each is a pandas selection + interpolation, ~ms each)
            for name in ("_task_seconds", "_shared_seconds", "_grid", "_batch_skip", "_batch_shared", "_target_rows",
                         "_targets_of", "_batch_overhead"):
                setattr(self, name, functools.lru_cache(maxsize=65536)(getattr(self, name)))

    # constructors

    @classmethod
    def from_profile(cls, profile) -> CostModel:
        from muxtune.profiler.profile_file import Profile

        if not isinstance(profile, Profile):
            profile = Profile.load(profile)
        meta = profile.meta
        shape = ModelShape(**meta["shape"])
        fp = meta["fingerprint"]
        device = "cpu" if fp["device"] == "cpu" else f"cuda:{fp['device_name']}"
        hw = None
        if fp["device"] == "cuda":
            try:
                hw = hardware(fp["device_name"])  # links when only one GPU was there to measure them
            except MuxTuneError:
                hw = None
        return cls(shape, device, profile=profile, hw=hw, weight_bytes=meta["weight_bytes"])

    @classmethod
    def analytic(cls, hardware_name: str, shape: ModelShape) -> CostModel:
        hw = hardware(hardware_name)
        return cls(shape, f"{hw['name']} (analytic)", hw=hw)

    def calibrate(self, profile) -> CostModel:
        """Scale this analytic model by how far a real GPU profile sits from the roofline of its own GPU
        (per op family: layers, head, task overheads, optimizer); returns self."""
        if self.profile is not None:
            raise MuxTuneError("calibrate: this cost model is already built from a profile")
        measured = CostModel.from_profile(profile)
        fp = measured.profile.meta["fingerprint"]
        if fp["device"] != "cuda":
            raise MuxTuneError(f"calibrate: needs a profile measured on a catalog GPU; this one is from "
                               f"{fp['device_name']!r} ({fp['device']})")
        own = CostModel.analytic(fp["device_name"], measured.shape)
        ratios = {"layer": [], "head": [], "task": [], "optimizer": []}
        for row in measured.profile.table.to_dict("records"):
            op = row["op"]
            if op == "layer" and row["phase"] == "fwd":
                mb = MicroBatch((TaskLoad("lora", 0, int(row["tokens"]), 0),), int(row["seq_len"]))
                ratios["layer"].append(row["seconds"] / own._analytic_layer(mb, "fwd"))
            elif op == "head" and row["phase"] == "fwd":
                ratios["head"].append(row["seconds"] / own._analytic_head(int(row["tokens"]), "fwd"))
            elif op == "task" and row["phase"] in ("fwd", "bwd") and row["seconds"] > 0:
                task = TaskLoad(row["method"], int(row["rank"]), int(row["tokens"]), int(row["params"]))
                ratios["task"].append(row["seconds"] / (own.shape.n_layers * own._analytic_task(task, row["phase"])))
            elif op == "optimizer":
                ratios["optimizer"].append(row["seconds"] / own._analytic_optimizer(int(row["params"])))
        for key, values in ratios.items():
            if values:
                self.scale[key] = float(np.median(values))
        self.device = f"{self.hw['name']} (analytic, calibrated on {fp['device_name']})"
        return self

    # time

    def forward_seconds(self, mb: MicroBatch, layers: int, first: bool = False, last: bool = False,
                        tp: int = 1) -> float:
        """A stage's forward compute on one device (tp > 1: one tensor rank's, without its collectives:
        tp_collectives lists those)."""
        return self._stage_seconds(mb, layers, first, last, "fwd", tp)

    def backward_seconds(self, mb: MicroBatch, layers: int, first: bool = False, last: bool = False,
                         tp: int = 1) -> float:
        return self._stage_seconds(mb, layers, first, last, "bwd", tp)

    def _stage_seconds(self, mb: MicroBatch, layers: int, first: bool, last: bool, phase: str, tp: int = 1) -> float:
        return max(sum(self._stage_parts(mb, layers, first, last, phase, tp).values()), 0.0)

    def _stage_parts(self, mb: MicroBatch, layers: int, first: bool, last: bool, phase: str,
                     tp: int = 1) -> dict[str, float]:
        """The terms of a stage's forward or backward: backbone (layers, stem, what the parts miss), head,
        tasks (their overheads less what they share and, backward, less what the batch skips). With tp > 1
        the layers are one tensor rank's shard (`_layer_seconds`); stem, head, what the parts miss and the
        tasks' adapters are priced whole (replicated, or, for the adapters, see tp_layer_seconds)."""
        self._check(mb)
        if self.profile is None:
            head = self._analytic_head(mb.tokens, phase) if last else 0.0
            stem = self._analytic_stem(mb.tokens) if first and phase == "fwd" else 0.0
            return {"backbone": layers * self._analytic_layer(mb, phase, tp) + stem, "head": head,
                    "tasks": layers * sum(self._analytic_task(t, phase) for t in mb.tasks)}
        T, span, L = mb.tokens, mb.span, self.shape.n_layers
        layer = self._grid("layer", phase, T, span)
        shard = self.tp_layer_seconds(mb, phase, tp) if tp > 1 else layer
        stem = self._grid("stem", "fwd", T, span) if phase == "fwd" else 0.0
        head = interp1(*self._curve("head", phase, "tokens"), T)
        residual = self._residual(phase, T, span)
        tasks = (sum(self._task_seconds(t, phase) for t in mb.tasks) - self._batch_shared(mb, phase)
                 + self._batch_level(mb, phase) + (self._uncovered_seconds(mb) if phase == "bwd" else 0.0))
        # the backward stops below the lowest op any task needs a gradient at: the first stage skips that
        skip = self._batch_skip(mb, "seconds") if first and phase == "bwd" else 0.0
        return {"backbone": layers * (shard + residual / L) + (stem if first else 0.0),
                "head": head if last else 0.0, "tasks": layers * tasks / L - skip}


    def _batch_shared(self, mb: MicroBatch, phase: str) -> float:
        """What the batch's tasks priced by method rows share: each wrapped op's split and concatenation
        runs once however many tasks of a method wrap it, so every task after the first saves its share."""
        defaults = self._default_targets()
        wrapped: dict[tuple[str, str], list[TaskLoad]] = {}
        targeted: dict[tuple[str, str], list[TaskLoad]] = {}
        for t in mb.tasks:
            targets = self._targets_of(t)
            if targets:
                # priced at its ops (`target` rows), each task as if alone on them: every task after the
                # first on an op shares that op's node / launch (`target` shared rows)
                for name in targets:
                    targeted.setdefault((t.method, name), []).append(t)
                continue
            for name in defaults:
                wrapped.setdefault((t.method, name), []).append(t)
        # What a task does not add again is part of what it costs: never more than the cheapest of them
        # costs alone. A shared row measured through a burst of load elsewhere on the machine (tiny-llama,
        # v_proj: 4.6 ms where q_proj's is 0.6) otherwise took back more than the tasks cost: a batch of 6
        # LoRA tasks was priced 45% low.
        by_method = sum((len(tasks) - 1) * min(self._shared_seconds(method, phase),
                                               max(min(self._task_seconds(t, phase) for t in tasks), 0.0)) / len(defaults)
                        for (method, _), tasks in wrapped.items())
        by_target = sum((len(tasks) - 1) * min(
            self._target_shared_seconds(method, name, phase, sum(t.tokens for t in tasks) / len(tasks)),
            max(min(self._op_seconds(t, name, phase) for t in tasks), 0.0))
            for (method, name), tasks in targeted.items())
        return by_method + by_target

    def _uncovered_seconds(self, mb: MicroBatch) -> float:
        """The backward of every op the batch's LoRA/DoRA tasks wrap, on the rows none of that op's tasks
        covers (all layers): the adapters' dX is zero-filled there and added to the frozen op's dX. Each
        task's `target` rows price that add on its own rows only; in a batch whose tasks wrap different
        ops (the quickstart's: q/v, all attention, the MLP, q/v/down) most rows of most wrapped ops are
        someone else's: on llama-100m, 18 x 512 tokens, ~2 s of a 19 s step. Profile rows `uncovered`
        (a width measured, else the nearest scaled by width; every op of the name: GPT-2's two `c_proj`);
        0 for profiles without them."""
        rows = self.profile.rows("uncovered", "bwd")
        widths = self.profile.meta.get("op_inputs") or {}
        if rows.empty or not widths:
            return 0.0
        covered: dict[str, float] = {}
        for t in mb.tasks:
            for name in self._targets_of(t):
                covered[name] = covered.get(name, 0.0) + t.tokens
        measured = rows["params"].to_numpy()
        total = 0.0
        for name, tokens in covered.items():
            rest, of_name = mb.tokens - tokens, widths.get(name)
            if rest <= 0 or of_name is None:
                continue
            for width in [of_name] if isinstance(of_name, int) else of_name:  # profiles before session 10: one
                nearest = int(measured[np.abs(measured - width).argmin()])
                mine = rows[rows["params"] == nearest].sort_values("tokens")
                total += (max(interp1(mine["tokens"].to_numpy(), mine["seconds"].to_numpy(), rest), 0.0)
                          * width / nearest)
        return self.shape.n_layers * total

    def _target_shared_seconds(self, method: str, name: str, phase: str, tokens: float) -> float:
        """What one more task of `method` on op `name` does not add again (profile rows `target` /
        `shared_<phase>`, over one task's tokens; 0 for profiles without them)."""
        rows = self.profile.rows("target", f"shared_{phase}")
        rows = rows[(rows["method"] == method) & (rows["target"] == name)]
        if rows.empty:
            return 0.0
        # held at the ends: a fixed cost, not extrapolated along noise
        return max(interp1(rows["tokens"].to_numpy(), rows["seconds"].to_numpy(), tokens, hold=True), 0.0)

    def _batch_level(self, mb: MicroBatch, phase: str) -> float:
        """The trainer's own per-forward work for adapters (routing the rows, each task's loss), there
        ONCE per fused batch whatever its tasks. Each method's model-level task rows hold it once per
        method (its `*_shared` part is taken back for a method's later tasks), op-level `target` rows
        not at all: so a batch of M methods priced by method rows gets (1 - M) times it."""
        methods = {t.method for t in mb.tasks if not self._targets_of(t)}
        return (1 - len(methods)) * self._batch_overhead(phase)

    def _batch_overhead(self, phase: str) -> float:
        """That per-forward work, from rows the profile has anyway: LoRA on the default targets measured
        on the whole model (`task` rows) minus the same LoRA measured at its ops (`target` rows, summed
        over the defaults), at the token counts and rank both were measured at (0 without both)."""
        targets, tasks = self.profile.rows("target", phase), self.profile.rows("task", phase)
        tasks = tasks[tasks["method"] == "lora"]
        targets = targets[targets["method"] == "lora"]
        names = [name.rsplit(".", 1)[-1] for name in self._default_targets()]
        if tasks.empty or targets.empty or not set(names) <= set(targets["target"]):
            return 0.0
        rank = int(targets["rank"].min())
        common = sorted(set(tasks[tasks["rank"] == rank]["tokens"]) & set(targets["tokens"]))
        residuals = []
        for tokens in common:
            whole = tasks[(tasks["rank"] == rank) & (tasks["tokens"] == tokens)]["seconds"].median()
            at_ops = sum(targets[(targets["rank"] == rank) & (targets["tokens"] == tokens) & (targets["target"] == name)]
                         ["seconds"].median() for name in names)
            residuals.append(whole - at_ops)
        return float(np.median(residuals)) if residuals else 0.0

    def _default_targets(self) -> tuple[str, ...]:
        """The target list the profile's method-level task rows were measured on (one name: unknown)."""
        return tuple(self.profile.meta.get("task_targets") or ("default",))

    def _targets_of(self, task: TaskLoad) -> tuple[str, ...]:
        """The op names a LoRA/DoRA task is priced on when the profile has per-target rows; () otherwise
        (then its method rows price it). A dotted target (`self_attn.q_proj`) is priced as its op name."""
        rows = self.profile.rows("target")
        if rows.empty or task.method not in set(rows["method"]):
            return ()
        return tuple(name.rsplit(".", 1)[-1] for name in (task.targets or self._default_targets()))

    def _target_rows(self, method: str, name: str, phase: str) -> pd.DataFrame:
        rows = self.profile.rows("target")
        rows = rows[rows["method"] == method]
        mine = rows[(rows["target"] == name) & (rows["phase"] == phase)]
        if mine.empty:
            raise MuxTuneError(f"profile: {method} was not profiled on target {name!r} (has "
                               f"{sorted(set(rows['target']))})")
        return mine

    def _shared_seconds(self, method: str, phase: str) -> float:
        """The part of one task's overhead that more tasks of its method share (profile rows
        `shared_fwd` / `shared_bwd`, as `target` rows name them; 0 when the profile has none). Profiles
        written before the names were made one call them `fwd_shared` / `bwd_shared`: still read."""
        rows = self.profile.rows("task", f"shared_{phase}")
        if rows.empty:
            rows = self.profile.rows("task", f"{phase}_shared")
        rows = rows[rows["method"] == method]
        return float(rows["seconds"].median()) if not rows.empty else 0.0

    def _batch_skip(self, mb: MicroBatch, value: str) -> float:
        """Backward work (or saved bytes) the batch skips below its deepest-reaching method: the least
        of its methods' measured `skip` at the batch's T. A method without skip rows skips nothing."""
        skips = []
        rows = self.profile.rows("task", "skip")
        for method in {t.method for t in mb.tasks}:
            mine = rows[rows["method"] == method]
            if mine.empty:
                return 0.0
            rank = max(t.rank for t in mb.tasks if t.method == method)
            skips.append(max(interp_grid(mine, "tokens", "rank", value, mb.tokens, rank), 0.0))
        return min(skips) if skips else 0.0

    def optimizer_seconds(self, params: int) -> float:
        """One task's AdamW step + gradient clipping."""
        if self.profile is None:
            return self._analytic_optimizer(params)
        return max(interp1(*self._curve("optimizer", "step", "params"), params), 0.0)

    def p2p_seconds(self, nbytes: int) -> float:
        """One point-to-point send between 2 devices."""
        if self._has("p2p"):
            return max(interp1(*self._curve("p2p", "comm", "nbytes"), nbytes), 0.0)
        return self._analytic_link(nbytes)

    def allreduce_seconds(self, nbytes: int, world: int) -> float:
        """Ring all-reduce: 2(w-1) steps of n/w bytes. The 2-process measurement t2(n) = 2a + b*n gives
        t_w(n) = (w-1) * t2(2n/w)."""
        if world <= 1:
            return 0.0
        if self._has("allreduce"):
            t2 = lambda n: max(interp1(*self._curve("allreduce", "comm", "nbytes"), n), 0.0)
            return (world - 1) * t2(2 * nbytes / world)
        return (world - 1) * self._analytic_link(2 * nbytes / world)

    def fill_seconds(self, stage_seconds: list[float], micro_batches: list[MicroBatch]) -> float:
        """What a 1F1B pipeline adds to its slowest stage's work for `micro_batches` (stage_seconds: each
        stage's work for all of them): the fill and drain, (p - 1) micro-batch times of the slowest stage,
        and the boundary transfers on the way in and out, 2 (p - 1) of the largest. 0 for one stage."""
        pp = len(stage_seconds)
        if pp <= 1:
            return 0.0
        transfer = max(self.p2p_seconds(self.boundary_bytes(mb)) for mb in micro_batches)
        return (pp - 1) * max(stage_seconds) / len(micro_batches) + 2 * (pp - 1) * transfer

    def step_seconds(self, groups: list[MicroBatch]) -> float:
        """One optimizer step on one device: the groups' forward+backward one after another, then every
        task's optimizer step, and the step's host work."""
        return sum(sum(self.step_breakdown(mb).values()) for mb in groups)

    def evaluation_seconds(self, groups: list[MicroBatch]) -> float:
        """One fused evaluation on one device: each micro-batch's forward-only pass and its host work; no
        backward, no optimizer step. A forward under no_grad builds no autograd graph (no saved tensors,
        no graph nodes), so the backbone and head are priced at the profile's `model`/`eval` rows (the
        same bare model as `model`/`fwd`, measured under no_grad) in place of the training forward's
        `model`/`fwd`; the adapters' own forward keeps its training price (not measured forward-only:
        a small part, leaning a little high). A profile without `eval` rows (measured before they
        existed) prices the whole training forward, an upper bound of the same FLOPs; the analytic model
        has no autograd term, so its forward is already forward-only."""
        L = self.shape.n_layers
        return sum(self.forward_seconds(mb, L, True, True) - self._autograd_forward_seconds(mb)
                   + self.batch_host_seconds(mb) for mb in groups)

    def _autograd_forward_seconds(self, mb: MicroBatch) -> float:
        """What building the autograd graph adds to the whole bare model's forward of `mb`: `model` fwd
        minus `model` eval at (T, span); 0 without eval rows (or analytic), never negative (noise)."""
        if self.profile is None or self.profile.rows("model", "eval").empty:
            return 0.0
        return max(self._grid("model", "fwd", mb.tokens, mb.span) - self._grid("model", "eval", mb.tokens, mb.span), 0.0)

    def step_breakdown(self, mb: MicroBatch) -> dict[str, float]:
        """One micro-batch's share of a single-device step, term by term (seconds; they add up to
        step_seconds([mb])): what each phase of a trainer step is priced at, to set beside its measurement."""
        L, out = self.shape.n_layers, {}
        for phase in ("fwd", "bwd"):
            parts = self._stage_parts(mb, L, True, True, phase)
            total = max(sum(parts.values()), 0.0)
            # a stage's time is never negative: a (noisy) negative total goes to 0 in its backbone term
            parts["backbone"] += total - sum(parts.values())
            out.update({f"{phase}_{name}": value for name, value in parts.items()})
        out["optimizer"] = sum(self.optimizer_seconds(t.params) for t in mb.tasks)
        out["host_tasks"] = sum(self.host_seconds(t) for t in mb.tasks)
        out["host_batch"] = self.batch_host_seconds(mb)
        return out

    def host_seconds(self, task: TaskLoad) -> float:
        """A task's own per-step work besides its share of the fused forward/backward and its optimizer:
        LR schedule, sampling its rows, its gradient norm (profile: the task's measured `step` rows
        minus the optimizer at its parameter count and minus the step's fixed host work, which one
        task's step also holds; analytic: none)."""
        if self.profile is None:
            return 0.0
        rows = self.profile.rows("task", "step")
        rows = rows[rows["method"] == task.method]
        if rows.empty:
            return 0.0
        rest = rows.assign(seconds=[s - self.optimizer_seconds(int(p)) for s, p in zip(rows["seconds"], rows["params"])])
        # host work hardly grows with tokens or rank: held at the measured ends, not extrapolated
        own = interp_grid(rest, "tokens", "rank", "seconds", task.tokens, task.rank, hold=True)
        return max(own - self._host_fixed(task.tokens), 0.0)

    def batch_host_seconds(self, mb: MicroBatch) -> float:
        """The host work of one fused micro-batch that is there once, whatever its number of tasks:
        fusing it, routing it, the loss bookkeeping (profile rows `step`/`host_fixed` at its tokens)."""
        return self._host_fixed(mb.tokens) if self.profile is not None else 0.0

    def _host_fixed(self, tokens: int) -> float:
        rows = self.profile.rows("step", "host_fixed")
        if rows.empty:  # older profiles: the fixed part stays inside every task's `step` rows
            return 0.0
        return max(interp1(rows["tokens"].to_numpy(), rows["seconds"].to_numpy(), tokens, hold=True), 0.0)


    # profile look-ups

    def _has(self, op: str) -> bool:
        return self.profile is not None and not self.profile.rows(op).empty

    def _curve(self, op: str, phase: str, x: str):
        rows = self.profile.rows(op, phase)
        if rows.empty:
            raise MuxTuneError(f"profile: has no {op!r} {phase} measurements")
        return rows[x].to_numpy(), rows["seconds"].to_numpy()

    def _grid(self, op: str, phase: str, tokens: int, span: int, value: str = "seconds") -> float:
        rows = self.profile.rows(op, phase)
        if rows.empty:
            raise MuxTuneError(f"profile: has no {op!r} {phase} measurements")
        return interp_grid(rows, "tokens", "seq_len", value, tokens, span)

    def _residual(self, phase: str, tokens: int, span: int) -> float:
        """What the measured parts miss of the whole model (`model` - stem - L * layer - head), taken at
        the points where the whole model was measured and interpolated like a backbone op. The whole
        model is the dearest row to measure, so a budget measures it at fewer points than the layer (the
        smallest token counts of each seq_len): the layer curves then reach far, and only this small
        difference is carried past its points, not the whole model's own cost."""
        cache = self.__dict__.setdefault("_residuals", {})
        key = (id(self.profile.table), phase)
        if key not in cache:
            points = self.profile.rows("model", phase)
            if points.empty:
                raise MuxTuneError(f"profile: has no 'model' {phase} measurements")
            L = self.shape.n_layers
            head = self._curve("head", phase, "tokens")
            missed = [seconds - L * self._grid("layer", phase, t, s)
                      - (self._grid("stem", "fwd", t, s) if phase == "fwd" else 0.0) - interp1(*head, t)
                      for t, s, seconds in zip(points["tokens"], points["seq_len"], points["seconds"])]
            cache[key] = points.assign(seconds=missed)
        # held at the ends of the measured range: a difference of large timings, mostly noise around a small
        # value; extending its slope 10x past the points would amplify that noise 10x
        return interp_grid(cache[key], "tokens", "seq_len", "seconds", tokens, span, hold=True)

    def _task_seconds(self, task: TaskLoad, phase: str) -> float:
        """A task's overhead on the whole model: interpolated in tokens per measured rank, then in rank.
        LoRA/DoRA: the sum over its targets' rows (and their dropout rows if it has dropout)."""
        targets = self._targets_of(task)
        if targets:
            return sum(self._op_seconds(task, name, phase) for name in targets)
        rows = self.profile.rows("task", phase)
        rows = rows[rows["method"] == task.method]
        if rows.empty:
            raise MuxTuneError(f"profile: method {task.method!r} was not profiled (has "
                               f"{sorted(set(self.profile.rows('task')['method']))})")
        return interp_grid(rows, "tokens", "rank", "seconds", task.tokens, task.rank)

    def _op_seconds(self, task: TaskLoad, name: str, phase: str) -> float:
        """A LoRA/DoRA task's overhead at the ops named `name` (every layer's): its `target` rows, and their
        dropout rows if it has dropout."""
        parts = [phase] + ([f"dropout_{phase}"] if task.dropout > 0 else [])
        return sum(interp_grid(self._target_rows(task.method, name, part), "tokens", "rank", "seconds",
                               task.tokens, task.rank) for part in parts)

    def _check(self, mb: MicroBatch) -> None:
        if not mb.tasks or mb.tokens <= 0 or mb.seq_len <= 0:
            raise MuxTuneError(f"micro-batch: needs at least one task with tokens > 0 and seq_len > 0, got {mb}")
        for t in mb.tasks:
            if t.method not in METHODS:
                raise MuxTuneError(f"micro-batch: unknown method {t.method!r}; expected one of {sorted(METHODS)}")

    # roofline pieces (analytic): max(compute, memory) at the catalog's peaks + kernel launches

    LAUNCH_S = 4e-6  # one kernel launch / small-op overhead on a GPU

    def _roofline(self, flops: float, nbytes: float, kernels: int) -> float:
        hw = self.hw
        return max(flops / (hw["bf16_tflops"] * 1e12), nbytes / (hw["hbm_gbps"] * 1e9)) + kernels * self.LAUNCH_S

    def _analytic_layer(self, mb: MicroBatch, phase: str, tp: int = 1) -> float:
        """One layer (tp > 1: one tensor rank's shard: projections, attention heads and the MLP width
        split; the norms' and residuals' reads and writes of the full hidden states are not)."""
        s, T, span = self.shape, mb.tokens, mb.span
        gemm = 2 * T * s.layer_params / tp  # dX in backward costs the same as the forward GEMMs
        attention = 4 * T * span * s.hidden * (2.0 if phase == "bwd" else 1.0) / tp
        weights = s.layer_params * s.dtype_bytes / tp
        acts = T * s.dtype_bytes * (6 * s.hidden + (6 * s.hidden + 4 * s.intermediate) / tp)
        kernels = 14 if phase == "fwd" else 20
        return self.scale["layer"] * self._roofline(gemm + attention, weights + acts, kernels)

    def _analytic_head(self, tokens: int, phase: str) -> float:
        s = self.shape
        flops = 2 * tokens * s.hidden * s.vocab
        nbytes = s.hidden * s.vocab * s.dtype_bytes + tokens * s.vocab * (s.dtype_bytes + 8)
        return self.scale["head"] * self._roofline(flops, nbytes, 4 if phase == "fwd" else 5)

    def _analytic_stem(self, tokens: int) -> float:
        return self._roofline(0, 2 * tokens * self.shape.hidden * self.shape.dtype_bytes, 6)

    def _analytic_task(self, task: TaskLoad, phase: str) -> float:
        """A task's per-layer overhead: its adapter GEMMs / element-wise passes over its own tokens."""
        t = task.tokens
        # (ops per layer, FLOPs per token per op, bytes per token per op, kernels per op): the method's card
        ops, flops, nbytes, kernels = method_card(task.method).analytic(self.shape.hidden, max(task.rank, 1))
        factor = 2.0 if phase == "bwd" else 1.0
        return self.scale["task"] * factor * self._roofline(ops * t * flops, ops * t * nbytes, ops * kernels)

    def _analytic_optimizer(self, params: int) -> float:
        # AdamW reads/writes weight, grad and two moments; clipping reads the grads once more
        return self.scale["optimizer"] * self._roofline(12 * params, 4 * 9 * params, 12)

    def _analytic_link(self, nbytes: float) -> float:
        """One direction of the catalog's link (datasheet figures are both directions together)."""
        if self.hw is None:
            raise MuxTuneError("profile: has no p2p/allreduce measurements and its device is not in the "
                               "hardware catalog; profile with 2 devices or use CostModel.analytic")
        link = self.hw["nvlink_gbps"] or self.hw["pcie_gbps"]
        return 10e-6 + nbytes / (link / 2 * 1e9)

    def _analytic_weight_bytes(self) -> dict:
        s = self.shape
        embed = s.vocab * s.hidden * s.dtype_bytes
        return {"layer": s.layer_params * s.dtype_bytes, "first": embed, "last": 0 if s.tied_embeddings else embed}


def cost_model_for(model: str, device: str = "cpu", mode: str = "quick", progress: bool = False,
                   methods=None, targets=None, sizes=None) -> CostModel:
    """The CostModel of `model` on this machine's `device`: a cached profile with this device's
    fingerprint (shipped in profiles/ or in the user cache) that covers `methods` / `targets`, else a
    profile of those measured now, its layer rows reaching the step `sizes` ((tokens, seq_len) each)."""
    from muxtune.profiler.profile import load_or_profile

    profile, _, _ = load_or_profile(model, device, mode, progress=progress, methods=methods, targets=targets,
                                    sizes=sizes)
    return CostModel.from_profile(profile)


