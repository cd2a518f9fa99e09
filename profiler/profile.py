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
import hashlib
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from muxtune.errors import MuxTuneError
from muxtune.profiler.budget import EVAL_WARMUP, Pilot, Progress, fit, whole_model_points
from muxtune.profiler.sampling import (Sampling, Timed, alternated, clock, fwd_bwd_seconds,  # noqa: F401
                                       median_seconds, sync)
from muxtune.schedule import TENSOR_PARALLEL_FAMILIES, attention_targets

COLUMNS = ["op", "phase", "tokens", "seq_len", "method", "rank", "params", "nbytes", "world",
           "seconds", "saved_bytes", "batch_bytes", "peak_bytes", "target", "rel_error"]
HEADER = "# muxtune-profile "  # first line of a profile CSV: this marker + the JSON metadata
REPO_PROFILES = Path(__file__).resolve().parent.parent / "profiles"  # shipped profiles (in the repo)


def user_cache_dir() -> Path:
    return Path(os.environ.get("MUXTUNE_CACHE", Path.home() / ".cache" / "muxtune")) / "profiles"


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


def peft_config_for(method: str, rank: int, model_type: str) -> dict:
    """The task config a `task` row was measured with (its method's defaults, at `rank`)."""
    targets = attention_targets(model_type)  # per model family, HF PEFT's usual defaults
    return {"lora": {"method": "lora", "r": rank, "target_modules": targets},
            "dora": {"method": "dora", "r": rank, "target_modules": targets},
            "adapter": {"method": "adapter", "size": rank},
            "prefix": {"method": "prefix", "num_virtual_tokens": rank},
            "prompt": {"method": "prompt", "num_virtual_tokens": rank},
            "ia3": {"method": "ia3"}, "bitfit": {"method": "bitfit"}}[method]


# --- device fingerprint and the profile file ---------------------------------------------------------


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


def find_cached(fp: dict, mode: str = "quick", paths: list[Path] | None = None) -> Path | None:
    """The first stored profile (of `paths`, else the shipped and user-cache ones) measured with
    fingerprint `fp`; a quick request is served by a full profile too, not the other way round."""
    if paths is None:
        paths = [folder / profile_filename(fp) for folder in (REPO_PROFILES, user_cache_dir())]
    for path in paths:
        if Path(path).is_file():
            try:
                meta = Profile.load(path).meta
            except MuxTuneError:
                continue
            if meta.get("fingerprint") == fp and (mode == "quick" or meta.get("mode") == "full"):
                return Path(path)
    return None


# --- timing and memory helpers -----------------------------------------------------------------------


def observe_step(trainer, device: str) -> dict:
    """Run one real `trainer.step()` with its phases timed inside it (seconds): forward (the fused
    forward, LM head included), head, backward, optimizer (grad norm, clipping, AdamW, zero_grad),
    draw, fuse, and the whole `step`; `last_batch` is the step's first fused batch. The trainer is
    only observed: its methods are wrapped for the call and restored after. Host work is what the step
    spends outside forward, backward and optimizer, timed in the same call (a difference against a
    separately timed forward/backward carries the two calls' different cache states into it)."""
    import functools

    from muxtune.executor import trainer as trainer_module

    spent: dict = {}

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + clock() - start
        return wrapper

    def fuse(batches):
        out = micro_batches(batches)
        spent.setdefault("last_batch", out[0])
        return out

    micro_batches = trainer.micro_batches
    trainer.draw_batch = timed("draw", trainer.draw_batch)
    trainer.micro_batches = timed("fuse", fuse)
    trainer.loss_sums = timed("forward", trainer.loss_sums)
    trainer.head_loss_sums = timed("head", trainer.head_loss_sums)
    optimizers = [run.optimizer for run in trainer.runs.values()]
    for opt in optimizers:
        opt.step, opt.zero_grad = timed("optimizer", opt.step), timed("optimizer", opt.zero_grad)
    patches = [(torch.Tensor, "backward", timed("backward", torch.Tensor.backward)),
               (trainer_module, "grad_norms", timed("optimizer", trainer_module.grad_norms)),
               (trainer_module, "clip_with_norm", timed("optimizer", trainer_module.clip_with_norm))]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, wrapper in patches:
            setattr(owner, name, wrapper)
        sync(device)
        start = clock()
        trainer.step()
        sync(device)
        spent["step"] = clock() - start
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
        # the wrappers are instance attributes over the classes' methods: dropping them restores those
        for name in ("draw_batch", "micro_batches", "loss_sums", "head_loss_sums"):
            vars(trainer).pop(name, None)
        for opt in optimizers:
            vars(opt).pop("step", None), vars(opt).pop("zero_grad", None)
    for key in ("forward", "head", "backward", "optimizer", "draw", "fuse"):
        spent.setdefault(key, 0.0)
    spent["host"] = spent["step"] - spent["forward"] - spent["backward"] - spent["optimizer"]
    return spent


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Tally of tensor storages created while active and still alive; `peak` is its maximum. The CPU
    stand-in for torch.cuda.max_memory_allocated (it sees every aten op, forward and backward).
    Outputs that alias an input (views such as a weight's `t()`, in-place results) allocate nothing:
    counting their storage counted every weight a step touched (~330 MB for llama-100m's steps)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) and len(func._schema.returns) > 1 else (out,)
        new = [o for o, r in zip(outs, func._schema.returns) if r.alias_info is None]
        for t in torch.utils._pytree.tree_leaves(new):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if n and key not in self._seen:
                    self._seen.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, n)
        return out

    def _free(self, key: int, n: int) -> None:
        if key in self._seen:
            self._seen.discard(key)
            self.live -= n


def peak_bytes(fn, device: str) -> int:
    """Most memory allocated by `fn` on top of what was live when it started."""
    if device.startswith("cuda"):
        dev = torch.device(device)
        sync(device)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(dev) - before)
    with LiveBytes() as tally:
        fn()
    return int(tally.peak)


def saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs (not `exclude`d weights)."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def adapter_saved_bytes(adapter, fn, exclude: set[int]) -> tuple[int, int]:
    """(all, batch) bytes of the distinct storages autograd saves inside one task's adapter code (its
    layers' aggregate/dispatch, its sequence module) while `fn` runs. A saved slice of the batch counts
    with its whole storage: that is what it keeps alive. `batch`: the part that is the backbone's own
    tensors handed to the adapter (an op's input or output), which tasks of the same shape share."""
    seen: dict[int, int] = {}
    handed: set[int] = set()

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    def counting(call):
        def wrapped(*args, **kwargs):
            handed.update(a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return call(*args, **kwargs)
        return wrapped

    # the grouped paths (one call for all of an op's segments) count as the adapter's code as well
    names = ("aggregate", "dispatch", "looped_aggregate", "grouped_aggregate", "grouped_dispatch", "prepend",
             "key_values")
    patched = [(module, name) for module in [*adapter.layers.values(), adapter.sequence] if module is not None
               for name in names if getattr(module, name, None) is not None]
    for module, name in patched:
        module.__dict__[name] = counting(getattr(module, name))  # an instance attribute shadows the method
    try:
        fn()
    finally:
        for module, name in patched:
            del module.__dict__[name]
    return sum(seen.values()), sum(n for ptr, n in seen.items() if ptr in handed)


# --- the backbone pieces -----------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, list) of the model's decoder layers, whatever the family calls them."""
    n = model.config.num_hidden_layers
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and path:
            parent_path, _, attr = path.rpartition(".")
            return model.get_submodule(parent_path) if parent_path else model, attr, module
    raise MuxTuneError(f"model: cannot find the {n} decoder layers of this {model.config.model_type!r} model")


def synthetic_batch(rows: int, seq: int, device: str, vocab: int = 256, seed: int = 0):
    """Random byte tokens; the last row's last slot is padding, so the attention mask is a real tensor
    (a fused batch of several tasks always has some padding)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=gen)
    mask = torch.ones_like(ids)
    if seq > 1:
        mask[-1, -1] = 0
    return ids.to(device), mask.to(device)


def layer_inputs(model: nn.Module, layer: nn.Module, ids, mask):
    """The exact (args, kwargs) the backbone passes its decoder layer for this batch."""
    captured = {}

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Captured

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["args"], captured["kwargs"]


class _Captured(Exception):
    pass


def head_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, tasks: int = 1) -> torch.Tensor:
    """What the trainer does after the backbone: LM head on loss positions, float CE, per-task sums."""
    logits = model.get_output_embeddings()(hidden)
    per_token = nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    owner = torch.arange(per_token.shape[0], device=hidden.device) * tasks // per_token.shape[0]
    sums = torch.zeros(tasks, device=hidden.device).index_add(0, owner, per_token)
    return sums.sum()


def bare_model_loss(model: nn.Module, ids, mask) -> torch.Tensor:
    """The whole frozen backbone + head, with the input embeddings requiring grad so backward computes
    dX through every layer (what an adapter in the first layer makes the real step do)."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    return head_loss(model, hidden[:, :-1].reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1))


def zero_grads(*trainers) -> None:
    for trainer in trainers:
        for run in trainer.runs.values():
            run.optimizer.zero_grad(set_to_none=True)


def _row(op, phase, timed: Timed | float, tokens=0, seq_len=0, method="", rank=0, params=0, nbytes=0, world=0,
         saved=0, batch=0, peak=0, target="") -> dict:
    if not isinstance(timed, Timed):  # a value not measured here (tests' synthetic profiles)
        timed = Timed(float(timed), math.nan)
    return {"op": op, "phase": phase, "tokens": tokens, "seq_len": seq_len, "method": method, "rank": rank,
            "params": params, "nbytes": nbytes, "world": world, "seconds": timed.seconds, "saved_bytes": saved,
            "batch_bytes": batch, "peak_bytes": peak, "target": target, "rel_error": round(timed.rel_error, 4)}


TP_DEGREES = (2,)  # tensor-parallel degrees whose layer shards are measured (tp_layer rows)


def tp_shard_layers(model: nn.Module, layer: nn.Module) -> dict[int, nn.Module]:
    """{tp: a decoder layer shaped like one tensor rank's shard} for the TP_DEGREES the executor can
    split this model into (executor/tensor_parallel.py: LLaMA family, tp dividing heads and MLP width).
    A fresh layer of the model's class with heads / tp, KV heads / tp and MLP width / tp (same head
    size): the same ops on the shard's shapes, what each process computes; its weights are random."""
    import copy

    config = model.config
    if config.model_type not in TENSOR_PARALLEL_FAMILIES:
        return {}
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    param = next(layer.parameters())
    out = {}
    for tp in TP_DEGREES:
        if heads % tp or kv_heads % tp or config.intermediate_size % tp:
            continue
        shard = copy.deepcopy(config)
        shard.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shard.num_attention_heads, shard.num_key_value_heads = heads // tp, kv_heads // tp
        shard.intermediate_size = config.intermediate_size // tp
        out[tp] = type(layer)(shard, layer_idx=0).to(device=param.device, dtype=param.dtype).requires_grad_(False)
    return out


def layer_call(model, layer, ids, mask):
    """(forward, hidden, grad, args, kwargs): one decoder layer called as the model calls it on this batch;
    `forward()` -> (output, a fixed random output gradient) for `fwd_bwd_seconds`."""
    args, kwargs = layer_inputs(model, layer, ids, mask)
    hidden, grad = args[0].detach(), torch.randn_like(args[0])

    def forward():
        out = layer(hidden.requires_grad_(), *args[1:], **kwargs)
        return (out[0] if isinstance(out, tuple) else out), grad
    return forward, hidden, grad, args, kwargs


def measure_backbone(model, device: str, grid: dict, s: Sampling, progress, whole_model=None) -> list[dict]:
    """Layer, stem and head rows at every (seq_len, tokens) of `grid`; the whole model's rows at those of
    `whole_model` (budget.whole_model_points; default: all)."""
    rows = []
    parent, attr, layers = decoder_layers(model)
    layer = layers[0]
    shards = tp_shard_layers(model, layer)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    head_weight = model.get_output_embeddings().weight
    for seq, token_counts in grid.items():
        for tokens in token_counts:
            progress.begin(("layer", seq, tokens))
            ids, mask = synthetic_batch(tokens // seq, seq, device)
            layer_fwd, hidden, grad, args, kwargs = layer_call(model, layer, ids, mask)
            f, b = fwd_bwd_seconds(layer_fwd, device, s)
            # the mask and rotary tables are built once per forward and shared by every layer: count
            # them once (on the stem row), not once per layer
            shared = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args[1:], kwargs))
                      if isinstance(t, torch.Tensor)}
            saved = saved_bytes(layer_fwd, weights | shared)
            saved_shared = saved_bytes(layer_fwd, weights) - saved
            peak = peak_bytes(lambda: torch.autograd.backward(*layer_fwd()), device)
            rows += [_row("layer", "fwd", f, tokens, seq, saved=saved, peak=peak),
                     _row("layer", "bwd", b, tokens, seq)]
            for tp, shard in shards.items():  # one tensor rank's layer on the same inputs

                def shard_fwd(shard=shard):
                    out = shard(hidden.requires_grad_(), *args[1:], **kwargs)
                    return (out[0] if isinstance(out, tuple) else out), grad

                f, b = fwd_bwd_seconds(shard_fwd, device, s)
                shard_weights = {p.untyped_storage().data_ptr() for p in shard.parameters()}
                rows += [_row("tp_layer", "fwd", f, tokens, seq, world=tp, saved=saved_bytes(shard_fwd, shard_weights | shared)),
                         _row("tp_layer", "bwd", b, tokens, seq, world=tp)]

            # the stem: the backbone's forward with its layer list emptied
            setattr(parent, attr, nn.ModuleList())
            try:
                with torch.no_grad():
                    stem = median_seconds(lambda: model.base_model(input_ids=ids, attention_mask=mask,
                                                                   use_cache=False), device, s)
            finally:
                setattr(parent, attr, layers)
            rows.append(_row("stem", "fwd", stem, tokens, seq, saved=saved_shared))
            if whole_model is not None and (seq, tokens) not in whole_model:
                progress.end()
                continue

            f, b = fwd_bwd_seconds(lambda: bare_model_loss(model, ids, mask), device, s)
            rows += [_row("model", "fwd", f, tokens, seq), _row("model", "bwd", b, tokens, seq)]
            # the same forward as evaluation runs it: under no_grad, no graph built. Its own warm-up first:
            # the first no_grad passes at a shape ran several times their steady time (tiny-llama on CPU;
            # steady, this row is 10-25% below the `fwd` one there)
            with torch.no_grad():
                warm = dataclasses.replace(s, warmup=s.warmup + EVAL_WARMUP)
                e = median_seconds(lambda: bare_model_loss(model, ids, mask), device, warm)
            rows.append(_row("model", "eval", e, tokens, seq))
            progress.end()

    for tokens in sorted({t for ts in grid.values() for t in ts}):
        progress.begin(("head", tokens))
        hidden = torch.randn(tokens, model.config.hidden_size, device=device, dtype=head_weight.dtype)
        targets = torch.randint(0, 256, (tokens,), device=device)
        f, b = fwd_bwd_seconds(lambda: head_loss(model, hidden.requires_grad_(), targets), device, s)
        peak = peak_bytes(lambda: head_loss(model, hidden.requires_grad_(), targets).backward(), device)
        rows += [_row("head", "fwd", f, tokens, peak=peak), _row("head", "bwd", b, tokens)]
        hidden.grad = None
        progress.end()
    return rows


