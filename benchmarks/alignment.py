"""Ineffective (padding) tokens and throughput of three micro-batch layouts on the shipped mixed-length tasks.

    python -m benchmarks.alignment [--model builtin:llama-100m] [--devices cpu|cuda] [--steps 3] [--repeats 2] [--quick]

The four quickstart tenants (short sentiment labels, medium QA, long summaries, long-tailed chat in
`messages` format) with their batch sizes and max_seq_len, LoRA on each, trained by the same executor
in three layouts (only the Plan differs):
  1. padded_longest: one fused micro-batch, every row padded to the longest sequence of any task (mLoRA);
  2. padded_per_task: one micro-batch per task, each padded to its own longest sequence;
  3. chunked: one chunk-aligned micro-batch (MuxTune's layout; `--chunk-len`, `--token-budget`).
Arms alternate within each repeat so machine noise hits all alike. Useful tokens are the sequences'
own tokens; the ineffective fraction is 1 - useful / computed. The last printed line is one JSON
object; targets: `ineffective_fraction_chunked` <= 0.02 where `ineffective_fraction_padded` >= 0.30,
and `useful_throughput_ratio` (chunked over padded_longest useful tokens/s) >= 1.3.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from muxtune import allocator
from muxtune.executor.backbone import load_backbone
from muxtune.executor.data import DataOptions, load_examples
from muxtune.executor.trainer import MultiplexedTrainer
from muxtune.spec import Alignment, TaskSpec

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
TASKS = [  # (name, file, batch_size, max_seq_len) as in examples/quickstart.yaml
    ("sentiment", "sentiment.jsonl", 8, 128),
    ("qa", "qa.jsonl", 4, 384),
    ("summarize", "summarization.jsonl", 2, 512),
    ("chat", "chat.jsonl", 4, 512),
]
ARMS = ("padded_longest", "padded_per_task", "chunked")


def task_specs(steps: int, scale: float) -> list[TaskSpec]:
    return [TaskSpec(name=name, data=DATA / file, batch_size=max(1, round(batch * scale)), max_seq_len=max_len,
                     steps=steps, seed=i, lr=1e-3, peft={"method": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]})
            for i, (name, file, batch, max_len) in enumerate(TASKS)]


def measure(backbone, specs, examples, arm: str, steps: int, alignment: Alignment) -> dict:
    """Useful tokens/s and the ineffective fraction over `steps` timed steps after one warm-up step;
    adapters are removed afterwards so the shared backbone is clean for the next arm."""
    groups = [[s.name] for s in specs] if arm == "padded_per_task" else None
    if arm != "chunked":
        alignment = Alignment(layout="padded")
    trainer = MultiplexedTrainer(backbone, specs, examples, groups=groups, alignment=alignment)
    trainer.step()  # warm-up
    first = len(trainer.step_shapes)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    useful = 0
    for _ in range(steps):
        trainer.step()
        useful += trainer.step_tokens[-1]
    sync()
    elapsed = time.perf_counter() - start
    computed = sum(rows * seq for rows, seq in trainer.step_shapes[first:])
    for name in list(trainer.runs):
        trainer.mux.remove_task(name)
    return {"useful_tokens_per_s": useful / elapsed, "ineffective_fraction": 1 - useful / computed,
            "useful_tokens": useful, "computed_tokens": computed}


DEFAULT_STEPS = 3


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:llama-100m")
    parser.add_argument("--devices", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps per arm and repeat (default {DEFAULT_STEPS}, fewer on a machine too slow "
                             "for them in 20 min)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every task's batch size")
    parser.add_argument("--chunk-len", type=int, default=Alignment().chunk_len)
    parser.add_argument("--token-budget", type=int, default=Alignment().token_budget)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 step, 1 repeat: checks it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.repeats = "builtin:tiny-llama", 1, 1
    torch.set_num_threads(args.threads)
    device = "cuda:0" if args.devices == "cuda" else args.devices
    from . import announce, default_steps, expected_seconds

    # 3 arms, a warm-up step each, ~1.5 bare passes of the tasks' batch_size x max_seq_len tokens as the
    # pilot prices them (session 12, AMD EPYC: 18.7 min for 3 steps where 0.7 passes predicted 8.4)
    tokens = sum(s.batch_size * s.max_seq_len for s in task_specs(1, args.scale))
    passes = lambda steps: [(3 * args.repeats * (steps + 1) * 1.5, tokens)]  # noqa: E731
    args.steps = default_steps(args.steps, DEFAULT_STEPS, 2, lambda n: expected_seconds(args.model, device, passes(n)))
    specs = task_specs(args.steps + 1, args.scale)
    announce("benchmarks.alignment", f"{args.repeats} repeats of 3 micro-batch layouts ({', '.join(ARMS)}), "
             f"{args.steps} timed steps each, of the 4 quickstart tenants on {args.model}", args.model, device,
             passes(args.steps))
    backbone = load_backbone(args.model, device=device)
    examples = {s.name: load_examples(s.data, backbone.tokenizer, s.max_seq_len, options=DataOptions.of(s))[0]
                for s in specs}
    alignment = Alignment(chunk_len=args.chunk_len, token_budget=args.token_budget)
    runs = {arm: [] for arm in ARMS}
    for r in range(args.repeats):
        for arm in ARMS:
            runs[arm].append(measure(backbone, specs, examples, arm, args.steps, alignment))
        print(f"repeat {r}: " + ", ".join(f"{arm} {runs[arm][-1]['useful_tokens_per_s']:.0f} useful tok/s "
                                          f"({100 * runs[arm][-1]['ineffective_fraction']:.1f}% ineffective)"
                                          for arm in ARMS), flush=True)
    arms = {arm: {"useful_tokens_per_s": statistics.median(m["useful_tokens_per_s"] for m in ms),
                  "ineffective_fraction": statistics.median(m["ineffective_fraction"] for m in ms),
                  "computed_tokens_per_step": ms[0]["computed_tokens"] / args.steps}
            for arm, ms in runs.items()}
    result = {
        "model": args.model,
        "devices": args.devices,
        "tasks": {s.name: {"batch_size": s.batch_size, "max_seq_len": s.max_seq_len} for s in specs},
        "alignment": alignment.model_dump(),
        "steps": args.steps,
        "repeats": args.repeats,
        "arms": arms,
        "ineffective_fraction_padded": arms["padded_longest"]["ineffective_fraction"],
        "ineffective_fraction_per_task": arms["padded_per_task"]["ineffective_fraction"],
        "ineffective_fraction_chunked": arms["chunked"]["ineffective_fraction"],
        "useful_throughput_ratio": arms["chunked"]["useful_tokens_per_s"] / arms["padded_longest"]["useful_tokens_per_s"],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    allocator.reexec()  # train on the malloc the product trains on (muxtune/allocator.py)
    main()
