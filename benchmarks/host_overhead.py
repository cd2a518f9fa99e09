"""Host work of one fused training step: how many operations it dispatches, by tenants and by sequences.

    python -m benchmarks.host_overhead                 # tiny-llama, CPU, kernel path on (interpreter)
    python -m benchmarks.host_overhead --device cuda   # on a GPU: compiled kernels, plus CUDA timings

On a GPU every operation a step launches per tenant or per sequence is host time the GPU sits idle
for. The count is what grows; it does not depend on how fast or how loaded the machine is, so it is
measured on the CPU as well as on the device. One step is counted (after an untimed warm-up step):

  aten ops        every ATen call the step dispatches (a TorchDispatchMode sees each one), forward,
                  backward, loss, gradient norms, clipping, optimizer and zero_grad included
  kernel launches Triton kernels launched (the grouped multi-adapter kernels; with the kernel path on,
                  MUXTUNE_KERNELS=triton, which on the CPU runs them under TRITON_INTERPRET=1)

Two sweeps at a fixed total of tokens per step (`--tokens`, default 1024):
  tenants    N = 1, 8, 32 tenants (LoRA; `--method dora` or `ia3`), one sequence each (total / N tokens)
  sequences  8 tenants, 1, 4, 16 sequences each (total / 8 tokens per tenant, the lengths spread from
             1/4 to 7/4 of their mean: a realistic mix, not one length)

The last stdout line is one JSON object: every point's counts, and
  ops_growth_tenants    (aten ops + launches) at N = 32 / at N = 1       target <= 1.3
  ops_growth_sequences  (aten ops + launches) at 16 seqs / at 1 seq      target <= 1.1
  work_growth_tenants, work_growth_sequences: the same without views and detaches (an output that
                        aliases its input: metadata on the host, no kernel on a GPU)
Each tenant's data holds 4 batches: the counted step is a step, not an epoch boundary.
With `--timings` (default on CUDA) every point also gets the median step time over `--steps` steps,
wall clock and, on CUDA, the GPU's own time of the step (CUDA events), and their difference.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

from muxtune import allocator

TARGETS = {"ops_growth_tenants": 1.3, "ops_growth_sequences": 1.1}
# a tenant's PEFT config by method, from its rank: the methods with a grouped kernel path
PEFT = {
    "lora": lambda r: {"method": "lora", "r": r, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "dora": lambda r: {"method": "dora", "r": r, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    # output scaling on q/v, input scaling on down_proj (its feed-forward kind)
    "ia3": lambda r: {"method": "ia3", "target_modules": ["q_proj", "v_proj", "down_proj"],
                      "feedforward_modules": ["down_proj"]},
}
TENANTS = (1, 8, 32)
SEQUENCES = (1, 4, 16)
SEQUENCE_TENANTS = 8
BATCHES_PER_EPOCH = 4


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama", help="backbone (default builtin:tiny-llama)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="backbone dtype")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step, all tenants together (default 1024)")
    parser.add_argument("--method", default="lora", choices=sorted(PEFT),
                        help="the tenants' PEFT method (default lora; the targets are LoRA's)")
    parser.add_argument("--kernels", default="triton", choices=["triton", "torch", "auto"],
                        help="MUXTUNE_KERNELS for the counted step (default triton: the kernel path on)")
    parser.add_argument("--chunk-len", type=int, default=16, help="chunk length of the aligned layout (default 16)")
    parser.add_argument("--timings", action=argparse.BooleanOptionalAction, default=None,
                        help="also time steps (default: on CUDA only)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per point with --timings (default 10)")
    args = parser.parse_args(argv)
    if args.timings is None:
        args.timings = args.device.startswith("cuda")
    for n in TENANTS:
        if args.tokens % n or args.tokens % (SEQUENCE_TENANTS * max(SEQUENCES)):
            parser.error(f"--tokens {args.tokens} must split evenly over {TENANTS} tenants and "
                         f"{SEQUENCE_TENANTS} tenants x {max(SEQUENCES)} sequences")
    if args.kernels == "triton" and not args.device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--kernels triton on the CPU needs TRITON_INTERPRET=1 set before start-up "
                     "(run: TRITON_INTERPRET=1 python -m benchmarks.host_overhead)")
    return args


class OpCounter:
    """Counts ATen calls (a TorchDispatchMode) and Triton launches; while a launch runs (the
    interpreter computes with torch/numpy on the host) its own operations are not the step's."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.ops: collections.Counter = collections.Counter()
        self.views: collections.Counter = collections.Counter()  # ops whose output aliases an input: no kernel
        self.launches: collections.Counter = collections.Counter()
        self._inside_launch = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not counter._inside_launch:
                    counter.ops[str(func.overloadpacket)] += 1
                    if func.is_view:  # view, slice, detach, ...: the output aliases an input
                        counter.views[str(func.overloadpacket)] += 1
                return func(*args, **(kwargs or {}))

        self.mode = _Mode()

    @contextlib.contextmanager
    def counting(self):
        with self._patched_launches(), self.mode:
            yield self

    @contextlib.contextmanager
    def _patched_launches(self):
        """Wrap the `run` of Triton's jitted (compiled) and interpreted kernels: every launch passes there."""
        targets = []
        try:
            from triton.runtime.jit import JITFunction

            targets.append(JITFunction)
        except ImportError:
            pass
        try:
            from triton.runtime.interpreter import InterpretedFunction

            targets.append(InterpretedFunction)
        except ImportError:
            pass
        originals = [(cls, cls.run) for cls in targets]
        counter = self

        def wrap(original):
            def run(fn, *args, **kwargs):
                counter.launches[getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "?")] += 1
                counter._inside_launch += 1
                try:
                    return original(fn, *args, **kwargs)
                finally:
                    counter._inside_launch -= 1
            return run

        for cls, original in originals:
            cls.run = wrap(original)
        try:
            yield
        finally:
            for cls, original in originals:
                cls.run = original