def measure_tasks(backbone, device: str, spec: dict, s: Sampling, progress) -> list[dict]:
    """Each (method, rank, rows): the fused step with that one task attached vs the bare model on the
    same batch, in alternation so load on the machine hits both alike. Rows per point:
      fwd   forward with the task minus the bare forward
      bwd   backward with the task, run as deep as the bare one (input embeddings requiring grad),
            minus the bare backward: the task's own backward work
      skip  how much less the real backward does: it stops below the lowest op this method needs a
            gradient at (seconds; saved_bytes: tensors not kept for backward). A batch skips what
            the deepest-reaching of its methods allows, so the cost model counts this once per batch.
      step  the rest of the task's real trainer step: optimizer, clipping, schedule, sampling, fusing
            (timed inside that step: `observe_step`)
    """
    model, seq, out = backbone.model, spec["task_seq"], []
    embed = model.get_input_embeddings()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for method, ranks in spec["ranks"].items():
        # a difference of four timings: three times the repeats to keep its noise near the others'
        progress.begin(("shared", method))
        out += measure_shared(backbone, device, method, ranks[0], spec["task_rows"][0], seq,
                              s.times(spec.get("difference_repeats", 3)))
        progress.end()
        for rank in ranks:
            for n_rows in spec["task_rows"]:
                progress.begin(("task", method, rank, n_rows))
                trainer, batch = probe_trainer(backbone, device, method, rank, n_rows, seq, count=1)
                run = trainer.runs["probe0"]
                try:
                    params = sum(p.numel() for p in run.parameters())

                    def with_task():
                        return torch.stack(list(trainer.task_losses(batch, training=True).values())).sum()

                    def with_task_full_depth():
                        handle = embed.register_forward_hook(lambda m, a, output: output.detach().requires_grad_())
                        try:
                            return with_task()
                        finally:
                            handle.remove()

                    def bare():
                        return bare_model_loss(model, batch.input_ids, batch.attention_mask)

                    times = {k: [] for k in ("f1", "b1", "f2", "b2", "f0", "b0", "step")}
                    once = Sampling(warmup=0, least=1, most=1)
                    for i in s.repeat(*times.values()):
                        f1, b1 = fwd_bwd_seconds(with_task, device, once)
                        f2, b2 = fwd_bwd_seconds(with_task_full_depth, device, once)
                        f0, b0 = fwd_bwd_seconds(bare, device, once)
                        run.optimizer.zero_grad(set_to_none=True)
                        seen = observe_step(trainer, device)  # the real training step
                        step = seen["host"] + seen["optimizer"]
                        if i >= 0:
                            for k, v in zip(times, (f1.seconds, b1.seconds, f2.seconds, b2.seconds, f0.seconds,
                                                    b0.seconds, step)):
                                times[k].append(v)
                    m = {k: Timed.of(v) for k, v in times.items()}
                    mine = weights | {p.untyped_storage().data_ptr() for p in run.adapter.parameters()}
                    saved, batch_saved = adapter_saved_bytes(run.adapter, lambda: with_task().backward(), mine)
                    saved_skip = (saved_bytes(lambda: with_task_full_depth().backward(), mine)
                                  - saved_bytes(lambda: with_task().backward(), mine))
                    run.optimizer.zero_grad(set_to_none=True)
                finally:
                    trainer.mux.remove_task("probe0")
                tokens = n_rows * seq
                out += [_row("task", "fwd", m["f1"] - m["f0"], tokens, seq, method, rank, params, saved=saved,
                             batch=batch_saved),
                        _row("task", "bwd", m["b2"] - m["b0"], tokens, seq, method, rank, params),
                        _row("task", "skip", m["b2"] - m["b1"], tokens, seq, method, rank, params, saved=saved_skip),
                        _row("task", "step", m["step"], tokens, seq, method, rank, params)]
                progress.end()
    return out


