"""Six PEFT methods in ONE fused micro-batch vs the same tasks run one after another on the shared backbone.

    python -m benchmarks.mixed_methods [--model builtin:llama-100m] [--steps 4] [--tokens 64] [--repeats 3]

Both arms use the same executor and the same tasks (LoRA r=4, LoRA r=64, IA3, bottleneck adapter,
prefix tuning, prompt tuning, BitFit, DoRA); only the Plan differs: one fusion group of all tasks,
or one group per task (each task's micro-batch goes through the backbone on its own, one after
another, as a shared-backbone system without cross-method fusion must do). Arms alternate within
each repeat so machine noise hits both alike. Small per-task micro-batches (`--tokens` per task),
as fine-tuning API jobs have. The last printed line is one JSON object; `ratio` = fused tokens/s over
one-after-another tokens/s (target >= 1.3).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from muxtune import allocator
from muxtune.executor.backbone import load_backbone
from muxtune.executor.data import Example
from muxtune.executor.trainer import MultiplexedTrainer
from muxtune.spec import TaskSpec

METHODS = [
    ("lora-r4", {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}),
    ("lora-r64", {"method": "lora", "r": 64, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
    ("dora", {"method": "dora", "r": 8, "target_modules": ["q_proj", "v_proj"]}),
    ("ia3", {"method": "ia3"}),
    ("adapter", {"method": "adapter", "size": 32}),
    ("prefix", {"method": "prefix", "num_virtual_tokens": 16}),
    ("prompt", {"method": "prompt", "num_virtual_tokens": 16}),
    ("bitfit", {"method": "bitfit"}),
]


def synthetic_examples(n: int, length: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(256) for _ in range(length)]
        out.append(Example(ids, list(ids)))
    return out


def make_trainer(backbone, tokens: int, steps: int, grouped: bool) -> MultiplexedTrainer:
    batch = 2
    specs, examples = [], {}
    for i, (name, peft) in enumerate(METHODS):
        specs.append(TaskSpec(name=name, data="synthetic.jsonl", peft=peft, batch_size=batch,
                              max_seq_len=tokens // batch, steps=steps, seed=i, lr=1e-3))
        examples[name] = synthetic_examples(32, tokens // batch, seed=i)
    groups = [[s.name] for s in specs] if grouped else None
    return MultiplexedTrainer(backbone, specs, examples, groups=groups)


def measure(backbone, tokens: int, steps: int, grouped: bool) -> float:
    """tokens/s over `steps` timed steps after one warm-up step; adapters are removed afterwards so
    the shared backbone is clean for the next arm."""
    trainer = make_trainer(backbone, tokens, steps + 1, grouped)
    trainer.step()  # warm-up
    start = time.perf_counter()
    done = 0
    for _ in range(steps):
        trainer.step()
        done += trainer.step_tokens[-1]
    elapsed = time.perf_counter() - start
    for name in list(trainer.runs):
        trainer.mux.remove_task(name)
    return done / elapsed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:llama-100m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per task per micro-batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.model)
    fused, sequential = [], []
    for r in range(args.repeats):
        fused.append(measure(backbone, args.tokens, args.steps, grouped=False))
        sequential.append(measure(backbone, args.tokens, args.steps, grouped=True))
        print(f"repeat {r}: fused {fused[-1]:.0f} tok/s, one-after-another {sequential[-1]:.0f} tok/s", flush=True)
    result = {
        "model": args.model,
        "methods": [name for name, _ in METHODS],
        "tokens_per_task": args.tokens,
        "steps": args.steps,
        "fused_tokens_per_s": statistics.median(fused),
        "sequential_tokens_per_s": statistics.median(sequential),
        "ratio": statistics.median(fused) / statistics.median(sequential),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    allocator.reexec()  # train on the malloc the product trains on (muxtune/allocator.py)
    main()
