"""Grouped multi-LoRA kernels vs a per-task loop of torch matmuls vs the torch reference (GPU).

    python -m benchmarks.kernels            # 4 / 16 / 64 tasks, ranks 8..64, 4096-wide backbone
    python -m benchmarks.kernels --quick    # 4 / 16 tasks, fewer tokens

Every task has `--tokens` rows of a [tokens, 4096] bf16 activation matrix and its own LoRA (ranks cycle
8, 16, 32, 64; fp32 weights, as the executor trains them). Each variant runs forward + backward of:
  fused       muxtune.kernels.lora.segmented_lora: all tasks in one launch per GEMM kind
  loop        the executor's torch path: per task x_t A_t^T B_t^T, then one concatenation
  reference   muxtune.kernels.lora.segmented_lora_reference: padded batched matmuls
  single      ONE rank-16 LoRA over all the rows (torch matmuls): what one adapter costs on those tokens
either alone ("adapter") or after the frozen 4096x4096 bf16 projection over all rows ("with_base", the
op as the executor runs it). fp32 products use TF32 in all variants (torch allow_tf32, Triton tf32).
Timing: triton.testing.do_bench, median of repeats, after warm-up. The adapter-only variants that
write in place (fused) include the copy of the base output they need; `copy_ms` reports its cost.

Last line: JSON with per-point figures and `speedup_vs_loop_16` (loop / fused, adapter only, 16 tasks),
`fused_vs_single_16` (fused / single, with the base op, 16 tasks). On CPU timing is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from muxtune import allocator

RANKS = (8, 16, 32, 64)


def setup(n_tasks: int, tokens_per_task: int, width: int, device):
    from muxtune.kernels.segments import build_segment_table

    gen = torch.Generator(device="cpu").manual_seed(n_tasks)
    ranks = [RANKS[i % len(RANKS)] for i in range(n_tasks)]
    tokens = n_tasks * tokens_per_task
    spans = [(i * tokens_per_task, (i + 1) * tokens_per_task) for i in range(n_tasks)]
    scales = [16.0 / r for r in ranks]
    table = build_segment_table(spans, ranks, [r * width for r in ranks], [width * r for r in ranks], scales,
                                tokens, device)
    rnd = lambda *shape, dtype=torch.float32: (torch.randn(*shape, generator=gen) * 0.05).to(device, dtype)  # noqa
    x = rnd(tokens, width, dtype=torch.bfloat16).requires_grad_()
    w = rnd(width, width, dtype=torch.bfloat16)
    a_w = [rnd(r, width).requires_grad_() for r in ranks]
    b_w = [rnd(width, r).requires_grad_() for r in ranks]
    single = (rnd(16, width).requires_grad_(), rnd(width, 16).requires_grad_())
    grad = rnd(tokens, width, dtype=torch.bfloat16)
    return dict(x=x, w=w, a=a_w, b=b_w, spans=spans, scales=scales, table=table, single=single, grad=grad)


def variants(s):
    from muxtune.kernels.lora import segmented_lora, segmented_lora_reference

    x, w, a_w, b_w, table = s["x"], s["w"], s["a"], s["b"], s["table"]
    base_out = (x @ w.T).detach()

    def loop(out):
        xs = x.split([hi - lo for lo, hi in s["spans"]])
        outs = out.split([hi - lo for lo, hi in s["spans"]])
        pieces = [(o.float() + (xp.float() @ a.T @ b.T) * c).to(out.dtype)
                  for xp, o, a, b, c in zip(xs, outs, a_w, b_w, s["scales"])]
        return torch.cat(pieces)

    def single(out):
        a, b = s["single"]
        return (out.float() + (x.float() @ a.T @ b.T) * 1.0).to(out.dtype)

    adapters = {
        "fused": lambda out: segmented_lora(x, out, a_w, b_w, table),
        "loop": loop,
        "reference": lambda out: segmented_lora_reference(x, out, a_w, b_w, table),
        "single": single,
    }
    runs = {}
    for name, fn in adapters.items():
        # adapter only: start from a copy of the base output (the fused kernel writes into it)
        runs[f"{name}/adapter"] = lambda fn=fn: fn(base_out.clone()).backward(s["grad"])
        runs[f"{name}/with_base"] = lambda fn=fn: fn(x @ w.T).backward(s["grad"])
    runs["copy"] = lambda: base_out.clone()
    return runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per task")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--tasks", default="4,16,64")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's per-kernel CUDA times of fused/adapter at 16 tasks")
    args = parser.parse_args(argv)
    task_counts = [int(n) for n in args.tasks.split(",")]
    if args.quick:
        task_counts, args.tokens = [n for n in task_counts if n <= 16], min(args.tokens, 256)

    if not torch.cuda.is_available():
        print("no CUDA device: skipping kernel timing (the kernels' correctness runs in tests/test_kernels.py "
              "under TRITON_INTERPRET=1)", file=sys.stderr)
        print(json.dumps({"skipped": True, "reason": "no CUDA device"}))
        return

    import triton.testing

    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    results = {}
    print(f"{'tasks':>5} {'variant':>20} {'ms':>9}")
    for n_tasks in task_counts:
        s = setup(n_tasks, args.tokens, args.width, device)
        point = {}
        for name, fn in variants(s).items():
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            point[name] = ms
            print(f"{n_tasks:>5} {name:>20} {ms:9.3f}", flush=True)
        point["speedup_vs_loop"] = point["loop/adapter"] / point["fused/adapter"]
        point["speedup_vs_reference"] = point["reference/adapter"] / point["fused/adapter"]
        point["fused_vs_single_with_base"] = point["fused/with_base"] / point["single/with_base"]
        point["loop_vs_single_with_base"] = point["loop/with_base"] / point["single/with_base"]
        results[str(n_tasks)] = point
        del s
        torch.cuda.empty_cache()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        s = setup(16, args.tokens, args.width, device)
        fused = variants(s)["fused/adapter"]
        for _ in range(3):
            fused()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fused()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), file=sys.stderr)
    summary = {"device": torch.cuda.get_device_name(), "tokens_per_task": args.tokens, "width": args.width,
               "points": results}
    if "16" in results:
        summary["speedup_vs_loop_16"] = results["16"]["speedup_vs_loop"]
        summary["fused_vs_single_16"] = results["16"]["fused_vs_single_with_base"]
    print(json.dumps(summary))


if __name__ == "__main__":
    allocator.reexec()  # train on the malloc the product trains on (muxtune/allocator.py)
    main()