TARGET_METHODS = ("lora", "dora")  # the methods whose cost follows their target_modules list
DROPOUT_P = 0.1  # the dropout the dropout_* rows are measured at (its cost does not depend on p)


def layer_op_names(model: nn.Module) -> list[str]:
    """Names of the ops of one decoder layer a task can target (`q_proj`, `c_attn`, ...), in order."""
    from transformers.pytorch_utils import Conv1D

    _, _, layers = decoder_layers(model)
    names = []
    for path, module in layers[0].named_modules():
        if path and not path.endswith("base_op") and (isinstance(module, (nn.Linear, Conv1D))
                                                      or hasattr(module, "base_op")):
            name = path.rsplit(".", 1)[-1]
            if name not in names:
                names.append(name)
    return names


def measure_targets(backbone, device: str, spec: dict, s: Sampling, progress) -> list[dict]:
    """Each (LoRA/DoRA, target op name, rank, tokens): one task targeting only that name; every op it
    wraps (all layers) is called as the model calls it, through its MultiplexedOp with the task's rows
    routed, forward and backward (dX, adapter gradients) minus the bare op on the same input, in
    alternation. Measured at the op, not as a difference of whole-model passes: the signal is the
    adapter work itself, so it stays readable on a busy machine and at large token counts.
    At the first rank also the same task with dropout: what the dropout (mask, masked input) adds."""
    model, seq, out = backbone.model, spec["task_seq"], []
    model_type, dtype = model.config.model_type, next(model.parameters()).dtype
    for method in [m for m in TARGET_METHODS if m in spec["ranks"]]:
        ranks = spec["ranks"][method]
        for target in target_names(model, spec):
            progress.begin(("target", method, target))
            for rank in ranks:
                for tokens in spec["target_tokens"]:
                    n_rows = tokens // seq
                    peft = {**peft_config_for(method, rank, model_type), "target_modules": [target]}
                    variants = {"plain": probe_trainer(backbone, device, method, rank, n_rows, seq, 1, "plain", peft)}
                    if rank == ranks[0]:
                        variants["dropout"] = probe_trainer(backbone, device, method, rank, n_rows, seq, 1, "drop",
                                                            {**peft, "dropout": DROPOUT_P})
                    try:
                        calls = {key: _wrapped_ops_loss(trainer, batch, n_rows, seq, dtype, device)
                                 for key, (trainer, batch) in variants.items()}
                        calls["bare"] = _wrapped_ops_loss(*variants["plain"], n_rows, seq, dtype, device, bare=True)
                        medians = alternated(list(calls.values()), device, s,
                                             lambda: zero_grads(*(trainer for trainer, _ in variants.values())))
                    finally:
                        for trainer, _ in variants.values():
                            for name in list(trainer.runs):
                                trainer.mux.remove_task(name)
                    m = dict(zip(calls, medians))
                    for k, phase in enumerate(("fwd", "bwd")):
                        out.append(_row("target", phase, m["plain"][k] - m["bare"][k], tokens, seq, method, rank,
                                        target=target))
                        if "dropout" in m:
                            out.append(_row("target", f"dropout_{phase}", m["dropout"][k] - m["plain"][k], tokens,
                                            seq, method, rank, target=target))
            for tokens in spec["target_tokens"][:2]:
                out += measure_target_shared(backbone, device, method, ranks[0], target, tokens // seq, seq,
                                             s.times(spec.get("difference_repeats", 3)))
            progress.end()
    return out


