"""One training process of the mux_vs_separate benchmark; the parent drives it over stdin/stdout.

    python -m benchmarks._peft_worker --config CONFIG --model M --ranks 8,12,16 [--task-index I]

CONFIG is one of
  separate  HF PEFT alone: its own backbone, `get_peft_model` with one LoRA (rank ranks[I], seed I)
  switch    HF PEFT, one backbone, one adapter per rank via `add_adapter`, `set_adapter` before each
            task's own forward/backward/optimizer step (one AdamW per adapter)
  muxtune   MuxTune's MultiplexedTrainer, one task per rank, fused into one micro-batch per step
  limit     MuxTune's MultiplexedTrainer with a single task (use one rank): the parent gives it N times
            the rows of one task, i.e. the same tokens per step as `muxtune`

Protocol: after setup the worker writes `{"ready": ...}`. Then, one JSON command per stdin line:
  {"op": "prepare", "rows": R, "seq": S}  new synthetic data of that shape (per task), then one
                                           untimed warm-up step; answers {"ok": true}
  {"op": "train", "steps": K}              K timed steps; answers tokens, seconds (perf_counter),
                                           start/end (time.time(), for concurrent runs), peak RSS
  {"op": "exit"} or end of input           exits
Every answer is one JSON line on the original stdout; anything else the libraries print goes to stderr.
All configs train with the same hyper-parameters (lr 2e-4, AdamW without weight decay, grad-norm
clipping at 1.0, constant schedule, dropout 0) and the same data path (TaskSampler + fuse).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from muxtune.executor.backbone import load_backbone
from muxtune.executor.data import Example, TaskSampler, fuse

LR, MAX_GRAD_NORM, ALPHA, TARGETS = 2e-4, 1.0, 16, ["q_proj", "v_proj"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synthetic_examples(rows: int, seq: int, seed: int, pool: int = 4) -> list[Example]:
    """`pool * rows` random byte sequences of exactly `seq` tokens; every token carries loss."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + seq)
    ids = torch.randint(0, 256, (pool * rows, seq), generator=gen).tolist()
    return [Example(row, list(row)) for row in ids]


def hf_lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")


def hf_step(model, batch, params, optimizer) -> None:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Separate:
    """HF PEFT alone, as one tenant would run it: `get_peft_model` on its own backbone."""

    def __init__(self, model_name: str, ranks: list[int], task_index: int):
        from peft import get_peft_model

        self.backbone = load_backbone(model_name)
        self.model = get_peft_model(self.backbone.model, hf_lora_config(ranks[task_index]))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)
        self.seed = task_index

    def prepare(self, rows: int, seq: int) -> None:
        self.sampler = TaskSampler(synthetic_examples(rows, seq, self.seed), rows, self.seed)

    def step(self) -> int:
        batch = fuse({"task": self.sampler.next_batch()}, self.backbone.tokenizer.pad_token_id)
        hf_step(self.model, batch, self.params, self.optimizer)
        return int(batch.attention_mask.sum())


class Switch:
    """HF PEFT with one backbone and N adapters; each step switches to every task's adapter in turn."""

    def __init__(self, model_name: str, ranks: list[int], task_index: int = 0):
        from peft import get_peft_model

        self.backbone = load_backbone(model_name)
        self.names = [f"t{i}" for i in range(len(ranks))]
        self.model = get_peft_model(self.backbone.model, hf_lora_config(ranks[0]), adapter_name=self.names[0])
        for name, rank in zip(self.names[1:], ranks[1:]):
            self.model.add_adapter(name, hf_lora_config(rank))
        self.params = {name: [p for n, p in self.model.named_parameters() if f".{name}." in n]
                       for name in self.names}
        self.optimizers = {name: torch.optim.AdamW(ps, lr=LR, weight_decay=0.0) for name, ps in self.params.items()}

    def prepare(self, rows: int, seq: int) -> None:
        self.samplers = {name: TaskSampler(synthetic_examples(rows, seq, i), rows, i)
                         for i, name in enumerate(self.names)}

    def step(self) -> int:
        tokens = 0
        for name in self.names:
            self.model.set_adapter(name)  # makes only this adapter trainable
            batch = fuse({name: self.samplers[name].next_batch()}, self.backbone.tokenizer.pad_token_id)
            hf_step(self.model, batch, self.params[name], self.optimizers[name])
            tokens += int(batch.attention_mask.sum())
        return tokens


class Muxed:
    """MuxTune's MultiplexedTrainer, one task per rank (a single task for the `limit` config)."""

    def __init__(self, model_name: str, ranks: list[int], task_index: int = 0, max_seq: int = 4096):
        from muxtune.executor.trainer import MultiplexedTrainer
        from muxtune.spec import TaskSpec

        backbone = load_backbone(model_name)
        specs = [TaskSpec(name=f"t{i}", data=Path("synthetic"), seed=i, lr=LR, steps=10**9, batch_size=1,
                          max_seq_len=max_seq, max_grad_norm=MAX_GRAD_NORM, weight_decay=0.0,
                          peft={"method": "lora", "r": r, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS})
                 for i, r in enumerate(ranks)]
        examples = {s.name: synthetic_examples(1, 8, s.seed) for s in specs}
        self.trainer = MultiplexedTrainer(backbone, specs, examples)

    def prepare(self, rows: int, seq: int) -> None:
        for run in self.trainer.runs.values():  # new shape: swap in a sampler over new data
            run.sampler = TaskSampler(synthetic_examples(rows, seq, run.spec.seed), rows, run.spec.seed)

    def step(self) -> int:
        self.trainer.step()
        return self.trainer.step_tokens[-1]


CONFIGS = {"separate": Separate, "switch": Switch, "muxtune": Muxed, "limit": Muxed}


def train(job, steps: int) -> dict:
    tokens, start, t0 = 0, time.time(), time.perf_counter()
    for _ in range(steps):
        tokens += job.step()
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "start": start, "end": time.time(), "peak_rss_mb": peak_rss_mb()}


def serve(job, reply) -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "prepare":
            job.prepare(cmd["rows"], cmd["seq"])
            job.step()  # warm-up, not timed
            reply({"ok": True})
        elif cmd["op"] == "train":
            reply(train(job, cmd["steps"]))
        elif cmd["op"] == "exit":
            return
        else:
            raise ValueError(f"unknown command {cmd!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--model", default="builtin:llama-100m")
    parser.add_argument("--ranks", required=True, help="comma-separated LoRA ranks, one per task")
    parser.add_argument("--task-index", type=int, default=0, help="which rank/seed a `separate` worker trains")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # answers go to the original stdout; whatever else is printed (also from C code) goes to stderr
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    start = time.perf_counter()
    ranks = [int(r) for r in args.ranks.split(",")]
    job = CONFIGS[args.config](args.model, ranks, args.task_index)
    reply({"ready": True, "setup_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "pid": os.getpid()})
    serve(job, reply)


if __name__ == "__main__":
    main()