def build_trainer(args, tenants: int, sequences: int):
    import torch

    from muxtune.executor.backbone import load_backbone
    from muxtune.executor.trainer import MultiplexedTrainer
    from muxtune.spec import Alignment, TaskSpec

    seq = max(spread_lengths(sequences, args.tokens // tenants))
    dtype = getattr(torch, args.dtype)
    backbone = load_backbone(args.model, device=args.device, dtype=dtype)
    specs = [TaskSpec(name=f"t{i}", data=Path("synthetic"), seed=i, lr=2e-4, steps=10**6, batch_size=sequences,
                      max_seq_len=max(seq, 8), max_grad_norm=1.0, weight_decay=0.0,
                      peft=PEFT[args.method]((8, 12, 16)[i % 3]))
             for i in range(tenants)]
    # each tenant's data holds BATCHES_PER_EPOCH batches, as a real training file holds many: the counted
    # step is not an epoch boundary (its reshuffle, one host op per tenant, belongs to epochs, not steps)
    examples = {s.name: [ex for k in range(BATCHES_PER_EPOCH)
                         for ex in spread_examples(sequences, args.tokens // tenants, s.seed * 100 + k)]
                for s in specs}
    trainer = MultiplexedTrainer(backbone, specs, examples, alignment=Alignment(chunk_len=args.chunk_len))
    trainer.mux.kernels = args.kernels
    return trainer


def spread_lengths(sequences: int, tokens: int) -> list[int]:
    """`sequences` lengths adding up to `tokens`, spread evenly from 1/4 to 7/4 of their mean (a
    realistic mix: a fused batch's sequences are rarely all one length)."""
    mean = tokens / sequences
    if sequences == 1:
        return [tokens]
    lengths = [max(1, round(mean * (0.25 + 1.5 * k / (sequences - 1)))) for k in range(sequences)]
    lengths[-1] += tokens - sum(lengths)
    return lengths


def spread_examples(sequences: int, tokens: int, seed: int) -> list:
    """One batch of random byte sequences (every token carries loss) of `spread_lengths`."""
    import torch

    from muxtune.executor.data import Example

    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in spread_lengths(sequences, tokens)]
    return [Example(row, list(row)) for row in rows]


def measure_point(args, tenants: int, sequences: int) -> dict:
    import torch

    trainer = build_trainer(args, tenants, sequences)
    trainer.step()  # warm-up: kernels compiled, optimizer states allocated, caches filled
    counter = OpCounter()
    with counter.counting():
        trainer.step()
    synchronize(args.device)
    point = {"tenants": tenants, "sequences_per_tenant": sequences,
             "sequence_lengths": spread_lengths(sequences, args.tokens // tenants),
             "aten_ops": sum(counter.ops.values()), "kernel_launches": sum(counter.launches.values()),
             "view_ops": sum(counter.views.values()),
             "top_ops": dict(counter.ops.most_common(8)), "launches": dict(counter.launches)}
    point["total"] = point["aten_ops"] + point["kernel_launches"]
    point["device_work"] = point["total"] - point["view_ops"]  # ops that compute (or launch) something
    if args.timings:
        point.update(step_timings(trainer, args))
    del trainer
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return point


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_timings(trainer, args) -> dict:
    """Median wall time of a step and, on CUDA, the GPU time between events at its ends."""
    import torch

    walls, gpus = [], []
    for _ in range(args.steps):
        synchronize(args.device)
        start = time.perf_counter()
        if args.device.startswith("cuda"):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            trainer.step()
            end.record()
            torch.cuda.synchronize()
            gpus.append(begin.elapsed_time(end) / 1000)
        else:
            trainer.step()
        walls.append(time.perf_counter() - start)
    out = {"step_ms": round(1000 * statistics.median(walls), 3)}
    if gpus:
        out["gpu_ms"] = round(1000 * statistics.median(gpus), 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    torch.manual_seed(0)
    print(f"host_overhead: ops of one fused step, {args.model} on {args.device}, {args.tokens} tokens per step, "
          f"{args.method} tenants, kernels={args.kernels}", file=sys.stderr, flush=True)
    tenants = [measure_point(args, n, 1) for n in TENANTS]
    sequences = [measure_point(args, SEQUENCE_TENANTS, s) for s in SEQUENCES]
    for p in tenants + sequences:
        timing = f", step {p['step_ms']} ms" + (f" (GPU {p['gpu_ms']} ms)" if "gpu_ms" in p else "") if "step_ms" in p else ""
        print(f"  tenants {p['tenants']:>2} x {p['sequences_per_tenant']:>2} sequences (longest {max(p['sequence_lengths']):>3}): "
              f"{p['aten_ops']:>6} aten ops ({p['view_ops']} views/detaches), {p['kernel_launches']:>4} kernel "
              f"launches{timing}", file=sys.stderr)
    figures = {"ops_growth_tenants": round(tenants[-1]["total"] / tenants[0]["total"], 3),
               "ops_growth_sequences": round(sequences[-1]["total"] / sequences[0]["total"], 3)}
    # the same without views and detaches (metadata only: on a GPU they launch nothing; what still grows
    # with tenants among them is autograd's per-parameter bookkeeping: each adapter tensor's gradient)
    work = {"work_growth_tenants": round(tenants[-1]["device_work"] / tenants[0]["device_work"], 3),
            "work_growth_sequences": round(sequences[-1]["device_work"] / sequences[0]["device_work"], 3)}
    result = {"model": args.model, "method": args.method, "device": args.device, "dtype": args.dtype, "tokens": args.tokens,
              "kernels": args.kernels, "chunk_len": args.chunk_len, "tenants_sweep": tenants,
              "sequences_sweep": sequences, **figures, **work, "targets": TARGETS,
              "targets_met": {k: figures[k] <= TARGETS[k] for k in TARGETS}}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    allocator.reexec()  # train on the malloc the product trains on (muxtune/allocator.py)
    main()