def measure_target_shared(backbone, device: str, method: str, rank: int, target: str, n_rows: int, seq: int,
                          s: Sampling) -> list[dict]:
    """What tasks of `method` on the same op NAME share: all LoRA tasks of an op run as one autograd node
    (`LoopedLoRA`, or one Triton launch), so a second task adds its matmuls but not the node. At the op,
    as `measure_targets`: O1 = one task of n_rows rows minus the bare op, O2 = two such tasks (2 n_rows
    rows) minus the bare op; each O = shared + per-task work, linear in rows, so shared = 2*O1 - O2.
    Rows `target` / `shared_fwd`, `shared_bwd` over the tokens of ONE task."""
    model = backbone.model
    peft = {**peft_config_for(method, rank, model.config.model_type), "target_modules": [target]}
    dtype = next(model.parameters()).dtype
    one = probe_trainer(backbone, device, method, rank, n_rows, seq, 1, "shared_one", peft)
    try:
        two = probe_trainer(backbone, device, method, rank, n_rows, seq, 2, "shared_two", peft)
    except BaseException:
        one[0].mux.remove_task("shared_one0")
        raise
    try:
        calls = [_wrapped_ops_loss(*one, n_rows, seq, dtype, device),
                 _wrapped_ops_loss(*one, n_rows, seq, dtype, device, bare=True),
                 _wrapped_ops_loss(*two, 2 * n_rows, seq, dtype, device),
                 _wrapped_ops_loss(*two, 2 * n_rows, seq, dtype, device, bare=True)]
        m = alternated(calls, device, s, lambda: zero_grads(one[0], two[0]))
    finally:
        for trainer, _ in (one, two):
            for name in list(trainer.runs):
                trainer.mux.remove_task(name)
    return [_row("target", f"shared_{phase}", shared_part(m, k), n_rows * seq, seq, method, rank, target=target)
            for k, phase in enumerate(("fwd", "bwd"))]


