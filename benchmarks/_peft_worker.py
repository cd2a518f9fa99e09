"""One training process of the mux_vs_separate benchmark; the parent drives it over a pipe.

The parent starts each worker with multiprocessing's "forkserver": a clean server process imports
torch/transformers/peft/MuxTune once (`PRELOAD`, no tensor op has run in it) and every worker is
forked from it. A worker is still its own process with its own backbone and its own peak RSS; it just
skips the 5-8 s of imports a fresh interpreter would pay on a 2-core machine. This module itself
imports nothing heavy, so the parent stays light.

Configs (`run_worker(config=...)`):
  separate  HF PEFT alone: its own backbone, `get_peft_model` with one LoRA (rank ranks[i], seed i)
  switch    HF PEFT, one backbone, one adapter per rank via `add_adapter`, `set_adapter` before each
            task's own forward/backward/optimizer step (one AdamW per adapter)
  muxtune   MuxTune's MultiplexedTrainer, one task per rank, fused into one micro-batch per step
  limit     MuxTune's MultiplexedTrainer with the tasks given (the parent passes one rank and N times
            the rows of one task: the same tokens per step as `muxtune`)
  planned   MuxTune's MultiplexedTrainer carrying out the planner's Plan for the N tasks (`plan`, made by
            `run_planner` for the point's shape): its groups one after another in a step, its
            micro-batches and alignment

Protocol: after setup the worker sends {"ready": ...}. Then, one command dict at a time (any command
may carry "threads": n, applied with torch.set_num_threads first):
  {"op": "prepare", "rows": R, "seq": S}  new synthetic data of that shape (per task), then one
                                           untimed warm-up step (unless "warmup": False); answers
                                           {"ok": True, "warmup_seconds": its duration or None}
  {"op": "train", "steps": K}              K timed steps; answers tokens, seconds (perf_counter),
                                           start/end (time.time(), for concurrent runs), peak RSS
  {"op": "exit"}                           exits
All configs train with the same hyper-parameters (lr 2e-4, fused AdamW (transformers' default optimizer,
`adamw_torch_fused`) without weight decay, grad-norm
clipping at 1.0, constant schedule, dropout 0) and the same data path (TaskSampler + fuse).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import psutil

PRELOAD = ["torch", "peft", "muxtune.executor.backbone", "muxtune.executor.trainer", "muxtune.spec"]
LR, MAX_GRAD_NORM, ALPHA, TARGETS = 2e-4, 1.0, 16, ["q_proj", "v_proj"]


def device_and_dtype():
    """Where every arm's backbone lives: $MUXTUNE_BENCH_DEVICE (cpu) and $MUXTUNE_BENCH_DTYPE
    (float32), set by the parent before the forkserver starts (`mux_vs_separate --device/--dtype`)."""
    import torch

    return os.environ.get("MUXTUNE_BENCH_DEVICE", "cpu"), getattr(torch, os.environ.get("MUXTUNE_BENCH_DTYPE", "float32"))


def load(model_name: str):
    from muxtune.executor.backbone import load_backbone

    device, dtype = device_and_dtype()
    return load_backbone(model_name, device=device, dtype=dtype)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synthetic_examples(rows: int, seq: int, seed: int, pool: int = 4) -> list:
    """`pool * rows` random byte sequences of exactly `seq` tokens; every token carries loss."""
    import torch
    from muxtune.executor.data import Example

    gen = torch.Generator().manual_seed(seed * 1_000_003 + seq)
    ids = torch.randint(0, 256, (pool * rows, seq), generator=gen).tolist()
    return [Example(row, list(row)) for row in ids]


def hf_lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")


def hf_step(model, batch, params, optimizer) -> None:
    import torch

    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Separate:
    """HF PEFT alone, as one tenant would run it: `get_peft_model` on its own backbone."""

    def __init__(self, model_name: str, ranks: list[int], task_index: int):
        import torch
        from peft import get_peft_model

        self.backbone = load(model_name)
        self.model = get_peft_model(self.backbone.model, hf_lora_config(ranks[task_index]))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0, fused=True)
        self.seed = task_index

    def prepare(self, rows: int, seq: int) -> None:
        from muxtune.executor.data import TaskSampler

        self.sampler = TaskSampler(synthetic_examples(rows, seq, self.seed), rows, self.seed)

    def step(self) -> int:
        from muxtune.executor.data import fuse

        batch = fuse({"task": self.sampler.next_batch()}, self.backbone.tokenizer.pad_token_id,
                     device_and_dtype()[0])
        hf_step(self.model, batch, self.params, self.optimizer)
        return int(batch.attention_mask.sum())


class Switch:
    """HF PEFT with one backbone and N adapters; each step switches to every task's adapter in turn."""

    def __init__(self, model_name: str, ranks: list[int], task_index: int = 0):
        import torch
        from peft import get_peft_model

        self.backbone = load(model_name)
        self.names = [f"t{i}" for i in range(len(ranks))]
        self.model = get_peft_model(self.backbone.model, hf_lora_config(ranks[0]), adapter_name=self.names[0])
        for name, rank in zip(self.names[1:], ranks[1:]):
            self.model.add_adapter(name, hf_lora_config(rank))
        self.params = {name: [p for n, p in self.model.named_parameters() if f".{name}." in n]
                       for name in self.names}
        self.optimizers = {name: torch.optim.AdamW(ps, lr=LR, weight_decay=0.0, fused=True)
                           for name, ps in self.params.items()}

    def prepare(self, rows: int, seq: int) -> None:
        from muxtune.executor.data import TaskSampler

        self.samplers = {name: TaskSampler(synthetic_examples(rows, seq, i), rows, i)
                         for i, name in enumerate(self.names)}

    def step(self) -> int:
        from muxtune.executor.data import fuse

        tokens = 0
        for name in self.names:
            self.model.set_adapter(name)  # makes only this adapter trainable
            batch = fuse({name: self.samplers[name].next_batch()}, self.backbone.tokenizer.pad_token_id,
                         device_and_dtype()[0])
            hf_step(self.model, batch, self.params[name], self.optimizers[name])
            tokens += int(batch.attention_mask.sum())
        return tokens