def shared_part(m: list[tuple[Timed, Timed]], k: int) -> Timed:
    """From medians [one task, bare, two tasks, bare] (phase k): each overhead O = shared + per-task work,
    linear in tasks, so the part a second task does not add again is 2*O1 - O2."""
    a, b, c, d = (m[i][k] for i in range(4))
    value = 2 * (a.seconds - b.seconds) - (c.seconds - d.seconds)
    spread = math.hypot(2 * a.seconds * a.rel_error, 2 * b.seconds * b.rel_error, c.seconds * c.rel_error,
                        d.seconds * d.rel_error)
    return Timed(value, spread / abs(value) if value else math.inf)


def _wrapped_ops_loss(trainer, batch, n_rows: int, seq: int, dtype, device: str, bare: bool = False):
    """A loss over every op the trainer's one task wraps, each called on a [rows, seq, in] input with
    the task's rows routed (bare: the frozen op alone on the same input)."""
    from muxtune.executor.backbone import op_features

    run = next(iter(trainer.runs.values()))
    ops = [trainer.mux._ops[path] for path in run.adapter.paths]
    gen = torch.Generator().manual_seed(0)
    shapes = [op_features(op.base_op) for op in ops]
    xs = [torch.randn(n_rows, seq, i, generator=gen).to(device, dtype) for i, _ in shapes]
    grads = [torch.randn(n_rows, seq, o, generator=gen).to(device, dtype) for _, o in shapes]

    def loss():
        with trainer.mux.route(batch.segments, seq, training=True):
            outs = [(op.base_op if bare else op)(x.detach().requires_grad_()) for op, x in zip(ops, xs)]
        return sum((o * g).sum() for o, g in zip(outs, grads))
    return loss


def probe_trainer(backbone, device: str, method: str, rank: int, n_rows: int, seq: int, count: int,
                  name: str = "probe", peft: dict | None = None):
    """A trainer with `count` tasks of one method (n_rows rows of seq slots each) and their fused batch.
    Each task's last row is one token shorter: padding, as a fused batch of several tasks has."""
    from muxtune.executor.data import Example, fuse
    from muxtune.executor.trainer import MultiplexedTrainer

    from muxtune.spec import Alignment, TaskSpec

    peft = peft or peft_config_for(method, rank, backbone.model.config.model_type)
    lead = rank if method == "prompt" else 0
    length = seq - lead
    specs, examples = [], {}
    for i in range(count):
        specs.append(TaskSpec(name=f"{name}{i}", data="probe.jsonl", peft=peft, batch_size=n_rows, max_seq_len=length,
                              steps=1_000_000, seed=i))
        gen = random.Random(i)
        lengths = [length] * (n_rows - 1) + [length - 1 if n_rows > 1 else length]
        examples[f"{name}{i}"] = [Example(ids, list(ids)) for ids in
                                  ([gen.randrange(256) for _ in range(n)] for n in lengths)]
    trainer = MultiplexedTrainer(backbone, specs, examples,
                                 alignment=Alignment(layout="padded"))  # what the CostModel prices: rows x padded length
    batch = fuse(examples, backbone.tokenizer.pad_token_id, device, lead={task: lead for task in examples})
    return trainer, batch


def measure_step_fixed(backbone, device: str, spec: dict, s: Sampling, progress) -> list[dict]:
    """The host work of a trainer step that is there once per step, whatever the number of tasks (fusing
    the batch, routing, the loss bookkeeping, the step's own loop): a step's host time (the real
    `trainer.step()` minus its forward and backward, timed inside it) with 1 to 4 LoRA tasks of the same rows each,
    h(n) = fixed + n * per_task: fixed is the intercept of a least-squares line through the four (two
    points made it a difference of noisy differences). Rows `step` / `host_fixed` over the tokens of
    ONE task's rows (what a task-level `step` row is over)."""
    seq, counts, out = spec["task_seq"], (1, 2, 3, 4), []
    rank = spec["ranks"]["lora"][0]
    for n_rows in spec["task_rows"]:
        progress.begin(("step", n_rows))
        host, errors = {}, []
        for n in counts:
            trainer, batch = probe_trainer(backbone, device, "lora", rank, n_rows, seq, count=n, name=f"fixed{n}_")
            try:
                times: list[float] = []
                # a fit through small differences: more repeats
                for i in s.times(spec.get("difference_repeats", 3)).repeat(times):
                    seen = observe_step(trainer, device)
                    if i >= 0:
                        times.append(seen["host"] + seen["optimizer"])
                host[n] = statistics.median(times)
                errors.append(Timed.of(times).rel_error * host[n])
            finally:
                for name in list(trainer.runs):
                    trainer.mux.remove_task(name)
        per_task, fixed = (float(v) for v in np.polyfit(counts, [host[n] for n in counts], 1))
        # the intercept's standard error is about that of one point's median
        out.append(_row("step", "host_fixed", Timed(fixed, max(errors) / abs(fixed) if fixed else math.inf),
                        n_rows * seq, seq, "lora", rank))
        progress.end()
    return out