def task_specs(ranks: list[int], rows: int = 1, max_seq: int = 4096) -> list:
    """MuxTune's tasks of the benchmark: one LoRA per rank, `rows` sequences of up to `max_seq` tokens a step."""
    from muxtune.spec import TaskSpec

    return [TaskSpec(name=f"t{i}", data=Path("synthetic"), seed=i, lr=LR, steps=10**9, batch_size=rows,
                     max_seq_len=max_seq, max_grad_norm=MAX_GRAD_NORM, weight_decay=0.0,
                     peft={"method": "lora", "r": r, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS})
            for i, r in enumerate(ranks)]


class Muxed:
    """MuxTune's MultiplexedTrainer, one task per rank (a single task for the `limit` config); with `plan`
    (a Plan as a dict) it carries that plan out (the `planned` config), else all tasks fused in one group."""

    def __init__(self, model_name: str, ranks: list[int], task_index: int = 0, max_seq: int = 4096,
                 plan: dict | None = None):
        from muxtune.executor.trainer import MultiplexedTrainer
        from muxtune.spec import Plan

        backbone = load(model_name)
        specs = task_specs(ranks, max_seq=max_seq)
        examples = {s.name: synthetic_examples(1, 8, s.seed) for s in specs}
        self.trainer = MultiplexedTrainer(backbone, specs, examples,
                                          plan=Plan.model_validate(plan) if plan else None)

    def prepare(self, rows: int, seq: int) -> None:
        from muxtune.executor.data import TaskSampler

        for run in self.trainer.runs.values():  # new shape: a batch of `rows` sequences over new data
            run.spec = run.spec.model_copy(update={"batch_size": rows, "max_seq_len": max(seq, run.spec.max_seq_len)})
            run.sampler = TaskSampler(synthetic_examples(rows, seq, run.spec.seed), rows, run.spec.seed)
        self.expected = rows * seq * len(self.trainer.runs)

    def step(self) -> int:
        self.trainer.step()
        tokens = self.trainer.step_tokens[-1]
        # every arm must train the tokens the parent asked for, or the comparison means nothing
        if tokens != self.expected:
            raise RuntimeError(f"muxtune step trained {tokens} tokens, expected {self.expected}")
        return tokens


CONFIGS = {"separate": Separate, "switch": Switch, "muxtune": Muxed, "limit": Muxed, "planned": Muxed}


def plan_cost_model(model: str, ranks: list[int], shapes: list[tuple[int, int]], profile: str | None,
                    hardware: str | None):
    """The planned arm's CostModel: `hardware` (a catalog GPU, or "this": the GPU here) priced analytically
    (nothing measured: the GPU script's time limit), else `profile` (a CSV), else a stored profile that
    passes the calibration check here, else a quick one measured now whose layer curves hold every
    shape's step alone and all N fused (as plan-and-run measures one)."""
    from muxtune.executor.backbone import model_config
    from muxtune.profiler.cost_model import CostModel, ModelShape, cost_model_for

    device, dtype = device_and_dtype()
    if hardware:
        import torch

        name = torch.cuda.get_device_name() if hardware == "this" else hardware
        return CostModel.analytic(name, ModelShape.from_config(model_config(model), dtype))
    if profile:
        return CostModel.from_profile(profile)
    sizes = sorted({(k * rows * seq, seq) for rows, seq in shapes for k in (1, len(ranks))})
    return cost_model_for(model, device, methods=["lora"], targets=TARGETS, sizes=sizes)