def measure_shared(backbone, device: str, method: str, rank: int, n_rows: int, seq: int,
                   s: Sampling) -> list[dict]:
    """The part of a method's overhead that tasks of that method share when fused together (one split
    and one concatenation per wrapped op, whatever the number of tasks): with O1 the overhead of one
    task and O2 that of two such tasks, each O = shared + per-task, so shared = 2*O1 - O2."""
    model = backbone.model
    one, batch1 = probe_trainer(backbone, device, method, rank, n_rows, seq, count=1, name="solo")
    try:
        two, batch2 = probe_trainer(backbone, device, method, rank, n_rows, seq, count=2, name="pair")
    except BaseException:
        one.mux.remove_task("solo0")
        raise
    loss = lambda tr, b: lambda: torch.stack(list(tr.task_losses(b, training=True).values())).sum()
    bare = lambda b: lambda: bare_model_loss(model, b.input_ids, b.attention_mask)
    calls = [loss(one, batch1), bare(batch1), loss(two, batch2), bare(batch2)]
    try:
        m = alternated(calls, device, s)
    finally:
        for name in ("solo0", "pair0", "pair1"):
            one.mux.remove_task(name)
    return [_row("task", phase, shared_part(m, k), n_rows * seq, seq, method, rank)
            for k, phase in enumerate(("shared_fwd", "shared_bwd"))]


def measure_optimizer(device: str, counts: list[int], tensors: int, s: Sampling, progress) -> list[dict]:
    """AdamW step + clip_grad_norm_ + zero_grad over `params` fp32 values split into `tensors` tensors
    (as a task's adapter layers are), with gradients present as after a backward."""
    rows = []
    for params in counts:
        progress.begin(("optimizer", params))
        sizes = [params // tensors + (1 if i < params % tensors else 0) for i in range(tensors)]
        ps = [nn.Parameter(torch.zeros(max(s, 1), device=device)) for s in sizes]
        opt = torch.optim.AdamW(ps, lr=1e-4, fused=True)  # as executor.trainer.make_optimizer builds it

        def step():
            for p in ps:
                p.grad = torch.ones_like(p)
            torch.nn.utils.clip_grad_norm_(ps, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        # the gradient fill stands for backward's output; time it separately and leave it out
        def fill():
            for p in ps:
                p.grad = torch.ones_like(p)
            for p in ps:
                p.grad = None

        t = median_seconds(step, device, s) - median_seconds(fill, device, s)
        rows.append(_row("optimizer", "step", Timed(max(t.seconds, 0.0), t.rel_error), params=params))
        progress.end()
    return rows


def _comm_worker(rank: int, world: int, init_file: str, backend: str, sizes: list[int], s: Sampling,
                 result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    rows = []
    for n in sizes:
        buf = torch.zeros(max(n // 4, 1), dtype=torch.float32, device=device)

        def p2p():  # one send from rank 0 to rank 1, confirmed by a 1-element reply
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf[:1], 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf[:1], 0)

        dist.barrier()
        # both ranks must run the same number of rounds: a fixed count, not one decided by each rank's samples
        rows.append(_row("p2p", "comm", median_seconds(p2p, device, s), nbytes=n, world=world))
        dist.barrier()
        rows.append(_row("allreduce", "comm", median_seconds(lambda: dist.all_reduce(buf), device, s),
                         nbytes=n, world=world))
    if rank == 0:
        Path(result_file).write_text(json.dumps(rows))
    dist.destroy_process_group()


def measure_comm(device: str, sizes: list[int], s: Sampling) -> list[dict]:
    """p2p and all-reduce between 2 processes. CUDA needs 2 visible GPUs for NCCL; with one, nothing is
    measured and the cost model takes link bandwidths from the hardware catalog."""
    import torch.multiprocessing as mp

    if device.startswith("cuda"):
        if torch.cuda.device_count() < 2:
            return []
        backend = "nccl"
    else:
        backend = "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "comm.json"
        fixed = Sampling(warmup=s.warmup, least=s.most, most=s.most)  # see _comm_worker
        mp.start_processes(_comm_worker, args=(2, str(Path(tmp) / "init"), backend, sizes, fixed, str(result)), nprocs=2, join=True,
                           # spawn, never fork: CUDA cannot be forked, and on CPU children forked after this
                           # process ran a backward pass (autograd's threads) hang in their first collective
                           start_method="spawn")
        return json.loads(result.read_text())


def layer_param_bytes(model) -> dict:
    """Bytes of the backbone's weights: one decoder layer, the embedding side, the head side."""
    _, _, layers = decoder_layers(model)
    per_layer = sum(p.numel() * p.element_size() for p in layers[0].parameters())
    head = model.get_output_embeddings().weight
    layer_ids = {id(p) for layer in layers for p in layer.parameters()}
    rest = [p for p in model.parameters() if id(p) not in layer_ids and p is not head]
    return {"layer": per_layer, "first": sum(p.numel() * p.element_size() for p in rest),
            "last": head.numel() * head.element_size() if not any(p is head for p in rest) else 0}


DEFAULT_BUDGET = {"quick": 180.0, "full": 600.0}  # seconds: what a profile may take unless told otherwise


def pilot(model, device: str) -> Pilot:
    """The bare model's forward + backward at two token counts: the line every point's price comes from."""
    seq = 64
    once = Sampling(warmup=1, least=3, most=3)
    timed = {}
    for tokens in (256, 1024):
        ids, mask = synthetic_batch(tokens // seq, seq, device)
        f, b = fwd_bwd_seconds(lambda: bare_model_loss(model, ids, mask), device, once)
        timed[tokens] = f.seconds + b.seconds
    per_token = max((timed[1024] - timed[256]) / 768, 0.0)
    return Pilot(max(timed[256] - per_token * 256, 0.0), per_token, model.config.num_hidden_layers)


def target_names(model: nn.Module, grid: dict) -> list[str]:
    """The op names whose LoRA/DoRA `target` rows are measured: those the tasks at hand target (grid's
    "targets"), else every op of a layer a task can target."""
    names = layer_op_names(model)
    wanted = [n for n in names if n in (grid.get("targets") or [])]
    return wanted or names  # none of this model's names asked (or nothing asked): every op


def run_profile(model_name: str, device: str = "cpu", mode: str = "quick", dtype: torch.dtype = torch.float32,
                comm: bool = True, progress: bool = True, budget: float | None = -1.0,
                methods: list[str] | None = None, targets: list[str] | None = None,
                sizes: list[tuple[int, int]] | None = None) -> Profile:
    """Measure the op table on `device` for `model_name` (a builtin preset or a HF model dir) within
    `budget` seconds (-1: the mode's default, None: no budget; profiler/budget.py says what is cut first).
    `methods` / `targets`: only what those PEFT methods and LoRA/DoRA target op names need (default: all);
    `sizes`: (tokens, seq_len) of the steps the tasks at hand run: layer rows reach them (budget.with_sizes)."""
    from muxtune.executor.backbone import load_backbone
    from muxtune.profiler.cost_model import METHODS, ModelShape

    if mode not in GRIDS:
        raise MuxTuneError(f"profile mode: expected one of {sorted(GRIDS)}, got {mode!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MuxTuneError(f"devices: {device!r} requested but no CUDA device is available here")
    if device.startswith("cuda") and os.environ.get("MUXTUNE_PROFILE_CLOCK") == "cpu":
        raise MuxTuneError("MUXTUNE_PROFILE_CLOCK=cpu times host CPU work only; CUDA kernels run "
                           "asynchronously: unset it to profile a GPU")
    unknown = sorted(set(methods or []) - set(METHODS))
    if unknown:
        raise MuxTuneError(f"profile methods: unknown {unknown}; expected some of {list(METHODS)}")
    if budget == -1.0:
        budget = DEFAULT_BUDGET.get(mode)
    if budget is not None and budget <= 0:
        raise MuxTuneError(f"profile budget: expected seconds > 0, got {budget}")
    started = time.perf_counter()
    grid = copy.deepcopy(GRIDS[mode])
    if methods:
        grid["ranks"] = {m: r for m, r in grid["ranks"].items() if m in methods}
    if targets:
        grid["targets"] = sorted(targets)
    backbone = load_backbone(model_name, device=device, dtype=dtype)
    model = backbone.model
    fp = fingerprint(device, model_name, model.config, dtype)
    _, _, layers = decoder_layers(model)
    n_target_ops = len(target_names(model, grid))
    sizes = sorted({(int(t), int(s)) for t, s in sizes or [] if t > 0 and s > 0})
    grid, costs, cuts = fit(grid, budget, pilot(model, device), n_target_ops, bool(tp_shard_layers(model, layers[0])),
                            sizes)
    if not comm:
        costs.pop(("comm",))
    sampling_for = Sampling(warmup=grid["warmup"], least=min(3, grid["repeats"]), most=grid["repeats"])
    bar = Progress(costs, budget and budget - (time.perf_counter() - started),
                   f"profiling {model_name} on {device}", progress)
    if progress and cuts:
        bar.bar.write(f"profile: to fit the {budget:.0f} s budget: {'; '.join(cuts)}")
    s = dataclasses.replace(sampling_for, budget=bar.budget)
    rows = []
    try:
        rows += measure_backbone(model, device, grid["layer"], s, bar, whole_model_points(grid))
        rows += measure_tasks(backbone, device, grid, s, bar)
        rows += measure_targets(backbone, device, grid, s, bar)
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
            "methods": sorted(grid["ranks"]), "targets": target_names(model, grid), "sizes": sizes,
            "budget_s": budget, "estimated_s": round(sum(costs.values()), 1), "cuts": cuts,
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
    model = load_backbone(model_name, device=device, dtype=dtype).model
    for path in candidates:
        profile = Profile.load(path)
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
    path = Path(out) if out else user_cache_dir() / profile_filename(profile.meta["fingerprint"])
    return profile, profile.save(path), False