def plan_points(model: str, ranks: list[int], shapes: list[tuple[int, int]], profile: str | None,
                hardware: str | None, memory_gib: float, seconds: float) -> list[dict]:
    """The planner's Plan for the tasks at each (rows, seq) shape, priced by plan_cost_model. Each: the
    Plan as a dict, and the planner's own figures beside it (its table)."""
    from muxtune.planner.plan import plan
    from muxtune.spec import Cluster

    cm = plan_cost_model(model, ranks, shapes, profile, hardware)
    if device_and_dtype()[0].startswith("cuda"):  # the parent passes host memory; a GPU plan fits the GPU's
        import torch

        memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    out = []
    for rows, seq in shapes:
        result = plan(task_specs(ranks, rows, seq), Cluster(devices=1, memory_gib=memory_gib), cm, time_limit=seconds)
        rates = dict(zip(result.table["planner"], result.table["tokens_per_s"]))
        out.append({"plan": result.plan.model_dump(), "groups": len(result.plan.groups),
                    "micro_batches": max(g.micro_batches for g in result.plan.groups),
                    # predicted: the plan vs every task its own group, one after another (the temporal baseline)
                    "predicted_vs_sequential": rates["muxtune"] / rates["temporal"], "cost_model": cm.device})
    return out


def run_planner(conn, model: str, ranks: list[int], shapes: list[tuple[int, int]], profile: str | None,
                hardware: str | None, memory_gib: float, seconds: float, threads: int, log_path: str) -> None:
    """Process entry point of the planning (plan_points): a process of its own, so the parent stays light
    and a profile measured here runs with the workers' threads; prints go to `log_path`."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(threads)
    conn.send(plan_points(model, ranks, shapes, profile, hardware, memory_gib, seconds))


def train(job, steps: int) -> dict:
    tokens, start, t0 = 0, time.time(), time.perf_counter()
    for _ in range(steps):
        tokens += job.step()
    if device_and_dtype()[0].startswith("cuda"):  # the steps' queued GPU work is part of their time
        import torch

        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "start": start, "end": time.time(), "peak_rss_mb": peak_rss_mb(),
            "pid": os.getpid()}


# Below this share of RAM available, a worker hands its free heap back after its step (release_free_memory)
TRIM_BELOW = 0.30


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc keeps freed activations of < 32 MB tensors
    mapped), when the machine runs short: at 512 tokens/task 11 idle workers otherwise sit on ~20 of
    24 GB between their steps and the machine runs short of page cache. Only then: the next step faults
    those pages in again, which costs a big-activation step more than a small one (llama-100m at 256
    tokens/task on this VM: the fused step +21%, one separate task's +13%), a bias against the fused
    arms. The peak RSS a point reports is unchanged (ru_maxrss)."""
    import ctypes
    import gc

    if available_share() >= TRIM_BELOW:
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def available_share() -> float:
    """The share of RAM available now."""
    memory = psutil.virtual_memory()
    return memory.available / memory.total


def serve(job, conn) -> None:
    import torch

    while True:
        cmd = conn.recv()
        if "threads" in cmd:
            torch.set_num_threads(cmd["threads"])
        if cmd["op"] == "prepare":
            job.prepare(cmd["rows"], cmd["seq"])
            seconds = None
            if cmd.get("warmup", True):
                start = time.perf_counter()
                job.step()  # warm-up, not timed (its duration sizes the number of timed rounds)
                seconds = time.perf_counter() - start
            release_free_memory()
            conn.send({"ok": True, "warmup_seconds": seconds})
        elif cmd["op"] == "train":
            result = train(job, cmd["steps"])
            release_free_memory()  # before answering: the parent starts the next process's step after it
            conn.send(result)
        elif cmd["op"] == "exit":
            return
        else:
            raise ValueError(f"unknown command {cmd!r}")


def run_worker(conn, config: str, model: str, ranks: list[int], task_index: int, threads: int,
               log_path: str, plan: dict | None = None) -> None:
    """Process entry point: everything the libraries print goes to `log_path`, answers go to `conn`."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    job = CONFIGS[config](model, ranks, task_index, **({"plan": plan} if plan else {}))
    conn.send({"ready": True, "setup_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
               "pid": os.getpid()})
    serve(job, conn)
